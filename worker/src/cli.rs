//! The `worker` command line: `distill-class` (one class of an ImageFolder, end to end) and
//! `sample` (mode-guided sampling from given modes and noise, for reproducibility and parity).

use mgd3_common::outln;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use mgd3_onnx::{Device, Dit, SessionConfig, VaeDecoder, init_runtime};
use ndarray::{Array4, Array5};
use ndarray_npy::ReadNpyExt;

use crate::client::WorkerConfig;
use crate::models::{
    ClassSpec, ClassTimings, EngineError, ModelPaths, Runtime, SampleBatch, check_guidance, decode_png,
    sample_in_batches, sampler_of, schedule_for_sampler,
};
use crate::pipeline::Engine;
use crate::shard::{FakeEngine, OnnxShardEngine, ShardEngine};
use crate::sink::{npy_bytes, write_file};
use mgd3_common::batch::BatchPolicy;
use mgd3_common::job::{InvalidSetting, SamplerKind, SamplingSpec};

/// The `worker` command line, parsed by clap.
#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    about = "mgd3 worker: MGD³ mode-guided dataset distillation on ONNX Runtime",
    long_about = "Without a subcommand the worker joins a coordinator (--coordinator URL), pulls leased shards \
                  and runs them until it is drained or receives SIGTERM/SIGINT.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// A one-off command; without one the worker joins a coordinator.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The settings of cluster mode (without a subcommand).
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Cluster mode: serve a coordinator.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Coordinator URL, e.g. http://10.0.0.1:50051 (https:// for TLS).
    #[arg(long, env = "MGD3_COORDINATOR")]
    pub coordinator: Option<String>,
    /// File holding the bearer token the coordinator expects (mode 600: a file others can read
    /// is refused). MGD3_TOKEN_FILE, as the sbatch scripts take it.
    #[arg(long, env = "MGD3_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Use a --token-file that other users can read.
    #[arg(long)]
    pub insecure_token_file: bool,
    /// CA certificate (PEM) for an https:// coordinator with a private CA.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Worker id (default: `<hostname>-<pid>-<4 random hex>`).
    #[arg(long)]
    pub worker_id: Option<String>,
    /// `onnx` (the real engine) or `fake` (deterministic stand-in images, for cluster tests).
    #[arg(long, value_enum, default_value_t = EngineKind::Onnx)]
    pub engine: EngineKind,
    /// Give up (exit 1) when the coordinator has not answered for this many seconds, at start or
    /// later; 0 waits for ever.
    #[arg(long, env = "MGD3_GIVE_UP_AFTER_S", default_value_t = crate::client::DEFAULT_GIVE_UP_AFTER.as_secs())]
    pub give_up_after_s: u64,
    /// Seconds per class of the fake engine.
    #[arg(long, default_value_t = 0.05)]
    pub fake_class_seconds: f64,
    /// Where and how the models run.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// The `worker` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Distil one class of an ImageFolder: modes by k-means, IPC guided samples, PNGs.
    DistillClass(DistillClassArgs),
    /// Sample from explicit modes.npy and noise.npy (reproducibility and parity).
    Sample(SampleArgs),
    /// Convert Debian's dataset-fashion-mnist into an ImageFolder (train/ and test/).
    ImportFashionMnist(ImportArgs),
}

/// Arguments of `worker import-fashion-mnist`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Folder with the IDX files (from `apt-get install dataset-fashion-mnist`).
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    pub src: PathBuf,
    /// Output root; writes `<out>/train/<NN_name>/*.png`, `<out>/test/...`, `<out>/classes.txt`.
    #[arg(long)]
    pub out: PathBuf,
    /// Keep only the first N images of each class and split.
    #[arg(long)]
    pub per_class: Option<usize>,
}

/// A feature turned `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Turned on.
    On,
    /// Turned off.
    Off,
}

/// Which engine a worker runs shards with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// The ONNX models named by each job.
    Onnx,
    /// Deterministic stand-in images without models, for cluster tests and benchmarks.
    Fake,
}

/// Where and how models run.
#[derive(Debug, Args, Clone)]
pub struct RuntimeArgs {
    /// `cpu`, `cuda` or `cuda:N`. A CUDA device that cannot be used is an error.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// The execution provider on a CUDA device: `cuda` (ONNX Runtime's CUDA provider), or
    /// `tensorrt` (opt-in: NVIDIA TensorRT, which must be installed; it builds an engine per model
    /// and shape on first use, kept in the model cache's `tensorrt` folder, and leaves what it
    /// cannot run to the CUDA provider). Default `cuda`; refused with `--device cpu`, where no
    /// GPU provider runs.
    #[arg(long)]
    pub provider: Option<mgd3_onnx::session::GpuProvider>,
    /// Rows per DiT call (a call holds rows/2 cond+uncond sample pairs), or `auto`: chosen when
    /// the models load, from the device's free memory and the memory a row takes (measured
    /// then), keeping 20 % free, at most 1024. Default: `auto` on CUDA, 64 on the CPU.
    /// `--max-batch` is the same flag's older name. Before the VAE had its own flag, it set the
    /// VAE batch too: it still does unless --vae-batch is given, capped at 64 images.
    #[arg(long = "dit-rows", visible_alias = "max-batch", allow_negative_numbers = true)]
    pub dit_rows: Option<DitRows>,
    /// Images per VAE call, encoder and decoder (default: --dit-rows, at most 64). Each call is
    /// also kept under the per-call element ceiling measured from the model at load.
    #[arg(long, value_parser = images_per_call)]
    pub vae_batch: Option<usize>,
    /// Images per VAE encoder call (default: --vae-batch); also the chunk of decoded images the
    /// data stage hands the encoder (up to 4 chunks are in memory).
    #[arg(long, value_parser = images_per_call)]
    pub vae_encode_batch: Option<usize>,
    /// Images per VAE decoder call (default: --vae-batch).
    #[arg(long, value_parser = images_per_call)]
    pub vae_decode_batch: Option<usize>,
    /// Device memory the CUDA execution provider's arena may hold: bytes (`24000000000`, `24GB`,
    /// `22GiB`) or a fraction of the card's memory (`0.8`, `80%`). Default: ONNX Runtime's (the
    /// whole card). CUDA only.
    #[arg(long)]
    pub gpu_memory_limit: Option<MemoryLimit>,
    /// For tests: the per-call element ceiling (default 2³¹ − 1: the largest tensor of a call
    /// stays within 32-bit indexing).
    #[arg(long, env = "MGD3_MAX_CALL_ELEMENTS", hide = true, value_parser = seam::<u64>("MGD3_MAX_CALL_ELEMENTS"))]
    pub max_call_elements: Option<Seam<u64>>,
    /// For tests: calls of more items than this fail as if out of memory (out-of-memory backoff).
    #[arg(long, env = "MGD3_FAULT_OOM_ABOVE", hide = true, value_parser = seam::<usize>("MGD3_FAULT_OOM_ABOVE"))]
    pub fault_oom_above: Option<Seam<usize>>,
    /// For tests: the free memory `--dit-rows auto` reads, in bytes, instead of the device's.
    #[arg(long, env = "MGD3_FREE_MEMORY_BYTES", hide = true, value_parser = seam::<u64>("MGD3_FREE_MEMORY_BYTES"))]
    pub free_memory_bytes: Option<Seam<u64>>,
    /// For measurements (scripts/gpu_check.sh): the VAE's convolutions in NHWC on CUDA (`true`,
    /// the default) or NCHW (`false`).
    #[arg(long, env = "MGD3_VAE_NHWC", hide = true, default_value_t = true, action = clap::ArgAction::Set)]
    pub vae_nhwc: bool,
    /// Two DiT batches in flight when a shard has enough samples for two calls (`on`, the
    /// default): one batch's step maths runs while the DiT computes the other's step, with the
    /// same output bytes. `off` samples one batch at a time (for measuring).
    #[arg(long, value_enum, default_value_t = Switch::On)]
    pub overlap: Switch,
    /// For measurements: model calls through ONNX Runtime's I/O binding (`on`, the default: an
    /// unchanged input such as the DiT's labels stays on the device, outputs land in page-locked
    /// memory on CUDA; the same bytes, checked at load) or plain runs (`off`).
    #[arg(long, env = "MGD3_IO_BINDING", hide = true, value_enum, default_value_t = Switch::On)]
    pub io_binding: Switch,
    /// ONNX Runtime intra-op threads (default: the CPUs this process may use, as --cpu-threads).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Threads for decoding, preprocessing, k-means and PNG encoding (default: the CPUs this
    /// process may use: its affinity mask, cgroup quota and SLURM_CPUS_PER_TASK).
    #[arg(long, env = "MGD3_CPU_THREADS")]
    pub cpu_threads: Option<usize>,
    /// Path of libonnxruntime.so (default: $ORT_DYLIB_PATH, else the `.ort/gpu`, `.ort/gpu-cu12`
    /// or `.ort/cpu` copy in the checkout this binary was built in, else the system library).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
}

/// `--dit-rows`: a number of rows per DiT call, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DitRows {
    /// Chosen at model load from the device's free memory ([`crate::models::AutoRows`]).
    Auto,
    /// This many rows per call.
    Rows(usize),
}

impl std::str::FromStr for DitRows {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(DitRows::Auto);
        }
        s.parse::<usize>()
            .map(DitRows::Rows)
            .map_err(|_| format!("`{s}` is neither a number of rows (e.g. 256) nor `auto`"))
    }
}

/// A VAE batch flag's value: a number of images (`auto` is `--dit-rows`' alone: the VAE's
/// batches are what the DiT's rows are chosen around).
fn images_per_call(s: &str) -> Result<usize, String> {
    s.parse::<usize>().map_err(|_| {
        if s.eq_ignore_ascii_case("auto") {
            "`auto` is for --dit-rows only: give the VAE a number of images per call (default 64; \
             --dit-rows auto chooses the DiT's rows around the VAE's batch)"
                .to_owned()
        } else {
            format!("`{s}` is not a number of images per call (e.g. 32)")
        }
    })
}

/// Most threads per usable CPU `--cpu-threads` and `--threads` accept: beyond that a pool only
/// thrashes (and a typo such as 1000000 would start a million threads).
pub const MAX_THREADS_PER_CPU: usize = 4;

impl RuntimeArgs {
    /// The CPU pool `--cpu-threads` asks for (checked by [`RuntimeArgs::session_config`]).
    pub fn cpu_pool(&self) -> crate::cpu::CpuPool {
        let pool = crate::cpu::CpuPool::new(self.cpu_threads);
        tracing::debug!(threads = pool.threads(), "CPU pool for decoding, k-means and PNG");
        pool
    }

    /// Loads ONNX Runtime (`--ort-lib`, else `$ORT_DYLIB_PATH`, else the system library) and
    /// returns the session settings these flags ask for.
    ///
    /// # Errors
    /// What [`SessionConfig::try_from`] refuses; an ONNX Runtime library that cannot be loaded.
    pub fn session_config(&self) -> Result<SessionConfig> {
        let config = SessionConfig::try_from(self)?;
        init_runtime(self.ort_lib.as_deref())?;
        Ok(config)
    }

    /// The DiT rows per call the flags give: `--dit-rows N`, else [`DEFAULT_DIT_ROWS`] (also
    /// what an `auto` worker starts from, registers and falls back to).
    ///
    /// [`DEFAULT_DIT_ROWS`]: mgd3_common::batch::DEFAULT_DIT_ROWS
    pub fn dit_rows(&self) -> usize {
        match self.dit_rows {
            Some(DitRows::Rows(n)) => n,
            Some(DitRows::Auto) | None => mgd3_common::batch::DEFAULT_DIT_ROWS,
        }
    }

    /// How the DiT rows are chosen at model load, when they are: `--dit-rows auto`, or no
    /// `--dit-rows` on CUDA.
    pub fn auto_rows(&self) -> Option<crate::models::AutoRows> {
        let auto = match self.dit_rows {
            Some(DitRows::Auto) => true,
            Some(DitRows::Rows(_)) => false,
            None => matches!(self.device, Device::Cuda(_)),
        };
        auto.then(|| crate::models::AutoRows {
            free_memory_bytes: Seam::get(self.free_memory_bytes),
            ..Default::default()
        })
    }

    /// The batch policy the flags ask for (checked by [`RuntimeArgs::runtime`]).
    pub fn batch_policy(&self) -> BatchPolicy {
        let asked = self.dit_rows();
        // A call carries whole CFG pairs (a sample's conditional and unconditional rows): the
        // rows the calls actually carry, so that what the worker reports, logs and plans by is
        // what it runs (`--dit-rows 7` carries 6; 1 carries one pair). 0 stays, to be refused.
        let dit_rows = if asked == 0 { 0 } else { 2 * mgd3_common::batch::samples_per_call(asked) };
        let vae = self.vae_batch.unwrap_or(asked.min(mgd3_common::batch::DEFAULT_VAE_BATCH));
        let encode_images = self.vae_encode_batch.unwrap_or(vae);
        BatchPolicy {
            dit_rows,
            encode_images,
            decode_images: self.vae_decode_batch.unwrap_or(vae),
            // The data stage hands the encoder chunks of this many decoded images, so a larger
            // encoder batch is a larger chunk (and more decoded images in memory).
            encode_chunk: encode_images,
            ..BatchPolicy::default()
        }
    }

    /// [`RuntimeArgs::session_config`] with the batch policy: what the worker's models run with.
    /// Logs the policy in one line.
    ///
    /// # Errors
    /// As [`RuntimeArgs::session_config`]; a batch flag of 0.
    pub fn runtime(&self) -> Result<Runtime> {
        let policy = self.batch_policy();
        if let Some(flag) = policy.problems().first() {
            bail!("{flag} must be at least 1");
        }
        let session = self.session_config()?;
        if policy.dit_rows != self.dit_rows() && self.auto_rows().is_none() {
            tracing::warn!(
                "--dit-rows {}: a DiT call carries whole CFG pairs (each sample's conditional and unconditional \
                 rows), so calls carry {} rows ({} sample{}); give an even number to say so",
                self.dit_rows(),
                policy.dit_rows,
                policy.samples_per_call(),
                if policy.samples_per_call() == 1 { "" } else { "s" }
            );
        }
        tracing::debug!(device = %session.device, limit_bytes = ?session.gpu_memory_limit, "batch policy: {policy}");
        let vae_cuda =
            mgd3_onnx::session::CudaTuning { prefer_nhwc: self.vae_nhwc, ..mgd3_onnx::session::CudaTuning::VAE };
        Ok(Runtime { session, policy, vae_cuda, overlap: self.overlap == Switch::On, auto_rows: self.auto_rows() })
    }
}

/// A test seam's value (`MGD3_FREE_MEMORY_BYTES` and the like): a number, or unset when the
/// variable is set but empty (`VAR=` is how a shell unsets it for one command).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seam<T>(Option<T>);

impl<T: Copy> Seam<T> {
    /// The value a flag or variable gave, if any.
    pub fn get(seam: Option<Seam<T>>) -> Option<T> {
        seam.and_then(|s| s.0)
    }
}

/// The parser of a test seam read from `variable` (or its hidden flag): a whole number, or unset
/// when empty; anything else is refused naming the variable, which is how a seam is set.
fn seam<T>(variable: &'static str) -> impl Fn(&str) -> Result<Seam<T>, String> + Clone
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    move |s: &str| {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Seam(None));
        }
        s.parse()
            .map(|v| Seam(Some(v)))
            .map_err(|e: T::Err| format!("{e}: set {variable} to a whole number (or leave it empty for none)"))
    }
}

/// `--gpu-memory-limit`: bytes, or a fraction of the card's memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MemoryLimit {
    /// This many bytes.
    Bytes(u64),
    /// This fraction (0, 1] of the card's total memory.
    Fraction(f64),
}

impl std::str::FromStr for MemoryLimit {
    type Err = String;

    /// Bytes with an optional unit (`24000000000`, `24GB`, `22GiB`, `0.5GB`, `24G`: decimal
    /// `K M G T` with or without `B`, binary `Ki Mi Gi Ti` with or without `B`), or a fraction of
    /// the card (`0.8`, a number below 1 without a unit, or `80%`). A plain number under 1 MiB
    /// is refused as a likely missing unit.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let what = "give bytes (24000000000, 24GB, 22GiB) or a fraction of the card (0.8, 80%)";
        if let Some(percent) = t.strip_suffix('%') {
            let p: f64 = percent.trim().parse().map_err(|_| format!("`{s}` is not a percentage: {what}"))?;
            return if p > 0.0 && p <= 100.0 {
                Ok(MemoryLimit::Fraction(p / 100.0))
            } else {
                Err(format!("`{s}`: a share of the card must be above 0 % and at most 100 %"))
            };
        }
        let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
        let (number, unit) = (t[..split].trim(), t[split..].trim());
        let value: f64 = number.parse().map_err(|_| format!("`{s}` is not a memory size: {what}"))?;
        if !value.is_finite() || value <= 0.0 {
            return Err(format!("`{s}`: a memory limit must be above 0: {what}"));
        }
        let unit = unit.to_ascii_lowercase();
        let unit = unit.strip_suffix('b').unwrap_or(&unit);
        let multiplier: f64 = match unit {
            "" => 1.0,
            "k" => 1e3,
            "m" => 1e6,
            "g" => 1e9,
            "t" => 1e12,
            "ki" => 1024.0,
            "mi" => 1024.0 * 1024.0,
            "gi" => 1024.0 * 1024.0 * 1024.0,
            "ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            _ => return Err(format!("`{s}`: unknown unit: {what}")),
        };
        if unit.is_empty() && value < 1.0 {
            return Ok(MemoryLimit::Fraction(value));
        }
        if unit.is_empty() && value == 1.0 && number.contains('.') {
            return Ok(MemoryLimit::Fraction(1.0));
        }
        let bytes = value * multiplier;
        if bytes < (1u64 << 20) as f64 {
            return Err(format!(
                "`{s}` is {bytes:.0} bytes, too little for any model: did you mean `{number}GB` (or a fraction such as 0.8)?"
            ));
        }
        Ok(MemoryLimit::Bytes(bytes as u64))
    }
}

/// The `nvidia-smi --id` of CUDA device `ordinal`: the ordinal's entry of
/// `CUDA_VISIBLE_DEVICES` (an index or a UUID) when that is set, since CUDA numbers only the
/// visible devices; the ordinal itself otherwise.
fn nvidia_smi_id(ordinal: i32, visible: Option<&str>) -> String {
    visible
        .and_then(|v| v.split(',').map(str::trim).filter(|e| !e.is_empty()).nth(ordinal as usize).map(str::to_owned))
        .unwrap_or_else(|| ordinal.to_string())
}

/// `query` (`memory.total`, `memory.free`) of CUDA device `ordinal` in bytes, from `nvidia-smi`
/// (present wherever the NVIDIA driver is), asked for the card as `CUDA_VISIBLE_DEVICES` names
/// it. `Err` says what went wrong, for the caller to add what to do.
pub(crate) fn cuda_memory_bytes(ordinal: i32, query: &str) -> Result<u64, String> {
    let id = nvidia_smi_id(ordinal, std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref());
    let out = std::process::Command::new("nvidia-smi")
        .args([&format!("--query-gpu={query}"), "--format=csv,noheader,nounits", &format!("--id={id}")])
        .output()
        .map_err(|e| format!("cannot run nvidia-smi to read the card's {query}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mib: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("nvidia-smi gave `{}` for {query} of cuda:{ordinal} (--id={id})", text.trim()))?;
    Ok(mib << 20)
}

/// Total memory of CUDA device `ordinal` in bytes, for a fractional `--gpu-memory-limit`.
fn cuda_total_memory(ordinal: i32) -> Result<u64> {
    cuda_memory_bytes(ordinal, "memory.total")
        .map_err(|why| anyhow::anyhow!("{why}; give --gpu-memory-limit in bytes (e.g. 60GB)"))
}

impl TryFrom<&RuntimeArgs> for SessionConfig {
    type Error = anyhow::Error;

    /// The session settings the flags ask for, checked; nothing is loaded.
    ///
    /// # Errors
    /// `--max-batch`, `--threads` or `--cpu-threads` of 0; `--threads` or `--cpu-threads` above
    /// [`MAX_THREADS_PER_CPU`] × the usable CPUs.
    fn try_from(args: &RuntimeArgs) -> Result<Self> {
        args.check()?;
        // ONNX Runtime's own default is every core of the machine, which under Slurm or a cgroup
        // quota oversubscribes the CPUs this process was given.
        let intra_threads = Some(args.threads.unwrap_or_else(crate::cpu::available_cpus));
        let gpu_memory_limit = match (args.gpu_memory_limit, args.device) {
            (None, _) => None,
            (Some(_), Device::Cpu) => {
                bail!("--gpu-memory-limit bounds the CUDA execution provider's memory; this worker runs on the cpu")
            }
            (Some(MemoryLimit::Bytes(bytes)), Device::Cuda(_)) => Some(bytes),
            (Some(MemoryLimit::Fraction(f)), Device::Cuda(id)) => Some((cuda_total_memory(id)? as f64 * f) as u64),
        };
        // A GPU provider named for a CPU worker would be ignored: say so instead of running on the
        // CPU while the user believes the GPU is used.
        if let (Some(provider), Device::Cpu) = (args.provider, args.device) {
            bail!(
                "--provider {} runs models on a CUDA device, and this worker runs on the cpu: add --device cuda \
                 (or cuda:N), or drop --provider",
                provider
            );
        }
        Ok(SessionConfig {
            device: args.device,
            intra_threads,
            max_batch: args.dit_rows(),
            max_call_elements: Seam::get(args.max_call_elements)
                .unwrap_or(mgd3_onnx::session::DEFAULT_MAX_CALL_ELEMENTS),
            gpu_memory_limit,
            // each model's own tuning is set where its session is built (`Runtime::dit` etc.)
            cuda: Default::default(),
            provider: args.provider.unwrap_or_default(),
            tensorrt_cache: Some(mgd3_common::store::model_cache_dir().join("tensorrt")),
            fault_oom_above: Seam::get(args.fault_oom_above),
            // set per model where its session is built, when the rows are chosen at load
            measure_item_bytes: false,
            io_binding: args.io_binding == Switch::On,
        })
    }
}

impl RuntimeArgs {
    fn check(&self) -> Result<()> {
        for (value, flag) in [
            (Some(self.dit_rows()), "--dit-rows (--max-batch)"),
            (self.vae_batch, "--vae-batch"),
            (self.vae_encode_batch, "--vae-encode-batch"),
            (self.vae_decode_batch, "--vae-decode-batch"),
        ] {
            if value == Some(0) {
                bail!("{flag} must be at least 1");
            }
        }
        if Seam::get(self.max_call_elements) == Some(0) {
            bail!("MGD3_MAX_CALL_ELEMENTS must be at least 1");
        }
        if self.threads == Some(0) {
            bail!("--threads must be at least 1");
        }
        let cpus = crate::cpu::available_cpus();
        match self.cpu_threads {
            Some(0) => bail!("--cpu-threads (or MGD3_CPU_THREADS) 0: must be at least 1"),
            Some(n) if n > MAX_THREADS_PER_CPU * cpus => bail!(
                "--cpu-threads (or MGD3_CPU_THREADS) {n} is more than {MAX_THREADS_PER_CPU} × the {cpus} CPU(s) this \
                 process may use; leave it unset to use them all, or give at most {}",
                MAX_THREADS_PER_CPU * cpus
            ),
            _ => {}
        }
        if let Some(n) = self.threads
            && n > MAX_THREADS_PER_CPU * cpus
        {
            bail!(
                "--threads {n} is more than {MAX_THREADS_PER_CPU} × the {cpus} CPU(s) this process may use; leave it \
                 unset to use them all, or give at most {}",
                MAX_THREADS_PER_CPU * cpus
            );
        }
        Ok(())
    }
}

/// MGD³ sampling settings; the defaults are [`SamplingSpec::default`]'s (the paper's), the same
/// as a job spec's `[sampling]` table.
#[derive(Debug, Args, Clone)]
pub struct SamplingArgs {
    /// Mode-guidance scale λ.
    #[arg(long, allow_negative_numbers = true, default_value_t = SamplingSpec::default().guidance_scale)]
    pub guidance_scale: f32,
    /// t_stop: guidance while the respaced index i > t_stop (--steps = no guidance).
    #[arg(long, default_value_t = SamplingSpec::default().stop_guidance)]
    pub stop_guidance: usize,
    /// Classifier-free guidance scale.
    #[arg(long, allow_negative_numbers = true, default_value_t = SamplingSpec::default().cfg_scale)]
    pub cfg_scale: f32,
    /// ε channels CFG mixes: 3 reproduces the reference DiT, 4 is standard CFG.
    #[arg(long, default_value_t = SamplingSpec::default().cfg_channels)]
    pub cfg_channels: usize,
    /// Sampling steps (respaced: DDPM `space_timesteps(T, S)`, DDIM every T/S-th timestep).
    #[arg(long, default_value_t = SamplingSpec::default().steps)]
    pub steps: usize,
    /// Reverse step: `ddpm` (the reference code's) or `ddim` (the paper's Algorithm 1).
    #[arg(long, default_value_t = SamplingSpec::default().sampler)]
    pub sampler: SamplerKind,
    /// DDIM's η: 0 = deterministic, 1 = DDPM-like noise (only with --sampler ddim).
    #[arg(long, allow_negative_numbers = true, default_value_t = SamplingSpec::default().eta)]
    pub eta: f32,
}

impl TryFrom<&SamplingArgs> for SamplingSpec {
    type Error = InvalidSetting;

    /// The settings as a job spec would hold them; nothing is loaded.
    ///
    /// # Errors
    /// Any setting a job spec's `[sampling]` would refuse (steps, t_stop, λ, CFG, η), named by
    /// its flag.
    fn try_from(args: &SamplingArgs) -> Result<Self, InvalidSetting> {
        let spec = SamplingSpec {
            guidance_scale: args.guidance_scale,
            stop_guidance: args.stop_guidance,
            cfg_scale: args.cfg_scale,
            cfg_channels: args.cfg_channels,
            steps: args.steps,
            sampler: args.sampler,
            eta: args.eta,
        };
        // The same checks as a job spec's `[sampling]`, named by flag.
        match spec.problems().into_iter().next() {
            Some(problem) => Err(problem.from_command_line()),
            None => Ok(spec),
        }
    }
}

/// Arguments of `worker distill-class`.
#[derive(Debug, Args)]
pub struct DistillClassArgs {
    /// ImageFolder root holding `<class>/*.{jpg,jpeg,png}`: a folder or an object-store URL.
    #[arg(long)]
    pub data: String,
    /// Job seed; each sample's noise stream derives from (seed, class index, sample index).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Reuse and store the class's VAE latents under this folder or object-store URL.
    #[arg(long)]
    pub latent_cache: Option<String>,
    /// Class folder name (ImageNet wnid).
    #[arg(long = "class")]
    pub class: String,
    /// DiT class label of this class.
    #[arg(long, allow_negative_numbers = true)]
    pub label: i64,
    /// Images per class: k of k-means and the number of samples.
    #[arg(long)]
    pub ipc: usize,
    /// Position of the class in its job's class list (seeds its streams; default: the label).
    #[arg(long)]
    pub class_index: Option<u64>,
    /// The DiT model (.onnx).
    #[arg(long)]
    pub dit: PathBuf,
    /// The VAE encoder model (.onnx).
    #[arg(long)]
    pub vae_encoder: PathBuf,
    /// The VAE decoder model (.onnx).
    #[arg(long)]
    pub vae_decoder: PathBuf,
    /// Output root: writes `<out>/<class>/<j>.png` and `<out>/<class>/modes.npy`.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write a contact sheet (real images, decoded modes, samples) to this PNG file.
    #[arg(long)]
    pub contact_sheet: Option<PathBuf>,
    /// Also write the per-stage timings of the class as JSON.
    #[arg(long)]
    pub timings_json: Option<PathBuf>,
    /// MGD³ sampling settings.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Where and how the models run.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Arguments of `worker sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// The DiT model (.onnx).
    #[arg(long)]
    pub dit: PathBuf,
    /// DiT class label of every sample.
    #[arg(long, allow_negative_numbers = true)]
    pub label: i64,
    /// f32 `[N,C,h,w]` modes in scaled latent space; sample j is guided to mode j.
    #[arg(long)]
    pub modes: PathBuf,
    /// f32 `[N,S+1,C,h,w]`: `[:,0]` = x_T, `[:,k]` = noise of the k-th denoising step.
    #[arg(long)]
    pub noise: PathBuf,
    /// Receives the final x₀, f32 `[N,C,h,w]` in scaled latent space.
    #[arg(long)]
    pub out: PathBuf,
    /// Decode the samples with this VAE decoder...
    #[arg(long, requires = "images_out")]
    pub vae_decoder: Option<PathBuf>,
    /// ...and write them as `<images-out>/<j>.png`.
    #[arg(long, requires = "vae_decoder")]
    pub images_out: Option<PathBuf>,
    /// MGD³ sampling settings.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Where and how the models run.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Reads a float32 `.npy` array of `shape` (e.g. `[N,C,h,w]`), saying in the user's terms
/// (NumPy dtypes and dimensions) what is wrong with a file that is not one.
fn read_npy<T: ReadNpyExt>(path: &Path, what: &str, shape: &str) -> Result<T> {
    use ndarray_npy::ReadNpyError;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {what} `{}`", path.display()))?;
    let file = std::io::BufReader::new(file);
    let shown = path.display();
    T::read_npy(file).map_err(|error| match error {
        ReadNpyError::WrongDescriptor(dtype) => anyhow::anyhow!(
            "{what} `{shown}` holds dtype {dtype}, not float32: save it with `np.save(path, array.astype(np.float32))`"
        ),
        ReadNpyError::WrongNdim(Some(expected), actual) => {
            anyhow::anyhow!("{what} `{shown}` has {actual} dimension(s); {what} must have {expected}: {shape}")
        }
        ReadNpyError::MissingData | ReadNpyError::ExtraBytes(_) => anyhow::anyhow!(
            "{what} `{shown}` is truncated or has extra bytes after its data: write it again with `np.save`"
        ),
        // ndarray-npy's messages already quote their causes: kept as text, not as a chain.
        other => {
            anyhow::anyhow!("{what} `{shown}` is not a .npy file NumPy wrote (`np.save`) of float32 {shape}: {other}")
        }
    })
}

/// Runs one `worker` command line to its end: the subcommand, or cluster mode without one.
///
/// # Errors
/// Whatever the command fails with, as an `anyhow` chain: invalid settings, models or data that
/// cannot be used, a class that fails, or (cluster mode) a missing `--coordinator`, an unusable
/// token or a coordinator that refuses the worker.
pub fn run(cli: Cli) -> Result<()> {
    let Some(command) = cli.command else {
        return cluster(cli.cluster);
    };
    match command {
        Command::DistillClass(args) => distill_class(args),
        Command::Sample(args) => sample(args),
        Command::ImportFashionMnist(args) => {
            let written = crate::import::import_fashion_mnist(&args.src, &args.out, args.per_class)?;
            outln!("wrote {written} Fashion-MNIST images into {}", args.out.display());
            Ok(())
        }
    }
}

fn distill_class(args: DistillClassArgs) -> Result<()> {
    // The class is one folder of --data and names one folder of --out: never a path.
    if let Some(problem) = mgd3_common::job::class_name_problems(std::slice::from_ref(&args.class)).first() {
        bail!("--class {problem}");
    }
    let runtime = args.runtime.runtime()?;
    let paths = ModelPaths { dit: args.dit, vae_encoder: args.vae_encoder, vae_decoder: args.vae_decoder };
    let sampling = SamplingSpec::try_from(&args.sampling)?;
    let mut engine = Engine::load(&paths, &runtime, sampling, args.seed).map_err(EngineError::from_command_line)?;
    let class = ClassSpec::new(
        mgd3_common::job::ClassRef {
            wnid: args.class.clone(),
            label: args.label,
            class_index: args.class_index.unwrap_or(args.label.max(0) as u64),
            listing: None,
        },
        args.ipc,
    );
    let span = tracing::info_span!("class", class = %class.wnid, label = class.label);
    let _guard = span.enter();
    if let Some(cache) = &args.latent_cache {
        engine.set_latent_cache(Some(mgd3_common::store::open(cache)?));
    }
    let dataset = crate::data::Dataset::open(&args.data)?;
    engine.set_cpu_pool(args.runtime.cpu_pool());
    let output =
        engine.distill_class(&dataset, &class, args.contact_sheet.is_some()).map_err(EngineError::from_command_line)?;
    let dir = args.out.join(&class.wnid);
    for (j, png) in output.files.images.iter().enumerate() {
        write_file(&dir.join(format!("{j}.png")), png)?;
    }
    write_file(&dir.join("modes.npy"), &output.files.modes_npy)?;
    if let (Some(path), Some(png)) = (&args.contact_sheet, &output.contact_sheet) {
        write_file(path, png)?;
    }
    if let Some(path) = &args.timings_json {
        write_file(path, serde_json::to_string_pretty(&output.timings)?.as_bytes())?;
    }
    outln!(
        "distilled class {} (label {}): {} images from {} real images in {:.2} s -> {}",
        class.wnid,
        class.label,
        output.files.images.len(),
        output.timings.real_images,
        output.timings.total().as_secs_f64(),
        dir.display()
    );
    Ok(())
}

fn sample(args: SampleArgs) -> Result<()> {
    let runtime = args.runtime.runtime()?;
    let config = SamplingSpec::try_from(&args.sampling)?;
    let modes: Array4<f32> = read_npy(&args.modes, "--modes", "[N,C,h,w]")?;
    let noise: Array5<f32> = read_npy(&args.noise, "--noise", "[N,S+1,C,h,w]")?;
    // A NaN or Inf given in is named as the file's, not found later in the DiT's output and
    // blamed on the model.
    for (flag, path, finite) in [
        ("--modes", &args.modes, modes.iter().all(|v| v.is_finite())),
        ("--noise", &args.noise, noise.iter().all(|v| v.is_finite())),
    ] {
        if !finite {
            bail!("{flag} `{}` holds NaN or infinite values: give finite latents", path.display());
        }
    }
    let decoder = args.vae_decoder.as_deref().filter(|_| args.images_out.is_some());
    let kinds: Vec<(&'static str, &std::path::Path)> =
        std::iter::once(("dit", args.dit.as_path())).chain(decoder.map(|d| ("vae_decoder", d))).collect();
    crate::models::check_model_kinds(&kinds)?;
    let models: Vec<&std::path::Path> = std::iter::once(args.dit.as_path()).chain(decoder).collect();
    crate::models::check_cpu_models(runtime.session.device, &models)?;
    let mut dit = Dit::load(&args.dit, &runtime.dit())?;
    let info = dit.info().clone();
    check_guidance(&config, info.latent_shape[0]).map_err(EngineError::from_command_line)?;
    if modes.shape()[1..] != info.latent_shape {
        bail!(
            "modes `{}` has shape {:?}; the DiT expects [N, {:?}]",
            args.modes.display(),
            modes.shape(),
            info.latent_shape
        );
    }
    if let Err(outside) = mgd3_common::job::check_label("--label", args.label, info.num_classes as i64) {
        bail!(
            "--label {} is outside the DiT's {} classes (labels 0 to {})",
            outside.label,
            outside.classes,
            outside.classes.saturating_sub(1)
        );
    }
    let n = modes.shape()[0];
    let want = [n, config.steps + 1, info.latent_shape[0], info.latent_shape[1], info.latent_shape[2]];
    if noise.shape() != want {
        bail!(
            "noise `{}` has shape {:?}; expected {:?} (N, steps+1, C, h, w)",
            args.noise.display(),
            noise.shape(),
            want
        );
    }
    let schedule = schedule_for_sampler(&dit, config.steps, sampler_of(&config))?;
    let labels = vec![args.label; n];
    let mut timings = ClassTimings::default();
    let batch = SampleBatch {
        class: "sample",
        labels: &labels,
        modes: modes.view(),
        noise: noise.view(),
        samples_per_call: mgd3_common::batch::samples_per_call(dit.call_limit().items),
        cancel: None,
        sampler: sampler_of(&config),
    };
    let latents = sample_in_batches(&mut dit, &schedule, &config, batch, &mut timings)?;
    write_file(&args.out, &npy_bytes(&latents, &args.out)?)?;
    if let (Some(decoder_path), Some(dir)) = (&args.vae_decoder, &args.images_out) {
        let mut decoder = VaeDecoder::load(decoder_path, &runtime.decoder())?;
        let pool = crate::cpu::CpuPool::default();
        let (pngs, _) = decode_png(&mut decoder, &pool, "sample", latents.view(), &mut timings)?;
        for (j, png) in pngs.iter().enumerate() {
            write_file(&dir.join(format!("{j}.png")), png)?;
        }
    }
    outln!("sampled {n} latents in {:.2} s -> {}", timings.stages.dit + timings.stages.guidance, args.out.display());
    Ok(())
}

fn cluster(args: ClusterArgs) -> Result<()> {
    let Some(coordinator) = args.coordinator.clone() else {
        bail!("give --coordinator URL to join a cluster, or a subcommand (see --help)");
    };
    let token = args
        .token_file
        .as_deref()
        .map(|path| mgd3_common::rpc::read_token_file(path, args.insecure_token_file))
        .transpose()?;
    let host = hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "worker".into());
    let worker_id = args.worker_id.clone().unwrap_or_else(|| default_worker_id(&host));
    let slurm = |key: &str| std::env::var(key).unwrap_or_default();
    if std::env::var_os("SLURM_JOB_ID").is_some() {
        tracing::info!(
            worker = %worker_id,
            slurm_job = %slurm("SLURM_JOB_ID"),
            slurm_step = %slurm("SLURM_STEP_ID"),
            slurm_localid = %slurm("SLURM_LOCALID"),
            slurm_restart_count = %slurm("SLURM_RESTART_COUNT"),
            "worker starting"
        );
    } else {
        tracing::info!(worker = %worker_id, coordinator = %coordinator, "worker starting");
    }
    let engine: Box<dyn ShardEngine> = match args.engine {
        EngineKind::Onnx => {
            let runtime = args.runtime.runtime()?;
            // A device this worker cannot use stops it here, before it registers: a worker that
            // took leases it cannot run would only be excluded, and the job would wait for ever.
            mgd3_onnx::session::probe_device(&runtime.session)?;
            tracing::info!(worker = %worker_id, device = %runtime.session.device,
            gpu_memory_limit_bytes = ?runtime.session.gpu_memory_limit, "batch policy: {}{}", runtime.policy,
            if runtime.auto_rows.is_some() {
                "; DiT rows chosen when the models load, from the free memory (--dit-rows auto)"
            } else {
                ""
            });
            Box::new(OnnxShardEngine::new(runtime, args.runtime.cpu_pool()))
        }
        EngineKind::Fake => {
            Box::new(FakeEngine::new(std::time::Duration::from_secs_f64(args.fake_class_seconds.max(0.0))))
        }
    };
    let config = WorkerConfig {
        coordinator,
        worker_id,
        token,
        tls_ca: args.tls_ca.clone(),
        devices: vec![args.runtime.device.to_string()],
        give_up_after: (args.give_up_after_s > 0).then(|| std::time::Duration::from_secs(args.give_up_after_s)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let seen = std::sync::Arc::new(std::sync::OnceLock::new());
    runtime.block_on(crate::client::run(config, engine, mgd3_common::termination_into(seen.clone()))).map_err(
        |error| match error {
            // The URL error itself, not through the transparent wrapper (which hides it from the
            // error's chain), so that `exit_status` can say a bad URL came from MGD3_COORDINATOR.
            crate::client::ClientError::Connect(connect) => anyhow::Error::new(connect),
            other => other.into(),
        },
    )?;
    if seen.get() == Some(&mgd3_common::StopSignal::Interrupt) {
        return Err(mgd3_common::Interrupted { signal: mgd3_common::StopSignal::Interrupt, next: None }.into());
    }
    Ok(())
}

/// `<host>-<pid>-<4 random hex>`, or under Slurm an id made of the job (array task), step, task
/// and restart count, then `@<host>-<pid>-<4 random hex>`, so logs and the coordinator's status
/// tell which allocation a worker belongs to, and no two processes share a default id — also in
/// containers that share a host name and each have their own pid namespace (every worker pid 1).
pub fn default_worker_id(host: &str) -> String {
    let tag = format!("{:04x}", rand::random::<u16>());
    worker_id_from(host, std::process::id(), &tag, |key| std::env::var(key).ok().filter(|v| !v.is_empty()))
}

fn worker_id_from(host: &str, pid: u32, tag: &str, env: impl Fn(&str) -> Option<String>) -> String {
    let Some(job) = env("SLURM_ARRAY_JOB_ID").or_else(|| env("SLURM_JOB_ID")) else {
        return format!("{host}-{pid}-{tag}");
    };
    let mut id = format!("slurm-{job}");
    if let Some(task) = env("SLURM_ARRAY_TASK_ID") {
        id.push_str(&format!("_{task}"));
    }
    if let Some(step) = env("SLURM_STEP_ID") {
        id.push_str(&format!(".{step}"));
    }
    if let Some(local) = env("SLURM_LOCALID") {
        id.push_str(&format!("-l{local}"));
    }
    // The pid keeps two worker processes of one Slurm task apart (a script that starts one per
    // GPU itself): no two live processes ever default to one id.
    id.push_str(&format!("-r{}@{host}-{pid}-{tag}", env("SLURM_RESTART_COUNT").unwrap_or_else(|| "0".into())));
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_carry_slurm_coordinates() {
        let none = |_: &str| None;
        assert_eq!(worker_id_from("h", 7, "00af", none), "h-7-00af");
        let step = |k: &str| match k {
            "SLURM_JOB_ID" => Some("42".into()),
            "SLURM_STEP_ID" => Some("3".into()),
            "SLURM_LOCALID" => Some("1".into()),
            "SLURM_RESTART_COUNT" => Some("2".into()),
            _ => None,
        };
        assert_eq!(worker_id_from("n1", 7, "00af", step), "slurm-42.3-l1-r2@n1-7-00af");
        // Two processes of one Slurm task get two ids.
        assert_ne!(worker_id_from("n1", 7, "00af", step), worker_id_from("n1", 8, "00af", step));
        let array = |k: &str| match k {
            "SLURM_ARRAY_JOB_ID" => Some("40".into()),
            "SLURM_JOB_ID" => Some("45".into()),
            "SLURM_ARRAY_TASK_ID" => Some("5".into()),
            _ => None,
        };
        assert_eq!(worker_id_from("n2", 7, "00af", array), "slurm-40_5-r0@n2-7-00af");
    }

    fn runtime_args(args: &[&str]) -> RuntimeArgs {
        let mut argv = vec!["worker"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().cluster.runtime
    }

    #[test]
    fn the_batch_flags_make_one_policy() {
        let default = runtime_args(&[]).batch_policy();
        assert_eq!(default, BatchPolicy::default());
        // --max-batch is --dit-rows' older name; it still sets the VAE batch up to 64.
        let old = runtime_args(&["--max-batch", "512"]).batch_policy();
        assert_eq!((old.dit_rows, old.encode_images, old.decode_images), (512, 64, 64));
        let small = runtime_args(&["--max-batch", "4"]).batch_policy();
        assert_eq!((small.dit_rows, small.encode_images, small.decode_images), (4, 4, 4));
        // Odd rows: the rows the calls carry (whole CFG pairs); the VAE batch as asked.
        let odd = runtime_args(&["--dit-rows", "7"]).batch_policy();
        assert_eq!((odd.dit_rows, odd.samples_per_call(), odd.encode_images, odd.decode_images), (6, 3, 7, 7));
        let one = runtime_args(&["--dit-rows", "1"]).batch_policy();
        assert_eq!((one.dit_rows, one.samples_per_call(), one.encode_images), (2, 1, 1));
        assert_eq!(runtime_args(&["--dit-rows", "0"]).batch_policy().dit_rows, 0, "refused, not rounded up");
        let split = runtime_args(&["--dit-rows", "256", "--vae-batch", "32", "--vae-decode-batch", "8"]).batch_policy();
        assert_eq!((split.dit_rows, split.encode_images, split.decode_images), (256, 32, 8));
        let error = SessionConfig::try_from(&runtime_args(&["--vae-decode-batch", "0"])).unwrap_err().to_string();
        assert!(error.contains("--vae-decode-batch"), "{error}");
        let error = SessionConfig::try_from(&runtime_args(&["--vae-batch", "0", "--vae-encode-batch", "3"]))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("--vae-batch must"), "{error}");
        // `auto`: the rows are chosen when the models load; the policy starts from the default.
        let auto = runtime_args(&["--dit-rows", "auto"]);
        assert_eq!(auto.batch_policy(), BatchPolicy::default());
        assert_eq!(auto.auto_rows(), Some(crate::models::AutoRows::default()));
        assert_eq!(runtime_args(&["--max-batch", "AUTO"]).dit_rows, Some(DitRows::Auto));
        // The default: auto on CUDA, the default rows on the CPU; a number is never auto.
        assert!(runtime_args(&["--device", "cuda:1"]).auto_rows().is_some());
        assert_eq!(runtime_args(&[]).auto_rows(), None);
        assert_eq!(runtime_args(&["--device", "cuda", "--dit-rows", "128"]).auto_rows(), None);
        let mut argv = vec!["worker", "--dit-rows", "many"];
        let error = Cli::try_parse_from(&argv).unwrap_err().to_string();
        assert!(error.contains("`many` is neither a number of rows (e.g. 256) nor `auto`"), "{error}");
        let error = Cli::try_parse_from(["worker", "--vae-batch", "auto"]).unwrap_err().to_string();
        assert!(error.contains("`auto` is for --dit-rows only"), "{error}");
        let error = Cli::try_parse_from(["worker", "--vae-decode-batch", "x"]).unwrap_err().to_string();
        assert!(error.contains("`x` is not a number of images per call"), "{error}");
        let error = Cli::try_parse_from(["worker", "--dit-rows", "-3"]).unwrap_err().to_string();
        assert!(error.contains("--dit-rows") && error.contains("`-3` is neither"), "{error}");
        argv[2] = "0";
        let error = SessionConfig::try_from(&Cli::try_parse_from(&argv).unwrap().cluster.runtime).unwrap_err();
        assert!(error.to_string().starts_with("--dit-rows (--max-batch) must be at least 1"), "{error}");
        // A larger encoder batch is a larger chunk of decoded images.
        assert_eq!(runtime_args(&["--vae-encode-batch", "256"]).batch_policy().encode_chunk, 256);
        let error = SessionConfig::try_from(&runtime_args(&["--gpu-memory-limit", "20GB"])).unwrap_err().to_string();
        assert!(error.contains("--gpu-memory-limit") && error.contains("cpu"), "{error}");
    }

    #[test]
    fn an_empty_test_seam_is_unset_and_a_bad_one_is_refused() {
        let args = runtime_args(&["--free-memory-bytes", "1000", "--fault-oom-above", "", "--max-call-elements", " "]);
        assert_eq!(Seam::get(args.free_memory_bytes), Some(1000));
        assert_eq!(Seam::get(args.fault_oom_above), None);
        assert_eq!(Seam::get(args.max_call_elements), None);
        assert_eq!(
            SessionConfig::try_from(&args).unwrap().max_call_elements,
            mgd3_onnx::session::DEFAULT_MAX_CALL_ELEMENTS
        );
        let error = Cli::try_parse_from(["worker", "--free-memory-bytes", "lots"]).unwrap_err().to_string();
        assert!(error.contains("'lots'") && error.contains("set MGD3_FREE_MEMORY_BYTES to a whole number"), "{error}");
    }

    #[test]
    fn memory_limits_read_bytes_units_and_fractions() {
        let parse = |s: &str| s.parse::<MemoryLimit>();
        assert_eq!(parse("24000000000"), Ok(MemoryLimit::Bytes(24_000_000_000)));
        assert_eq!(parse("24GB"), Ok(MemoryLimit::Bytes(24_000_000_000)));
        assert_eq!(parse("22GiB"), Ok(MemoryLimit::Bytes(22 << 30)));
        assert_eq!(parse("1.5 gb"), Ok(MemoryLimit::Bytes(1_500_000_000)));
        assert_eq!(parse("0.5GB"), Ok(MemoryLimit::Bytes(500_000_000)));
        assert_eq!(parse("0.5GiB"), Ok(MemoryLimit::Bytes(1 << 29)));
        assert_eq!(parse("24G"), Ok(MemoryLimit::Bytes(24_000_000_000)));
        assert_eq!(parse("24Gi"), Ok(MemoryLimit::Bytes(24 << 30)));
        assert_eq!(parse("0.8"), Ok(MemoryLimit::Fraction(0.8)));
        assert_eq!(parse("1.0"), Ok(MemoryLimit::Fraction(1.0)));
        assert_eq!(parse("80%"), Ok(MemoryLimit::Fraction(0.8)));
        for (bad, says) in [
            ("", "not a memory size"),
            ("abc", "not a memory size"),
            ("NaN", "not a memory size"),
            ("0", "above 0"),
            ("0.0", "above 0"),
            ("-1GB", "above 0"),
            ("0%", "above 0 %"),
            ("150%", "at most 100 %"),
            ("12 parsecs", "unknown unit"),
            ("24", "did you mean `24GB`"),
            ("1", "did you mean"),
            ("1KB", "too little"),
        ] {
            let error = parse(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn nvidia_smi_is_asked_about_the_card_cuda_numbers_as_the_ordinal() {
        assert_eq!(nvidia_smi_id(0, None), "0");
        assert_eq!(nvidia_smi_id(1, Some("3,5")), "5");
        assert_eq!(nvidia_smi_id(0, Some("GPU-8f2a, GPU-77")), "GPU-8f2a");
        assert_eq!(nvidia_smi_id(2, Some("3")), "2", "an ordinal past the list is passed as it is");
    }
}
