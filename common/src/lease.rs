//! What a worker and the coordinator say to each other about leases, as domain types: the
//! registration, a poll's report of running leases, a finished shard, a failed attempt and what
//! to do about it. The gRPC adapter converts them from and to protocol messages
//! ([`crate::wire`]); the worker builds them, the coordinator's domain consumes them.

use std::collections::BTreeMap;

/// A worker announcing itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registration {
    /// The worker's id (unique among the coordinator's workers).
    pub worker_id: String,
    /// The host it runs on, for people.
    pub hostname: String,
    /// Its devices (`cpu`, `cuda:0`, ...), for people.
    pub devices: Vec<String>,
    /// The protocol it speaks ([`crate::PROTOCOL_VERSION`]).
    pub protocol_version: u32,
    /// Models it has loaded: the path or URL as a job spec's `[models]` names it →
    /// `sha256:<hex>` of the file it loaded from there.
    pub model_fingerprints: BTreeMap<String, String>,
    /// The worker process's id.
    pub pid: u32,
    /// A random id drawn once per worker process (empty from workers that predate it): a second
    /// live process registering under the same worker id has another.
    pub instance: String,
    /// Its batch policy (`None` from workers that predate it): jobs submitted later have their
    /// shards sized by the largest `dit_rows` of the registered workers.
    pub batch_policy: Option<crate::batch::BatchPolicy>,
}

/// A running job a worker will get no lease of, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exclusion {
    /// The job.
    pub job_id: String,
    /// Why, for the worker's log.
    pub reason: String,
}

/// A lease a worker reports as running, with its progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningLease {
    /// The lease.
    pub lease_id: String,
    /// Images of the shard's classes committed so far.
    pub images_done: u32,
    /// Classes of the shard committed so far.
    pub classes_done: u32,
    /// DiT sampling steps this attempt has run for the shard's images, an image counting once
    /// per step (a class of IPC 50 at 50 steps is 2,500): progress inside a class, which
    /// `images_done` shows only once the class is committed. The coordinator estimates a
    /// shard's time to finish from its rate (backup leases). 0 from workers that do not count.
    pub image_steps_done: u64,
}

/// A shard a worker finished: every class committed.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The worker.
    pub worker_id: String,
    /// The lease the shard ran under.
    pub lease_id: String,
    /// [`crate::commit::manifest_digest`] of the shard's markers as the worker read them back.
    pub manifest_digest: String,
    /// Images committed.
    pub images: u32,
    /// Wall time of the attempt, seconds.
    pub seconds: f64,
}

/// What the coordinator should do with a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Lease the shard again (another attempt may succeed).
    Retry,
    /// Fail the shard: the input is wrong and retrying will not help.
    GiveUp,
    /// Lease the shard to other workers without spending an attempt, and nothing of the job to
    /// this worker again (it cannot run the job: other model files, no CUDA).
    Elsewhere,
    /// Give the lease back without spending an attempt (the worker is stopping).
    Release,
    /// Pause the job without spending an attempt: its output store refuses writes for good
    /// (full, over quota, read-only, no permission), so no attempt anywhere can commit until a
    /// person has acted.
    Pause,
}

/// A shard attempt that did not finish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The worker.
    pub worker_id: String,
    /// The lease the attempt ran under.
    pub lease_id: String,
    /// The class it happened in, when it is about one.
    pub class: Option<String>,
    /// The error and its causes, as one line.
    pub error: String,
    /// What to do about it.
    pub disposition: Disposition,
    /// Classes of the shard committed when the attempt ended (by it, or found committed from
    /// an earlier attempt): the coordinator keeps them counted in the job's progress, which the
    /// attempt's last heartbeat, sent before its last commits, may not have counted.
    pub classes_committed: u32,
}
