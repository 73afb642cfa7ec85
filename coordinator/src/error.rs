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
    #[error("job `{job}` already exists with another spec")]
    JobIdTaken { job: String },
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
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match error {
            Error::Job(_) | Error::FingerprintChanged { .. } | Error::JobIdTaken { .. } => {
                tonic::Status::invalid_argument(message)
            }
            Error::UnknownJob(_) | Error::Scheduler(SchedulerError::UnknownWorker(_)) => {
                tonic::Status::not_found(message)
            }
            Error::Incompatible(_) | Error::Scheduler(_) | Error::MissingMarker { .. } => {
                tonic::Status::failed_precondition(message)
            }
            Error::Store(_) | Error::ObjectStore { .. } | Error::Commit(_) | Error::Transport(_) => {
                tonic::Status::unavailable(message)
            }
            Error::Corrupt { .. } | Error::Io { .. } => tonic::Status::internal(message),
        }
    }
}
