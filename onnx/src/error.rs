//! The error type of the onnx crate: every variant names the model file (and the input, output
//! or metadata key) it is about.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot load ONNX Runtime from `{path}`: {reason}\n  mgd3 needs ONNX Runtime {required} or newer. \
         Install it with `scripts/setup_ort.sh` (CPU) or `scripts/setup_ort.sh gpu` (CUDA 13), then set \
         ORT_DYLIB_PATH=<repo>/.ort/cpu/libonnxruntime.so or pass --ort-lib"
    )]
    RuntimeUnavailable { path: PathBuf, reason: String, required: &'static str },

    #[error("ONNX Runtime: {context}: {source}")]
    Ort {
        context: String,
        #[source]
        source: ort::Error,
    },

    #[error(
        "device {device} requested but the CUDA execution provider could not be registered: {source}\n  \
         use the onnxruntime-gpu build (`scripts/setup_ort.sh gpu`) and make the CUDA 13 / cuDNN 9 \
         libraries visible (LD_LIBRARY_PATH); mgd3 never falls back to the CPU silently"
    )]
    CudaUnavailable {
        device: String,
        #[source]
        source: ort::Error,
    },

    #[error("model file `{0}` does not exist")]
    ModelNotFound(PathBuf),

    #[error("cannot read model file `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("model `{model}` does not fit the mgd3 contract: {item}: expected {expected}, found {found}")]
    Contract { model: PathBuf, item: String, expected: String, found: String },

    #[error("model `{model}`: {item}: expected {expected}, got {got}")]
    BadInput { model: PathBuf, item: String, expected: String, got: String },

    #[error("invalid device `{0}` (expected `cpu`, `cuda` or `cuda:N`)")]
    BadDevice(String),
}

impl Error {
    pub(crate) fn ort(context: impl Into<String>) -> impl FnOnce(ort::Error) -> Error {
        let context = context.into();
        move |source| Error::Ort { context, source }
    }
}
