//! The coordinator's domain: [`Coordinator`] over a [`Scheduler`] — jobs, leases, commits,
//! recovery, resume and verification — with durable state behind [`crate::jobstore::JobStore`]
//! and a background task that persists state and expires leases. Submission (spec resolution)
//! is in [`crate::submit`], the gRPC adapter and [`crate::grpc::serve`] in [`crate::grpc`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use mgd3_common::commit::{self, CommitError};
use mgd3_common::job::{ClassRef, DataChange, ResolvedJob};
use mgd3_common::layout::JobKeys;
use mgd3_common::lease::{Completion, Disposition, Exclusion, Failure, Registration};
use mgd3_common::status::{JobStatus, ShardCounts, ShardFailure, VerifyProblem, VerifyReport};
use mgd3_common::store::{self, Location};
use mgd3_common::{PROTOCOL_VERSION, now_ms};
use object_store::ObjectStoreExt;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::jobstore::{JobStore, ObjectJobStore};
use crate::lock::{JobClaim, LockError, StoreLock};
use crate::scheduler::{JobState, PollDecision, Running, Scheduler, Settled};

/// How long after a coordinator stops renewing its store lock another may take the store over.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);
use crate::state;
use crate::submit::{Resolved, ResolvedSweep, check_dataset, resolve_spec, resolve_sweep};
use mgd3_common::sweep::{Sweep, SweepRecord};

/// How `serve` runs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Where coordinator state lives (and job outputs, unless a job names another `output`).
    pub store_url: String,
    /// Bearer token every RPC must carry (`serve --token-file`); `None`: no authentication.
    pub token: Option<String>,
    /// PEM certificate and key for TLS.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// How often workers poll (ms).
    pub heartbeat_ms: u64,
}

struct Inner {
    scheduler: Mutex<Scheduler>,
    store: Location,
    /// The jobs' own records (job.json, state.json), in `store`.
    jobs: Arc<dyn JobStore>,
    outputs: Mutex<HashMap<String, Location>>,
    dirty: Mutex<HashSet<String>>,
    /// Succeeded jobs whose manifest is still to be written (with their finish time).
    manifests_due: Mutex<HashMap<String, u64>>,
    /// Jobs whose records are damaged, with what is wrong: listed, never scheduled.
    quarantined: Mutex<BTreeMap<String, Quarantine>>,
    wake: Notify,
    /// This coordinator's hold on the store.
    lock: tokio::sync::Mutex<StoreLock>,
    /// [`StoreLock::held_until`] of the last renewal that succeeded, readable without waiting
    /// for a renewal in flight: past it, nothing is leased or written (see [`Coordinator::holds_store`]).
    held_until: Mutex<tokio::time::Instant>,
    /// The lock's timeout: how long a call waits for a late renewal.
    lock_timeout: Duration,
    /// Notified at every successful renewal of the lock (and when it is lost).
    renewed: Notify,
    /// Set when another coordinator took the store over: nothing is served any more.
    fenced: std::sync::atomic::AtomicBool,
    /// Notified when `fenced` is set.
    lost: Notify,
    /// Who took the store over, once `fenced`.
    lost_to: Mutex<Option<LockError>>,
    /// Local folders a submitted spec may name (None: any; `serve` always sets them).
    allowed_paths: Mutex<Option<Vec<std::path::PathBuf>>>,
    /// Failing writes of state.json and of manifests: told once per outage, not per try.
    state_outage: Mutex<Outage>,
    manifest_outage: Mutex<Outage>,
    lock_outage: Mutex<Outage>,
    claim_outage: Mutex<Outage>,
    /// Finished jobs whose manifest the output refuses for good (full, read-only, denied), with
    /// the refusal: shown as `paused` until the write works (it is retried all along).
    manifest_refused: Mutex<HashMap<String, String>>,
    /// When each job's `job.json` was last seen in place by a flush (see
    /// [`Coordinator::vanished`]).
    presence_checked: Mutex<HashMap<String, std::time::Instant>>,
    /// Every sweep record in the store (read at open, kept by submit and forget), or what is
    /// wrong with one that does not read: `status`, `list` and the reports ask for sweeps on
    /// every call, and must answer while the store is slow or down.
    sweeps: Mutex<BTreeMap<String, std::result::Result<SweepRecord, String>>>,
    /// This coordinator's claims on the outputs of the jobs it runs (running or paused), renewed
    /// with its lock ([`StoreLock::claim`]).
    claims: Mutex<HashMap<String, JobClaim>>,
    /// Jobs another coordinator runs for now, with whose claim it is ([`Coordinator::wait_elsewhere`]).
    elsewhere: Mutex<HashMap<String, String>>,
    /// Jobs whose claim is being tried ([`Coordinator::try_claim`]).
    claiming: Mutex<HashSet<String>>,
    /// When (Unix ms) this coordinator last showed it was running ([`Coordinator::check_stall`]).
    alive_at: std::sync::atomic::AtomicU64,
}

/// What [`Coordinator::forget_sweep`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForgottenSweep {
    /// The variants' jobs forgotten.
    pub forgotten: Vec<String>,
    /// The variants kept because other sweeps hold them too, each with those sweeps' ids.
    pub kept: Vec<(String, Vec<String>)>,
}

/// A sweep as [`Coordinator::submit_sweep`] submitted it.
#[derive(Debug)]
pub struct SubmittedSweep {
    /// The sweep's record (what `sweeps/<id>.json` holds).
    pub record: SweepRecord,
    /// Each variant's job, in the sweep's order, and whether it existed already.
    pub jobs: Vec<(Arc<ResolvedJob>, bool)>,
    /// What a person should know, once for the sweep.
    pub notes: Vec<String>,
}

/// How often the coordinator notes that it runs ([`Coordinator::check_stall`]).
const STALL_BEAT: Duration = Duration::from_millis(500);

/// A gap between two such notes longer than this is a stall of the coordinator itself.
const STALL_AFTER: Duration = Duration::from_secs(5);

/// How often a flush checks that a job's `job.json` is still in the store.
const PRESENCE_CHECK: Duration = Duration::from_secs(60);

/// Why a job is quarantined: its records cannot be used.
#[derive(Clone, Debug)]
struct Quarantine {
    /// What is wrong, as the error said it.
    reason: String,
    /// Its `job.json` is missing or corrupt: submitting the same spec rebuilds it.
    rebuildable: bool,
}

impl Quarantine {
    fn of(error: &Error) -> Self {
        Quarantine {
            reason: mgd3_common::error_chain(error),
            rebuildable: matches!(error, Error::Missing { .. } | Error::Corrupt { .. }),
        }
    }

    fn error(&self, job_id: &str) -> Error {
        Error::Quarantined { job: job_id.into(), reason: self.reason.clone(), rebuildable: self.rebuildable }
    }

    fn status(&self, job_id: &str) -> JobStatus {
        let advice = crate::error::quarantine_advice(job_id, self.rebuildable);
        JobStatus::quarantined(job_id.to_owned(), self.reason.clone(), &advice)
    }
}

/// A run of failed writes of one kind, so that a store outage is told once when it begins
/// (WARN) and once when it ends (INFO), however many flushes retry in between.
#[derive(Debug, Default)]
pub(crate) struct Outage {
    /// When the first write failed, and how many have failed since.
    since: Option<(std::time::Instant, u64)>,
}

impl Outage {
    /// Records a failed write; true for the first of an outage (the one to tell at WARN).
    pub(crate) fn failed(&mut self) -> bool {
        match &mut self.since {
            None => {
                self.since = Some((std::time::Instant::now(), 1));
                true
            }
            Some((_, tries)) => {
                *tries += 1;
                false
            }
        }
    }

    /// Records a write that worked; the outage it ended (seconds, failed tries), if any.
    pub(crate) fn succeeded(&mut self) -> Option<(f64, u64)> {
        self.since.take().map(|(at, tries)| (at.elapsed().as_secs_f64(), tries))
    }

    /// Records and logs a failed write of `what` (about `job`, when it is about one): WARN for
    /// the first of an outage, DEBUG for the retries after it.
    pub(crate) fn log_failure(&mut self, what: &str, job: &str, error: &str) {
        if self.failed() {
            warn!(job, %error, "could not {what}; retrying quietly until it works (said again when it does)");
        } else {
            debug!(job, %error, "could not {what}; will retry");
        }
    }

    /// Records a write of `what` that worked, with one INFO line when it ends an outage.
    pub(crate) fn log_success(&mut self, what: &str, job: &str) {
        if let Some((seconds, tries)) = self.succeeded() {
            info!(job, seconds = %format_args!("{seconds:.0}"), failed_tries = tries, "{what} works again");
        }
    }
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
    /// Classes whose data changed and was accepted (`--accept-data-changes`): committed ones
    /// were withdrawn and are distilled again from the data as it is now.
    pub data_changed: Vec<DataChange>,
    /// Contact sheets put back in their class's place, removed, or left for a person.
    pub sheets: commit::SheetRepair,
}

/// What to do when the data of some of a job's classes changed since the job recorded it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DataChanges {
    /// Refuse ([`Error::DataChanged`], naming the classes); nothing is changed.
    #[default]
    Refuse,
    /// Record the data as it is now and distil the changed classes again; keep every other commit.
    Accept,
}

impl DataChanges {
    /// The setting `--accept-data-changes` (or the request's `accept_data_changes`) names.
    pub fn from_flag(accept: bool) -> Self {
        if accept { DataChanges::Accept } else { DataChanges::Refuse }
    }
}

/// What submitting an existing job's spec again may do besides returning the job: accept
/// changed data ([`DataChanges`]) and run a failed job's failed shards again (`--retry-failed`).
/// A bare [`DataChanges`] converts with `retry_failed` off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resubmit {
    /// What to do about classes whose data changed.
    pub data: DataChanges,
    /// A failed job is resumed ([`Coordinator::resume_with`]: its failed shards get fresh
    /// attempts, committed classes are kept) — how a person says its cause is fixed. Without it a
    /// failed job stays failed and the submit says how.
    pub retry_failed: bool,
}

impl From<DataChanges> for Resubmit {
    fn from(data: DataChanges) -> Self {
        Resubmit { data, retry_failed: false }
    }
}

/// Markers read at once when a job's classes are compared with their data.
const MARKERS_IN_FLIGHT: usize = 16;

/// How the data of `job`'s classes now (`fresh`, listed by a submit or `check`) differs from what
/// each class's commit in output `out` was made from (its marker's `data`) or, uncommitted, from
/// what the job recorded; with each class's commit marker (in the job's order; `None` where
/// uncommitted). Modification times and ETags never count (a `cp -r` copy or a `touch` is the same
/// data); classes that differ only by them are logged. Jobs and markers without recorded data are
/// not compared.
///
/// # Errors
/// [`Error::ClassListChanged`] when `fresh` holds other classes; marker and store errors.
pub async fn data_review(
    out: &Location,
    job: &ResolvedJob,
    fresh: &[ClassRef],
) -> Result<(Vec<DataChange>, Vec<Option<mgd3_common::manifest::ClassMarker>>)> {
    let names = |classes: &[ClassRef]| classes.iter().map(|c| c.wnid.clone()).collect::<Vec<_>>();
    if names(&job.classes) != names(fresh) {
        let (then, now): (HashSet<_>, HashSet<_>) =
            (names(&job.classes).into_iter().collect(), names(fresh).into_iter().collect());
        let mut added: Vec<String> = now.difference(&then).cloned().collect();
        let mut removed: Vec<String> = then.difference(&now).cloned().collect();
        added.sort();
        removed.sort();
        return Err(Error::ClassListChanged { job: job.job_id.clone(), added, removed });
    }
    let keys = JobKeys::new(&job.job_id);
    // Owned per read: a stream of futures borrowing the class list is not `Send` enough for
    // the gRPC handlers that await this.
    let reads: Vec<_> = job
        .classes
        .iter()
        .map(|class| {
            let (out, keys, wnid, fingerprint) =
                (out.clone(), keys.clone(), class.wnid.clone(), job.fingerprint.clone());
            async move { commit::committed_marker(&out, &keys, &wnid, &fingerprint).await }
        })
        .collect();
    let markers = futures::stream::iter(reads).buffered(MARKERS_IN_FLIGHT).collect::<Vec<_>>().await;
    let markers = markers.into_iter().collect::<std::result::Result<Vec<_>, _>>()?;
    let mut changes = Vec::new();
    let mut versions_only = Vec::new();
    for ((recorded, now), marker) in job.classes.iter().zip(fresh).zip(&markers) {
        let Some(now_data) = &now.listing else { continue };
        // A commit is compared with the data it was made from; anything else with the record.
        let committed_from = marker.as_ref().and_then(|m| m.data.clone());
        let Some(then) = committed_from.or_else(|| recorded.listing.clone()) else { continue };
        if !then.same_data(now_data) {
            changes.push(DataChange {
                wnid: recorded.wnid.clone(),
                then,
                now: now_data.clone(),
                was_committed: marker.is_some(),
            });
        } else if then.versions_differ(now_data) {
            versions_only.push(recorded.wnid.as_str());
        }
    }
    if !versions_only.is_empty() {
        info!(
            job = %job.job_id,
            classes = versions_only.len(),
            first = versions_only[0],
            "classes with the same image names and sizes but other file times or ETags (a copy of the \
             dataset, or files rewritten in place at the same size): the same data for this job; \
             data_fingerprint = \"content\" in the spec tells rewritten files apart"
        );
    }
    Ok((changes, markers))
}

/// What a person is told when the data changes of a job were accepted.
pub fn data_changes_note(job_id: &str, changes: &[DataChange]) -> String {
    let committed = changes.iter().filter(|c| c.was_committed).count();
    format!(
        "job `{job_id}`: the data of {} class(es) changed and is distilled again as it is now ({committed} of them \
         had been committed from the old data and were withdrawn); every other class is kept: {}",
        changes.len(),
        changes.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
    )
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
    ///
    /// # Errors
    /// As [`Coordinator::open_locked`].
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
                jobs: Arc::new(ObjectJobStore::new(store.clone())),
                store,
                outputs: Mutex::new(HashMap::new()),
                dirty: Mutex::new(HashSet::new()),
                manifests_due: Mutex::new(HashMap::new()),
                quarantined: Mutex::new(BTreeMap::new()),
                wake: Notify::new(),
                held_until: Mutex::new(lock.held_until()),
                lock_timeout: lock.timeout(),
                renewed: Notify::new(),
                lock: tokio::sync::Mutex::new(lock),
                fenced: std::sync::atomic::AtomicBool::new(false),
                lost: Notify::new(),
                lost_to: Mutex::new(None),
                allowed_paths: Mutex::new(None),
                state_outage: Mutex::new(Outage::default()),
                manifest_outage: Mutex::new(Outage::default()),
                lock_outage: Mutex::new(Outage::default()),
                claim_outage: Mutex::new(Outage::default()),
                manifest_refused: Mutex::new(HashMap::new()),
                presence_checked: Mutex::new(HashMap::new()),
                sweeps: Mutex::new(BTreeMap::new()),
                claims: Mutex::new(HashMap::new()),
                elsewhere: Mutex::new(HashMap::new()),
                claiming: Mutex::new(HashSet::new()),
                alive_at: std::sync::atomic::AtomicU64::new(now_ms()),
            }),
        };
        coordinator.load_sweeps().await?;
        for (job_id, loaded) in coordinator.inner.jobs.load_jobs().await? {
            let recovered = match loaded {
                Ok((job, persisted)) => coordinator.recover(job, persisted).await,
                Err(error) => Err(error),
            };
            match recovered {
                Ok(()) => {}
                // Damage to one job's records quarantines that job; the others run. A store that
                // cannot be reached is not damage: the coordinator does not start.
                Err(error) if error.is_damage() => {
                    warn!(job = %job_id, error = %mgd3_common::error_chain(&error), "job quarantined: its records cannot be used");
                    coordinator.inner.quarantined.lock().expect("quarantined").insert(job_id, Quarantine::of(&error));
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

    /// [`Error::Blocked`] when files or folders stand in place of the job's own (local stores).
    /// With `markers_only`, the job's folders and markers only ([`state::blocked_paths`]).
    fn refuse_blocked(&self, job: &ResolvedJob, markers_only: bool) -> Result<()> {
        let out = self.output(job)?;
        let wnids: Vec<String> = job.classes.iter().map(|c| c.wnid.clone()).collect();
        let paths = state::blocked_paths(&out, &JobKeys::new(&job.job_id), &wnids, job.spec.ipc, markers_only);
        if paths.is_empty() { Ok(()) } else { Err(Error::Blocked { job: job.job_id.clone(), paths }) }
    }

    /// Recovers one job found in the store (see [`Coordinator::open`]).
    async fn recover(&self, job: ResolvedJob, persisted: Option<crate::scheduler::PersistedJob>) -> Result<()> {
        let keys = JobKeys::new(&job.job_id);
        // A store moved with the job's outputs in it: its records name an output folder that is
        // gone (checked before opening it, which would make it anew, empty).
        let here = self.inner.store.local_path(&keys.markers());
        let output = job.spec.output.as_deref().filter(|o| !store::is_url(o)).map(std::path::Path::new);
        if let Some(output) = output
            && here.as_ref().is_some_and(|p| p.is_dir())
            && !output.exists()
        {
            return Err(Error::OutputMoved {
                job: job.job_id.clone(),
                output: output.display().to_string(),
                store: self.inner.store.url.clone(),
            });
        }
        let out = self.output(&job)?;
        self.refuse_blocked(&job, true)?;
        // Staging copies a killed process left beside job.json, state.json, manifest.json and
        // the markers are not part of the published tree.
        // The job's own records are written by the coordinator holding the store's lock alone;
        // workers may be committing markers right now: there only copies too old to be in progress.
        let zero = Duration::ZERO;
        let mut removed = commit::remove_staging_copies(&self.inner.store, keys.root(), "", zero)?;
        removed += commit::remove_staging_copies(&self.inner.store, &keys.shard_records(), "", zero)?;
        removed += commit::remove_staging_copies(&out, keys.root(), "", zero)?;
        removed += commit::remove_staging_copies(&out, &keys.markers(), "", commit::STALE_STAGING_COPY)?;
        if removed > 0 {
            info!(job = %job.job_id, removed, "removed staging copies left by an interrupted write");
        }
        // A store copied (`cp -a`) with the job's outputs in it: the job's records name the
        // original output, which is what every command of the job reads and writes.
        if out.local_root != self.inner.store.local_root && here.is_some_and(|p| p.is_dir()) {
            warn!(job = %job.job_id, output = %out.url, store = %self.inner.store.url,
                  "this store holds the job's outputs too, but the job's output is elsewhere (the store copied or moved?): \
                   status, verify, report and resume use that output, not the copy here");
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
        // A job this coordinator runs claims its output before any of it is leased: in the
        // background (a claim another coordinator holds is watched for a heartbeat or more, and
        // this coordinator serves meanwhile); one that another coordinator runs now waits for it.
        if matches!(state, Some(JobState::Running | JobState::Paused)) {
            let _ = self.hold_back(&id, true);
            self.try_claim(job.clone());
        }
        // A succeeded job is finished only once its manifest is in place, whatever state.json
        // says (a crash can fall between the two writes).
        if state == Some(JobState::Succeeded) && !state::manifest_in_place(&out, &job).await? {
            self.finish(job, JobState::Succeeded, now);
        }
        self.mark_dirty(&id);
        Ok(())
    }

    /// Claims the output of `job` for this coordinator (kept if already held; see
    /// [`StoreLock::claim`]), before it leases any of the job's work.
    ///
    /// # Errors
    /// [`Error::Lock`] with [`LockError::JobHeld`] when another coordinator runs the job now, or
    /// [`LockError::ClaimStore`].
    async fn claim_output(&self, job: &ResolvedJob) -> Result<()> {
        if self.inner.claims.lock().expect("claims").contains_key(&job.job_id) {
            return Ok(());
        }
        let out = self.output(job)?;
        // A copy: taking a claim may watch its holder for a lock timeout, and the renewals of
        // the store's lock must go on meanwhile.
        let lock = self.inner.lock.lock().await.clone();
        let claim = lock.claim(&out, &job.job_id).await?;
        self.inner.claims.lock().expect("claims").insert(job.job_id.clone(), claim);
        self.inner.elsewhere.lock().expect("elsewhere").remove(&job.job_id);
        let _ = self.hold_back(&job.job_id, false);
        Ok(())
    }

    /// Claims `job`'s output in the background (one try at a time per job): taken, the job is
    /// leased again; held by another coordinator, the job waits (held back, its status says for
    /// whom) and the claim is tried again at the next renewal of the store's lock; refused by the
    /// output (full, read-only), the job is paused as a worker's refused write would pause it.
    fn try_claim(&self, job: Arc<ResolvedJob>) {
        if !self.inner.claiming.lock().expect("claiming").insert(job.job_id.clone()) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let id = job.job_id.clone();
            let waited = this.inner.elsewhere.lock().expect("elsewhere").contains_key(&id);
            match this.claim_output(&job).await {
                Ok(()) => {
                    if waited {
                        info!(job = %id, "the other coordinator gave the job up: it runs here again");
                    }
                }
                Err(Error::Lock(held)) if matches!(*held, LockError::JobHeld { .. }) => {
                    this.wait_elsewhere(&id, held.to_string());
                }
                Err(Error::Lock(refused)) if matches!(&*refused, LockError::ClaimStore { source, .. } if mgd3_common::store::Refusal::of(source).is_some()) =>
                {
                    let said = mgd3_common::error_chain(&*refused);
                    warn!(job = %id, error = %said, "job paused: its output refuses writes");
                    this.pause_refused(&id, said);
                }
                Err(error) => {
                    let said = mgd3_common::error_chain(&error);
                    warn!(job = %id, error = %said, "cannot claim the job's output yet; trying again");
                    this.inner.elsewhere.lock().expect("elsewhere").entry(id.clone()).or_insert(said);
                }
            }
            this.inner.claiming.lock().expect("claiming").remove(&id);
        });
    }

    /// Job `job_id` is another coordinator's to run for now (`reason` says whose): its leases here
    /// are taken back without spending attempts, nothing of it is leased, and its claim is tried
    /// again at every renewal of the store's lock; `status` says so.
    fn wait_elsewhere(&self, job_id: &str, reason: String) {
        self.inner.claims.lock().expect("claims").remove(job_id);
        let fresh = self.inner.elsewhere.lock().expect("elsewhere").insert(job_id.to_owned(), reason.clone()).is_none();
        let _ = self.hold_back(job_id, true);
        let _ = self.inner.scheduler.lock().expect("scheduler").stand_down(job_id);
        self.mark_dirty(job_id);
        if fresh {
            warn!(job = %job_id, error = %reason, "another coordinator runs the job: it waits here, and goes on here if that one gives it up or stops");
        }
    }

    /// Gives up the claim on job `job_id`'s output, if held (in the background).
    fn release_claim(&self, job_id: &str) {
        let this = self.clone();
        let job_id = job_id.to_owned();
        tokio::spawn(async move { this.give_up_claim(&job_id).await });
    }

    /// Gives up the claim on job `job_id`'s output, if held, and returns once it is given up.
    async fn give_up_claim(&self, job_id: &str) {
        let claim = self.inner.claims.lock().expect("claims").remove(job_id);
        if let Some(claim) = claim {
            let lock = self.inner.lock.lock().await.clone();
            lock.release_claim(&claim).await;
        }
    }

    /// Holds job `job_id` back from leasing until its output is claimed (being taken, lapsed, or
    /// another coordinator's), or lets it go ([`Scheduler::hold_back`]). Returns whether that
    /// changed anything.
    fn hold_back(&self, job_id: &str, held: bool) -> bool {
        let changed = self.inner.scheduler.lock().expect("scheduler").hold_back(job_id, held);
        if changed {
            debug!(job = %job_id, held, "leasing of the job held back until its output is claimed, or let go");
        }
        changed
    }

    /// Pauses job `job_id` because its output refuses the claim's write (`reason` says how), as a
    /// worker's refused write would pause it.
    fn pause_refused(&self, job_id: &str, reason: String) {
        self.inner.claims.lock().expect("claims").remove(job_id);
        let paused = self.inner.scheduler.lock().expect("scheduler").pause_job(job_id, reason, now_ms());
        if let Ok(settled) = paused {
            self.settled(job_id, settled);
        }
    }

    /// Renews every claim on a job's output (a claim another coordinator took over makes its job
    /// wait, [`Coordinator::wait_elsewhere`]; one unrenewed past its horizon holds the job back)
    /// and tries again the claims of the jobs that wait. Errors of the outputs' stores are told
    /// once per outage (their writes fail meanwhile too).
    async fn renew_claims(&self, lock: &StoreLock) {
        let claims: Vec<JobClaim> = self.inner.claims.lock().expect("claims").values().cloned().collect();
        let mut failed = None;
        for claim in claims {
            let job = claim.job_id();
            match lock.renew_claim(&claim).await {
                Ok(held_until) => {
                    if let Some(kept) = self.inner.claims.lock().expect("claims").get_mut(job) {
                        kept.renewed(held_until);
                    }
                    let _ = self.hold_back(job, false);
                }
                Err(lost @ LockError::ClaimLost { .. }) => self.wait_elsewhere(job, lost.to_string()),
                Err(error) => {
                    // Unrenewed for nearly its timeout, the claim may be taken over: nothing more
                    // of the job is leased until a renewal works (leases held run on).
                    if claim.lapsed(tokio::time::Instant::now()) && self.hold_back(job, true) {
                        warn!(job = %job, "the claim on the job's output could not be renewed in time: nothing more of the job is leased until it is (another coordinator could take the job over)");
                    }
                    failed = Some((job.to_owned(), mgd3_common::error_chain(&error)));
                }
            }
        }
        // Jobs waiting for another coordinator: tried again (one try at a time each).
        let waiting: Vec<String> = self.inner.elsewhere.lock().expect("elsewhere").keys().cloned().collect();
        for id in waiting {
            let job = self.inner.scheduler.lock().expect("scheduler").job(&id);
            match job {
                Some(job) => self.try_claim(job),
                None => {
                    self.inner.elsewhere.lock().expect("elsewhere").remove(&id);
                }
            }
        }
        // Told once per outage, not per job and heartbeat.
        let mut outage = self.inner.claim_outage.lock().expect("outage");
        match failed {
            Some((job, error)) => outage.log_failure("renew the claim on a job's output", &job, &error),
            None => outage.log_success("renewing the claims on the jobs' outputs", ""),
        }
    }

    /// The URL of the store this coordinator serves (its state, and job outputs by default).
    pub fn store_url(&self) -> &str {
        &self.inner.store.url
    }

    /// Counts, in the background, the markers of each expired lease's shard: a worker that died
    /// (SIGKILL, a crash, the OOM killer) told nobody of the commits after its last heartbeat,
    /// and without this the job's progress would leave them out until the shard ran again.
    /// A store error leaves the count as the heartbeats had it (the next attempt counts again).
    fn recount_expired(&self, expired: &[crate::scheduler::ExpiredLease]) {
        for lease in expired {
            self.recount_markers(&lease.job_id, vec![lease.shard], &[Duration::ZERO]);
        }
    }

    /// Counts, in the background, the markers of `shards` of job `job_id` after each of `waits`
    /// (from the previous one) and records what grew ([`Scheduler::note_markers`]). A store
    /// error leaves a shard's count as it was (its next attempt counts again).
    fn recount_markers(&self, job_id: &str, shards: Vec<usize>, waits: &[Duration]) {
        let job = self.inner.scheduler.lock().expect("scheduler").job(job_id);
        let Some(job) = job else { return };
        let Ok(out) = self.output(&job) else { return };
        let (this, waits) = (self.clone(), waits.to_vec());
        tokio::spawn(async move {
            for wait in waits {
                tokio::time::sleep(wait).await;
                for &shard in &shards {
                    let committed = match committed_in_shard(&out, &job, shard).await {
                        Ok(committed) => committed,
                        Err(error) => {
                            debug!(job = %job.job_id, shard, error = %mgd3_common::error_chain(&error), "cannot count the markers of a shard taken back");
                            continue;
                        }
                    };
                    let grew =
                        this.inner.scheduler.lock().expect("scheduler").note_markers(&job.job_id, shard, committed);
                    if grew {
                        this.mark_dirty(&job.job_id);
                    }
                }
            }
        });
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

    /// Worker `worker_id`'s process is known to be gone (`coordinator run` saw its local worker
    /// exit): its leases are expired now and their shards go to other workers, instead of a
    /// lease timeout later ([`Scheduler::worker_gone`]).
    pub fn worker_gone(&self, worker_id: &str) {
        let held = self.inner.scheduler.lock().expect("scheduler").worker_gone(worker_id, now_ms());
        if held > 0 {
            info!(worker = %worker_id, leases = held, "the worker's process is gone: its leases go to other workers now");
            self.inner.wake.notify_one();
        }
    }

    /// Logs a finished job and, when it succeeded, schedules its manifest.
    fn finish(&self, job: Arc<ResolvedJob>, state: JobState, now: u64) {
        info!(job = %job.job_id, state = state.as_str(), "job finished");
        self.release_claim(&job.job_id);
        self.inner.elsewhere.lock().expect("elsewhere").remove(&job.job_id);
        if state == JobState::Succeeded {
            self.inner.manifests_due.lock().expect("manifests").insert(job.job_id.clone(), now);
            self.inner.wake.notify_one();
        }
    }

    /// Persists dirty jobs and expires leases until `shutdown`; flushes once more at the end.
    pub async fn background(self, shutdown: impl Future<Output = ()>) {
        let heartbeat = self.inner.scheduler.lock().expect("scheduler").heartbeat_ms();
        let mut tick = tokio::time::interval(Duration::from_millis((heartbeat / 2).clamp(50, 1000)));
        // Opening the store (recovery) is no stall.
        self.inner.alive_at.store(now_ms(), std::sync::atomic::Ordering::SeqCst);
        // The lock is renewed by a task of its own: a flush waiting on a slow store must not
        // delay the renewals until another coordinator takes a live one's store over.
        let keeper = tokio::spawn(self.clone().keep_lock());
        // So is the watch for a stall of this process (a flush does not delay it either).
        let stall_watch = {
            let this = self.clone();
            tokio::spawn(async move {
                let mut beat = tokio::time::interval(STALL_BEAT);
                loop {
                    beat.tick().await;
                    let mut scheduler = this.inner.scheduler.lock().expect("scheduler");
                    this.check_stall(&mut scheduler, now_ms());
                }
            })
        };
        // Every job's job.json, every PRESENCE_CHECK: a folder removed by hand while nothing was
        // written (a finished job) is noticed too.
        let mut presence_tick = tokio::time::interval(PRESENCE_CHECK);
        tokio::pin!(shutdown);
        loop {
            if self.is_fenced() {
                return;
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tick.tick() => {
                    let (changed, events, expired) = {
                        let mut scheduler = self.inner.scheduler.lock().expect("scheduler");
                        let now = now_ms();
                        self.check_stall(&mut scheduler, now);
                        scheduler.note_departures(now);
                        (scheduler.expire(now), scheduler.take_worker_events(), scheduler.take_expired())
                    };
                    log_worker_events(events);
                    self.recount_expired(&expired);
                    log_expired(expired);
                    for (job, settled) in changed {
                        self.settled(&job, settled);
                    }
                }
                _ = self.inner.wake.notified() => {}
                _ = presence_tick.tick() => {
                    let ids = self.inner.scheduler.lock().expect("scheduler").job_ids();
                    for id in ids {
                        self.vanished(&id).await;
                    }
                }
            }
            self.flush().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        keeper.abort();
        let _ = keeper.await;
        stall_watch.abort();
        let _ = stall_watch.await;
        self.flush().await;
    }

    /// Notes that this coordinator runs at `now`; when it last did more than [`STALL_AFTER`] ago
    /// (the process was stopped, its VM paused, the clock stepped), gives every lease and worker
    /// that time back ([`Scheduler::stalled`]) before anything expires. Called every
    /// [`STALL_BEAT`] and before each expiry, under the scheduler's lock: whichever comes first
    /// after a stall sees it.
    fn check_stall(&self, scheduler: &mut Scheduler, now: u64) {
        let last = self.inner.alive_at.swap(now, std::sync::atomic::Ordering::SeqCst);
        let gap = now.saturating_sub(last);
        if gap > STALL_AFTER.as_millis() as u64 {
            let lost = gap - STALL_BEAT.as_millis() as u64;
            warn!(
                stalled_s = lost / 1000,
                "this coordinator did not run for {} s (stopped, paused or its clock stepped): its leases and workers get that time back",
                lost / 1000
            );
            scheduler.stalled(lost);
        }
    }

    /// Renews the store's lock every [`StoreLock::heartbeat`] until another coordinator is found
    /// holding it: then this one is fenced ([`Coordinator::is_fenced`]) and the task ends. Each
    /// renewal that succeeds moves [`Coordinator::holds_store`]'s horizon and wakes the calls
    /// waiting for it ([`Coordinator::await_store_held`]).
    async fn keep_lock(self) {
        let mut lock_tick = tokio::time::interval(self.inner.lock.lock().await.heartbeat());
        lock_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            lock_tick.tick().await;
            let (renewed, lock) = {
                let mut lock = self.inner.lock.lock().await;
                let renewed = lock.renew().await;
                if renewed.is_ok() {
                    *self.inner.held_until.lock().expect("held until") = lock.held_until();
                }
                (renewed, lock.clone())
            };
            match renewed {
                Ok(()) => {
                    self.inner.renewed.notify_waiters();
                    self.renew_claims(&lock).await;
                    self.inner.lock_outage.lock().expect("outage").log_success("renewing the coordinator lock", "");
                }
                Err(error @ LockError::Lost { .. }) => {
                    tracing::error!(error = %mgd3_common::error_chain(&error), "stopping: the store has another coordinator");
                    *self.inner.lost_to.lock().expect("lost to") = Some(error);
                    self.inner.fenced.store(true, std::sync::atomic::Ordering::SeqCst);
                    self.inner.lost.notify_waiters();
                    self.inner.renewed.notify_waiters();
                    self.inner.wake.notify_one();
                    return;
                }
                Err(error) => self.inner.lock_outage.lock().expect("outage").log_failure(
                    "renew the coordinator lock",
                    "",
                    &mgd3_common::error_chain(&error),
                ),
            }
        }
    }

    /// Waits, for at most the lock's timeout, until this coordinator holds its store
    /// ([`Coordinator::holds_store`]): at once in the usual case, after the next renewal when one
    /// is late (a slow store), and an error when none succeeds in that time or the store turned
    /// out to have another coordinator.
    ///
    /// # Errors
    /// [`Error::StoreNotHeld`].
    pub async fn await_store_held(&self) -> Result<()> {
        let patience = tokio::time::Instant::now() + self.inner.lock_timeout;
        loop {
            let renewed = self.inner.renewed.notified();
            tokio::pin!(renewed);
            renewed.as_mut().enable();
            match self.holds_store() {
                Ok(()) => return Ok(()),
                Err(error) if self.is_fenced() || tokio::time::Instant::now() >= patience => return Err(error),
                Err(_) => {
                    let _ = tokio::time::timeout_at(patience, renewed).await;
                }
            }
        }
    }

    /// Writes state.json of every dirty job and the manifest of every newly succeeded job; nothing
    /// while the store's lock is not known to be held ([`Coordinator::holds_store`]: what is
    /// dirty stays dirty).
    pub async fn flush(&self) {
        if let Err(error) = self.holds_store() {
            debug!(error = %error, "not writing state: the store's lock is not known to be held");
            return;
        }
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
                    self.inner.manifest_refused.lock().expect("manifest refused").remove(&job_id);
                    self.inner.manifest_outage.lock().expect("outage").log_success("writing the job manifest", &job_id);
                    self.inner.manifests_due.lock().expect("manifests").remove(&job_id);
                    info!(job = %job_id, "manifest written");
                    // Now state.json may say finished (see below).
                    self.inner.dirty.lock().expect("dirty").insert(job_id.clone());
                }
                // A class of a done shard lost its marker (its folder removed by hand while the
                // job ran): the manifest can never be written; the shard is distilled again.
                Err(Error::MissingMarker { shard, wnid, .. }) => {
                    warn!(job = %job_id, shard, class = %wnid, "a committed class lost its commit marker (removed by hand?): its shard is distilled again");
                    self.inner.manifests_due.lock().expect("manifests").remove(&job_id);
                    self.inner.scheduler.lock().expect("scheduler").reopen(&job_id, shard);
                    self.mark_dirty(&job_id);
                }
                Err(error) => {
                    if mgd3_common::store::Refusal::in_chain(&error).is_some() {
                        let refusal = mgd3_common::error_chain(&error);
                        self.inner.manifest_refused.lock().expect("manifest refused").insert(job_id.clone(), refusal);
                    }
                    self.inner.manifest_outage.lock().expect("outage").log_failure(
                        "write the job manifest",
                        &job_id,
                        &mgd3_common::error_chain(&error),
                    );
                }
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
            let Some(persisted) = persisted else { continue };
            if self.vanished(&job_id).await {
                continue;
            }
            match self.inner.jobs.write_state(&job_id, &persisted).await {
                Ok(()) => self.inner.state_outage.lock().expect("outage").log_success("persisting job state", &job_id),
                Err(error) => {
                    let error = format!("{}: {}", self.inner.store.url, mgd3_common::error_chain(&error));
                    self.inner.state_outage.lock().expect("outage").log_failure("persist job state", &job_id, &error);
                    self.mark_dirty(&job_id);
                }
            }
        }
    }

    /// `Err(Vanished)` when a known job's folder was removed from the store by hand (checked now,
    /// whatever the last check): a command a person runs on it must not act on what is gone.
    async fn refuse_vanished(&self, job_id: &str) -> Result<()> {
        if !self.inner.scheduler.lock().expect("scheduler").has_job(job_id) {
            return Ok(());
        }
        self.inner.presence_checked.lock().expect("presence").remove(job_id);
        if self.vanished(job_id).await {
            return Err(Error::Vanished { job: job_id.into() });
        }
        Ok(())
    }

    /// An unknown job, explained when its folder says it was forgotten ([`Error::Forgotten`]).
    ///
    /// # Errors
    /// `result`'s error, with [`Error::UnknownJob`] replaced by [`Error::Forgotten`] for a job
    /// whose folder holds `forgotten.json`.
    pub async fn explained<T>(&self, job_id: &str, result: Result<T>) -> Result<T> {
        match result {
            Err(Error::UnknownJob(_) | Error::Scheduler(crate::scheduler::SchedulerError::UnknownJob(_)))
                if mgd3_common::job::validate_job_id(job_id).is_ok()
                    && matches!(self.inner.jobs.folder(job_id).await, Ok(crate::jobstore::Folder::Forgotten)) =>
            {
                Err(Error::Forgotten { job: job_id.into(), output: self.inner.jobs.forgotten_output(job_id).await })
            }
            other => other,
        }
    }

    /// True when the job's folder was removed from the store by hand (checked at most every
    /// [`PRESENCE_CHECK`] per job): the job is forgotten, not written back. A `job.json` lost
    /// alone (the rest of the folder still there) is written back from memory instead.
    async fn vanished(&self, job_id: &str) -> bool {
        {
            let mut checked = self.inner.presence_checked.lock().expect("presence");
            if checked.get(job_id).is_some_and(|at| at.elapsed() < PRESENCE_CHECK) {
                return false;
            }
            checked.insert(job_id.to_owned(), std::time::Instant::now());
        }
        if !matches!(self.inner.jobs.job_present(job_id).await, Ok(false)) {
            return false;
        }
        let Some(job) = self.inner.scheduler.lock().expect("scheduler").job(job_id) else { return false };
        match self.inner.jobs.folder(job_id).await {
            Ok(crate::jobstore::Folder::Temporaries) => {
                warn!(job = %job_id, "the job's folder is gone from the store (removed by hand?): the coordinator forgets the job; submitting its spec again makes it anew");
                self.forget_in_memory(job_id);
                self.inner.presence_checked.lock().expect("presence").remove(job_id);
                true
            }
            Ok(_) => {
                match self.inner.jobs.rewrite_job(&job).await {
                    Ok(()) => {
                        warn!(job = %job_id, "the job's job.json was gone from the store: written back from the coordinator's copy")
                    }
                    Err(error) => {
                        warn!(job = %job_id, error = %mgd3_common::error_chain(&error), "the job's job.json is gone from the store and cannot be written back")
                    }
                }
                false
            }
            Err(_) => false,
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
        self.refuse_quarantined(job_id)?;
        self.inner.scheduler.lock().expect("scheduler").job(job_id).ok_or_else(|| Error::UnknownJob(job_id.into()))
    }

    /// `Err(Quarantined)` for a job whose records are damaged: it is known, not unknown, and what
    /// to do about it is in the reason.
    fn refuse_quarantined(&self, job_id: &str) -> Result<()> {
        match self.inner.quarantined.lock().expect("quarantined").get(job_id) {
            Some(quarantine) => Err(quarantine.error(job_id)),
            None => Ok(()),
        }
    }

    /// Releases the store's coordinator lock (a clean shutdown), so the next coordinator starts
    /// at once.
    pub async fn release(&self) {
        if !self.is_fenced() {
            let lock = self.inner.lock.lock().await.clone();
            let claims: Vec<JobClaim> = self.inner.claims.lock().expect("claims").drain().map(|(_, c)| c).collect();
            for claim in claims {
                lock.release_claim(&claim).await;
            }
            lock.release().await;
        }
    }

    /// Resolves once another coordinator has taken the store over (at once if it already has).
    pub(crate) async fn fenced(&self) {
        if !self.is_fenced() {
            self.inner.lost.notified().await;
        }
    }

    /// Who took the store over, once fenced (taken: asked once, by `serve` on its way out).
    pub(crate) fn take_lost_to(&self) -> Option<LockError> {
        self.inner.lost_to.lock().expect("lost to").take()
    }

    /// Whether this coordinator may act as the store's holder now: its lock was renewed recently
    /// enough that no other coordinator can have taken the store over ([`StoreLock::held_until`]).
    /// While it may not, it leases nothing, verifies no completion, submits, resumes, cancels and
    /// forgets nothing, and writes no state; its background task keeps trying to renew, and
    /// either holds the store again or finds another owner and stops.
    ///
    /// # Errors
    /// [`Error::StoreNotHeld`], with how long the lock has gone unrenewed.
    pub fn holds_store(&self) -> Result<()> {
        let until = *self.inner.held_until.lock().expect("held until");
        let now = tokio::time::Instant::now();
        if now < until && !self.is_fenced() {
            return Ok(());
        }
        Err(Error::StoreNotHeld {
            url: self.inner.store.url.clone(),
            since_s: now.saturating_duration_since(until).as_secs_f64(),
        })
    }

    /// When this coordinator last knew it held its store's lock (Unix ms), while it does not
    /// know it now ([`Coordinator::holds_store`]); `None` while it holds it.
    pub fn store_unheld_since_unix_ms(&self) -> Option<u64> {
        match self.holds_store() {
            Err(Error::StoreNotHeld { since_s, .. }) => {
                Some(mgd3_common::now_ms().saturating_sub((since_s * 1000.0) as u64))
            }
            _ => None,
        }
    }

    /// True once another coordinator took this one's store over.
    pub fn is_fenced(&self) -> bool {
        self.inner.fenced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records in the store's lock where this coordinator serves (and its token file's path;
    /// `exits_when_done` for a `coordinator run`), so that a second coordinator started on the
    /// store names it. A failure is logged: the
    /// coordinator serves all the same.
    pub async fn advertise(&self, url: &str, token_file: Option<&Path>, exits_when_done: bool) {
        if let Err(error) = self.inner.lock.lock().await.advertise(url, token_file, exits_when_done).await {
            warn!(error = %mgd3_common::error_chain(&error), "could not record this coordinator's URL in the store's lock");
        }
    }

    /// Grants work of `jobs` only (`None`: every job; see [`Scheduler::run_only`]); returns the
    /// other jobs that are unfinished (running) here, which are left for whoever runs them.
    pub fn run_only(&self, jobs: Option<std::collections::HashSet<String>>) -> Vec<String> {
        let mut scheduler = self.inner.scheduler.lock().expect("scheduler");
        let others = match &jobs {
            Some(only) => scheduler
                .job_ids()
                .into_iter()
                .filter(|id| !only.contains(id) && scheduler.state(id) == Some(JobState::Running))
                .collect(),
            None => Vec::new(),
        };
        scheduler.run_only(jobs);
        others
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

    /// Workers seen in the last three heartbeats (see [`Scheduler::live_workers`]).
    pub fn live_workers(&self) -> usize {
        self.inner.scheduler.lock().expect("scheduler").live_workers(now_ms())
    }

    /// What a job submitted now would size its shards for (see [`Scheduler::planned_rows`]).
    pub fn planned_rows(&self) -> mgd3_common::batch::PlannedRows {
        self.inner.scheduler.lock().expect("scheduler").planned_rows()
    }

    /// Resolves a spec (paths against `base_dir`, class list, model fingerprints, shards); a job
    /// without `output` writes into this coordinator's store.
    ///
    /// # Errors
    /// As [`resolve_spec`]: every problem of the spec or its dataset as [`Error::Job`], also
    /// paths outside the allowed folders; store and model-file errors.
    pub async fn resolve(&self, spec_toml: &str, base_dir: &Path, explicit_id: Option<String>) -> Result<Resolved> {
        let allowed = self.inner.allowed_paths.lock().expect("allowed paths").clone();
        let resolved = resolve_spec(
            spec_toml,
            base_dir,
            explicit_id,
            &self.inner.store.url,
            allowed.as_deref(),
            self.planned_rows(),
        )
        .await?;
        self.lease_fits_heartbeat(&resolved.job.spec)?;
        Ok(resolved)
    }

    /// A job's `lease_timeout_s` must span two of this coordinator's heartbeats (a worker renews
    /// its lease once a heartbeat; one late poll must not lose it): shorter, a healthy worker's
    /// lease expires between its heartbeats, over and over, until the worker is set aside as a
    /// crash loop.
    ///
    /// # Errors
    /// [`Error::Job`] naming `lease_timeout_s`, the heartbeat and both ways out.
    fn lease_fits_heartbeat(&self, spec: &mgd3_common::job::JobSpec) -> Result<()> {
        let heartbeat_ms = self.inner.scheduler.lock().expect("scheduler").heartbeat_ms();
        let least_ms = 2 * heartbeat_ms;
        if spec.lease_timeout_s.saturating_mul(1000) >= least_ms {
            return Ok(());
        }
        Err(Error::Job(mgd3_common::job::JobError::Invalid(vec![mgd3_common::job::FieldError {
            field: "lease_timeout_s".into(),
            problem: format!(
                "{} s is shorter than two heartbeats of this coordinator (--heartbeat-ms {heartbeat_ms}): a worker \
                 renews its lease once a heartbeat, so leases would expire while their workers are healthy; set \
                 lease_timeout_s to at least {} s, or run the coordinator with a shorter --heartbeat-ms",
                spec.lease_timeout_s,
                least_ms.div_ceil(1000)
            ),
        }])))
    }

    /// Submits a job; submitting the same spec again returns the existing job. Returns the job
    /// and whether it existed already.
    ///
    /// # Errors
    /// As [`Coordinator::resolve`]; [`Error::Quarantined`] when the job id is quarantined;
    /// [`Error::JobIdTaken`] when it holds a job of another spec; store errors writing the job.
    pub async fn submit(
        &self,
        spec_toml: &str,
        base_dir: &Path,
        explicit_id: Option<String>,
    ) -> Result<(Arc<ResolvedJob>, bool)> {
        self.submit_noted(spec_toml, base_dir, explicit_id).await.map(|(job, existed, _)| (job, existed))
    }

    /// [`Coordinator::submit`], also returning the notes about the dataset a person should see.
    ///
    /// # Errors
    /// As [`Coordinator::submit`].
    pub async fn submit_noted(
        &self,
        spec_toml: &str,
        base_dir: &Path,
        explicit_id: Option<String>,
    ) -> Result<(Arc<ResolvedJob>, bool, Vec<String>)> {
        self.submit_with(spec_toml, base_dir, explicit_id, DataChanges::Refuse).await
    }

    /// [`Coordinator::submit_noted`], saying what to do when the job exists and the data of some
    /// of its classes changed since it recorded them (see [`Coordinator::resume_with`]); the
    /// accepted changes are in the notes.
    ///
    /// # Errors
    /// As [`Coordinator::submit`]; [`Error::DataChanged`] with [`DataChanges::Refuse`].
    pub async fn submit_with(
        &self,
        spec_toml: &str,
        base_dir: &Path,
        explicit_id: Option<String>,
        how: impl Into<Resubmit>,
    ) -> Result<(Arc<ResolvedJob>, bool, Vec<String>)> {
        let resolved = self.resolve(spec_toml, base_dir, explicit_id).await?;
        let given = resolved.job.clone();
        let (mut job, existed, mut notes) = self.submit_resolved(resolved, how).await?;
        if existed && let Some(moved) = self.adopt_model_paths(&job, &given).await? {
            job = moved;
        }
        // Compared with the job as it stands now (moved models adopted): what it keeps.
        let kept = if existed { self.kept_settings(&given) } else { Vec::new() };
        if !kept.is_empty() {
            notes.push(format!(
                "job `{}` exists (every setting that decides its images is the same) and keeps the other settings it was submitted with: {}; give the spec \
                 another `name` to make a new job with these",
                job.job_id,
                kept.join(", ")
            ));
        }
        Ok((job, existed, notes))
    }

    /// When `given` (the same job, as its spec was submitted or given to resume now: the caller
    /// checked its id and identity, so the models' fingerprints are the job's) reads the job's
    /// models from other paths than the job recorded: the models were moved, and the job reads
    /// them from where they are now (its workers could not load them from the old paths, and the
    /// job stalled). Returns the updated job, if any.
    ///
    /// # Errors
    /// Store errors writing `job.json`.
    async fn adopt_model_paths(&self, job: &ResolvedJob, given: &ResolvedJob) -> Result<Option<Arc<ResolvedJob>>> {
        let (was, now) = (&job.spec.models, &given.spec.models);
        if was.dit == now.dit && was.vae_encoder == now.vae_encoder && was.vae_decoder == now.vae_decoder {
            return Ok(None);
        }
        let mut updated = job.clone();
        updated.spec.models.dit = now.dit.clone();
        updated.spec.models.vae_encoder = now.vae_encoder.clone();
        updated.spec.models.vae_decoder = now.vae_decoder.clone();
        self.inner.jobs.rewrite_job(&updated).await?;
        info!(job = %job.job_id, dit = %now.dit, vae_encoder = %now.vae_encoder, vae_decoder = %now.vae_decoder,
            "the job's models are read from where the spec says now (the same fingerprints: the models moved)");
        let updated = Arc::new(updated);
        self.inner.scheduler.lock().expect("scheduler").replace_record(updated.clone());
        Ok(Some(updated))
    }

    /// The settings in which `job`'s spec differs from the known job of its id and fingerprint
    /// (attempts, timeouts, data_fingerprint, model paths, output: none decides the images),
    /// which that job keeps if `job` is submitted; empty when no such job is known.
    fn kept_settings(&self, job: &ResolvedJob) -> Vec<String> {
        let existing = self.inner.scheduler.lock().expect("scheduler").job(&job.job_id);
        existing
            .filter(|existing| existing.fingerprint == job.fingerprint)
            .map(|existing| state::spec_differences(&existing.spec, &job.spec, ("in the job", "in this spec")))
            .unwrap_or_default()
    }

    /// Submits every variant of a sweep ([`resolve_sweep`]: the dataset listed and the models
    /// fingerprinted once) as its own job, in the sweep's order, and records the sweep
    /// (`sweeps/<id>.json` in the store and beside the outputs). Submitting it again returns the
    /// same jobs, as [`Coordinator::submit_with`] does for each.
    ///
    /// # Errors
    /// As [`Coordinator::submit_with`] for any variant (those before it stay submitted); store
    /// errors writing the record.
    pub async fn submit_sweep(
        &self,
        sweep: &Sweep,
        base_dir: &Path,
        how: impl Into<Resubmit>,
    ) -> Result<SubmittedSweep> {
        let how = how.into();
        let allowed = self.inner.allowed_paths.lock().expect("allowed paths").clone();
        let resolved =
            resolve_sweep(sweep, base_dir, &self.inner.store.url, allowed.as_deref(), self.planned_rows()).await?;
        let ResolvedSweep { variants, mut record, mut notes } = resolved;
        for variant in &variants {
            self.lease_fits_heartbeat(&variant.job.spec)?;
        }
        let mut jobs = Vec::with_capacity(variants.len());
        // Settings the existing variants keep, said once for the sweep (`output` has its own
        // note below).
        let mut kept: Vec<String> = Vec::new();
        let mut keeping = 0;
        for variant in variants {
            let variant_kept: Vec<String> =
                self.kept_settings(&variant.job).into_iter().filter(|s| !s.starts_with("`output`")).collect();
            let (job, existed, variant_notes) = self.submit_resolved(variant, how).await?;
            if existed && !variant_kept.is_empty() {
                keeping += 1;
                for setting in variant_kept {
                    if !kept.contains(&setting) {
                        kept.push(setting);
                    }
                }
            }
            for note in variant_notes {
                // Said once for the sweep (the shard plan, the dataset), not once per variant.
                if !notes.contains(&note) {
                    notes.push(note);
                }
            }
            jobs.push((job, existed));
        }
        if keeping > 0 {
            notes.push(format!(
                "{keeping} variant(s) exist (every setting that decides their images is the same) and keep the other settings they were submitted with: {}; give \
                 the sweep another `name` to make new jobs with these",
                kept.join(", ")
            ));
        }
        // A job's output is no part of its identity: variants submitted before with another
        // `output` are those jobs, writing where they did. Said, and the record follows them
        // when all are there.
        let elsewhere: Vec<&Arc<ResolvedJob>> = jobs
            .iter()
            .map(|(job, _)| job)
            .filter(|job| job.spec.output.as_deref() != Some(record.output.as_str()))
            .collect();
        if let Some(first) = elsewhere.first() {
            let requested = record.output.clone();
            let there = first.spec.output.clone().unwrap_or_default();
            if elsewhere.len() == jobs.len() && elsewhere.iter().all(|j| j.spec.output.as_deref() == Some(&there)) {
                notes.retain(|n| !n.starts_with("the sweep caches"));
                record.output = there.clone();
            }
            notes.push(format!(
                "{} of the {} variants exist already and write to {there}, not {}: the same settings are the same \
                 jobs whatever `output` says ({}); give the sweep another `name` to distil them again elsewhere",
                elsewhere.len(),
                jobs.len(),
                requested,
                elsewhere.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        let key = SweepRecord::key(&record.sweep_id);
        let store = &self.inner.store;
        let failed = |context: String| {
            let url = store.url.clone();
            move |source| Error::ObjectStore { url, context, source }
        };
        // The first submit's record stands (its creation time); the same id is the same variants.
        if let Some(Ok(existing)) = self.inner.sweeps.lock().expect("sweeps").get(&record.sweep_id) {
            record.created_unix_ms = existing.created_unix_ms;
        }
        let bytes = serde_json::to_vec_pretty(&record).expect("serialisable");
        let at = store.key(&key);
        store::retry_idempotent(|| store.store.put(&at, bytes.clone().into()))
            .await
            .map_err(failed(format!("writing `{key}`")))?;
        // Beside the outputs too, so that the comparison report finds its variants offline.
        if let Some((job, _)) = jobs.first() {
            let out = self.output(job)?;
            let at = out.key(&key);
            store::retry_idempotent(|| out.store.put(&at, bytes.clone().into())).await.map_err(|source| {
                Error::ObjectStore { url: out.url.clone(), context: format!("writing `{key}`"), source }
            })?;
        }
        self.inner.sweeps.lock().expect("sweeps").insert(record.sweep_id.clone(), Ok(record.clone()));
        info!(sweep = %record.sweep_id, variants = record.variants.len(), "sweep submitted");
        Ok(SubmittedSweep { record, jobs, notes })
    }

    /// Reads every sweep record in the store into memory (at open: this coordinator holds the
    /// store's lock, so no one else writes them). A record that does not read is kept as its
    /// problem, and named when asked for.
    ///
    /// # Errors
    /// Store errors listing `sweeps/` or reading a record.
    async fn load_sweeps(&self) -> Result<()> {
        use futures::TryStreamExt;
        let store = &self.inner.store;
        let listed: Vec<object_store::ObjectMeta> = match store
            .store
            .list(Some(&store.key("sweeps")))
            .try_collect()
            .await
        {
            Ok(listed) => listed,
            Err(source) if store::is_not_found(&source) => Vec::new(),
            Err(source) => {
                return Err(Error::ObjectStore { url: store.url.clone(), context: "listing `sweeps/`".into(), source });
            }
        };
        let mut sweeps = BTreeMap::new();
        for meta in listed {
            let Some(id) = meta.location.filename().and_then(|name| name.strip_suffix(".json")) else { continue };
            if mgd3_common::job::validate_job_id(id).is_err() {
                continue;
            }
            let key = SweepRecord::key(id);
            let bytes = store::get_optional(store.store.as_ref(), &store.key(&key)).await.map_err(|source| {
                Error::ObjectStore { url: store.url.clone(), context: format!("reading `{key}`"), source }
            })?;
            let Some(bytes) = bytes else { continue };
            let record = serde_json::from_slice::<SweepRecord>(&bytes).map_err(|e| e.to_string());
            if let Err(problem) = &record {
                warn!(sweep = %id, problem = %problem, "sweep record does not read: left out of `list`, named by `status`");
            }
            sweeps.insert(id.to_owned(), record);
        }
        *self.inner.sweeps.lock().expect("sweeps") = sweeps;
        Ok(())
    }

    /// The record of sweep `sweep_id`, as its submit wrote it in the store (kept in memory: no
    /// store call).
    ///
    /// # Errors
    /// [`Error::UnknownSweep`] when the store has none; [`Error::Corrupt`] for one that does not
    /// read.
    pub async fn sweep(&self, sweep_id: &str) -> Result<SweepRecord> {
        match self.inner.sweeps.lock().expect("sweeps").get(sweep_id) {
            Some(Ok(record)) => Ok(record.clone()),
            Some(Err(problem)) => Err(Error::Corrupt { path: SweepRecord::key(sweep_id), problem: problem.clone() }),
            None => Err(Error::UnknownSweep(sweep_id.to_owned())),
        }
    }

    /// Every sweep submitted to this store, oldest first; a record that does not read is left
    /// out (logged when the coordinator opened the store).
    ///
    /// # Errors
    /// None at present (the records are in memory); kept fallible for the store behind them.
    pub async fn sweeps(&self) -> Result<Vec<SweepRecord>> {
        let mut records: Vec<SweepRecord> =
            self.inner.sweeps.lock().expect("sweeps").values().filter_map(|r| r.as_ref().ok().cloned()).collect();
        records.sort_by_key(|r: &SweepRecord| (r.created_unix_ms, r.sweep_id.clone()));
        Ok(records)
    }

    /// Forgets a sweep: every variant's job ([`Coordinator::forget`]; their outputs stay) that no
    /// other sweep holds too, and the sweep's record in the store (the copy beside the outputs
    /// stays with them). Refused, with nothing forgotten, while any variant it would forget has not
    /// ended. Variants other sweeps hold stay, whatever their state: forgetting them would take
    /// them from those sweeps.
    ///
    /// # Errors
    /// [`Error::UnknownSweep`]; [`Error::SweepRunning`] naming the first variant still running;
    /// store errors.
    pub async fn forget_sweep(&self, sweep_id: &str) -> Result<ForgottenSweep> {
        let record = self.sweep(sweep_id).await?;
        let mut holders: HashMap<String, Vec<String>> = HashMap::new();
        for other in self.sweeps().await? {
            if other.sweep_id != sweep_id {
                for variant in &other.variants {
                    holders.entry(variant.job_id.clone()).or_default().push(other.sweep_id.clone());
                }
            }
        }
        let (kept, own): (Vec<_>, Vec<_>) = record.variants.iter().partition(|v| holders.contains_key(&v.job_id));
        for variant in &own {
            let state = self.inner.scheduler.lock().expect("scheduler").state(&variant.job_id);
            if state.is_some_and(|s| !s.is_final()) {
                return Err(Error::SweepRunning { sweep: sweep_id.to_owned(), job: variant.job_id.clone() });
            }
        }
        for variant in &own {
            match self.forget_records(&variant.job_id).await {
                // Forgotten on its own before: nothing left to do.
                Ok(_) | Err(Error::UnknownJob(_)) => {}
                Err(error) => return Err(error),
            }
        }
        let key = SweepRecord::key(sweep_id);
        let store = &self.inner.store;
        store
            .store
            .delete(&store.key(&key))
            .await
            .or_else(|e| if store::is_not_found(&e) { Ok(()) } else { Err(e) })
            .map_err(|source| Error::ObjectStore {
            url: store.url.clone(),
            context: format!("deleting `{key}`"),
            source,
        })?;
        self.inner.sweeps.lock().expect("sweeps").remove(sweep_id);
        info!(sweep = %sweep_id, forgotten = own.len(), kept = kept.len(), "sweep forgotten: its record and its own jobs' records are deleted");
        Ok(ForgottenSweep {
            forgotten: own.into_iter().map(|v| v.job_id.clone()).collect(),
            kept: kept.into_iter().map(|v| (v.job_id.clone(), holders.remove(&v.job_id).unwrap_or_default())).collect(),
        })
    }

    /// [`Coordinator::submit_with`] of a spec already resolved.
    ///
    /// # Errors
    /// As [`Coordinator::submit_with`].
    pub async fn submit_resolved(
        &self,
        resolved: Resolved,
        how: impl Into<Resubmit>,
    ) -> Result<(Arc<ResolvedJob>, bool, Vec<String>)> {
        let Resubmit { data, retry_failed } = how.into();
        let Resolved { job, mut notes, planned, .. } = resolved;
        let quarantine = self.inner.quarantined.lock().expect("quarantined").get(&job.job_id).cloned();
        if let Some(quarantine) = quarantine {
            if !quarantine.rebuildable {
                return Err(quarantine.error(&job.job_id));
            }
            return self.rebuild(job, notes).await;
        }
        let existing = {
            let scheduler = self.inner.scheduler.lock().expect("scheduler");
            scheduler.job(&job.job_id).map(|existing| (existing, scheduler.state(&job.job_id)))
        };
        // A job whose folder was removed by hand while this coordinator ran is forgotten, and
        // this submit makes it anew (finding whatever committed work is still in its output).
        let existing = match existing {
            Some((existing, _)) if !self.inner.jobs.job_present(&existing.job_id).await? => {
                warn!(job = %existing.job_id, "the job's job.json is gone from the store (removed by hand?): forgetting the job and submitting it afresh");
                self.forget_in_memory(&existing.job_id);
                None
            }
            existing => existing,
        };
        if let Some((existing, state)) = existing {
            if existing.fingerprint != job.fingerprint {
                return Err(Error::JobIdTaken { job: job.job_id });
            }
            // A job another coordinator runs now is refused as a new one would be (exit 2 for
            // `coordinator run`), unless that one has given it up meanwhile.
            if self.inner.elsewhere.lock().expect("elsewhere").contains_key(&existing.job_id) {
                self.claim_output(&existing).await?;
            }
            // The same experiment: its classes' data now (listed by this submit) against what the
            // job recorded and committed.
            let changes = self.data_changes(&existing, &job.classes).await?;
            if !changes.is_empty() {
                if data == DataChanges::Refuse {
                    return Err(Error::DataChanged { job: existing.job_id.clone(), changes });
                }
                let resumed =
                    self.resume_listed(&existing.job_id, None, DataChanges::Accept, Some(job.classes.clone())).await?;
                notes.push(data_changes_note(&existing.job_id, &resumed.data_changed));
                let existing = self.known_job(&existing.job_id)?;
                return Ok((existing, true, notes));
            }
            // Submitting a paused job again (coordinator run, submit, the sbatch script) is how a
            // person says the refusal that paused it is dealt with.
            if state == Some(JobState::Paused) {
                info!(job = %existing.job_id, "the job was paused (its output store refused writes, or another coordinator ran it): resuming it");
                self.resume(&existing.job_id, None).await?;
            }
            // Submitting a running job again is how a person says that what its excluded
            // workers were told ("fix that and run the same command again") is fixed.
            if state == Some(JobState::Running) {
                let forgiven = self.inner.scheduler.lock().expect("scheduler").clear_exclusions(&existing.job_id);
                if forgiven > 0 {
                    info!(job = %existing.job_id, workers = forgiven, "the job was submitted again: the workers it had excluded may try it again");
                    self.mark_dirty(&existing.job_id);
                    self.inner.wake.notify_one();
                    notes.push(format!(
                        "job `{}` had excluded {forgiven} worker(s); submitted again, they may try it again (one whose models still do not load or differ is excluded again)",
                        existing.job_id
                    ));
                }
            }
            // A finished job's outputs are where its manifest says (one listing, no reads): a
            // file deleted or cut short since is put back (restored, or its class distilled
            // again, to the same bytes) rather than the job answered as succeeded.
            if state == Some(JobState::Succeeded) {
                let problems = state::published_problems(&self.output(&existing)?, &existing).await?;
                if !problems.is_empty() {
                    warn!(job = %existing.job_id, problems = problems.len(), first = %problems[0], "submitted again: published files of the finished job are missing or changed; repairing");
                    let resumed = self.resume_listed(&existing.job_id, None, data, Some(job.classes.clone())).await?;
                    notes.push(format!(
                        "job `{}` had succeeded, but {} of its published files are missing or changed ({}{}): repaired, \
                         {} class(es) distilled again (the same seeds give the same bytes), any other file restored from \
                         its staged copy",
                        existing.job_id,
                        problems.len(),
                        problems.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
                        if problems.len() > 5 { format!("; and {} more", problems.len() - 5) } else { String::new() },
                        resumed.redone.len(),
                    ));
                    let existing = self.known_job(&existing.job_id)?;
                    return Ok((existing, true, notes));
                }
            }
            if state == Some(JobState::Failed) && retry_failed {
                let resumed = self.resume_listed(&existing.job_id, None, data, Some(job.classes.clone())).await?;
                info!(job = %existing.job_id, requeued = resumed.requeued, "the failed job was submitted again with --retry-failed: its failed shards run again");
                notes.push(format!(
                    "job `{}` had failed; --retry-failed: {} shard(s) run again, {} committed shard(s) kept",
                    existing.job_id, resumed.requeued, resumed.committed
                ));
                let existing = self.known_job(&existing.job_id)?;
                return Ok((existing, true, notes));
            }
            if state == Some(JobState::Failed) {
                // Submitting (or `coordinator run`) does not retry a failed job by itself (a
                // requeued allocation would retry a lasting fault every time): say how.
                notes.push(format!(
                    "job `{}` has failed (its status names each failed class and why); once the cause is fixed, run the same \
                     command again with --retry-failed (MGD3_RETRY_FAILED=1 for distill.sbatch), or `coordinator resume {}` \
                     while a coordinator serves it: the failed shards run again, committed classes are kept",
                    existing.job_id, existing.job_id
                ));
            }
            if state == Some(JobState::Cancelled) {
                // Submitting a cancelled job's spec does not run it again: say so, and how.
                notes.push(format!(
                    "job `{}` was cancelled and stays cancelled; `coordinator resume {}` runs its unfinished classes",
                    existing.job_id, existing.job_id
                ));
            }
            return Ok((existing, true, notes));
        }
        // A job this coordinator knows with the very same spec but another fingerprint: its class
        // folders or their data differ (a class folder added under `classes = "all"`). Said, since
        // the new job distils every class again.
        let twin = {
            let scheduler = self.inner.scheduler.lock().expect("scheduler");
            scheduler
                .job_ids()
                .iter()
                .filter_map(|id| scheduler.job(id))
                .find(|known| known.fingerprint != job.fingerprint && known.spec == job.spec)
        };
        if let Some(twin) = twin {
            let (was, now): (std::collections::BTreeSet<&str>, std::collections::BTreeSet<&str>) = (
                twin.classes.iter().map(|c| c.wnid.as_str()).collect(),
                job.classes.iter().map(|c| c.wnid.as_str()).collect(),
            );
            let added = now.difference(&was).count();
            let removed = was.difference(&now).count();
            notes.push(format!(
                "job `{}` has this very spec over other data ({} classes then, {} now: {added} added, {removed} \
                 removed, the others' images changed or not): this is a new job `{}`, which distils all its classes \
                 (none is taken from the first; its outputs stay where they are)",
                twin.job_id,
                twin.classes.len(),
                job.classes.len(),
                job.job_id
            ));
        }
        // A job this coordinator knows with the same settings and the same class data (names and
        // sizes) at another dataset location: the data was copied or moved (a per-allocation
        // scratch folder). The location is part of a job's identity, so this one starts afresh;
        // said, with the way to go on with the first.
        let moved = {
            let scheduler = self.inner.scheduler.lock().expect("scheduler");
            let same_data = |known: &ResolvedJob| {
                known.classes.len() == job.classes.len()
                    && known.classes.iter().zip(&job.classes).all(|(a, b)| {
                        a.wnid == b.wnid
                            && a.label == b.label
                            && a.listing.as_ref().map(|l| &l.names_digest)
                                == b.listing.as_ref().map(|l| &l.names_digest)
                    })
            };
            scheduler.job_ids().iter().filter_map(|id| scheduler.job(id)).find_map(|known| {
                let mut relocated = known.spec.clone();
                relocated.dataset = job.spec.dataset.clone();
                (known.spec.dataset != job.spec.dataset && relocated == job.spec && same_data(&known))
                    .then(|| (known.clone(), scheduler.summary(&known.job_id, now_ms()).map(|s| s.classes_done)))
            })
        };
        let same_folder = |a: &str, b: &str| {
            let local = |s: &str| std::path::Path::new(s.strip_prefix("file://").unwrap_or(s)).canonicalize().ok();
            local(a).is_some_and(|a| Some(a) == local(b))
        };
        if let Some((known, done)) = moved {
            let (from, identity, how) = if same_folder(&known.spec.dataset, &job.spec.dataset) {
                (
                    format!("the same folder, written `{}` there and `{}` here", known.spec.dataset, job.spec.dataset),
                    "its identity as written",
                    format!("write `dataset` as `{}`", known.spec.dataset),
                )
            } else {
                (
                    format!("`{}` (the same file names and sizes)", known.spec.dataset),
                    "its identity",
                    format!("point `dataset` at `{}` again (a link there to this copy works)", known.spec.dataset),
                )
            };
            let progress = done
                .map(|d| format!(" (`{}` has {d} of {} classes committed)", known.job_id, known.classes.len()))
                .unwrap_or_default();
            notes.push(format!(
                "job `{}` distils the same classes with the same settings from {from}: a job's dataset location is part \
                 of {identity}, so this is a new job `{}` that distils every class again{progress}. To go on with `{}` \
                 instead, {how}",
                known.job_id, job.job_id, known.job_id,
            ));
        }
        if job.spec.classes_per_shard.is_none() {
            // How the shard size came about, for a person sizing shards by hand or wondering why
            // shards are small on big GPUs (an existing job keeps the plan it was made with).
            notes.push(planned.to_string());
        }
        let out = self.output(&job)?;
        // The output is claimed first: the markers read below are then no other coordinator's
        // work in progress (one finishing the job as this submit reads them would leave a class
        // counted as pending here).
        self.claim_output(&job).await?;
        // The markers are read before anything else is written: outputs left under this id by
        // another spec (a forgotten job, an explicit --job-id) are refused naming the difference.
        // (A job.json already there has this fingerprint, so its class list is `job`'s.)
        let recorded = async {
            let committed = match state::committed_shards(&out, &job).await {
                Err(error @ Error::Commit(CommitError::ForeignMarker { .. })) => {
                    let differences = state::differences_from_committed(&out, &job).await?;
                    if differences.is_empty() {
                        return Err(error);
                    }
                    return Err(Error::RebuildRefused { job: job.job_id.clone(), lost_records: false, differences });
                }
                committed => committed?,
            };
            let created = self.inner.jobs.create_job(&job).await?;
            Ok::<_, Error>((committed, created))
        };
        // Refused or failed, the job is not this coordinator's: its claim goes.
        let (committed, created) = match recorded.await {
            Ok(recorded) => recorded,
            Err(error) => {
                self.release_claim(&job.job_id);
                return Err(error);
            }
        };
        let job = if created { job } else { self.inner.jobs.read_job(&job.job_id).await? };
        let job = Arc::new(job);
        info!(job = %job.job_id, classes = job.classes.len(), shards = job.shards.len(), committed = committed.len(), "job submitted");
        if created && !committed.is_empty() {
            // A forgotten job (or a removed folder) whose outputs stayed: say what is kept.
            let classes: usize = committed.iter().map(|&shard| job.shard_classes(shard).len()).sum();
            notes.push(format!(
                "{classes} of {} classes of job `{}` were already committed in its output and are kept",
                job.classes.len(),
                job.job_id
            ));
        }
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

    /// Rebuilds the lost or corrupt `job.json` of a quarantined job from the same spec submitted
    /// again: checked against the job's commit markers and manifest first, then written, and the
    /// job recovered with every committed class kept.
    async fn rebuild(&self, job: ResolvedJob, mut notes: Vec<String>) -> Result<(Arc<ResolvedJob>, bool, Vec<String>)> {
        let id = job.job_id.clone();
        let out = self.output(&job)?;
        let persisted = self.inner.jobs.read_state(&id).await;
        let mut differences = state::differences_from_committed(&out, &job).await?;
        if let Ok(Some(state)) = &persisted
            && !state.fingerprint.is_empty()
            && state.fingerprint != job.fingerprint
        {
            differences.push(format!(
                "its state.json was written for fingerprint {}, this spec's is {}",
                state.fingerprint, job.fingerprint
            ));
        }
        if !differences.is_empty() {
            return Err(Error::RebuildRefused { job: id, lost_records: true, differences });
        }
        self.inner.jobs.rewrite_job(&job).await?;
        let recovered = match persisted {
            Ok(persisted) => self.recover(job, persisted).await,
            Err(error) => Err(error),
        };
        if let Err(error) = recovered {
            let quarantine = Quarantine::of(&error);
            let refused = quarantine.error(&id);
            self.inner.quarantined.lock().expect("quarantined").insert(id, quarantine);
            return Err(refused);
        }
        self.inner.quarantined.lock().expect("quarantined").remove(&id);
        let (job, classes_done) = {
            let scheduler = self.inner.scheduler.lock().expect("scheduler");
            let job = scheduler.job(&id).expect("recovered job");
            (job, scheduler.summary(&id, now_ms()).map_or(0, |s| s.classes_done))
        };
        info!(job = %id, classes_done, "job.json rebuilt from the submitted spec");
        notes.push(format!(
            "job `{id}` had lost its job.json: rebuilt from this spec, which matches its committed work; {classes_done} of {} classes were already committed and are kept",
            job.classes.len()
        ));
        Ok((job, true, notes))
    }

    /// Drops a job the coordinator knows (or has quarantined) from memory: its leases, its
    /// pending writes.
    fn forget_in_memory(&self, job_id: &str) {
        self.inner.scheduler.lock().expect("scheduler").forget_job(job_id);
        self.inner.quarantined.lock().expect("quarantined").remove(job_id);
        self.inner.dirty.lock().expect("dirty").remove(job_id);
        self.inner.manifests_due.lock().expect("manifests").remove(job_id);
        self.inner.manifest_refused.lock().expect("manifest refused").remove(job_id);
        self.inner.presence_checked.lock().expect("presence").remove(job_id);
    }

    /// Forgets a job: the coordinator drops it and deletes its records (`job.json`,
    /// `state.json`); its outputs (markers, images, manifest) stay, so submitting the same spec
    /// again brings the job back with its committed classes. The way out for a quarantined job
    /// that does not delete its finished images. Returns whether outputs stayed in the job's
    /// folder of this store.
    ///
    /// # Errors
    /// [`Error::Job`] for an id that cannot name a job; [`Error::JobRunning`] while the job runs
    /// (cancel it first); [`Error::UnknownJob`] when there is no such job folder; store errors.
    pub async fn forget(&self, job_id: &str) -> Result<bool> {
        mgd3_common::job::validate_job_id(job_id)?;
        // A sweep's variant goes with its sweep: forgotten alone it would break the sweep's
        // status and resume.
        let holders: Vec<String> = self
            .inner
            .sweeps
            .lock()
            .expect("sweeps")
            .values()
            .filter_map(|r| r.as_ref().ok())
            .filter(|r| r.variants.iter().any(|v| v.job_id == job_id))
            .map(|r| r.sweep_id.clone())
            .collect();
        if !holders.is_empty() {
            return Err(Error::VariantOfSweep { job: job_id.to_owned(), sweeps: holders });
        }
        self.forget_records(job_id).await
    }

    /// [`Coordinator::forget`] without the sweep check (a sweep forgetting its own variants).
    async fn forget_records(&self, job_id: &str) -> Result<bool> {
        let state = self.inner.scheduler.lock().expect("scheduler").state(job_id);
        if state == Some(JobState::Running) {
            return Err(Error::JobRunning { job: job_id.into() });
        }
        let quarantined = self.inner.quarantined.lock().expect("quarantined").contains_key(job_id);
        if state.is_none() && !quarantined && self.inner.jobs.folder(job_id).await? != crate::jobstore::Folder::Records
        {
            return Err(Error::UnknownJob(job_id.into()));
        }
        // A job whose output is elsewhere left it there: the store keeps a note that the job
        // was forgotten (not unknown), as for outputs in the store.
        let known = self.inner.scheduler.lock().expect("scheduler").job(job_id);
        let output = known.and_then(|job| self.output(&job).ok()).map(|out| out.url);
        let elsewhere = output.as_ref().is_some_and(|out| *out != self.inner.store.url);
        self.forget_in_memory(job_id);
        self.inner.elsewhere.lock().expect("elsewhere").remove(job_id);
        self.give_up_claim(job_id).await;
        let outputs_stay = self.inner.jobs.forget_job(job_id, elsewhere, output.as_deref()).await?;
        info!(job = %job_id, outputs_stay, "job forgotten: its records are deleted");
        Ok(outputs_stay)
    }

    /// The classes of `job` whose data now (`fresh`: the job's classes as [`check_dataset`] lists
    /// them today) differs from what the job recorded, or from what the class's commit was made
    /// from (its marker's `data`), in the job's order. Modification times and ETags never count
    /// (a `cp -r` copy or a `touch` is the same data); classes that differ only by them are
    /// logged. Jobs and markers without recorded data are not compared.
    ///
    /// # Errors
    /// [`Error::ClassListChanged`] when `fresh` holds other classes; marker and store errors.
    async fn data_changes(&self, job: &ResolvedJob, fresh: &[ClassRef]) -> Result<Vec<DataChange>> {
        Ok(self.data_review(job, fresh).await?.0)
    }

    /// [`Coordinator::data_changes`], also returning the commit marker of each class (in the
    /// job's order; `None` where uncommitted) that the comparison read, for a caller that goes
    /// on to check the commits ([`data_review`] on the job's output).
    async fn data_review(
        &self,
        job: &ResolvedJob,
        fresh: &[ClassRef],
    ) -> Result<(Vec<DataChange>, Vec<Option<mgd3_common::manifest::ClassMarker>>)> {
        data_review(&self.output(job)?, job, fresh).await
    }

    /// Accepts `changes` (from [`Coordinator::data_changes`] against `fresh`): records every
    /// class's data as it is now in `job.json` first, then withdraws the commits made from the old
    /// data, so that a crash in between leaves markers that the next comparison still finds
    /// changed. Returns the job's new record, which leases carry from now on.
    async fn accept_data(
        &self,
        job: &ResolvedJob,
        fresh: Vec<ClassRef>,
        changes: &[DataChange],
    ) -> Result<Arc<ResolvedJob>> {
        let mut updated = job.clone();
        for (class, now) in updated.classes.iter_mut().zip(fresh) {
            class.listing = now.listing;
        }
        self.inner.jobs.rewrite_job(&updated).await?;
        let out = self.output(job)?;
        let keys = JobKeys::new(&job.job_id);
        for change in changes {
            if change.was_committed {
                commit::uncommit(&out, &keys, &change.wnid).await?;
            }
            info!(job = %job.job_id, class = %change.wnid, change = %change.then.change_to(&change.now),
                was_committed = change.was_committed, "the class's data changed and the change was accepted: it is distilled again");
        }
        let updated = Arc::new(updated);
        self.inner.scheduler.lock().expect("scheduler").replace_record(updated.clone());
        Ok(updated)
    }

    /// Lists markers, checks and repairs every published file (finishing interrupted publishes,
    /// redoing classes whose files are lost) and re-queues every shard without markers.
    ///
    /// # Errors
    /// [`Error::Quarantined`] when a quarantined job's records are still damaged;
    /// [`Error::UnknownJob`]; [`Error::DataChanged`] when the dataset changed since submit;
    /// [`Error::FingerprintChanged`] when `spec` is not the job's; store and commit errors.
    pub async fn resume(&self, job_id: &str, spec: Option<(&str, &Path)>) -> Result<Resumed> {
        self.resume_with(job_id, spec, DataChanges::Refuse).await
    }

    /// [`Coordinator::resume`], saying what to do about classes whose data changed: with
    /// [`DataChanges::Accept`] their data as it is now is recorded in `job.json`, those committed
    /// from the old data are withdrawn, and all of them are distilled again; every other commit
    /// is kept.
    ///
    /// # Errors
    /// As [`Coordinator::resume`]; [`Error::DataChanged`] only with [`DataChanges::Refuse`];
    /// [`Error::ClassListChanged`] when the job's class folders are not the dataset's any more.
    pub async fn resume_with(&self, job_id: &str, spec: Option<(&str, &Path)>, data: DataChanges) -> Result<Resumed> {
        self.resume_listed(job_id, spec, data, None).await
    }

    /// [`Coordinator::resume_with`], given the job's classes as the dataset lists them now when
    /// the caller has just listed it (a resubmit): the dataset is not listed, or with
    /// `data_fingerprint = "content"` read, a second time.
    async fn resume_listed(
        &self,
        job_id: &str,
        spec: Option<(&str, &Path)>,
        data: DataChanges,
        listed: Option<Vec<ClassRef>>,
    ) -> Result<Resumed> {
        self.refuse_vanished(job_id).await?;
        if self.inner.quarantined.lock().expect("quarantined").contains_key(job_id) {
            // Repaired records bring a quarantined job back; damaged ones keep it out.
            let loaded = self.inner.jobs.load_job(job_id).await;
            let recovered = match loaded {
                Ok((job, persisted)) => self.recover(job, persisted).await,
                Err(error) => Err(error),
            };
            if let Err(error) = recovered {
                let quarantine = Quarantine::of(&error);
                let refused = quarantine.error(job_id);
                self.inner.quarantined.lock().expect("quarantined").insert(job_id.to_owned(), quarantine);
                return Err(refused);
            }
            self.inner.quarantined.lock().expect("quarantined").remove(job_id);
            info!(job = %job_id, "quarantined job recovered");
        }
        let mut job = self.known_job(job_id)?;
        self.claim_output(&job).await?;
        // Files where the job's folders go (or folders where its files go) read as missing:
        // repairing around them withdrew commits and failed half way. Nothing is changed.
        self.refuse_blocked(&job, false)?;
        if let Some((text, base)) = spec {
            // Compared without the data (jobs of earlier versions fingerprinted it too): the
            // data is compared class by class below.
            let now = self.resolve(text, base, Some(job_id.to_owned())).await?.job;
            if now.identity() != job.identity() {
                return Err(Error::FingerprintChanged { job: job_id.into(), was: job.identity(), now: now.identity() });
            }
            if let Some(moved) = self.adopt_model_paths(&job, &now).await? {
                job = moved;
            }
        }
        // Each class's data now, against what the job recorded and what its commit was made
        // from: a changed class is distilled again only when the caller accepts the change.
        let fresh = match listed {
            Some(classes) => classes,
            None => check_dataset(&job.spec).await?.classes,
        };
        let (changes, mut markers) = self.data_review(&job, &fresh).await?;
        if !changes.is_empty() {
            if data == DataChanges::Refuse {
                return Err(Error::DataChanged { job: job_id.into(), changes });
            }
            job = self.accept_data(&job, fresh, &changes).await?;
            // The commits made from the old data are withdrawn: nothing of theirs to check.
            for (class, marker) in job.classes.iter().zip(markers.iter_mut()) {
                if changes.iter().any(|c| c.was_committed && c.wnid == class.wnid) {
                    *marker = None;
                }
            }
        }
        let out = self.output(&job)?;
        let keys = JobKeys::new(job_id);
        // Every published file is checked against its marker's sha256 and restored from staging
        // where it can be; a class that cannot be restored is withdrawn and distilled again.
        let mut redone = Vec::new();
        let mut kept = Vec::new();
        // The markers the data comparison read: each is read once.
        for (class, marker) in job.classes.iter().zip(markers) {
            let Some(marker) = marker else { continue };
            match commit::publish(&out, &keys, &marker, commit::Check::Content).await {
                Ok(()) => kept.push(marker),
                Err(error @ CommitError::LostStaging { .. }) => {
                    warn!(job = %job_id, class = %class.wnid, error = %mgd3_common::error_chain(&error), "published files cannot be restored: the class is distilled again");
                    commit::uncommit(&out, &keys, &class.wnid).await?;
                    redone.push(class.wnid.clone());
                }
                Err(error) => return Err(error.into()),
            }
        }
        // Contact sheets: one in another class's place goes back to its own; one that is no
        // class's committing attempt's would be shown as this class's, and goes (only distilling
        // the class again makes its sheet anew).
        let sheets = commit::repair_sheets(&out.child(keys.root()), &kept).await?;
        for wnid in &sheets.restored {
            warn!(job = %job_id, class = %wnid, "contact sheet found in another class's place: put back");
        }
        for (wnid, problem) in &sheets.removed {
            warn!(job = %job_id, class = %wnid, %problem, "contact sheet removed: not the class's own");
        }
        for (file, error) in &sheets.left {
            warn!(job = %job_id, %file, %error, "cannot remove it: left in place");
        }
        let classes: HashSet<String> = job.classes.iter().map(|c| c.wnid.clone()).collect();
        for stray in state::dataset_strays(&out, &keys, &classes).await? {
            if stray.removable() {
                warn!(job = %job_id, path = %stray.path, "removing what is no class of this job from its dataset folder");
                state::remove_stray(&out, &stray).await?;
            } else {
                // Something else's (another job's output put inside this one, a user's file):
                // not this job's to remove.
                warn!(job = %job_id, path = %stray.path, problem = %stray.problem(), "left in place");
            }
        }
        let committed = state::committed_shards(&out, &job).await?;
        let (committed, requeued) =
            self.inner.scheduler.lock().expect("scheduler").resume(job_id, &committed, now_ms())?;
        info!(job = %job_id, committed, requeued, redone = redone.len(), data_changed = changes.len(), "job resumed");
        let (state, finished) = {
            let scheduler = self.inner.scheduler.lock().expect("scheduler");
            (scheduler.state(job_id), scheduler.persisted(job_id).and_then(|p| p.finished_unix_ms))
        };
        self.mark_dirty(job_id);
        if state == Some(JobState::Succeeded) {
            // A job that had finished and lost nothing keeps its finish time (and its manifest).
            self.finish(job, JobState::Succeeded, finished.unwrap_or_else(now_ms));
        }
        Ok(Resumed { committed, requeued, redone, data_changed: changes, sheets })
    }

    /// Checks every published file of a job against its class's marker (sha256) and that class
    /// folders hold nothing else; repairs nothing (see [`Coordinator::resume`]). Classes without
    /// a marker are reported as not committed.
    ///
    /// # Errors
    /// [`Error::UnknownJob`]; [`Error::Commit`] for an unreadable or foreign marker or a store
    /// that cannot be listed; [`Error::ObjectStore`].
    pub async fn verify(&self, job_id: &str) -> Result<VerifyReport> {
        self.refuse_vanished(job_id).await?;
        let job = self.known_job(job_id)?;
        let out = self.output(&job)?;
        let keys = JobKeys::new(job_id);
        let state = self.inner.scheduler.lock().expect("scheduler").state(job_id);
        // A job that has not ended is still committing classes: those not committed yet are
        // work to come, not damage; nor are they for a job cancelled or failed before them. Only a
        // succeeded job promises every class.
        let running = state.is_some_and(|s| !s.is_final());
        let promised = state == Some(JobState::Succeeded);
        let checks: Vec<_> = job
            .classes
            .iter()
            .map(|class| (out.clone(), keys.clone(), job.fingerprint.clone(), class.wnid.clone()))
            .map(|(out, keys, fingerprint, wnid)| async move {
                let Some(marker) = commit::committed_marker(&out, &keys, &wnid, &fingerprint).await? else {
                    let problems = if promised {
                        vec![VerifyProblem { wnid, file: None, problem: "not committed".into() }]
                    } else {
                        Vec::new()
                    };
                    return Ok::<_, Error>((0, false, problems, None));
                };
                let (files, problems, sheet_missing) = commit::verify_class(&out, &keys, &marker).await?;
                let problems = problems
                    .into_iter()
                    .map(|p| VerifyProblem { wnid: wnid.clone(), file: Some(p.file), problem: p.problem })
                    .collect();
                Ok((files, true, problems, sheet_missing.then_some(wnid)))
            })
            .collect();
        let mut response = VerifyReport {
            classes_checked: job.classes.len() as u32,
            files_checked: 0,
            problems: Vec::new(),
            classes_committed: 0,
            running,
            state,
            sheets_missing: Vec::new(),
        };
        let mut results = futures::stream::iter(checks).buffered(16);
        while let Some(result) = results.next().await {
            let (files, committed, problems, sheet_missing) = result?;
            response.files_checked += files;
            response.classes_committed += u32::from(committed);
            response.problems.extend(problems);
            response.sheets_missing.extend(sheet_missing);
        }
        response.sheets_missing.sort();
        let wnids: Vec<String> = job.classes.iter().map(|c| c.wnid.clone()).collect();
        response.problems.extend(state::blocked_problems(&out, &keys, &wnids, job.spec.ipc));
        let classes: HashSet<String> = wnids.into_iter().collect();
        for stray in state::dataset_strays(&out, &keys, &classes).await? {
            let problem = stray.problem();
            response.problems.push(VerifyProblem { wnid: String::new(), file: Some(stray.path), problem });
        }
        let finished = state == Some(JobState::Succeeded);
        if finished && !state::manifest_in_place(&out, &job).await? {
            response.problems.push(VerifyProblem {
                wnid: String::new(),
                file: Some(keys.manifest()),
                problem: "missing, or not this job's manifest".into(),
            });
        }
        info!(job = %job_id, files = response.files_checked, problems = response.problems.len(), "job verified");
        Ok(response)
    }

    /// Cancels a running job: its pending shards leave the queue and its leases are revoked (the
    /// workers are told on their next poll); `resume` restarts it.
    ///
    /// # Errors
    /// [`Error::Scheduler`] when the job is not known or has already ended
    /// ([`crate::scheduler::SchedulerError::UnknownJob`], [`crate::scheduler::SchedulerError::AlreadyEnded`]).
    pub fn cancel(&self, job_id: &str) -> Result<()> {
        self.refuse_quarantined(job_id)?;
        let (settled, leased) = {
            let mut scheduler = self.inner.scheduler.lock().expect("scheduler");
            let leased = scheduler.leased_shards(job_id);
            (scheduler.cancel(job_id, now_ms())?, leased)
        };
        self.settled(job_id, settled);
        // Classes their workers committed but never reported (gone, or their last word lost)
        // are counted from the markers: now, and once every worker has heard of the cancel.
        if !leased.is_empty() {
            let heartbeat = self.inner.scheduler.lock().expect("scheduler").heartbeat_ms();
            let later = Duration::from_millis((3 * heartbeat).clamp(1000, 60_000));
            self.recount_markers(job_id, leased, &[Duration::ZERO, later]);
        }
        Ok(())
    }

    /// Where `job_id` stands, as `coordinator status` shows it.
    ///
    /// # Errors
    /// [`Error::UnknownJob`] when no such job is known (quarantined jobs are known).
    pub fn status(&self, job_id: &str) -> Result<JobStatus> {
        if let Some(quarantine) = self.inner.quarantined.lock().expect("quarantined").get(job_id) {
            return Ok(quarantine.status(job_id));
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
                ShardFailure {
                    shard_index: *index as u32,
                    wnid: error.as_ref().and_then(|e| e.wnid.clone()).unwrap_or_else(|| {
                        job.shard_classes(*index).iter().map(|c| c.wnid.as_str()).collect::<Vec<_>>().join(",")
                    }),
                    error: error.map(|e| e.error).unwrap_or_default(),
                    attempts: shard.attempts,
                    // Pending or leased again in a running job: another attempt is coming.
                    retrying: shard.state != crate::scheduler::ShardState::Failed && summary.state == JobState::Running,
                }
            })
            .collect::<Vec<_>>();
        // Succeeded only once the manifest is written: until then the job is not done, and when
        // the output refuses the write for good (a full disk) it is paused, saying why.
        let manifest_due = self.inner.manifests_due.lock().expect("manifests").contains_key(&job.job_id);
        let refused = self.inner.manifest_refused.lock().expect("manifest refused").get(&job.job_id).cloned();
        let mut failures = failures;
        let state = match (summary.state, manifest_due, refused) {
            (JobState::Succeeded, true, Some(refusal)) => {
                failures.push(ShardFailure {
                    shard_index: 0,
                    wnid: String::new(),
                    error: format!("every class is committed, but manifest.json cannot be written: {refusal}"),
                    attempts: 0,
                    retrying: false,
                });
                JobState::Paused
            }
            (JobState::Succeeded, true, None) => JobState::Running,
            (state, _, _) => state,
        };
        // A pause of the whole job is said as such; a refusal of a shard's write is said with
        // its shard already.
        if let Some(reason) = summary.paused.filter(|r| !failures.iter().any(|f| &f.error == r)) {
            failures.push(ShardFailure {
                shard_index: 0,
                wnid: String::new(),
                error: reason,
                attempts: 0,
                retrying: false,
            });
        }
        let elsewhere = self.inner.elsewhere.lock().expect("elsewhere").get(&job.job_id).cloned();
        if let Some(reason) = elsewhere {
            failures.push(ShardFailure {
                shard_index: 0,
                wnid: String::new(),
                error: format!(
                    "{}{reason}. Nothing of it is leased here; it goes on here by itself once that coordinator \
                     gives it up (finished, forgotten) or stops",
                    crate::progress::WAITING
                ),
                attempts: 0,
                retrying: false,
            });
        }
        Ok(JobStatus {
            job_id: job.job_id.clone(),
            state,
            shards: ShardCounts {
                total: job.shards.len() as u32,
                done: summary.done,
                running: summary.running,
                pending: summary.pending,
                failed: summary.failed,
            },
            classes_done: summary.classes_done as u32,
            classes_total: job.classes.len() as u32,
            images_done: summary.images_done,
            images_total: job.images_total(),
            images_per_second: summary.images_per_second,
            eta_seconds: summary.eta_seconds.is_finite().then_some(summary.eta_seconds),
            run_started_unix_ms: summary.run_started_ms,
            failures,
            fingerprint: job.fingerprint.clone(),
            created_unix_ms: job.created_unix_ms,
            finished_unix_ms: summary.finished_unix_ms,
            workers: scheduler.live_workers(now) as u32,
            workers_excluded: scheduler.live_workers_excluded(&job.job_id, now) as u32,
            exclusions: scheduler
                .live_exclusions(&job.job_id, now)
                .into_iter()
                .map(|(worker_id, reason)| mgd3_common::status::WorkerExclusion { worker_id, reason })
                .collect(),
            worker_rows: scheduler
                .live_worker_rows(now)
                .into_iter()
                .map(|(worker_id, rows)| mgd3_common::status::WorkerRows {
                    worker_id,
                    dit_rows: u32::try_from(rows).unwrap_or(u32::MAX),
                })
                .collect(),
            shard_list: summary.shards,
            store_unheld_since_unix_ms: self.store_unheld_since_unix_ms(),
            output: format!(
                "{}/{}",
                job.spec.output.clone().unwrap_or_default().trim_end_matches('/'),
                JobKeys::new(&job.job_id).root()
            ),
        })
    }

    /// Every known job in submission order, then the quarantined ones.
    pub fn list(&self) -> Vec<JobStatus> {
        let ids = self.inner.scheduler.lock().expect("scheduler").job_ids();
        let mut jobs: Vec<_> = ids.iter().filter_map(|id| self.status(id).ok()).collect();
        let quarantined = self.inner.quarantined.lock().expect("quarantined").clone();
        jobs.extend(quarantined.iter().map(|(id, quarantine)| quarantine.status(id)));
        jobs
    }

    /// A worker announces itself. Every running job whose models differ from the ones the
    /// worker has loaded (same path, other fingerprint) excludes it; the exclusions come back
    /// with their reasons. Returns the heartbeat interval (ms) and the exclusions.
    ///
    /// # Errors
    /// [`Error::Incompatible`] for another protocol version.
    pub fn register(&self, request: Registration) -> Result<(u64, Vec<Exclusion>)> {
        if request.protocol_version != PROTOCOL_VERSION {
            return Err(Error::Incompatible {
                worker: request.worker_id,
                theirs: request.protocol_version,
                ours: PROTOCOL_VERSION,
            });
        }
        let mut scheduler = self.inner.scheduler.lock().expect("scheduler");
        let process = crate::scheduler::WorkerProcess {
            instance: request.instance.clone(),
            host: request.hostname.clone(),
            pid: request.pid,
        };
        if let Err(error) = scheduler.claim(&request.worker_id, process, now_ms()) {
            warn!(worker = %request.worker_id, error = %error, "worker refused");
            return Err(error.into());
        }
        let mut excluded = Vec::new();
        let mut changed = Vec::new();
        for id in scheduler.job_ids() {
            if scheduler.state(&id) != Some(JobState::Running) {
                continue;
            }
            let job = scheduler.job(&id).expect("listed job");
            let m = &job.spec.models;
            let mismatch = [
                (&m.dit, &m.dit_fingerprint),
                (&m.vae_encoder, &m.vae_encoder_fingerprint),
                (&m.vae_decoder, &m.vae_decoder_fingerprint),
            ]
            .into_iter()
            .find_map(|(path, expected)| match (request.model_fingerprints.get(path), expected) {
                (Some(have), Some(want)) if have != want => Some((path, have, want)),
                _ => None,
            });
            if let Some((path, have, want)) = mismatch {
                let reason = format!(
                    "worker `{}` has model `{path}` loaded with fingerprint {have}, but job `{id}` expects {want}; give this worker the job's model files",
                    request.worker_id
                );
                if scheduler.exclude_worker(&id, &request.worker_id, &reason)? {
                    changed.push(id.clone());
                }
                warn!(job = %id, worker = %request.worker_id, %reason, "worker excluded from the job");
                excluded.push(Exclusion { job_id: id, reason });
            }
        }
        scheduler.register(&request.worker_id, now_ms());
        if let Some(policy) = &request.batch_policy {
            scheduler.report_dit_rows(&request.worker_id, policy.dit_rows);
        }
        let policy = request.batch_policy.map(|p| p.to_string()).unwrap_or_else(|| "not reported".into());
        info!(worker = %request.worker_id, host = %request.hostname, devices = ?request.devices, batch = %policy, "worker registered");
        let heartbeat_interval_ms = scheduler.heartbeat_ms();
        drop(scheduler);
        for id in changed {
            self.mark_dirty(&id);
        }
        Ok((heartbeat_interval_ms, excluded))
    }

    /// Records the batch policy a worker reported with a poll (what it runs now that it loaded a
    /// job's models: `--dit-rows auto` chooses the rows then), so that jobs submitted later plan
    /// their shards from it; logged at INFO when the DiT rows changed.
    pub fn report_batch_policy(&self, worker_id: &str, policy: mgd3_common::batch::BatchPolicy) {
        let changed = self.inner.scheduler.lock().expect("scheduler").report_dit_rows(worker_id, policy.dit_rows);
        if changed {
            info!(worker = %worker_id, batch = %policy, "worker reported a new batch policy; jobs submitted from now on plan their shards with it");
        }
    }

    /// A worker's heartbeat: renews the leases it reports `running` (recording their progress)
    /// and, when it holds none and is not `draining`, asks for work. Returns the decision and
    /// the reported leases that are no longer held (the worker stops them).
    ///
    /// # Errors
    /// [`Error::Scheduler`] with `UnknownWorker` when the worker has not registered (it
    /// registers again).
    pub fn poll(
        &self,
        worker_id: &str,
        process: &crate::scheduler::WorkerProcess,
        running: &[Running],
        draining: bool,
    ) -> Result<(PollDecision, Vec<String>)> {
        let holds_store = self.holds_store().is_ok();
        let (decision, revoked, settled, events, expired) = {
            let mut scheduler = self.inner.scheduler.lock().expect("scheduler");
            // Leases are renewed either way; new ones only while the store is ours.
            scheduler.set_granting(holds_store);
            if let Err(error) = scheduler.holds(worker_id, process) {
                warn!(worker = %worker_id, error = %error, "poll refused: another process holds this worker id");
                return Err(error.into());
            }
            let (decision, revoked) = scheduler.poll(worker_id, running, draining, now_ms())?;
            (decision, revoked, scheduler.take_settled(), scheduler.take_worker_events(), scheduler.take_expired())
        };
        log_worker_events(events);
        self.recount_expired(&expired);
        log_expired(expired);
        // Leases this poll found expired or forgotten: persisted, and a job they ended finished.
        for (job_id, settled) in settled {
            self.settled(&job_id, settled);
        }
        if let PollDecision::Lease(grant) = &decision {
            if grant.backup {
                info!(job = %grant.job.job_id, shard = grant.shard_index, worker = %worker_id, "backup lease granted: the shard runs well past the job's pace and no shard waits");
            } else {
                debug!(job = %grant.job.job_id, shard = grant.shard_index, attempt = grant.attempt, worker = %worker_id, "lease granted");
            }
            self.mark_dirty(&grant.job.job_id);
        }
        Ok((decision, revoked))
    }

    /// A worker finished a shard: every class must have a marker naming the job's fingerprint,
    /// and the digest of those markers must be the one reported; then the shard is done.
    ///
    /// # Errors
    /// [`Error::MissingMarker`] / [`Error::DigestMismatch`] (the attempt is recorded as failed),
    /// [`Error::Scheduler`] for a lease that is not held, store errors.
    pub async fn complete(&self, request: Completion) -> Result<()> {
        let begun = {
            let mut scheduler = self.inner.scheduler.lock().expect("scheduler");
            match scheduler.begin_completion(&request.worker_id, &request.lease_id) {
                Err(crate::scheduler::SchedulerError::StaleLease(_))
                    if scheduler.completed_by(&request.worker_id, &request.lease_id) =>
                {
                    None
                }
                begun => Some(begun),
            }
        };
        let Some(begun) = begun else {
            // Its first call was recorded after the worker had stopped waiting for the answer.
            debug!(worker = %request.worker_id, lease = %request.lease_id, "completion sent again; it was recorded");
            return Ok(());
        };
        if let Err(crate::scheduler::SchedulerError::StaleLease(_)) = &begun {
            self.count_revoked_commits(&request).await;
        }
        let (job, shard) = begun?;
        // Until this returns (or the worker hangs up and the call is dropped), the lease is ours
        // to keep: reading the markers may take as long as the store does.
        let _verifying = Verifying { inner: self.inner.clone(), lease_id: request.lease_id.clone() };
        // Nothing is recorded while the store may have another coordinator (see `holds_store`).
        self.await_store_held().await?;
        let out = self.output(&job)?;
        let keys = JobKeys::new(&job.job_id);
        let mut markers = Vec::new();
        let mut refused = None;
        for class in job.shard_classes(shard) {
            match mgd3_common::commit::committed_marker(&out, &keys, &class.wnid, &job.fingerprint).await? {
                Some(marker) => markers.push(marker),
                None => {
                    let error = Error::MissingMarker { shard, wnid: class.wnid.clone(), output: out.url.clone() };
                    refused = Some((Some(class.wnid.clone()), error));
                    break;
                }
            }
        }
        if refused.is_none() {
            let stored = mgd3_common::commit::manifest_digest(&markers);
            if stored != request.manifest_digest {
                let error = Error::DigestMismatch {
                    shard,
                    reported: request.manifest_digest.clone(),
                    stored,
                    output: out.url.clone(),
                };
                refused = Some((None, error));
            }
        }
        if let Some((wnid, error)) = refused {
            // A refused completion is recorded as what it is (typically the worker writes to
            // storage the coordinator does not see), not left to expire as a lost lease.
            let settled = self.inner.scheduler.lock().expect("scheduler").fail(
                &request.worker_id,
                &request.lease_id,
                wnid.clone(),
                format!(
                    "worker `{}` reported the shard complete, but {}",
                    request.worker_id,
                    mgd3_common::error_chain(&error)
                ),
                true,
                false,
                now_ms(),
            );
            if let Ok((job_id, settled)) = settled {
                warn!(job = %job_id, shard, worker = %request.worker_id, wnid = wnid.as_deref(), output = %out.url, error = %mgd3_common::error_chain(&error), "completion refused");
                self.settled(&job_id, settled);
            }
            return Err(error);
        }
        // The markers may have taken long to read: the store must still be this coordinator's.
        self.await_store_held().await?;
        let (job_id, settled) = self.inner.scheduler.lock().expect("scheduler").complete(
            &request.worker_id,
            &request.lease_id,
            now_ms(),
        )?;
        info!(job = %job_id, shard, worker = %request.worker_id, images = request.images, seconds = %format_args!("{:.1}", request.seconds), "shard committed");
        self.settled(&job_id, settled);
        Ok(())
    }

    /// A completion of a lease that a cancel or a pause took back: the worker committed its
    /// classes before it heard, and they are counted (their markers read) though the completion
    /// itself is refused. Store errors leave the count as it was (`resume` counts afresh).
    async fn count_revoked_commits(&self, request: &Completion) {
        let revoked =
            self.inner.scheduler.lock().expect("scheduler").revoked_lease(&request.worker_id, &request.lease_id);
        let Some((job, shard)) = revoked else { return };
        let Ok(out) = self.output(&job) else { return };
        let committed = match committed_in_shard(&out, &job, shard).await {
            Ok(committed) => committed,
            Err(error) => {
                debug!(job = %job.job_id, shard, error = %mgd3_common::error_chain(&error), "markers of a revoked lease not counted");
                return;
            }
        };
        let grew = self.inner.scheduler.lock().expect("scheduler").note_committed(
            &request.worker_id,
            &request.lease_id,
            committed,
        );
        if let Some(job_id) = grew {
            self.mark_dirty(&job_id);
        }
    }

    /// A shard attempt did not finish: what happens to the shard follows the failure's
    /// disposition (retry, give up, lease elsewhere and exclude the worker, release).
    ///
    /// # Errors
    /// [`Error::Scheduler`] for a lease that is not held.
    pub fn fail(&self, request: Failure) -> Result<()> {
        let mut scheduler = self.inner.scheduler.lock().expect("scheduler");
        let now = now_ms();
        if let Some(job_id) = scheduler.note_committed(&request.worker_id, &request.lease_id, request.classes_committed)
        {
            // A lease taken back by a cancel or a pause: its commits are counted, the report
            // itself is refused below as stale.
            self.mark_dirty(&job_id);
        }
        let (job_id, settled) = match request.disposition {
            Disposition::Elsewhere => {
                scheduler.exclude(&request.worker_id, &request.lease_id, request.error.clone(), now)?
            }
            Disposition::Pause => scheduler.pause(
                &request.worker_id,
                &request.lease_id,
                request.class.clone(),
                request.error.clone(),
                now,
            )?,
            disposition => scheduler.fail(
                &request.worker_id,
                &request.lease_id,
                request.class.clone(),
                request.error.clone(),
                disposition != Disposition::GiveUp,
                disposition == Disposition::Release,
                now,
            )?,
        };
        let alike = (request.disposition == Disposition::Elsewhere)
            .then(|| scheduler.excluded_alike(&job_id, &request.worker_id, &request.error))
            .flatten();
        drop(scheduler);
        let class = request.class.as_deref();
        match request.disposition {
            Disposition::Release => info!(job = %job_id, worker = %request.worker_id, "lease released"),
            // Once per refusal: the job's other leases are revoked, so no second worker reports it.
            Disposition::Pause => warn!(
                job = %job_id,
                worker = %request.worker_id,
                error = %request.error,
                "job paused: its output store refuses writes or is gone (full, over quota, read-only, no \
                 permission, or a missing bucket); no attempt was spent. Do what the error says (free space, fix \
                 the permissions, create the bucket), then run `coordinator resume {job_id}`"
            ),
            // Not an attempt: the shard goes to another worker with its budget untouched.
            Disposition::Elsewhere => match alike {
                Some(other) => {
                    info!(job = %job_id, worker = %request.worker_id, "worker excluded from the job, for the reason {other} was")
                }
                None => {
                    warn!(job = %job_id, worker = %request.worker_id, reason = %request.error, "worker excluded from the job")
                }
            },
            disposition => {
                warn!(job = %job_id, worker = %request.worker_id, class, ?disposition, error = %request.error, "shard attempt failed")
            }
        }
        self.settled(&job_id, settled);
        Ok(())
    }
}

/// A completion being verified ([`Scheduler::begin_completion`]): ended when dropped, however
/// the verification ends, with the lease renewed from then if it is still held.
struct Verifying {
    inner: Arc<Inner>,
    lease_id: String,
}

impl Drop for Verifying {
    fn drop(&mut self) {
        if let Ok(mut scheduler) = self.inner.scheduler.lock() {
            scheduler.end_completion(&self.lease_id, now_ms());
        }
    }
}

/// One WARN line per expired shard lease: a worker stopped renewing it (died, cut off, hung).
/// How many of shard `shard`'s classes have a commit marker of `job` in `out`.
async fn committed_in_shard(out: &Location, job: &ResolvedJob, shard: usize) -> std::result::Result<u32, CommitError> {
    let keys = JobKeys::new(&job.job_id);
    let mut committed = 0;
    for class in job.shard_classes(shard) {
        if commit::committed_marker(out, &keys, &class.wnid, &job.fingerprint).await?.is_some() {
            committed += 1;
        }
    }
    Ok(committed)
}

fn log_expired(expired: Vec<crate::scheduler::ExpiredLease>) {
    for lease in expired {
        if lease.orphaned {
            info!(job = %lease.job_id, shard = lease.shard, worker = %lease.worker_id, lease = %lease.lease_id,
                "lease released: its worker held it when the coordinator before this one stopped, and has not come back since this one started (it stopped with it); the shard goes back to the queue, no attempt spent (committed classes stay)");
            continue;
        }
        let then = if lease.requeued {
            "(died, cut off or hung); the shard goes back to the queue (committed classes stay)"
        } else {
            "and the shard is out of attempts: it failed (`coordinator status` shows why; `coordinator resume` runs it again)"
        };
        if lease.exited {
            let then = if lease.requeued {
                "the shard goes back to the queue (committed classes stay)"
            } else {
                "the shard is out of attempts: it failed (`coordinator status` shows why; `coordinator resume` runs it again)"
            };
            warn!(job = %lease.job_id, shard = lease.shard, worker = %lease.worker_id, lease = %lease.lease_id,
                "lease given up: the worker's process exited; {then}");
            continue;
        }
        warn!(job = %lease.job_id, shard = lease.shard, worker = %lease.worker_id, lease = %lease.lease_id,
            "lease expired: the worker stopped renewing it {then}");
    }
}

/// One INFO line per worker that left or came back.
fn log_worker_events(events: Vec<crate::scheduler::WorkerEvent>) {
    use crate::scheduler::{LeftReason, WorkerEvent};
    for event in events {
        match event {
            WorkerEvent::Left { worker_id, reason: LeftReason::Drained } => {
                info!(worker = %worker_id, "worker left: nothing more to do, told to exit");
            }
            WorkerEvent::Left { worker_id, reason: LeftReason::Stopped } => {
                info!(worker = %worker_id, "worker left: it is stopping (SIGTERM or Ctrl-C), its leases released");
            }
            WorkerEvent::Left { worker_id, reason: LeftReason::Silent { silent_ms } } => info!(
                worker = %worker_id,
                silent_s = silent_ms / 1000,
                "worker left: silent for three heartbeats (died, preempted or cut off); its leases are requeued when they expire"
            ),
            WorkerEvent::Left { worker_id, reason: LeftReason::Exited } => {
                info!(worker = %worker_id, "worker left: its process exited");
            }
            WorkerEvent::Returned { worker_id } => info!(worker = %worker_id, "worker is back"),
            WorkerEvent::SetAside { worker_id, expired_in_a_row, until_ms } => warn!(
                worker = %worker_id,
                expired_in_a_row,
                set_aside_s = until_ms.saturating_sub(now_ms()) / 1000,
                "worker set aside: its leases expired {expired_in_a_row} times in a row (it takes work and dies before reporting: a crash loop?); its shards go to other workers, and its log says why it stops"
            ),
        }
    }
}

#[cfg(test)]
mod outage_tests {
    use super::Outage;

    /// A store that refuses state writes for many flushes is told once when the outage begins
    /// and once when it ends, not once per try (5,809 warnings in 9.5 minutes before).
    #[test]
    fn an_outage_is_told_once_when_it_begins_and_once_when_it_ends() {
        let mut outage = Outage::default();
        assert_eq!(outage.succeeded(), None, "no outage, nothing to tell");
        let told: usize = (0..5809).map(|_| outage.failed() as usize).sum();
        assert_eq!(told, 1);
        let (_, tries) = outage.succeeded().expect("the outage ended");
        assert_eq!(tries, 5809);
        assert_eq!(outage.succeeded(), None);
        assert!(outage.failed(), "a second outage is told again");
    }
}
