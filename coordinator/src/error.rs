//! The coordinator's error type and its one mapping onto gRPC statuses.

use mgd3_common::commit::CommitError;
use mgd3_common::job::JobError;
use mgd3_common::store::StoreError;

use crate::scheduler::SchedulerError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error("object store `{url}`: {context}: {source}")]
    ObjectStore {
        url: String,
        context: String,
        #[source]
        source: object_store::Error,
    },
    #[error("`{path}` in the store is corrupt: {problem}")]
    Corrupt { path: String, problem: String },
    #[error("unknown job `{0}`")]
    UnknownJob(String),
    #[error(
        "job `{job}`: the spec fingerprint changed ({now}, the job has {was}); refusing to mix outputs of two specs"
    )]
    FingerprintChanged { job: String, was: String, now: String },
    #[error(
        "job `{job}`: the dataset changed since the job was submitted (images added, removed or rewritten); \
         `coordinator submit` makes it a new job (cached latents of unchanged classes are reused), or restore the images"
    )]
    DataChanged { job: String },
    #[error("job `{job}` already exists with another spec")]
    JobIdTaken { job: String },
    #[error(
        "`{path}` has schema_version {found}, but this coordinator reads up to {supported}: a newer mgd3 wrote it; run that version (or newer) to serve this store"
    )]
    StateTooNew { path: String, found: u32, supported: u32 },
    #[error("worker rejected: {0}")]
    Incompatible(String),
    #[error("{what} `{path}`: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "class `{wnid}` of shard {shard} has no commit marker in `{output}` as the coordinator sees it; the shard is not complete"
    )]
    MissingMarker { shard: usize, wnid: String, output: String },
    #[error(
        "shard {shard} was reported with manifest digest {reported}, but its commit markers in `{output}` give {stored}; the shard is not complete"
    )]
    DigestMismatch { shard: usize, reported: String, stored: String, output: String },
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("`{path}` is missing from the store")]
    Missing { path: String },
    #[error("job `{job}` is quarantined: {reason}; repair or remove its records, then `coordinator resume {job}`")]
    Quarantined { job: String, reason: String },
}

impl Error {
    /// True for damage to a job's own records (unreadable or missing `job.json`, an unreadable or
    /// foreign marker): that job is quarantined. Store outages and configuration errors are not.
    pub fn is_damage(&self) -> bool {
        match self {
            Error::Corrupt { .. } | Error::Missing { .. } | Error::StateTooNew { .. } => true,
            Error::Commit(e) => matches!(e, CommitError::BadMarker { .. } | CommitError::ForeignMarker { .. }),
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
        let message = bounded_message(error.to_string());
        match error {
            Error::Job(_) | Error::FingerprintChanged { .. } | Error::JobIdTaken { .. } | Error::DataChanged { .. } => {
                tonic::Status::invalid_argument(message)
            }
            Error::UnknownJob(_) | Error::Scheduler(SchedulerError::UnknownWorker(_)) => {
                tonic::Status::not_found(message)
            }
            Error::Incompatible(_)
            | Error::Scheduler(_)
            | Error::MissingMarker { .. }
            | Error::DigestMismatch { .. }
            | Error::Quarantined { .. } => tonic::Status::failed_precondition(message),
            Error::Store(_) | Error::ObjectStore { .. } | Error::Commit(_) | Error::Transport(_) | Error::Lock(_) => {
                tonic::Status::unavailable(message)
            }
            Error::Corrupt { .. } | Error::Io { .. } | Error::Missing { .. } => tonic::Status::internal(message),
            Error::StateTooNew { .. } => tonic::Status::failed_precondition(message),
        }
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
