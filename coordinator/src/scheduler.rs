//! Pure lease logic: which worker gets which shard, lease renewal and expiry, attempt budgets,
//! job completion. No I/O and no clock: every call takes `now` (Unix ms), so tests need no sleeps.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use mgd3_common::job::{ClassRef, ResolvedJob};
pub use mgd3_common::status::JobState;
use mgd3_common::status::{ShardPhase, ShardStatus};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why the scheduler refused a call about a job or a lease.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SchedulerError {
    /// The job id is not known to this scheduler.
    #[error("unknown job `{0}`")]
    UnknownJob(String),
    /// The lease is not held any more: it expired, was revoked or released, or its shard finished.
    #[error("lease `{0}` is not held (expired, revoked or finished)")]
    StaleLease(String),
    /// The lease is held by another worker than the caller.
    #[error("lease `{lease}` belongs to worker `{owner}`, not `{caller}`")]
    NotOwner {
        /// The lease id the caller named.
        lease: String,
        /// The worker that holds the lease.
        owner: String,
        /// The worker that made the call.
        caller: String,
    },
    /// The worker polled without registering with this scheduler (e.g. the coordinator restarted).
    #[error(
        "worker `{0}` is not registered with this coordinator (it restarted, or the worker never registered): register first"
    )]
    UnknownWorker(String),
    /// A worker registered under an id that a live worker process already uses.
    #[error(
        "worker id `{worker_id}` is already used by a live worker ({live}); this worker ({new}) is refused: give each \
         worker process its own --worker-id, or leave it unset (the default id is unique per process)"
    )]
    WorkerIdInUse {
        /// The id both use.
        worker_id: String,
        /// The process that holds it.
        live: Box<WorkerProcess>,
        /// The process refused.
        new: Box<WorkerProcess>,
    },
    /// `cancel` of a job that has already succeeded, failed or been quarantined.
    #[error("job `{job}` has already ended ({state}); there is nothing to cancel")]
    AlreadyEnded {
        /// The job id.
        job: String,
        /// The state it ended in (`succeeded`, `failed`, ...).
        state: &'static str,
    },
}

/// The process behind a worker id, as it registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerProcess {
    /// Drawn once per process; empty from workers that predate it (never refused).
    pub instance: String,
    /// Its host.
    pub host: String,
    /// Its pid.
    pub pid: u32,
}

impl std::fmt::Display for WorkerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on `{}`", self.pid, self.host)
    }
}

/// Where one shard stands in the scheduler; persisted in `state.json` as
/// `{"state": "pending", ...}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ShardState {
    /// Waiting in the queue for a worker.
    Pending,
    /// Leased to a worker until `deadline_ms` unless the worker renews it.
    Leased {
        /// The lease's id, `<epoch>-<n>` (unique across coordinator restarts).
        lease_id: String,
        /// The attempt's id, `s<shard>-a<attempt>-<lease id>`.
        attempt_id: String,
        /// The worker holding the lease.
        worker_id: String,
        /// When the lease expires unless renewed (Unix ms).
        deadline_ms: u64,
        /// When the lease was granted (Unix ms).
        started_ms: u64,
    },
    /// Every class of the shard is committed.
    Done {
        /// The attempt that finished it, or `recovered` when it was found committed by marker.
        attempt_id: String,
        /// When it was marked done (Unix ms).
        finished_ms: u64,
    },
    /// Out of attempts, or failed with an error that retrying cannot fix.
    Failed,
}

/// The last error of a shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardError {
    /// The class the error is about, when it is about one.
    pub wnid: Option<String>,
    /// The error message, with its causes.
    pub error: String,
    /// When the error was reported (Unix ms).
    pub at_ms: u64,
}

/// One shard of a job as the scheduler tracks and persists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// Where the shard stands.
    pub state: ShardState,
    /// Attempts started (leases granted) that counted against the budget.
    pub attempts: u32,
    /// The last error reported for the shard (kept across retries).
    pub last_error: Option<ShardError>,
    /// Progress reported by the current lease.
    #[serde(default)]
    pub images_done: u32,
    /// Classes the current lease reported committed.
    #[serde(default)]
    pub classes_done: u32,
    /// Attempts spent before the last `resume` gave the shard a fresh budget, and the last
    /// error they ended with: the job's history, for the report, which a resume does not erase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before_resume: Option<EarlierAttempts>,
}

/// What a shard went through before a `resume` reset its attempts (summed over resumes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlierAttempts {
    /// Attempts spent.
    pub attempts: u32,
    /// The last error before the resume.
    pub last_error: Option<ShardError>,
}

impl Shard {
    /// A shard never leased: what a missing state record stands for.
    pub fn pending() -> Self {
        Shard {
            state: ShardState::Pending,
            attempts: 0,
            last_error: None,
            images_done: 0,
            classes_done: 0,
            before_resume: None,
        }
    }

    /// Forgets the progress of the lease that just ended.
    /// A new attempt (or the end of one): its own image count starts again, but classes already
    /// committed stay committed and counted (the next attempt counts them again as it finds
    /// their markers; `classes_done` only grows until `resume` re-counts).
    fn reset_progress(&mut self) {
        self.images_done = 0;
    }
}

/// What survives a coordinator restart (state.json).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PersistedJob {
    /// Every shard of the job, in plan order (kept in per-shard records since state schema 3,
    /// see [`crate::jobstore`]).
    #[serde(default)]
    pub shards: Vec<Shard>,
    /// Set by `cancel`; cleared by `resume`.
    pub cancelled: bool,
    /// Set, with the refusal, when the output store refused a write for good (full, read-only,
    /// no permission); cleared by `resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
    /// When the job reached a final state (Unix ms); `None` while running.
    pub finished_unix_ms: Option<u64>,
    /// Workers that may lease nothing of this job (they hold different models).
    pub excluded_workers: BTreeSet<String>,
    /// Why each excluded worker was excluded, as it was said (absent in older state files).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exclusion_reasons: BTreeMap<String, String>,
    /// The fingerprint of the job this state belongs to (absent in older state files): a job.json
    /// rebuilt from another spec is refused even when nothing is committed yet.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fingerprint: String,
}

struct JobRun {
    job: Arc<ResolvedJob>,
    persisted: PersistedJob,
    pending: Queue,
    /// Progress of this process's run of the job: (time, images done) samples, the first at the
    /// moment it took the job on (so work committed before never counts), then one per change.
    /// Only what the rate window needs is kept.
    progress: VecDeque<(u64, u64)>,
    /// The last time progress may have changed (a renewal or a finished shard), sampled or not:
    /// changes after the last sample are counted as made by then.
    last_touch: u64,
    /// When this process took the job on (submitted, recovered or resumed): `progress` keeps
    /// only the rate window's samples, so its first is no start time for a run past a minute.
    taken_on: u64,
    /// A lease of this run has been granted: until then `progress`'s baseline moves with the
    /// first grant, so the wait for the first worker never counts in the rate.
    working: bool,
    /// Shard index → the worker whose lease of it expired last, while that is the shard's last
    /// attempt: a second expiry on the same worker in a row costs the shard nothing.
    expired_on: HashMap<usize, String>,
    /// How long this run's completed shards took: (shards, milliseconds, cost units) summed,
    /// what a backup lease compares a running shard with.
    pace: (u64, u64, u64),
    /// What jobs sharing this one's real-image latents have in common ([`share_key`]); `None`
    /// without a latent cache.
    share: Option<String>,
}

/// The key of the latents a job's classes share with other jobs (a sweep's variants): the
/// dataset, the VAE encoder and the latent cache they are kept in. `None` for a job without a
/// latent cache, whose every run encodes anew.
fn share_key(job: &ResolvedJob) -> Option<String> {
    let cache = job.spec.latent_cache_url()?;
    Some(format!("{}\n{}\n{cache}", job.spec.dataset, job.spec.models.vae_encoder_fingerprint.as_deref().unwrap_or("")))
}

/// Pending shards [`Scheduler::pick_shard`] looks through for one that no other job of the same
/// latents is running (the costliest first): enough for any sweep's tail, bounded per grant.
const SHARE_LOOKAHEAD: usize = 64;

/// A job's shards waiting for a worker, the costliest first ([`ResolvedJob::shard_cost`]: the
/// longest work starts first and the smallest shards make the tail), ties in plan order.
#[derive(Debug, Default)]
struct Queue {
    waiting: BTreeSet<(std::cmp::Reverse<u64>, usize)>,
    cost: Vec<u64>,
}

impl Queue {
    fn new(job: &ResolvedJob) -> Self {
        Queue { waiting: BTreeSet::new(), cost: (0..job.shards.len()).map(|i| job.shard_cost(i)).collect() }
    }

    fn key(&self, shard: usize) -> (std::cmp::Reverse<u64>, usize) {
        (std::cmp::Reverse(self.cost.get(shard).copied().unwrap_or(0)), shard)
    }

    fn insert(&mut self, shard: usize) -> bool {
        self.waiting.insert(self.key(shard))
    }

    fn remove(&mut self, shard: &usize) -> bool {
        self.waiting.remove(&self.key(*shard))
    }

    fn first(&self) -> Option<usize> {
        self.waiting.first().map(|(_, shard)| *shard)
    }

    fn contains(&self, shard: usize) -> bool {
        self.waiting.contains(&self.key(shard))
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.waiting.iter().map(|(_, shard)| *shard)
    }

    fn clear(&mut self) {
        self.waiting.clear();
    }
}

/// The window the throughput and ETA are measured over: long enough to smooth over shard
/// boundaries, short enough that idle time before the first worker does not linger.
pub const RATE_WINDOW_MS: u64 = 60_000;

/// Progress is sampled at most this often per job: counting a job's images walks every shard
/// (5,461 of them for ImageNet-21K), which must not happen on each of the hundreds of polls a
/// second that 1,024 workers make. The rate is over a minute; a second's resolution is plenty.
pub const PROGRESS_SAMPLE_MS: u64 = 1000;

impl JobRun {
    /// Starts the progress record of this run at `now`.
    fn restart_progress(&mut self, now: u64) {
        self.taken_on = now;
        self.working = false;
        self.progress.clear();
        self.progress.push_back((now, self.images_done()));
        self.last_touch = now;
    }

    /// A lease of this run ended without work: when no lease of it runs and nothing has been
    /// done in this run, the rate waits for the next lease again (a worker excluded at once is
    /// no start of the work).
    fn no_work_yet(&mut self) {
        let leased = self.persisted.shards.iter().any(|s| matches!(s.state, ShardState::Leased { .. }));
        if !leased && self.progress.len() == 1 && self.progress.front().is_some_and(|&(_, n)| n == self.images_done()) {
            self.working = false;
        }
    }

    /// Notes that progress may have changed at `now`, and samples it if it changed and the last
    /// sample is [`PROGRESS_SAMPLE_MS`] old.
    fn record_progress(&mut self, now: u64) {
        self.last_touch = self.last_touch.max(now);
        if self.progress.back().is_some_and(|&(at, _)| now < at + PROGRESS_SAMPLE_MS) {
            return;
        }
        let done = self.images_done();
        if self.progress.back().is_some_and(|&(_, last)| last == done) {
            return;
        }
        self.progress.push_back((now, done));
        // Keep one sample at or before the window's start, the baseline the rate needs.
        while self.progress.len() > 2 && self.progress[1].0 + RATE_WINDOW_MS <= now {
            self.progress.pop_front();
        }
    }

    /// Images per second over the last [`RATE_WINDOW_MS`] (or since the run's first lease, if
    /// sooner: the wait for the first worker is no slowness of the job):
    /// (images now − images at the window's start) ÷ the window. `current` is
    /// [`JobRun::images_done`] now: what changed since the last sample counts as of
    /// `last_touch`.
    fn rate(&self, now: u64, current: u64) -> f64 {
        let (Some(&(origin, _)), Some(&(sampled, _))) = (self.progress.front(), self.progress.back()) else {
            return 0.0;
        };
        let end = self.persisted.finished_unix_ms.unwrap_or(now).max(origin);
        let start = end.saturating_sub(RATE_WINDOW_MS).max(origin);
        let at = |t: u64| {
            if self.last_touch > sampled && t >= self.last_touch {
                return current;
            }
            self.progress.iter().take_while(|(time, _)| *time <= t).last().map_or(0, |&(_, n)| n)
        };
        let seconds = (end - start) as f64 / 1000.0;
        if seconds <= 0.0 { 0.0 } else { at(end).saturating_sub(at(start)) as f64 / seconds }
    }
}

impl JobRun {
    fn state(&self) -> JobState {
        let p = &self.persisted;
        if p.cancelled {
            return JobState::Cancelled;
        }
        if p.paused.is_some() {
            return JobState::Paused;
        }
        let open = p.shards.iter().any(|s| matches!(s.state, ShardState::Pending | ShardState::Leased { .. }));
        if open {
            JobState::Running
        } else if p.shards.iter().any(|s| s.state == ShardState::Failed) {
            JobState::Failed
        } else {
            JobState::Succeeded
        }
    }

    fn images_done(&self) -> u64 {
        let ipc = self.job.spec.ipc as u64;
        self.persisted
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| match s.state {
                ShardState::Done { .. } => self.job.shard_classes(i).len() as u64 * ipc,
                // Each committed class holds IPC images, whatever attempt committed it.
                ShardState::Leased { .. } => (s.images_done as u64).max(s.classes_done as u64 * ipc),
                _ => s.classes_done as u64 * ipc,
            })
            .sum()
    }

    fn classes_done(&self) -> u64 {
        self.persisted
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| match s.state {
                ShardState::Done { .. } => self.job.shard_classes(i).len() as u64,
                // A failed or requeued shard keeps the classes it committed.
                _ => s.classes_done as u64,
            })
            .sum()
    }
}

/// Every held lease, by id and by worker, so that a poll finds its own worker's leases without
/// walking all of them (1,024 workers poll every heartbeat). Kept in step by `insert` and
/// `remove`, the only ways in and out.
#[derive(Debug, Default)]
struct Leases {
    /// lease id → (job id, shard index, worker id)
    by_id: HashMap<String, (String, usize, String)>,
    /// worker id → the ids of the leases it holds
    by_worker: HashMap<String, BTreeSet<String>>,
    /// lease id → its DiT progress as its heartbeats report it (not persisted: a restarted
    /// coordinator learns it again within seconds)
    steps: HashMap<String, StepRate>,
}

/// A lease's DiT progress from its heartbeats ([`Running::image_steps_done`]): an earlier
/// report and the latest, at most [`STEP_RATE_WINDOW_MS`] apart once the lease has run that
/// long, so that the rate is the recent one (a class that straggles after a normal one) and the
/// data stage before the first step does not dilute it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct StepRate {
    first_ms: u64,
    first: u64,
    last_ms: u64,
    last: u64,
}

/// Progress reports must span this long before a lease's rate is trusted (a heartbeat or two).
const STEP_RATE_MIN_MS: u64 = 1000;

/// The rate is measured over about this long, at most, before the latest report.
const STEP_RATE_WINDOW_MS: u64 = 10_000;

impl StepRate {
    /// Milliseconds from `now` until the lease has run `total` image-steps at its rate so far
    /// (LATE's estimate of the time left, Zaharia et al., OSDI 2008); `None` until two reports
    /// [`STEP_RATE_MIN_MS`] apart show progress. A lease that has reported no progress for
    /// longer than `stall_ms` (a read stalled before its next class) is rated up to `now`, so
    /// it looks slower with every heartbeat instead of about to finish.
    fn left_ms(&self, total: u64, now: u64, stall_ms: u64) -> Option<f64> {
        let span = self.last_ms.saturating_sub(self.first_ms);
        if span < STEP_RATE_MIN_MS || self.last <= self.first {
            return None;
        }
        let (done, silent) = ((self.last - self.first) as f64, now.saturating_sub(self.last_ms));
        let remaining = total.saturating_sub(self.last) as f64;
        Some(if silent > stall_ms {
            remaining / (done / (span + silent) as f64)
        } else {
            (remaining / (done / span as f64) - silent as f64).max(0.0)
        })
    }
}

impl Leases {
    /// Notes the image-steps a held lease (a shard's own or a backup) reported at `now`.
    fn note_steps(&mut self, lease_id: &str, steps: u64, now: u64) {
        if steps == 0 {
            return;
        }
        let rate = self.steps.entry(lease_id.to_owned()).or_insert(StepRate {
            first_ms: now,
            first: steps,
            last_ms: now,
            last: steps,
        });
        if steps > rate.last {
            if now.saturating_sub(rate.first_ms) > STEP_RATE_WINDOW_MS {
                (rate.first_ms, rate.first) = (rate.last_ms, rate.last);
            }
            (rate.last_ms, rate.last) = (now, steps);
        }
    }

    /// Records a shard's own lease (a new one, or a backup taking over: its progress stays).
    fn insert(&mut self, lease_id: String, job_id: String, shard: usize, worker_id: String) {
        self.by_worker.entry(worker_id.clone()).or_default().insert(lease_id.clone());
        if let Some((_, _, old)) = self.by_id.insert(lease_id.clone(), (job_id, shard, worker_id.clone()))
            && old != worker_id
        {
            self.unlink(&old, &lease_id);
        }
    }

    /// Drops a lease; its (job id, shard index) when it was held.
    fn remove(&mut self, lease_id: &str) -> Option<(String, usize)> {
        let (job, shard, worker) = self.by_id.remove(lease_id)?;
        self.steps.remove(lease_id);
        self.unlink(&worker, lease_id);
        Some((job, shard))
    }

    fn unlink(&mut self, worker_id: &str, lease_id: &str) {
        if let Some(held) = self.by_worker.get_mut(worker_id) {
            held.remove(lease_id);
            if held.is_empty() {
                self.by_worker.remove(worker_id);
            }
        }
    }

    fn get(&self, lease_id: &str) -> Option<(String, usize)> {
        self.by_id.get(lease_id).map(|(job, shard, _)| (job.clone(), *shard))
    }

    /// The ids of the leases `worker_id` holds.
    fn of_worker(&self, worker_id: &str) -> impl Iterator<Item = &String> {
        self.by_worker.get(worker_id).into_iter().flatten()
    }

    /// (lease id, job id, shard index) of every lease.
    fn iter(&self) -> impl Iterator<Item = (&String, &String, usize)> {
        self.by_id.iter().map(|(lease, (job, shard, _))| (lease, job, *shard))
    }

    /// Drops every lease of `job_id`.
    fn drop_job(&mut self, job_id: &str) {
        let gone: Vec<String> = self.iter().filter(|(_, job, _)| *job == job_id).map(|(l, _, _)| l.clone()).collect();
        for lease in gone {
            self.remove(&lease);
        }
    }
}

/// A second lease of a running shard (speculative execution, as MapReduce's backup tasks, Dean
/// & Ghemawat 2004, chosen as LATE does, Zaharia et al. 2008): granted to a worker that would
/// otherwise idle, when no shard waits and a fresh run of the shard's uncommitted classes would
/// end before the running one is estimated to (a slow node, a slow read; see [`BACKUP_AFTER`]).
/// A shard has at most [`MAX_BACKUPS`] at once. Whichever attempt commits a class first wins it
/// (markers are create-only), the first to complete finishes the shard and the others are
/// revoked at their next poll; when the shard's own lease fails, its first backup takes its
/// place. Not persisted: after a coordinator restart its worker is told to stop, and the
/// shard's own lease runs on.
#[derive(Clone, Debug)]
struct Backup {
    job: String,
    shard: usize,
    worker: String,
    attempt_id: String,
    deadline_ms: u64,
    started_ms: u64,
}

/// A shard whose lease has reported no DiT rate yet (still reading its data, or a worker that
/// does not count steps) gets a backup lease once it has run this many times as long as the
/// job's completed shards took for its cost; with a rate, the estimate of its time left decides
/// (from the DiT image-steps its heartbeats report). Lower than Spark's
/// `spark.speculation.multiplier` (1.5) on purpose: a backup only ever runs on a GPU that has
/// nothing else to do. Simulated on ImageNet-21K × 1,024 GPUs
/// with 2 % of class runs taking 3× (README "Scale"), by elapsed time alone: makespan ÷ ideal
/// 1.156 without backups, 1.099 at 1.25, 1.074 at 0.5, with 1.5 % of the GPU time on losing
/// duplicates; the rate estimate kept the makespan (1.087 both ways, mean of seeds 1–5) and
/// cut the GPU time of losing duplicates from 2,803 to 965 GPU-s (seed 1).
pub const BACKUP_AFTER: f64 = 0.5;

/// Backup leases a shard may have at once: a second when the first straggles as well, or as
/// insurance while the first has no rate yet — at the job's end, where backups run, a backup
/// that straggles too was seen only heartbeats after it began and set the end. Simulated on
/// ImageNet-21K × 1,024 GPUs with 2 % of class runs taking 3× (README "Scale"), means of seeds
/// 1–6: makespan ÷ ideal 1.071 → 1.063, and with 5 % preempted every 30 min 1.096 → 1.084.
pub const MAX_BACKUPS: usize = 2;

/// Completed shards a job needs before its pace is trusted for backups.
pub const BACKUP_MIN_COMPLETED: u64 = 3;

/// Drops `lease_id` from the backups of `key` (job, shard), and the entry once it has none.
fn unlink_backup(backed_up: &mut HashMap<(String, usize), Vec<String>>, key: (String, usize), lease_id: &str) {
    if let Some(leases) = backed_up.get_mut(&key) {
        leases.retain(|l| l != lease_id);
        if leases.is_empty() {
            backed_up.remove(&key);
        }
    }
}

/// A granted lease.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseGrant {
    /// The lease's id, `<epoch>-<n>`.
    pub lease_id: String,
    /// The attempt's id, `s<shard>-a<attempt>-<lease id>`.
    pub attempt_id: String,
    /// The job the shard belongs to.
    pub job: Arc<ResolvedJob>,
    /// The shard's position in the job's plan.
    pub shard_index: usize,
    /// Which attempt of the shard this is (1 for the first).
    pub attempt: u32,
    /// When the lease expires unless renewed (Unix ms).
    pub deadline_ms: u64,
    /// The shard's classes, in plan order.
    pub classes: Vec<ClassRef>,
    /// A backup lease of a shard that another worker runs (see [`BACKUP_AFTER`]).
    pub backup: bool,
    /// How long the lease lives without renewal, ms ([`lease_timeout_ms`]).
    pub timeout_ms: u64,
}

/// What a poll tells the worker.
#[derive(Clone, Debug, PartialEq)]
pub enum PollDecision {
    /// Run this shard.
    Lease(LeaseGrant),
    /// Nothing to do now: poll again after this many milliseconds (the heartbeat).
    Wait(u64),
    /// Nothing more to do: the worker should exit.
    Drain,
}

/// A worker arriving or leaving, as a person watching the coordinator's log cares about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerEvent {
    /// The worker is gone.
    Left {
        /// Its id.
        worker_id: String,
        /// Why the coordinator counts it gone.
        reason: LeftReason,
    },
    /// A worker counted gone polled again (it was paused or partitioned, not dead).
    Returned {
        /// Its id.
        worker_id: String,
    },
    /// Leases expired on the worker [`SET_ASIDE_AFTER`] or more times in a row (it takes work and
    /// dies before reporting: a crash loop): it gets no lease until `until_ms`.
    SetAside {
        /// Its id.
        worker_id: String,
        /// Leases that expired on it in a row.
        expired_in_a_row: u32,
        /// When it may lease again (Unix ms).
        until_ms: u64,
    },
}

/// A shard lease that expired: its worker stopped renewing it (died, was cut off or hung), and
/// the shard went back to the queue, or failed when out of attempts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiredLease {
    /// The job.
    pub job_id: String,
    /// The shard's position in the job's plan.
    pub shard: usize,
    /// The lease.
    pub lease_id: String,
    /// The worker that held it.
    pub worker_id: String,
    /// Whether the shard waits for another attempt (else it failed, out of attempts).
    pub requeued: bool,
    /// The worker's process was known to have exited ([`Scheduler::worker_gone`]): the lease
    /// was given up, not left to time out.
    pub exited: bool,
    /// The lease was recovered at a coordinator start and its worker never renewed it within
    /// [`restored_lease_grace_ms`]: released (no attempt spent), not expired.
    pub orphaned: bool,
}

/// Fewest milliseconds a lease recovered from the job's state at a coordinator start waits for
/// its worker: a live worker that lost its coordinator retries every 10 s at most and renews at
/// its next poll.
pub const RESTORED_LEASE_GRACE_MS: u64 = 30_000;

/// How long a lease of a job with `lease_timeout_s` lives without renewal under a coordinator of
/// heartbeat `heartbeat_ms`: the job's timeout, but never less than two heartbeats (a worker
/// renews once a heartbeat; one late poll must not lose its lease). Submit refuses a shorter
/// timeout; a job recorded under a faster coordinator and recovered by a slower one gets this.
pub fn lease_timeout_ms(lease_timeout_s: u64, heartbeat_ms: u64) -> u64 {
    lease_timeout_s.saturating_mul(1000).max(2 * heartbeat_ms)
}

/// How long a lease recovered at a coordinator start waits for its worker to renew it before it
/// is released: [`RESTORED_LEASE_GRACE_MS`] or three heartbeats, whichever is longer, and never
/// more than the job's lease timeout. Not the whole timeout: after a requeued allocation's
/// restart its workers died with the old coordinator, and a short allocation that waited
/// out every recovered lease would end before it ran anything (requeued again and again).
pub fn restored_lease_grace_ms(heartbeat_ms: u64, lease_timeout_ms: u64) -> u64 {
    RESTORED_LEASE_GRACE_MS.max(3 * heartbeat_ms).min(lease_timeout_ms)
}

/// Leases that expire on one worker in a row before it is set aside (see
/// [`WorkerEvent::SetAside`]).
pub const SET_ASIDE_AFTER: u32 = 2;

/// How long a worker is set aside the first time; each further expiry in a row doubles it, up
/// to [`SET_ASIDE_MAX_MS`]. Long enough for a crash loop to stop costing shards, short enough
/// that a worker whose fault was passing (a full node-local disk cleaned up) comes back.
pub const SET_ASIDE_MS: u64 = 5 * 60 * 1000;

/// The longest a worker is set aside at a time.
pub const SET_ASIDE_MAX_MS: u64 = 60 * 60 * 1000;

/// Why a worker is counted gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeftReason {
    /// It was told to exit: nothing left to do (`serve --drain-when-done`), or the coordinator
    /// drains.
    Drained,
    /// It said it is stopping (SIGTERM, Ctrl-C: a poll with `draining` set) and was told to exit.
    Stopped,
    /// It has not polled for `silent_ms` (> three heartbeats): it died, was preempted, or lost
    /// the network. Its leases expire and their shards are requeued.
    Silent {
        /// Milliseconds since its last poll.
        silent_ms: u64,
    },
    /// Its process exited, as the one that started it saw ([`Scheduler::worker_gone`]): its
    /// leases were given up at once.
    Exited,
}

/// A running lease as the worker reports it (one type with the wire's, see `common::lease`).
pub use mgd3_common::lease::RunningLease as Running;

/// Counts for status output.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSummary {
    /// The job.
    pub job: Arc<ResolvedJob>,
    /// Where the job stands.
    pub state: JobState,
    /// Shards done.
    pub done: u32,
    /// Shards leased.
    pub running: u32,
    /// Shards pending.
    pub pending: u32,
    /// Shards failed.
    pub failed: u32,
    /// Images committed (done shards in full, leased shards as reported).
    pub images_done: u64,
    /// Classes committed (done shards in full, leased shards as reported).
    pub classes_done: u64,
    /// Images per second since this process took the job on (or since its last resume).
    pub images_per_second: f64,
    /// Seconds left at that rate: 0 once the job has ended, infinite while the rate is 0 or no
    /// worker is live.
    pub eta_seconds: f64,
    /// (shard index, shard) of every failed shard and of every unfinished shard with an error.
    pub failures: Vec<(usize, Shard)>,
    /// When the job reached a final state (Unix ms).
    pub finished_unix_ms: Option<u64>,
    /// When this process took the job on (submitted, recovered or resumed), Unix ms.
    pub run_started_ms: u64,
    /// Every shard, in plan order.
    pub shards: Vec<ShardStatus>,
    /// Why the job is paused, while it is.
    pub paused: Option<String>,
}

/// Events the caller acts on (persisting state, writing the manifest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled {
    /// The job is still running.
    Open,
    /// The job just reached a final state.
    Finished(JobState),
}

/// The lease state of every job: which shard is pending, leased or done, and who holds what.
/// Pure and clock-free: every call takes `now` (Unix ms); the caller persists [`PersistedJob`]s.
pub struct Scheduler {
    jobs: BTreeMap<String, JobRun>,
    /// Job ids in submission order (lease priority).
    order: Vec<String>,
    /// Every held lease (a shard's own; backups are apart).
    leases: Leases,
    /// Backup leases by lease id, and the backup leases of each (job, shard) that has any, in
    /// the order they were granted.
    backups: HashMap<String, Backup>,
    /// Workers whose process is known to have exited ([`Scheduler::worker_gone`]) and that have
    /// not registered since: their leases' expiry says so.
    exited: HashSet<String>,
    backed_up: HashMap<(String, usize), Vec<String>>,
    /// No lease expires before this (Unix ms): a lower bound of every deadline, lowered whenever
    /// one is set and raised to the earliest at each full scan, so that the expiry check every
    /// poll makes is one comparison until a lease can actually have expired.
    next_expiry: u64,
    workers: HashMap<String, u64>,
    /// The DiT rows per call each worker reported at registration (absent: it did not say).
    dit_rows: HashMap<String, usize>,
    /// The process behind each worker id.
    processes: HashMap<String, WorkerProcess>,
    /// Workers announced as gone (drained, or silent for three heartbeats), until they poll or
    /// register again.
    gone: HashMap<String, LeftReason>,
    /// Shard leases expired since the last [`Scheduler::take_expired`].
    expired: Vec<ExpiredLease>,
    /// Comings and goings since the last [`Scheduler::take_worker_events`].
    worker_events: Vec<WorkerEvent>,
    /// Leases expired on each worker since it last renewed or completed one.
    expiry_streak: HashMap<String, u32>,
    /// Workers set aside after a run of expiries, until the time given (Unix ms).
    set_aside: HashMap<String, u64>,
    heartbeat_ms: u64,
    draining: bool,
    /// Drain idle workers whenever every job has ended (`serve --drain-when-done`).
    drain_when_done: bool,
    next_lease: u64,
    /// Distinguishes lease ids across coordinator restarts.
    epoch: String,
    /// Jobs whose state changed inside a `poll` (expired or forgotten leases), for the caller to
    /// persist and to finish: see [`Scheduler::take_settled`].
    settled: Vec<(String, Settled)>,
    /// The classes (positions in the class list, shared by jobs of one [`share_key`]) of the
    /// last shard each worker was granted of a job with shared latents, with that key.
    held: HashMap<String, (String, std::ops::Range<usize>)>,
    /// Leases whose completion the caller is verifying (lease id → worker id, completions of it
    /// in flight): they do not expire, and their worker is not silent, while the coordinator
    /// itself is the one taking the time (reading markers through a slow or failing store).
    completing: HashMap<String, (String, u32)>,
    /// Whether polls may grant leases (see [`Scheduler::set_granting`]).
    granting: bool,
    /// Jobs none of whose work is granted for now (see [`Scheduler::hold_back`]).
    held_back: HashSet<String>,
    /// The only jobs whose work is granted, when set (see [`Scheduler::run_only`]).
    only: Option<HashSet<String>>,
    /// The last [`RECENTLY_COMPLETED`] leases completed (lease id → worker id), oldest first in
    /// `completed_order`: a worker that sends its completion again (its first call timed out
    /// while the coordinator read the markers, and was recorded all the same) is told it was.
    completed: HashMap<String, String>,
    completed_order: VecDeque<String>,
    /// Leases (a shard's own and backups) that a cancel or a pause took back, until their
    /// worker's last word on them ([`Scheduler::note_committed`]): lease id → (job, shard,
    /// worker). A worker hears of it at its next poll, and a class it committed before then is
    /// committed; what it reports is counted, so that `status` does not undercount.
    revoked: HashMap<String, (String, usize, String)>,
    /// Leases recovered from a job's state at this coordinator's start and not renewed since:
    /// they wait [`restored_lease_grace_ms`] for their worker, then are released.
    restored: HashSet<String>,
}

/// How many completed leases the scheduler remembers for repeated completions: more than a
/// cluster's workers can have in flight at once.
const RECENTLY_COMPLETED: usize = 65_536;

impl Scheduler {
    /// An empty scheduler. Workers poll every `heartbeat_ms` (ms); `epoch` prefixes lease ids so that
    /// they differ across coordinator restarts.
    pub fn new(heartbeat_ms: u64, epoch: impl Into<String>) -> Self {
        Scheduler {
            jobs: BTreeMap::new(),
            order: Vec::new(),
            leases: Leases::default(),
            backups: HashMap::new(),
            exited: HashSet::new(),
            backed_up: HashMap::new(),
            next_expiry: 0,
            workers: HashMap::new(),
            dit_rows: HashMap::new(),
            processes: HashMap::new(),
            gone: HashMap::new(),
            worker_events: Vec::new(),
            expired: Vec::new(),
            expiry_streak: HashMap::new(),
            set_aside: HashMap::new(),
            heartbeat_ms,
            draining: false,
            drain_when_done: false,
            next_lease: 0,
            epoch: epoch.into(),
            settled: Vec::new(),
            held: HashMap::new(),
            completing: HashMap::new(),
            granting: true,
            held_back: HashSet::new(),
            only: None,
            completed: HashMap::new(),
            completed_order: VecDeque::new(),
            revoked: HashMap::new(),
            restored: HashSet::new(),
        }
    }

    /// Holds job `job_id` back (`held`), or lets it go again: while held back none of its
    /// shards (nor backups) is granted; leases already held run on and are renewed. For a job
    /// whose output this coordinator has not claimed (yet, or any more: another coordinator may
    /// run it). Returns whether that changed anything.
    pub fn hold_back(&mut self, job_id: &str, held: bool) -> bool {
        if held { self.held_back.insert(job_id.to_owned()) } else { self.held_back.remove(job_id) }
    }

    /// Grants work of `jobs` only (`None`: of every job): `coordinator run` runs the job (or
    /// sweep) it was given, not the unfinished jobs it recovered from the store beside it, which
    /// keep their state for whoever runs them. Leases already held run on.
    pub fn run_only(&mut self, jobs: Option<HashSet<String>>) {
        self.only = jobs;
    }

    /// Whether [`Scheduler::run_only`]'s set `only` leaves `job_id` out (a free function: the
    /// grant loop holds a job mutably while it asks).
    fn left_out(only: &Option<HashSet<String>>, job_id: &str) -> bool {
        only.as_ref().is_some_and(|only| !only.contains(job_id))
    }

    /// Whether polls grant leases (and backup leases): off while the caller is not sure it still
    /// holds the store, when a lease granted could be another coordinator's shard too. Polls
    /// still renew, release and expire leases; an idle worker is told to wait.
    pub fn set_granting(&mut self, granting: bool) {
        self.granting = granting;
    }

    /// The poll interval workers are told (ms).
    pub fn heartbeat_ms(&self) -> u64 {
        self.heartbeat_ms
    }

    /// From now on idle workers are told to drain (exit).
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// From now on idle workers are told to drain whenever at least one job is known and none is
    /// running (a new submission stops the draining again). Used by launchers that start a
    /// coordinator for one job (`distill.sbatch`): its workers exit once the job has ended, also
    /// when the job had already ended before they connected.
    pub fn drain_when_done(&mut self) {
        self.drain_when_done = true;
    }

    /// True when at least one job is known and every job has ended.
    fn all_done(&self) -> bool {
        !self.jobs.is_empty() && self.jobs.values().all(|run| run.state() != JobState::Running)
    }

    /// Adds a job (new, or recovered with its persisted state). `committed` are the shards whose
    /// every class has a commit marker: they are done whatever the state file says.
    pub fn add_job(
        &mut self,
        job: Arc<ResolvedJob>,
        persisted: Option<PersistedJob>,
        committed: &HashSet<usize>,
        now: u64,
    ) {
        let shards = job.shards.len();
        let recovered = persisted.is_some();
        // A job submitted here (not recovered) is run here, whatever `run_only` says.
        if !recovered && let Some(only) = &mut self.only {
            only.insert(job.job_id.clone());
        }
        let grace =
            restored_lease_grace_ms(self.heartbeat_ms, lease_timeout_ms(job.spec.lease_timeout_s, self.heartbeat_ms));
        let mut persisted = persisted
            .filter(|p| p.shards.len() == shards)
            .unwrap_or_else(|| PersistedJob { shards: vec![Shard::pending(); shards], ..Default::default() });
        persisted.fingerprint = job.fingerprint.clone();
        let mut pending = Queue::new(&job);
        for (i, shard) in persisted.shards.iter_mut().enumerate() {
            if committed.contains(&i) {
                if !matches!(shard.state, ShardState::Done { .. }) {
                    shard.state = ShardState::Done { attempt_id: "recovered".into(), finished_ms: now };
                }
                continue;
            }
            match &mut shard.state {
                ShardState::Done { .. } => {
                    shard.state = ShardState::Pending;
                    pending.insert(i);
                }
                ShardState::Pending => {
                    pending.insert(i);
                }
                ShardState::Leased { lease_id, deadline_ms, worker_id, .. } => {
                    // After a restart the holder gets a grace period to come back and renew.
                    if recovered {
                        *deadline_ms = now + grace;
                        self.restored.insert(lease_id.clone());
                    }
                    self.next_expiry = self.next_expiry.min(*deadline_ms);
                    self.leases.insert(lease_id.clone(), job.job_id.clone(), i, worker_id.clone());
                }
                ShardState::Failed => {}
            }
        }
        if persisted.cancelled || persisted.paused.is_some() {
            pending.clear();
        }
        let id = job.job_id.clone();
        let mut run = JobRun {
            job,
            persisted,
            pending,
            progress: VecDeque::new(),
            last_touch: now,
            taken_on: now,
            working: false,
            expired_on: HashMap::new(),
            pace: (0, 0, 0),
            share: None,
        };
        run.share = share_key(&run.job);
        run.restart_progress(now);
        if !self.jobs.contains_key(&id) {
            self.order.push(id.clone());
        }
        self.jobs.insert(id, run);
    }

    /// Makes a done shard pending again: one of its classes lost its commit marker after the shard
    /// was done (removed by hand), so it is distilled again; the job runs again until it is.
    /// Returns whether the shard was done.
    pub fn reopen(&mut self, job_id: &str, shard: usize) -> bool {
        let Some(run) = self.jobs.get_mut(job_id) else { return false };
        let Some(entry) = run.persisted.shards.get_mut(shard) else { return false };
        if !matches!(entry.state, ShardState::Done { .. }) {
            return false;
        }
        entry.state = ShardState::Pending;
        entry.classes_done = 0;
        entry.images_done = 0;
        run.persisted.finished_unix_ms = None;
        if !run.persisted.cancelled && run.persisted.paused.is_none() {
            run.pending.insert(shard);
        }
        true
    }

    /// Drops a job and its leases (its workers are told to stop them on their next poll, as for
    /// any lease that is no longer held). Returns whether it was known.
    pub fn forget_job(&mut self, job_id: &str) -> bool {
        if self.jobs.remove(job_id).is_none() {
            return false;
        }
        self.order.retain(|id| id != job_id);
        self.leases.drop_job(job_id);
        self.drop_backups(job_id, None);
        self.revoked.retain(|_, (job, _, _)| job != job_id);
        self.held_back.remove(job_id);
        true
    }

    /// Whether `job_id` is known.
    pub fn has_job(&self, job_id: &str) -> bool {
        self.jobs.contains_key(job_id)
    }

    /// Every known job id, in submission order (which is lease priority).
    pub fn job_ids(&self) -> Vec<String> {
        self.order.clone()
    }

    /// The persisted state of a job, to write to its `state.json`.
    pub fn persisted(&self, job_id: &str) -> Option<&PersistedJob> {
        self.jobs.get(job_id).map(|j| &j.persisted)
    }

    /// The resolved job, when known.
    pub fn job(&self, job_id: &str) -> Option<Arc<ResolvedJob>> {
        self.jobs.get(job_id).map(|j| j.job.clone())
    }

    /// Replaces a known job's record with `job` (the same id, shards and fingerprint; other
    /// recorded class data, after `--accept-data-changes`): leases given from now on carry it.
    /// Returns false for an unknown job.
    pub fn replace_record(&mut self, job: Arc<ResolvedJob>) -> bool {
        match self.jobs.get_mut(&job.job_id) {
            Some(run) => {
                debug_assert_eq!(run.job.shards, job.shards, "a record keeps its shard plan");
                run.job = job;
                true
            }
            None => false,
        }
    }

    /// Where a job stands, when known.
    pub fn state(&self, job_id: &str) -> Option<JobState> {
        self.jobs.get(job_id).map(JobRun::state)
    }

    /// Workers seen in the last three heartbeats, less those gone (stopping, told to exit).
    pub fn live_workers(&self, now: u64) -> usize {
        self.workers.keys().filter(|id| self.is_live(id, now)).count()
    }

    /// Seen in the last three heartbeats and not gone: a worker that said it is stopping, or was
    /// told to exit, no longer counts from that poll on.
    fn is_live(&self, worker_id: &str, now: u64) -> bool {
        let heard = self.workers.get(worker_id).is_some_and(|seen| now.saturating_sub(*seen) <= 3 * self.heartbeat_ms);
        // A worker waiting for its completion's answer sends no heartbeat, and is there.
        let reporting = || self.completing.values().any(|(worker, _)| worker == worker_id);
        (heard || (self.workers.contains_key(worker_id) && reporting())) && !self.gone.contains_key(worker_id)
    }

    /// (worker id, DiT rows) of the workers seen in the last three heartbeats that reported
    /// their rows, in worker-id order.
    pub fn live_worker_rows(&self, now: u64) -> Vec<(String, usize)> {
        let mut rows: Vec<(String, usize)> = self
            .dit_rows
            .iter()
            .filter(|(worker, _)| self.is_live(worker, now))
            .map(|(worker, rows)| (worker.clone(), *rows))
            .collect();
        rows.sort();
        rows
    }

    /// Workers seen in the last three heartbeats that `job_id` has excluded, or that are set
    /// aside (from every job) now.
    pub fn live_workers_excluded(&self, job_id: &str, now: u64) -> usize {
        let Some(run) = self.jobs.get(job_id) else { return 0 };
        let aside = |id: &str| self.set_aside.get(id).is_some_and(|until| *until > now);
        self.workers
            .keys()
            .filter(|id| self.is_live(id, now) && (run.persisted.excluded_workers.contains(*id) || aside(id)))
            .count()
    }

    /// Claims `worker_id` for `process` before it registers: refused while another process holds
    /// the id and is live (heard from within three heartbeats and not drained); the same process
    /// registering again (after a coordinator restart), a process taking over the id of one that
    /// went silent, and workers without an instance id are accepted.
    ///
    /// # Errors
    /// [`SchedulerError::WorkerIdInUse`], naming both processes.
    pub fn claim(&mut self, worker_id: &str, process: WorkerProcess, now: u64) -> Result<(), SchedulerError> {
        if process.instance.is_empty() {
            return Ok(());
        }
        if let Some(live) = self.processes.get(worker_id)
            && live.instance != process.instance
            && !self.gone.contains_key(worker_id)
            && self.workers.get(worker_id).is_some_and(|seen| now.saturating_sub(*seen) <= 3 * self.heartbeat_ms)
        {
            return Err(SchedulerError::WorkerIdInUse {
                worker_id: worker_id.to_owned(),
                live: Box::new(live.clone()),
                new: Box::new(process),
            });
        }
        self.processes.insert(worker_id.to_owned(), process);
        Ok(())
    }

    /// Whether `process` is the one holding `worker_id` (a process without an instance id, or an
    /// id nobody claimed, passes): a process that was silent long enough for another to take its
    /// id over, and then polls again, is refused rather than running the same shards as the new
    /// holder.
    ///
    /// # Errors
    /// [`SchedulerError::WorkerIdInUse`], naming the holder and the refused process.
    pub fn holds(&self, worker_id: &str, process: &WorkerProcess) -> Result<(), SchedulerError> {
        match self.processes.get(worker_id) {
            Some(holder) if !process.instance.is_empty() && holder.instance != process.instance => {
                Err(SchedulerError::WorkerIdInUse {
                    worker_id: worker_id.to_owned(),
                    live: Box::new(holder.clone()),
                    new: Box::new(process.clone()),
                })
            }
            _ => Ok(()),
        }
    }

    /// Registers a worker (idempotent) and records it as seen at `now`.
    pub fn register(&mut self, worker_id: &str, now: u64) {
        self.workers.insert(worker_id.to_owned(), now);
        self.gone.remove(worker_id);
        self.exited.remove(worker_id);
    }

    /// Records the DiT rows per call a registered worker reported (its batch policy, at
    /// registration or with a poll); whether they differ from what it reported before.
    pub fn report_dit_rows(&mut self, worker_id: &str, dit_rows: usize) -> bool {
        self.dit_rows.insert(worker_id.to_owned(), dit_rows) != Some(dit_rows)
    }

    /// What a job submitted now sizes its shards for: the largest DiT rows reported by the
    /// workers that are registered and not gone, or the default when none reported.
    pub fn planned_rows(&self) -> mgd3_common::batch::PlannedRows {
        mgd3_common::batch::PlannedRows::from_reports(
            self.dit_rows
                .iter()
                .filter(|(id, _)| self.workers.contains_key(*id) && !self.gone.contains_key(*id))
                .map(|(_, rows)| *rows),
        )
    }

    /// Announces the workers that have been silent for more than three heartbeats at `now` (each
    /// once, until it is heard from again): see [`Scheduler::take_worker_events`].
    pub fn note_departures(&mut self, now: u64) {
        let limit = 3 * self.heartbeat_ms;
        // A worker waiting for its completion to be verified is talking to us, not silent.
        let reporting = self.reporting();
        let mut silent: Vec<(&String, u64)> = self
            .workers
            .iter()
            .filter(|(id, seen)| {
                now.saturating_sub(**seen) > limit && !self.gone.contains_key(*id) && !reporting.contains(id)
            })
            .map(|(id, seen)| (id, now - seen))
            .collect();
        silent.sort();
        for (worker_id, silent_ms) in silent {
            self.gone.insert(worker_id.clone(), LeftReason::Silent { silent_ms });
            self.worker_events
                .push(WorkerEvent::Left { worker_id: worker_id.clone(), reason: LeftReason::Silent { silent_ms } });
        }
    }

    /// Workers that left or came back since the last call, in order, for the caller to log.
    pub fn take_worker_events(&mut self) -> Vec<WorkerEvent> {
        std::mem::take(&mut self.worker_events)
    }

    /// Shard leases that expired since the last call (at a tick or inside a poll), in order, for
    /// the caller to log.
    pub fn take_expired(&mut self) -> Vec<ExpiredLease> {
        std::mem::take(&mut self.expired)
    }

    /// Heartbeat, renewal and work request. Returns the decision and the reported leases that are
    /// no longer valid (the worker must stop them).
    ///
    /// Only registered workers poll, and the scheduler's own record of a worker's leases is the
    /// truth: a lease it holds but no longer reports (it restarted, or never received the grant)
    /// is released at once without spending an attempt, so a worker is never granted a second
    /// shard while the first is still leased to it.
    ///
    /// # Errors
    /// [`SchedulerError::UnknownWorker`] when `worker_id` has not registered with this scheduler.
    pub fn poll(
        &mut self,
        worker_id: &str,
        running: &[Running],
        draining: bool,
        now: u64,
    ) -> Result<(PollDecision, Vec<String>), SchedulerError> {
        let Some(seen) = self.workers.get_mut(worker_id) else {
            return Err(SchedulerError::UnknownWorker(worker_id.to_owned()));
        };
        *seen = now;
        // A silent worker that polls is back; a drained one is back only if it is not told to
        // exit again (a new job arrived).
        let was_gone = self.gone.remove(worker_id);
        if matches!(was_gone, Some(LeftReason::Silent { .. } | LeftReason::Exited)) {
            self.worker_events.push(WorkerEvent::Returned { worker_id: worker_id.to_owned() });
        }
        let expired = self.expire(now);
        self.settled.extend(expired);
        let forgotten = self.release_forgotten(worker_id, running, now);
        self.settled.extend(forgotten);
        let mut revoked = Vec::new();
        let mut holds = false;
        for r in running {
            match self.renew(worker_id, r, now) {
                true => holds = true,
                false => {
                    // Classes committed before the worker heard of a cancel or a pause.
                    if let Some((job, shard, worker)) = self.revoked.get(&r.lease_id)
                        && worker == worker_id
                    {
                        let (job, shard) = (job.clone(), *shard);
                        if self.note_markers(&job, shard, r.classes_done) {
                            self.settled.push((job, Settled::Open));
                        }
                    }
                    revoked.push(r.lease_id.clone());
                }
            }
        }
        if holds {
            return Ok((PollDecision::Wait(self.heartbeat_ms), revoked));
        }
        if draining || self.draining || (self.drain_when_done && self.all_done()) {
            let reason = if draining { LeftReason::Stopped } else { LeftReason::Drained };
            self.gone.insert(worker_id.to_owned(), reason);
            if was_gone != Some(reason) {
                self.worker_events.push(WorkerEvent::Left { worker_id: worker_id.to_owned(), reason });
            }
            return Ok((PollDecision::Drain, revoked));
        }
        if matches!(was_gone, Some(LeftReason::Drained | LeftReason::Stopped)) {
            self.worker_events.push(WorkerEvent::Returned { worker_id: worker_id.to_owned() });
        }
        if !self.granting {
            return Ok((PollDecision::Wait(self.heartbeat_ms), revoked));
        }
        Ok(match self.grant(worker_id, now) {
            Some(grant) => (PollDecision::Lease(grant), revoked),
            None => (PollDecision::Wait(self.heartbeat_ms), revoked),
        })
    }

    /// The jobs whose state changed during `poll`s since the last call (leases that expired or
    /// that their worker forgot): the caller persists them and finishes those that ended.
    pub fn take_settled(&mut self) -> Vec<(String, Settled)> {
        std::mem::take(&mut self.settled)
    }

    /// Releases (without spending an attempt) the leases held by `worker_id` that it does not
    /// report as running. Returns the jobs whose state changed.
    fn release_forgotten(&mut self, worker_id: &str, running: &[Running], now: u64) -> Vec<(String, Settled)> {
        let forgotten: Vec<String> = self
            .leases
            .of_worker(worker_id)
            .filter(|lease| !running.iter().any(|r| &r.lease_id == *lease))
            .cloned()
            .collect();
        let stale: Vec<String> = self
            .backups
            .iter()
            .filter(|(lease, b)| b.worker == worker_id && !running.iter().any(|r| &r.lease_id == *lease))
            .map(|(lease, _)| lease.clone())
            .collect();
        for lease in stale {
            self.remove_backup(&lease);
        }
        forgotten
            .into_iter()
            .filter_map(|lease| {
                let (job, shard) = self.leases.remove(&lease)?;
                let error = format!("worker `{worker_id}` no longer runs lease `{lease}`");
                Some((job.clone(), self.requeue_or_fail(&job, shard, None, error, true, true, now)))
            })
            .collect()
    }

    fn renew(&mut self, worker_id: &str, running: &Running, now: u64) -> bool {
        if let Some(backup) = self.backups.get_mut(&running.lease_id) {
            let Some(run) = self.jobs.get(&backup.job) else { return false };
            if backup.worker != worker_id {
                return false;
            }
            backup.deadline_ms = now + lease_timeout_ms(run.job.spec.lease_timeout_s, self.heartbeat_ms);
            self.next_expiry = self.next_expiry.min(backup.deadline_ms);
            self.leases.note_steps(&running.lease_id, running.image_steps_done, now);
            return true;
        }
        let Some((job_id, shard)) = self.leases.get(&running.lease_id) else {
            return false;
        };
        let Some(run) = self.jobs.get_mut(&job_id) else {
            return false;
        };
        let timeout = lease_timeout_ms(run.job.spec.lease_timeout_s, self.heartbeat_ms);
        let entry = &mut run.persisted.shards[shard];
        match &mut entry.state {
            ShardState::Leased { worker_id: owner, deadline_ms, .. } if owner == worker_id => {
                *deadline_ms = now + timeout;
                self.next_expiry = self.next_expiry.min(*deadline_ms);
                entry.images_done = running.images_done;
                entry.classes_done = entry.classes_done.max(running.classes_done);
                run.record_progress(now);
                self.leases.note_steps(&running.lease_id, running.image_steps_done, now);
                self.restored.remove(&running.lease_id);
                // Renewing proves the worker runs its shards: no crash loop.
                run.expired_on.remove(&shard);
                self.expiry_streak.remove(worker_id);
                self.set_aside.remove(worker_id);
                true
            }
            _ => false,
        }
    }

    fn grant(&mut self, worker_id: &str, now: u64) -> Option<LeaseGrant> {
        if self.set_aside.get(worker_id).is_some_and(|until| *until > now) {
            return None;
        }
        for job_id in &self.order {
            let run = self.jobs.get_mut(job_id).expect("ordered jobs exist");
            if run.persisted.cancelled
                || run.persisted.paused.is_some()
                || run.persisted.excluded_workers.contains(worker_id)
                || self.held_back.contains(job_id)
                || Self::left_out(&self.only, job_id)
            {
                continue;
            }
            let Some(shard) = self.pick_shard(job_id, worker_id) else {
                continue;
            };
            let run = self.jobs.get_mut(job_id).expect("ordered jobs exist");
            run.pending.remove(&shard);
            if let Some(share) = &run.share {
                let (from, to) = run.job.shards[shard];
                self.held.insert(worker_id.to_owned(), (share.clone(), from..to));
            }
            self.next_lease += 1;
            if !run.working {
                run.working = true;
                // Nothing was done before the first lease: the rate starts here.
                if let [baseline] = run.progress.make_contiguous() {
                    baseline.0 = baseline.0.max(now);
                }
            }
            let entry = &mut run.persisted.shards[shard];
            entry.attempts += 1;
            entry.reset_progress();
            let lease_id = format!("{}-{}", self.epoch, self.next_lease);
            let attempt_id = format!("s{shard}-a{}-{lease_id}", entry.attempts);
            let deadline_ms = now + lease_timeout_ms(run.job.spec.lease_timeout_s, self.heartbeat_ms);
            entry.state = ShardState::Leased {
                lease_id: lease_id.clone(),
                attempt_id: attempt_id.clone(),
                worker_id: worker_id.to_owned(),
                deadline_ms,
                started_ms: now,
            };
            self.next_expiry = self.next_expiry.min(deadline_ms);
            self.leases.insert(lease_id.clone(), job_id.clone(), shard, worker_id.to_owned());
            return Some(LeaseGrant {
                lease_id,
                attempt_id,
                job: run.job.clone(),
                shard_index: shard,
                attempt: entry.attempts,
                deadline_ms,
                classes: run.job.shard_classes(shard).to_vec(),
                backup: false,
                timeout_ms: lease_timeout_ms(run.job.spec.lease_timeout_s, self.heartbeat_ms),
            });
        }
        self.grant_backup(worker_id, now)
    }

    /// The pending shard of `job_id` to grant `worker_id`: the costliest, except for a job whose
    /// latents other jobs share (a sweep's variants, [`share_key`]): then first a shard over the
    /// classes this worker ran last for one of those jobs (their latents and modes are fresh in
    /// its caches), else the costliest whose classes no such job is running now (their latents
    /// are being made: waiting for the cache beats encoding them twice), else the costliest.
    fn pick_shard(&self, job_id: &str, worker_id: &str) -> Option<usize> {
        let run = &self.jobs[job_id];
        let first = run.pending.first()?;
        let Some(share) = &run.share else { return Some(first) };
        let shards = &run.job.shards;
        if let Some((held, range)) = self.held.get(worker_id)
            && held == share
        {
            let from = shards.partition_point(|&(_, to)| to <= range.start);
            let near = (from..shards.len()).take_while(|&i| shards[i].0 < range.end).find(|&i| run.pending.contains(i));
            if near.is_some() {
                return near;
            }
        }
        let running: Vec<(usize, usize)> = self
            .leases
            .iter()
            .filter(|(_, job, _)| job.as_str() != job_id)
            .filter_map(|(_, job, shard)| {
                let other = self.jobs.get(job)?;
                (other.share.as_ref() == Some(share)).then(|| other.job.shards[shard])
            })
            .collect();
        if running.is_empty() {
            return Some(first);
        }
        let clear = |i: usize| running.iter().all(|&(from, to)| to <= shards[i].0 || shards[i].1 <= from);
        run.pending.iter().take(SHARE_LOOKAHEAD).find(|&i| clear(i)).or(Some(first))
    }

    /// A backup lease for `worker_id` of the running shard estimated to end last, when a fresh
    /// run of its uncommitted classes would end first (see [`Backup`], [`BACKUP_AFTER`]): its
    /// first backup, or a second while the first has no rate yet or straggles too, or, at
    /// [`MAX_BACKUPS`], in place of the slowest when every backup straggles.
    fn grant_backup(&mut self, worker_id: &str, now: u64) -> Option<LeaseGrant> {
        // Heartbeats with no new steps for this long mean the lease has stalled.
        let stall_ms = 2 * self.heartbeat_ms;
        // (time left, job, shard, the straggling backup this one replaces)
        let mut best: Option<(f64, String, usize, Option<String>)> = None;
        for (lease_id, job_id, shard) in self.leases.iter() {
            let run = &self.jobs[job_id];
            let (completed, ms, cost) = run.pace;
            if completed < BACKUP_MIN_COMPLETED
                || cost == 0
                || run.persisted.cancelled
                || run.persisted.paused.is_some()
                || run.persisted.excluded_workers.contains(worker_id)
                || self.held_back.contains(job_id)
                || Self::left_out(&self.only, job_id)
            {
                continue;
            }
            let ShardState::Leased { worker_id: owner, started_ms, .. } = &run.persisted.shards[shard].state else {
                continue;
            };
            if owner == worker_id {
                continue;
            }
            // What a fresh run of the shard takes at the job's pace, and how long this one still
            // needs: from its own DiT rate when its heartbeats show one (a backup only when a
            // fresh run would finish first), else — still reading its data, or a worker that does
            // not count steps — it has run BACKUP_AFTER × expected and is assumed to need as long
            // again as it has run.
            let expected =
                (ms as f64 * run.pending.cost.get(shard).copied().unwrap_or(0) as f64 / cost as f64).max(1.0);
            let elapsed = now.saturating_sub(*started_ms) as f64;
            let classes = run.job.shard_classes(shard).len() as u64;
            let per_class = run.job.spec.ipc as u64 * run.job.spec.sampling.steps as u64;
            // A backup only re-publishes the classes already committed: it runs the rest.
            let classes_left = classes.saturating_sub(run.persisted.shards[shard].classes_done as u64);
            let fresh = expected * classes_left as f64 / classes.max(1) as f64;
            // The shard's backups, each by its own rate when its heartbeats show one, else
            // presumed on pace (a fresh run less what it has run).
            let total_left = classes_left * per_class;
            let backups = self.backed_up.get(&(job_id.clone(), shard)).map_or(&[][..], Vec::as_slice);
            let (mut backup_best, mut unrated, mut slowest): (f64, bool, Option<(String, f64)>) =
                (f64::INFINITY, false, None);
            for backup in backups {
                match self.leases.steps.get(backup).and_then(|r| r.left_ms(total_left, now, stall_ms)) {
                    Some(left) => {
                        backup_best = backup_best.min(left);
                        if slowest.as_ref().is_none_or(|(_, l)| left > *l) {
                            slowest = Some((backup.clone(), left));
                        }
                    }
                    None => {
                        let ran = self.backups.get(backup).map_or(0, |b| now.saturating_sub(b.started_ms));
                        backup_best = backup_best.min((fresh - ran as f64).max(0.0));
                        unrated = true;
                    }
                }
            }
            let total = classes * per_class;
            let left = match self.leases.steps.get(lease_id).and_then(|r| r.left_ms(total, now, stall_ms)) {
                Some(left) if left > fresh => left,
                Some(_) => continue,
                None if elapsed >= BACKUP_AFTER * expected => elapsed,
                None => continue,
            };
            // The shard's own lease straggles. With no backup, or every backup straggling too
            // (a slow read or a slow node hits a backup as it hits any run), another one; at
            // MAX_BACKUPS the slowest is replaced. A backup not rated yet gets a second as
            // insurance (ranked below every straggler: its time left is at most a fresh run's),
            // so that a backup which straggles as well is not seen only heartbeats later.
            let replaces = if backups.is_empty() || (backup_best > fresh && backups.len() < MAX_BACKUPS) {
                None
            } else if backup_best > fresh {
                slowest.map(|(lease, _)| lease)
            } else if unrated && backups.len() < MAX_BACKUPS {
                None
            } else {
                continue;
            };
            let left = left.min(backup_best);
            if best.as_ref().is_none_or(|(b, ..)| left > *b) {
                best = Some((left, job_id.clone(), shard, replaces));
            }
        }
        let (_, job_id, shard, replaces) = best?;
        if let Some(slow) = replaces {
            // Its worker is told to stop at its next poll.
            self.remove_backup(&slow);
        }
        let run = &self.jobs[&job_id];
        self.next_lease += 1;
        let lease_id = format!("{}-{}", self.epoch, self.next_lease);
        let attempt = run.persisted.shards[shard].attempts;
        let attempt_id = format!("s{shard}-a{attempt}-{lease_id}");
        let deadline_ms = now + lease_timeout_ms(run.job.spec.lease_timeout_s, self.heartbeat_ms);
        self.next_expiry = self.next_expiry.min(deadline_ms);
        let backup = Backup {
            job: job_id.clone(),
            shard,
            worker: worker_id.to_owned(),
            attempt_id: attempt_id.clone(),
            deadline_ms,
            started_ms: now,
        };
        self.backups.insert(lease_id.clone(), backup);
        self.backed_up.entry((job_id, shard)).or_default().push(lease_id.clone());
        Some(LeaseGrant {
            lease_id,
            attempt_id,
            job: run.job.clone(),
            shard_index: shard,
            attempt,
            deadline_ms,
            classes: run.job.shard_classes(shard).to_vec(),
            backup: true,
            timeout_ms: lease_timeout_ms(run.job.spec.lease_timeout_s, self.heartbeat_ms),
        })
    }

    /// Drops a backup lease; its (job, shard) when it was held.
    fn remove_backup(&mut self, lease_id: &str) -> Option<(String, usize)> {
        let backup = self.backups.remove(lease_id)?;
        self.leases.steps.remove(lease_id);
        unlink_backup(&mut self.backed_up, (backup.job.clone(), backup.shard), lease_id);
        Some((backup.job, backup.shard))
    }

    /// Drops the backup leases of `job_id` (of one shard, or all); their workers are told to
    /// stop at their next poll.
    /// Takes back every lease of `job_id` (its shards' own and their backups) for a cancel or
    /// a pause, remembering each in [`Scheduler::revoked`]. The shards' states are the
    /// caller's to set.
    fn revoke_all(&mut self, job_id: &str) {
        let backups: Vec<(String, usize, String)> = self
            .backups
            .iter()
            .filter(|(_, b)| b.job == job_id)
            .map(|(lease, b)| (lease.clone(), b.shard, b.worker.clone()))
            .collect();
        self.drop_backups(job_id, None);
        let Some(run) = self.jobs.get(job_id) else { return };
        let own = run.persisted.shards.iter().enumerate().filter_map(|(shard, s)| match &s.state {
            ShardState::Leased { lease_id, worker_id, .. } => Some((lease_id.clone(), shard, worker_id.clone())),
            _ => None,
        });
        let taken: Vec<(String, usize, String)> = own.chain(backups).collect();
        for (lease, shard, worker) in taken {
            self.leases.remove(&lease);
            self.revoked.insert(lease, (job_id.to_owned(), shard, worker));
        }
    }

    fn drop_backups(&mut self, job_id: &str, shard: Option<usize>) {
        let gone: Vec<String> = self
            .backups
            .iter()
            .filter(|(_, b)| b.job == job_id && shard.is_none_or(|s| s == b.shard))
            .map(|(lease, _)| lease.clone())
            .collect();
        for lease in gone {
            self.remove_backup(&lease);
        }
    }

    /// This coordinator did not run for `gap_ms` (the process was stopped, its host or VM
    /// paused, its clock stepped forward): no worker could renew its leases or be heard in that
    /// time, so every lease's deadline and every worker's last sign of life move on by the gap.
    /// Without this, a coordinator waking from a freeze would expire every lease before reading
    /// the renewals waiting for it, spending attempts of workers that did nothing wrong. The
    /// caller tells a gap from how long its own periodic tick took.
    pub fn stalled(&mut self, gap_ms: u64) {
        for run in self.jobs.values_mut() {
            for shard in run.persisted.shards.iter_mut() {
                if let ShardState::Leased { deadline_ms, .. } = &mut shard.state {
                    *deadline_ms = deadline_ms.saturating_add(gap_ms);
                }
            }
        }
        for backup in self.backups.values_mut() {
            backup.deadline_ms = backup.deadline_ms.saturating_add(gap_ms);
        }
        for seen in self.workers.values_mut() {
            *seen = seen.saturating_add(gap_ms);
        }
        self.next_expiry = self.next_expiry.saturating_add(gap_ms);
    }

    /// Returns expired leases' shards to the queue (or fails them when out of attempts).
    /// Returns the jobs whose state changed.
    pub fn expire(&mut self, now: u64) -> Vec<(String, Settled)> {
        if now < self.next_expiry {
            return Vec::new();
        }
        let deadline = |job: &String, shard: usize| match self.jobs[job].persisted.shards[shard].state {
            ShardState::Leased { deadline_ms, .. } => deadline_ms,
            _ => u64::MAX,
        };
        // A lease whose completion is being verified is not the worker's to renew: it is
        // renewed when the verification ends (see `end_completion`).
        let completing = |lease: &String| self.completing.contains_key(lease);
        let expired: Vec<String> = self
            .leases
            .iter()
            .filter(|(lease, job, shard)| deadline(job, *shard) <= now && !completing(lease))
            .map(|(lease, _, _)| lease.clone())
            .collect();
        let expired_backups: Vec<String> = self
            .backups
            .iter()
            .filter(|(lease, b)| b.deadline_ms <= now && !completing(lease))
            .map(|(lease, _)| lease.clone())
            .collect();
        self.next_expiry = self
            .leases
            .iter()
            .filter(|(lease, _, _)| !completing(lease))
            .map(|(_, job, shard)| deadline(job, shard))
            .chain(self.backups.iter().filter(|(lease, _)| !completing(lease)).map(|(_, b)| b.deadline_ms))
            .filter(|d| *d > now)
            .min()
            .unwrap_or(u64::MAX);
        for lease in expired_backups {
            self.remove_backup(&lease);
        }
        expired
            .into_iter()
            .filter_map(|lease| {
                let (job, shard) = self.leases.remove(&lease)?;
                let worker = match &self.jobs[&job].persisted.shards[shard].state {
                    ShardState::Leased { worker_id, .. } => worker_id.clone(),
                    _ => String::new(),
                };
                // Recovered at this coordinator's start and never renewed: its worker went with
                // the coordinator before (a requeued allocation), and is no fault of the shard.
                let orphaned = self.restored.remove(&lease);
                let error = if self.exited.contains(&worker) {
                    format!("lease given up: the process of worker `{worker}` exited")
                } else {
                    format!("lease expired: worker `{worker}` stopped renewing it")
                };
                let settled = if orphaned {
                    self.requeue_or_fail(&job, shard, None, error, true, true, now)
                } else {
                    self.expired_on_worker(&job, shard, &worker, now);
                    self.requeue_or_fail(&job, shard, None, error, true, false, now)
                };
                let requeued = self.jobs[&job].persisted.shards[shard].state != ShardState::Failed;
                let exited = self.exited.contains(&worker);
                self.expired.push(ExpiredLease {
                    job_id: job.clone(),
                    shard,
                    lease_id: lease.clone(),
                    worker_id: worker,
                    requeued,
                    exited,
                    orphaned,
                });
                Some((job, settled))
            })
            .collect()
    }

    /// The process of worker `worker_id` is known to be gone (a local worker of `coordinator
    /// run` that exited, killed or crashed): its leases and backup leases expire at the next
    /// [`Scheduler::expire`] instead of a lease timeout later, as if it had stopped renewing them.
    /// Returns how many it held.
    pub fn worker_gone(&mut self, worker_id: &str, now: u64) -> usize {
        self.exited.insert(worker_id.to_owned());
        if self.workers.contains_key(worker_id) && !self.gone.contains_key(worker_id) {
            self.gone.insert(worker_id.to_owned(), LeftReason::Exited);
            self.worker_events.push(WorkerEvent::Left { worker_id: worker_id.to_owned(), reason: LeftReason::Exited });
        }
        let held: Vec<String> = self.leases.of_worker(worker_id).cloned().collect();
        let mut gone = 0;
        for lease in &held {
            let Some((job, shard, _)) = self.leases.by_id.get(lease).cloned() else { continue };
            if let Some(run) = self.jobs.get_mut(&job)
                && let ShardState::Leased { deadline_ms, worker_id: holder, .. } =
                    &mut run.persisted.shards[shard].state
                && holder == worker_id
            {
                *deadline_ms = (*deadline_ms).min(now);
                gone += 1;
            }
        }
        for backup in self.backups.values_mut().filter(|b| b.worker == worker_id) {
            backup.deadline_ms = backup.deadline_ms.min(now);
            gone += 1;
        }
        if gone > 0 {
            self.next_expiry = self.next_expiry.min(now);
        }
        gone
    }

    /// Books an expiry of `worker`'s lease of `shard`: a second expiry of the shard on the same
    /// worker in a row gives the attempt back (one bad worker must not spend every attempt of a
    /// shard), and a worker on which [`SET_ASIDE_AFTER`] leases expired in a row is set aside.
    fn expired_on_worker(&mut self, job_id: &str, shard: usize, worker: &str, now: u64) {
        let run = self.jobs.get_mut(job_id).expect("job of a lease");
        if run.expired_on.insert(shard, worker.to_owned()).as_deref() == Some(worker) {
            let entry = &mut run.persisted.shards[shard];
            entry.attempts = entry.attempts.saturating_sub(1);
        }
        let streak = self.expiry_streak.entry(worker.to_owned()).or_insert(0);
        *streak += 1;
        if *streak >= SET_ASIDE_AFTER {
            let doublings = (*streak - SET_ASIDE_AFTER).min(16);
            let until_ms = now + (SET_ASIDE_MS << doublings).min(SET_ASIDE_MAX_MS);
            self.set_aside.insert(worker.to_owned(), until_ms);
            self.worker_events.push(WorkerEvent::SetAside {
                worker_id: worker.to_owned(),
                expired_in_a_row: *streak,
                until_ms,
            });
        }
    }

    /// Workers set aside at `now` (see [`WorkerEvent::SetAside`]), with when each may lease again.
    pub fn set_aside(&self, now: u64) -> Vec<(String, u64)> {
        let mut aside: Vec<_> =
            self.set_aside.iter().filter(|(_, until)| **until > now).map(|(w, until)| (w.clone(), *until)).collect();
        aside.sort();
        aside
    }

    #[allow(clippy::too_many_arguments)]
    fn requeue_or_fail(
        &mut self,
        job_id: &str,
        shard: usize,
        wnid: Option<String>,
        error: String,
        retryable: bool,
        released: bool,
        now: u64,
    ) -> Settled {
        let run = self.jobs.get_mut(job_id).expect("job of a lease");
        let max = run.job.spec.max_attempts;
        let cancelled = run.persisted.cancelled || run.persisted.paused.is_some();
        let entry = &mut run.persisted.shards[shard];
        if released {
            entry.attempts = entry.attempts.saturating_sub(1);
        } else {
            entry.last_error = Some(ShardError { wnid, error, at_ms: now });
        }
        entry.reset_progress();
        let backup = self.backed_up.get(&(job_id.to_owned(), shard)).and_then(|leases| leases.first().cloned());
        // A backup that already runs the shard is an attempt under way, whatever the budget
        // says of new ones: it takes over rather than the shard failing while it runs.
        let running_backup = backup.and_then(|lease| self.backups.get(&lease).map(|b| (lease, b.clone())));
        if cancelled {
            entry.state = ShardState::Pending;
        } else if retryable && (entry.attempts < max || running_backup.is_some()) {
            match running_backup {
                // The backup already runs the shard: it becomes the shard's lease (an attempt).
                Some((lease_id, b)) => {
                    entry.attempts += 1;
                    entry.state = ShardState::Leased {
                        lease_id: lease_id.clone(),
                        attempt_id: b.attempt_id,
                        worker_id: b.worker.clone(),
                        deadline_ms: b.deadline_ms,
                        started_ms: b.started_ms,
                    };
                    // Its rate stays: it is the shard's lease now.
                    self.backups.remove(&lease_id);
                    unlink_backup(&mut self.backed_up, (job_id.to_owned(), shard), &lease_id);
                    self.leases.insert(lease_id, job_id.to_owned(), shard, b.worker);
                }
                None => {
                    entry.state = ShardState::Pending;
                    run.pending.insert(shard);
                }
            }
        } else {
            entry.state = ShardState::Failed;
        }
        if !matches!(entry.state, ShardState::Leased { .. }) {
            self.drop_backups(job_id, Some(shard));
        }
        self.settle(job_id, now)
    }

    fn settle(&mut self, job_id: &str, now: u64) -> Settled {
        let run = self.jobs.get_mut(job_id).expect("job exists");
        let state = run.state();
        if state != JobState::Running && run.persisted.finished_unix_ms.is_none() {
            run.persisted.finished_unix_ms = Some(now);
            return Settled::Finished(state);
        }
        Settled::Open
    }

    fn lease_of(&self, worker_id: &str, lease_id: &str) -> Result<(String, usize), SchedulerError> {
        if let Some(b) = self.backups.get(lease_id) {
            if b.worker != worker_id {
                let (lease, owner, caller) = (lease_id.into(), b.worker.clone(), worker_id.into());
                return Err(SchedulerError::NotOwner { lease, owner, caller });
            }
            return Ok((b.job.clone(), b.shard));
        }
        let (job, shard) = self.leases.get(lease_id).ok_or_else(|| SchedulerError::StaleLease(lease_id.into()))?;
        match &self.jobs[&job].persisted.shards[shard].state {
            ShardState::Leased { worker_id: owner, .. } if owner != worker_id => {
                Err(SchedulerError::NotOwner { lease: lease_id.into(), owner: owner.clone(), caller: worker_id.into() })
            }
            _ => Ok((job, shard)),
        }
    }

    /// The (job, shard index) a lease is for, when it is still held by `worker_id`.
    ///
    /// # Errors
    /// [`SchedulerError::StaleLease`] when the lease is not held any more;
    /// [`SchedulerError::NotOwner`] when another worker holds it.
    pub fn lease(&self, worker_id: &str, lease_id: &str) -> Result<(Arc<ResolvedJob>, usize), SchedulerError> {
        let (job, shard) = self.lease_of(worker_id, lease_id)?;
        Ok((self.jobs[&job].job.clone(), shard))
    }

    /// A worker reports `lease_id` complete: the (job, shard) it is for, as [`Scheduler::lease`],
    /// and, until [`Scheduler::end_completion`], the lease does not expire and its worker is not
    /// announced as silent. The worker waits for the answer without heartbeats, so the time the
    /// caller takes to verify the shard's markers (a store that is slow, or down for minutes and
    /// retried) must not count against the worker's lease: it would be leased again, and its
    /// committed shard run twice, with an attempt spent. Calls nest (a worker that gave up on
    /// its call and sent it again).
    ///
    /// # Errors
    /// As [`Scheduler::lease`].
    pub fn begin_completion(
        &mut self,
        worker_id: &str,
        lease_id: &str,
    ) -> Result<(Arc<ResolvedJob>, usize), SchedulerError> {
        let held = self.lease(worker_id, lease_id)?;
        self.completing.entry(lease_id.to_owned()).or_insert_with(|| (worker_id.to_owned(), 0)).1 += 1;
        Ok(held)
    }

    /// The workers with a completion in flight ([`Scheduler::begin_completion`]), each once.
    fn reporting(&self) -> HashSet<&String> {
        self.completing.values().map(|(worker, _)| worker).collect()
    }

    /// Ends a [`Scheduler::begin_completion`] at `now`, however it ended (verified and
    /// completed, refused, failed on the store, or abandoned by the worker). A lease still held
    /// once no completion of it is in flight gets a whole timeout from `now`, as if renewed:
    /// its worker sends the report again, or stops renewing it and it expires one timeout later.
    pub fn end_completion(&mut self, lease_id: &str, now: u64) {
        let Some((worker, calls)) = self.completing.get_mut(lease_id) else { return };
        *calls -= 1;
        if *calls > 0 {
            return;
        }
        let worker = worker.clone();
        self.completing.remove(lease_id);
        if let Some(seen) = self.workers.get_mut(&worker) {
            *seen = (*seen).max(now);
        }
        if let Some(backup) = self.backups.get_mut(lease_id) {
            let Some(run) = self.jobs.get(&backup.job) else { return };
            backup.deadline_ms =
                backup.deadline_ms.max(now + lease_timeout_ms(run.job.spec.lease_timeout_s, self.heartbeat_ms));
            self.next_expiry = self.next_expiry.min(backup.deadline_ms);
            return;
        }
        let Some((job_id, shard)) = self.leases.get(lease_id) else { return };
        let Some(run) = self.jobs.get_mut(&job_id) else { return };
        let timeout = lease_timeout_ms(run.job.spec.lease_timeout_s, self.heartbeat_ms);
        if let ShardState::Leased { deadline_ms, .. } = &mut run.persisted.shards[shard].state {
            *deadline_ms = (*deadline_ms).max(now + timeout);
            self.next_expiry = self.next_expiry.min(*deadline_ms);
        }
    }

    /// A shard's lease finished and its markers were verified.
    /// Returns the job id and whether the job has just finished.
    ///
    /// # Errors
    /// [`SchedulerError::StaleLease`] when the lease is not held any more;
    /// [`SchedulerError::NotOwner`] when another worker holds it.
    pub fn complete(&mut self, worker_id: &str, lease_id: &str, now: u64) -> Result<(String, Settled), SchedulerError> {
        let (job, shard) = self.lease_of(worker_id, lease_id)?;
        self.expiry_streak.remove(worker_id);
        self.set_aside.remove(worker_id);
        let run = self.jobs.get_mut(&job).expect("job of a lease");
        let (started, attempt) = match self.backups.get(lease_id) {
            Some(b) => (b.started_ms, Some(b.attempt_id.clone())),
            None => match &run.persisted.shards[shard].state {
                ShardState::Leased { started_ms, .. } => (*started_ms, None),
                _ => (now, None),
            },
        };
        // The pace backups are judged by: what this shard took for its cost.
        let cost = run.pending.cost.get(shard).copied().unwrap_or(0);
        run.pace = (run.pace.0 + 1, run.pace.1 + now.saturating_sub(started), run.pace.2 + cost);
        if let Some(attempt_id) = attempt {
            // The backup won: the shard's own lease is revoked at its worker's next poll.
            if let ShardState::Leased { attempt_id: own, .. } = &mut run.persisted.shards[shard].state {
                *own = attempt_id;
            }
            self.remove_backup(lease_id);
        }
        let settled = self.mark_done(&job, shard, now);
        self.completed.insert(lease_id.to_owned(), worker_id.to_owned());
        self.completed_order.push_back(lease_id.to_owned());
        while self.completed_order.len() > RECENTLY_COMPLETED {
            if let Some(oldest) = self.completed_order.pop_front() {
                self.completed.remove(&oldest);
            }
        }
        Ok((job, settled))
    }

    /// Whether `worker_id` completed `lease_id` (one of the last 65,536 completed): a
    /// completion sent again is answered as the first one was, not refused as a stale lease.
    pub fn completed_by(&self, worker_id: &str, lease_id: &str) -> bool {
        self.completed.get(lease_id).is_some_and(|w| w == worker_id)
    }

    /// The job and shard of `lease_id` when a cancel or a pause took it back from `worker_id`
    /// and the worker has not reported on it since ([`Scheduler::note_committed`]).
    pub fn revoked_lease(&self, worker_id: &str, lease_id: &str) -> Option<(Arc<ResolvedJob>, usize)> {
        let (job, shard, worker) = self.revoked.get(lease_id)?;
        (worker == worker_id).then(|| self.job(job).map(|j| (j, *shard))).flatten()
    }

    /// Marks a shard done (its markers exist), whatever lease it had.
    pub fn mark_done(&mut self, job_id: &str, shard: usize, now: u64) -> Settled {
        if let Some(run) = self.jobs.get_mut(job_id) {
            let entry = &mut run.persisted.shards[shard];
            let attempt_id = match &entry.state {
                ShardState::Leased { attempt_id, lease_id, .. } => {
                    self.leases.remove(lease_id);
                    attempt_id.clone()
                }
                ShardState::Done { .. } => return Settled::Open,
                _ => "recovered".into(),
            };
            entry.state = ShardState::Done { attempt_id, finished_ms: now };
            // The record of a done shard says it whole, not what the last heartbeat had counted.
            let classes = run.job.shard_classes(shard).len() as u32;
            entry.classes_done = classes;
            entry.images_done = classes * run.job.spec.ipc as u32;
            run.pending.remove(&shard);
            run.record_progress(now);
            self.drop_backups(job_id, Some(shard));
            return self.settle(job_id, now);
        }
        Settled::Open
    }

    /// A lease failed (or was released on shutdown, which does not count as an attempt).
    /// A retryable failure re-queues the shard while attempts are left, otherwise fails it; a
    /// released lease gives its attempt back and records no error. Returns the job id and
    /// whether the job has just finished.
    ///
    /// # Errors
    /// [`SchedulerError::StaleLease`] when the lease is not held any more;
    /// [`SchedulerError::NotOwner`] when another worker holds it.
    #[allow(clippy::too_many_arguments)]
    pub fn fail(
        &mut self,
        worker_id: &str,
        lease_id: &str,
        wnid: Option<String>,
        error: String,
        retryable: bool,
        released: bool,
        now: u64,
    ) -> Result<(String, Settled), SchedulerError> {
        let (job, shard) = self.lease_of(worker_id, lease_id)?;
        if self.remove_backup(lease_id).is_some() {
            // A backup that ends without completing changes nothing: the shard's lease runs on.
            return Ok((job, Settled::Open));
        }
        self.leases.remove(lease_id);
        Ok((job.clone(), self.requeue_or_fail(&job, shard, wnid, error, retryable, released, now)))
    }

    /// Records that the attempt under `lease_id` (the shard's own lease or a backup: its commits
    /// are the shard's) ended with `classes` of the shard's classes committed, as its
    /// `FailShard` says: its last heartbeat may predate its last commits, and a released or
    /// failed shard keeps its committed classes counted until it runs again. The count only
    /// grows, up to the shard's classes; a lease that is not `worker_id`'s changes nothing.
    /// Call it before [`Scheduler::fail`], [`Scheduler::pause`] or [`Scheduler::exclude`],
    /// which end the lease.
    ///
    /// A lease a cancel or a pause took back (see [`Scheduler::revoked_lease`]) is counted too, once: its
    /// worker may have committed classes before it heard. Returns the job whose count grew
    /// under such a lease (its caller persists it: the report itself is refused as stale).
    pub fn note_committed(&mut self, worker_id: &str, lease_id: &str, classes: u32) -> Option<String> {
        if let Ok((job_id, shard)) = self.lease_of(worker_id, lease_id) {
            self.note_markers(&job_id, shard, classes);
            return None;
        }
        match self.revoked.get(lease_id) {
            Some((_, _, worker)) if worker == worker_id => {}
            _ => return None,
        }
        let (job_id, shard, _) = self.revoked.remove(lease_id).expect("checked above");
        self.note_markers(&job_id, shard, classes).then_some(job_id)
    }

    /// Records that `committed` of shard `shard`'s classes have markers in the store (counted
    /// by the caller after its lease expired: a dead worker reports nothing). The count only
    /// grows, up to the shard's classes. Returns whether it grew (the job's state changed).
    pub fn note_markers(&mut self, job_id: &str, shard: usize, committed: u32) -> bool {
        let Some(run) = self.jobs.get_mut(job_id) else { return false };
        if shard >= run.persisted.shards.len() {
            return false;
        }
        let all = run.job.shard_classes(shard).len() as u32;
        let entry = &mut run.persisted.shards[shard];
        let before = entry.classes_done;
        entry.classes_done = entry.classes_done.max(committed.min(all));
        entry.classes_done > before
    }

    /// The job's output store refused a write of this lease for good (full, over quota,
    /// read-only, no permission): the lease is given back without spending an attempt, the job
    /// is paused with `refusal` as its reason, and its other leases are revoked (they would meet
    /// the same refusal). Returns the job id and the job's settlement (paused).
    ///
    /// # Errors
    /// [`SchedulerError::StaleLease`] when the lease is not held any more;
    /// [`SchedulerError::NotOwner`] when another worker holds it.
    pub fn pause(
        &mut self,
        worker_id: &str,
        lease_id: &str,
        wnid: Option<String>,
        refusal: String,
        now: u64,
    ) -> Result<(String, Settled), SchedulerError> {
        let (job, shard) = self.lease_of(worker_id, lease_id)?;
        let backup = self.remove_backup(lease_id).is_some();
        self.leases.remove(lease_id);
        let entry = &mut self.jobs.get_mut(&job).expect("job").persisted.shards[shard];
        // Shown by `status` until `resume` clears it.
        entry.last_error = Some(ShardError { wnid, error: refusal.clone(), at_ms: now });
        if !backup {
            entry.attempts = entry.attempts.saturating_sub(1);
            entry.reset_progress();
            entry.state = ShardState::Pending;
        }
        let settled = self.pause_job(&job, refusal, now)?;
        Ok((job, settled))
    }

    /// Pauses job `job_id` with `reason` (shown by `status`; `resume` clears it): nothing of it
    /// is leased until then, its leases are revoked and their shards given back without
    /// spending an attempt (they were stopped by the pause, not by a fault of their own).
    ///
    /// # Errors
    /// [`SchedulerError::UnknownJob`] when the job is not known.
    pub fn pause_job(&mut self, job_id: &str, reason: String, now: u64) -> Result<Settled, SchedulerError> {
        self.stand_down(job_id)?;
        let run = self.jobs.get_mut(job_id).expect("checked by stand_down");
        run.persisted.paused = Some(reason);
        run.pending.clear();
        Ok(self.settle(job_id, now))
    }

    /// Takes every lease of job `job_id` back (revoked: their workers are told to stop) and
    /// gives their shards back to the queue without spending an attempt: the job is not this
    /// coordinator's to run for now (another coordinator took its output over). The caller holds
    /// it back ([`Scheduler::hold_back`]) until it is again.
    ///
    /// # Errors
    /// [`SchedulerError::UnknownJob`] when the job is not known.
    pub fn stand_down(&mut self, job_id: &str) -> Result<(), SchedulerError> {
        if !self.jobs.contains_key(job_id) {
            return Err(SchedulerError::UnknownJob(job_id.into()));
        }
        self.revoke_all(job_id);
        let run = self.jobs.get_mut(job_id).expect("checked above");
        for (i, shard) in run.persisted.shards.iter_mut().enumerate() {
            if let ShardState::Leased { .. } = &shard.state {
                shard.state = ShardState::Pending;
                shard.attempts = shard.attempts.saturating_sub(1);
                shard.reset_progress();
                run.pending.insert(i);
            }
        }
        Ok(())
    }

    /// A worker cannot run a job (e.g. it holds different model files): give the shard back
    /// without spending an attempt and lease nothing of that job to it again. Returns the job id.
    ///
    /// # Errors
    /// [`SchedulerError::StaleLease`] when the lease is not held any more;
    /// [`SchedulerError::NotOwner`] when another worker holds it.
    pub fn exclude(
        &mut self,
        worker_id: &str,
        lease_id: &str,
        error: String,
        now: u64,
    ) -> Result<(String, Settled), SchedulerError> {
        let (job, shard) = self.lease_of(worker_id, lease_id)?;
        let backup = self.remove_backup(lease_id).is_some();
        self.leases.remove(lease_id);
        let run = self.jobs.get_mut(&job).expect("job");
        run.persisted.excluded_workers.insert(worker_id.to_owned());
        run.persisted.exclusion_reasons.insert(worker_id.to_owned(), error.clone());
        if backup {
            // The shard's own lease runs on elsewhere.
            return Ok((job, Settled::Open));
        }
        let entry = &mut run.persisted.shards[shard];
        entry.attempts = entry.attempts.saturating_sub(1);
        entry.last_error = Some(ShardError { wnid: None, error, at_ms: now });
        entry.state = ShardState::Pending;
        run.pending.insert(shard);
        run.no_work_yet();
        Ok((job, Settled::Open))
    }

    /// Leases nothing of `job_id` to `worker_id` from now on (it registered with models that
    /// differ from the job's). A lease it already holds runs on: its models were checked when
    /// they were loaded. Returns false when the worker was already excluded.
    ///
    /// # Errors
    /// [`SchedulerError::UnknownJob`] when the job is not known.
    pub fn exclude_worker(&mut self, job_id: &str, worker_id: &str, reason: &str) -> Result<bool, SchedulerError> {
        let run = self.jobs.get_mut(job_id).ok_or_else(|| SchedulerError::UnknownJob(job_id.into()))?;
        run.persisted.exclusion_reasons.insert(worker_id.to_owned(), reason.to_owned());
        Ok(run.persisted.excluded_workers.insert(worker_id.to_owned()))
    }

    /// Another worker `job_id` excluded for exactly `reason`, if any (the first by id): workers
    /// that share a model and a runtime fail alike, and the reason need not be logged again.
    pub fn excluded_alike(&self, job_id: &str, worker_id: &str, reason: &str) -> Option<String> {
        let run = self.jobs.get(job_id)?;
        run.persisted
            .exclusion_reasons
            .iter()
            .find(|(other, said)| other.as_str() != worker_id && said.as_str() == reason)
            .map(|(other, _)| other.clone())
    }

    /// Forgets which workers `job_id` excluded (a person submitted the job again, having fixed
    /// what they were told): each may lease its shards again, and one whose models still differ
    /// or still fail to load is excluded again when it registers or loads them. Returns how
    /// many were excluded.
    pub fn clear_exclusions(&mut self, job_id: &str) -> usize {
        let Some(run) = self.jobs.get_mut(job_id) else { return 0 };
        run.persisted.exclusion_reasons.clear();
        std::mem::take(&mut run.persisted.excluded_workers).len()
    }

    /// The workers seen in the last three heartbeats that `job_id` has excluded, each with why
    /// (as it was said when it was excluded), by worker id.
    pub fn live_exclusions(&self, job_id: &str, now: u64) -> Vec<(String, String)> {
        let Some(run) = self.jobs.get(job_id) else { return Vec::new() };
        let mut live: Vec<(String, String)> = run
            .persisted
            .excluded_workers
            .iter()
            .filter(|id| self.workers.get(*id).is_some_and(|seen| now.saturating_sub(*seen) <= 3 * self.heartbeat_ms))
            .map(|id| (id.clone(), run.persisted.exclusion_reasons.get(id).cloned().unwrap_or_default()))
            .collect();
        // Set aside from every job for a while: said too, or a worker that polls and gets
        // nothing looks healthy and idle.
        for (id, until) in &self.set_aside {
            let heard = self.workers.get(id).is_some_and(|seen| now.saturating_sub(*seen) <= 3 * self.heartbeat_ms);
            if *until > now && heard && !live.iter().any(|(w, _)| w == id) {
                live.push((
                    id.clone(),
                    format!(
                        "set aside for {} s more: its leases expired {SET_ASIDE_AFTER} or more times in a row (a worker \
                         that dies before reporting, or is cut off from this coordinator longer than the lease timeout)",
                        (until - now).div_ceil(1000)
                    ),
                ));
            }
        }
        live.sort();
        live
    }

    /// The shards of `job_id` leased now (by their own lease; backups run shards leased too).
    pub fn leased_shards(&self, job_id: &str) -> Vec<usize> {
        self.jobs.get(job_id).map_or_else(Vec::new, |run| {
            run.persisted
                .shards
                .iter()
                .enumerate()
                .filter(|(_, s)| matches!(s.state, ShardState::Leased { .. }))
                .map(|(i, _)| i)
                .collect()
        })
    }

    /// Cancels a running job: pending shards leave the queue and its leases are revoked (their
    /// workers are told on their next poll). Cancelling a cancelled job does nothing.
    ///
    /// # Errors
    /// [`SchedulerError::UnknownJob`] when the job is not known; [`SchedulerError::AlreadyEnded`] when
    /// it has already succeeded or failed.
    pub fn cancel(&mut self, job_id: &str, now: u64) -> Result<Settled, SchedulerError> {
        let run = self.jobs.get_mut(job_id).ok_or_else(|| SchedulerError::UnknownJob(job_id.into()))?;
        match run.state() {
            JobState::Running | JobState::Paused => {}
            JobState::Cancelled => return Ok(Settled::Open),
            ended => return Err(SchedulerError::AlreadyEnded { job: job_id.into(), state: ended.as_str() }),
        }
        run.persisted.cancelled = true;
        run.pending.clear();
        self.revoke_all(job_id);
        let run = self.jobs.get_mut(job_id).expect("checked above");
        for shard in run.persisted.shards.iter_mut() {
            if let ShardState::Leased { .. } = &shard.state {
                shard.state = ShardState::Pending;
            }
        }
        Ok(self.settle(job_id, now))
    }

    /// Re-queues every shard not in `committed` (failed, cancelled or missing) with a fresh
    /// attempt budget and forgets which workers were excluded from the job; committed shards
    /// become done. Returns (committed, requeued).
    ///
    /// # Errors
    /// [`SchedulerError::UnknownJob`] when the job is not known.
    pub fn resume(
        &mut self,
        job_id: &str,
        committed: &HashSet<usize>,
        now: u64,
    ) -> Result<(usize, usize), SchedulerError> {
        // The caller counted the markers afresh: a late word on a lease taken back before is not
        // counted over that.
        self.revoked.retain(|_, (job, _, _)| job != job_id);
        // Resumed here: run here, whatever `run_only` says.
        if self.jobs.contains_key(job_id)
            && let Some(only) = &mut self.only
        {
            only.insert(job_id.to_owned());
        }
        let run = self.jobs.get_mut(job_id).ok_or_else(|| SchedulerError::UnknownJob(job_id.into()))?;
        // A job that had succeeded and whose commits all hold stays finished when it was.
        let succeeded = (!run.persisted.cancelled
            && run.persisted.paused.is_none()
            && run.persisted.shards.iter().all(|s| matches!(s.state, ShardState::Done { .. })))
        .then_some(run.persisted.finished_unix_ms)
        .flatten();
        run.persisted.cancelled = false;
        run.persisted.paused = None;
        run.persisted.finished_unix_ms = None;
        // A person acted: workers excluded for their model files (since fixed, maybe) may try again;
        // one whose files still differ is excluded again when it registers or loads them.
        run.persisted.excluded_workers.clear();
        run.persisted.exclusion_reasons.clear();
        let mut requeued = 0;
        for (i, shard) in run.persisted.shards.iter_mut().enumerate() {
            if committed.contains(&i) {
                if !matches!(shard.state, ShardState::Done { .. }) {
                    shard.state = ShardState::Done { attempt_id: "recovered".into(), finished_ms: now };
                }
                run.pending.remove(&i);
            } else if !matches!(shard.state, ShardState::Leased { .. }) {
                shard.state = ShardState::Pending;
                // Resume may have withdrawn classes whose files were lost: count afresh.
                shard.classes_done = 0;
                // A fresh budget: the old error is no failure of this run ("after 0 attempts"),
                // but it stays in the shard's history.
                if shard.attempts > 0 || shard.last_error.is_some() {
                    let earlier = shard.before_resume.get_or_insert(EarlierAttempts { attempts: 0, last_error: None });
                    earlier.attempts += shard.attempts;
                    if shard.last_error.is_some() {
                        earlier.last_error = shard.last_error.take();
                    }
                }
                shard.attempts = 0;
                shard.last_error = None;
                run.pending.insert(i);
                requeued += 1;
            }
        }
        if requeued == 0 {
            run.persisted.finished_unix_ms = succeeded;
        }
        run.restart_progress(now);
        let _ = self.settle(job_id, now);
        Ok((committed.len(), requeued))
    }

    /// Counts, progress, rate and per-shard status of a job, when known.
    pub fn summary(&self, job_id: &str, now: u64) -> Option<JobSummary> {
        let run = self.jobs.get(job_id)?;
        let mut counts = [0u32; 4];
        let mut failures = Vec::new();
        for (i, s) in run.persisted.shards.iter().enumerate() {
            let slot = match s.state {
                ShardState::Done { .. } => 0,
                ShardState::Leased { .. } => 1,
                ShardState::Pending => 2,
                ShardState::Failed => 3,
            };
            counts[slot] += 1;
            if s.state == ShardState::Failed || (s.last_error.is_some() && slot != 0) {
                failures.push((i, s.clone()));
            }
        }
        let images_done = run.images_done();
        let shards = run
            .persisted
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let classes = run.job.shard_classes(i).len() as u32;
                let (phase, worker, classes_done, images_done) = match &s.state {
                    ShardState::Pending => (ShardPhase::Pending, None, 0, 0),
                    ShardState::Leased { worker_id, .. } => {
                        (ShardPhase::Leased, Some(worker_id.clone()), s.classes_done, s.images_done)
                    }
                    ShardState::Done { .. } => (ShardPhase::Done, None, classes, classes * run.job.spec.ipc as u32),
                    ShardState::Failed => (ShardPhase::Failed, None, 0, 0),
                };
                ShardStatus { index: i as u32, phase, attempts: s.attempts, classes, classes_done, images_done, worker }
            })
            .collect();
        let rate = run.rate(now, images_done);
        let remaining = run.job.images_total().saturating_sub(images_done) as f64;
        // No live worker, no estimate: the rate of the last minute is of workers that are gone.
        let eta = if run.state() != JobState::Running {
            0.0
        } else if rate > 0.0 && self.live_workers(now) > 0 {
            remaining / rate
        } else {
            f64::INFINITY
        };
        Some(JobSummary {
            job: run.job.clone(),
            state: run.state(),
            done: counts[0],
            running: counts[1],
            pending: counts[2],
            failed: counts[3],
            images_done,
            classes_done: run.classes_done(),
            images_per_second: rate,
            eta_seconds: eta,
            failures,
            finished_unix_ms: run.persisted.finished_unix_ms,
            run_started_ms: run.taken_on,
            shards,
            paused: run.persisted.paused.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mgd3_common::job::JobSpec;

    fn job(id: &str, classes: usize, per_shard: usize, attempts: u32) -> Arc<ResolvedJob> {
        let mut spec = JobSpec::from_toml(
            "dataset = \"/d\"\nclasses = \"all\"\nlabels = \"position\"\nipc = 2\n[models]\ndit = \"a\"\nvae_encoder = \"b\"\nvae_decoder = \"c\"",
        )
        .unwrap();
        spec.classes_per_shard = Some(per_shard);
        spec.max_attempts = attempts;
        spec.lease_timeout_s = 10;
        let names = (0..classes).map(|i| format!("c{i}")).collect::<Vec<_>>();
        let classes = spec.class_list(|| Ok(names)).unwrap();
        let shards = spec.plan_shards(classes.len());
        Arc::new(ResolvedJob { job_id: id.into(), fingerprint: "fp".into(), spec, classes, shards, created_unix_ms: 0 })
    }

    /// Registers (idempotently) and polls, as a worker does.
    fn poll(s: &mut Scheduler, w: &str, running: &[Running], draining: bool, now: u64) -> (PollDecision, Vec<String>) {
        s.register(w, now);
        s.poll(w, running, draining, now).unwrap()
    }

    fn lease(d: PollDecision) -> LeaseGrant {
        match d {
            PollDecision::Lease(l) => l,
            other => panic!("expected a lease, got {other:?}"),
        }
    }

    /// A job of `job`'s shape whose latents are cached (so jobs of one dataset share them).
    fn cached_job(id: &str, classes: usize, per_shard: usize) -> Arc<ResolvedJob> {
        let mut job = (*job(id, classes, per_shard, 3)).clone();
        job.spec.latent_cache = Some(mgd3_common::job::LatentCache::At("/cache".into()));
        Arc::new(job)
    }

    #[test]
    fn sweep_variants_run_on_the_worker_that_ran_their_classes_and_never_beside_their_encoding() {
        let mut s = Scheduler::new(1000, "e");
        // Two variants of one sweep (same data, cached latents), 4 shards of 2 classes each.
        s.add_job(cached_job("v1", 8, 2), None, &HashSet::new(), 0);
        s.add_job(cached_job("v2", 8, 2), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w1", &[], false, 0).0);
        let b = lease(poll(&mut s, "w2", &[], false, 0).0);
        let c = lease(poll(&mut s, "w3", &[], false, 0).0);
        let d = lease(poll(&mut s, "w4", &[], false, 0).0);
        assert_eq!([a.shard_index, b.shard_index, c.shard_index, d.shard_index], [0, 1, 2, 3]);
        assert!([&a, &b, &c, &d].iter().all(|l| l.job.job_id == "v1"));
        // A fifth worker gets v2's work, but not the classes v1 is encoding right now: there are
        // none it could take without, so it takes the costliest anyway (nothing else to do).
        let e = lease(poll(&mut s, "w5", &[], false, 0).0);
        assert_eq!((e.job.job_id.as_str(), e.shard_index), ("v2", 0));
        // w3 finishes v1's shard 2 and gets v2's shard 2 (the classes it just encoded), not the
        // costlier-in-order shard 1 that w2 is still encoding.
        s.complete("w3", &c.lease_id, 10).unwrap();
        let f = lease(poll(&mut s, "w3", &[], false, 10).0);
        assert_eq!((f.job.job_id.as_str(), f.shard_index), ("v2", 2));
        // w4 finishes; its own classes (shard 3) next.
        s.complete("w4", &d.lease_id, 11).unwrap();
        let g = lease(poll(&mut s, "w4", &[], false, 11).0);
        assert_eq!((g.job.job_id.as_str(), g.shard_index), ("v2", 3));
        // Jobs without a latent cache keep the costliest-first order.
        let mut plain = Scheduler::new(1000, "e");
        plain.add_job(job("p1", 8, 2, 3), None, &HashSet::new(), 0);
        plain.add_job(job("p2", 8, 2, 3), None, &HashSet::new(), 0);
        let leases: Vec<_> = (0..4).map(|i| lease(poll(&mut plain, &format!("w{i}"), &[], false, 0).0)).collect();
        plain.complete("w2", &leases[2].lease_id, 10).unwrap();
        plain.complete("w3", &leases[3].lease_id, 10).unwrap();
        let next = lease(poll(&mut plain, "w3", &[], false, 10).0);
        assert_eq!((next.job.job_id.as_str(), next.shard_index), ("p2", 0));
    }

    #[test]
    fn shards_are_leased_once_renewed_and_completed() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 3, 1, 3), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w1", &[], false, 0).0);
        let b = lease(poll(&mut s, "w2", &[], false, 0).0);
        assert_ne!(a.shard_index, b.shard_index);
        let c = lease(poll(&mut s, "w3", &[], false, 0).0);
        assert_eq!(s.complete("w3", &c.lease_id, 1).unwrap().1, Settled::Open);
        // A worker holding a lease gets no second one.
        let running = [Running { lease_id: a.lease_id.clone(), images_done: 1, classes_done: 0, image_steps_done: 0 }];
        assert_eq!(poll(&mut s, "w1", &running, false, 5_000).0, PollDecision::Wait(1000));
        // Renewed at 5 s: still held at 12 s; w2's lease (deadline 10 s) expired.
        let (decision, revoked) = poll(&mut s, "w1", &running, false, 12_000);
        assert_eq!((decision, revoked), (PollDecision::Wait(1000), vec![]));
        let (decision, revoked) = poll(
            &mut s,
            "w2",
            &[Running { lease_id: b.lease_id.clone(), images_done: 0, classes_done: 0, image_steps_done: 0 }],
            false,
            12_000,
        );
        assert_eq!(revoked, vec![b.lease_id.clone()]);
        // The expired shard is leased again, as a second attempt.
        let retry = lease(decision);
        assert_eq!((retry.shard_index, retry.attempt), (b.shard_index, 2));
        assert_eq!(s.complete("w1", &a.lease_id, 13_000).unwrap().1, Settled::Open);
        assert_eq!(s.complete("w1", &a.lease_id, 13_000), Err(SchedulerError::StaleLease(a.lease_id.clone())));
        let summary = s.summary("j", 13_000).unwrap();
        assert_eq!((summary.done, summary.pending, summary.running, summary.images_done), (2, 0, 1, 4));
        // A done shard's record counts it whole, whatever its last heartbeat said (w3 sent none).
        let record = &s.persisted("j").unwrap().shards[c.shard_index];
        assert_eq!((record.classes_done, record.images_done), (1, 2));
        assert_eq!(s.complete("w2", &retry.lease_id, 15_000).unwrap().1, Settled::Finished(JobState::Succeeded));
        assert_eq!(s.summary("j", 16_000).unwrap().finished_unix_ms, Some(15_000));
    }

    /// The worker waits for its completion's answer without heartbeats: however long the
    /// coordinator takes to verify it (a store down for minutes), the lease neither expires nor
    /// is its worker announced as silent; once the verification ends, a lease still held gets a
    /// whole timeout from then (the worker reports again, or it expires as any other).
    #[test]
    fn a_lease_does_not_expire_while_its_completion_is_verified() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 2, 1, 3), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w1", &[], false, 0).0);
        let b = lease(poll(&mut s, "w2", &[], false, 0).0);
        // w1 reports at 1 s, twice (it gave up on its first call and sent it again).
        let (held, shard) = s.begin_completion("w1", &a.lease_id).unwrap();
        assert_eq!((held.job_id.as_str(), shard), ("j", a.shard_index));
        s.begin_completion("w1", &a.lease_id).unwrap();
        assert!(matches!(s.begin_completion("w2", &a.lease_id), Err(SchedulerError::NotOwner { .. })));
        // w2 only polled at 0 s: its lease (timeout 10 s) expires, w1's does not; w1 is there.
        assert_eq!(s.live_workers(60_000), 1);
        s.note_departures(60_000);
        let left: Vec<_> = s.take_worker_events();
        assert!(
            left.iter().all(|e| !matches!(e, WorkerEvent::Left { worker_id, .. } if worker_id == "w1")),
            "{left:?}"
        );
        s.expire(60_000);
        let expired: Vec<_> = s.take_expired().into_iter().map(|e| e.lease_id).collect();
        assert_eq!(expired, vec![b.lease_id.clone()]);
        // The first call ends (the store failed it); the second still holds the lease.
        s.end_completion(&a.lease_id, 61_000);
        assert!(s.expire(200_000).is_empty() && s.take_expired().is_empty());
        // The second ends at 200 s: renewed until 210 s.
        s.end_completion(&a.lease_id, 200_000);
        assert!(s.expire(209_999).is_empty() && s.take_expired().is_empty());
        assert_eq!(s.lease("w1", &a.lease_id).unwrap().1, a.shard_index);
        s.expire(210_000);
        let expired: Vec<_> = s.take_expired().into_iter().map(|e| e.lease_id).collect();
        assert_eq!(expired, vec![a.lease_id.clone()]);
        // A completion that ends in `complete` leaves nothing behind.
        let retry = lease(poll(&mut s, "w3", &[], false, 210_000).0);
        s.begin_completion("w3", &retry.lease_id).unwrap();
        s.complete("w3", &retry.lease_id, 211_000).unwrap();
        s.end_completion(&retry.lease_id, 211_000);
        assert!(s.completing.is_empty());
        // The same completion sent again is known as done, by its worker only.
        assert_eq!(s.begin_completion("w3", &retry.lease_id), Err(SchedulerError::StaleLease(retry.lease_id.clone())));
        assert!(s.completed_by("w3", &retry.lease_id) && !s.completed_by("w1", &retry.lease_id));
        assert!(!s.completed_by("w1", &a.lease_id), "an expired lease is no completed one");
    }

    /// While the caller is not sure it holds the store, polls grant nothing (an idle worker is
    /// told to wait) but still renew the leases they report.
    #[test]
    fn polls_grant_nothing_while_granting_is_off_and_still_renew() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 2, 1, 3), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w1", &[], false, 0).0);
        s.set_granting(false);
        assert_eq!(poll(&mut s, "w2", &[], false, 1_000).0, PollDecision::Wait(1000));
        let running = [Running { lease_id: a.lease_id.clone(), images_done: 0, classes_done: 0, image_steps_done: 0 }];
        assert_eq!(poll(&mut s, "w1", &running, false, 9_000), (PollDecision::Wait(1000), vec![]));
        // Renewed at 9 s: held past its first deadline (10 s).
        assert!(s.expire(15_000).is_empty() && s.take_expired().is_empty());
        s.set_granting(true);
        let b = lease(poll(&mut s, "w2", &[], false, 15_000).0);
        assert_ne!(a.shard_index, b.shard_index);
    }

    #[test]
    fn progress_counts_classes_and_shards_as_workers_report_them() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 4, 2, 3), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w1", &[], false, 0).0);
        let running = [Running { lease_id: a.lease_id.clone(), images_done: 2, classes_done: 1, image_steps_done: 0 }];
        poll(&mut s, "w1", &running, false, 1);
        let summary = s.summary("j", 1).unwrap();
        assert_eq!((summary.classes_done, summary.images_done), (1, 2));
        let leased = &summary.shards[a.shard_index];
        assert_eq!(
            (leased.phase, leased.classes, leased.classes_done, leased.images_done, leased.worker.as_deref()),
            (ShardPhase::Leased, 2, 1, 2, Some("w1"))
        );
        s.complete("w1", &a.lease_id, 2).unwrap();
        let summary = s.summary("j", 2).unwrap();
        assert_eq!((summary.classes_done, summary.images_done), (2, 4));
        assert_eq!(
            (summary.shards[a.shard_index].phase, summary.shards[a.shard_index].classes_done),
            (ShardPhase::Done, 2)
        );
        assert_eq!(summary.shards[1 - a.shard_index].phase, ShardPhase::Pending);
    }

    #[test]
    fn an_excluded_worker_gets_no_lease_of_that_job() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 2, 1, 3), None, &HashSet::new(), 0);
        s.register("w", 0);
        assert_eq!(s.exclude_worker("j", "w", "its models differ"), Ok(true));
        assert_eq!(s.exclude_worker("j", "w", "its models differ"), Ok(false));
        assert_eq!(poll(&mut s, "w", &[], false, 1).0, PollDecision::Wait(1000));
        assert!(matches!(poll(&mut s, "v", &[], false, 1).0, PollDecision::Lease(_)));
        assert_eq!(s.exclude_worker("nope", "w", "x"), Err(SchedulerError::UnknownJob("nope".into())));
        // The reason is kept as data, for the live workers only.
        assert_eq!(s.live_exclusions("j", 2), vec![("w".to_owned(), "its models differ".to_owned())]);
        assert!(s.live_exclusions("j", 10_000).is_empty(), "w went silent");
    }

    #[test]
    fn an_expiry_found_by_a_poll_is_handed_to_the_caller() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 1, 1, 1), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w1", &[], false, 0).0);
        assert!(s.take_settled().is_empty());
        // Past the 10 s lease another worker's poll expires it; one attempt was allowed.
        poll(&mut s, "w2", &[], false, 10_001);
        assert_eq!(s.take_settled(), vec![("j".to_owned(), Settled::Finished(JobState::Failed))]);
        assert!(s.take_settled().is_empty(), "handed over once");
        assert_eq!(
            s.fail("w1", &a.lease_id, None, "late".into(), true, false, 10_002).unwrap_err(),
            SchedulerError::StaleLease(a.lease_id.clone())
        );
    }

    /// Progress is sampled at most once a second, but what changed in between counts: the rate
    /// right after a burst of renewals includes them, and a minute later it is 0 again.
    #[test]
    fn progress_between_samples_counts_in_the_rate() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 4, 4, 3), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w", &[], false, 30_000).0);
        for (at, images) in [(30_100, 2), (30_200, 4), (30_300, 6)] {
            let running = [Running {
                lease_id: a.lease_id.clone(),
                images_done: images,
                classes_done: images / 2,
                image_steps_done: 0,
            }];
            poll(&mut s, "w", &running, false, at);
        }
        let summary = s.summary("j", 30_300).unwrap();
        assert_eq!(summary.images_done, 6);
        // Since the first lease, at 30 s: the 30 s without a worker do not count.
        assert!((summary.images_per_second - 6.0 / 0.3).abs() < 1e-9, "{}", summary.images_per_second);
        // No progress for a minute: no rate, although the last change was never sampled.
        let running = [Running { lease_id: a.lease_id.clone(), images_done: 6, classes_done: 3, image_steps_done: 0 }];
        poll(&mut s, "w", &running, false, 30_900);
        assert_eq!(s.summary("j", 91_000).unwrap().images_per_second, 0.0);
    }

    /// A job held back grants nothing (its pending shards wait) while another job's do; let go,
    /// it grants again.
    #[test]
    fn a_held_back_job_grants_nothing_until_let_go() {
        let mut s = Scheduler::new(1000, "h");
        s.add_job(job("held", 2, 1, 3), None, &HashSet::new(), 0);
        s.add_job(job("other", 1, 1, 3), None, &HashSet::new(), 0);
        assert!(s.hold_back("held", true) && !s.hold_back("held", true));
        assert_eq!(lease(poll(&mut s, "w1", &[], false, 0).0).job.job_id, "other");
        assert!(matches!(poll(&mut s, "w2", &[], false, 0).0, PollDecision::Wait(_)), "a held-back shard was granted");
        assert!(s.hold_back("held", false));
        assert_eq!(lease(poll(&mut s, "w2", &[], false, 1).0).job.job_id, "held");
    }

    /// `coordinator run` runs its own job: a job recovered from the store beside it gets no lease
    /// (a sweep's dropped variants ran first, ahead of the run's own), while one submitted or
    /// resumed here does; `None` runs every job again.
    #[test]
    fn run_only_grants_the_runs_own_jobs_and_those_submitted_or_resumed_here() {
        let mut s = Scheduler::new(1000, "o");
        s.add_job(job("recovered", 2, 1, 3), Some(PersistedJob::default()), &HashSet::new(), 0);
        s.run_only(Some(HashSet::new()));
        assert!(matches!(poll(&mut s, "w1", &[], false, 0).0, PollDecision::Wait(_)), "nothing is the run's yet");
        s.add_job(job("mine", 1, 1, 3), None, &HashSet::new(), 0);
        assert_eq!(lease(poll(&mut s, "w1", &[], false, 0).0).job.job_id, "mine");
        assert!(matches!(poll(&mut s, "w2", &[], false, 0).0, PollDecision::Wait(_)), "a recovered job was run");
        s.resume("recovered", &HashSet::new(), 1).unwrap();
        assert_eq!(lease(poll(&mut s, "w2", &[], false, 1).0).job.job_id, "recovered");
        s.run_only(Some(["mine".to_owned()].into()));
        assert!(matches!(poll(&mut s, "w3", &[], false, 2).0, PollDecision::Wait(_)));
        s.run_only(None);
        assert_eq!(lease(poll(&mut s, "w3", &[], false, 2).0).job.job_id, "recovered");
    }

    /// A coordinator that did not run for a while gives its leases and workers that time back:
    /// a lease whose worker could not have renewed it during the stall does not expire at the
    /// wake-up, but a stall later than its (moved) deadline.
    #[test]
    fn a_stall_of_the_coordinator_moves_every_lease_deadline_on() {
        // Heartbeats of 10 s: a worker is gone after 30 s of silence.
        let mut s = Scheduler::new(10_000, "e");
        let mut slow = (*job("j", 1, 1, 3)).clone();
        slow.spec.lease_timeout_s = 30;
        s.add_job(Arc::new(slow), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w1", &[], false, 0).0);
        // Frozen from 10 s to 50 s: at the wake-up the lease has 20 s left, as at 10 s.
        s.stalled(40_000);
        s.note_departures(50_000);
        assert!(s.take_worker_events().is_empty(), "the worker was not silent: the coordinator was");
        assert!(s.expire(50_000).is_empty() && s.take_expired().is_empty());
        assert!(s.expire(69_999).is_empty());
        assert!(s.lease("w1", &a.lease_id).is_ok());
        assert_eq!(s.expire(70_000), vec![("j".to_owned(), Settled::Open)]);
    }

    /// Each poll checks for expired leases in one comparison until one can have expired; a
    /// lease with a shorter timeout granted after a scan still expires on time.
    #[test]
    fn leases_expire_on_time_whatever_was_scanned_before() {
        let mut s = Scheduler::new(1000, "e");
        let mut slow = (*job("slow", 1, 1, 3)).clone();
        slow.spec.lease_timeout_s = 100;
        s.add_job(Arc::new(slow), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w1", &[], false, 0).0);
        // A scan at 50 s finds nothing and learns that nothing expires before 100 s…
        assert!(s.expire(50_000).is_empty());
        // …then a job with 10 s leases arrives and its lease is granted at 60 s.
        s.add_job(job("fast", 1, 1, 3), None, &HashSet::new(), 60_000);
        let b = lease(poll(&mut s, "w2", &[], false, 60_000).0);
        assert_eq!(b.job.job_id, "fast");
        let running = [Running { lease_id: a.lease_id.clone(), images_done: 0, classes_done: 0, image_steps_done: 0 }];
        poll(&mut s, "w1", &running, false, 69_000);
        assert!(s.take_settled().is_empty(), "nothing has expired at 69 s");
        poll(&mut s, "w1", &running, false, 70_001);
        assert_eq!(s.take_settled(), vec![("fast".to_owned(), Settled::Open)], "the fast lease expired at 70 s");
        assert!(matches!(
            s.fail("w2", &b.lease_id, None, "late".into(), true, false, 70_002),
            Err(SchedulerError::StaleLease(_))
        ));
        // w1's own lease, renewed at 70 s, holds until 170 s; a poll that forgets it releases it.
        assert!(s.lease("w1", &a.lease_id).is_ok());
        poll(&mut s, "w1", &[], false, 71_000);
        assert!(s.lease("w1", &a.lease_id).is_err(), "w1 no longer runs it");
    }

    /// Four shards take 1 s each; the fifth's worker straggles. Once it has run
    /// [`BACKUP_AFTER`] × the job's pace and nothing waits, an idle worker gets a backup lease of
    /// it, and a second idle worker a second while the first has no rate yet (insurance against
    /// a backup that straggles too), a third nothing ([`MAX_BACKUPS`]); the first backup
    /// completes first and finishes the job, and the straggler and the other backup are told to
    /// stop at their next poll.
    #[test]
    fn a_straggling_shard_gets_at_most_two_backup_leases_and_the_first_to_complete_wins() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 5, 1, 3), None, &HashSet::new(), 0);
        let leases: Vec<LeaseGrant> = ["w0", "w1", "w2", "w3"].map(|w| lease(poll(&mut s, w, &[], false, 0).0)).into();
        for (w, l) in ["w0", "w1", "w2", "w3"].iter().zip(&leases) {
            s.complete(w, &l.lease_id, 1000).unwrap();
        }
        let straggler = lease(poll(&mut s, "w3", &[], false, 1000).0);
        // Pace: 4 shards in 1 s each. Just short of BACKUP_AFTER × 1 s the straggler is not
        // behind enough…
        let at = |share: f64| 1000 + (share * 1000.0) as u64;
        poll(&mut s, "w3", &held(&straggler), false, at(BACKUP_AFTER - 0.1));
        assert_eq!(poll(&mut s, "w1", &[], false, at(BACKUP_AFTER - 0.1)).0, PollDecision::Wait(1000));
        // …then it is: w1 gets a backup, w2 a second, w0 nothing more.
        let backup = lease(poll(&mut s, "w1", &[], false, at(BACKUP_AFTER)).0);
        assert!(backup.backup && !straggler.backup);
        assert_eq!((backup.shard_index, backup.attempt), (straggler.shard_index, straggler.attempt));
        assert_ne!(backup.lease_id, straggler.lease_id);
        assert_ne!(backup.attempt_id, straggler.attempt_id, "its files stage apart");
        let second = lease(poll(&mut s, "w2", &[], false, at(BACKUP_AFTER) + 100).0);
        assert!(second.backup);
        assert_eq!(second.shard_index, straggler.shard_index);
        assert_ne!(second.attempt_id, backup.attempt_id, "its files stage apart");
        assert_eq!(poll(&mut s, "w0", &[], false, at(BACKUP_AFTER) + 200).0, PollDecision::Wait(1000));
        // All three renew; the first backup completes first and the job is done.
        assert_eq!(poll(&mut s, "w1", &held(&backup), false, 2000), (PollDecision::Wait(1000), vec![]));
        assert_eq!(poll(&mut s, "w2", &held(&second), false, 2000), (PollDecision::Wait(1000), vec![]));
        assert_eq!(poll(&mut s, "w3", &held(&straggler), false, 2000), (PollDecision::Wait(1000), vec![]));
        assert_eq!(s.complete("w1", &backup.lease_id, 2300).unwrap().1, Settled::Finished(JobState::Succeeded));
        let done = &s.persisted("j").unwrap().shards[straggler.shard_index];
        assert!(
            matches!(&done.state, ShardState::Done { attempt_id, .. } if *attempt_id == backup.attempt_id),
            "{done:?}"
        );
        assert_eq!(done.attempts, 1, "a backup spends no attempt");
        for (w, l) in [("w3", &straggler), ("w2", &second)] {
            let (_, revoked) = poll(&mut s, w, &held(l), false, 2400);
            assert_eq!(revoked, vec![l.lease_id.clone()]);
            assert!(matches!(s.complete(w, &l.lease_id, 2500), Err(SchedulerError::StaleLease(_))));
        }
    }

    /// A lease whose progress stops (a read stalled before its next class) looks slower with
    /// every heartbeat, never closer to its end.
    #[test]
    fn a_stalled_lease_is_estimated_to_need_longer_as_time_passes() {
        let rate = StepRate { first_ms: 0, first: 100, last_ms: 2000, last: 300 };
        assert_eq!(rate.left_ms(1300, 2000, 4000), Some(10_000.0), "100 image-steps a second, 1,000 left");
        // Between heartbeats the clock runs down…
        assert_eq!(rate.left_ms(1300, 3000, 4000), Some(9_000.0));
        // …but silent for longer than the stall time, the lease is rated up to now.
        let later = [6001, 8000, 16_000].map(|now| rate.left_ms(1300, now, 4000).unwrap());
        assert!(later.windows(2).all(|w| w[1] > w[0]) && later[0] > 10_000.0, "{later:?}");
        assert_eq!(StepRate { last_ms: 500, ..rate }.left_ms(1300, 2000, 4000), None, "reports too close");
    }

    /// With DiT progress in the heartbeats, a backup goes to the shard whose own rate says it
    /// ends after a fresh run would — before BACKUP_AFTER —, never to one whose rate says it
    /// ends first — even past BACKUP_AFTER —; no second backup once the first's rate says it ends
    /// first; a second when the first straggles too, and at [`MAX_BACKUPS`] the slowest backup
    /// is replaced.
    #[test]
    fn backups_follow_the_dit_rate_the_heartbeats_report() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 6, 1, 3), None, &HashSet::new(), 0);
        let first: Vec<LeaseGrant> = ["w0", "w1", "w2", "w3"].map(|w| lease(poll(&mut s, w, &[], false, 0).0)).into();
        for (w, l) in ["w0", "w1", "w2", "w3"].iter().zip(&first) {
            s.complete(w, &l.lease_id, 4000).unwrap();
        }
        // Pace: 4 s a shard of one class (IPC 2 × 50 steps = 100 image-steps).
        let steady = lease(poll(&mut s, "w0", &[], false, 4000).0);
        let slow = lease(poll(&mut s, "w1", &[], false, 4000).0);
        let report = |l: &LeaseGrant, steps: u64| {
            [Running { lease_id: l.lease_id.clone(), images_done: 0, classes_done: 0, image_steps_done: steps }]
        };
        // 25 image-steps a second (done in 4 s) and 5 (20 s).
        poll(&mut s, "w0", &report(&steady, 10), false, 4100);
        poll(&mut s, "w1", &report(&slow, 2), false, 4100);
        poll(&mut s, "w0", &report(&steady, 35), false, 5100);
        poll(&mut s, "w1", &report(&slow, 7), false, 5100);
        // 1.1 s in, short of BACKUP_AFTER × 4 s: the slow shard's rate already tells.
        let backup = lease(poll(&mut s, "w2", &[], false, 5100).0);
        assert!(backup.backup);
        assert_eq!(backup.shard_index, slow.shard_index);
        // The backup's rate says it ends before a fresh run would (25 image-steps a second):
        // no second backup, and the steady one never gets one, even once it has run past
        // BACKUP_AFTER × its pace.
        poll(&mut s, "w2", &report(&backup, 5), false, 5200);
        poll(&mut s, "w2", &report(&backup, 30), false, 6200);
        assert_eq!(poll(&mut s, "w3", &[], false, 6200).0, PollDecision::Wait(1000));
        poll(&mut s, "w0", &report(&steady, 60), false, 6100);
        poll(&mut s, "w1", &report(&slow, 12), false, 6100);
        assert_eq!(poll(&mut s, "w3", &[], false, 6500).0, PollDecision::Wait(1000));
        // Then the backup straggles too (3 image-steps a second from 7.2 s): a second backup,
        // the first running on.
        poll(&mut s, "w2", &report(&backup, 31), false, 7200);
        poll(&mut s, "w2", &report(&backup, 34), false, 8200);
        poll(&mut s, "w1", &report(&slow, 22), false, 8200);
        let again = lease(poll(&mut s, "w3", &[], false, 8200).0);
        assert!(again.backup);
        assert_eq!(again.shard_index, slow.shard_index);
        assert_ne!(again.lease_id, backup.lease_id);
        assert_eq!(poll(&mut s, "w2", &report(&backup, 35), false, 8300), (PollDecision::Wait(1000), vec![]));
        // It straggles as well, worse than the first: at MAX_BACKUPS the slowest is replaced.
        poll(&mut s, "w3", &report(&again, 1), false, 8300);
        poll(&mut s, "w3", &report(&again, 2), false, 9300);
        poll(&mut s, "w2", &report(&backup, 38), false, 9300);
        poll(&mut s, "w1", &report(&slow, 27), false, 9300);
        poll(&mut s, "w0", &report(&steady, 100), false, 9300);
        let third = lease(poll(&mut s, "w4", &[], false, 9400).0);
        assert!(third.backup);
        assert_eq!(third.shard_index, slow.shard_index);
        let (_, revoked) = poll(&mut s, "w3", &report(&again, 3), false, 9500);
        assert_eq!(revoked, vec![again.lease_id.clone()], "the slowest backup is told to stop");
        assert_eq!(poll(&mut s, "w2", &report(&backup, 39), false, 9500), (PollDecision::Wait(1000), vec![]));
    }

    /// A job of 5 one-class shards: four done by 2 s (1 s each, so backups are judged by that
    /// pace), the fifth leased to `w3` at 0 and still running; workers w0–w3 registered.
    fn one_straggler_left() -> (Scheduler, LeaseGrant) {
        one_straggler_left_of(3)
    }

    /// [`one_straggler_left`] for a job of `attempts` attempts per shard.
    fn one_straggler_left_of(attempts: u32) -> (Scheduler, LeaseGrant) {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 5, 1, attempts), None, &HashSet::new(), 0);
        let leases: Vec<LeaseGrant> = ["w0", "w1", "w2", "w3"].map(|w| lease(poll(&mut s, w, &[], false, 0).0)).into();
        for (w, l) in ["w0", "w1", "w2"].iter().zip(&leases) {
            s.complete(w, &l.lease_id, 1000).unwrap();
        }
        let last = lease(poll(&mut s, "w0", &[], false, 1000).0);
        s.complete("w0", &last.lease_id, 2000).unwrap();
        (s, leases[3].clone())
    }

    /// What a worker running `l` reports: no progress counted.
    fn held(l: &LeaseGrant) -> [Running; 1] {
        [Running { lease_id: l.lease_id.clone(), images_done: 0, classes_done: 0, image_steps_done: 0 }]
    }

    /// A shard out of attempts whose own lease expires while a backup runs it does not fail: the
    /// backup (an attempt under way) takes over (a job with max_attempts 1 failed 0.3 s after a
    /// live worker had started the shard's backup).
    #[test]
    fn a_running_backup_takes_over_an_expired_lease_out_of_attempts() {
        let (mut s, straggler) = one_straggler_left_of(1);
        let backup = lease(poll(&mut s, "w1", &[], false, 2000).0);
        assert!(backup.backup && backup.shard_index == straggler.shard_index);
        // w3 never renews: its lease expires (10 s) while w1 renews the backup.
        for now in (3000..=11_000).step_by(1000) {
            poll(&mut s, "w1", &held(&backup), false, now);
        }
        let (_, revoked) = poll(&mut s, "w1", &held(&backup), false, 12_000);
        assert!(revoked.is_empty());
        assert_eq!(s.state("j"), Some(JobState::Running));
        let shard = &s.persisted("j").unwrap().shards[backup.shard_index];
        assert!(matches!(&shard.state, ShardState::Leased { worker_id, .. } if worker_id == "w1"), "{shard:?}");
        assert_eq!(s.complete("w1", &backup.lease_id, 12_500).unwrap().1, Settled::Finished(JobState::Succeeded));
    }

    /// Leases recovered at a coordinator start wait a short grace for their workers, not a
    /// whole lease timeout: one whose worker comes back renews it; one whose worker went with
    /// the old coordinator (a requeued allocation) is released without spending an attempt.
    #[test]
    fn recovered_leases_wait_a_grace_for_their_workers_then_are_released() {
        let mut before = Scheduler::new(1000, "e");
        let mut long = (*job("j", 3, 1, 1)).clone();
        long.spec.lease_timeout_s = 600;
        let long = Arc::new(long);
        before.add_job(long.clone(), None, &HashSet::new(), 0);
        let back = lease(poll(&mut before, "back", &[], false, 0).0);
        let gone = lease(poll(&mut before, "gone", &[], false, 0).0);
        let persisted = before.persisted("j").unwrap().clone();

        let mut s = Scheduler::new(1000, "e2");
        s.add_job(long, Some(persisted), &HashSet::new(), 100_000);
        let grace = restored_lease_grace_ms(1000, 600_000);
        assert_eq!(grace, RESTORED_LEASE_GRACE_MS);
        // `back` re-registers and renews within the grace; `gone` never does.
        poll(&mut s, "back", &held(&back), false, 110_000);
        poll(&mut s, "back", &held(&back), false, 100_000 + grace + 1);
        let expired = s.take_expired();
        assert_eq!(expired.len(), 1, "{expired:?}");
        assert!(expired[0].orphaned && expired[0].requeued && expired[0].lease_id == gone.lease_id);
        let shard = &s.persisted("j").unwrap().shards[gone.shard_index];
        assert_eq!((shard.attempts, shard.last_error.is_none()), (0, true), "no attempt spent, no error");
        assert!(
            matches!(&s.persisted("j").unwrap().shards[back.shard_index].state, ShardState::Leased { worker_id, .. } if worker_id == "back")
        );
        // The released shard runs again on its first (and only) attempt.
        let again = lease(poll(&mut s, "new", &[], false, 100_000 + grace + 2).0);
        assert_eq!((again.shard_index, again.attempt), (gone.shard_index, 1));
        // `back`'s lease is an ordinary one again: it expires a lease timeout after its last renewal.
        assert!(s.take_expired().is_empty());
        assert_eq!(restored_lease_grace_ms(20_000, 120_000), 60_000, "three heartbeats when longer");
        assert_eq!(restored_lease_grace_ms(1000, 10_000), 10_000, "never past the lease timeout");
    }

    /// When the shard's own lease fails, its backup becomes the shard's lease (an attempt)
    /// instead of the shard waiting for another worker; a backup that fails or expires changes
    /// nothing, and the shard may get another.
    #[test]
    fn a_backup_takes_over_a_failed_lease_and_a_failed_backup_changes_nothing() {
        let (mut s, straggler) = one_straggler_left();
        // A backup that fails is dropped; the shard's lease runs on and a second backup comes.
        let first = lease(poll(&mut s, "w1", &[], false, 2000).0);
        assert!(first.backup);
        assert_eq!(s.fail("w1", &first.lease_id, None, "oom".into(), true, false, 2100).unwrap().1, Settled::Open);
        assert!(matches!(s.persisted("j").unwrap().shards[3].state, ShardState::Leased { .. }));
        assert_eq!(s.persisted("j").unwrap().shards[3].last_error, None, "a backup's failure is not the shard's");
        let second = lease(poll(&mut s, "w2", &[], false, 2200).0);
        assert!(second.backup);
        // Now the shard's own lease fails: the backup takes over as attempt 2.
        assert_eq!(
            s.fail("w3", &straggler.lease_id, None, "node lost".into(), true, false, 2300).unwrap().1,
            Settled::Open
        );
        let shard = &s.persisted("j").unwrap().shards[3];
        assert_eq!(shard.attempts, 2);
        assert!(
            matches!(&shard.state, ShardState::Leased { lease_id, worker_id, .. } if *lease_id == second.lease_id && worker_id == "w2")
        );
        assert_eq!(poll(&mut s, "w2", &held(&second), false, 2400), (PollDecision::Wait(1000), vec![]));
        // Its lease now expires like any (10 s without renewal).
        poll(&mut s, "w0", &[], false, 12_401);
        assert!(matches!(s.persisted("j").unwrap().shards[3].state, ShardState::Pending | ShardState::Leased { .. }));
        assert!(s.complete("w2", &second.lease_id, 12_402).is_err(), "expired");
    }

    /// With two backups running, the shard's own lease fails: the first backup takes over (an
    /// attempt) and the second stays a backup, which may still win; the one that took over is
    /// then told to stop.
    #[test]
    fn of_two_backups_one_takes_over_a_failed_lease_and_the_other_may_still_win() {
        let (mut s, straggler) = one_straggler_left();
        let first = lease(poll(&mut s, "w1", &[], false, 2000).0);
        let second = lease(poll(&mut s, "w2", &[], false, 2000).0);
        assert!(first.backup && second.backup && first.shard_index == 3 && second.shard_index == 3);
        s.fail("w3", &straggler.lease_id, None, "node lost".into(), true, false, 2100).unwrap();
        let shard = &s.persisted("j").unwrap().shards[3];
        assert_eq!(shard.attempts, 2);
        assert!(matches!(&shard.state, ShardState::Leased { lease_id, .. } if *lease_id == first.lease_id));
        // Both still hold what they run.
        assert_eq!(poll(&mut s, "w1", &held(&first), false, 2200), (PollDecision::Wait(1000), vec![]));
        assert_eq!(poll(&mut s, "w2", &held(&second), false, 2200), (PollDecision::Wait(1000), vec![]));
        // The remaining backup completes first.
        assert_eq!(s.complete("w2", &second.lease_id, 2500).unwrap().1, Settled::Finished(JobState::Succeeded));
        let done = &s.persisted("j").unwrap().shards[3];
        assert!(matches!(&done.state, ShardState::Done { attempt_id, .. } if *attempt_id == second.attempt_id));
        let (_, revoked) = poll(&mut s, "w1", &held(&first), false, 2600);
        assert_eq!(revoked, vec![first.lease_id.clone()]);
    }

    #[test]
    fn the_rate_counts_the_last_minute_of_this_run_only() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 4, 1, 3), None, &HashSet::new(), 0);
        // Nobody works for five minutes; then a worker commits a shard (2 images) in ten seconds:
        // the rate is that shard's, the wait for a worker does not count.
        let a = lease(poll(&mut s, "w", &[], false, 300_000).0);
        poll(&mut s, "w", &held(&a), false, 309_000);
        s.complete("w", &a.lease_id, 310_000).unwrap();
        let summary = s.summary("j", 310_000).unwrap();
        assert!((summary.images_per_second - 2.0 / 10.0).abs() < 1e-9, "{}", summary.images_per_second);
        assert!((summary.eta_seconds - 6.0 / (2.0 / 10.0)).abs() < 1e-6, "{}", summary.eta_seconds);
        // The worker goes (silent for more than three heartbeats): the rate stays, with no ETA.
        let gone = s.summary("j", 313_500).unwrap();
        assert!(gone.images_per_second > 0.0 && gone.eta_seconds.is_infinite(), "{gone:?}");
        poll(&mut s, "w", &[], false, 314_000);
        assert!(s.summary("j", 314_000).unwrap().eta_seconds.is_finite());
        // A minute without progress: no rate, so no ETA.
        let idle = s.summary("j", 371_000).unwrap();
        assert_eq!(idle.images_per_second, 0.0);
        assert!(idle.eta_seconds.is_infinite());
        assert_eq!(idle.run_started_ms, 0);
        // Minutes later, past the rate window's samples, the run still began when it was taken on
        // ("done in … since it last started here" shrank as the window slid).
        for at in [380_000, 450_000] {
            let next = lease(poll(&mut s, "w", &[], false, at).0);
            poll(&mut s, "w", &held(&next), false, at + 500);
            s.complete("w", &next.lease_id, at + 1_000).unwrap();
        }
        assert_eq!(s.summary("j", 452_000).unwrap().run_started_ms, 0);
        // A first lease that ends in an exclusion (the worker cannot load the models) starts
        // nothing: the rate waits for the lease that works.
        let mut excluded = Scheduler::new(1000, "g");
        excluded.add_job(job("j", 4, 1, 3), None, &HashSet::new(), 0);
        let bad = lease(poll(&mut excluded, "bad", &[], false, 10_000).0);
        excluded.exclude("bad", &bad.lease_id, "cannot load the models".into(), 10_500).unwrap();
        let good = lease(poll(&mut excluded, "good", &[], false, 50_000).0);
        poll(&mut excluded, "good", &held(&good), false, 59_000);
        excluded.complete("good", &good.lease_id, 60_000).unwrap();
        let rate = excluded.summary("j", 60_000).unwrap().images_per_second;
        assert!((rate - 2.0 / 10.0).abs() < 1e-9, "{rate}");
        // Work committed before a restart never counts as this run's.
        let mut again = Scheduler::new(1000, "f");
        again.add_job(job("j", 4, 1, 3), None, &HashSet::from([0, 1]), 400_000);
        assert_eq!(again.summary("j", 401_000).unwrap().images_per_second, 0.0);
    }

    /// A job recorded with a lease timeout under two of this coordinator's heartbeats (submitted
    /// to a faster one, recovered by this one) gets two heartbeats: a healthy worker renewing at
    /// every heartbeat keeps its lease, and the worker is told the same timeout.
    #[test]
    fn leases_live_at_least_two_heartbeats() {
        let mut s = Scheduler::new(15_000, "h");
        s.add_job(job("j", 1, 1, 2), None, &HashSet::new(), 0);
        let granted = lease(poll(&mut s, "w", &[], false, 0).0);
        assert_eq!(
            (granted.timeout_ms, granted.deadline_ms),
            (30_000, 30_000),
            "10 s asked, two 15 s heartbeats given"
        );
        // The job's own 10 s would have expired the lease before the first renewal.
        assert!(s.expire(14_000).is_empty() && s.take_expired().is_empty());
        let running =
            Running { lease_id: granted.lease_id.clone(), images_done: 0, classes_done: 0, image_steps_done: 0 };
        poll(&mut s, "w", std::slice::from_ref(&running), false, 15_000);
        assert!(s.expire(40_000).is_empty() && s.take_expired().is_empty(), "renewed at 15 s, alive at 40 s");
        assert_eq!(lease_timeout_ms(60, 15_000), 60_000, "a longer timeout of the job is kept");
    }

    /// A worker in a crash loop (it takes a lease, dies, and comes back after the lease
    /// expired) costs the shard one attempt, not all of them: expiries on one worker in a row
    /// count once, and after two in a row the worker is set aside (one event) while another
    /// worker takes the shard. The set-aside ends after its period, and a renewal ends the streak.
    #[test]
    fn a_crash_looping_worker_is_set_aside_and_spends_one_attempt() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 2, 1, 2), None, &HashSet::new(), 0);
        let first = lease(poll(&mut s, "bad", &[], false, 0).0);
        assert_eq!((first.shard_index, first.attempt), (0, 1));
        // Back after the 10 s lease expired: the same shard again, its second attempt.
        let second = lease(poll(&mut s, "bad", &[], false, 10_001).0);
        assert_eq!((second.shard_index, second.attempt), (0, 2));
        assert!(s.take_worker_events().is_empty(), "one expiry is no crash loop");
        let expired = ExpiredLease {
            job_id: "j".into(),
            shard: 0,
            lease_id: first.lease_id.clone(),
            worker_id: "bad".into(),
            requeued: true,
            exited: false,
            orphaned: false,
        };
        assert_eq!(s.take_expired(), vec![expired], "every expiry is told, once");
        assert!(s.take_expired().is_empty());
        // The second expiry in a row on `bad` costs nothing and sets `bad` aside.
        let (decision, _) = poll(&mut s, "bad", &[], false, 20_002);
        assert_eq!(decision, PollDecision::Wait(1000), "a set-aside worker gets no lease");
        let events = s.take_worker_events();
        assert_eq!(
            events,
            vec![WorkerEvent::SetAside {
                worker_id: "bad".into(),
                expired_in_a_row: 2,
                until_ms: 20_002 + SET_ASIDE_MS
            }]
        );
        assert_eq!(s.state("j"), Some(JobState::Running), "max_attempts 2 is not spent by one worker");
        let rescued = lease(poll(&mut s, "good", &[], false, 20_003).0);
        assert_eq!((rescued.shard_index, rescued.attempt), (0, 2));
        assert_eq!(s.set_aside(20_004), vec![("bad".to_owned(), 20_002 + SET_ASIDE_MS)]);
        assert!(matches!(poll(&mut s, "bad", &[], false, 30_000).0, PollDecision::Wait(_)));
        // Status says so (a set-aside worker polls and looks idle otherwise).
        assert_eq!(s.live_workers_excluded("j", 30_500), 1);
        let said = s.live_exclusions("j", 30_500);
        assert!(said.len() == 1 && said[0].0 == "bad" && said[0].1.starts_with("set aside for "), "{said:?}");
        // After the period `bad` may lease again (shard 1); renewing ends its streak.
        let back = lease(poll(&mut s, "bad", &[], false, 20_002 + SET_ASIDE_MS).0);
        assert_eq!(back.shard_index, 1);
        let running = Running { lease_id: back.lease_id.clone(), images_done: 0, classes_done: 0, image_steps_done: 0 };
        poll(&mut s, "bad", std::slice::from_ref(&running), false, 20_003 + SET_ASIDE_MS);
        assert!(s.set_aside(20_004 + SET_ASIDE_MS).is_empty());
        assert!(s.take_worker_events().is_empty());
        // A different worker in between: expiries on two workers each count.
        let mut t = Scheduler::new(1000, "e");
        t.add_job(job("k", 1, 1, 2), None, &HashSet::new(), 0);
        lease(poll(&mut t, "a", &[], false, 0).0);
        lease(poll(&mut t, "b", &[], false, 10_001).0);
        poll(&mut t, "c", &[], false, 20_002);
        assert_eq!(t.state("k"), Some(JobState::Failed), "two workers, two attempts");
    }

    /// Classes a failed or retried attempt committed stay counted: a failed job's status says how
    /// many classes are on disk, not 0, and a new attempt that has not yet re-found their markers
    /// does not make the count go back.
    #[test]
    fn committed_classes_stay_counted_after_failures() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 3, 3, 2), None, &HashSet::new(), 0);
        let first = lease(poll(&mut s, "w", &[], false, 0).0);
        let progress = |lease: &LeaseGrant, classes| Running {
            lease_id: lease.lease_id.clone(),
            images_done: 2 * classes,
            classes_done: classes,
            image_steps_done: 0,
        };
        poll(&mut s, "w", &[progress(&first, 2)], false, 1);
        assert_eq!(s.summary("j", 2).unwrap().classes_done, 2);
        s.fail("w", &first.lease_id, Some("c2".into()), "decode error".into(), true, false, 3).unwrap();
        let summary = s.summary("j", 4).unwrap();
        assert_eq!((summary.classes_done, summary.images_done), (2, 4), "requeued, its commits kept");
        let second = lease(poll(&mut s, "w", &[], false, 5).0);
        poll(&mut s, "w", &[progress(&second, 0)], false, 6);
        assert_eq!(s.summary("j", 7).unwrap().classes_done, 2, "a new attempt does not lower the count");
        s.fail("w", &second.lease_id, Some("c2".into()), "decode error".into(), true, false, 8).unwrap();
        let failed = s.summary("j", 9).unwrap();
        assert_eq!((failed.state, failed.classes_done, failed.images_done), (JobState::Failed, 2, 4));
    }

    /// A shard released (SIGTERM) right after commits its last heartbeat did not count keeps
    /// them counted from the release's own count; another worker's report, or a count above the
    /// shard's classes, changes nothing.
    #[test]
    fn a_released_shard_keeps_the_classes_its_release_reports_committed() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 4, 4, 2), None, &HashSet::new(), 0);
        let own = lease(poll(&mut s, "w", &[], false, 0).0);
        let beat = Running { lease_id: own.lease_id.clone(), images_done: 2, classes_done: 1, image_steps_done: 0 };
        poll(&mut s, "w", &[beat], false, 1);
        s.note_committed("intruder", &own.lease_id, 4);
        assert_eq!(s.summary("j", 2).unwrap().classes_done, 1);
        s.note_committed("w", &own.lease_id, 3);
        s.fail("w", &own.lease_id, None, "stopping".into(), true, true, 3).unwrap();
        let summary = s.summary("j", 4).unwrap();
        assert_eq!((summary.classes_done, summary.images_done), (3, 6), "released, its commits kept");
        assert_eq!(s.persisted("j").unwrap().shards[0].attempts, 0, "a release spends no attempt");
        let again = lease(poll(&mut s, "w", &[], false, 5).0);
        s.note_committed("w", &again.lease_id, 9);
        assert_eq!(s.summary("j", 6).unwrap().classes_done, 4, "never above the shard's classes");
    }

    /// A done shard whose class lost its marker is distilled again: pending, the job running.
    #[test]
    fn a_reopened_shard_runs_again() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 2, 1, 2), None, &HashSet::from([0, 1]), 0);
        assert_eq!(s.state("j"), Some(JobState::Succeeded));
        assert!(s.reopen("j", 1) && !s.reopen("j", 1), "only a done shard reopens");
        assert_eq!(s.state("j"), Some(JobState::Running));
        let again = lease(poll(&mut s, "w", &[], false, 1).0);
        assert_eq!((again.shard_index, again.attempt), (1, 1));
        let (_, settled) = s.complete("w", &again.lease_id, 2).unwrap();
        assert_eq!(settled, Settled::Finished(JobState::Succeeded));
    }

    #[test]
    fn attempt_budget_fails_the_job_naming_the_shard() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 2, 1, 2), None, &HashSet::new(), 0);
        let first = lease(poll(&mut s, "w", &[], false, 0).0);
        assert_eq!(first.shard_index, 0);
        s.fail("w", &first.lease_id, Some("c0".into()), "decode error".into(), true, false, 1).unwrap();
        let again = lease(poll(&mut s, "w", &[], false, 2).0);
        assert_eq!((again.shard_index, again.attempt), (0, 2));
        s.fail("w", &again.lease_id, Some("c0".into()), "decode error".into(), true, false, 3).unwrap();
        let other = lease(poll(&mut s, "w", &[], false, 4).0);
        assert_eq!(other.shard_index, 1);
        let (_, settled) = s.complete("w", &other.lease_id, 5).unwrap();
        assert_eq!(settled, Settled::Finished(JobState::Failed));
        let summary = s.summary("j", 6).unwrap();
        assert_eq!(summary.failures.len(), 1);
        assert_eq!(summary.failures[0].1.last_error.as_ref().unwrap().wnid.as_deref(), Some("c0"));
    }

    #[test]
    fn non_retryable_errors_fail_at_once_and_releases_cost_nothing() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 2, 1, 3), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w", &[], false, 0).0);
        s.fail("w", &a.lease_id, None, "shutting down".into(), true, true, 1).unwrap();
        assert_eq!(s.persisted("j").unwrap().shards[0].attempts, 0);
        let a = lease(poll(&mut s, "w", &[], false, 2).0);
        assert_eq!(a.shard_index, 0);
        s.fail("w", &a.lease_id, Some("c0".into()), "class folder missing".into(), false, false, 3).unwrap();
        assert_eq!(s.persisted("j").unwrap().shards[0].state, ShardState::Failed);
    }

    #[test]
    fn expiry_requeues_and_other_workers_cannot_steal() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 1, 1, 2), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w1", &[], false, 0).0);
        assert!(matches!(s.complete("w2", &a.lease_id, 1), Err(SchedulerError::NotOwner { .. })));
        assert_eq!(poll(&mut s, "w2", &[], false, 5_000).0, PollDecision::Wait(1000));
        let b = lease(poll(&mut s, "w2", &[], false, 10_001).0);
        assert_eq!((b.shard_index, b.attempt), (0, 2));
        assert!(matches!(s.complete("w1", &a.lease_id, 10_002), Err(SchedulerError::StaleLease(_))));
        // Second expiry exhausts the budget.
        s.expire(30_000);
        assert_eq!(s.state("j"), Some(JobState::Failed));
    }

    #[test]
    fn recovery_trusts_markers_and_keeps_live_leases() {
        let mut s = Scheduler::new(1000, "e1");
        let j = job("j", 4, 1, 3);
        s.add_job(j.clone(), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w1", &[], false, 0).0);
        let b = lease(poll(&mut s, "w2", &[], false, 0).0);
        s.complete("w1", &a.lease_id, 1).unwrap();
        let saved = s.persisted("j").unwrap().clone();
        // A new coordinator: shard 0 has markers, shard 2 too (its worker committed but never
        // reported), shard 1 is still leased by w2 who keeps renewing.
        let mut restarted = Scheduler::new(1000, "e2");
        restarted.add_job(j, Some(saved), &HashSet::from([0, 2]), 2);
        let running = [Running { lease_id: b.lease_id.clone(), images_done: 0, classes_done: 0, image_steps_done: 0 }];
        assert_eq!(poll(&mut restarted, "w2", &running, false, 3).0, PollDecision::Wait(1000));
        let next = lease(poll(&mut restarted, "w3", &[], false, 3).0);
        assert_eq!(next.shard_index, 3);
        let summary = restarted.summary("j", 4).unwrap();
        assert_eq!((summary.done, summary.running), (2, 2));
    }

    /// A worker known to be gone has its leases expire at once (its shard leased again, to
    /// another worker), not a lease timeout later; another worker's lease is untouched.
    #[test]
    fn a_gone_workers_leases_expire_at_once() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 2, 1, 3), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w1", &[], false, 0).0);
        let b = lease(poll(&mut s, "w2", &[], false, 0).0);
        assert_eq!(s.worker_gone("nobody", 10), 0);
        assert_eq!(s.worker_gone("w1", 10), 1);
        assert!(s.expire(10).is_empty() || s.state("j") == Some(JobState::Running));
        let expired = s.take_expired();
        assert_eq!(expired.iter().map(|e| e.lease_id.as_str()).collect::<Vec<_>>(), vec![a.lease_id.as_str()]);
        assert!(expired[0].requeued && expired[0].exited);
        // Said to have left once, for its exit; not again as silent three heartbeats later.
        let events = s.take_worker_events();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, WorkerEvent::Left { worker_id, reason: LeftReason::Exited } if worker_id == "w1")),
            "{events:?}"
        );
        s.note_departures(10_000);
        assert!(
            !s.take_worker_events()
                .iter()
                .any(|e| matches!(e, WorkerEvent::Left { worker_id, .. } if worker_id == "w1")),
            "not silent: it exited"
        );
        let said = format!("{:?}", s.persisted("j").unwrap().shards[a.shard_index].last_error);
        assert!(said.contains("lease given up: the process of worker `w1` exited"), "{said}");
        let again = lease(poll(&mut s, "w3", &[], false, 11).0);
        assert_eq!(again.shard_index, a.shard_index);
        // w2's lease still holds until its own deadline (5 s timeout in `job`).
        assert!(s.expire(20).is_empty());
        assert!(s.take_expired().is_empty(), "{}", b.lease_id);
    }

    #[test]
    fn cancel_resume_and_exclusion() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 3, 1, 1), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w", &[], false, 0).0);
        assert_eq!(s.cancel("j", 1).unwrap(), Settled::Finished(JobState::Cancelled));
        let (decision, revoked) = poll(
            &mut s,
            "w",
            &[Running { lease_id: a.lease_id.clone(), images_done: 0, classes_done: 0, image_steps_done: 0 }],
            false,
            2,
        );
        assert_eq!((decision, revoked), (PollDecision::Wait(1000), vec![a.lease_id.clone()]));
        assert_eq!(s.resume("j", &HashSet::from([1]), 3).unwrap(), (1, 2));
        assert_eq!(s.state("j"), Some(JobState::Running));
        // A failure before the resume is no failure of the resumed run.
        let failed = lease(poll(&mut s, "w", &[], false, 3).0);
        s.fail("w", &failed.lease_id, Some("c".into()), "disk full".into(), true, false, 3).unwrap();
        assert_eq!(s.summary("j", 3).unwrap().failures.len(), 1);
        s.cancel("j", 3).unwrap();
        s.resume("j", &HashSet::from([1]), 3).unwrap();
        assert!(s.summary("j", 3).unwrap().failures.is_empty(), "no `after 0 attempt(s)`");
        let b = lease(poll(&mut s, "w", &[], false, 4).0);
        s.exclude("w", &b.lease_id, "model fingerprint mismatch".into(), 5).unwrap();
        assert_eq!(poll(&mut s, "w", &[], false, 6).0, PollDecision::Wait(1000));
        let c = lease(poll(&mut s, "other", &[], false, 7).0);
        assert_eq!(c.attempt, 1, "exclusion does not spend an attempt");
        s.drain();
        assert_eq!(poll(&mut s, "idle", &[], false, 8).0, PollDecision::Drain);
    }

    /// Classes a worker committed after a cancel, before it heard of it at its next poll, are
    /// counted from what it reports then (its heartbeat, then its release); a stranger's word on
    /// the lease counts nothing, and a resume counts afresh.
    #[test]
    fn commits_made_before_a_worker_heard_of_a_cancel_are_counted() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 6, 3, 1), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w", &[], false, 0).0);
        let b = lease(poll(&mut s, "v", &[], false, 0).0);
        assert_eq!(s.cancel("j", 1).unwrap(), Settled::Finished(JobState::Cancelled));
        assert_eq!(s.summary("j", 1).unwrap().classes_done, 0);
        let report = |l: &LeaseGrant, classes_done| {
            [Running { lease_id: l.lease_id.clone(), images_done: 0, classes_done, image_steps_done: 0 }]
        };
        // Its heartbeat after the cancel shows one class committed: counted, and the job's
        // state is to be persisted.
        let (_, revoked) = poll(&mut s, "w", &report(&a, 1), false, 2);
        assert_eq!(revoked, vec![a.lease_id.clone()]);
        assert_eq!(s.summary("j", 2).unwrap().classes_done, 1);
        assert_eq!(s.take_settled(), vec![("j".to_owned(), Settled::Open)]);
        // Another worker's word on the lease changes nothing; the owner's release counts once.
        assert_eq!(s.note_committed("v", &a.lease_id, 3), None);
        assert_eq!(s.note_committed("w", &a.lease_id, 2), Some("j".to_owned()));
        assert_eq!(s.note_committed("w", &a.lease_id, 3), None, "its last word was said");
        assert_eq!(s.summary("j", 2).unwrap().classes_done, 2);
        assert_eq!(
            s.revoked_lease("v", &b.lease_id).map(|(job, shard)| (job.job_id.clone(), shard)),
            Some(("j".into(), 1))
        );
        assert!(s.revoked_lease("w", &b.lease_id).is_none());
        // A resume counts from the markers: the old lease's word comes too late.
        s.resume("j", &HashSet::new(), 3).unwrap();
        assert!(s.revoked_lease("v", &b.lease_id).is_none());
        assert_eq!(s.note_committed("v", &b.lease_id, 3), None);
        assert_eq!(s.summary("j", 3).unwrap().classes_done, 0);
    }

    /// A worker excluded for its model files gets the job again after `resume` (a person fixed
    /// the files); before it, it does not.
    #[test]
    fn resume_forgets_excluded_workers() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 2, 1, 3), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w", &[], false, 1).0);
        s.exclude("w", &a.lease_id, "model files missing here".into(), 2).unwrap();
        assert_eq!(poll(&mut s, "w", &[], false, 3).0, PollDecision::Wait(1000));
        s.resume("j", &HashSet::new(), 4).unwrap();
        assert!(matches!(poll(&mut s, "w", &[], false, 5).0, PollDecision::Lease(_)));
    }

    /// Lease accounting does not trust the caller: an unregistered id gets nothing, and a worker
    /// that stops reporting its lease gets that lease released (not a second one), with no
    /// attempt spent, so a hostile poller cannot fail a job by expiring leases.
    #[test]
    fn only_registered_workers_lease_and_the_schedulers_record_is_the_truth() {
        let mut s = Scheduler::new(1000, "e");
        s.add_job(job("j", 2, 1, 1), None, &HashSet::new(), 0);
        assert_eq!(s.poll("made-up", &[], false, 0), Err(SchedulerError::UnknownWorker("made-up".into())));
        assert_eq!(s.summary("j", 0).unwrap().running, 0);
        let a = lease(poll(&mut s, "w", &[], false, 1).0);
        // The worker claims to run nothing: its lease goes back to the queue (no attempt spent,
        // max_attempts is 1) and it may take the next shard in order, never two at once.
        for now in 2..50 {
            let grant = lease(poll(&mut s, "w", &[], false, now).0);
            assert_eq!(s.summary("j", now).unwrap().running, 1, "one lease per worker");
            assert_eq!(grant.attempt, 1, "a released lease spends no attempt");
        }
        assert_eq!(s.state("j"), Some(JobState::Running));
        let held = lease(poll(&mut s, "w", &[], false, 60).0);
        let running =
            [Running { lease_id: held.lease_id.clone(), images_done: 0, classes_done: 0, image_steps_done: 0 }];
        assert_eq!(poll(&mut s, "w", &running, false, 61).0, PollDecision::Wait(1000));
        assert_ne!(held.lease_id, a.lease_id);
    }

    /// One live process per worker id: a second process under a live id is refused naming both;
    /// the same process registering again, a process taking over a silent id, and workers that
    /// send no instance id are accepted.
    #[test]
    fn a_live_worker_id_is_not_shared_by_two_processes() {
        let process = |instance: &str, pid| WorkerProcess { instance: instance.into(), host: "n1".into(), pid };
        let mut s = Scheduler::new(1000, "e");
        s.claim("w", process("a", 10), 0).unwrap();
        s.register("w", 0);
        s.poll("w", &[], false, 2500).unwrap();
        let error = s.claim("w", process("b", 11), 3000).unwrap_err();
        assert!(matches!(error, SchedulerError::WorkerIdInUse { .. }));
        let text = error.to_string();
        assert!(
            text.contains("pid 10 on `n1`") && text.contains("pid 11 on `n1`") && text.contains("--worker-id"),
            "{text}"
        );
        // The holder itself again (after a coordinator restart, say).
        s.claim("w", process("a", 10), 3000).unwrap();
        // Workers that predate instance ids are never refused.
        s.claim("w", process("", 12), 3000).unwrap();
        // Silent for more than three heartbeats: the id is free for a new process.
        s.claim("w", process("c", 13), 6000).unwrap();
        s.register("w", 6000);
        assert!(s.claim("w", process("a", 10), 6000).is_err(), "the new holder is live");
    }

    #[test]
    fn workers_leaving_and_returning_are_announced_once_each() {
        let mut s = Scheduler::new(1000, "e");
        s.register("a", 0);
        s.register("b", 0);
        s.note_departures(3000);
        assert!(s.take_worker_events().is_empty(), "three heartbeats of silence are allowed");
        s.poll("a", &[], false, 2500).unwrap();
        s.note_departures(3500);
        s.note_departures(4000);
        let left =
            |id: &str, silent_ms| WorkerEvent::Left { worker_id: id.into(), reason: LeftReason::Silent { silent_ms } };
        assert_eq!(s.take_worker_events(), vec![left("b", 3500)], "announced once, not at every tick");
        assert_eq!(s.live_workers(4000), 1);
        s.poll("b", &[], false, 4100).unwrap();
        assert_eq!(s.take_worker_events(), vec![WorkerEvent::Returned { worker_id: "b".into() }]);
        // Stopping (it says so in its poll, SIGTERM): left once, however often it says it, and
        // never silent after; a worker that re-registers is no news.
        assert_eq!(s.poll("a", &[], true, 4200).unwrap().0, PollDecision::Drain);
        assert_eq!(s.poll("a", &[], true, 4300).unwrap().0, PollDecision::Drain);
        assert_eq!(s.live_workers(4300), 1, "a said it is stopping: only b counts");
        s.note_departures(9000);
        let events = s.take_worker_events();
        assert_eq!(
            events,
            vec![WorkerEvent::Left { worker_id: "a".into(), reason: LeftReason::Stopped }, left("b", 4900)]
        );
        s.register("a", 9100);
        s.poll("a", &[], false, 9100).unwrap();
        assert!(s.take_worker_events().is_empty());
        // Told to exit by a draining coordinator: drained, not stopping.
        s.drain();
        assert_eq!(s.poll("a", &[], false, 9200).unwrap().0, PollDecision::Drain);
        assert_eq!(
            s.take_worker_events(),
            vec![WorkerEvent::Left { worker_id: "a".into(), reason: LeftReason::Drained }]
        );
    }

    #[test]
    fn drain_when_done_drains_idle_workers_once_every_job_has_ended() {
        let mut s = Scheduler::new(1000, "e");
        s.drain_when_done();
        // No job yet: workers that connect early wait for one.
        assert_eq!(poll(&mut s, "w", &[], false, 0).0, PollDecision::Wait(1000));
        s.add_job(job("j", 2, 1, 1), None, &HashSet::new(), 0);
        let a = lease(poll(&mut s, "w", &[], false, 1).0);
        let b = lease(poll(&mut s, "v", &[], false, 1).0);
        s.complete("w", &a.lease_id, 2).unwrap();
        // One shard still running: the idle worker waits, the holder keeps its lease.
        assert_eq!(poll(&mut s, "w", &[], false, 3).0, PollDecision::Wait(1000));
        let held = [Running { lease_id: b.lease_id.clone(), images_done: 0, classes_done: 0, image_steps_done: 0 }];
        assert_eq!(poll(&mut s, "v", &held, false, 3).0, PollDecision::Wait(1000));
        s.complete("v", &b.lease_id, 4).unwrap();
        assert_eq!(s.state("j"), Some(JobState::Succeeded));
        assert_eq!(poll(&mut s, "w", &[], false, 5).0, PollDecision::Drain);
        // A job that had ended before a worker connected (a requeued allocation) drains it at once.
        let mut recovered = Scheduler::new(1000, "e2");
        recovered.drain_when_done();
        recovered.add_job(job("j", 2, 1, 1), None, &HashSet::from([0, 1]), 10);
        assert_eq!(poll(&mut recovered, "late", &[], false, 11).0, PollDecision::Drain);
        // A new job stops the draining.
        recovered.add_job(job("k", 1, 1, 1), None, &HashSet::new(), 12);
        assert!(matches!(poll(&mut recovered, "late", &[], false, 13).0, PollDecision::Lease(_)));
        // Without the setting, idle workers wait for the next job.
        let mut plain = Scheduler::new(1000, "e3");
        plain.add_job(job("j", 1, 1, 1), None, &HashSet::from([0]), 0);
        assert_eq!(poll(&mut plain, "w", &[], false, 1).0, PollDecision::Wait(1000));
    }

    #[test]
    fn jobs_are_planned_for_the_largest_rows_of_the_workers_present() {
        use mgd3_common::batch::PlannedRows;
        let mut s = Scheduler::new(1000, "e");
        assert_eq!(s.planned_rows(), PlannedRows::Default);
        s.register("old", 0);
        assert_eq!(s.planned_rows(), PlannedRows::Default, "a worker that did not report");
        s.register("a100", 0);
        s.report_dit_rows("a100", 256);
        s.register("h200", 0);
        s.report_dit_rows("h200", 512);
        assert_eq!(s.planned_rows(), PlannedRows::Reported { dit_rows: 512, workers: 2 });
        assert_eq!(s.live_worker_rows(0), vec![("a100".to_owned(), 256), ("h200".to_owned(), 512)]);
        // A worker silent for three heartbeats no longer counts.
        s.register("a100", 5000);
        s.note_departures(5000);
        assert_eq!(s.planned_rows(), PlannedRows::Reported { dit_rows: 256, workers: 1 });
        assert_eq!(s.live_worker_rows(5000), vec![("a100".to_owned(), 256)]);
    }
}
