//! The error type of the onnx crate: every variant names the model file (and the input, output
//! or metadata key) it is about.

use std::path::PathBuf;

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ONNX Runtime shared library is missing or cannot be loaded (too old, wrong build).
    #[error(
        "cannot load ONNX Runtime from `{path}`: {reason}\n  mgd3 needs ONNX Runtime {required} or newer. \
         Install it with `scripts/setup_ort.sh` (CPU) or `scripts/setup_ort.sh gpu` (CUDA 13), then set \
         ORT_DYLIB_PATH=<repo>/.ort/cpu/libonnxruntime.so or pass --ort-lib"
    )]
    RuntimeUnavailable {
        /// The library path tried.
        path: PathBuf,
        /// Why it could not be loaded.
        reason: String,
        /// The oldest supported version ([`crate::session::REQUIRED_ORT`]).
        required: &'static str,
    },

    /// An ONNX Runtime call failed (building a session, reading metadata, a run).
    #[error("ONNX Runtime: {context}")]
    Ort {
        /// What was being done, naming the model where there is one.
        context: String,
        /// ONNX Runtime's error.
        #[source]
        source: ort::Error,
    },

    /// A CUDA device was asked for but its execution provider could not be registered (there is
    /// no CPU fallback).
    #[error("cannot use {device}: {}; mgd3 never falls back to the CPU silently", cuda_fix(cause))]
    CudaUnavailable {
        /// The device asked for (`cuda:N`).
        device: String,
        /// ONNX Runtime's message, which names the library that failed to load.
        cause: String,
        /// ONNX Runtime's error.
        #[source]
        source: ort::Error,
    },

    /// `--provider tensorrt` on a device whose TensorRT execution provider cannot be registered:
    /// TensorRT itself or ONNX Runtime's TensorRT provider library is missing.
    #[error("cannot use TensorRT on {device}: {}", tensorrt_fix(cause))]
    TensorRtUnavailable {
        /// The device asked for (`cuda:N`).
        device: String,
        /// ONNX Runtime's message, which names the library that failed to load.
        cause: String,
        /// ONNX Runtime's error.
        #[source]
        source: ort::Error,
    },

    /// A model whose precision ONNX Runtime runs only on CUDA (a bf16 export) given to a worker on
    /// the CPU.
    #[error(
        "model `{model}` is a {precision} export, which ONNX Runtime runs on CUDA only (its CPU provider has no \
         {precision} kernels): run this worker with --device cuda, or give it an fp16 or fp32 export"
    )]
    NeedsCuda {
        /// The model file.
        model: PathBuf,
        /// Its `mgd3.precision` (`bf16`).
        precision: String,
    },

    /// A model rewritten into ONNX Runtime's CUDA-only operators (`export_onnx.py cuda-vae`:
    /// `mgd3.cuda_only = 1`) given to a worker on the CPU.
    #[error("{}", cuda_graph_message(model, *group_norm, also))]
    CudaGraph {
        /// The model file.
        model: PathBuf,
        /// Its fused GroupNorms (`mgd3.group_norm`).
        group_norm: usize,
        /// The worker's other models that are CUDA graphs too (both VAE halves, as `cuda-vae`
        /// writes them), so that one message names every file to replace.
        also: Vec<PathBuf>,
    },

    /// A GPU provider name other than `cuda` or `tensorrt`.
    #[error("unknown provider `{0}`: use cuda or tensorrt")]
    BadProvider(String),

    /// The model is of a newer ONNX IR version than this ONNX Runtime reads (a model exported with
    /// a newer `onnx` package): another worker's runtime may read it.
    #[error(
        "model `{}` is ONNX IR version {}, newer than this worker's ONNX Runtime reads (up to IR version {}): \
         export it again with scripts/export_onnx.py (its pinned onnx package writes an IR version ONNX Runtime \
         {} reads), or give this worker a newer ONNX Runtime (--ort-lib or ORT_DYLIB_PATH)",
        .model.display(),
        .found.map_or("?".into(), |v| v.to_string()),
        .max.map_or("?".into(), |v| v.to_string()),
        crate::session::REQUIRED_ORT
    )]
    UnsupportedIrVersion {
        /// The model file.
        model: PathBuf,
        /// Its IR version, as ONNX Runtime reported it.
        found: Option<u64>,
        /// The newest IR version this ONNX Runtime reads, as it reported it.
        max: Option<u64>,
    },

    /// ONNX Runtime refused to build a session from a model that fits the contract as far as
    /// its file says (an operator or opset this runtime lacks, tensors it cannot read): the same
    /// file fails the same way on this runtime every time, so it is not retried here.
    #[error("ONNX Runtime cannot load model `{}`: {reason}{}", .model.display(), load_hint(reason))]
    LoadFailed {
        /// The model file.
        model: PathBuf,
        /// ONNX Runtime's message, without its "Load model from … failed:" prefix.
        reason: String,
    },

    /// The model file does not exist (or is a link to nothing, whose target is named).
    #[error("{}", not_found_message(.0))]
    ModelNotFound(PathBuf),

    /// The model's inputs, outputs or `mgd3.*` metadata do not fit the mgd3 model contract.
    #[error(transparent)]
    Contract(#[from] mgd3_common::contract::ContractViolation),

    /// An input does not fit the loaded model (shape, value range, batch size), or a VAE
    /// encoder's `logvar` shape or `mgd3.image_size` disagrees with its other declarations.
    #[error("model `{model}`: {item}: expected {expected}, got {got}")]
    BadInput {
        /// The model file.
        model: PathBuf,
        /// The input (or output) concerned.
        item: String,
        /// What the model accepts.
        expected: String,
        /// What was given.
        got: String,
    },

    /// A model gave a NaN or an infinity: nothing made from it may be kept. Seen with fp16
    /// SD-VAE exports, whose activations overflow float16 (diffusers issues 4325, 7188, 9844).
    #[error(
        "model `{model}` gave a non-finite value ({value}) in output `{output}` for batch item {item}{}",
        if *.fp16 {
            "; it runs in float16, where SD-VAE activations overflow: use the fp32 VAE, or an fp16-safe export \
             (one whose decoder and encoder keep their activations within float16's range)"
        } else {
            "; check the model's weights and its export"
        }
    )]
    NonFinite {
        /// The model file.
        model: PathBuf,
        /// The output that held it.
        output: String,
        /// Which item of the batch passed to the call (0-based).
        item: usize,
        /// The first non-finite value met (NaN, inf or -inf).
        value: f32,
        /// The model computes in float16.
        fp16: bool,
    },

    /// A call ran out of memory (or past a kernel's element range) even at one item per call:
    /// out-of-memory backoff halved the batch down to 1 and that failed too.
    #[error(
        "model `{model}` ran out of memory on {device} at 1 item per call{}: {}",
        match .requested_bytes { Some(b) => format!(" (ONNX Runtime asked for {b} bytes)"), None => String::new() },
        out_of_memory_advice(device)
    )]
    OutOfMemory {
        /// The model file.
        model: PathBuf,
        /// The device it runs on.
        device: String,
        /// The allocation ONNX Runtime reported failing, when its message says.
        requested_bytes: Option<u64>,
        /// ONNX Runtime's error.
        #[source]
        source: ort::Error,
    },

    /// A device string other than `cpu`, `cuda` or `cuda:N` (N ≥ 0).
    #[error("invalid device `{0}` (expected `cpu`, `cuda` or `cuda:N`)")]
    BadDevice(String),
}

impl Error {
    pub(crate) fn ort(context: impl Into<String>) -> impl FnOnce(ort::Error) -> Error {
        let context = context.into();
        move |source| Error::Ort { context, source }
    }
}

/// The first `lib….so…` an ONNX Runtime message names: what the dynamic loader could not find.
fn missing_library(cause: &str) -> Option<&str> {
    cause
        .split(|c: char| c.is_whitespace() || matches!(c, ':' | '\'' | '"' | '(' | ')' | ','))
        .find(|word| word.starts_with("lib") && word.contains(".so"))
}

/// One sentence for a TensorRT execution provider that could not be registered (its `cause`):
/// what is missing and the fix.
pub fn tensorrt_fix(cause: &str) -> String {
    match missing_library(cause) {
        Some(lib) if lib.starts_with("libonnxruntime_providers") => format!(
            "the ONNX Runtime in use has no TensorRT execution provider (`{lib}` is missing: a CPU build, or \
             a copy without it); `scripts/setup_ort.sh gpu` installs the GPU build, which has it"
        ),
        Some(lib) => format!(
            "TensorRT is not installed where the loader looks (`{lib}` is missing): install TensorRT 10 for \
             CUDA 13 (e.g. `pip install tensorrt-cu13`) and add its lib folder to LD_LIBRARY_PATH, or run \
             without --provider tensorrt (the CUDA provider)"
        ),
        None if cause.to_ascii_lowercase().contains("not enabled") => {
            "the ONNX Runtime in use is a CPU build, with neither TensorRT nor CUDA: `scripts/setup_ort.sh gpu` \
             installs the GPU build (TensorRT 10 for CUDA 13 must then be on LD_LIBRARY_PATH for --provider tensorrt)"
                .to_owned()
        }
        None => "ONNX Runtime's TensorRT execution provider could not be registered; it needs the GPU build \
                 (`scripts/setup_ort.sh gpu`) and TensorRT 10 for CUDA 13 on LD_LIBRARY_PATH, or run without \
                 --provider tensorrt (the CUDA provider)"
            .to_owned(),
    }
}

/// What to do about a CUDA execution provider that could not be registered, from ONNX Runtime's
/// message: the library it could not load (named), a CPU-only ONNX Runtime, or a driver too old.
pub fn cuda_fix(cause: &str) -> String {
    let lower = cause.to_ascii_lowercase();
    let library = missing_library(cause);
    if lower.contains("driver") && (lower.contains("insufficient") || lower.contains("older")) {
        return "the NVIDIA driver is older than this ONNX Runtime's CUDA needs (the `gpu` build of \
                `scripts/setup_ort.sh` needs CUDA 13 drivers, R580 or newer): on CUDA 12 drivers (R525 or newer) \
                install `scripts/setup_ort.sh gpu-cu12` and point --ort-lib / ORT_DYLIB_PATH at \
                .ort/gpu-cu12/libonnxruntime.so; or update the driver"
            .to_owned();
    }
    match library {
        Some(lib) if lib.starts_with("libonnxruntime_providers") => format!(
            "the ONNX Runtime in use has no CUDA execution provider (`{lib}` is missing: a CPU build); \
             install the GPU build with `scripts/setup_ort.sh gpu` (or point ORT_DYLIB_PATH / --ort-lib at one)"
        ),
        Some(lib) => format!(
            "the CUDA execution provider needs `{lib}`, which the loader cannot find; load the CUDA and cuDNN \
             libraries (e.g. `module load cuda cudnn`) or add their folder to LD_LIBRARY_PATH{}",
            cuda_major_hint(lib)
        ),
        None if lower.contains("not enabled") || lower.contains("not available") || lower.contains("not supported") => {
            "the ONNX Runtime in use is a CPU build; install the GPU build with `scripts/setup_ort.sh gpu` \
             (or point ORT_DYLIB_PATH / --ort-lib at one), or run on the CPU with --device cpu \
             (MGD3_DEVICE=cpu for distill.sbatch)"
                .to_owned()
        }
        None => "ONNX Runtime's CUDA execution provider could not be registered; use the GPU build \
                 (`scripts/setup_ort.sh gpu`) with the CUDA and cuDNN libraries visible (LD_LIBRARY_PATH)"
            .to_owned(),
    }
}

/// For a missing CUDA library of a given major version, the ONNX Runtime build that matches the
/// other one: clusters with CUDA 12 modules meet the CUDA 13 build's `….so.13` first.
fn cuda_major_hint(lib: &str) -> &'static str {
    let cuda_library = ["libcudart", "libcublas", "libcufft", "libcurand"].iter().any(|p| lib.starts_with(p));
    if cuda_library && lib.ends_with(".so.13") {
        " (this is ONNX Runtime's CUDA 13 build; with CUDA 12 libraries and drivers use `scripts/setup_ort.sh \
         gpu-cu12` and point --ort-lib / ORT_DYLIB_PATH at .ort/gpu-cu12/libonnxruntime.so)"
    } else if cuda_library && lib.ends_with(".so.12") {
        " (this is ONNX Runtime's CUDA 12 build; with CUDA 13 libraries use `scripts/setup_ort.sh gpu`)"
    } else {
        ""
    }
}

/// What to do about [`Error::OutOfMemory`] on `device`: `--gpu-memory-limit` bounds the CUDA
/// provider's arena only, so a CPU worker is not told to raise it.
fn out_of_memory_advice(device: &str) -> &'static str {
    if device.eq_ignore_ascii_case("cpu") {
        "free memory on this machine (another process may hold it), or use a smaller or float16 model"
    } else {
        "free the device (another process may hold it), raise --gpu-memory-limit, or use a smaller or float16 model"
    }
}

/// The message of [`Error::CudaGraph`].
/// What to do about a load failure whose cause is known.
fn load_hint(reason: &str) -> &'static str {
    if reason.contains("external tensors") {
        "; the model keeps tensors ONNX Runtime must read at load (shapes, axes) in external data: save it again \
         with onnx.save_model's default size_threshold, or export it with scripts/export_onnx.py"
    } else if reason.contains("opset") || reason.contains("Opset") {
        "; export it with scripts/export_onnx.py, whose opset this ONNX Runtime reads"
    } else {
        "; export it with scripts/export_onnx.py, or give this worker an ONNX Runtime that has what the model uses"
    }
}

fn not_found_message(model: &std::path::Path) -> String {
    match mgd3_common::modelmeta::dangling_link(model) {
        Some(target) => format!(
            "model file `{}` is a link to `{}`, which does not exist: link or copy the model there",
            model.display(),
            target.display()
        ),
        None => format!("model file `{}` does not exist", model.display()),
    }
}

fn cuda_graph_message(model: &std::path::Path, group_norm: usize, also: &[PathBuf]) -> String {
    let what = "the CUDA graph of a VAE";
    let count = if group_norm == 0 { String::new() } else { format!("{group_norm} ") };
    let ops = format!("{count}fused GroupNorms and NHWC convolutions, operators ONNX Runtime has on CUDA only");
    if also.is_empty() {
        return format!(
            "model `{}` is {what} ({ops}): run this worker with --device cuda, or give it the plain or fused export \
             of that VAE",
            model.display()
        );
    }
    let others: Vec<String> = also.iter().map(|p| format!("`{}`", p.display())).collect();
    format!(
        "model `{}` is {what} ({ops}), and so is {}: run this worker with --device cuda, or give it the plain or \
         fused exports of those VAE halves",
        model.display(),
        others.join(" and ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_fix_points_at_the_build_that_matches_the_cluster() {
        let thirteen = cuda_fix("libcublasLt.so.13: cannot open shared object file: No such file or directory");
        assert!(thirteen.contains("`libcublasLt.so.13`") && thirteen.contains("gpu-cu12"), "{thirteen}");
        let twelve = cuda_fix("libcudart.so.12: cannot open shared object file: No such file or directory");
        assert!(twelve.contains("CUDA 12 build") && twelve.contains("setup_ort.sh gpu`"), "{twelve}");
        let cudnn = cuda_fix("libcudnn.so.9: cannot open shared object file: No such file or directory");
        assert!(cudnn.contains("`libcudnn.so.9`") && !cudnn.contains("gpu-cu12"), "{cudnn}");
        let driver = cuda_fix("CUDA driver version is insufficient for CUDA runtime version");
        assert!(driver.contains("R580") && driver.contains("gpu-cu12") && driver.contains("R525"), "{driver}");
    }

    #[test]
    fn tensorrt_fix_names_what_is_missing() {
        let no_trt = tensorrt_fix("libnvinfer.so.10: cannot open shared object file: No such file or directory");
        assert!(no_trt.contains("`libnvinfer.so.10` is missing") && no_trt.contains("tensorrt-cu13"), "{no_trt}");
        assert!(no_trt.contains("without --provider tensorrt"), "{no_trt}");
        let no_provider = tensorrt_fix("Failed to load library libonnxruntime_providers_tensorrt.so with error: …");
        assert!(no_provider.contains("no TensorRT execution provider") && no_provider.contains("setup_ort.sh gpu"));
        let cpu_build = tensorrt_fix("TensorRT execution provider is not enabled in this build.");
        assert!(cpu_build.contains("a CPU build, with neither TensorRT nor CUDA"), "{cpu_build}");
        assert!(!cpu_build.contains("without --provider tensorrt"), "the CUDA provider is missing too: {cpu_build}");
    }
}
