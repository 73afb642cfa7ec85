//! Why a shard attempt stopped ([`ShardFailure`], kept as a typed source) and what the
//! coordinator should do about it ([`ShardFailure::disposition`]): the failure taxonomy the
//! engines, `run_shard` and the poll loop share.

use crate::models::EngineError;

/// Why a shard attempt stopped. The cause is kept as a typed source; what the coordinator should
/// do about it is [`ShardFailure::disposition`].
#[derive(Debug, thiserror::Error)]
pub enum ShardFailure {
    /// Stopped on request: shutdown, a revoked lease, or a lease that ran out.
    #[error("worker stopped")]
    Cancelled,
    /// Distilling failed (data, models, sampling, output encoding).
    #[error(transparent)]
    Engine(Box<EngineError>),
    /// A model named by the job could not be fetched into the local cache.
    #[error("cannot fetch model `{url}`")]
    FetchModel {
        /// The model's path or URL as the job names it.
        url: String,
        /// Why it could not be fetched.
        #[source]
        source: mgd3_common::store::StoreError,
    },
    /// This worker cannot open the job's models (missing file, no CUDA, no ONNX Runtime).
    #[error("this worker cannot load the job's models")]
    ModelUnavailable(#[source] mgd3_onnx::Error),
    /// A model's files are not all here as the job needs them (external data missing, cut
    /// short, or outside the model's folder): another worker may have them.
    #[error("this worker cannot load {}", job_model(path, source))]
    ModelFiles {
        /// The model's path or URL as the job names it.
        path: String,
        /// What is wrong with its files here.
        #[source]
        source: mgd3_common::modelmeta::ModelFilesError,
    },
    /// The model file at the job's path has other bytes here than the job was submitted with.
    #[error("model `{path}` here has fingerprint {have}, the job expects {want}")]
    ModelMismatch {
        /// The model's path or URL as the job names it.
        path: String,
        /// The fingerprint of the file loaded here.
        have: String,
        /// The fingerprint the job was submitted with.
        want: String,
    },
    /// The job's dataset cannot be opened.
    #[error("cannot open the dataset")]
    Dataset(#[source] crate::data::DataError),
    /// The latent cache named by the job cannot be opened.
    #[error("cannot open the latent cache")]
    LatentCache(#[source] mgd3_common::store::StoreError),
    /// Committing a class failed (staging, marker, publishing).
    #[error(transparent)]
    Commit(#[from] mgd3_common::commit::CommitError),
    /// A class's modes could not be encoded as `.npy`.
    #[error("cannot encode the modes of the class")]
    EncodeModes(#[source] crate::sink::SinkError),
    /// The shard's bookkeeping lost a class (a bug or a store that forgets writes).
    #[error("{0}")]
    Lost(&'static str),
    /// A failure reported by an engine outside this crate (stand-in engines in tests and
    /// benchmarks), with its retryability.
    #[error("{message}")]
    Reported {
        /// What went wrong.
        message: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
}

pub use mgd3_common::lease::Disposition;
use mgd3_common::store::StoreProblem;

/// Whether a store problem is about the credentials this worker uses (none found, or ones the
/// server does not accept as valid), not about what valid ones may do: `AccessDenied` to a
/// known key is the bucket's policy, the same for every worker.
fn worker_credentials(problem: &StoreProblem) -> bool {
    match problem {
        StoreProblem::Credentials { .. } => true,
        StoreProblem::Denied { code } => matches!(
            code.as_str(),
            "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "ExpiredToken" | "InvalidToken" | "AuthenticationFailed"
        ),
        _ => false,
    }
}

/// How [`ShardFailure::ModelFiles`] names the model: by the job's path or URL where the files
/// were looked for elsewhere (a fetched copy), else as "the model", which its error names.
fn job_model(path: &str, source: &mgd3_common::modelmeta::ModelFilesError) -> String {
    let here = source.model();
    if here.as_os_str() == std::ffi::OsStr::new(path.strip_prefix("file://").unwrap_or(path)) {
        "the model".to_owned()
    } else {
        format!("model `{path}`")
    }
}

impl ShardFailure {
    /// What the coordinator should do about this failure: a refusal of the output store that no
    /// retry fixes ([`mgd3_common::store::Refusal`]) pauses the job.
    pub fn disposition(&self) -> Disposition {
        use mgd3_common::commit::CommitError;
        let store_problem = self.store_problem();
        match self {
            ShardFailure::Cancelled => Disposition::Release,
            ShardFailure::Engine(e) if matches!(**e, EngineError::Cancelled) => Disposition::Release,
            // This worker's credentials (none found, a wrong key, an expired token): other
            // workers may hold good ones, and one misconfigured node must not spend the shard's
            // attempts or pause the job for everyone.
            _ if store_problem.as_ref().is_some_and(worker_credentials) => Disposition::Elsewhere,
            // The bucket is gone (deleted, or a server that forgot it): nothing can be written
            // anywhere until a person acts; retries would spend every attempt in a second.
            _ if matches!(store_problem, Some(StoreProblem::NoSuchBucket { .. })) => Disposition::Pause,
            ShardFailure::ModelUnavailable(_)
            | ShardFailure::ModelMismatch { .. }
            | ShardFailure::ModelFiles { .. } => Disposition::Elsewhere,
            // A model file that is no model here (a bad copy on this node's disk) may be a
            // good one on another worker's.
            ShardFailure::Engine(e)
                if matches!(**e, EngineError::UnusableModels { .. } | EngineError::ModelFiles(_)) =>
            {
                Disposition::Elsewhere
            }
            ShardFailure::Engine(e) if e.is_retryable() => Disposition::Retry,
            ShardFailure::Engine(_) | ShardFailure::Dataset(_) => Disposition::GiveUp,
            ShardFailure::Commit(CommitError::ForeignMarker { .. }) => Disposition::GiveUp,
            // A full, read-only or forbidden output: no attempt anywhere can commit until a
            // person acts.
            ShardFailure::Commit(CommitError::Store { source, .. })
                if mgd3_common::store::Refusal::of(source).is_some() =>
            {
                Disposition::Pause
            }
            ShardFailure::Reported { retryable: false, .. } => Disposition::GiveUp,
            ShardFailure::FetchModel { .. }
            | ShardFailure::LatentCache(_)
            | ShardFailure::Commit(_)
            | ShardFailure::EncodeModes(_)
            | ShardFailure::Lost(_)
            | ShardFailure::Reported { .. } => Disposition::Retry,
        }
    }

    /// The store problem behind this failure, if any: the first one recognised in its causes
    /// ([`StoreProblem::of`]).
    fn store_problem(&self) -> Option<StoreProblem> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(error) = cause {
            if let Some(problem) = error.downcast_ref::<object_store::Error>().and_then(StoreProblem::of) {
                return Some(problem);
            }
            if let Some(credentials) = error.downcast_ref::<mgd3_common::aws::CredentialsError>() {
                return Some(StoreProblem::Credentials { message: mgd3_common::error_chain(credentials) });
            }
            cause = error.source();
        }
        None
    }

    /// The message and its causes on one line, as the coordinator records it.
    pub fn describe(&self) -> String {
        mgd3_common::error_chain(self)
    }
}

impl From<EngineError> for ShardFailure {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::Cancelled => ShardFailure::Cancelled,
            other => ShardFailure::Engine(Box::new(other)),
        }
    }
}

/// A failed shard attempt: the failure and the class it happened in, when it is about one.
#[derive(Debug, thiserror::Error)]
#[error("{failure}")]
pub struct ShardError {
    /// The class being distilled or committed, when the failure is about one class.
    pub class: Option<String>,
    /// What went wrong (boxed: errors travel through every commit call).
    #[source]
    pub failure: Box<ShardFailure>,
}

impl ShardError {
    /// The shard was stopped (shutdown, a revoked lease), not failed.
    pub fn is_cancelled(&self) -> bool {
        matches!(&*self.failure, ShardFailure::Cancelled)
            || matches!(&*self.failure, ShardFailure::Engine(e) if matches!(**e, EngineError::Cancelled))
    }

    /// A failure about no class in particular.
    pub fn shard(failure: impl Into<ShardFailure>) -> Self {
        ShardError { class: None, failure: Box::new(failure.into()) }
    }

    /// A failure about class `wnid`.
    pub fn class(wnid: &str, failure: impl Into<ShardFailure>) -> Self {
        ShardError { class: Some(wnid.to_owned()), failure: Box::new(failure.into()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::UnusableModel;

    /// A model whose external data is not all here names the job's path only where it differs
    /// from the file its error names (a copy fetched from a store), so a local path is said once.
    #[test]
    fn missing_model_files_name_the_model_once() {
        let missing = |model: &str| mgd3_common::modelmeta::ModelFilesError::Missing {
            model: model.into(),
            location: "dit.onnx.data".into(),
            path: "/models/dit.onnx.data".into(),
        };
        let local = ShardFailure::ModelFiles { path: "/models/dit.onnx".into(), source: missing("/models/dit.onnx") };
        let text = mgd3_common::error_chain(&local);
        assert_eq!(text.matches("/models/dit.onnx`").count(), 1, "{text}");
        assert!(
            text.starts_with("this worker cannot load the model: model `/models/dit.onnx` keeps weights"),
            "{text}"
        );
        let fetched =
            ShardFailure::ModelFiles { path: "s3://bucket/dit.onnx".into(), source: missing("/cache/ab12/dit.onnx") };
        let text = mgd3_common::error_chain(&fetched);
        assert!(text.contains("`s3://bucket/dit.onnx`") && text.contains("`/cache/ab12/dit.onnx`"), "{text}");
        assert_eq!(local.disposition(), Disposition::Elsewhere);
    }

    /// Store failures go where they can be fixed: this worker's credentials (none found, a key
    /// the server does not know, a bad signature) send the shard to another worker without an
    /// attempt, instead of one misconfigured node failing the job or pausing it for everyone; a
    /// missing bucket pauses the job (retries spent every attempt in a second); what valid
    /// credentials may not do (`AccessDenied`) pauses it as before; anything else is retried.
    #[test]
    fn store_failures_go_where_they_can_be_fixed() {
        let answered = |status: &str, code: &str| {
            let text = format!(
                "Error performing PUT http://h/b/k - Server returned non-2xx status code: {status}: \
                 <?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>m</Message></Error>"
            );
            object_store::Error::Generic { store: "S3", source: text.into() }
        };
        let commit = |source: object_store::Error| {
            ShardFailure::Commit(mgd3_common::commit::CommitError::Store {
                url: "s3://b/out".into(),
                context: "staging `k`".into(),
                source,
            })
        };
        for code in ["InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"] {
            assert_eq!(commit(answered("403 Forbidden", code)).disposition(), Disposition::Elsewhere, "{code}");
        }
        let none = object_store::Error::Generic {
            store: "S3",
            source: Box::new(mgd3_common::aws::CredentialsError::NotFound { profile: "default".into() }),
        };
        assert_eq!(commit(none).disposition(), Disposition::Elsewhere);
        let listing = ShardFailure::LatentCache(mgd3_common::store::StoreError::Open {
            url: "s3://b/cache".into(),
            source: answered("403 Forbidden", "InvalidAccessKeyId"),
        });
        assert_eq!(listing.disposition(), Disposition::Elsewhere, "wherever the store was called");
        let no_bucket = object_store::Error::NotFound {
            path: "out/x".into(),
            source: Box::new(answered("404 Not Found", "NoSuchBucket")),
        };
        assert_eq!(commit(no_bucket).disposition(), Disposition::Pause);
        let forbidden = object_store::Error::PermissionDenied {
            path: "out/x".into(),
            source: Box::new(answered("403 Forbidden", "AccessDenied")),
        };
        assert_eq!(commit(forbidden).disposition(), Disposition::Pause);
        assert_eq!(commit(answered("503 Slow Down", "SlowDown")).disposition(), Disposition::Retry);
    }

    /// A model file that is no model on this worker is tried on another (node-local copies);
    /// one given as another kind is the job's mistake everywhere.
    #[test]
    fn a_file_that_is_no_model_here_is_tried_elsewhere() {
        let no_model = UnusableModel {
            given_as: "dit",
            path: "/models/dit.onnx".into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not an ONNX model: it has no graph"),
        };
        let unreadable = UnusableModel {
            given_as: "vae_decoder",
            path: "/models/vae_decoder.onnx".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let failure =
            ShardFailure::Engine(Box::new(EngineError::UnusableModels { models: vec![no_model, unreadable] }));
        assert_eq!(failure.disposition(), Disposition::Elsewhere);
        let text = failure.describe();
        assert!(text.contains("the DiT `/models/dit.onnx` is not an ONNX model: it has no graph (give the"), "{text}");
        assert!(
            text.contains("the VAE decoder `/models/vae_decoder.onnx` may not be read by this worker's user"),
            "{text}"
        );
        let misplaced = ShardFailure::Engine(Box::new(EngineError::MisplacedModels {
            models: vec![crate::models::MisplacedModel {
                given_as: "dit",
                path: "/models/vae.onnx".into(),
                kind: "vae_decoder".into(),
            }],
            unusable: Vec::new(),
        }));
        assert_eq!(misplaced.disposition(), Disposition::GiveUp);
    }
}
