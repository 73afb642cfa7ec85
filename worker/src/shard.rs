//! Running a leased shard: [`run_shard`] distils each class of the lease with a [`ShardEngine`]
//! and commits it with the create-only marker protocol (the `Committer` is the shard's
//! [`ClassSink`]). Runs on a blocking thread. The failure taxonomy lives in [`crate::failure`],
//! the engines in [`crate::engines`]; both are re-exported here.

pub use crate::engines::{FakeEngine, LoadedModels, OnnxShardEngine, ShardEngine};
pub use crate::failure::{Disposition, ShardError, ShardFailure};
pub use crate::pipeline::{ClassResult, ClassSink};
use mgd3_common::commit::{Check, CommitOutcome, commit_class, committed_marker, publish};
use mgd3_common::job::{ClassRef, JobSpec};
use mgd3_common::layout::JobKeys;
use mgd3_common::manifest::{ClassMarker, FileDigest, SCHEMA_VERSION};
use mgd3_common::store::Location;
use object_store::ObjectStoreExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tracing::info;

/// The lease a shard runs under.
#[derive(Clone, Debug)]
pub struct ShardLease {
    /// The lease's id.
    pub lease_id: String,
    /// The attempt's id (in every marker this attempt writes).
    pub attempt_id: String,
    /// 1 for the first attempt at the shard, counting attempts that spent the budget.
    pub attempt: u32,
    /// The job's id.
    pub job_id: String,
    /// The job's fingerprint: markers of another fingerprint are refused.
    pub fingerprint: String,
    /// The job's spec.
    pub spec: Arc<JobSpec>,
    /// The shard's classes, in plan order.
    pub classes: Vec<ClassRef>,
    /// This worker's id.
    pub worker_id: String,
}

/// What a finished shard reports.
#[derive(Clone, Debug)]
pub struct ShardReport {
    /// Images in the shard's markers (all of its classes).
    pub images: u32,
    /// Seconds the shard took on this worker.
    pub seconds: f64,
    /// [`mgd3_common::commit::manifest_digest`] of the shard's markers.
    pub digest: String,
}

/// What a running shard has committed so far, read by the poll loop for its heartbeats.
#[derive(Debug, Default)]
pub struct ShardProgress {
    /// Images of committed classes.
    pub images: AtomicU32,
    /// Classes committed (by this attempt, or found committed by an earlier one).
    pub classes: AtomicU32,
    /// DiT steps run for the shard's images, one per image per step (progress inside a class).
    pub image_steps: Arc<AtomicU64>,
    /// The coordinator revoked the lease (its job cancelled, or the shard leased elsewhere): no
    /// class is committed from then on, so what the job shows committed stays what it has
    /// (a class finished at the cancel was committed after it, one more than status said).
    pub revoked: AtomicBool,
}

/// Commits the classes an engine hands over, recording each class's marker.
struct Committer<'a> {
    runtime: &'a Handle,
    out: &'a Location,
    keys: JobKeys,
    lease: &'a ShardLease,
    progress: &'a ShardProgress,
    /// Set when the shard is to stop (SIGTERM, a revoked lease).
    cancel: &'a AtomicBool,
    markers: std::collections::HashMap<String, ClassMarker>,
}

/// How long a store call in flight may go on once the shard is told to stop (SIGTERM, a revoked
/// lease). A commit ends well within it; one that a store outage holds up (its calls are retried
/// for minutes) is left, and the shard is given back unfinished, spending no attempt, so that a
/// stopping worker exits within its stop grace: a commit left half-way is one a kill cut short,
/// which the commit protocol survives.
pub const STOPPING_STORE_GRACE: Duration = Duration::from_secs(10);

impl Committer<'_> {
    fn store_failure(wnid: &str, e: mgd3_common::commit::CommitError) -> ShardError {
        ShardError::class(wnid, e)
    }

    /// Runs a store call of class `wnid` on the runtime, until it ends or
    /// [`STOPPING_STORE_GRACE`] after the shard was told to stop.
    fn store_call<T>(
        &self,
        wnid: &str,
        call: impl std::future::Future<Output = Result<T, mgd3_common::commit::CommitError>>,
    ) -> Result<T, ShardError> {
        let cancel = self.cancel;
        let stopped = async move {
            while !cancel.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(STOPPING_STORE_GRACE).await;
        };
        self.runtime.block_on(async {
            tokio::select! {
                result = call => result.map_err(|e| Self::store_failure(wnid, e)),
                () = stopped => {
                    tracing::warn!(class = %wnid, grace_s = STOPPING_STORE_GRACE.as_secs(), "stopping: the store has not answered since the stop; the class is left uncommitted and the lease given back");
                    Err(ShardError::class(wnid, ShardFailure::Cancelled))
                }
            }
        })
    }

    fn committed(&self, wnid: &str) -> Result<Option<ClassMarker>, ShardError> {
        self.store_call(wnid, committed_marker(self.out, &self.keys, wnid, &self.lease.fingerprint))
    }

    fn record(&mut self, marker: ClassMarker) {
        self.progress.images.fetch_add(marker.images.len() as u32, Ordering::Relaxed);
        if self.markers.insert(marker.wnid.clone(), marker).is_none() {
            self.progress.classes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl ClassSink for Committer<'_> {
    type Error = ShardError;

    fn commit(&mut self, class: &ClassRef, result: ClassResult) -> Result<bool, ShardError> {
        let lease = self.lease;
        let span = tracing::info_span!("class", job = %lease.job_id, class = %class.wnid, worker = %lease.worker_id);
        let _guard = span.enter();
        let seconds = result.timings.total().as_secs_f64();
        let template = ClassMarker {
            schema_version: SCHEMA_VERSION,
            job_id: lease.job_id.clone(),
            fingerprint: lease.fingerprint.clone(),
            attempt_id: lease.attempt_id.clone(),
            worker_id: lease.worker_id.clone(),
            wnid: class.wnid.clone(),
            label: class.label,
            class_index: class.class_index,
            images: Vec::new(),
            modes: FileDigest { name: String::new(), sha256: String::new(), bytes: 0 },
            real_images: result.timings.real_images as u64,
            timings: result.timings.stages.clone(),
            committed_unix_ms: mgd3_common::now_ms(),
            latent_cache_hit: result.timings.latent_cache_hit,
            modes_cache_hit: result.timings.modes_cache_hit,
            versions_changed: result.timings.versions_changed,
            data: class.listing.clone(),
            skipped: result.timings.skipped,
            quality: result.quality,
            embedding: result.embedding,
            sheet_record: lease.spec.contact_sheet,
        };
        if self.progress.revoked.load(Ordering::Relaxed) {
            info!("the lease was revoked: the class is not committed");
            return Err(ShardError::class(&class.wnid, ShardFailure::Cancelled));
        }
        let files = result.files;
        let (images, real_images) = (files.images.len(), template.real_images);
        let quality = template.quality.as_ref().map(|q| (q.diversity_normalised, q.representativeness_normalised));
        let outcome = self.store_call(&class.wnid, commit_class(self.out, &self.keys, template, files))?;
        let outcome_text = match outcome {
            CommitOutcome::Lost => "lost to another attempt",
            _ => "committed",
        };
        match quality {
            Some((diversity, representativeness)) => info!(
                images,
                real_images,
                seconds = format!("{seconds:.1}"),
                diversity = format!("{diversity:.3}"),
                representativeness = format!("{representativeness:.3}"),
                "class {outcome_text}"
            ),
            None => info!(images, real_images, seconds = format!("{seconds:.1}"), "class {outcome_text}"),
        }
        let marker = self.committed(&class.wnid)?.ok_or_else(|| {
            ShardError::class(&class.wnid, ShardFailure::Lost("the marker vanished after the commit"))
        })?;
        let won = outcome != CommitOutcome::Lost;
        if !won {
            info!(winner = %marker.attempt_id, "another attempt committed this class first");
        }
        self.record(marker);
        Ok(won)
    }

    fn contact_sheet(&mut self, class: &ClassRef, png: Vec<u8>) {
        // Only this attempt's own commit gets its sheet, and the sheet is tied to it by a record
        // written after it (a sheet without its record is never shown as the class's).
        let Some(marker) = self.markers.get(&class.wnid).filter(|m| m.attempt_id == self.lease.attempt_id) else {
            return;
        };
        let record = serde_json::to_vec_pretty(&mgd3_common::commit::sheet_record(marker, &png))
            .expect("serialisable sheet record");
        let (sheet_key, record_key) = (
            self.out.key(&self.keys.contact_sheet(&class.wnid)),
            self.out.key(&self.keys.contact_sheet_record(&class.wnid)),
        );
        let store = self.out.store.as_ref();
        let written = self.runtime.block_on(async {
            store.put(&sheet_key, png.into()).await.map_err(|e| (&sheet_key, e))?;
            store.put(&record_key, record.into()).await.map_err(|e| (&record_key, e))
        });
        if let Err((key, error)) = written {
            tracing::warn!(class = %class.wnid, %key, %error, "could not write the contact sheet");
        }
    }

    fn image_steps(&self) -> Option<Arc<AtomicU64>> {
        Some(self.progress.image_steps.clone())
    }
}

/// Distils and commits every class of the lease; classes committed by an earlier attempt are only
/// re-published, the others go to the engine together (one shard run, see
/// [`ShardEngine::distill_shard`]). Errors carry the class they happened in.
///
/// # Errors
/// A [`ShardError`]: [`ShardFailure::Cancelled`] once `cancel` is set; a failed commit or marker
/// read ([`ShardFailure::Commit`]); what the engine failed with; [`ShardFailure::Lost`] when a
/// class ends up without a marker.
pub fn run_shard(
    engine: &mut dyn ShardEngine,
    runtime: &Handle,
    out: &Location,
    lease: &ShardLease,
    progress: &ShardProgress,
    cancel: &Arc<AtomicBool>,
) -> Result<ShardReport, ShardError> {
    let started = Instant::now();
    let mut committer = Committer {
        runtime,
        out,
        keys: JobKeys::new(&lease.job_id),
        lease,
        progress,
        cancel: cancel.as_ref(),
        markers: Default::default(),
    };
    let mut todo = Vec::new();
    for class in &lease.classes {
        if cancel.load(Ordering::Relaxed) {
            return Err(ShardError::shard(ShardFailure::Cancelled));
        }
        match committer.committed(&class.wnid)? {
            Some(marker) => {
                committer.store_call(&class.wnid, publish(out, &committer.keys, &marker, Check::Size))?;
                info!(job = %lease.job_id, class = %class.wnid, attempt = %marker.attempt_id, "class already committed");
                committer.record(marker);
            }
            None => todo.push(class.clone()),
        }
    }
    if !todo.is_empty() {
        match engine.distill_shard(&lease.spec, &todo, cancel, &mut committer) {
            Ok(()) => {}
            // Stopped (SIGTERM, revoked) after its last class committed: the shard is done, and
            // is reported so, not released for another worker to find every class committed.
            Err(error)
                if error.is_cancelled() && lease.classes.iter().all(|c| committer.markers.contains_key(&c.wnid)) =>
            {
                info!(job = %lease.job_id, "stopping, with every class of the shard committed: reporting it done");
            }
            Err(error) => return Err(error),
        }
    }
    let mut markers = Vec::with_capacity(lease.classes.len());
    for class in &lease.classes {
        let marker = committer
            .markers
            .get(&class.wnid)
            .ok_or_else(|| ShardError::class(&class.wnid, ShardFailure::Lost("the engine skipped this class")))?;
        markers.push(marker);
    }
    Ok(ShardReport {
        images: markers.iter().map(|m| m.images.len() as u32).sum(),
        seconds: started.elapsed().as_secs_f64(),
        digest: mgd3_common::commit::manifest_digest(markers),
    })
}
