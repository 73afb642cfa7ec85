//! What a job's progress looks like to everyone outside the scheduler: the coordinator builds a
//! [`JobStatus`] from its scheduler, the gRPC adapter sends it (see [`crate::wire`]), and the CLI
//! prints it as text or JSON. One type on both sides, so the CLI never compares state strings.

use serde::{Deserialize, Serialize};

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Shards are pending or leased.
    Running,
    /// Every class is committed and the manifest is written.
    Succeeded,
    /// At least one shard ran out of attempts or failed for good.
    Failed,
    /// Cancelled by `coordinator cancel`; `resume` restarts it.
    Cancelled,
    /// The job's records in the state store are damaged; it is not scheduled until repaired.
    Quarantined,
    /// The output store refused a write for good (full, over quota, read-only, no permission):
    /// nothing is leased until a person has acted and run `coordinator resume`.
    Paused,
}

impl JobState {
    /// The lower-case name used in text and JSON output (`running`, `succeeded`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Quarantined => "quarantined",
            JobState::Paused => "paused",
        }
    }

    /// True for every state but [`JobState::Running`]: nothing more happens without a person.
    pub fn is_final(self) -> bool {
        self != JobState::Running
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one shard stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardPhase {
    /// Waiting for a worker.
    Pending,
    /// Leased to a worker, which renews the lease with every poll.
    Leased,
    /// Every class has a commit marker.
    Done,
    /// Out of attempts, or failed with an error retrying cannot fix.
    Failed,
}

impl ShardPhase {
    /// The lower-case name used in text and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            ShardPhase::Pending => "pending",
            ShardPhase::Leased => "leased",
            ShardPhase::Done => "done",
            ShardPhase::Failed => "failed",
        }
    }
}

/// One shard of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    /// Position of the shard in the job's plan.
    pub index: u32,
    /// Where the shard stands.
    pub phase: ShardPhase,
    /// Attempts that counted against `max_attempts`.
    pub attempts: u32,
    /// Classes in the shard.
    pub classes: u32,
    /// Classes committed by the current lease (all of them once done).
    pub classes_done: u32,
    /// Images committed by the current lease (all of them once done).
    pub images_done: u32,
    /// The worker holding the lease, while leased.
    pub worker: Option<String>,
}

/// The last error of a shard that failed or is being retried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardFailure {
    /// Position of the shard in the job's plan.
    pub shard_index: u32,
    /// The class the error is about, or the shard's classes joined by `,` when it is about none.
    pub wnid: String,
    /// The error message, with its causes.
    pub error: String,
    /// Attempts that counted against `max_attempts`.
    pub attempts: u32,
    /// The shard has attempts left and is pending or running again: `error` is its last
    /// attempt's, not the end of it (absent from older coordinators' answers: false).
    #[serde(default)]
    pub retrying: bool,
}

/// What `coordinator verify` found wrong with one published file or class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyProblem {
    /// The class, or empty for a problem of the job as a whole.
    pub wnid: String,
    /// The file, relative to the job's folder, or `None` for the class as a whole.
    pub file: Option<String>,
    /// What is wrong.
    pub problem: String,
}

/// The result of checking every published file of a job against its class's marker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Classes checked (all of the job's).
    pub classes_checked: u32,
    /// Files read and hashed.
    pub files_checked: u64,
    /// Everything that does not match; empty for a job whose files are intact. For a job that
    /// has not succeeded (running, paused, cancelled, failed), classes not committed are not
    /// problems.
    pub problems: Vec<VerifyProblem>,
    /// Classes with a commit marker.
    pub classes_committed: u32,
    /// The job has not ended (running or paused): its uncommitted classes are work to come.
    pub running: bool,
    /// The job's state, when a coordinator that knows it verified it (`None` offline, and from
    /// older coordinators). Only a succeeded job's uncommitted classes are problems.
    pub state: Option<JobState>,
    /// Committed classes without a contact sheet though their commit says one was made after it
    /// (deleted, or writing it failed): not damage to the dataset, said as a note.
    #[serde(default)]
    pub sheets_missing: Vec<String>,
}

/// Shard counts of a job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCounts {
    /// Shards in the job's plan.
    pub total: u32,
    /// Shards whose every class is committed.
    pub done: u32,
    /// Shards leased to a worker.
    pub running: u32,
    /// Shards waiting for a worker.
    pub pending: u32,
    /// Shards out of attempts or failed for good.
    pub failed: u32,
}

/// A job as `coordinator status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job's id.
    pub job_id: String,
    /// Where the job stands.
    pub state: JobState,
    /// `sha256:<hex>` of the resolved spec (empty for a quarantined job).
    pub fingerprint: String,
    /// The job's folder in the output store (`<output>/jobs/<job id>`).
    pub output: String,
    /// Shard counts.
    pub shards: ShardCounts,
    /// Classes committed (done shards in full, leased shards as reported).
    pub classes_done: u32,
    /// Classes in the job.
    pub classes_total: u32,
    /// Images committed (done shards in full, leased shards as reported).
    pub images_done: u64,
    /// Images the job makes: classes × IPC.
    pub images_total: u64,
    /// Images per second committed over the last minute of this coordinator's run of the job
    /// (work committed before it took the job on never counts).
    pub images_per_second: f64,
    /// Seconds left at that rate; `None` while it cannot be estimated (nothing committed in the
    /// last minute).
    pub eta_seconds: Option<f64>,
    /// When this coordinator process took the job on (submitted, recovered or resumed), Unix ms.
    pub run_started_unix_ms: u64,
    /// Failed shards and unfinished shards with an error (for a quarantined job: why).
    pub failures: Vec<ShardFailure>,
    /// When the job was submitted (Unix ms).
    pub created_unix_ms: u64,
    /// When the job reached a final state (Unix ms); `None` while it runs.
    pub finished_unix_ms: Option<u64>,
    /// Workers heard from in the last three heartbeats.
    pub workers: u32,
    /// Of [`JobStatus::workers`], those excluded from this job (their model files differ from
    /// the job's): a job whose every live worker is excluded makes no progress.
    pub workers_excluded: u32,
    /// Of `workers`, each one this job has excluded, with why (as it was said).
    pub exclusions: Vec<WorkerExclusion>,
    /// Of `workers`, the DiT rows per call each one reported (its batch policy: `--dit-rows` as
    /// given, or what `--dit-rows auto` chose for its card), in worker-id order. Workers of
    /// versions that do not report rows are left out.
    pub worker_rows: Vec<WorkerRows>,
    /// Every shard, in plan order.
    pub shard_list: Vec<ShardStatus>,
    /// When the answering coordinator last knew it held its store's lock (Unix ms), while it
    /// does not know it now — cut off from its store, or taken over by another coordinator —:
    /// it commits nothing and leases nothing meanwhile. `None` while it holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_unheld_since_unix_ms: Option<u64>,
}

/// A connected worker's DiT rows per call, as it reported them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRows {
    /// The worker's id.
    pub worker_id: String,
    /// DiT rows per call (two per sample with CFG pairs).
    pub dit_rows: u32,
}

/// A connected worker a job has excluded, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerExclusion {
    /// The worker's id.
    pub worker_id: String,
    /// Why, as it was said when it was excluded (its models differ, it cannot run the job).
    pub reason: String,
}

impl JobStatus {
    /// The status of a job whose records cannot be read: `reason` is what is wrong with them,
    /// `advice` what to do about it.
    pub fn quarantined(job_id: String, reason: String, advice: &str) -> Self {
        let error = format!("{reason}; the job is quarantined (not scheduled): {advice}");
        JobStatus {
            state: JobState::Quarantined,
            fingerprint: String::new(),
            output: String::new(),
            shards: ShardCounts::default(),
            classes_done: 0,
            classes_total: 0,
            images_done: 0,
            images_total: 0,
            images_per_second: 0.0,
            eta_seconds: None,
            run_started_unix_ms: 0,
            failures: vec![ShardFailure { shard_index: 0, wnid: String::new(), error, attempts: 0, retrying: false }],
            created_unix_ms: 0,
            finished_unix_ms: None,
            workers: 0,
            workers_excluded: 0,
            exclusions: Vec::new(),
            worker_rows: Vec::new(),
            shard_list: Vec::new(),
            store_unheld_since_unix_ms: None,
            job_id,
        }
    }
}
