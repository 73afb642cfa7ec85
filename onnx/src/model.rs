//! A loaded, contract-checked session and the bounded `run` shared by the DiT and VAE wrappers:
//! inputs are f32 (or i64) ndarrays, split into calls no larger than the batch policy, the
//! per-call element ceiling (the model's largest tensor per item, measured by a one-item probe
//! with ONNX Runtime's profiler at load) and out-of-memory backoff allow, cast to f16 where the
//! model wants it, and the named outputs come back as owned f32 arrays. Chunking never changes
//! a result: each item is computed alone.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use half::f16;
use ndarray::{Array4, ArrayView4, Axis, Ix4, concatenate, s};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType};

use crate::contract::{ModelIo, Precision};
use crate::error::{Error, Result};
use crate::session::{SessionConfig, build_session_profiled, describe_device};

/// One batched input of a run.
pub(crate) enum BatchInput<'a> {
    Float(&'a str, ArrayView4<'a, f32>, Precision),
    Int(&'a str, &'a [i64]),
}

impl BatchInput<'_> {
    fn batch(&self) -> usize {
        match self {
            BatchInput::Float(_, a, _) => a.shape()[0],
            BatchInput::Int(_, v) => v.len(),
        }
    }

    /// Item 0 repeated `k` times: the inputs of the memory measurement at load.
    fn repeated(&self, k: usize) -> Result<(String, DynValue), ort::Error> {
        Ok(match self {
            BatchInput::Float(name, a, precision) => {
                let one = a.slice(s![0..1, .., .., ..]);
                let shape = (k, one.shape()[1], one.shape()[2], one.shape()[3]);
                let many = one.broadcast(shape).ok_or_else(|| ort::Error::new("cannot repeat the probe item"))?;
                let value = match precision {
                    Precision::F32 => Tensor::from_array(many.to_owned())?.into_dyn(),
                    Precision::F16 => Tensor::from_array(many.mapv(f16::from_f32))?.into_dyn(),
                };
                (name.to_string(), value)
            }
            BatchInput::Int(name, v) => (name.to_string(), Tensor::from_array(([k], vec![v[0]; k]))?.into_dyn()),
        })
    }

    fn chunk(&self, from: usize, to: usize) -> Result<(String, DynValue), ort::Error> {
        Ok(match self {
            BatchInput::Float(name, a, Precision::F32) => {
                (name.to_string(), Tensor::from_array(a.slice(s![from..to, .., .., ..]).to_owned())?.into_dyn())
            }
            BatchInput::Float(name, a, Precision::F16) => (
                name.to_string(),
                Tensor::from_array(a.slice(s![from..to, .., .., ..]).mapv(f16::from_f32))?.into_dyn(),
            ),
            BatchInput::Int(name, v) => {
                (name.to_string(), Tensor::from_array(([to - from], v[from..to].to_vec()))?.into_dyn())
            }
        })
    }
}

/// The named inputs of one `Session::run`, from [`BatchInput::chunk`] or
/// [`BatchInput::repeated`] values.
fn session_inputs(
    values: impl Iterator<Item = Result<(String, DynValue), ort::Error>>,
) -> Result<Vec<(String, SessionInputValue<'static>)>, ort::Error> {
    values.map(|value| value.map(|(name, v)| (name, SessionInputValue::from(v)))).collect()
}

/// How many items a model's call carries, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallLimit {
    /// Items per call now: the least of the three below.
    pub items: usize,
    /// What the batch policy allows ([`SessionConfig::max_batch`]).
    pub policy: usize,
    /// What keeps the largest tensor within [`SessionConfig::max_call_elements`], from the
    /// probe at load (`usize::MAX` when the probe could not measure it).
    pub ceiling: usize,
    /// Where out-of-memory backoff has brought it in this shard (`usize::MAX`: no backoff).
    pub backoff: usize,
    /// Elements of the model's largest tensor per item, measured at load (0: not measured).
    pub item_elements: u64,
    /// Device memory one more item of a call takes, in bytes: the growth of the session's arena
    /// peak from a one-item call to a [`MEASURE_ITEMS`]-item call at load, over the extra items
    /// (0: not measured, see [`SessionConfig::measure_item_bytes`]).
    pub item_bytes: u64,
}

/// Items of the measurement call at load ([`CallLimit::item_bytes`]): enough that the arena's
/// growth is the activations' and not a rounding of one item's.
pub const MEASURE_ITEMS: usize = 4;

/// A session with the contract view of its model.
pub(crate) struct LoadedModel {
    /// The ONNX Runtime session.
    pub session: Session,
    /// The model's declared inputs, outputs and metadata.
    pub io: ModelIo,
    /// The model file, named in every error.
    pub path: PathBuf,
    /// How calls are bounded (policy, element ceiling, backoff).
    limit: CallLimit,
    /// The element ceiling the limit was computed from.
    max_call_elements: u64,
    /// The device, named in out-of-memory errors.
    device: String,
    /// The device with the provider options it was built with ([`describe_device`]).
    runs_on: String,
    /// Test seam: calls above this many items fail as out of memory.
    fault_oom_above: Option<usize>,
    /// The profiler runs: from the session's start until the load-time probe ends it.
    profiling: bool,
    /// Measure [`CallLimit::item_bytes`] at the probe ([`SessionConfig::measure_item_bytes`]).
    measure_memory: bool,
    /// Where the session's arena lives, for its statistics.
    arena: crate::session::Device,
    /// The calls' I/O binding ([`SessionConfig::io_binding`]); `None`: plain runs (not asked
    /// for, or refused or found to differ at the probe).
    binding: Option<Binding>,
}

/// A model's I/O binding: what is bound now, so an unchanged input is not copied again.
struct Binding {
    binding: IoBinding,
    /// Where outputs go: page-locked host memory on CUDA, plain host memory on the CPU.
    output_memory: MemoryInfo<'static>,
    /// The outputs bound so far, and the items of the call they were bound for.
    outputs: Vec<String>,
    rows: usize,
    /// Integer inputs as last bound (name, values): bound again only when they change.
    ints: Vec<(String, Vec<i64>)>,
}

// SAFETY: ONNX Runtime's IoBinding and the values it holds have no thread affinity (the `ort`
// crate marks `Session` and `Value` Send for the same reason; its `IoBinding` is not, only
// because it keeps `Arc`s of raw value pointers). A `Binding` is used only through `&mut` (its
// owner, the model, is behind the worker's lock when shared), so moving it between threads
// (Send) and sharing `&Binding`, through which nothing is called (Sync), are sound.
unsafe impl Send for Binding {}
// SAFETY: see `Send` above: no method takes `&Binding`, so a shared reference reaches nothing.
unsafe impl Sync for Binding {}

impl Binding {
    fn new(session: &Session, device: crate::session::Device) -> Result<Self, ort::Error> {
        let output_memory = match device {
            crate::session::Device::Cpu => {
                MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?
            }
            crate::session::Device::Cuda(ordinal) => {
                MemoryInfo::new(AllocationDevice::CUDA_PINNED, ordinal, AllocatorType::Device, MemoryType::CPUOutput)?
            }
        };
        Ok(Binding {
            binding: session.create_binding()?,
            output_memory,
            outputs: Vec::new(),
            rows: 0,
            ints: Vec::new(),
        })
    }

    /// Binds one call's inputs (items `from..to`) and the outputs, skipping integer inputs equal
    /// to those bound for the previous call.
    fn bind(&mut self, inputs: &[BatchInput<'_>], from: usize, to: usize, outputs: &[&str]) -> Result<(), ort::Error> {
        for input in inputs {
            if let BatchInput::Int(name, values) = input {
                let values = &values[from..to];
                if self.ints.iter().any(|(n, v)| n == name && v.as_slice() == values) {
                    continue;
                }
                self.ints.retain(|(n, _)| n != name);
                let (name, value) = input.chunk(from, to)?;
                self.binding.bind_input(name.as_str(), &value)?;
                self.ints.push((name, values.to_vec()));
            } else {
                let (name, value) = input.chunk(from, to)?;
                self.binding.bind_input(name, &value)?;
            }
        }
        // A run leaves its outputs bound at their shape: a call of another size binds them anew
        // (a call of the same size reuses them).
        if self.rows != to - from || self.outputs.iter().map(String::as_str).ne(outputs.iter().copied()) {
            self.binding.clear_outputs();
            self.outputs.clear();
            for name in outputs {
                self.binding.bind_output_to_device(*name, &self.output_memory)?;
            }
            self.outputs = outputs.iter().map(|o| o.to_string()).collect();
            self.rows = to - from;
        }
        // Host inputs are copied to the device asynchronously.
        self.binding.synchronize_inputs()
    }

    /// Forgets what is bound (after a failed call, whose inputs may be half bound).
    fn reset(&mut self) {
        self.binding.clear();
        self.outputs.clear();
        self.rows = 0;
        self.ints.clear();
    }
}

/// What an ONNX Runtime failure of a call says about memory: `Some(requested bytes)` when an
/// allocation failed (CUDA or CPU arena) or a tensor exceeded a kernel's 32-bit element range,
/// both cured by a smaller call.
fn allocation_failure(message: &str) -> Option<Option<u64>> {
    const MARKERS: [&str; 6] = [
        "Failed to allocate memory",
        "out of memory",
        "cudaErrorMemoryAllocation",
        "CUBLAS_STATUS_ALLOC_FAILED",
        "CUDNN_STATUS_ALLOC_FAILED",
        "exceeds int range",
    ];
    if !MARKERS.iter().any(|m| message.contains(m)) {
        return None;
    }
    let requested = message
        .split("buffer of size ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok());
    Some(requested)
}

impl LoadedModel {
    /// Builds the session for `path` (with the profiler on, for [`LoadedModel::probe`]) and
    /// reads its contract view.
    pub fn load(path: &Path, config: &SessionConfig) -> Result<Self> {
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let prefix = profiles_folder().map(|folder| {
            folder.join(format!("mgd3-probe-{}-{}", std::process::id(), PROBES.fetch_add(1, Ordering::Relaxed)))
        });
        let mut session = build_session_profiled(path, config, prefix.as_deref())?;
        let io = match crate::contract::read_io(path, &session) {
            Ok(io) => io,
            Err(error) => {
                if prefix.is_some() {
                    discard_profile(&mut session);
                }
                return Err(error);
            }
        };
        let policy = config.max_batch.max(1);
        Ok(LoadedModel {
            session,
            io,
            path: path.to_owned(),
            limit: CallLimit {
                items: policy,
                policy,
                ceiling: usize::MAX,
                backoff: usize::MAX,
                item_elements: 0,
                item_bytes: 0,
            },
            max_call_elements: config.max_call_elements.max(1),
            device: config.device.to_string(),
            runs_on: describe_device(config),
            fault_oom_above: config.fault_oom_above,
            profiling: prefix.is_some(),
            measure_memory: config.measure_item_bytes,
            arena: config.device,
            binding: None,
        })
        .map(|mut model: LoadedModel| {
            if config.io_binding {
                match Binding::new(&model.session, config.device) {
                    Ok(binding) => model.binding = Some(binding),
                    Err(error) => tracing::info!(model = %path.display(), %error,
                        "ONNX Runtime refused an I/O binding: this model's calls run plainly"),
                }
            }
            model
        })
    }

    /// Measures the model's largest tensor per item: runs one item (`inputs`, batch 1) with the
    /// profiler on, reads every node's input and output shapes from its report, and bounds
    /// later calls by [`SessionConfig::max_call_elements`]. Call once, right after the contract
    /// checks. A profile that cannot be read leaves the ceiling unmeasured (logged at WARN):
    /// the policy and out-of-memory backoff still bound the calls.
    pub fn probe(&mut self, inputs: &[BatchInput<'_>]) -> Result<()> {
        if !std::mem::take(&mut self.profiling) {
            self.check_binding(inputs, None);
            return self.measure_item_bytes(inputs);
        }
        let context = format!("probing `{}` with one item", self.path.display());
        let values = session_inputs(inputs.iter().map(|i| i.chunk(0, 1))).map_err(Error::ort(context.clone()))?;
        let names = self.output_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        // The probe's outputs are what the I/O binding is checked against (no second plain run).
        let run = self.session.run(values).map(|out| named_outputs(&out, &names).ok());
        let report = self.session.end_profiling();
        let plain = run.map_err(Error::ort(context))?;
        let measured = report.map_err(|e| e.to_string()).and_then(|file| {
            let text = std::fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"));
            let _ = std::fs::remove_file(&file);
            text.and_then(|t| largest_tensor_elements(&t).ok_or_else(|| format!("{file}: no tensor shapes")))
        });
        match measured {
            Ok(elements) => {
                self.limit.item_elements = elements;
                self.limit.ceiling =
                    usize::try_from((self.max_call_elements / elements.max(1)).max(1)).unwrap_or(usize::MAX);
                self.limit.items = self.limit.policy.min(self.limit.ceiling);
                tracing::debug!(model = %self.path.display(), item_elements = elements, limit = ?self.limit, "measured the largest tensor per item");
                if elements > self.max_call_elements {
                    tracing::warn!(
                        model = %self.path.display(),
                        item_elements = elements,
                        "one item of this model holds {elements} elements in its largest tensor, more than the per-call \
                         ceiling of {}: calls carry one item, which may fail on kernels with 32-bit indexing",
                        self.max_call_elements
                    );
                } else if self.limit.ceiling < self.limit.policy {
                    tracing::info!(
                        model = %self.path.display(),
                        items = self.limit.items,
                        policy = self.limit.policy,
                        item_elements = elements,
                        "calls of this model carry at most {} items: its largest tensor holds {elements} elements per item, and a call stays within {} elements",
                        self.limit.ceiling,
                        self.max_call_elements
                    );
                }
            }
            Err(why) => tracing::warn!(model = %self.path.display(), %why,
                "could not measure the model's largest tensor per item; its calls are bounded by the batch policy and out-of-memory backoff only"),
        }
        self.check_binding(inputs, plain);
        self.measure_item_bytes(inputs)
    }

    /// Every output of the model, in its order.
    fn output_names(&self) -> Vec<String> {
        self.io.outputs.iter().map(|o| o.name.clone()).collect()
    }

    /// Runs the probe item through the I/O binding and keeps the binding only when it gives the
    /// bytes of a plain run (`plain`, the probe's own outputs, or run here when `None`) and ONNX
    /// Runtime accepts it: a binding that would change an output, or fail, is dropped, logged at
    /// INFO, before any real call.
    fn check_binding(&mut self, inputs: &[BatchInput<'_>], plain: Option<Vec<Array4<f32>>>) {
        let Some(mut binding) = self.binding.take() else { return };
        let outputs = self.output_names();
        let names: Vec<&str> = outputs.iter().map(String::as_str).collect();
        let plain = match plain {
            Some(plain) => Ok(plain),
            None => self.plain_call(inputs, 0, 1, &names),
        };
        let bound =
            binding.bind(inputs, 0, 1, &names).and_then(|()| bound_call(&mut self.session, &mut binding, &names));
        binding.reset();
        match (plain, bound) {
            // The plain run failed: the probe itself says why.
            (Err(_), _) => {}
            (Ok(plain), Ok(bound)) if same_bits(&plain, &bound) => self.binding = Some(binding),
            (Ok(_), Ok(_)) => tracing::info!(model = %self.path.display(),
                "the probe item's outputs differ through ONNX Runtime's I/O binding: this model's calls run plainly"),
            (Ok(_), Err(error)) => tracing::info!(model = %self.path.display(), %error,
                "ONNX Runtime's I/O binding failed on the probe item: this model's calls run plainly"),
        }
    }

    /// Whether calls run through ONNX Runtime's I/O binding (see [`SessionConfig::io_binding`]).
    pub fn io_bound(&self) -> bool {
        self.binding.is_some()
    }

    /// Measures [`CallLimit::item_bytes`] when the session was built to
    /// ([`SessionConfig::measure_item_bytes`]): the arena's peak after a call of the probe item
    /// alone and after a call of [`MEASURE_ITEMS`] copies of it; the growth over the extra items
    /// is what one item of a call holds at once (activations and workspaces; the weights are in
    /// both). An arena that keeps no statistics leaves it unmeasured (logged at DEBUG).
    fn measure_item_bytes(&mut self, inputs: &[BatchInput<'_>]) -> Result<()> {
        if !std::mem::take(&mut self.measure_memory) {
            return Ok(());
        }
        let context = format!("measuring the memory per item of `{}`", self.path.display());
        let mut peaks = Vec::with_capacity(2);
        for k in [1, MEASURE_ITEMS] {
            let values = session_inputs(inputs.iter().map(|i| i.repeated(k))).map_err(Error::ort(context.clone()))?;
            self.session.run(values).map(drop).map_err(Error::ort(context.clone()))?;
            peaks.push(crate::session::arena_peak_bytes(&self.session, self.arena));
        }
        match (peaks[0], peaks[1]) {
            (Some(one), Some(many)) if many > one => {
                self.limit.item_bytes = (many - one) / (MEASURE_ITEMS as u64 - 1);
                tracing::debug!(model = %self.path.display(), item_bytes = self.limit.item_bytes, arena_peak_one = one,
                    arena_peak_many = many, "measured the memory one item of a call takes");
            }
            (one, many) => tracing::debug!(model = %self.path.display(), ?one, ?many,
                "could not measure the memory per item: the arena's peak did not grow with the call"),
        }
        Ok(())
    }

    /// Sets the items per call the batch policy allows (the element ceiling and out-of-memory
    /// backoff still bound it): for a policy chosen after load, from [`CallLimit::item_bytes`].
    pub fn set_policy(&mut self, items: usize) {
        self.limit.policy = items.max(1);
        self.limit.items = self.limit.policy.min(self.limit.ceiling).min(self.limit.backoff);
    }

    /// One phrase for the model-load log line: precision, graph, where it runs and whether its
    /// calls go through I/O binding, e.g. `fp16, fused graph (28 fused attentions), cuda:0 (TF32
    /// on, NCHW, …), I/O binding`.
    pub fn describe(&self, precision: Precision) -> String {
        let precision = match (precision, self.io.metadata.get("mgd3.precision").map(|p| p.trim())) {
            // a bf16 export computes in bfloat16 behind float32 inputs and outputs
            (Precision::F32, Some("bf16")) => "bf16 (fp32 I/O)",
            (Precision::F32, _) => "fp32",
            (Precision::F16, _) => "fp16",
        };
        let binding = if self.binding.is_some() { ", I/O binding" } else { "" };
        let cuda_graph = match self.io.metadata.get("mgd3.group_norm") {
            Some(n) => format!(" with {} fused GroupNorms and NHWC convolutions", n.trim()),
            None => String::new(),
        };
        format!("{precision}, {}{cuda_graph}, {}{binding}", self.io.graph(), self.runs_on)
    }

    /// How many items a call carries now, and why.
    pub fn limit(&self) -> CallLimit {
        self.limit
    }

    /// Forgets out-of-memory backoff (at the start of a shard: memory held by others may have
    /// been freed).
    pub fn reset_backoff(&mut self) {
        self.limit.backoff = usize::MAX;
        self.limit.items = self.limit.policy.min(self.limit.ceiling);
    }

    /// An [`Error::BadInput`] about this model.
    pub fn bad_input(&self, item: impl Into<String>, expected: impl Into<String>, got: impl Into<String>) -> Error {
        Error::BadInput { model: self.path.clone(), item: item.into(), expected: expected.into(), got: got.into() }
    }

    /// One call of items `from..to`; the fault seam fails it as an allocation failure would.
    fn call(
        &mut self,
        inputs: &[BatchInput<'_>],
        from: usize,
        to: usize,
        outputs: &[&str],
    ) -> Result<Vec<Array4<f32>>, ort::Error> {
        if let Some(limit) = self.fault_oom_above
            && to - from > limit
        {
            let bytes = (to - from) as u64 * self.limit.item_elements.max(1) * 4;
            return Err(ort::Error::new(format!(
                "Failed to allocate memory for requested buffer of size {bytes} (mgd3 fault injection: calls above {limit} items)"
            )));
        }
        if let Some(binding) = self.binding.as_mut() {
            let result =
                binding.bind(inputs, from, to, outputs).and_then(|()| bound_call(&mut self.session, binding, outputs));
            match result {
                Ok(out) => return Ok(out),
                // Out of memory is the call's size, not the binding: backoff handles it.
                Err(error) if allocation_failure(&error.to_string()).is_some() => {
                    binding.reset();
                    return Err(error);
                }
                // Anything else the binding may have caused: the call runs plainly, and so do
                // the rest when that works.
                Err(error) => {
                    let plain = self.plain_call(inputs, from, to, outputs);
                    if plain.is_ok() {
                        tracing::info!(model = %self.path.display(), %error,
                            "a call failed through ONNX Runtime's I/O binding and ran plainly: this model's calls run plainly from now on");
                        self.binding = None;
                    } else if let Some(binding) = self.binding.as_mut() {
                        binding.reset();
                    }
                    return plain;
                }
            }
        }
        self.plain_call(inputs, from, to, outputs)
    }

    /// One call of items `from..to` with `Session::run` (no binding).
    fn plain_call(
        &mut self,
        inputs: &[BatchInput<'_>],
        from: usize,
        to: usize,
        outputs: &[&str],
    ) -> Result<Vec<Array4<f32>>, ort::Error> {
        let values = session_inputs(inputs.iter().map(|i| i.chunk(from, to)))?;
        let result = self.session.run(values)?;
        named_outputs(&result, outputs)
    }

    /// Runs the model over the whole batch in calls of [`CallLimit::items`] and concatenates
    /// each output. A call that runs out of memory is retried at half the items (the same
    /// items, so no sample changes), and the smaller size is kept until
    /// [`LoadedModel::reset_backoff`].
    ///
    /// # Errors
    /// [`Error::BadInput`] for inputs of different batch sizes or an empty batch;
    /// [`Error::OutOfMemory`] when a call of one item runs out of memory; [`Error::Ort`] for
    /// other failures.
    pub fn run(&mut self, inputs: &[BatchInput<'_>], outputs: &[&str]) -> Result<Vec<Array4<f32>>> {
        let batch = inputs.first().map_or(0, BatchInput::batch);
        if let Some(odd) = inputs.iter().find(|i| i.batch() != batch) {
            let name = match odd {
                BatchInput::Float(n, ..) | BatchInput::Int(n, _) => *n,
            };
            return Err(self.bad_input(
                format!("input `{name}`"),
                format!("batch {batch}"),
                format!("batch {}", odd.batch()),
            ));
        }
        let context = format!("running `{}`", self.path.display());
        let mut parts: Vec<Vec<Array4<f32>>> = vec![Vec::new(); outputs.len()];
        let mut from = 0;
        while from < batch {
            let to = (from + self.limit.items).min(batch);
            let chunk = match self.call(inputs, from, to, outputs) {
                Ok(chunk) => chunk,
                Err(source) => match allocation_failure(&source.to_string()) {
                    Some(requested_bytes) if to - from == 1 => {
                        return Err(Error::OutOfMemory {
                            model: self.path.clone(),
                            device: self.device.clone(),
                            requested_bytes,
                            source,
                        });
                    }
                    Some(_) => {
                        let half = ((to - from) / 2).max(1);
                        self.limit.backoff = half;
                        self.limit.items = half;
                        tracing::info!(model = %self.path.display(), device = %self.device, items = half, error = %source,
                            "a call of {} items (rows, for the DiT) ran out of memory: retrying it in calls of {half} for the rest of the shard", to - from);
                        continue;
                    }
                    None => return Err(Error::ort(context)(source)),
                },
            };
            for (slot, output) in parts.iter_mut().zip(chunk) {
                slot.push(output);
            }
            from = to;
        }
        parts
            .into_iter()
            .zip(outputs)
            .map(|(chunks, name)| {
                if chunks.is_empty() {
                    return Err(self.bad_input("batch", "at least one item", "0"));
                }
                let views: Vec<_> = chunks.iter().map(|c| c.view()).collect();
                concatenate(Axis(0), &views)
                    .map_err(|e| self.bad_input(format!("output `{name}`"), "chunks of one shape", e.to_string()))
            })
            .collect()
    }
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        // A model dropped before its probe (its contract check failed) leaves no profile behind.
        if self.profiling {
            discard_profile(&mut self.session);
        }
    }
}

/// Ends a session's profiling and deletes its report (the file exists from the session's start).
fn discard_profile(session: &mut Session) {
    if let Ok(file) = session.end_profiling() {
        let _ = std::fs::remove_file(file);
    }
}

/// Where the load-time probes write their profiles: the temp folder, once per process swept of
/// the profiles of processes that are gone and checked to take a file. `None` (said once at
/// WARN) where it takes none, as in a read-only container: models then load unprofiled and
/// their calls go unmeasured.
fn profiles_folder() -> Option<&'static Path> {
    static FOLDER: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOLDER
        .get_or_init(|| {
            let folder = std::env::temp_dir();
            remove_orphaned_profiles(&folder);
            let check = folder.join(format!("mgd3-probe-{}-check", std::process::id()));
            let writable = std::fs::File::create(&check).is_ok_and(|_| std::fs::remove_file(&check).is_ok());
            if !writable {
                tracing::warn!(folder = %folder.display(),
                    "the temp folder takes no file: the largest tensor per item is not measured (set TMPDIR to a writable folder)");
            }
            writable.then_some(folder)
        })
        .as_deref()
}

/// Removes the probe profiles of processes that are gone (killed while loading a model, before
/// the probe read and deleted its file): `mgd3-probe-<pid>-…` in the temp folder whose pid has no
/// `/proc` entry.
fn remove_orphaned_profiles(folder: &Path) {
    let Ok(entries) = std::fs::read_dir(folder) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("mgd3-probe-")).and_then(|r| r.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() && Path::new("/proc/self").exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The most elements of any tensor (a node's input or output) in an ONNX Runtime profile
/// (`output_type_shape` / `input_type_shape` of each node event); `None` when it lists none.
fn largest_tensor_elements(profile: &str) -> Option<u64> {
    let events: serde_json::Value = serde_json::from_str(profile).ok()?;
    let mut largest: Option<u64> = None;
    for event in events.as_array()? {
        let Some(args) = event.get("args") else { continue };
        for key in ["output_type_shape", "input_type_shape"] {
            for tensor in args.get(key).and_then(|v| v.as_array()).into_iter().flatten() {
                // Each entry is {"<element type>": [dims…]}.
                for dims in tensor.as_object().into_iter().flat_map(|o| o.values()) {
                    let Some(dims) = dims.as_array() else { continue };
                    let elements =
                        dims.iter().try_fold(1u64, |acc, d| d.as_u64().map(|d| acc.saturating_mul(d.max(1))));
                    if let Some(elements) = elements {
                        largest = Some(largest.map_or(elements, |l| l.max(elements)));
                    }
                }
            }
        }
    }
    largest
}

/// Whether two runs' outputs are the same bytes (NaN included).
fn same_bits(a: &[Array4<f32>], b: &[Array4<f32>]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(a, b)| a.shape() == b.shape() && a.iter().zip(b.iter()).all(|(x, y)| x.to_bits() == y.to_bits()))
}

/// A run's outputs `names`, as f32 arrays.
fn named_outputs(result: &ort::session::SessionOutputs<'_>, names: &[&str]) -> Result<Vec<Array4<f32>>, ort::Error> {
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let value =
            result.get(name).ok_or_else(|| ort::Error::new(format!("output `{name}` was not produced by the run")))?;
        out.push(extract_f32(value).map_err(|e| ort::Error::new(format!("output `{name}`: {e}")))?);
    }
    Ok(out)
}

/// One run of what `binding` holds; its outputs as f32 arrays.
fn bound_call(session: &mut Session, binding: &mut Binding, names: &[&str]) -> Result<Vec<Array4<f32>>, ort::Error> {
    let result = session.run_binding(&binding.binding)?;
    binding.binding.synchronize_outputs()?;
    named_outputs(&result, names)
}

fn extract_f32(value: &DynValue) -> Result<Array4<f32>, ort::Error> {
    let element = match value.dtype() {
        ort::value::ValueType::Tensor { ty, .. } => *ty,
        _ => TensorElementType::Float32,
    };
    let array = if element == TensorElementType::Float16 {
        value.try_extract_array::<f16>()?.mapv(f32::from)
    } else {
        value.try_extract_array::<f32>()?.to_owned()
    };
    array.into_dimensionality::<Ix4>().map_err(|e| ort::Error::new(format!("expected a rank-4 output: {e}")))
}
