//! The worker's bottom layer: the three ONNX networks ([`Models`]: load, check, fingerprint) and
//! the one road from latents to bytes that every caller runs — a shard, `worker sample`, the
//! benchmarks and the parity tests: [`sample_run`] (one sampling run), [`sample_in_batches`],
//! [`decode_png`]. Also the types a class travels with ([`ClassSpec`], [`ClassTimings`]) and the
//! error of distilling ([`EngineError`]). Nothing here knows of shards, cancellation, caches or
//! seeds: [`crate::pipeline`] builds on it, [`crate::shard`] on that.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mgd3_common::batch::BatchPolicy;
use mgd3_common::job::{ClassRef, InvalidSetting, SamplingSpec, Setting};
use mgd3_common::manifest::StageSeconds;
use mgd3_onnx::contract::{CudaOnly, Graph};
use mgd3_onnx::session::CudaTuning;
use mgd3_onnx::{Device, Dit, SessionConfig, VaeDecoder, VaeEncoder};
use ndarray::{Array4, ArrayView4, ArrayView5, Axis, s};
use serde::Serialize;
use thiserror::Error;
use tracing::debug;

use crate::cache;
use crate::cpu::CpuPool;
use crate::data::DataError;
use crate::mgd3::modes::ModesError;
use crate::mgd3::sampler::{Denoiser, DenoiserInfo, ModelError, SampleError, Sampler, sample_with};
use crate::mgd3::schedule::{BetaSchedule, Schedule, ScheduleError};
use crate::sink::{SinkError, png_bytes};

/// Groups of identical images shown at most this many, and names per group.
const SHOWN_GROUPS: usize = 5;
const SHOWN_PER_GROUP: usize = 4;

/// `: identical images: `a` = `b`; `c` = `d` = `e` (and 3 more groups)` for a class whose
/// latents hold bit-exact copies (named from `images`, the class's real images in the order of
/// its latents); empty for any other mode failure.
fn identical_images(source: &ModesError, images: &[String]) -> String {
    let ModesError::TooFewDistinct { groups, .. } = source else { return String::new() };
    let name =
        |row: usize| images.get(row).map_or_else(|| format!("image #{row}"), |n| format!("`{}`", n.escape_debug()));
    let shown: Vec<String> = groups
        .iter()
        .take(SHOWN_GROUPS)
        .map(|group| {
            let mut names: Vec<String> = group.iter().take(SHOWN_PER_GROUP).map(|&row| name(row)).collect();
            if group.len() > SHOWN_PER_GROUP {
                names.push(format!("{} more", group.len() - SHOWN_PER_GROUP));
            }
            names.join(" = ")
        })
        .collect();
    if shown.is_empty() {
        return String::new();
    }
    let more = groups.len().saturating_sub(SHOWN_GROUPS);
    let more = if more > 0 { format!(" (and {more} more groups)") } else { String::new() };
    format!(" holds identical images ({}){more}", shown.join("; "))
}

/// Why a class (or the engine itself) could not be distilled.
#[derive(Debug, Error)]
pub enum EngineError {
    /// An ONNX model failed to load, to pass its contract check or to run.
    #[error(transparent)]
    Model(#[from] mgd3_onnx::Error),
    /// The class's real images could not be listed, read or decoded.
    #[error(transparent)]
    Data(#[from] DataError),
    /// k-means could not find IPC distinct modes in the class's latents. Where the class holds
    /// identical images, the message names them.
    #[error("class `{class}`{}", identical_images(source, images))]
    Modes {
        /// The class (wnid).
        class: String,
        /// The class's real images in the order of its latents (paths or keys), to name
        /// duplicates; empty when unknown.
        images: Vec<String>,
        /// Why.
        #[source]
        source: ModesError,
    },
    /// Sampling a class failed (shapes, settings, or guidance that diverged).
    #[error("class `{class}`: sampling failed")]
    Sample {
        /// The class (wnid).
        class: String,
        /// The sampler's error, naming the sample.
        #[source]
        source: SampleError,
    },
    /// The DiT's metadata names an unknown beta schedule, or `steps` cannot be respaced to.
    #[error("schedule of the DiT")]
    Schedule(#[from] ScheduleError),
    /// An image could not be PNG-encoded, or an output could not be written.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The latent cache could not be read or written.
    #[error(transparent)]
    Cache(#[from] cache::CacheError),
    /// The three models each fit the contract but not each other (VAE latents of another shape
    /// than the DiT's, two scale factors, a decoder making other images than the encoder reads),
    /// every mismatch at once, each naming its files.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    ModelSet(Vec<mgd3_onnx::contract::ModelSetMismatch>),
    /// A setting has a value the models or the other settings rule out; named as the user
    /// wrote it (job spec key or command-line flag, per `source`).
    #[error(transparent)]
    Invalid(#[from] InvalidSetting),
    /// A VAE gave a NaN or an infinity for one of the class's real images or samples: the class
    /// fails instead of committing modes or PNGs made from it.
    #[error("class `{class}`: {item}")]
    NonFinite {
        /// The class (wnid).
        class: String,
        /// `real image `path`` or `sample j`.
        item: String,
        /// The model's error, naming the model (and, for fp16, what to use instead).
        #[source]
        source: Box<mgd3_onnx::Error>,
    },
    /// A class's DiT label is outside the DiT's classes.
    #[error(transparent)]
    LabelOutOfRange(#[from] mgd3_common::job::LabelOutOfRange),
    /// The caller passed labels and modes of different counts (a bug in the caller).
    #[error("{labels} labels for {modes} modes")]
    LabelCount {
        /// Labels given.
        labels: usize,
        /// Modes given.
        modes: usize,
    },
    /// A model's external-data files are not all there as it needs them (missing, cut short, not a
    /// file, outside its folder): said before ONNX Runtime's own error, which names no file.
    /// Retryable: another worker's copy may be whole.
    #[error(transparent)]
    ModelFiles(mgd3_common::modelmeta::ModelFilesError),
    /// A model file could not be read to fingerprint it.
    #[error("cannot read model `{path}` to fingerprint it")]
    Fingerprint {
        /// The model file.
        path: std::path::PathBuf,
        /// Which file could not be read, or which external-data file is missing.
        #[source]
        source: mgd3_common::modelmeta::ModelFilesError,
    },
    /// A model file (or one of its external-data files) was replaced or rewritten while the
    /// models were loaded and fingerprinted, every time they were tried: what was loaded may not
    /// be what was fingerprinted.
    #[error(
        "model file `{}` changed while the worker loaded it ({tries} tries): wait until whatever writes or \
         replaces the models (a copy, a sync) has finished, then start the worker again",
        path.display()
    )]
    ModelsChanged {
        /// A file that changed.
        path: std::path::PathBuf,
        /// Loads tried.
        tries: usize,
    },
    /// The cancel flag was set (shutdown or revoked lease) before a DiT batch.
    #[error("cancelled")]
    Cancelled,
    /// Model files given as models of another kind, by their metadata `mgd3.kind`: every one
    /// at once, with the other model files that are missing or not ONNX models
    /// ([`check_model_kinds`]).
    #[error(
        "models given in the wrong places (by their metadata `mgd3.kind`): {}; {}give each file as the model it is{}",
        .models.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        if .models.len() > 1 { "are models swapped? " } else { "" },
        if .unusable.is_empty() { String::new() } else {
            format!("; besides, {}", .unusable.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
        }
    )]
    MisplacedModels {
        /// Each misplaced model, in the order DiT, VAE encoder, VAE decoder.
        models: Vec<MisplacedModel>,
        /// The other model files that cannot be used: missing, or not ONNX models.
        unusable: Vec<UnusableModel>,
    },
    /// More than one model does not fit the contract the workers check at load, every violation
    /// at once (in the order DiT, VAE encoder, VAE decoder), each naming its model and item
    /// ([`check_model_contracts`]); one alone is [`EngineError::Model`].
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    ModelContracts(Vec<mgd3_common::contract::ContractViolation>),
    /// Model files that are there but are no ONNX models (text, a checkpoint, a folder, a copy
    /// cut short) or that this process may not read, all named at once with the missing ones
    /// ([`check_model_kinds`]). Retryable: a copy on this worker's disk may be bad where another
    /// worker's is not.
    #[error("{}", .models.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    UnusableModels {
        /// Each model file that cannot be used, in the order DiT, VAE encoder, VAE decoder; at
        /// least one is no ONNX model or may not be read.
        models: Vec<UnusableModel>,
    },
}

/// A model file that is missing or not an ONNX model, named beside misplaced ones
/// ([`EngineError::MisplacedModels`]) so that one run names every bad file.
#[derive(Debug)]
pub struct UnusableModel {
    /// What it was given as: `dit`, `vae_encoder` or `vae_decoder`.
    pub given_as: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Why it cannot be read as an ONNX model (not found, not a model, a folder...).
    pub source: std::io::Error,
}

impl std::fmt::Display for UnusableModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (given, path) = (kind_name(self.given_as), self.path.display());
        match self.source.kind() {
            std::io::ErrorKind::NotFound => match mgd3_common::modelmeta::dangling_link(&self.path) {
                Some(target) => write!(
                    f,
                    "the {given} `{path}` is a link to `{}`, which does not exist: link or copy the model there",
                    target.display()
                ),
                None => write!(f, "the {given} `{path}` does not exist"),
            },
            _ if mgd3_common::modelmeta::is_not_a_model(&self.source) => {
                write!(f, "the {given} `{path}` is {}", self.source)?;
                match mgd3_common::modelmeta::not_a_model_advice(&self.source).trim_start_matches("; ") {
                    "" => Ok(()),
                    advice => write!(f, " ({advice})"),
                }
            }
            std::io::ErrorKind::PermissionDenied => write!(
                f,
                "the {given} `{path}` may not be read by this worker's user (permission denied): make it readable \
                 to that user (chmod a+r, or its group)"
            ),
            _ => write!(f, "the {given} `{path}` cannot be read ({})", self.source),
        }
    }
}

/// A model file given as a model of another kind ([`EngineError::MisplacedModels`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MisplacedModel {
    /// What it was given as: `dit`, `vae_encoder` or `vae_decoder` (the `mgd3.kind` values).
    pub given_as: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What its metadata `mgd3.kind` says it is.
    pub kind: String,
}

/// A person's name for an `mgd3.kind` value.
fn kind_name(kind: &str) -> &str {
    match kind {
        "dit" => "DiT",
        "vae_encoder" => "VAE encoder",
        "vae_decoder" => "VAE decoder",
        other => other,
    }
}

impl std::fmt::Display for MisplacedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let is = match kind_name(&self.kind) {
            known @ ("DiT" | "VAE encoder" | "VAE decoder") => format!("a {known}"),
            other => format!("of kind `{}`", other.escape_debug()),
        };
        write!(f, "the {} `{}` is {is}", kind_name(self.given_as), self.path.display())
    }
}

/// Refuses, before any session is built, model files whose metadata `mgd3.kind` names another
/// model than the one they are given as (`models`: what each is given as, `dit`, `vae_encoder`
/// or `vae_decoder`, and its file), naming every such file at once: two swapped paths are one
/// mistake, to be fixed in one go, not two runs; the other files that are missing or not ONNX
/// models are named with them. Files that are there but are no ONNX models, or may not be
/// read, are refused next, all at once, before ONNX Runtime sees them (its "Protobuf parsing
/// failed" or "system error number 13" names no cause). A missing file, or one that declares no
/// kind, is left to the loader's own error (on a cluster a missing model sends the shard to
/// other workers).
///
/// Returns the views of the files it could read, each with what it is given as, for
/// [`check_model_contracts`].
///
/// # Errors
/// [`EngineError::MisplacedModels`], then [`EngineError::UnusableModels`].
pub fn check_model_kinds(
    models: &[(&'static str, &std::path::Path)],
) -> Result<Vec<(&'static str, mgd3_common::contract::ModelIo)>, EngineError> {
    let (mut misplaced, mut unusable, mut read) = (Vec::new(), Vec::new(), Vec::new());
    for &(given_as, path) in models {
        match mgd3_common::modelmeta::read_model_meta(path) {
            Ok(meta) => {
                if let Some(kind) = meta.metadata.get("mgd3.kind").map(|k| k.trim().to_owned())
                    && kind != given_as
                {
                    misplaced.push(MisplacedModel { given_as, path: path.to_path_buf(), kind });
                }
                read.push((given_as, meta));
            }
            Err(source) => unusable.push(UnusableModel { given_as, path: path.to_path_buf(), source }),
        }
    }
    if !misplaced.is_empty() {
        return Err(EngineError::MisplacedModels { models: misplaced, unusable });
    }
    if unusable.iter().any(|u| {
        mgd3_common::modelmeta::is_not_a_model(&u.source) || u.source.kind() == std::io::ErrorKind::PermissionDenied
    }) {
        return Err(EngineError::UnusableModels { models: unusable });
    }
    Ok(read)
}

/// Holds each model file's declarations (read from the file, as submit reads them) against the
/// contract the loaders check, and its graph against what ONNX Runtime loads (operators and
/// wiring: [`mgd3_common::contract::ModelIo::graph_violations`], in the words `check` uses), so
/// that two bad models are named in one run, not one run each
/// (`models`: each file's view with what it is given as, as [`check_model_kinds`] read them;
/// files that could not be read are left to the loaders, which say why).
///
/// # Errors
/// [`EngineError::Model`] with the contract violation when one model does not fit;
/// [`EngineError::ModelContracts`] with every violation when more do.
pub fn check_model_contracts(models: &[(&'static str, mgd3_common::contract::ModelIo)]) -> Result<(), EngineError> {
    use mgd3_common::contract::{DitInfo, VaeInfo};
    let mut violations: Vec<_> = models
        .iter()
        .flat_map(|(kind, io)| {
            let mut violations = io.graph_violations();
            violations.extend(match *kind {
                "dit" => DitInfo::from_io(io).err(),
                "vae_encoder" => VaeInfo::encoder_from_io(io).err(),
                _ => VaeInfo::decoder_from_io(io).err(),
            });
            violations
        })
        .collect();
    match violations.len() {
        0 => Ok(()),
        1 => Err(EngineError::Model(mgd3_onnx::Error::Contract(violations.remove(0)))),
        _ => Err(EngineError::ModelContracts(violations)),
    }
}

impl EngineError {
    /// A model error of a VAE call about class `class`, naming the real image or sample behind a
    /// non-finite batch item with `name(item)`; other errors pass through.
    pub fn naming_item(class: &str, error: mgd3_onnx::Error, name: impl Fn(usize) -> String) -> Self {
        match error {
            mgd3_onnx::Error::NonFinite { item, .. } => {
                EngineError::NonFinite { class: class.to_owned(), item: name(item), source: Box::new(error) }
            }
            other => EngineError::Model(other),
        }
    }

    /// The same error, naming settings by their command-line flags: for errors about settings
    /// the user gave on the worker's command line rather than in a job spec.
    pub fn from_command_line(self) -> Self {
        match self {
            EngineError::Invalid(invalid) => EngineError::Invalid(invalid.from_command_line()),
            other => other,
        }
    }

    /// Whether a later attempt (maybe on another worker) can succeed where this one failed.
    pub fn is_retryable(&self) -> bool {
        match self {
            // Out of memory at one item is often a card another process holds: another attempt
            // (on this worker later, or on another) may fit.
            EngineError::Model(e) => matches!(e, mgd3_onnx::Error::Ort { .. } | mgd3_onnx::Error::OutOfMemory { .. }),
            EngineError::Data(e) => {
                matches!(
                    e,
                    DataError::Read { .. }
                        | DataError::Store { .. }
                        | DataError::List(
                            mgd3_common::imagefolder::ListError::Io { .. }
                                | mgd3_common::imagefolder::ListError::Store { .. }
                        )
                )
            }
            EngineError::Sink(SinkError::NonFinite(_)) => false,
            EngineError::Sink(_)
            | EngineError::Cancelled
            | EngineError::Cache(_)
            | EngineError::Fingerprint { .. }
            | EngineError::ModelsChanged { .. }
            | EngineError::ModelFiles(_)
            | EngineError::UnusableModels { .. } => true,
            EngineError::Modes { .. }
            | EngineError::Sample { .. }
            | EngineError::Schedule(_)
            | EngineError::ModelSet(_)
            | EngineError::Invalid(_)
            | EngineError::LabelOutOfRange(_)
            | EngineError::NonFinite { .. }
            | EngineError::LabelCount { .. }
            | EngineError::MisplacedModels { .. }
            | EngineError::ModelContracts(_) => false,
        }
    }
}

/// How a worker runs its models: the session settings the three share (device, threads, memory
/// limit, element ceiling) and the batch policy that gives each its own batch.
#[derive(Clone, Debug)]
pub struct Runtime {
    /// Device, threads, element ceiling and memory limit; its `max_batch` is replaced per model.
    pub session: SessionConfig,
    /// Items per call of each model, and the data stage's chunks.
    pub policy: BatchPolicy,
    /// The VAE's CUDA options ([`CudaTuning::VAE`] unless a measurement asks otherwise); the
    /// DiT's are [`CudaTuning::DIT`].
    pub vae_cuda: CudaTuning,
    /// Two DiT batches in flight when a shard has them ([`Models::sample_pair`]): one batch's
    /// step maths runs while the DiT computes the other's step (default on).
    pub overlap: bool,
    /// The DiT rows per call are chosen at load from the device's free memory (`--dit-rows
    /// auto`, the default on CUDA); `None`: `policy.dit_rows` as given.
    pub auto_rows: Option<AutoRows>,
}

/// How `--dit-rows auto` chooses the DiT's rows per call once the three models are loaded: the
/// memory one row takes is measured at load ([`mgd3_onnx::CallLimit::item_bytes`]), and the
/// rows are as many as fit in the device's free memory (within `--gpu-memory-limit`), less
/// `headroom` of it and less what the VAE's calls add at their batch, at most `most`, rounded
/// down to a multiple of 16 (to an even count below 32). See [`auto_dit_rows`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AutoRows {
    /// Share of the free memory left free (fragmentation, cuDNN and cuBLAS workspaces, other
    /// processes): 0.2.
    pub headroom: f64,
    /// The most rows chosen: 1024 (512 already fill an H100/H200; more only grows the tail).
    pub most: usize,
    /// The free memory to plan with instead of the device's reading (tests).
    pub free_memory_bytes: Option<u64>,
}

impl Default for AutoRows {
    fn default() -> Self {
        AutoRows { headroom: 0.2, most: 1024, free_memory_bytes: None }
    }
}

/// What [`auto_dit_rows`] plans with, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Free memory on the device after the models loaded (CUDA: `nvidia-smi`'s `memory.free`;
    /// CPU: the kernel's `MemAvailable`).
    pub free: u64,
    /// `--gpu-memory-limit`, when given: the DiT's arena grows no further.
    pub limit: Option<u64>,
    /// Memory one DiT row takes (measured at load).
    pub dit_row: u64,
    /// What the VAE's calls take at their batch (encoder and decoder, measured at load).
    pub vae_calls: u64,
}

/// Rows per DiT call that fit `budget` with `auto`'s headroom: `(min(free, limit) × (1 −
/// headroom) − vae_calls) / dit_row`, clamped to 2..=`auto.most` and rounded down to a multiple
/// of 16 (an even count below 32, since a sample takes two rows). `None` when a row was not
/// measured (`dit_row` 0).
pub fn auto_dit_rows(budget: MemoryBudget, auto: AutoRows) -> Option<usize> {
    if budget.dit_row == 0 {
        return None;
    }
    let pool = budget.limit.map_or(budget.free, |limit| limit.min(budget.free));
    let usable = (pool as f64 * (1.0 - auto.headroom.clamp(0.0, 1.0))) as u64;
    let rows = usize::try_from(usable.saturating_sub(budget.vae_calls) / budget.dit_row).unwrap_or(usize::MAX);
    let rows = rows.clamp(2, auto.most.max(2));
    Some(if rows >= 32 { rows / 16 * 16 } else { rows / 2 * 2 })
}

/// What this process's memory cgroup may still take, where it has a limit (a Slurm job's
/// `--mem`, a container's): `memory.max − memory.current` (cgroup v2) or `memory.limit_in_bytes
/// − memory.usage_in_bytes` (v1) of the cgroup `/proc/self/cgroup` names; `None` without one.
fn cgroup_room() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let root = std::path::Path::new("/sys/fs/cgroup");
    let read = |dir: &std::path::Path, name: &str| {
        std::fs::read_to_string(dir.join(name)).ok().and_then(|v| v.trim().parse::<u64>().ok())
    };
    // v1 first: a hybrid host names its memory controller on a line of its own.
    if let Some(path) = own.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.trim())) {
        let dir = root.join("memory").join(path.trim_start_matches('/'));
        if let Some(limit) = read(&dir, "memory.limit_in_bytes") {
            // "no limit" is a page-rounded i64::MAX
            return (limit < 1 << 62).then(|| limit.saturating_sub(read(&dir, "memory.usage_in_bytes").unwrap_or(0)));
        }
    }
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let dir = root.join(path.trim_start_matches('/'));
    let max = read(&dir, "memory.max")?; // "max" (no limit) does not parse
    Some(max.saturating_sub(read(&dir, "memory.current").unwrap_or(0)))
}

/// Free memory on `device` in bytes: the CUDA card's (`nvidia-smi --query-gpu=memory.free`, the
/// card as `CUDA_VISIBLE_DEVICES` names it), or on the CPU the kernel's `MemAvailable`, within
/// the cgroup's memory limit ([`cgroup_room`]). `Err` says why it could not be read.
fn free_memory(device: Device) -> Result<u64, String> {
    match device {
        Device::Cuda(ordinal) => crate::cli::cuda_memory_bytes(ordinal, "memory.free"),
        Device::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
            let line = info
                .lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .ok_or_else(|| "/proc/meminfo has no MemAvailable line".to_owned())?;
            let available =
                line.trim().trim_end_matches("kB").trim().parse::<u64>().map(|kib| kib << 10).map_err(|_| {
                    format!("/proc/meminfo's MemAvailable line `{}` is not a number of kB", line.trim())
                })?;
            // A Slurm job or container is held to its cgroup's limit, whatever the node has free.
            Ok(cgroup_room().map_or(available, |room| room.min(available)))
        }
    }
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            session: SessionConfig::default(),
            policy: BatchPolicy::default(),
            vae_cuda: CudaTuning::VAE,
            overlap: true,
            auto_rows: None,
        }
    }
}

impl Runtime {
    /// `session` with one batch for all three models: `session.max_batch` DiT rows and VAE
    /// images (what a single `--max-batch` meant before the policy had a field per model).
    pub fn uniform(session: SessionConfig) -> Self {
        let n = session.max_batch.max(1);
        let policy = BatchPolicy { dit_rows: n, encode_images: n, decode_images: n, ..BatchPolicy::default() };
        Runtime { session, policy, vae_cuda: CudaTuning::VAE, overlap: true, auto_rows: None }
    }

    /// The shared session settings with `items` per call (and the memory per item measured at
    /// load when the DiT's rows are chosen then).
    fn with_batch(&self, items: usize) -> SessionConfig {
        SessionConfig {
            max_batch: items.max(1),
            measure_item_bytes: self.session.measure_item_bytes || self.auto_rows.is_some(),
            ..self.session.clone()
        }
    }

    /// The session settings of the DiT: `policy.dit_rows` rows per call, [`CudaTuning::DIT`].
    pub fn dit(&self) -> SessionConfig {
        SessionConfig { cuda: CudaTuning::DIT, ..self.with_batch(self.policy.dit_rows) }
    }

    /// The session settings of the VAE encoder: `policy.encode_images` per call, `vae_cuda`.
    pub fn encoder(&self) -> SessionConfig {
        SessionConfig { cuda: self.vae_cuda, ..self.with_batch(self.policy.encode_images) }
    }

    /// The session settings of the VAE decoder: `policy.decode_images` per call, `vae_cuda`.
    pub fn decoder(&self) -> SessionConfig {
        SessionConfig { cuda: self.vae_cuda, ..self.with_batch(self.policy.decode_images) }
    }
}

/// Sets the DiT's rows per call from the memory left after load ([`AutoRows`]) and says so in
/// one INFO line; where the free memory or a row's memory cannot be read it keeps the policy's
/// rows and says why at WARN (out-of-memory backoff still guards every call).
fn choose_dit_rows(dit: &mut Dit, encoder: &VaeEncoder, decoder: &VaeDecoder, runtime: &Runtime, auto: AutoRows) {
    let device = runtime.session.device;
    let free = match auto.free_memory_bytes.map(Ok).unwrap_or_else(|| free_memory(device)) {
        Ok(free) => free,
        Err(why) => {
            tracing::warn!(%device, rows = dit.call_limit().policy, %why,
                "cannot read the free memory to choose the DiT's rows per call; keeping {} (set --dit-rows to choose)",
                dit.call_limit().policy);
            return;
        }
    };
    let (e, v) = (encoder.call_limit(), decoder.call_limit());
    let budget = MemoryBudget {
        free,
        limit: runtime.session.gpu_memory_limit.filter(|_| device != Device::Cpu),
        dit_row: dit.call_limit().item_bytes,
        vae_calls: e.item_bytes * e.items as u64 + v.item_bytes * v.items as u64,
    };
    let Some(rows) = auto_dit_rows(budget, auto) else {
        tracing::warn!(%device, rows = dit.call_limit().policy,
            "could not measure the memory a DiT row takes (the arena keeps no statistics); keeping {} rows per call (set --dit-rows to choose)",
            dit.call_limit().policy);
        return;
    };
    dit.set_rows(rows);
    tracing::info!(%device, rows, free_bytes = free, dit_row_bytes = budget.dit_row, vae_call_bytes = budget.vae_calls,
        "DiT rows per call chosen from the free memory: {rows} ({} a row, measured at load; {} free{}, {:.0} % kept free, {} for the VAE's calls; 2 to {} rows)",
        bytes(budget.dit_row), bytes(free),
        budget.limit.map_or(String::new(), |l| format!(" within a --gpu-memory-limit of {}", bytes(l))),
        auto.headroom * 100.0, bytes(budget.vae_calls), auto.most);
    if rows < 32 {
        // Few rows leave the GPU mostly idle between calls: say what took the memory.
        let usable = (budget.limit.map_or(free, |l| l.min(free)) as f64 * (1.0 - auto.headroom)) as u64;
        tracing::warn!(%device, rows,
            "only {rows} DiT rows per call fit: the VAE's calls at their batch ({} images to encode, {} to decode) take {} of the {} usable; \
             lower --vae-batch (or --vae-encode-batch / --vae-decode-batch), free memory on the device, or set --dit-rows",
            e.items, v.items, bytes(budget.vae_calls), bytes(usable));
    }
}

/// `bytes` for a log line: in GiB from 1 GiB, else in MiB.
fn bytes(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// The three model files of a worker.
#[derive(Clone, Debug)]
pub struct ModelPaths {
    /// The DiT (`.onnx`).
    pub dit: PathBuf,
    /// The VAE encoder (`.onnx`).
    pub vae_encoder: PathBuf,
    /// The VAE decoder (`.onnx`).
    pub vae_decoder: PathBuf,
}

/// One class to distil: the class as a job names it ([`ClassRef`]: wnid, DiT label, index in
/// the job) and how many images to make of it. Dereferences to the [`ClassRef`].
#[derive(Clone, Debug)]
pub struct ClassSpec {
    /// The class.
    pub class: ClassRef,
    /// Images per class: the number of modes and of samples.
    pub ipc: usize,
}

impl ClassSpec {
    /// `class` at `ipc` images.
    pub fn new(class: ClassRef, ipc: usize) -> Self {
        ClassSpec { class, ipc }
    }
}

impl std::ops::Deref for ClassSpec {
    type Target = ClassRef;

    fn deref(&self) -> &ClassRef {
        &self.class
    }
}

/// Where one class's time went.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClassTimings {
    /// Seconds per stage (decode, encode, k-means, DiT, guidance, VAE decode, PNG): the same
    /// record a commit marker and the job manifest keep. Serialised flat, one field per stage.
    #[serde(flatten)]
    pub stages: StageSeconds,
    /// DiT calls made (each a batch of cond+uncond pairs).
    pub dit_calls: usize,
    /// Wall-clock seconds of sampling this class's images (its share of each DiT batch's run,
    /// by sample count). With two batches in flight the DiT and guidance times overlap, so this
    /// is less than their sum; `dit / sampling_wall` is the DiT's busy share.
    pub sampling_wall: f64,
    /// Real images of the class that were encoded (or whose cached latents were used).
    pub real_images: usize,
    /// The class's latents came from the latent cache (no decode, no VAE encode).
    pub latent_cache_hit: bool,
    /// The class's modes came from the latent cache (no k-means).
    pub modes_cache_hit: bool,
    /// The class's files had the names and sizes submit recorded but other versions
    /// ([`crate::data::check_unchanged`]).
    pub versions_changed: bool,
    /// What the class's listing left out (hidden entries, files that are not images).
    pub skipped: mgd3_common::imagefolder::Skipped,
}

impl ClassTimings {
    /// The sum of every stage's time.
    pub fn total(&self) -> Duration {
        let t = &self.stages;
        Duration::from_secs_f64(t.decode + t.encode + t.kmeans + t.dit + t.guidance + t.vae_decode + t.png)
    }

    /// Adds the time of one sampling run (DiT calls and the steps between them).
    pub fn add_sampling(&mut self, run: &crate::mgd3::sampler::SampleTimings) {
        self.stages.dit += run.model.as_secs_f64();
        self.stages.guidance += run.maths.as_secs_f64();
        self.sampling_wall += (run.model + run.maths).as_secs_f64();
        self.dit_calls += run.model_calls;
    }
}

/// The DiT behind the sampler's [`Denoiser`] trait.
pub struct DitDenoiser<'a>(pub &'a mut Dit);

impl Denoiser for DitDenoiser<'_> {
    fn predict(&mut self, x: ArrayView4<f32>, t: &[i64], y: &[i64]) -> Result<Array4<f32>, ModelError> {
        Ok(self.0.predict(x, t, y)?)
    }
}

/// On the CPU, refuses before any session is built the models ONNX Runtime's CPU provider cannot
/// run, saying what they are: a bf16 export ([`mgd3_onnx::Error::NeedsCuda`]), and the CUDA VAE
/// graphs ([`mgd3_onnx::Error::CudaGraph`], every such file at once). Nothing on CUDA. Models
/// whose metadata cannot be read are left to the loader's own error.
///
/// # Errors
/// [`EngineError::Model`] with one of those errors.
pub fn check_cpu_models(device: Device, paths: &[&std::path::Path]) -> Result<(), EngineError> {
    if device != Device::Cpu {
        return Ok(());
    }
    // ONNX Runtime's CPU provider would refuse a bf16 graph with "Could not find an
    // implementation for Add(14)", and the CUDA VAE graph's GroupNorm likewise; say what
    // it is, before any session is built.
    let mut cuda_graphs: Vec<(std::path::PathBuf, usize)> = Vec::new();
    for path in paths {
        let Ok(meta) = mgd3_common::modelmeta::read_model_meta(path) else { continue };
        match meta.cuda_only() {
            Some(CudaOnly::Bf16) => {
                return Err(EngineError::Model(mgd3_onnx::Error::NeedsCuda {
                    model: path.to_path_buf(),
                    precision: "bf16".to_owned(),
                }));
            }
            Some(CudaOnly::CudaGraph { group_norm }) => cuda_graphs.push((path.to_path_buf(), group_norm)),
            None => {}
        }
    }
    // Every such model named at once (`cuda-vae` writes both halves), each file once.
    cuda_graphs.dedup_by(|a, b| a.0 == b.0);
    if let Some(((model, group_norm), rest)) = cuda_graphs.split_first() {
        return Err(EngineError::Model(mgd3_onnx::Error::CudaGraph {
            model: model.clone(),
            group_norm: *group_norm,
            also: rest.iter().map(|(path, _)| path.clone()).collect(),
        }));
    }
    Ok(())
}

/// `sha256:<hex>` of each model file as loaded ([`mgd3_common::fingerprint_file`]): what a job
/// spec's `*_fingerprint` settings and the latent cache key compare against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelFingerprints {
    /// The DiT's fingerprint.
    pub dit: String,
    /// The VAE encoder's fingerprint.
    pub vae_encoder: String,
    /// The VAE decoder's fingerprint.
    pub vae_decoder: String,
}

/// The three ONNX networks of one worker, loaded and checked against each other, with their
/// fingerprints: the bottom layer of the worker. Batch operations only — no cancel flag, latent
/// cache, CPU pool or seed, which belong to a shard run ([`crate::pipeline::Engine`]).
pub struct Models {
    dit: Dit,
    encoder: VaeEncoder,
    decoder: VaeDecoder,
    fingerprints: ModelFingerprints,
}

/// What identifies a file's contents without reading them: device, inode, size, modification
/// and change times (the change time moves on every write, link or rename, and cannot be set).
type Identity = Option<(u64, u64, u64, i64, i64, i64, i64)>;

/// Every file of the three models: each model file and its external-data files (the model file
/// alone when they cannot be listed, which the load reports itself). A model replaced by one
/// naming other data files changes its own identity too.
fn model_file_list(paths: &ModelPaths) -> Vec<std::path::PathBuf> {
    [&paths.dit, &paths.vae_encoder, &paths.vae_decoder]
        .into_iter()
        .flat_map(|path| mgd3_common::modelmeta::model_files(path).unwrap_or_else(|_| vec![path.clone()]))
        .collect()
}

/// The identity of each of `files` (`None` for one that cannot be read).
fn identities(files: &[std::path::PathBuf]) -> Vec<Identity> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|file| {
            std::fs::metadata(file)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
        })
        .collect()
}

/// The first of `files` whose identity differs between two [`identities`] of them.
fn changed_file(files: &[std::path::PathBuf], before: &[Identity], after: &[Identity]) -> Option<std::path::PathBuf> {
    files.iter().zip(before.iter().zip(after)).find(|(_, (b, a))| b != a).map(|(file, _)| file.clone())
}

impl Models {
    /// Loads the three models, checks that the VAEs work on the DiT's latents with one scale
    /// factor, and fingerprints the model files (each with every external-data file it names).
    ///
    /// # Errors
    /// [`EngineError::MisplacedModels`] when files are given as models of another kind;
    /// [`EngineError::UnusableModels`] when files are no ONNX models or may not be read;
    /// [`EngineError::ModelContracts`] when more than one model does not fit the contract (one
    /// is [`EngineError::Model`]);
    /// [`EngineError::ModelFiles`] when a model's external-data files are not all there;
    /// [`EngineError::Model`] when a model cannot be loaded; [`EngineError::ModelSet`] for VAEs that
    /// do not fit the DiT or each other;
    /// [`EngineError::Fingerprint`] when a model file cannot be read.
    ///
    /// The fingerprints are of the files ONNX Runtime loaded: each file's identity (device,
    /// inode, size, modification and change times) is taken before the load and again after the
    /// fingerprints, and a load during which any changed (a model replaced, even by a link or a
    /// rename put back, or written in place) is done again, up to three times
    /// ([`EngineError::ModelsChanged`]): a job must never record one model's fingerprint over
    /// another's images.
    pub fn load(paths: &ModelPaths, runtime: &Runtime) -> Result<Self, EngineError> {
        const TRIES: usize = 3;
        let mut tries = 0;
        loop {
            tries += 1;
            let files = model_file_list(paths);
            let before = identities(&files);
            let models = Self::load_once(paths, runtime)?;
            match changed_file(&files, &before, &identities(&files)) {
                None => return Ok(models),
                Some(path) if tries >= TRIES => return Err(EngineError::ModelsChanged { path, tries }),
                Some(path) => {
                    tracing::warn!(model = %path.display(), "a model file changed while it was loaded: loading the models again");
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            }
        }
    }

    fn load_once(paths: &ModelPaths, runtime: &Runtime) -> Result<Self, EngineError> {
        let started = std::time::Instant::now();
        let read = check_model_kinds(&[
            ("dit", &paths.dit),
            ("vae_encoder", &paths.vae_encoder),
            ("vae_decoder", &paths.vae_decoder),
        ])?;
        check_cpu_models(runtime.session.device, &[&paths.dit, &paths.vae_encoder, &paths.vae_decoder])?;
        check_model_contracts(&read)?;
        for path in [&paths.dit, &paths.vae_encoder, &paths.vae_decoder] {
            match mgd3_common::modelmeta::model_files(path) {
                // The model file itself not there is the loader's ModelNotFound.
                Ok(_) => {}
                Err(mgd3_common::modelmeta::ModelFilesError::Io { path: file, .. }) if file == *path => {}
                Err(files) => return Err(EngineError::ModelFiles(files)),
            }
        }
        let mut dit = Dit::load(&paths.dit, &runtime.dit())?;
        let encoder = VaeEncoder::load(&paths.vae_encoder, &runtime.encoder())?;
        let decoder = VaeDecoder::load(&paths.vae_decoder, &runtime.decoder())?;
        if let Some(auto) = runtime.auto_rows {
            choose_dit_rows(&mut dit, &encoder, &decoder, runtime, auto);
        }
        let (d, e, v) = (dit.call_limit(), encoder.call_limit(), decoder.call_limit());
        tracing::info!(dit = %paths.dit.display(), classes = dit.info().num_classes, latent = ?dit.info().latent_shape,
        seconds = started.elapsed().as_secs_f64(),
        "models loaded: DiT {}; VAE encoder {}; VAE decoder {}; calls carry up to {} DiT rows, {} images to encode, {} to decode{}",
        dit.describe(), encoder.describe(), decoder.describe(), d.items, e.items, v.items,
        if (d.items, e.items, v.items) != (d.policy, e.policy, v.policy) {
            format!(" (the batch policy asked {} / {} / {}; the rest is the per-call element ceiling)", d.policy, e.policy, v.policy)
        } else {
            String::new()
        });
        if matches!(runtime.session.device, Device::Cuda(_)) && dit.graph() == Graph::Plain {
            tracing::info!(dit = %paths.dit.display(),
                "this DiT is the plain export: its attention runs as MatMul–Softmax–MatMul on the GPU; \
                 `scripts/export_onnx.py fuse` rewrites it with fused (flash) attention");
        }
        let mismatches = mgd3_onnx::contract::ModelSet {
            dit: (&paths.dit, dit.info()),
            encoder: (&paths.vae_encoder, encoder.info()),
            decoder: (&paths.vae_decoder, decoder.info()),
        }
        .mismatches();
        if !mismatches.is_empty() {
            return Err(EngineError::ModelSet(mismatches));
        }
        let fingerprint = |path: &std::path::Path| {
            mgd3_common::fingerprint_file(path)
                .map_err(|source| EngineError::Fingerprint { path: path.to_owned(), source })
        };
        let fingerprints = ModelFingerprints {
            dit: fingerprint(&paths.dit)?,
            vae_encoder: fingerprint(&paths.vae_encoder)?,
            vae_decoder: fingerprint(&paths.vae_decoder)?,
        };
        Ok(Models { dit, encoder, decoder, fingerprints })
    }

    /// The DiT.
    pub fn dit(&self) -> &Dit {
        &self.dit
    }

    /// The VAE encoder.
    pub fn encoder(&self) -> &VaeEncoder {
        &self.encoder
    }

    /// The VAE decoder.
    pub fn decoder(&self) -> &VaeDecoder {
        &self.decoder
    }

    /// Fingerprints of the loaded model files.
    pub fn fingerprints(&self) -> &ModelFingerprints {
        &self.fingerprints
    }

    /// Forgets every model's out-of-memory backoff (at the start of a shard).
    pub fn reset_backoff(&mut self) {
        self.dit.reset_backoff();
        self.encoder.reset_backoff();
        self.decoder.reset_backoff();
    }

    /// Encodes images `[n, c, S, S]` in `[-1, 1]` into scaled latents `[n, C, h, w]` (posterior
    /// mean × scale factor, as the reference).
    ///
    /// # Errors
    /// [`EngineError::NonFinite`] naming `class` and the image (`name(i)`) whose latent holds a NaN
    /// or an infinity; [`EngineError::Model`] when the encoder fails otherwise.
    pub fn encode(
        &mut self,
        class: &str,
        images: ArrayView4<f32>,
        name: impl Fn(usize) -> String,
    ) -> Result<Array4<f32>, EngineError> {
        let scale = self.encoder.info().scale_factor;
        let (mean, _logvar) = self.encoder.encode(images).map_err(|e| EngineError::naming_item(class, e, name))?;
        Ok(mean.mapv_into(|v| v * scale))
    }

    /// One sampling run on the DiT: see [`sample_run`].
    ///
    /// # Errors
    /// Those of [`sample_run`].
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &mut self,
        schedule: &Schedule,
        sampling: &SamplingSpec,
        labels: &[i64],
        modes: ArrayView4<f32>,
        noise: ArrayView5<f32>,
        rows: &mut Vec<usize>,
        stop_now: Option<&AtomicBool>,
        on_step: impl FnMut(usize, ArrayView4<f32>),
    ) -> Result<(Array4<f32>, crate::mgd3::sampler::SampleTimings), SampleError> {
        let model = denoiser_info(&self.dit);
        let mut denoiser = Stoppable { inner: Counted { inner: DitDenoiser(&mut self.dit), rows }, stop_now };
        sample_with(sampler_of(sampling), &mut denoiser, schedule, sampling, model, labels, modes, noise, on_step)
    }

    /// Two sampling runs in flight on the DiT: see [`sample_pair`].
    pub fn sample_pair(
        &mut self,
        schedule: &Schedule,
        sampling: &SamplingSpec,
        runs: [SampleInputs<'_>; 2],
        rows: &mut Vec<usize>,
        image_steps: &AtomicU64,
        stop_now: Option<&AtomicBool>,
    ) -> [Result<(Array4<f32>, crate::mgd3::sampler::SampleTimings), SampleError>; 2] {
        sample_pair(&mut self.dit, schedule, sampling, runs, rows, image_steps, stop_now)
    }

    /// [`sample_run`] in chunks, as a shard does: see [`sample_in_batches`].
    ///
    /// # Errors
    /// Those of [`sample_in_batches`].
    pub fn sample_in_batches(
        &mut self,
        schedule: &Schedule,
        sampling: &SamplingSpec,
        batch: SampleBatch<'_>,
        timings: &mut ClassTimings,
    ) -> Result<Array4<f32>, EngineError> {
        sample_in_batches(&mut self.dit, schedule, sampling, batch, timings)
    }

    /// VAE-decodes and PNG-encodes scaled latents: see [`decode_png`].
    ///
    /// # Errors
    /// Those of [`decode_png`].
    pub fn decode_png(
        &mut self,
        pool: &CpuPool,
        class: &str,
        latents: ArrayView4<f32>,
        timings: &mut ClassTimings,
    ) -> Result<(Vec<Vec<u8>>, Array4<f32>), EngineError> {
        decode_png(&mut self.decoder, pool, class, latents, timings)
    }

    /// Decodes scaled latents `[n, C, h, w]` into images `[n, c, S, S]` (the contact sheet's
    /// modes).
    ///
    /// # Errors
    /// [`EngineError::Model`] when the decoder fails or gives non-finite values.
    pub fn decode(&mut self, latents: ArrayView4<f32>) -> Result<Array4<f32>, EngineError> {
        let scale = self.decoder.info().scale_factor;
        Ok(self.decoder.decode(latents.mapv(|v| v / scale).view())?)
    }
}

/// The maths-side reverse step of `sampling` (`sampler` with its η).
pub fn sampler_of(sampling: &SamplingSpec) -> Sampler {
    Sampler::new(sampling.sampler, sampling.eta)
}

/// Checks guidance settings against the schedule and the latent channels.
///
/// # Errors
/// [`EngineError::Invalid`] when t_stop exceeds `steps`, `cfg_channels` exceeds `channels`, or λ
/// or the CFG scale is not finite.
pub fn check_guidance(guidance: &SamplingSpec, channels: usize) -> Result<(), EngineError> {
    if let Some(problem) = guidance.problems().into_iter().next() {
        return Err(problem.into());
    }
    if guidance.cfg_channels > channels {
        let problem = format!("{} exceeds the DiT's {channels} latent channels", guidance.cfg_channels);
        return Err(InvalidSetting::new(Setting::CfgChannels, guidance.cfg_channels, problem).into());
    }
    Ok(())
}

/// Samples of one sampling run, split into DiT calls of `samples_per_call` cond+uncond pairs.
pub struct SampleBatch<'a> {
    /// The class (wnid), for messages.
    pub class: &'a str,
    /// DiT label of each sample (n of them).
    pub labels: &'a [i64],
    /// Mode of each sample, `[n, C, h, w]` f32 in scaled latent space.
    pub modes: ArrayView4<'a, f32>,
    /// Noise of each sample, `[n, S+1, C, h, w]` f32: x_T first, then one draw per denoising step.
    pub noise: ArrayView5<'a, f32>,
    /// Samples per DiT call (each a cond+uncond pair); 0 counts as 1.
    pub samples_per_call: usize,
    /// Checked before every DiT batch.
    pub cancel: Option<&'a AtomicBool>,
    /// The reverse step; the schedule must be respaced for it.
    pub sampler: Sampler,
}

/// Records the rows of every DiT call.
struct Counted<'a> {
    inner: DitDenoiser<'a>,
    rows: &'a mut Vec<usize>,
}

impl Denoiser for Counted<'_> {
    fn predict(&mut self, x: ArrayView4<f32>, t: &[i64], y: &[i64]) -> Result<Array4<f32>, ModelError> {
        self.rows.push(x.shape()[0]);
        self.inner.predict(x, t, y)
    }
}

/// One sampling run, as every caller makes it — a shard's DiT batch (classes mixed), `worker
/// sample`, the benchmarks and the parity tests: `labels` `[n]`, `modes` `[n,C,h,w]` and `noise`
/// `[n,S+1,C,h,w]` (scaled latent space), one DiT call of n cond+uncond pairs per step with the
/// job's sampler. `rows` gets each call's row count, `on_step(k, x)` sees every x after step k.
/// Returns x₀ `[n,C,h,w]` and where the time went.
///
/// # Errors
/// Those of [`crate::mgd3::sampler::sample_with`], naming the sample by its row.
#[allow(clippy::too_many_arguments)]
pub fn sample_run(
    dit: &mut Dit,
    schedule: &Schedule,
    sampling: &SamplingSpec,
    labels: &[i64],
    modes: ArrayView4<f32>,
    noise: ArrayView5<f32>,
    rows: &mut Vec<usize>,
    on_step: impl FnMut(usize, ArrayView4<f32>),
) -> Result<(Array4<f32>, crate::mgd3::sampler::SampleTimings), SampleError> {
    let model = denoiser_info(dit);
    sample_with(
        sampler_of(sampling),
        &mut Counted { inner: DitDenoiser(dit), rows },
        schedule,
        sampling,
        model,
        labels,
        modes,
        noise,
        on_step,
    )
}

/// What a sampling run stopped by its stop flag fails with (as the [`SampleError::Model`] source):
/// the lease was revoked, so the rest of the trajectory would be discarded.
#[derive(Debug, Error)]
#[error("stopped before a DiT call: the lease was revoked")]
pub struct Stopped;

/// A denoiser that refuses its next call once `stop_now` is set ([`Stopped`]): a revoked shard
/// stops within one DiT call instead of at the end of its batch's trajectory. The sampler's
/// maths never sees the flag; it only sees a failed call.
struct Stoppable<'f, D> {
    inner: D,
    stop_now: Option<&'f AtomicBool>,
}

impl<D: Denoiser> Denoiser for Stoppable<'_, D> {
    fn predict(&mut self, x: ArrayView4<f32>, t: &[i64], y: &[i64]) -> Result<Array4<f32>, ModelError> {
        if self.stop_now.is_some_and(|stop| stop.load(Ordering::Relaxed)) {
            return Err(Box::new(Stopped));
        }
        self.inner.predict(x, t, y)
    }
}

/// What the sampler needs to know of the DiT: its null label and whether it predicts the variance.
fn denoiser_info(dit: &Dit) -> DenoiserInfo {
    let info = dit.info();
    DenoiserInfo { null_label: info.num_classes as i64, learn_sigma: info.learn_sigma }
}

/// The inputs of one sampling run: `labels` `[n]`, `modes` `[n,C,h,w]` and `noise`
/// `[n,S+1,C,h,w]` (scaled latent space).
#[derive(Clone, Copy)]
pub struct SampleInputs<'a> {
    /// DiT label of each sample.
    pub labels: &'a [i64],
    /// Mode of each sample.
    pub modes: ArrayView4<'a, f32>,
    /// x_T and one draw per denoising step of each sample.
    pub noise: ArrayView5<'a, f32>,
}

/// The DiT shared by two sampling runs on their own threads: a run holds it for one call, so
/// while one run's call computes, the other does its step maths and then waits for the DiT.
struct Turn<'s, 'd> {
    dit: &'s Mutex<&'d mut Dit>,
    /// Time inside the DiT's calls (the sampler's own model time also counts the waits).
    busy: Duration,
    rows: Vec<usize>,
}

impl Denoiser for Turn<'_, '_> {
    fn predict(&mut self, x: ArrayView4<f32>, t: &[i64], y: &[i64]) -> Result<Array4<f32>, ModelError> {
        // A poisoned lock means the other run panicked inside a call; the DiT itself is intact.
        let mut dit = self.dit.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let started = Instant::now();
        self.rows.push(x.shape()[0]);
        let out = dit.predict(x, t, y);
        self.busy += started.elapsed();
        Ok(out?)
    }
}

/// Two sampling runs ([`sample_run`]) in flight on one DiT, each on its own thread: the DiT
/// computes one run's step while the other run's step maths (the tested Rust step, unchanged)
/// runs, so neither the device nor the CPU waits for the other. Each run makes exactly the DiT
/// calls it would make alone (the calls are serialised by a lock), so the results are the same
/// bytes as two [`sample_run`]s one after the other. Each result's `model` time is the time
/// inside the DiT's calls; `rows` gets the first run's calls, then the second's; `image_steps`
/// counts each step's images as it ends (the shard's progress inside its classes).
pub fn sample_pair(
    dit: &mut Dit,
    schedule: &Schedule,
    sampling: &SamplingSpec,
    runs: [SampleInputs<'_>; 2],
    rows: &mut Vec<usize>,
    image_steps: &AtomicU64,
    stop_now: Option<&AtomicBool>,
) -> [Result<(Array4<f32>, crate::mgd3::sampler::SampleTimings), SampleError>; 2] {
    let model = denoiser_info(dit);
    let sampler = sampler_of(sampling);
    let dit = Mutex::new(dit);
    let run = |inputs: SampleInputs<'_>| {
        let mut turn = Stoppable { inner: Turn { dit: &dit, busy: Duration::ZERO, rows: Vec::new() }, stop_now };
        let result = sample_with(
            sampler,
            &mut turn,
            schedule,
            sampling,
            model,
            inputs.labels,
            inputs.modes,
            inputs.noise,
            |_, x| {
                image_steps.fetch_add(x.shape()[0] as u64, Ordering::Relaxed);
            },
        )
        .map(|(x, timings)| (x, crate::mgd3::sampler::SampleTimings { model: turn.inner.busy, ..timings }));
        (result, turn.inner.rows)
    };
    let [first, second] = runs;
    let ((a, rows_a), (b, rows_b)) = std::thread::scope(|scope| {
        let other = scope.spawn(|| run(second));
        let mine = run(first);
        (mine, other.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    });
    rows.extend(rows_a);
    rows.extend(rows_b);
    [a, b]
}

/// Runs [`sample_run`] over `batch` in chunks of `samples_per_call`, as a shard does; chunks are
/// independent, so the split changes no value. Returns x₀ `[n, C, h, w]` (scaled latents).
///
/// # Errors
/// [`EngineError::LabelCount`] when labels and modes differ in count; [`EngineError::Cancelled`]
/// when the cancel flag is set before a chunk; [`EngineError::Sample`] when the sampler fails.
pub fn sample_in_batches(
    dit: &mut Dit,
    schedule: &Schedule,
    guidance: &SamplingSpec,
    batch: SampleBatch<'_>,
    timings: &mut ClassTimings,
) -> Result<Array4<f32>, EngineError> {
    let n = batch.modes.shape()[0];
    if batch.labels.len() != n {
        return Err(EngineError::LabelCount { labels: batch.labels.len(), modes: n });
    }
    let mut parts = Vec::new();
    let mut rows = Vec::new();
    let mut from = 0;
    while from < n {
        if batch.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(EngineError::Cancelled);
        }
        let to = (from + batch.samples_per_call.max(1)).min(n);
        let (x, t) = sample_run(
            dit,
            schedule,
            guidance,
            &batch.labels[from..to],
            batch.modes.slice(s![from..to, .., .., ..]),
            batch.noise.slice(s![from..to, .., .., .., ..]),
            &mut rows,
            |_, _| {},
        )
        .map_err(|source| EngineError::Sample { class: batch.class.into(), source: source.offset_sample(from) })?;
        timings.add_sampling(&t);
        debug!(class = batch.class, samples = to - from, "sampled batch");
        parts.push(x);
        from = to;
    }
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    Ok(ndarray::concatenate(Axis(0), &views).expect("same shapes"))
}

/// VAE-decodes scaled latents `[n, C, h, w]` (÷ scale factor, as the reference) and PNG-encodes
/// each image on `pool`, as every caller does (a shard, `worker sample`, the parity tests).
/// Returns the PNGs (sample j at index j) and the decoded images `[n, c, S, S]`.
///
/// # Errors
/// [`EngineError::NonFinite`] naming `class` and the sample when the decoder gives a NaN or an
/// infinity; [`EngineError::Model`] when it fails otherwise; [`EngineError::Sink`] when PNG
/// encoding fails.
pub fn decode_png(
    decoder: &mut VaeDecoder,
    pool: &CpuPool,
    class: &str,
    latents: ArrayView4<f32>,
    timings: &mut ClassTimings,
) -> Result<(Vec<Vec<u8>>, Array4<f32>), EngineError> {
    use rayon::prelude::*;
    let started = Instant::now();
    let scale = decoder.info().scale_factor;
    let decoded = decoder
        .decode(latents.mapv(|v| v / scale).view())
        .map_err(|e| EngineError::naming_item(class, e, |j| format!("sample {j}")))?;
    let decoded_at = Instant::now();
    timings.stages.vae_decode += (decoded_at - started).as_secs_f64();
    let pngs = pool.install(|| {
        (0..decoded.shape()[0])
            .into_par_iter()
            .map(|i| png_bytes(decoded.index_axis(Axis(0), i)))
            .collect::<Result<Vec<_>, _>>()
    })?;
    timings.stages.png += decoded_at.elapsed().as_secs_f64();
    Ok((pngs, decoded))
}

/// The respaced DDPM schedule a DiT's metadata asks for.
///
/// # Errors
/// As [`schedule_for_sampler`].
pub fn schedule_for(dit: &Dit, steps: usize) -> Result<Schedule, EngineError> {
    schedule_for_sampler(dit, steps, Sampler::DDPM)
}

/// The schedule a DiT's metadata asks for, respaced for `sampler`.
///
/// # Errors
/// An unknown beta schedule in the metadata, or `steps` the sampler cannot respace to.
pub fn schedule_for_sampler(dit: &Dit, steps: usize, sampler: Sampler) -> Result<Schedule, EngineError> {
    let info = dit.info();
    let betas: BetaSchedule = info.beta_schedule.parse()?;
    Ok(Schedule::new(betas, info.train_timesteps, info.beta_start, info.beta_end, steps, sampler.respacing())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model replaced and put back while the worker loads (by links and renames, as a sync or
    /// a hand fix does) leaves the same path, inode, size and modification time: the change time
    /// still says so, and the load is done again rather than fingerprinting one file and having
    /// loaded another (a trial committed one model's images under the other's fingerprint).
    #[test]
    fn a_model_replaced_and_put_back_is_seen_as_changed() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.onnx"), dir.path().join("b.onnx"));
        std::fs::copy(fixtures.join("tiny_dit.onnx"), &a).unwrap();
        std::fs::copy(fixtures.join("tiny_vae_encoder.onnx"), &b).unwrap();
        let dit = dir.path().join("dit.onnx");
        std::fs::hard_link(&a, &dit).unwrap();
        let paths = ModelPaths {
            dit: dit.clone(),
            vae_encoder: fixtures.join("tiny_vae_encoder.onnx"),
            vae_decoder: fixtures.join("tiny_vae_decoder.onnx"),
        };
        let files = model_file_list(&paths);
        let before = identities(&files);
        assert_eq!(changed_file(&files, &before, &identities(&files)), None, "nothing changed");
        std::thread::sleep(std::time::Duration::from_millis(20));
        for with in [&b, &a] {
            let new = dir.path().join(".new");
            std::fs::hard_link(with, &new).unwrap();
            std::fs::rename(&new, &dit).unwrap();
        }
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&dit).unwrap().ino(), std::fs::metadata(&a).unwrap().ino(), "put back");
        assert_eq!(changed_file(&files, &before, &identities(&files)), Some(dit));
    }

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// Both VAE halves CUDA graphs on the CPU (as `cuda-vae` writes them): one error names both
    /// files, and a file given twice once. (A decoder stands in for the encoder half: the check
    /// reads no kind.)
    #[test]
    fn cuda_graphs_on_the_cpu_are_all_named_at_once() {
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/tiny_vae_decoder_cuda.onnx");
        let dir = tempfile::tempdir().unwrap();
        let (encoder, decoder) = (dir.path().join("enc_cuda.onnx"), dir.path().join("dec_cuda.onnx"));
        for copy in [&encoder, &decoder] {
            std::fs::copy(&fixture, copy).unwrap();
        }
        let error = check_cpu_models(Device::Cpu, &[&encoder, &decoder, &decoder]).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("enc_cuda.onnx` is the CUDA graph of a VAE") && text.contains("those VAE halves"),
            "{text}"
        );
        assert_eq!(text.matches("dec_cuda.onnx").count(), 1, "{text}");
        assert!(check_cpu_models(Device::Cuda(0), &[&encoder, &decoder]).is_ok());
    }

    #[test]
    fn auto_rows_fit_the_free_memory_with_headroom() {
        let auto = AutoRows::default();
        // 70 GiB free, 100 MiB a row, no VAE: 0.8 × 70 GiB / 100 MiB = 573.4 → 560 (a multiple of 16).
        let budget = MemoryBudget { free: 70 * GIB, limit: None, dit_row: 100 * MIB, vae_calls: 0 };
        assert_eq!(auto_dit_rows(budget, auto), Some(560));
        // The VAE's calls come off first: 0.8 × 70 GiB − 16 GiB = 40 GiB → 409.6 → 400.
        assert_eq!(auto_dit_rows(MemoryBudget { vae_calls: 16 * GIB, ..budget }, auto), Some(400));
        // --gpu-memory-limit below the free memory is the pool: 0.8 × 20 GiB / 100 MiB = 163.8 → 160.
        assert_eq!(auto_dit_rows(MemoryBudget { limit: Some(20 * GIB), ..budget }, auto), Some(160));
        // … and above it, the free memory still is.
        assert_eq!(auto_dit_rows(MemoryBudget { limit: Some(200 * GIB), ..budget }, auto), Some(560));
        // At most `most`; an even count below 32; at least 2, even when nothing fits (out-of-memory
        // backoff then halves to 1).
        assert_eq!(auto_dit_rows(MemoryBudget { dit_row: MIB, ..budget }, auto), Some(1024));
        assert_eq!(auto_dit_rows(MemoryBudget { free: 27 * 5 * MIB, dit_row: 4 * MIB, ..budget }, auto), Some(26));
        assert_eq!(auto_dit_rows(MemoryBudget { free: GIB, vae_calls: 2 * GIB, ..budget }, auto), Some(2));
        // A row that was not measured chooses nothing.
        assert_eq!(auto_dit_rows(MemoryBudget { dit_row: 0, ..budget }, auto), None);
        // No headroom, a smaller cap.
        let tight = AutoRows { headroom: 0.0, most: 256, ..auto };
        assert_eq!(auto_dit_rows(MemoryBudget { free: 10 * GIB, ..budget }, tight), Some(96));
        assert_eq!(auto_dit_rows(budget, tight), Some(256));
    }

    #[test]
    fn the_free_memory_of_the_cpu_is_read_from_the_kernel() {
        let free = free_memory(Device::Cpu).unwrap();
        assert!(free > 16 * MIB, "{free}");
    }
}
