//! The coordinator's error type and its one mapping onto gRPC statuses.

use mgd3_common::commit::CommitError;
use mgd3_common::job::JobError;
use mgd3_common::store::StoreError;

use crate::scheduler::SchedulerError;

/// The coordinator's `Result`, with [`Error`] by default.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the coordinator can fail with; `From<Error> for tonic::Status` maps each variant onto
/// a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A job spec, job id or dataset has problems the submitter must fix.
    #[error(transparent)]
    Job(#[from] JobError),
    /// A store URL cannot be opened, or a model cannot be fetched from it.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading a commit marker or checking, publishing or withdrawing a class's files failed.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// The scheduler refused the call (unknown job, stale or foreign lease, unregistered worker,
    /// cancelling an ended job).
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// The store's coordinator lock could not be taken or kept.
    #[error(transparent)]
    Lock(Box<crate::lock::LockError>),
    /// An object-store call failed (job records, an output's markers, folders or manifest).
    #[error("object store `{url}`: {context}")]
    ObjectStore {
        /// The store's URL.
        url: String,
        /// What was being done, naming the key.
        context: String,
        /// What the store answered.
        #[source]
        source: object_store::Error,
    },
    /// The coordinator could not renew its lock on the store recently enough to be sure it still
    /// holds it ([`crate::Coordinator::holds_store`]): it takes no new work and writes nothing
    /// until a renewal succeeds (or stops, when another coordinator took the store over).
    #[error(
        "the coordinator has not been able to renew its lock on the store `{url}` for {since_s:.0} s more than \
         it may go without (the store does not answer, or answers too slowly), so another coordinator may have \
         taken the store over: it leases and writes nothing until a renewal succeeds, and stops if the store \
         has another coordinator; try again shortly"
    )]
    StoreNotHeld {
        /// The store.
        url: String,
        /// Seconds past the point the lock had to be renewed by.
        since_s: f64,
    },
    /// A job's `job.json` cannot be parsed or describes another job (the job is quarantined).
    #[error("`{path}` in the store is corrupt: {problem}")]
    Corrupt {
        /// Where the record is (its key, or the store URL and key).
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A job's output folder holds another job's records (folders swapped, renamed or copied).
    #[error(
        "`{folder}` holds job `{found}`'s records, not `{job}`'s: folders swapped, renamed or copied; put each \
         job's folder back under its own id (`<output>/jobs/<job>`)"
    )]
    OtherJobsFolder {
        /// The folder.
        folder: String,
        /// The job asked about.
        job: String,
        /// The job its records are of.
        found: String,
    },
    /// No job with this id is known.
    #[error("unknown job `{0}`")]
    UnknownJob(String),
    /// No sweep with this id was submitted to this store.
    #[error("unknown sweep `{0}`")]
    UnknownSweep(String),
    /// `resume` with a spec whose fingerprint is not the job's.
    #[error(
        "job `{job}`: the spec fingerprint changed ({now}, the job has {was}); refusing to mix outputs of two specs"
    )]
    FingerprintChanged {
        /// The job id.
        job: String,
        /// The job's fingerprint.
        was: String,
        /// The fingerprint of the spec given now.
        now: String,
    },
    /// The data of some classes changed since the job recorded it (names or sizes, or content
    /// when the job hashes it), and the caller did not accept the change.
    #[error(
        "job `{job}`: the data of {} class(es) changed since the job recorded it: {}{}; every other class \
         is unchanged in what the job records of it (file names and sizes, and contents with data_fingerprint = \
         \"content\"). To distil {} from the data as it is now and keep every other commit, run again with \
         --accept-data-changes (`coordinator resume {job} --accept-data-changes`, or the same flag on submit and \
         run; MGD3_ACCEPT_DATA_CHANGES=1 for distill.sbatch); or restore the files",
        changes.len(),
        changes.iter().take(SHOWN_CHANGES).map(|c| c.to_string()).collect::<Vec<_>>().join(", "),
        if changes.len() > SHOWN_CHANGES { format!(" and {} more", changes.len() - SHOWN_CHANGES) } else { String::new() },
        if changes.len() == 1 { "that class" } else { "those classes" }
    )]
    DataChanged {
        /// The job id.
        job: String,
        /// Every changed class, in the job's order.
        changes: Vec<mgd3_common::job::DataChange>,
    },
    /// The class folders of a `classes = "all"` (or folder-labelled) job are not the job's any
    /// more: that is another job, not changed data of this one.
    #[error(
        "job `{job}`: the dataset's class folders changed since the job was submitted ({}): its classes and labels \
         would differ; submit the spec again to make a new job (committed classes of this job stay in its output), \
         or restore the folders",
        describe_class_list_change(added, removed)
    )]
    ClassListChanged {
        /// The job id.
        job: String,
        /// Classes there now that the job does not have.
        added: Vec<String>,
        /// Classes of the job no longer there.
        removed: Vec<String>,
    },
    /// A submission names a job id that holds a job of another fingerprint.
    #[error("job `{job}` already exists with another spec")]
    JobIdTaken {
        /// The job id.
        job: String,
    },
    /// A `state.json` has a `schema_version` newer than this build reads (the job is quarantined).
    #[error(
        "`{path}` has schema_version {found}, but this coordinator reads up to {supported}: a newer mgd3 wrote it; run that version (or newer) to serve this store"
    )]
    StateTooNew {
        /// The record's key.
        path: String,
        /// Its `schema_version`.
        found: u32,
        /// The newest this build reads ([`crate::jobstore::STATE_SCHEMA_VERSION`]).
        supported: u32,
    },
    /// A worker registered with another protocol version.
    #[error(
        "worker `{worker}` speaks protocol {theirs}, this coordinator speaks {ours}; run the same mgd3 version on both"
    )]
    Incompatible {
        /// The worker.
        worker: String,
        /// Its protocol version.
        theirs: u32,
        /// This coordinator's.
        ours: u32,
    },
    /// A local I/O operation failed (reading a model file, the listener's address).
    #[error("{what} `{path}`")]
    Io {
        /// What the path is (`model file`, `listener`).
        what: &'static str,
        /// The path concerned.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A class has no commit marker the coordinator sees: its shard was reported complete, or the
    /// job's manifest is being written.
    #[error(
        "class `{wnid}` of shard {shard} has no commit marker in `{output}` as the coordinator sees it; the shard is not complete"
    )]
    MissingMarker {
        /// The shard's index in the job's plan.
        shard: usize,
        /// The class without a marker.
        wnid: String,
        /// The output store's URL.
        output: String,
    },
    /// A worker reported a shard complete with a manifest digest its stored markers do not give.
    #[error(
        "shard {shard} was reported with manifest digest {reported}, but its commit markers in `{output}` give {stored}; the shard is not complete"
    )]
    DigestMismatch {
        /// The shard's index in the job's plan.
        shard: usize,
        /// The digest the worker reported.
        reported: String,
        /// The digest of the markers in the store.
        stored: String,
        /// The output store's URL.
        output: String,
    },
    /// The gRPC server could not be set up (TLS identity) or failed while serving.
    #[error("gRPC transport")]
    Transport(#[from] tonic::transport::Error),
    /// A job folder in the store lacks its `job.json` (the job is quarantined).
    #[error("`{path}` is missing from the store")]
    Missing {
        /// The store URL and key of the missing record.
        path: String,
    },
    /// A submitted or resumed job is quarantined: its records are damaged.
    #[error("job `{job}` is quarantined: {reason}; {}", quarantine_advice(job, *rebuildable))]
    Quarantined {
        /// The job id.
        job: String,
        /// What is wrong with its records.
        reason: String,
        /// Its `job.json` is missing or corrupt: submitting the same spec rebuilds it.
        rebuildable: bool,
    },
    /// The spec submitted to rebuild a job's lost `job.json` is not the one its committed classes
    /// (or manifest) were made with.
    #[error(
        "job `{job}`{}, and this spec is not the one its committed work was made with: {}; submit the spec it was \
         made with (your job.toml of then; a finished job's manifest.json holds it too), or give this spec its own \
         job id (without --job-id, its own name or settings give it one)",
        if *lost_records { " lost its job.json" } else { "'s folder holds committed work" },
        differences.join("; ")
    )]
    RebuildRefused {
        /// The job id.
        job: String,
        /// The job's `job.json` was lost (a rebuild), rather than never written (a new submit
        /// over a forgotten job's outputs).
        lost_records: bool,
        /// Each difference found, as a person reads it.
        differences: Vec<String>,
    },
    /// A job that `coordinator forget` dropped; its outputs stayed.
    #[error(
        "job `{job}` was forgotten (`coordinator forget`); its outputs are kept: submitting its spec again brings it \
         back with its committed classes, and `coordinator verify {job} --job-dir {}/jobs/{job}` checks them offline",
        output.as_deref().map_or("<output>", |o| o.trim_end_matches('/'))
    )]
    Forgotten {
        /// The job id.
        job: String,
        /// The job's output root, as `forget` recorded it (`None` when it did not).
        output: Option<String>,
    },
    /// Files stand where a job's folders go, or folders where its files go (local stores): what
    /// they hold cannot be read or written, and repairing around them would withdraw commits.
    #[error(
        "job `{job}`: {}; nothing was changed: move them away (put back the folders or files they stand in place of) \
         and try again",
        paths.iter().map(|(path, what)| format!("`{path}` {what}")).collect::<Vec<_>>().join("; ")
    )]
    Blocked {
        /// The job id.
        job: String,
        /// Each path (relative to the output) and what is wrong with it.
        paths: Vec<(String, String)>,
    },
    /// The store holds a job's outputs while the job's output folder is gone: the store was moved
    /// (or copied, and the original removed). Serving it would distil every class again into a
    /// new, empty folder at the old path; the job is quarantined instead.
    #[error(
        "job `{job}`'s output `{output}` is gone, and this store `{store}` holds its outputs: the store was moved (or \
         copied and the original removed). Nothing of the job is distilled again: serve the store where the job's \
         output was (move it back to `{output}`)"
    )]
    OutputMoved {
        /// The job id.
        job: String,
        /// The output its records name.
        output: String,
        /// The store that holds its outputs now.
        store: String,
    },
    /// A job whose folder was removed from the store by hand: the coordinator forgot it.
    #[error(
        "job `{job}`'s folder is gone from the store (removed by hand?): the coordinator has forgotten the job; \
         submitting its spec again makes it anew"
    )]
    Vanished {
        /// The job id.
        job: String,
    },
    /// `forget` of a sweep one of whose jobs is running.
    #[error(
        "sweep `{sweep}`: its job `{job}` is running; `coordinator cancel {sweep}` stops every variant first (forget drops records of jobs that have ended)"
    )]
    SweepRunning {
        /// The sweep id.
        sweep: String,
        /// A variant's job that has not ended.
        job: String,
    },
    /// `forget` of a job that is a variant of a sweep.
    #[error(
        "job `{job}` is a variant of sweep {}: forgotten alone it would break the sweep's status and resume; \
         `coordinator forget {}` forgets the sweep with its variants (keeping those another sweep holds too)",
        sweeps.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", "),
        sweeps[0]
    )]
    VariantOfSweep {
        /// The job.
        job: String,
        /// The sweeps holding it (at least one).
        sweeps: Vec<String>,
    },
    /// `forget` of a job that is running.
    #[error(
        "job `{job}` is running; `coordinator cancel {job}` stops it first (forget drops the coordinator's records of a job, never a running one)"
    )]
    JobRunning {
        /// The job id.
        job: String,
    },
}

impl From<crate::lock::LockError> for Error {
    fn from(error: crate::lock::LockError) -> Self {
        Error::Lock(Box::new(error))
    }
}

/// What to do about a quarantined job: rebuild a lost `job.json` by submitting the same spec,
/// or repair the other records and resume; `forget` drops the records either way.
pub fn quarantine_advice(job: &str, rebuildable: bool) -> String {
    if rebuildable {
        format!(
            "submit the same job spec again to rebuild its job.json (committed classes are kept), or `coordinator forget {job}` to drop its records (its outputs stay)"
        )
    } else {
        format!(
            "repair or remove its records under jobs/{job}/, then `coordinator resume {job}` (or restart the coordinator); `coordinator forget {job}` drops its records (its outputs stay)"
        )
    }
}

impl Error {
    /// True for damage to a job's own records (unreadable or missing `job.json`, an unreadable or
    /// foreign marker): that job is quarantined. Store outages and configuration errors are not.
    pub fn is_damage(&self) -> bool {
        match self {
            Error::Corrupt { .. } | Error::Missing { .. } | Error::StateTooNew { .. } | Error::OutputMoved { .. } => {
                true
            }
            Error::Commit(CommitError::Store { source, .. }) | Error::ObjectStore { source, .. } => {
                mgd3_common::store::is_local_damage(source)
            }
            Error::Commit(e) => matches!(e, CommitError::BadMarker { .. } | CommitError::ForeignMarker { .. }),
            Error::Blocked { .. } => true,
            Error::Store(StoreError::BadUrl { .. }) => true,
            _ => false,
        }
    }
}

/// The most of an error message that goes into gRPC metadata: an error that quotes a client's
/// multi-MiB input must still reach the client (HTTP/2 header lists are limited to ~16 KiB).
pub const MAX_STATUS_MESSAGE: usize = 4096;

/// `message`, cut at a character boundary to at most [`MAX_STATUS_MESSAGE`] bytes, saying how
/// much was left out.
fn bounded_message(message: String) -> String {
    if message.len() <= MAX_STATUS_MESSAGE {
        return message;
    }
    let mut end = MAX_STATUS_MESSAGE - 64;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} … ({} more bytes)", &message[..end], message.len() - end)
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        let message = bounded_message(mgd3_common::error_chain(&error));
        match error {
            Error::Job(_)
            | Error::FingerprintChanged { .. }
            | Error::JobIdTaken { .. }
            | Error::DataChanged { .. }
            | Error::ClassListChanged { .. }
            | Error::RebuildRefused { .. } => tonic::Status::invalid_argument(message),
            Error::UnknownJob(_)
            | Error::UnknownSweep(_)
            | Error::Forgotten { .. }
            | Error::Vanished { .. }
            | Error::Scheduler(SchedulerError::UnknownWorker(_)) => tonic::Status::not_found(message),
            Error::Scheduler(SchedulerError::WorkerIdInUse { .. }) => tonic::Status::already_exists(message),
            // Another coordinator runs the job: no outage, retrying the call does not help.
            Error::Lock(held) if matches!(*held, crate::lock::LockError::JobHeld { .. }) => {
                tonic::Status::failed_precondition(message)
            }
            Error::Incompatible { .. }
            | Error::Scheduler(_)
            | Error::MissingMarker { .. }
            | Error::DigestMismatch { .. }
            | Error::Quarantined { .. }
            | Error::JobRunning { .. }
            | Error::VariantOfSweep { .. }
            | Error::SweepRunning { .. } => tonic::Status::failed_precondition(message),
            // A marker that cannot be read or names another spec: damage a person must look at,
            // not an outage to retry.
            Error::Commit(CommitError::BadMarker { .. } | CommitError::ForeignMarker { .. }) => {
                tonic::Status::failed_precondition(message)
            }
            Error::Store(_)
            | Error::ObjectStore { .. }
            | Error::Commit(_)
            | Error::Transport(_)
            | Error::Lock(_)
            | Error::StoreNotHeld { .. } => tonic::Status::unavailable(message),
            Error::Corrupt { .. } | Error::Io { .. } | Error::Missing { .. } => tonic::Status::internal(message),
            Error::StateTooNew { .. }
            | Error::OtherJobsFolder { .. }
            | Error::OutputMoved { .. }
            | Error::Blocked { .. } => tonic::Status::failed_precondition(message),
        }
    }
}

/// Changed classes named in a [`Error::DataChanged`] message; more are counted.
const SHOWN_CHANGES: usize = 10;

fn describe_class_list_change(added: &[String], removed: &[String]) -> String {
    let named = |what: &str, list: &[String]| {
        let shown: Vec<String> = list.iter().take(SHOWN_CHANGES).map(|w| format!("`{w}`")).collect();
        let more = list.len().saturating_sub(SHOWN_CHANGES);
        format!("{what} {}{}", shown.join(", "), if more > 0 { format!(" and {more} more") } else { String::new() })
    };
    match (added.is_empty(), removed.is_empty()) {
        (false, false) => format!("{}; {}", named("new", added), named("gone", removed)),
        (false, true) => named("new", added),
        (true, false) => named("gone", removed),
        (true, true) => "the same classes in another order".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_messages_are_bounded_and_say_what_was_cut() {
        let huge = "é".repeat(3 << 20);
        let status = tonic::Status::from(Error::Corrupt { path: "p".into(), problem: huge });
        assert!(status.message().len() <= MAX_STATUS_MESSAGE, "{}", status.message().len());
        assert!(status.message().contains("more bytes)"));
        let short = tonic::Status::from(Error::UnknownJob("j".into()));
        assert_eq!(short.message(), "unknown job `j`");
    }
}
