//! The coordinator: the tonic service over a [`Scheduler`], durable state in the object store, a
//! background task that persists state and expires leases, and [`serve`], the library entry point
//! (`coordinator serve` and the tests call it with their own listener).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mgd3_common::commit::{self, CommitError};
use mgd3_common::imagefolder::Root;
use mgd3_common::job::{ClassRef, ClassSelection, FieldError, JobError, JobSpec, LabelScheme, ResolvedJob, job_id};
use mgd3_common::layout::JobKeys;
use mgd3_common::proto::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use mgd3_common::proto::{self, poll_work_response::Action};
use mgd3_common::rpc::RequireToken;
use mgd3_common::store::{self, Location};
use mgd3_common::{PROTOCOL_VERSION, now_ms};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::lock::{LockError, StoreLock};
use crate::scheduler::{JobState, PollDecision, Running, Scheduler, Settled};

/// How long after a coordinator stops renewing its store lock another may take the store over.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);
use crate::state;

/// How `serve` runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Where coordinator state lives (and job outputs, unless a job names another `output`).
    pub store_url: String,
    pub token: Option<String>,
    /// PEM certificate and key for TLS.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    pub heartbeat_ms: u64,
}

struct Inner {
    scheduler: Mutex<Scheduler>,
    store: Location,
    outputs: Mutex<HashMap<String, Location>>,
    dirty: Mutex<HashSet<String>>,
    /// Succeeded jobs whose manifest is still to be written (with their finish time).
    manifests_due: Mutex<HashMap<String, u64>>,
    /// Jobs whose records are damaged, with what is wrong: listed, never scheduled.
    quarantined: Mutex<BTreeMap<String, String>>,
    wake: Notify,
    /// This coordinator's hold on the store.
    lock: tokio::sync::Mutex<StoreLock>,
    /// Set when another coordinator took the store over: nothing is served any more.
    fenced: std::sync::atomic::AtomicBool,
    /// Notified when `fenced` is set.
    lost: Notify,
    /// Who took the store over, once `fenced`.
    lost_to: Mutex<Option<LockError>>,
    /// Local folders a submitted spec may name (None: any; `serve` always sets them).
    allowed_paths: Mutex<Option<Vec<std::path::PathBuf>>>,
}

/// The status of a quarantined job: state `quarantined`, the damage as its one failure.
fn quarantined_status(job_id: String, reason: String) -> proto::JobStatus {
    let error = format!(
        "{reason}; the job is quarantined (not scheduled): repair or remove its records under jobs/{job_id}/, then restart the coordinator or run `coordinator resume {job_id}`"
    );
    proto::JobStatus {
        state: "quarantined".into(),
        eta_seconds: -1.0,
        failures: vec![proto::ShardFailure { shard_index: 0, wnid: String::new(), error, attempts: 0 }],
        job_id,
        ..Default::default()
    }
}

/// Folders under the job's `dataset/` that are no class of the job (relative to the output).
async fn extra_class_folders(out: &Location, job: &ResolvedJob) -> Result<Vec<String>> {
    let relative = format!("{}/dataset", JobKeys::new(&job.job_id).root());
    let prefix = out.key(&relative);
    let listing = out.store.list_with_delimiter(Some(&prefix)).await.map_err(|source| Error::ObjectStore {
        url: out.url.clone(),
        context: format!("listing `{prefix}`"),
        source,
    })?;
    let classes: HashSet<&str> = job.classes.iter().map(|c| c.wnid.as_str()).collect();
    Ok(listing
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename())
        .filter(|name| !classes.contains(name))
        .map(|name| format!("{relative}/{name}"))
        .collect())
}

/// A spec resolved at submit: the job, and what the look at its dataset found.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub job: ResolvedJob,
    /// Images per class, in class order.
    pub image_counts: Vec<usize>,
    /// What a person should know about the dataset (skipped hidden folders, non-image entries).
    pub notes: Vec<String>,
}

/// What [`Coordinator::resume`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// Shards whose every class is committed.
    pub committed: usize,
    /// Shards queued again.
    pub requeued: usize,
    /// Classes whose published files could not be restored, withdrawn to be distilled again.
    pub redone: Vec<String>,
}

/// The coordinator's shared state; cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

impl Coordinator {
    /// Opens the store and recovers every job in it: committed shards (by marker) stay done,
    /// leases survive until they expire, attempts and failures come back from state.json. Takes
    /// the store's coordinator lock first ([`DEFAULT_LOCK_TIMEOUT`]; see [`Coordinator::open_locked`]).
    pub async fn open(store_url: &str, heartbeat_ms: u64) -> Result<Self> {
        Self::open_locked(store_url, heartbeat_ms, DEFAULT_LOCK_TIMEOUT).await
    }

    /// [`Coordinator::open`] with this coordinator's lock timeout: how long another coordinator
    /// waits after this one stops renewing the store's lock before taking the store over.
    ///
    /// # Errors
    /// [`Error::Lock`] when another coordinator serves the store; store and recovery errors.
    pub async fn open_locked(store_url: &str, heartbeat_ms: u64, lock_timeout: Duration) -> Result<Self> {
        let store = store::open(store_url)?;
        let lock = StoreLock::acquire(&store, lock_timeout).await?;
        let epoch = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let coordinator = Coordinator {
            inner: Arc::new(Inner {
                scheduler: Mutex::new(Scheduler::new(heartbeat_ms, epoch)),
                store,
                outputs: Mutex::new(HashMap::new()),
                dirty: Mutex::new(HashSet::new()),
                manifests_due: Mutex::new(HashMap::new()),
                quarantined: Mutex::new(BTreeMap::new()),
                wake: Notify::new(),
                lock: tokio::sync::Mutex::new(lock),
                fenced: std::sync::atomic::AtomicBool::new(false),
                lost: Notify::new(),
                lost_to: Mutex::new(None),
                allowed_paths: Mutex::new(None),
            }),
        };
        for (job_id, loaded) in state::load_jobs(&coordinator.inner.store).await? {
            let recovered = match loaded {
                Ok((job, persisted)) => coordinator.recover(job, persisted).await,
                Err(error) => Err(error),
            };
            match recovered {
                Ok(()) => {}
                // Damage to one job's records quarantines that job; the others run. A store that
                // cannot be reached is not damage: the coordinator does not start.
                Err(error) if error.is_damage() => {
                    warn!(job = %job_id, %error, "job quarantined: its records are damaged");
                    coordinator.inner.quarantined.lock().expect("quarantined").insert(job_id, error.to_string());
                }
                Err(error) => return Err(error),
            }
        }
        // Write what recovery settled (the manifests of jobs that finished while no coordinator
        // ran) before serving, so the first status of a finished job already says so; what
        // cannot be written now is retried by the background task.
        coordinator.flush().await;
        Ok(coordinator)
    }

    /// Recovers one job found in the store (see [`Coordinator::open`]).
    async fn recover(&self, job: ResolvedJob, persisted: Option<crate::scheduler::PersistedJob>) -> Result<()> {
        let out = self.output(&job)?;
        // Staging copies a killed process left beside job.json, state.json, manifest.json and
        // the markers are not part of the published tree.
        let keys = JobKeys::new(&job.job_id);
        // The job's own records are written by the coordinator holding the store's lock alone;
        // workers may be committing markers right now: there only copies too old to be in progress.
        let zero = Duration::ZERO;
        let mut removed = commit::remove_staging_copies(&self.inner.store, keys.root(), "", zero)?;
        removed += commit::remove_staging_copies(&out, keys.root(), "", zero)?;
        removed += commit::remove_staging_copies(&out, &keys.markers(), "", commit::STALE_STAGING_COPY)?;
        if removed > 0 {
            info!(job = %job.job_id, removed, "removed staging copies left by an interrupted write");
        }
        let committed = state::committed_shards(&out, &job).await?;
        let id = job.job_id.clone();
        info!(job = %id, committed = committed.len(), shards = job.shards.len(), "recovered job");
        let job = Arc::new(job);
        let now = now_ms();
        let state = {
            let mut scheduler = self.inner.scheduler.lock().expect("scheduler");
            scheduler.add_job(job.clone(), persisted, &committed, now);
            scheduler.state(&id)
        };
        // A succeeded job is finished only once its manifest is in place, whatever state.json
        // says (a crash can fall between the two writes).
        if state == Some(JobState::Succeeded) && !state::manifest_in_place(&out, &job).await? {
            self.finish(job, JobState::Succeeded, now);
        }
        self.mark_dirty(&id);
        Ok(())
    }

    pub fn store_url(&self) -> &str {
        &self.inner.store.url
    }

    fn output(&self, job: &ResolvedJob) -> Result<Location> {
        let url = job.spec.output.clone().unwrap_or_else(|| self.inner.store.url.clone());
        let mut outputs = self.inner.outputs.lock().expect("outputs");
        if let Some(location) = outputs.get(&url) {
            return Ok(location.clone());
        }
        let location = store::open(&url)?;
        outputs.insert(url, location.clone());
        Ok(location)
    }

    fn mark_dirty(&self, job_id: &str) {
        self.inner.dirty.lock().expect("dirty").insert(job_id.to_owned());
        self.inner.wake.notify_one();
    }

    fn settled(&self, job_id: &str, settled: Settled) {
        self.mark_dirty(job_id);
        if let Settled::Finished(state) = settled {
            let job = self.inner.scheduler.lock().expect("scheduler").job(job_id);
            if let Some(job) = job {
                self.finish(job, state, now_ms());
            }
        }
    }

    /// Logs a finished job and, when it succeeded, schedules its manifest.
    fn finish(&self, job: Arc<ResolvedJob>, state: JobState, now: u64) {
        info!(job = %job.job_id, state = state.as_str(), "job finished");
        if state == JobState::Succeeded {
            self.inner.manifests_due.lock().expect("manifests").insert(job.job_id.clone(), now);
            self.inner.wake.notify_one();
        }
    }

    /// Persists dirty jobs and expires leases until `shutdown`; flushes once more at the end.
    pub async fn background(self, shutdown: impl Future<Output = ()>) {
        let heartbeat = self.inner.scheduler.lock().expect("scheduler").heartbeat_ms();
        let mut tick = tokio::time::interval(Duration::from_millis((heartbeat / 2).clamp(50, 1000)));
        let mut lock_tick = tokio::time::interval(self.inner.lock.lock().await.heartbeat());
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = lock_tick.tick() => {
                    match self.inner.lock.lock().await.renew().await {
                        Ok(()) => {}
                        Err(error @ LockError::Lost { .. }) => {
                            tracing::error!(%error, "stopping: the store has another coordinator");
                            *self.inner.lost_to.lock().expect("lost to") = Some(error);
                            self.inner.fenced.store(true, std::sync::atomic::Ordering::SeqCst);
                            self.inner.lost.notify_waiters();
                            return;
                        }
                        Err(error) => warn!(%error, "could not renew the coordinator lock; will retry"),
                    }
                    continue;
                }
                _ = tick.tick() => {
                    let changed = self.inner.scheduler.lock().expect("scheduler").expire(now_ms());
                    for (job, settled) in changed {
                        self.settled(&job, settled);
                    }
                }
                _ = self.inner.wake.notified() => {}
            }
            self.flush().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.flush().await;
    }

    /// Writes state.json of every dirty job and the manifest of every newly succeeded job.
    pub async fn flush(&self) {
        // Entries leave the set only once written: until then the job reports `running`, so
        // whoever waits for `succeeded` finds manifest.json in place.
        let due: Vec<(String, u64)> =
            self.inner.manifests_due.lock().expect("manifests").iter().map(|(k, v)| (k.clone(), *v)).collect();
        for (job_id, finished) in due {
            let job = self.inner.scheduler.lock().expect("scheduler").job(&job_id);
            let Some(job) = job else { continue };
            let result = match self.output(&job) {
                Ok(out) => state::write_manifest(&out, &job, finished).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    self.inner.manifests_due.lock().expect("manifests").remove(&job_id);
                    info!(job = %job_id, "manifest written");
                    // Now state.json may say finished (see below).
                    self.inner.dirty.lock().expect("dirty").insert(job_id.clone());
                }
                Err(error) => warn!(job = %job_id, %error, "could not write the job manifest; will retry"),
            }
        }
        let dirty: Vec<String> = self.inner.dirty.lock().expect("dirty").drain().collect();
        for job_id in dirty {
            let mut persisted = self.inner.scheduler.lock().expect("scheduler").persisted(&job_id).cloned();
            // The durable "finished" record follows the manifest it certifies: until that is
            // written, state.json keeps the job open (rewritten once the manifest is in place).
            if self.inner.manifests_due.lock().expect("manifests").contains_key(&job_id)
                && let Some(persisted) = &mut persisted
            {
                persisted.finished_unix_ms = None;
            }
            if let Some(persisted) = persisted
                && let Err(error) = state::write_state(&self.inner.store, &job_id, &persisted).await
            {
                warn!(job = %job_id, %error, "could not persist job state; will retry");
                self.mark_dirty(&job_id);
            }
        }
    }

    /// Restricts the local paths a submitted spec may name (dataset, class list, models, output,
    /// latent cache) to these folders; checked at submit before anything is read or created.
    /// Symbolic links are resolved, so a link cannot lead outside.
    pub fn allow_paths(&self, folders: Vec<std::path::PathBuf>) {
        let folders = folders.into_iter().map(|f| f.canonicalize().unwrap_or(f)).collect();
        *self.inner.allowed_paths.lock().expect("allowed paths") = Some(folders);
    }

    /// The job `job_id`, or [`Error::UnknownJob`].
    fn known_job(&self, job_id: &str) -> Result<Arc<ResolvedJob>> {
        self.inner.scheduler.lock().expect("scheduler").job(job_id).ok_or_else(|| Error::UnknownJob(job_id.into()))
    }

    /// Releases the store's coordinator lock (a clean shutdown), so the next coordinator starts
    /// at once.
    pub async fn release(&self) {
        if !self.is_fenced() {
            self.inner.lock.lock().await.release().await;
        }
    }

    /// True once another coordinator took this one's store over.
    pub fn is_fenced(&self) -> bool {
        self.inner.fenced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Tells idle workers to exit from now on.
    pub fn drain(&self) {
        self.inner.scheduler.lock().expect("scheduler").drain();
    }

    /// Tells idle workers to exit whenever every job has ended (see
    /// [`Scheduler::drain_when_done`]).
    pub fn drain_when_done(&self) {
        self.inner.scheduler.lock().expect("scheduler").drain_when_done();
    }

    /// Resolves a spec (paths against `base_dir`, class list, model fingerprints, shards); a job
    /// without `output` writes into this coordinator's store.
    pub async fn resolve(&self, spec_toml: &str, base_dir: &Path, explicit_id: Option<String>) -> Result<Resolved> {
        let allowed = self.inner.allowed_paths.lock().expect("allowed paths").clone();
        resolve_spec(spec_toml, base_dir, explicit_id, &self.inner.store.url, allowed.as_deref()).await
    }

    /// Submits a job; submitting the same spec again returns the existing job. Returns the job
    /// and whether it existed already.
    pub async fn submit(
        &self,
        spec_toml: &str,
        base_dir: &Path,
        explicit_id: Option<String>,
    ) -> Result<(Arc<ResolvedJob>, bool)> {
        self.submit_noted(spec_toml, base_dir, explicit_id).await.map(|(job, existed, _)| (job, existed))
    }

    /// [`Coordinator::submit`], also returning the notes about the dataset a person should see.
    pub async fn submit_noted(
        &self,
        spec_toml: &str,
        base_dir: &Path,
        explicit_id: Option<String>,
    ) -> Result<(Arc<ResolvedJob>, bool, Vec<String>)> {
        let Resolved { job, notes, .. } = self.resolve(spec_toml, base_dir, explicit_id).await?;
        if let Some(reason) = self.inner.quarantined.lock().expect("quarantined").get(&job.job_id) {
            return Err(Error::Quarantined { job: job.job_id, reason: reason.clone() });
        }
        if let Some(existing) = self.inner.scheduler.lock().expect("scheduler").job(&job.job_id) {
            if existing.fingerprint != job.fingerprint {
                return Err(Error::JobIdTaken { job: job.job_id });
            }
            return Ok((existing, true, notes));
        }
        let out = self.output(&job)?;
        let created = state::write_job(&self.inner.store, &job).await?;
        let job = if created { job } else { state::read_job(&self.inner.store, &job.job_id).await? };
        let committed = state::committed_shards(&out, &job).await?;
        let job = Arc::new(job);
        info!(job = %job.job_id, classes = job.classes.len(), shards = job.shards.len(), committed = committed.len(), "job submitted");
        let settled = {
            let mut scheduler = self.inner.scheduler.lock().expect("scheduler");
            scheduler.add_job(job.clone(), None, &committed, now_ms());
            scheduler.state(&job.job_id)
        };
        self.mark_dirty(&job.job_id);
        if settled == Some(JobState::Succeeded) {
            self.finish(job.clone(), JobState::Succeeded, now_ms());
        }
        Ok((job, !created, notes))
    }

    /// Lists markers, checks and repairs every published file (finishing interrupted publishes,
    /// redoing classes whose files are lost) and re-queues every shard without markers.
    pub async fn resume(&self, job_id: &str, spec: Option<(&str, &Path)>) -> Result<Resumed> {
        if self.inner.quarantined.lock().expect("quarantined").contains_key(job_id) {
            // Repaired records bring a quarantined job back; damaged ones keep it out.
            let loaded = state::load_job(&self.inner.store, job_id).await;
            let recovered = match loaded {
                Ok((job, persisted)) => self.recover(job, persisted).await,
                Err(error) => Err(error),
            };
            if let Err(error) = recovered {
                let reason = error.to_string();
                self.inner.quarantined.lock().expect("quarantined").insert(job_id.to_owned(), reason.clone());
                return Err(Error::Quarantined { job: job_id.into(), reason });
            }
            self.inner.quarantined.lock().expect("quarantined").remove(job_id);
            info!(job = %job_id, "quarantined job recovered");
        }
        let job = self.known_job(job_id)?;
        // The job's identity covers its data: images rewritten since submit make another job,
        // never new bytes under this one's fingerprint.
        let data = check_dataset(&job.spec).await?;
        let now = job.spec.fingerprint_with_data(&job.classes, Some(&data.digest));
        if now != job.fingerprint {
            return Err(Error::DataChanged { job: job_id.into() });
        }
        if let Some((text, base)) = spec {
            let now = self.resolve(text, base, Some(job_id.to_owned())).await?.job;
            if now.fingerprint != job.fingerprint {
                return Err(Error::FingerprintChanged {
                    job: job_id.into(),
                    was: job.fingerprint.clone(),
                    now: now.fingerprint,
                });
            }
        }
        let out = self.output(&job)?;
        let keys = JobKeys::new(job_id);
        // Every published file is checked against its marker's sha256 and restored from staging
        // where it can be; a class that cannot be restored is withdrawn and distilled again.
        let mut redone = Vec::new();
        for class in &job.classes {
            let Some(marker) = commit::committed_marker(&out, &keys, &class.wnid, &job.fingerprint).await? else {
                continue;
            };
            match commit::publish(&out, &keys, &marker, commit::Check::Content).await {
                Ok(()) => {}
                Err(error @ CommitError::LostStaging { .. }) => {
                    warn!(job = %job_id, class = %class.wnid, %error, "published files cannot be restored: the class is distilled again");
                    commit::uncommit(&out, &keys, &class.wnid).await?;
                    redone.push(class.wnid.clone());
                }
                Err(error) => return Err(error.into()),
            }
        }
        for folder in extra_class_folders(&out, &job).await? {
            warn!(job = %job_id, %folder, "removing a class folder of no class of this job");
            commit::delete_prefix(&out, &folder).await?;
        }
        let committed = state::committed_shards(&out, &job).await?;
        let (committed, requeued) =
            self.inner.scheduler.lock().expect("scheduler").resume(job_id, &committed, now_ms())?;
        info!(job = %job_id, committed, requeued, redone = redone.len(), "job resumed");
        let state = self.inner.scheduler.lock().expect("scheduler").state(job_id);
        self.mark_dirty(job_id);
        if state == Some(JobState::Succeeded) {
            self.finish(job, JobState::Succeeded, now_ms());
        }
        Ok(Resumed { committed, requeued, redone })
    }

    /// Checks every published file of a job against its class's marker (sha256) and that class
    /// folders hold nothing else; repairs nothing (see [`Coordinator::resume`]). Classes without
    /// a marker are reported as not committed.
    pub async fn verify(&self, job_id: &str) -> Result<proto::VerifyJobResponse> {
        let job = self.known_job(job_id)?;
        let out = self.output(&job)?;
        let keys = JobKeys::new(job_id);
        let checks: Vec<_> = job
            .classes
            .iter()
            .map(|class| (out.clone(), keys.clone(), job.fingerprint.clone(), class.wnid.clone()))
            .map(|(out, keys, fingerprint, wnid)| async move {
                let Some(marker) = commit::committed_marker(&out, &keys, &wnid, &fingerprint).await? else {
                    let problem = proto::VerifyProblem { wnid, file: String::new(), problem: "not committed".into() };
                    return Ok::<_, Error>((0, vec![problem]));
                };
                let (files, problems) = commit::verify_class(&out, &keys, &marker).await?;
                let problems = problems
                    .into_iter()
                    .map(|p| proto::VerifyProblem { wnid: wnid.clone(), file: p.file, problem: p.problem })
                    .collect();
                Ok((files, problems))
            })
            .collect();
        let mut response = proto::VerifyJobResponse { classes_checked: job.classes.len() as u32, ..Default::default() };
        let mut results = futures::StreamExt::buffered(futures::stream::iter(checks), 16);
        while let Some(result) = futures::StreamExt::next(&mut results).await {
            let (files, problems) = result?;
            response.files_checked += files;
            response.problems.extend(problems);
        }
        for folder in extra_class_folders(&out, &job).await? {
            response.problems.push(proto::VerifyProblem {
                wnid: String::new(),
                file: folder,
                problem: "a class folder of no class of this job (it would add a class to the dataset)".into(),
            });
        }
        let finished = self.inner.scheduler.lock().expect("scheduler").state(job_id) == Some(JobState::Succeeded);
        if finished && !state::manifest_in_place(&out, &job).await? {
            response.problems.push(proto::VerifyProblem {
                wnid: String::new(),
                file: keys.manifest(),
                problem: "missing, or not this job's manifest".into(),
            });
        }
        info!(job = %job_id, files = response.files_checked, problems = response.problems.len(), "job verified");
        Ok(response)
    }

    pub fn cancel(&self, job_id: &str) -> Result<()> {
        let settled = self.inner.scheduler.lock().expect("scheduler").cancel(job_id, now_ms())?;
        self.settled(job_id, settled);
        Ok(())
    }

    pub fn status(&self, job_id: &str) -> Result<proto::JobStatus> {
        if let Some(reason) = self.inner.quarantined.lock().expect("quarantined").get(job_id) {
            return Ok(quarantined_status(job_id.to_owned(), reason.clone()));
        }
        let now = now_ms();
        let scheduler = self.inner.scheduler.lock().expect("scheduler");
        let summary = scheduler.summary(job_id, now).ok_or_else(|| Error::UnknownJob(job_id.into()))?;
        let job = &summary.job;
        let failures = summary
            .failures
            .iter()
            .map(|(index, shard)| {
                let error = shard.last_error.clone();
                proto::ShardFailure {
                    shard_index: *index as u32,
                    wnid: error.as_ref().and_then(|e| e.wnid.clone()).unwrap_or_else(|| {
                        job.shard_classes(*index).iter().map(|c| c.wnid.as_str()).collect::<Vec<_>>().join(",")
                    }),
                    error: error.map(|e| e.error).unwrap_or_default(),
                    attempts: shard.attempts,
                }
            })
            .collect();
        Ok(proto::JobStatus {
            job_id: job.job_id.clone(),
            state: if summary.state == JobState::Succeeded
                && self.inner.manifests_due.lock().expect("manifests").contains_key(&job.job_id)
            {
                JobState::Running.as_str().into()
            } else {
                summary.state.as_str().into()
            },
            shards_total: job.shards.len() as u32,
            shards_done: summary.done,
            shards_running: summary.running,
            shards_pending: summary.pending,
            shards_failed: summary.failed,
            images_done: summary.images_done,
            images_total: job.images_total(),
            images_per_second: summary.images_per_second,
            eta_seconds: if summary.eta_seconds.is_finite() { summary.eta_seconds } else { -1.0 },
            failures,
            fingerprint: job.fingerprint.clone(),
            created_unix_ms: job.created_unix_ms,
            finished_unix_ms: summary.finished_unix_ms.unwrap_or(0),
            workers: scheduler.live_workers(now) as u32,
            output: format!(
                "{}/{}",
                job.spec.output.clone().unwrap_or_default().trim_end_matches('/'),
                JobKeys::new(&job.job_id).root()
            ),
        })
    }

    pub fn list(&self) -> Vec<proto::JobStatus> {
        let ids = self.inner.scheduler.lock().expect("scheduler").job_ids();
        let mut jobs: Vec<_> = ids.iter().filter_map(|id| self.status(id).ok()).collect();
        let quarantined = self.inner.quarantined.lock().expect("quarantined").clone();
        jobs.extend(quarantined.into_iter().map(|(id, reason)| quarantined_status(id, reason)));
        jobs
    }

    fn register(&self, request: proto::RegisterWorkerRequest) -> Result<proto::RegisterWorkerResponse> {
        if request.protocol_version != PROTOCOL_VERSION {
            return Err(Error::Incompatible(format!(
                "worker `{}` speaks protocol {}, this coordinator speaks {PROTOCOL_VERSION}; run the same mgd3 version on both",
                request.worker_id, request.protocol_version
            )));
        }
        let mut scheduler = self.inner.scheduler.lock().expect("scheduler");
        for id in scheduler.job_ids() {
            if scheduler.state(&id) != Some(JobState::Running) {
                continue;
            }
            let job = scheduler.job(&id).expect("listed job");
            let m = &job.spec.models;
            for (path, expected) in [
                (&m.dit, &m.dit_fingerprint),
                (&m.vae_encoder, &m.vae_encoder_fingerprint),
                (&m.vae_decoder, &m.vae_decoder_fingerprint),
            ] {
                if let (Some(have), Some(want)) = (request.model_fingerprints.get(path), expected)
                    && have != want
                {
                    return Err(Error::Incompatible(format!(
                        "worker `{}` holds model `{path}` with fingerprint {have}, job `{id}` expects {want}",
                        request.worker_id
                    )));
                }
            }
        }
        scheduler.register(&request.worker_id, now_ms());
        info!(worker = %request.worker_id, host = %request.hostname, devices = ?request.devices, "worker registered");
        Ok(proto::RegisterWorkerResponse {
            worker_id: request.worker_id,
            heartbeat_interval_ms: scheduler.heartbeat_ms(),
        })
    }

    fn poll(&self, request: proto::PollWorkRequest) -> Result<proto::PollWorkResponse> {
        let running: Vec<Running> = request
            .running
            .iter()
            .map(|r| Running { lease_id: r.lease_id.clone(), images_done: r.images_done })
            .collect();
        let (decision, revoked) = self.inner.scheduler.lock().expect("scheduler").poll(
            &request.worker_id,
            &running,
            request.draining,
            now_ms(),
        )?;
        let action = match decision {
            PollDecision::Lease(grant) => {
                info!(job = %grant.job.job_id, shard = grant.shard_index, attempt = grant.attempt, worker = %request.worker_id, "lease granted");
                self.mark_dirty(&grant.job.job_id);
                Action::Lease(proto::Lease {
                    lease_id: grant.lease_id,
                    job_id: grant.job.job_id.clone(),
                    shard_index: grant.shard_index as u32,
                    attempt: grant.attempt,
                    attempt_id: grant.attempt_id,
                    deadline_unix_ms: grant.deadline_ms,
                    classes: grant
                        .classes
                        .iter()
                        .map(|c| proto::ClassAssignment {
                            wnid: c.wnid.clone(),
                            label: c.label,
                            class_index: c.class_index,
                        })
                        .collect(),
                    spec_json: serde_json::to_string(&grant.job.spec).expect("serialisable spec"),
                    spec_fingerprint: grant.job.fingerprint.clone(),
                })
            }
            PollDecision::Wait(ms) => Action::WaitMs(ms),
            PollDecision::Drain => Action::Drain(true),
        };
        Ok(proto::PollWorkResponse { action: Some(action), revoked })
    }

    async fn complete(&self, request: proto::CompleteShardRequest) -> Result<()> {
        let (job, shard) =
            self.inner.scheduler.lock().expect("scheduler").lease(&request.worker_id, &request.lease_id)?;
        let out = self.output(&job)?;
        let keys = JobKeys::new(&job.job_id);
        for class in job.shard_classes(shard) {
            if mgd3_common::commit::committed_marker(&out, &keys, &class.wnid, &job.fingerprint).await?.is_none() {
                // A refused completion is recorded as what it is (typically the worker writes
                // to storage the coordinator does not see), not left to expire as a lost lease.
                let error = Error::MissingMarker { shard, wnid: class.wnid.clone(), output: out.url.clone() };
                let settled = self.inner.scheduler.lock().expect("scheduler").fail(
                    &request.worker_id,
                    &request.lease_id,
                    Some(class.wnid.clone()),
                    format!("worker `{}` reported the shard complete, but {error}", request.worker_id),
                    true,
                    false,
                    now_ms(),
                );
                if let Ok((job_id, settled)) = settled {
                    warn!(job = %job_id, shard, worker = %request.worker_id, wnid = %class.wnid, output = %out.url, "completion refused: no commit marker");
                    self.settled(&job_id, settled);
                }
                return Err(error);
            }
        }
        let (job_id, settled) = self.inner.scheduler.lock().expect("scheduler").complete(
            &request.worker_id,
            &request.lease_id,
            now_ms(),
        )?;
        info!(job = %job_id, shard, worker = %request.worker_id, images = request.images, seconds = request.seconds, "shard committed");
        self.settled(&job_id, settled);
        Ok(())
    }

    fn fail(&self, request: proto::FailShardRequest) -> Result<()> {
        let wnid = Some(request.wnid.clone()).filter(|w| !w.is_empty());
        let mut scheduler = self.inner.scheduler.lock().expect("scheduler");
        let now = now_ms();
        let (job_id, settled) = if request.incompatible {
            scheduler.exclude(&request.worker_id, &request.lease_id, request.error.clone(), now)?
        } else {
            scheduler.fail(
                &request.worker_id,
                &request.lease_id,
                wnid,
                request.error.clone(),
                request.retryable,
                request.released,
                now,
            )?
        };
        drop(scheduler);
        if request.released {
            info!(job = %job_id, worker = %request.worker_id, "lease released");
        } else if request.incompatible {
            // Not an attempt: the shard goes to another worker with its budget untouched.
            warn!(job = %job_id, worker = %request.worker_id, reason = %request.error, "worker excluded from the job");
        } else {
            warn!(job = %job_id, worker = %request.worker_id, wnid = %request.wnid, retryable = request.retryable, error = %request.error, "shard attempt failed");
        }
        self.settled(&job_id, settled);
        Ok(())
    }
}

/// Lists the class folders of an ImageFolder root, local or in an object store (for
/// `classes = "all"`).
/// Resolves a spec as submit does, without a coordinator: paths against `base_dir`, validation,
/// model fingerprints, the dataset listed and checked (see [`check_dataset`]), shards and the job
/// id. A job without `output` writes to `default_output`.
///
/// # Errors
/// Every problem of the spec or its dataset, as [`Error::Job`] where the user can fix it.
pub async fn resolve_spec(
    spec_toml: &str,
    base_dir: &Path,
    explicit_id: Option<String>,
    default_output: &str,
    allowed: Option<&[std::path::PathBuf]>,
) -> Result<Resolved> {
    let mut spec = JobSpec::from_toml(spec_toml)?;
    spec.resolve_paths(base_dir);
    spec.validate()?;
    let explicit_id = explicit_id.filter(|s| !s.is_empty());
    if let Some(id) = &explicit_id {
        mgd3_common::job::validate_job_id(id)?;
    }
    if let Some(allowed) = allowed {
        // Before anything is read, listed or created on behalf of the submitter.
        let mut checked = spec.clone();
        checked.output.get_or_insert_with(|| default_output.to_owned());
        checked.check_local_paths(allowed)?;
    }
    if spec.output.is_none() {
        spec.output = Some(default_output.to_owned());
    }
    // The dataset first: its problems are the user's to fix and cheaper to find than model
    // fingerprints of gigabytes.
    let data = check_dataset(&spec).await?;
    // Models in an object store are fetched into the local model cache to be fingerprinted;
    // the spec keeps their URLs (workers fetch them the same way).
    let cache = store::model_cache_dir();
    let mut local = spec.models.clone();
    for path in [&mut local.dit, &mut local.vae_encoder, &mut local.vae_decoder] {
        *path = store::fetch_model(path, &cache).await?.display().to_string();
    }
    let urls = spec.models.clone();
    let classes = data.classes.clone();
    let mut spec = tokio::task::spawn_blocking(move || {
        let spec = JobSpec { models: local, ..spec };
        check_models(&spec, &classes)?;
        fill_model_fingerprints(spec)
    })
    .await
    .expect("fingerprint task")?;
    spec.models.dit = urls.dit;
    spec.models.vae_encoder = urls.vae_encoder;
    spec.models.vae_decoder = urls.vae_decoder;
    let fingerprint = spec.fingerprint_with_data(&data.classes, Some(&data.digest));
    let shards = spec.plan_shards(data.classes.len());
    let job_id = explicit_id.unwrap_or_else(|| job_id(&spec, &fingerprint));
    for note in &data.notes {
        info!(job = %job_id, "{note}");
    }
    let job = ResolvedJob { job_id, spec, classes: data.classes, shards, fingerprint, created_unix_ms: now_ms() };
    Ok(Resolved { job, image_counts: data.image_counts, notes: data.notes })
}

/// What the submit-time look at the dataset found.
struct DatasetCheck {
    classes: Vec<ClassRef>,
    /// Images per class, in class order.
    image_counts: Vec<usize>,
    /// sha256 over every class's listing (relative names and sizes).
    digest: String,
    /// What a person should know (hidden folders skipped, entries that are not images).
    notes: Vec<String>,
}

/// Lists the dataset by the one ImageFolder rule at submit: the class folders (for
/// `classes = "all"`) and every class's images. Every class that is missing or holds fewer than
/// IPC images is reported, all in one error, before any work is leased.
async fn check_dataset(spec: &JobSpec) -> Result<DatasetCheck> {
    let invalid = |problems: Vec<String>| {
        Error::Job(JobError::Invalid(
            problems.into_iter().map(|problem| FieldError { field: "dataset".into(), problem }).collect(),
        ))
    };
    let root = Root::open(&spec.dataset).map_err(|e| invalid(vec![e.to_string()]))?;
    let mut notes = Vec::new();
    let all = matches!(&spec.classes, ClassSelection::Named(all) if all == "all");
    let folders = match &spec.classes {
        _ if all || matches!(spec.labels, LabelScheme::Folder | LabelScheme::Position) => {
            let (names, hidden) = root.list_classes().await.map_err(|e| invalid(vec![e.to_string()]))?;
            if !hidden.is_empty() {
                notes.push(format!(
                    "skipped {} hidden folder(s) of `{}` (never a class): {}",
                    hidden.len(),
                    root.url(),
                    hidden.iter().map(|h| h.escape_debug().to_string()).collect::<Vec<_>>().join(", ")
                ));
            }
            Some(names)
        }
        _ => None,
    };
    let folder_count = folders.as_ref().map_or(0, Vec::len);
    let classes = spec.class_list(|| Ok(folders.unwrap_or_default()))?;
    if spec.labels == LabelScheme::Position && !all && classes.len() < folder_count {
        // The silent mislabel: a model trained on the whole ImageFolder numbers classes by folder.
        notes.push(format!(
            "labels = \"position\" numbers the {} listed classes 0..{}, but `{}` has {folder_count} class folders: a \
             DiT trained on the whole ImageFolder expects each class's folder index; use labels = \"folder\" for that",
            classes.len(),
            classes.len() - 1,
            root.url()
        ));
    }
    let lists: Vec<_> = classes
        .iter()
        .map(|class| {
            let (root, wnid) = (root.clone(), class.wnid.clone());
            async move { root.list_class(&wnid).await }
        })
        .collect();
    let listings = futures::StreamExt::buffered(futures::stream::iter(lists), 16);
    let listings: Vec<_> = futures::StreamExt::collect(listings).await;
    let (mut problems, mut counts, mut digest) = (Vec::new(), Vec::new(), String::new());
    let mut skipped = (0, 0);
    for (class, listing) in classes.iter().zip(listings) {
        match listing {
            Err(error) => {
                problems.push(error.to_string());
                counts.push(0);
            }
            Ok(listing) => {
                if listing.images.len() < spec.ipc {
                    problems.push(format!(
                        "class `{}`: {} image(s) but IPC = {} needs at least {}; add images or lower ipc",
                        class.wnid.escape_debug(),
                        listing.images.len(),
                        spec.ipc,
                        spec.ipc
                    ));
                }
                skipped.0 += listing.skipped.hidden;
                skipped.1 += listing.skipped.not_images;
                counts.push(listing.images.len());
                digest.push_str(&format!("{}\t{}\n", class.wnid, listing.digest()));
            }
        }
    }
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    if skipped != (0, 0) {
        notes.push(format!(
            "the class folders hold {} hidden and {} non-image entries, skipped (recorded in each class's marker)",
            skipped.0, skipped.1
        ));
    }
    Ok(DatasetCheck { classes, image_counts: counts, digest: mgd3_common::sha256_hex(digest.as_bytes()), notes })
}

/// Checks what can be checked of the models at submit, from their `mgd3.*` metadata and input
/// shapes (read without ONNX Runtime; a model without them is left to the worker's load-time
/// contract check): every class label inside the DiT's classes, `sampling.cfg_channels` within
/// the DiT's latent channels, DDIM `sampling.steps` the DiT's timesteps can be respaced to, one
/// image size for the VAE encoder and decoder. Every problem is
/// reported at once, naming the setting as the job spec spells it.
fn check_models(spec: &JobSpec, classes: &[ClassRef]) -> Result<()> {
    use mgd3_common::modelmeta::read_model_meta;
    let read = |path: &str| read_model_meta(Path::new(path.strip_prefix("file://").unwrap_or(path))).ok();
    let m = &spec.models;
    let mut problems = Vec::new();
    for (field, path, kind) in [
        ("models.dit", &m.dit, "dit"),
        ("models.vae_encoder", &m.vae_encoder, "vae_encoder"),
        ("models.vae_decoder", &m.vae_decoder, "vae_decoder"),
    ] {
        if let Some(found) = read(path).and_then(|meta| meta.metadata.get("mgd3.kind").cloned())
            && found != kind
        {
            problems.push(FieldError {
                field: field.into(),
                problem: format!(
                    "`{path}` is a {found} model (metadata `mgd3.kind`), not a {kind}; are two models swapped?"
                ),
            });
        }
    }
    if let Some(dit) = read(&m.dit).filter(|meta| meta.metadata.get("mgd3.kind").is_none_or(|k| k == "dit")) {
        if let Some(n) = dit.get::<i64>("mgd3.num_classes") {
            let outside: Vec<String> = classes
                .iter()
                .filter(|c| c.label < 0 || c.label >= n)
                .map(|c| format!("`{}` → {}", c.wnid.escape_debug(), c.label))
                .collect();
            if !outside.is_empty() {
                problems.push(FieldError {
                    field: "labels".into(),
                    problem: format!(
                        "{} class label(s) outside the DiT's {n} classes (models.dit metadata `mgd3.num_classes`): {}; \
                         use a DiT trained on these classes, or fewer classes",
                        outside.len(),
                        outside.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
        if spec.sampling.sampler == mgd3_common::job::SamplerKind::Ddim
            && let Some(train) = dit.get::<usize>("mgd3.train_timesteps")
            && mgd3_common::job::ddim_stride(train, spec.sampling.steps).is_none()
        {
            problems.push(FieldError {
                field: "sampling.steps".into(),
                problem: format!(
                    "DDIM cannot take {} evenly strided steps of the DiT's {train} training timesteps (ADM's \
                     `ddim{}`); choose steps such as 10, 20, 25, 50, 100 or 250",
                    spec.sampling.steps, spec.sampling.steps
                ),
            });
        }
        if let Some(Some(channels)) = dit.inputs.get("x").and_then(|dims| dims.get(1).copied())
            && spec.sampling.cfg_channels as i64 > channels
        {
            problems.push(FieldError {
                field: "sampling.cfg_channels".into(),
                problem: format!(
                    "{} exceeds the DiT's {channels} latent channels (input `x` of models.dit)",
                    spec.sampling.cfg_channels
                ),
            });
        }
    }
    let size = |path: &str| read(path).and_then(|meta| meta.get::<i64>("mgd3.image_size"));
    if let (Some(encoder), Some(decoder)) = (size(&m.vae_encoder), size(&m.vae_decoder))
        && encoder != decoder
    {
        problems.push(FieldError {
            field: "models.vae_decoder".into(),
            problem: format!("decodes {decoder}-pixel images, the VAE encoder reads {encoder}-pixel ones"),
        });
    }
    if problems.is_empty() { Ok(()) } else { Err(Error::Job(JobError::Invalid(problems))) }
}

/// Computes missing model fingerprints from the files; a given fingerprint is checked when the
/// file is readable here.
fn fill_model_fingerprints(mut spec: JobSpec) -> Result<JobSpec> {
    let m = &mut spec.models;
    for (field, path, expected) in [
        ("models.dit", &m.dit, &mut m.dit_fingerprint),
        ("models.vae_encoder", &m.vae_encoder, &mut m.vae_encoder_fingerprint),
        ("models.vae_decoder", &m.vae_decoder, &mut m.vae_decoder_fingerprint),
    ] {
        let local = path.strip_prefix("file://").unwrap_or(path);
        match mgd3_common::fingerprint_file(Path::new(local)) {
            Ok(actual) => match expected {
                Some(want) if *want != actual => {
                    return Err(Error::Job(mgd3_common::job::JobError::Invalid(vec![mgd3_common::job::FieldError {
                        field: format!("{field}_fingerprint"),
                        problem: format!("`{path}` has fingerprint {actual}, the spec expects {want}"),
                    }])));
                }
                _ => *expected = Some(actual),
            },
            Err(source) if expected.is_none() => {
                return Err(Error::Io { what: "model file", path: path.clone(), source });
            }
            Err(_) => {}
        }
    }
    Ok(spec)
}

/// The gRPC adapter.
#[derive(Clone)]
pub struct Service(pub Coordinator);

type RpcResult<T> = std::result::Result<Response<T>, Status>;

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn register_worker(
        &self,
        request: Request<proto::RegisterWorkerRequest>,
    ) -> RpcResult<proto::RegisterWorkerResponse> {
        Ok(Response::new(self.0.register(request.into_inner())?))
    }

    async fn poll_work(&self, request: Request<proto::PollWorkRequest>) -> RpcResult<proto::PollWorkResponse> {
        Ok(Response::new(self.0.poll(request.into_inner())?))
    }

    async fn complete_shard(
        &self,
        request: Request<proto::CompleteShardRequest>,
    ) -> RpcResult<proto::CompleteShardResponse> {
        self.0.complete(request.into_inner()).await?;
        Ok(Response::new(proto::CompleteShardResponse {}))
    }

    async fn fail_shard(&self, request: Request<proto::FailShardRequest>) -> RpcResult<proto::FailShardResponse> {
        self.0.fail(request.into_inner())?;
        Ok(Response::new(proto::FailShardResponse {}))
    }

    async fn submit_job(&self, request: Request<proto::SubmitJobRequest>) -> RpcResult<proto::SubmitJobResponse> {
        let r = request.into_inner();
        let (job, existed, notes) = self.0.submit_noted(&r.spec_toml, Path::new(&r.base_dir), Some(r.job_id)).await?;
        Ok(Response::new(proto::SubmitJobResponse {
            job_id: job.job_id.clone(),
            fingerprint: job.fingerprint.clone(),
            shards: job.shards.len() as u32,
            already_existed: existed,
            notes,
        }))
    }

    async fn get_job_status(&self, request: Request<proto::GetJobStatusRequest>) -> RpcResult<proto::JobStatus> {
        Ok(Response::new(self.0.status(&request.into_inner().job_id)?))
    }

    async fn resume_job(&self, request: Request<proto::ResumeJobRequest>) -> RpcResult<proto::ResumeJobResponse> {
        let r = request.into_inner();
        let spec = (!r.spec_toml.is_empty()).then(|| (r.spec_toml.as_str(), Path::new(&r.base_dir)));
        let resumed = self.0.resume(&r.job_id, spec).await?;
        Ok(Response::new(proto::ResumeJobResponse {
            committed: resumed.committed as u32,
            requeued: resumed.requeued as u32,
            redone: resumed.redone,
        }))
    }

    async fn verify_job(&self, request: Request<proto::VerifyJobRequest>) -> RpcResult<proto::VerifyJobResponse> {
        Ok(Response::new(self.0.verify(&request.into_inner().job_id).await?))
    }

    async fn cancel_job(&self, request: Request<proto::CancelJobRequest>) -> RpcResult<proto::CancelJobResponse> {
        self.0.cancel(&request.into_inner().job_id)?;
        Ok(Response::new(proto::CancelJobResponse {}))
    }

    async fn list_jobs(&self, _request: Request<proto::ListJobsRequest>) -> RpcResult<proto::ListJobsResponse> {
        Ok(Response::new(proto::ListJobsResponse { jobs: self.0.list() }))
    }
}

/// Serves the coordinator on `listener` until `shutdown` resolves.
pub async fn serve(
    coordinator: Coordinator,
    config: &ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr =
        listener.local_addr().map_err(|source| Error::Io { what: "listener", path: "local address".into(), source })?;
    let service =
        CoordinatorServer::with_interceptor(Service(coordinator.clone()), RequireToken::new(config.token.as_deref()));
    mgd3_common::ensure_crypto_provider();
    let mut builder = Server::builder();
    if let Some((cert, key)) = &config.tls {
        builder = builder.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))?;
    }
    info!(%addr, store = %coordinator.store_url(), auth = config.token.is_some(), tls = config.tls.is_some(), "coordinator serving");
    let (stop_background, background_stopped) = tokio::sync::oneshot::channel::<()>();
    let background = tokio::spawn(coordinator.clone().background(async move {
        let _ = background_stopped.await;
    }));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let lost = {
        let coordinator = coordinator.clone();
        async move {
            if !coordinator.is_fenced() {
                coordinator.inner.lost.notified().await;
            }
        }
    };
    let stop = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = lost => {}
        }
    };
    let result = builder.add_service(service).serve_with_incoming_shutdown(incoming, stop).await;
    let _ = stop_background.send(());
    let _ = background.await;
    if coordinator.is_fenced() {
        let lost = coordinator.inner.lost_to.lock().expect("lost to").take();
        return Err(Error::Lock(lost.unwrap_or(LockError::Lost {
            url: coordinator.store_url().to_owned(),
            host: "another host".into(),
            pid: 0,
        })));
    }
    coordinator.release().await;
    result.map_err(Error::from)
}
