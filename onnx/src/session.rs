//! The one place ONNX Runtime is loaded and sessions are built: library path, execution provider
//! (CPU or CUDA, never a silent fallback), the CUDA options each model is tuned with, thread
//! count and optimisation level.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::ep;
use ort::ep::ArenaExtendStrategy;
use ort::ep::cuda::ConvAlgorithmSearch;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use crate::error::{Error, Result};

/// The oldest ONNX Runtime the `api-26` binding accepts: 1.26.0 is the newest onnxruntime-gpu
/// wheel built for CUDA 12 (1.27 and later are CUDA 13), so one binary serves both kinds of node.
/// (One value with the contract's, which `coordinator check` quotes.)
pub const REQUIRED_ORT: &str = mgd3_common::contract::REQUIRED_ORT;

/// Where a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU execution provider (`cpu`, the default).
    #[default]
    Cpu,
    /// The CUDA execution provider on GPU N (`cuda` = `cuda:0`, `cuda:N`).
    Cuda(i32),
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<i32>().ok())
                .filter(|n| *n >= 0)
                .map(Device::Cuda)
                .ok_or_else(|| Error::BadDevice(s.to_owned())),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The default per-call element ceiling: the largest tensor of any call stays below 2³¹
/// elements, the range of the 32-bit indices some CUDA kernels use (ORT's Resize fails with
/// "output element count exceeds int range" beyond it).
pub const DEFAULT_MAX_CALL_ELEMENTS: u64 = i32::MAX as u64;

/// Which execution provider runs the models on a CUDA device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GpuProvider {
    /// ONNX Runtime's CUDA execution provider (`cuda`, the default).
    #[default]
    Cuda,
    /// NVIDIA TensorRT through ONNX Runtime's TensorRT execution provider (`tensorrt`, opt-in):
    /// it builds an engine per model and input shape on first use (minutes for DiT-XL/2, kept in
    /// [`SessionConfig::tensorrt_cache`]) and leaves the nodes it cannot take to the CUDA EP.
    TensorRt,
}

impl FromStr for GpuProvider {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cuda" => Ok(GpuProvider::Cuda),
            "tensorrt" => Ok(GpuProvider::TensorRt),
            _ => Err(Error::BadProvider(s.to_owned())),
        }
    }
}

impl fmt::Display for GpuProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GpuProvider::Cuda => "cuda",
            GpuProvider::TensorRt => "tensorrt",
        })
    }
}

/// The CUDA execution provider's options for one model, set on purpose rather than left to
/// ONNX Runtime's defaults, and named in the model-load log line ([`fmt::Display`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaTuning {
    /// TF32 tensor cores for fp32 MatMul/Conv (`use_tf32`): ~10 mantissa bits for fp32 models,
    /// as PyTorch's `allow_tf32`; fp16 models are unaffected.
    pub tf32: bool,
    /// Convolutions in NHWC (`prefer_nhwc`): cuDNN's tensor-core kernels want channels last;
    /// the VAE is convolutions, the DiT one patch embedding.
    pub prefer_nhwc: bool,
    /// cuDNN's exhaustive algorithm search (`cudnn_conv_algo_search`), run once per input
    /// shape; `false`: its heuristic pick.
    pub exhaustive_conv_search: bool,
    /// The arena grows by what was asked (`arena_extend_strategy` kSameAsRequested) instead of
    /// powers of two, so `--gpu-memory-limit` and out-of-memory backoff see real sizes.
    pub arena_as_requested: bool,
}

impl CudaTuning {
    /// The DiT: GEMMs and fused attention; its one convolution needs no search.
    pub const DIT: CudaTuning =
        CudaTuning { tf32: true, prefer_nhwc: false, exhaustive_conv_search: false, arena_as_requested: true };
    /// The VAE encoder and decoder: convolutions at up to 512² pixels, where NHWC and the
    /// exhaustive search pay (ONNX Runtime's Stable Diffusion pipeline does the same).
    pub const VAE: CudaTuning =
        CudaTuning { tf32: true, prefer_nhwc: true, exhaustive_conv_search: true, arena_as_requested: true };
}

impl Default for CudaTuning {
    fn default() -> Self {
        CudaTuning::DIT
    }
}

impl fmt::Display for CudaTuning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TF32 {}, {}, cuDNN {} conv search, arena {}",
            if self.tf32 { "on" } else { "off" },
            if self.prefer_nhwc { "NHWC" } else { "NCHW" },
            if self.exhaustive_conv_search { "exhaustive" } else { "heuristic" },
            if self.arena_as_requested { "grows as requested" } else { "grows by powers of two" }
        )
    }
}

/// How a session of a worker is built and how its calls are bounded.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Where every model runs (default CPU).
    pub device: Device,
    /// Intra-op threads; `None` lets ONNX Runtime use every core.
    pub intra_threads: Option<usize>,
    /// Largest batch (items) handed to one `run` of this model, its share of the worker's
    /// batch policy; bigger inputs are split into chunks (default 64).
    pub max_batch: usize,
    /// Per-call element ceiling: a call carries at most as many items as keep the model's
    /// largest tensor (measured per item at load) within this many elements (default
    /// [`DEFAULT_MAX_CALL_ELEMENTS`]).
    pub max_call_elements: u64,
    /// Bytes the CUDA execution provider's arena may hold (`gpu_mem_limit`); `None`: ONNX
    /// Runtime's default (the whole card). Ignored on the CPU.
    pub gpu_memory_limit: Option<u64>,
    /// The CUDA execution provider's options for this model (ignored on the CPU).
    pub cuda: CudaTuning,
    /// The execution provider on a CUDA device (ignored on the CPU).
    pub provider: GpuProvider,
    /// Where TensorRT keeps its engines and timing cache (`--provider tensorrt`); `None`: a
    /// `mgd3-tensorrt` folder in the temporary folder.
    pub tensorrt_cache: Option<PathBuf>,
    /// Fault injection for tests: a call of more items than this fails as ONNX Runtime does
    /// when an allocation fails, so the out-of-memory backoff can be tested on the CPU.
    pub fault_oom_above: Option<usize>,
    /// Measure the memory one item of a call takes at load (two extra calls, of 1 and
    /// [`crate::MEASURE_ITEMS`] items; [`crate::CallLimit::item_bytes`]), for a batch
    /// policy chosen from the device's free memory.
    pub measure_item_bytes: bool,
    /// Run calls through ONNX Runtime's I/O binding (default on): an input equal to the one
    /// bound for the previous call (the DiT's labels across steps) stays on the device instead
    /// of being copied again, and outputs land in page-locked host memory on CUDA, which the
    /// GPU writes directly. Checked at load against a plain run of the probe item, byte for
    /// byte; where ONNX Runtime refuses it or the bytes differ the model runs plainly (logged).
    pub io_binding: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            device: Device::Cpu,
            intra_threads: None,
            max_batch: 64,
            max_call_elements: DEFAULT_MAX_CALL_ELEMENTS,
            gpu_memory_limit: None,
            cuda: CudaTuning::default(),
            provider: GpuProvider::Cuda,
            tensorrt_cache: None,
            fault_oom_above: None,
            measure_item_bytes: false,
            io_binding: true,
        }
    }
}

static ENVIRONMENT: OnceLock<Environment> = OnceLock::new();

/// `.ort/<flavour>/libonnxruntime.so` in the nearest ancestor of the running executable that has
/// one (where `scripts/setup_ort.sh` puts it in a checkout); the GPU builds first (CUDA 13, then
/// CUDA 12: a checkout holds the one its cluster's drivers run, or both with `--ort-lib` choosing).
fn installed_beside_executable() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors().skip(1).find_map(|dir| {
        ["gpu", "gpu-cu12", "cpu"]
            .iter()
            .map(|flavour| dir.join(".ort").join(flavour).join("libonnxruntime.so"))
            .find(|p| p.exists())
    })
}

/// Loads the ONNX Runtime shared library and creates the process-wide environment.
///
/// The library is `library` if given, else `$ORT_DYLIB_PATH`, else the copy `scripts/setup_ort.sh`
/// installed in the checkout the executable was built in, else `libonnxruntime.so` from the
/// system search path. Later calls return the environment of the first one.
///
/// # Errors
/// [`Error::RuntimeUnavailable`] when the library is missing or cannot be loaded;
/// [`Error::Ort`] when the environment cannot be created.
pub fn init_runtime(library: Option<&Path>) -> Result<&'static Environment> {
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    // One thread builds the environment: ONNX Runtime's is a process singleton that keeps the
    // first builder's logger, so a second one built in a race and then dropped would free the
    // logger ONNX Runtime still calls.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _building = BUILDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(env) = ENVIRONMENT.get() {
        return Ok(env);
    }
    let path: PathBuf = match library {
        Some(p) => p.to_owned(),
        None => match std::env::var_os("ORT_DYLIB_PATH") {
            Some(p) if !p.is_empty() => p.into(),
            _ => installed_beside_executable().unwrap_or_else(|| PathBuf::from("libonnxruntime.so")),
        },
    };
    if path.components().count() > 1 && !path.exists() {
        return Err(Error::RuntimeUnavailable { reason: "no such file".into(), path, required: REQUIRED_ORT });
    }
    // A folder (the `.ort/cpu` that holds the library) says so and names the file it holds, not
    // the loader's bare "dlopen failed".
    if path.is_dir() {
        let inside = path.join("libonnxruntime.so");
        let reason = if inside.exists() {
            format!("is a folder: give the library in it, {}", inside.display())
        } else {
            "is a folder, not the libonnxruntime.so file".to_owned()
        };
        return Err(Error::RuntimeUnavailable { reason, path, required: REQUIRED_ORT });
    }
    let builder = ort::init_from(&path).map_err(|e| Error::RuntimeUnavailable {
        reason: e.to_string(),
        path: path.clone(),
        required: REQUIRED_ORT,
    })?;
    let env = builder
        .with_name("mgd3")
        .with_logger(std::sync::Arc::new(forward_log))
        .build()
        .map_err(Error::ort("creating the environment"))?;
    let _ = ENVIRONMENT.set(env);
    Ok(ENVIRONMENT.get().expect("environment was just set"))
}

/// ONNX Runtime's log lines, into `tracing` under the target `ort::logging` (as the `ort` crate
/// forwards them), but for one: "Could not write a profile because no model was loaded", which
/// ONNX Runtime says when a profiled session (the load-time probe's) fails to load. mgd3 reports
/// that failure itself; at ERROR the line would read as a second fault, so it goes to DEBUG.
fn forward_log(level: ort::logging::LogLevel, category: &str, _id: &str, location: &str, message: &str) {
    use ort::logging::LogLevel;
    if message.contains("Could not write a profile because no model was loaded") {
        tracing::debug!(target: "ort::logging", category, location, "{message}");
        return;
    }
    match level {
        LogLevel::Verbose => tracing::trace!(target: "ort::logging", category, location, "{message}"),
        LogLevel::Info => tracing::info!(target: "ort::logging", category, location, "{message}"),
        LogLevel::Warning => tracing::warn!(target: "ort::logging", category, location, "{message}"),
        LogLevel::Error => tracing::error!(target: "ort::logging", category, location, "{message}"),
        LogLevel::Fatal => tracing::error!(target: "ort::logging", category, location, "(FATAL): {message}"),
    }
}

/// What the model-load log line says about where and how a model runs: `cpu`, or
/// `cuda:N (TF32 on, NHWC, …)`.
pub fn describe_device(config: &SessionConfig) -> String {
    match (config.device, config.provider) {
        (Device::Cpu, _) => "cpu".to_owned(),
        (Device::Cuda(_), GpuProvider::Cuda) => format!("{} ({})", config.device, config.cuda),
        (Device::Cuda(_), GpuProvider::TensorRt) => format!(
            "{} through TensorRT (engines in {}), the rest on CUDA ({})",
            config.device,
            tensorrt_cache(config).display(),
            config.cuda
        ),
    }
}

/// The folder of TensorRT's engine and timing caches for `config`.
fn tensorrt_cache(config: &SessionConfig) -> PathBuf {
    config.tensorrt_cache.clone().unwrap_or_else(|| std::env::temp_dir().join("mgd3-tensorrt"))
}

/// Builds a session for the model at `path` on `config.device`.
///
/// A CUDA device whose execution provider cannot be registered is an error.
///
/// # Errors
/// [`Error::ModelNotFound`]; those of [`init_runtime`]; [`Error::CudaUnavailable`];
/// [`Error::Ort`] when the session cannot be configured or the model cannot be loaded.
pub fn build_session(path: &Path, config: &SessionConfig) -> Result<Session> {
    build_session_profiled(path, config, None)
}

/// [`build_session`] with ONNX Runtime's profiler writing to files named `profile_prefix…`
/// until `end_profiling` (the load-time probe of the largest tensor per item).
pub(crate) fn build_session_profiled(
    path: &Path,
    config: &SessionConfig,
    profile_prefix: Option<&Path>,
) -> Result<Session> {
    if !path.exists() {
        return Err(Error::ModelNotFound(path.to_owned()));
    }
    let env = init_runtime(None)?;
    let mut builder = Session::builder(env)
        .and_then(|b| Ok(b.with_optimization_level(GraphOptimizationLevel::Level3)?))
        .map_err(Error::ort("creating a session builder"))?;
    if let Some(threads) = config.intra_threads {
        builder = builder.with_intra_threads(threads).map_err(|e| Error::ort("setting intra-op threads")(e.into()))?;
    }
    if let Some(prefix) = profile_prefix {
        builder = builder.with_profiling(prefix).map_err(|e| Error::ort("enabling the profiler")(e.into()))?;
    }
    builder = with_device(builder, config)?;
    // A model given as a link whose data files are beside the file it points to is loaded
    // there: ONNX Runtime looks for them beside the path it is given.
    builder.commit_from_file(mgd3_common::modelmeta::load_path(path)).map_err(|source| {
        let message = source.to_string();
        if let Some((found, max)) = unsupported_ir_version(&message) {
            return Error::UnsupportedIrVersion { model: path.to_owned(), found, max };
        }
        // Memory may be free on a later try (a GPU another process holds); anything else about
        // this file fails the same way on this runtime every time.
        if message.to_ascii_lowercase().contains("memory") {
            return Error::ort(format!("loading model `{}`", path.display()))(source);
        }
        let reason = match message.split_once(" failed:") {
            Some((head, rest)) if head.contains("Load model from") => rest.trim(),
            _ => message.trim(),
        };
        Error::LoadFailed { model: path.to_owned(), reason: without_code_location(reason) }
    })
}

/// ONNX Runtime's message without the C++ source location and function signature it puts in
/// front of some (`/onnxruntime_src/…/model_load_utils.h:46 void onnxruntime::…(…) Opset 99 …`):
/// a user needs the sentence after them.
fn without_code_location(message: &str) -> String {
    let Some(start) = message.find("/onnxruntime_src/") else { return message.to_owned() };
    let after = &message[start..];
    // The signature's argument list: from its first '(' to the ')' that closes it.
    let Some(open) = after.find('(') else { return message.to_owned() };
    let mut depth = 0usize;
    for (i, c) in after[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    let rest = after[open + i + 1..].trim_start();
                    let before = message[..start].trim_end();
                    return if before.is_empty() { rest.to_owned() } else { format!("{before} {rest}") };
                }
            }
            _ => {}
        }
    }
    message.to_owned()
}

/// The model's and the runtime's IR versions when ONNX Runtime refused a model as too new
/// ("Unsupported model IR version: 13, max supported IR version: 11"); `None` for any other
/// error.
fn unsupported_ir_version(message: &str) -> Option<(Option<u64>, Option<u64>)> {
    let number_after = |marker: &str| {
        let rest = &message[message.find(marker)? + marker.len()..];
        rest.trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    message
        .contains("Unsupported model IR version")
        .then(|| (number_after("Unsupported model IR version:"), number_after("max supported IR version:")))
}

/// `builder` with `config.device`'s execution provider registered (nothing to do on the CPU).
fn with_device(
    builder: ort::session::builder::SessionBuilder,
    config: &SessionConfig,
) -> Result<ort::session::builder::SessionBuilder> {
    let Device::Cuda(id) = config.device else { return Ok(builder) };
    let tuning = config.cuda;
    let mut cuda = ep::CUDA::default()
        .with_device_id(id)
        .with_tf32(tuning.tf32)
        .with_prefer_nhwc(tuning.prefer_nhwc)
        .with_conv_algorithm_search(if tuning.exhaustive_conv_search {
            ConvAlgorithmSearch::Exhaustive
        } else {
            ConvAlgorithmSearch::Heuristic
        })
        .with_arena_extend_strategy(if tuning.arena_as_requested {
            ArenaExtendStrategy::SameAsRequested
        } else {
            ArenaExtendStrategy::NextPowerOfTwo
        });
    if let Some(limit) = config.gpu_memory_limit {
        cuda = cuda.with_memory_limit(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    let cuda = cuda.build().error_on_failure();
    if config.provider == GpuProvider::TensorRt {
        let cache = tensorrt_cache(config);
        // The engines depend on the model and the input shapes, which TensorRT keys them by.
        let tensorrt = ep::TensorRT::default()
            .with_device_id(id)
            .with_engine_cache(true)
            .with_engine_cache_path(cache.display())
            .with_timing_cache(true)
            .with_timing_cache_path(cache.display())
            .build()
            .error_on_failure();
        let builder = builder.with_execution_providers([tensorrt]).map_err(|e| {
            let source: ort::Error = e.into();
            Error::TensorRtUnavailable { device: config.device.to_string(), cause: source.to_string(), source }
        })?;
        return register_cuda(builder, cuda, config);
    }
    register_cuda(builder, cuda, config)
}

/// `builder` with the CUDA execution provider `cuda` registered, failing as
/// [`Error::CudaUnavailable`].
fn register_cuda(
    builder: ort::session::builder::SessionBuilder,
    cuda: ep::ExecutionProviderDispatch,
    config: &SessionConfig,
) -> Result<ort::session::builder::SessionBuilder> {
    builder.with_execution_providers([cuda]).map_err(|e| {
        let source: ort::Error = e.into();
        Error::CudaUnavailable { device: config.device.to_string(), cause: source.to_string(), source }
    })
}

/// Checks that `config.device` can be used, before a worker offers itself to a coordinator:
/// ONNX Runtime loads and, for a CUDA device, registers its CUDA execution provider (which loads
/// the provider library, the CUDA runtime, cuBLAS and cuDNN). A worker that cannot use its device
/// must say why and stop, never take leases it cannot run nor fall back to the CPU.
///
/// # Errors
/// Those of [`init_runtime`]; [`Error::CudaUnavailable`] naming what is missing and the fix.
pub fn probe_device(config: &SessionConfig) -> Result<()> {
    let env = init_runtime(None)?;
    let builder = Session::builder(env).map_err(Error::ort("creating a session builder"))?;
    with_device(builder, config).map(drop)
}

/// The most bytes `session`'s memory arena on `device` has held in use at once since the session
/// was built (ONNX Runtime's allocator statistic `MaxInUse`): weights placed in the arena and the
/// largest call's activations. `None` where the allocator keeps no statistics (no arena) or the
/// library cannot say.
pub(crate) fn arena_peak_bytes(session: &Session, device: Device) -> Option<u64> {
    use ort::AsPointer;
    use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
    let (place, id) = match device {
        Device::Cpu => (AllocationDevice::CPU, 0),
        Device::Cuda(n) => (AllocationDevice::CUDA, n),
    };
    let info = MemoryInfo::new(place, id, AllocatorType::Arena, MemoryType::Default).ok()?;
    let allocator = Allocator::new(session, info).ok()?;
    let api = ort::api();
    let mut pairs: *mut ort::sys::OrtKeyValuePairs = std::ptr::null_mut();
    // SAFETY: `allocator` wraps a live session's allocator for as long as this call; `pairs` is
    // an out pointer ONNX Runtime fills with a key-value set this function releases below.
    let status = unsafe { (api.AllocatorGetStats)(allocator.ptr(), &mut pairs) };
    if !status.0.is_null() {
        // SAFETY: a non-null status returned by ONNX Runtime is the caller's to release.
        unsafe { (api.ReleaseStatus)(status.0) };
        return None;
    }
    if pairs.is_null() {
        return None;
    }
    // SAFETY: `pairs` is the live set filled above; the value (if any) is a NUL-terminated string
    // owned by the set, read before the set is released.
    unsafe {
        let value = (api.GetKeyValue)(pairs, c"MaxInUse".as_ptr());
        let peak = (!value.is_null())
            .then(|| std::ffi::CStr::from_ptr(value).to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()))
            .flatten();
        (api.ReleaseKeyValuePairs)(pairs);
        peak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onnx_runtimes_code_locations_are_left_out() {
        let opset = "/onnxruntime_src/onnxruntime/core/graph/model_load_utils.h:46 void \
                     onnxruntime::model_load_utils::ValidateOpsetForDomain(const std::unordered_map<std::string, int>&, \
                     const onnxruntime::logging::Logger&, bool, const string&, int) ONNX Runtime only *guarantees* \
                     support for models stamped with official released onnx opset versions. Opset 99 is under development";
        assert_eq!(
            without_code_location(opset),
            "ONNX Runtime only *guarantees* support for models stamped with official released onnx opset versions. \
             Opset 99 is under development"
        );
        let tensor = "Deserialize tensor w failed./onnxruntime_src/core/tensorprotoutils.cc:1876 \
                      onnxruntime::common::Status Get(const T&) External data out of bounds";
        assert_eq!(without_code_location(tensor), "Deserialize tensor w failed. External data out of bounds");
        assert_eq!(without_code_location("Protobuf parsing failed."), "Protobuf parsing failed.");
    }

    #[test]
    fn a_too_new_ir_version_is_read_from_onnx_runtimes_message() {
        let message = "Load model from m.onnx failed:/onnxruntime_src/onnxruntime/core/graph/model.cc:256 \
                       onnxruntime::Model::Model(...) Unsupported model IR version: 99, max supported IR version: 13";
        assert_eq!(unsupported_ir_version(message), Some((Some(99), Some(13))));
        assert_eq!(unsupported_ir_version("Unsupported model IR version"), Some((None, None)));
        assert_eq!(unsupported_ir_version("Protobuf parsing failed."), None);
    }

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", ""] {
            assert!(bad.parse::<Device>().is_err(), "{bad}");
        }
        assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    }
}
