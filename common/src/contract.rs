//! The mgd3 model contract, without ONNX Runtime: the input/output names, element types, ranks and
//! `mgd3.*` metadata each of the three models must declare, and what a model that fits declares
//! about itself ([`DitInfo`], [`VaeInfo`]).
//!
//! One set of rules, two readers: the worker checks the view ONNX Runtime gives of a loaded session
//! (`mgd3_onnx`), and the coordinator checks the view [`crate::modelmeta::read_model_meta`] reads
//! from the file at submit, so a file that does not fit is refused with the same words before any
//! GPU is spent, not at every worker's first attempt.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A model's declarations do not fit the contract: which file, which input, output or metadata
/// key, what the contract asks for and what the file declares.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("model `{}` does not fit the mgd3 contract: {item}: expected {expected}, found {found}", .model.display())]
pub struct ContractViolation {
    /// The model file.
    pub model: PathBuf,
    /// The input, output or metadata key concerned (``input `x` ``, ``metadata `mgd3.kind` ``).
    pub item: String,
    /// What the contract asks for.
    pub expected: String,
    /// What the model declares.
    pub found: String,
}

/// Which graph a model file holds (`mgd3.graph`, written by `scripts/export_onnx.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Graph {
    /// The graph `torch.onnx.export` writes: attention as MatMul–Softmax–MatMul.
    Plain,
    /// Attention, GELU and LayerNorm as ONNX Runtime's fused operators; `attention` is the
    /// number of fused attention nodes the export counted (`mgd3.fused_attention`).
    Fused {
        /// Fused attention nodes, when the metadata says.
        attention: Option<usize>,
    },
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Graph::Plain => f.write_str("plain graph"),
            Graph::Fused { attention: Some(1) } => f.write_str("fused graph (1 fused attention)"),
            Graph::Fused { attention: Some(n) } => write!(f, "fused graph ({n} fused attentions)"),
            Graph::Fused { attention: None } => f.write_str("fused graph"),
        }
    }
}

/// The oldest ONNX Runtime the workers accept (`mgd3_onnx::session::REQUIRED_ORT`).
pub const REQUIRED_ORT: &str = "1.26";

/// The newest ONNX IR version [`REQUIRED_ORT`] reads, as it says when it refuses a newer one
/// ("Unsupported model IR version: 99, max supported IR version: 13"); newer runtimes read more.
pub const REQUIRED_ORT_MAX_IR: u64 = 13;

/// The newest `ai.onnx` operator set [`REQUIRED_ORT`] loads, as it says when it refuses a newer
/// one ("Current official support for domain ai.onnx is till opset 26"); newer runtimes load more.
pub const REQUIRED_ORT_MAX_OPSET: u64 = 26;

/// Element types the contract allows for float tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// float32 tensors.
    F32,
    /// float16 tensors; f32 inputs are cast at the boundary and outputs cast back.
    F16,
}

/// The element type of a declared input or output: ONNX's `TensorProto.DataType`, with the
/// ones the contract names spelled out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Element {
    /// float32 (`FLOAT`, 1).
    Float32,
    /// float16 (`FLOAT16`, 10).
    Float16,
    /// bfloat16 (`BFLOAT16`, 16).
    Bfloat16,
    /// float64 (`DOUBLE`, 11).
    Float64,
    /// int32 (`INT32`, 6).
    Int32,
    /// int64 (`INT64`, 7).
    Int64,
    /// Not a tensor (a sequence, a map, an optional).
    NotATensor,
    /// Any other `TensorProto.DataType`, by its number.
    Other(i32),
}

impl Element {
    /// The element type of ONNX's `TensorProto.DataType` number `code`.
    pub fn from_onnx(code: i32) -> Self {
        match code {
            1 => Element::Float32,
            10 => Element::Float16,
            16 => Element::Bfloat16,
            11 => Element::Float64,
            6 => Element::Int32,
            7 => Element::Int64,
            other => Element::Other(other),
        }
    }
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Element::Float32 => f.write_str("f32"),
            Element::Float16 => f.write_str("f16"),
            Element::Bfloat16 => f.write_str("bf16"),
            Element::Float64 => f.write_str("f64"),
            Element::Int32 => f.write_str("int32"),
            Element::Int64 => f.write_str("int64"),
            Element::NotATensor => f.write_str("not a tensor"),
            Element::Other(code) => write!(f, "ONNX data type {code}"),
        }
    }
}

/// One input or output as the model declares it; dynamic dimensions are `-1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDecl {
    /// The input or output name.
    pub name: String,
    /// Element type.
    pub element: Element,
    /// Declared dimensions, `-1` where dynamic (symbolic or absent).
    pub dims: Vec<i64>,
}

impl fmt::Display for TensorDecl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.dims.iter().map(|d| if *d < 0 { "?".into() } else { d.to_string() }).collect();
        write!(f, "{} [{}]", self.element, dims.join(","))
    }
}

/// Everything the contract checks of one model file: its graph inputs and outputs and its custom
/// metadata (`mgd3.*` keys written by `scripts/export_onnx.py`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelIo {
    /// The model file, named in every contract error.
    pub path: PathBuf,
    /// The graph inputs, in declaration order (weights ONNX Runtime does not take as inputs are
    /// not among them).
    pub inputs: Vec<TensorDecl>,
    /// The graph outputs, in declaration order.
    pub outputs: Vec<TensorDecl>,
    /// The model's custom metadata, key → value.
    pub metadata: BTreeMap<String, String>,
    /// The ONNX IR version the file declares (`ModelProto.ir_version`), when read from the file;
    /// ONNX Runtime does not report it for a loaded session.
    pub ir_version: Option<u64>,
    /// The operator sets the file imports, domain (`""` is the default `ai.onnx`) → version,
    /// when read from the file.
    pub opsets: BTreeMap<String, u64>,
    /// The embedding tables the input `y` indexes (see [`LabelTable`]), when read from the file
    /// (`None` from a loaded session: ONNX Runtime does not report initializers); empty when the
    /// graph has no `Gather` on `y` whose table is a constant.
    pub label_tables: Option<Vec<LabelTable>>,
    /// Operators the graph's nodes use from domains ONNX Runtime does not have
    /// ([`ORT_DOMAINS`]) and the model defines no function in: domain → op types. mgd3's
    /// workers load no custom-operator library, so no worker can load such a model. Empty
    /// from a loaded session (which had them all).
    pub foreign_ops: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// The op types of the graph's nodes in the default domain (`""` or `ai.onnx`), when read
    /// from the file: [`ModelIo::graph_violations`] holds them against what ONNX defines at the
    /// model's opset ([`crate::onnx_ops`]). Empty from a loaded session (which had them all).
    pub default_ops: std::collections::BTreeSet<String>,
    /// Names a node of the graph reads, or the graph outputs, that are no graph input,
    /// initializer or node output (in the order met, each once), when read from the file: ONNX
    /// Runtime refuses such a graph ("Node input 'x' is not a graph input, initializer, or output
    /// of a previous node"). Empty from a loaded session.
    pub unresolved: Vec<String>,
}

/// The operator domains ONNX Runtime's CPU and CUDA builds register kernels or schemas in
/// (`onnxruntime/core/graph/constants.h`): a node of another domain loads only with a custom
/// operator library, or as a function its model defines.
pub const ORT_DOMAINS: [&str; 11] = [
    "",
    "ai.onnx",
    "ai.onnx.ml",
    "ai.onnx.training",
    "ai.onnx.preview.training",
    "com.microsoft",
    "com.microsoft.nchwc",
    "com.microsoft.experimental",
    "com.microsoft.dml",
    "com.ms.internal.nhwc",
    "org.pytorch.aten",
];

/// A class embedding table as the file stores it: the data of a `Gather` whose indices are the
/// graph input `y` (through casts and reshapes), traced back (through casts) to an initializer or
/// a `Constant`. DiT's `LabelEmbedder` has `num_classes + 1` rows, the last one the null class
/// classifier-free guidance samples with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelTable {
    /// The initializer's or constant's name (`y_embedder.embedding_table.weight`).
    pub name: String,
    /// Its first dimension: the labels it has a row for.
    pub rows: u64,
}

impl ModelIo {
    /// Every reason ONNX Runtime would refuse to load this graph that the file shows without
    /// loading it: [`ModelIo::foreign_op_violations`], [`ModelIo::default_op_violation`] and
    /// [`ModelIo::unresolved_violation`]. `check`/`submit` and the workers refuse a model with
    /// any, naming them all, instead of each worker excluding itself over it in turn.
    pub fn graph_violations(&self) -> Vec<ContractViolation> {
        let mut violations = self.foreign_op_violations();
        violations.extend(self.default_op_violation());
        violations.extend(self.unresolved_violation());
        violations
    }

    /// The default-domain operators ONNX does not define at the opset the model imports: no
    /// such operator (a typo, a custom op exported without a domain), first defined in a later
    /// opset, or deprecated at this one (`Upsample` past opset 9, say). `None` when all are
    /// defined, when the model imports no default-domain opset (ONNX Runtime then assumes its
    /// newest) or when its opset is newer than the table ([`crate::onnx_ops::ONNX_OPS_MAX_OPSET`]).
    pub fn default_op_violation(&self) -> Option<ContractViolation> {
        use crate::onnx_ops::{ONNX_OPS, ONNX_OPS_MAX_OPSET};
        let opset = *self.opsets.get("").or_else(|| self.opsets.get("ai.onnx"))?;
        if opset > ONNX_OPS_MAX_OPSET {
            return None;
        }
        let problems: Vec<String> = self
            .default_ops
            .iter()
            .filter_map(|op| {
                let shown = op.escape_debug();
                let Ok(at) = ONNX_OPS.binary_search_by(|(name, _)| name.as_bytes().cmp(op.as_bytes())) else {
                    return Some(format!("`{shown}` (no such ONNX operator)"));
                };
                let history = ONNX_OPS[at].1;
                match history.iter().rev().find(|(since, _)| *since <= opset) {
                    None => Some(format!("`{shown}` (first defined in opset {})", history[0].0)),
                    Some((since, true)) => Some(format!("`{shown}` (deprecated since opset {since})")),
                    Some(_) => None,
                }
            })
            .collect();
        if problems.is_empty() {
            return None;
        }
        Some(self.violation(
            format!("operators of the default ONNX domain (the model imports opset {opset})"),
            "operators ONNX defines at that opset",
            format!(
                "{}: ONNX Runtime would refuse the model on every worker; export it again \
                 (scripts/export_onnx.py), with a custom operator in its own domain",
                problems.join(", ")
            ),
        ))
    }

    /// The graph's reads of names nothing defines ([`ModelIo::unresolved`]), as one violation
    /// naming the first few.
    pub fn unresolved_violation(&self) -> Option<ContractViolation> {
        const SHOWN: usize = 5;
        if self.unresolved.is_empty() {
            return None;
        }
        let mut names: Vec<String> =
            self.unresolved.iter().take(SHOWN).map(|n| format!("`{}`", n.escape_debug())).collect();
        if self.unresolved.len() > SHOWN {
            names.push(format!("and {} more", self.unresolved.len() - SHOWN));
        }
        Some(self.violation(
            "graph wiring",
            "every name a node reads, and every graph output, to be a graph input, an initializer or a node's output",
            format!(
                "{} defined nowhere (a graph edited or cut short?): ONNX Runtime would refuse the model on every \
                 worker; export it again",
                names.join(", ")
            ),
        ))
    }

    /// One violation per domain of [`ModelIo::foreign_ops`]: operators no mgd3 worker can load
    /// (ONNX Runtime has no kernels for them and the workers load no custom-operator library).
    pub fn foreign_op_violations(&self) -> Vec<ContractViolation> {
        self.foreign_ops
            .iter()
            .map(|(domain, ops)| {
                self.violation(
                    format!(
                        "operators of domain `{}` ({})",
                        domain.escape_debug(),
                        ops.iter().map(|op| op.escape_debug().to_string()).collect::<Vec<_>>().join(", ")
                    ),
                    "operators ONNX Runtime has (mgd3 workers load no custom-operator library)",
                    "a domain ONNX Runtime does not have and the model defines no function in: no worker can load it; \
                     export it with scripts/export_onnx.py",
                )
            })
            .collect()
    }

    /// A metadata value trimmed and parsed, when present and well-formed (lenient: for checks
    /// that look at what is there; [`ModelIo::meta`] is the contract's strict reading).
    pub fn get<T: FromStr>(&self, key: &str) -> Option<T> {
        self.metadata.get(key).and_then(|v| v.trim().parse().ok())
    }

    /// The input called `name`, if declared.
    pub fn input(&self, name: &str) -> Option<&TensorDecl> {
        self.inputs.iter().find(|d| d.name == name)
    }

    fn violation(
        &self,
        item: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> ContractViolation {
        ContractViolation {
            model: self.path.clone(),
            item: item.into(),
            expected: expected.into(),
            found: found.into(),
        }
    }

    fn find<'a>(&'a self, list: &'a [TensorDecl], kind: &str, name: &str) -> Result<&'a TensorDecl, ContractViolation> {
        list.iter().find(|d| d.name == name).ok_or_else(|| {
            let names: Vec<&str> = list.iter().map(|d| d.name.as_str()).collect();
            self.violation(format!("{kind} `{name}`"), "to exist", format!("{kind}s {names:?}"))
        })
    }

    /// A float input or output of rank 4 whose non-batch dimensions are fixed; returns its
    /// precision and its `[C, H, W]`. `layout` describes the tensor in messages.
    ///
    /// # Errors
    /// [`ContractViolation`] when the tensor is missing, not f32 or f16, or not rank 4 with C, H
    /// and W fixed.
    pub fn image_like(
        &self,
        output: bool,
        name: &str,
        layout: &str,
    ) -> Result<(Precision, [usize; 3]), ContractViolation> {
        let (list, kind) = if output { (&self.outputs, "output") } else { (&self.inputs, "input") };
        let decl = self.find(list, kind, name)?;
        let item = format!("{kind} `{name}`");
        let precision = match decl.element {
            Element::Float32 => Precision::F32,
            Element::Float16 => Precision::F16,
            _ => return Err(self.violation(&item, format!("f32 or f16 {layout}"), decl.to_string())),
        };
        if decl.dims.len() != 4 || decl.dims[1..].iter().any(|d| *d <= 0) {
            return Err(self.violation(
                &item,
                format!("rank 4 {layout} with C, H, W fixed at export (batch may be dynamic)"),
                decl.to_string(),
            ));
        }
        let d = &decl.dims;
        Ok((precision, [d[1] as usize, d[2] as usize, d[3] as usize]))
    }

    /// An int64 input of rank 1 (one value per batch item); `meaning` describes it in messages.
    ///
    /// # Errors
    /// [`ContractViolation`] when the input is missing or not int64 of rank 1.
    pub fn int_vector(&self, name: &str, meaning: &str) -> Result<(), ContractViolation> {
        let decl = self.find(&self.inputs, "input", name)?;
        if decl.element != Element::Int64 || decl.dims.len() != 1 {
            return Err(self.violation(format!("input `{name}`"), format!("int64 [B] ({meaning})"), decl.to_string()));
        }
        Ok(())
    }

    /// Metadata value `key`, trimmed and parsed; `expected` describes it in messages.
    ///
    /// # Errors
    /// [`ContractViolation`] when the key is missing or its value does not parse.
    pub fn meta<T: FromStr>(&self, key: &str, expected: &str) -> Result<T, ContractViolation> {
        let raw = self.metadata.get(key).ok_or_else(|| {
            self.violation(format!("metadata `{key}`"), expected, "nothing (export with scripts/export_onnx.py)")
        })?;
        raw.trim().parse().map_err(|_| self.violation(format!("metadata `{key}`"), expected, format!("{raw:?}")))
    }

    /// Which graph `scripts/export_onnx.py` wrote (`mgd3.graph`; exports that predate it are
    /// plain).
    pub fn graph(&self) -> Graph {
        match self.metadata.get("mgd3.graph").map(|g| g.trim()) {
            Some("fused") => Graph::Fused {
                attention: self.metadata.get("mgd3.fused_attention").and_then(|n| n.trim().parse().ok()),
            },
            _ => Graph::Plain,
        }
    }

    /// Checks that metadata `mgd3.kind` is `kind` (`dit`, `vae_encoder`, `vae_decoder`).
    ///
    /// # Errors
    /// [`ContractViolation`] when the key is missing or names another kind.
    pub fn expect_kind(&self, kind: &str) -> Result<(), ContractViolation> {
        let found: String = self.meta("mgd3.kind", kind)?;
        if found != kind {
            return Err(self.violation("metadata `mgd3.kind`", kind, found));
        }
        Ok(())
    }

    /// Boolean metadata value `key`: `true`/`1` or `false`/`0`, case-insensitive.
    ///
    /// # Errors
    /// [`ContractViolation`] when the key is missing or holds anything else.
    pub fn bool_meta(&self, key: &str) -> Result<bool, ContractViolation> {
        let raw: String = self.meta(key, "true or false")?;
        match raw.to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(self.violation(format!("metadata `{key}`"), "true or false", raw)),
        }
    }
}

/// Why ONNX Runtime runs a model on CUDA only: its CPU provider has no kernels for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaOnly {
    /// A bf16 export (`mgd3.precision = bf16`).
    Bf16,
    /// The CUDA graph of a VAE (`export_onnx.py cuda-vae`: `mgd3.cuda_only = 1`) with its fused
    /// GroupNorms (`mgd3.group_norm`).
    CudaGraph {
        /// Fused GroupNorms, 0 when the metadata does not say.
        group_norm: usize,
    },
}

impl ModelIo {
    /// Whether, by its metadata, this model runs on CUDA only ([`CudaOnly`]); `None` for a model
    /// the CPU runs.
    pub fn cuda_only(&self) -> Option<CudaOnly> {
        let value = |key: &str| self.metadata.get(key).map(|v| v.trim());
        if value("mgd3.precision") == Some("bf16") {
            return Some(CudaOnly::Bf16);
        }
        (value("mgd3.cuda_only") == Some("1"))
            .then(|| CudaOnly::CudaGraph { group_norm: self.get("mgd3.group_norm").unwrap_or(0) })
    }
}

/// What the DiT declares about itself (shapes and `mgd3.*` metadata).
#[derive(Clone, Debug, PartialEq)]
pub struct DitInfo {
    /// Latent shape `[C, h, w]`.
    pub latent_shape: [usize; 3],
    /// Real classes; label `num_classes` is the null (unconditional) class.
    pub num_classes: usize,
    /// Output carries the variance interpolation channels (2C channels).
    pub learn_sigma: bool,
    /// Training diffusion timesteps T (`mgd3.train_timesteps`, 1000 for DiT); `t` lies in 0..T.
    pub train_timesteps: usize,
    /// Name of the training beta schedule (`mgd3.beta_schedule`, `linear` for DiT).
    pub beta_schedule: String,
    /// First training β (`mgd3.beta_start`, 0.0001 for DiT).
    pub beta_start: f64,
    /// Last training β (`mgd3.beta_end`, 0.02 for DiT).
    pub beta_end: f64,
    /// Element type of `x` (and so of every float tensor the wrapper feeds it).
    pub precision: Precision,
}

impl DitInfo {
    /// Checks a DiT's declarations against the contract: `mgd3.kind = dit`; input `x` f32/f16
    /// `[B,C,h,w]`; inputs `t` (original timesteps) and `y` (labels, null class = num_classes)
    /// int64 `[B]`; output `out` `[B,2C,h,w]` with `mgd3.learn_sigma` true, `[B,C,h,w]` without;
    /// `mgd3.num_classes` and `mgd3.train_timesteps` positive integers, `mgd3.beta_schedule`
    /// `linear`, and 0 < `mgd3.beta_start` ≤ `mgd3.beta_end` < 1.
    ///
    /// # Errors
    /// [`ContractViolation`] for the first declaration that does not fit.
    pub fn from_io(io: &ModelIo) -> Result<Self, ContractViolation> {
        io.expect_kind("dit")?;
        let (precision, latent_shape) = io.image_like(false, "x", "latent [B,C,h,w]")?;
        io.int_vector("t", "original diffusion timestep per item")?;
        io.int_vector("y", "class label per item, null class = num_classes")?;
        let learn_sigma = io.bool_meta("mgd3.learn_sigma")?;
        let (_, out_shape) = io.image_like(true, "out", "prediction [B,2C,h,w] or [B,C,h,w]")?;
        let [c, h, w] = latent_shape;
        let want = [if learn_sigma { 2 * c } else { c }, h, w];
        if out_shape != want {
            return Err(io.violation(
                "output `out`",
                format!(
                    "[B,{},{},{}] (from input `x` [B,{c},{h},{w}] and learn_sigma={learn_sigma}: the two must agree)",
                    want[0], want[1], want[2]
                ),
                format!("[B,{},{},{}]", out_shape[0], out_shape[1], out_shape[2]),
            ));
        }
        let num_classes: usize = io.meta("mgd3.num_classes", "a positive integer")?;
        if num_classes == 0 {
            return Err(io.violation("metadata `mgd3.num_classes`", "a positive integer", "0"));
        }
        // The metadata against the weights: with more classes declared than the table holds,
        // ONNX Runtime's CUDA Gather reads past the table without an error (its CPU one
        // refuses), and with fewer, the "null" label is a real class's row — either way CFG
        // would silently sample something else.
        if let Some(table) = io.label_tables.iter().flatten().find(|t| t.rows != num_classes as u64 + 1) {
            return Err(io.violation(
                format!("metadata `mgd3.num_classes` = {num_classes}"),
                format!(
                    "the class embedding `{}` to hold {} rows ({num_classes} classes and the null class)",
                    table.name,
                    num_classes + 1
                ),
                format!(
                    "{} rows: {}; export it again with scripts/export_onnx.py dit, which reads the classes from the checkpoint",
                    table.rows,
                    match table.rows {
                        0 => "an empty table".to_owned(),
                        rows => format!("{} classes and the null class", rows - 1),
                    }
                ),
            ));
        }
        let train_timesteps: usize = io.meta("mgd3.train_timesteps", "a positive integer")?;
        if train_timesteps == 0 {
            return Err(io.violation("metadata `mgd3.train_timesteps`", "a positive integer (1000 for DiT)", "0"));
        }
        // The only schedule the sampler implements (DiT's, as ADM's `get_named_beta_schedule`).
        let beta_schedule: String = io.meta("mgd3.beta_schedule", "linear")?;
        if beta_schedule.trim() != "linear" {
            return Err(io.violation(
                "metadata `mgd3.beta_schedule`",
                "linear (the only schedule mgd3 samples)",
                beta_schedule,
            ));
        }
        let beta_start: f64 = io.meta("mgd3.beta_start", "a float like 0.0001")?;
        let beta_end: f64 = io.meta("mgd3.beta_end", "a float like 0.02")?;
        if !(beta_start > 0.0 && beta_start <= beta_end && beta_end < 1.0) {
            return Err(io.violation(
                "metadata `mgd3.beta_start` and `mgd3.beta_end`",
                "0 < beta_start <= beta_end < 1 (0.0001 and 0.02 for DiT)",
                format!("{beta_start} and {beta_end}"),
            ));
        }
        Ok(DitInfo {
            latent_shape,
            num_classes,
            learn_sigma,
            train_timesteps,
            beta_schedule: beta_schedule.trim().to_owned(),
            beta_start,
            beta_end,
            precision,
        })
    }
}

/// Shapes and metadata of one VAE half.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeInfo {
    /// Image shape `[c, S, S]` (c = 3 RGB or 1 grayscale).
    pub image_shape: [usize; 3],
    /// Latent shape `[C, h, w]`.
    pub latent_shape: [usize; 3],
    /// Multiplier from VAE latents to diffusion latents (0.18215 for SD VAEs).
    pub scale_factor: f32,
    /// Element type of the half's input (and so of every float tensor the wrapper feeds it).
    pub precision: Precision,
}

fn check_image_channels(io: &ModelIo, shape: [usize; 3], item: &str) -> Result<(), ContractViolation> {
    if !(shape[0] == 1 || shape[0] == 3) || shape[1] != shape[2] {
        return Err(io.violation(
            item,
            "[B,c,S,S] with c = 1 or 3",
            format!("[B,{},{},{}]", shape[0], shape[1], shape[2]),
        ));
    }
    Ok(())
}

/// `mgd3.scale_factor`: a positive float between 1e-4 and 1e4 (0.18215 for SD's VAE). A zero,
/// negative, NaN or absurd factor would not fail a run: it would collapse or flip every latent
/// and sample garbage.
fn scale_factor(io: &ModelIo) -> Result<f32, ContractViolation> {
    // VAEs' factors lie near 0.1–1 (SD 0.18215, SDXL 0.13025); a factor far outside would scale
    // latents to nothing or to infinity before any step fails.
    let expected = "a positive float like 0.18215 (between 0.0001 and 10000)";
    let raw = io.metadata.get("mgd3.scale_factor").map(|v| v.trim().to_owned());
    let factor: f32 = io.meta("mgd3.scale_factor", expected)?;
    if !(factor.is_finite() && (1e-4..=1e4).contains(&factor)) {
        return Err(io.violation("metadata `mgd3.scale_factor`", expected, format!("{:?}", raw.unwrap_or_default())));
    }
    Ok(factor)
}

impl VaeInfo {
    /// Checks a VAE encoder's declarations against the contract: `mgd3.kind = vae_encoder`; input
    /// `image` f32/f16 `[B,c,S,S]` (c = 1 or 3); outputs `mean` and `logvar` `[B,C,h,w]`, the same
    /// shape; `mgd3.image_size` = S; `mgd3.scale_factor` a positive float.
    ///
    /// # Errors
    /// [`ContractViolation`] for the first declaration that does not fit.
    pub fn encoder_from_io(io: &ModelIo) -> Result<Self, ContractViolation> {
        io.expect_kind("vae_encoder")?;
        let (precision, image_shape) = io.image_like(false, "image", "image [B,c,S,S] in [-1,1]")?;
        check_image_channels(io, image_shape, "input `image`")?;
        let (_, latent_shape) = io.image_like(true, "mean", "posterior mean [B,C,h,w]")?;
        let (_, logvar_shape) = io.image_like(true, "logvar", "posterior log-variance [B,C,h,w]")?;
        if logvar_shape != latent_shape {
            return Err(io.violation(
                "output `logvar`",
                format!("{latent_shape:?} like `mean`"),
                format!("{logvar_shape:?}"),
            ));
        }
        let image_size: usize = io.meta("mgd3.image_size", "the image side S")?;
        if image_size != image_shape[1] {
            return Err(io.violation(
                "metadata `mgd3.image_size`",
                format!("{} (the side of input `image`)", image_shape[1]),
                image_size.to_string(),
            ));
        }
        Ok(VaeInfo { image_shape, latent_shape, scale_factor: scale_factor(io)?, precision })
    }

    /// Checks a VAE decoder's declarations against the contract: `mgd3.kind = vae_decoder`; input
    /// `latent` f32/f16 `[B,C,h,w]` (unscaled); output `image` `[B,c,S,S]` (c = 1 or 3);
    /// `mgd3.scale_factor` a positive float.
    ///
    /// # Errors
    /// [`ContractViolation`] for the first declaration that does not fit.
    pub fn decoder_from_io(io: &ModelIo) -> Result<Self, ContractViolation> {
        io.expect_kind("vae_decoder")?;
        let (precision, latent_shape) = io.image_like(false, "latent", "unscaled latent [B,C,h,w]")?;
        let (_, image_shape) = io.image_like(true, "image", "image [B,c,S,S]")?;
        check_image_channels(io, image_shape, "output `image`")?;
        Ok(VaeInfo { image_shape, latent_shape, scale_factor: scale_factor(io)?, precision })
    }
}

/// Why three models that each fit the contract do not fit each other.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ModelSetMismatch {
    /// A VAE half works on latents of another shape than the DiT's.
    #[error(
        "the {half} `{}` works on latents {latent:?}, the DiT `{}` on {dit:?}: give the VAE the DiT was trained with",
        .half_path.display(), .dit_path.display()
    )]
    LatentShapes {
        /// `VAE encoder` or `VAE decoder`.
        half: &'static str,
        /// Its file.
        half_path: PathBuf,
        /// Its latent shape `[C, h, w]`.
        latent: [usize; 3],
        /// The DiT's file.
        dit_path: PathBuf,
        /// The DiT's latent shape `[C, h, w]`.
        dit: [usize; 3],
    },
    /// The two VAE halves scale latents differently (`mgd3.scale_factor`).
    #[error(
        "the VAE encoder `{}` has scale factor {encoder}, the VAE decoder `{}` {decoder} (metadata \
         `mgd3.scale_factor`): give the two halves of one VAE",
        .encoder_path.display(), .decoder_path.display()
    )]
    ScaleFactors {
        /// The encoder's file.
        encoder_path: PathBuf,
        /// The encoder's scale factor.
        encoder: f32,
        /// The decoder's file.
        decoder_path: PathBuf,
        /// The decoder's scale factor.
        decoder: f32,
    },
    /// The decoder makes images of another shape than the encoder reads.
    #[error(
        "the VAE decoder `{}` makes {decoder:?} images, the VAE encoder `{}` reads {encoder:?}: give the two halves of one VAE",
        .decoder_path.display(), .encoder_path.display()
    )]
    ImageShapes {
        /// The encoder's file.
        encoder_path: PathBuf,
        /// The image shape `[c, S, S]` the encoder reads.
        encoder: [usize; 3],
        /// The decoder's file.
        decoder_path: PathBuf,
        /// The image shape `[c, S, S]` the decoder makes.
        decoder: [usize; 3],
    },
}

/// The three models' declarations, each checked against its part of the contract, and against
/// each other ([`ModelSet::mismatches`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSet<'a> {
    /// The DiT's file and declarations.
    pub dit: (&'a std::path::Path, &'a DitInfo),
    /// The VAE encoder's file and declarations.
    pub encoder: (&'a std::path::Path, &'a VaeInfo),
    /// The VAE decoder's file and declarations.
    pub decoder: (&'a std::path::Path, &'a VaeInfo),
}

impl ModelSet<'_> {
    /// Every way the three models do not fit each other: both VAE halves on the DiT's latents,
    /// one scale factor, and the decoder making the images the encoder reads.
    pub fn mismatches(&self) -> Vec<ModelSetMismatch> {
        let (dit_path, dit) = self.dit;
        let mut found = Vec::new();
        for (half, (path, info)) in [("VAE encoder", self.encoder), ("VAE decoder", self.decoder)] {
            if info.latent_shape != dit.latent_shape {
                found.push(ModelSetMismatch::LatentShapes {
                    half,
                    half_path: path.to_owned(),
                    latent: info.latent_shape,
                    dit_path: dit_path.to_owned(),
                    dit: dit.latent_shape,
                });
            }
        }
        let ((encoder_path, encoder), (decoder_path, decoder)) = (self.encoder, self.decoder);
        if encoder.scale_factor != decoder.scale_factor {
            found.push(ModelSetMismatch::ScaleFactors {
                encoder_path: encoder_path.to_owned(),
                encoder: encoder.scale_factor,
                decoder_path: decoder_path.to_owned(),
                decoder: decoder.scale_factor,
            });
        }
        if encoder.image_shape != decoder.image_shape {
            found.push(ModelSetMismatch::ImageShapes {
                encoder_path: encoder_path.to_owned(),
                encoder: encoder.image_shape,
                decoder_path: decoder_path.to_owned(),
                decoder: decoder.image_shape,
            });
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(name: &str, element: Element, dims: &[i64]) -> TensorDecl {
        TensorDecl { name: name.into(), element, dims: dims.to_vec() }
    }

    fn dit() -> ModelIo {
        let metadata = [
            ("mgd3.kind", "dit"),
            ("mgd3.learn_sigma", "true"),
            ("mgd3.num_classes", "1000"),
            ("mgd3.train_timesteps", "1000"),
            ("mgd3.beta_schedule", "linear"),
            ("mgd3.beta_start", "0.0001"),
            ("mgd3.beta_end", "0.02"),
        ];
        ModelIo {
            path: "dit.onnx".into(),
            inputs: vec![
                decl("x", Element::Float32, &[-1, 4, 32, 32]),
                decl("t", Element::Int64, &[-1]),
                decl("y", Element::Int64, &[-1]),
            ],
            outputs: vec![decl("out", Element::Float32, &[-1, 8, 32, 32])],
            metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..ModelIo::default()
        }
    }

    fn table(rows: u64) -> LabelTable {
        LabelTable { name: "y_embedder.embedding_table.weight".into(), rows }
    }

    /// The class count the metadata declares is held against the embedding table the labels
    /// index, when the file was read: one row per class and one for the null class.
    #[test]
    fn the_declared_classes_must_match_the_class_embedding() {
        let mut io = dit();
        io.label_tables = Some(vec![table(1001), LabelTable { name: "other".into(), rows: 1001 }]);
        assert_eq!(DitInfo::from_io(&io).unwrap().num_classes, 1000);
        // Nothing found (a graph without a Gather on `y`), or not read (a session): no verdict.
        io.label_tables = Some(vec![]);
        assert!(DitInfo::from_io(&io).is_ok());
        io.label_tables = None;
        assert!(DitInfo::from_io(&io).is_ok());
        io.label_tables = Some(vec![table(11)]);
        let error = DitInfo::from_io(&io).unwrap_err().to_string();
        for part in [
            "`mgd3.num_classes` = 1000",
            "y_embedder.embedding_table.weight",
            "1001 rows",
            "11 rows: 10 classes",
            "export_onnx.py dit",
        ] {
            assert!(error.contains(part), "{part}: {error}");
        }
    }

    /// Each kind of declaration the DiT contract refuses is named by its item, with what was
    /// expected and found.
    #[test]
    fn a_dit_that_does_not_fit_is_refused_by_the_item_that_does_not() {
        let info = DitInfo::from_io(&dit()).unwrap();
        assert_eq!((info.latent_shape, info.num_classes, info.precision), ([4, 32, 32], 1000, Precision::F32));
        type Break = fn(&mut ModelIo);
        let cases: [(&str, Break, &str); 18] = [
            ("no metadata", |io| io.metadata.clear(), "metadata `mgd3.kind`"),
            ("x rank 3", |io| io.inputs[0].dims = vec![-1, 4, 32], "input `x`"),
            ("x int64", |io| io.inputs[0].element = Element::Int64, "input `x`"),
            ("no y", |io| drop(io.inputs.pop()), "input `y`"),
            ("t f32", |io| io.inputs[1].element = Element::Float32, "input `t`"),
            ("out of C channels", |io| io.outputs[0].dims[1] = 4, "output `out`"),
            ("no num_classes", |io| drop(io.metadata.remove("mgd3.num_classes")), "metadata `mgd3.num_classes`"),
            (
                "learn_sigma yes",
                |io| drop(io.metadata.insert("mgd3.learn_sigma".into(), "yes".into())),
                "mgd3.learn_sigma",
            ),
            ("no classes", |io| drop(io.metadata.insert("mgd3.num_classes".into(), "0".into())), "mgd3.num_classes"),
            ("T = 0", |io| drop(io.metadata.insert("mgd3.train_timesteps".into(), "0".into())), "mgd3.train_timesteps"),
            (
                "cosine",
                |io| drop(io.metadata.insert("mgd3.beta_schedule".into(), "cosine".into())),
                "mgd3.beta_schedule",
            ),
            ("beta < 0", |io| drop(io.metadata.insert("mgd3.beta_start".into(), "-1".into())), "mgd3.beta_start"),
            ("end < start", |io| drop(io.metadata.insert("mgd3.beta_end".into(), "0.00001".into())), "mgd3.beta_end"),
            ("end = 1", |io| drop(io.metadata.insert("mgd3.beta_end".into(), "1".into())), "mgd3.beta_end"),
            ("more classes than rows", |io| io.label_tables = Some(vec![table(11)]), "mgd3.num_classes"),
            ("fewer classes than rows", |io| io.label_tables = Some(vec![table(1002)]), "mgd3.num_classes"),
            ("no null row", |io| io.label_tables = Some(vec![table(1000)]), "mgd3.num_classes"),
            ("one of two tables", |io| io.label_tables = Some(vec![table(1001), table(11)]), "mgd3.num_classes"),
        ];
        for (name, break_it, item) in cases {
            let mut io = dit();
            break_it(&mut io);
            let error = DitInfo::from_io(&io).unwrap_err();
            assert!(error.item.contains(item), "{name}: {error}");
            assert!(error.to_string().contains("`dit.onnx`"), "{name}: {error}");
        }
    }

    #[test]
    fn vae_halves_are_checked_alone_and_against_the_dit() {
        let meta = |kind: &str| {
            [("mgd3.kind", kind), ("mgd3.image_size", "256"), ("mgd3.scale_factor", "0.18215")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let encoder = ModelIo {
            path: "enc.onnx".into(),
            inputs: vec![decl("image", Element::Float32, &[-1, 3, 256, 256])],
            outputs: vec![
                decl("mean", Element::Float32, &[-1, 4, 32, 32]),
                decl("logvar", Element::Float32, &[-1, 4, 32, 32]),
            ],
            metadata: meta("vae_encoder"),
            ..ModelIo::default()
        };
        let decoder = ModelIo {
            path: "dec.onnx".into(),
            inputs: vec![decl("latent", Element::Float16, &[-1, 4, 32, 32])],
            outputs: vec![decl("image", Element::Float16, &[-1, 3, 256, 256])],
            metadata: meta("vae_decoder"),
            ..ModelIo::default()
        };
        let e = VaeInfo::encoder_from_io(&encoder).unwrap();
        let d = VaeInfo::decoder_from_io(&decoder).unwrap();
        assert_eq!(d.precision, Precision::F16);
        let mut wrong_size = encoder.clone();
        wrong_size.metadata.insert("mgd3.image_size".into(), "512".into());
        assert_eq!(VaeInfo::encoder_from_io(&wrong_size).unwrap_err().item, "metadata `mgd3.image_size`");
        for bad in ["0", "-0.18215", "NaN", "inf", "1e-45", "1e400"] {
            let mut scaled = encoder.clone();
            scaled.metadata.insert("mgd3.scale_factor".into(), bad.into());
            let error = VaeInfo::encoder_from_io(&scaled).unwrap_err();
            assert_eq!(error.item, "metadata `mgd3.scale_factor`", "{bad}: {error}");
            let mut scaled = decoder.clone();
            scaled.metadata.insert("mgd3.scale_factor".into(), bad.into());
            assert!(VaeInfo::decoder_from_io(&scaled).is_err(), "{bad}");
        }
        let mut grey_mismatch = encoder.clone();
        grey_mismatch.outputs[1].dims[1] = 8;
        assert_eq!(VaeInfo::encoder_from_io(&grey_mismatch).unwrap_err().item, "output `logvar`");

        let ditinfo = DitInfo::from_io(&dit()).unwrap();
        let p = |s: &'static str| std::path::Path::new(s);
        assert!(
            ModelSet { dit: (p("dit.onnx"), &ditinfo), encoder: (p("enc.onnx"), &e), decoder: (p("dec.onnx"), &d) }
                .mismatches()
                .is_empty()
        );
        let small = VaeInfo { latent_shape: [4, 16, 16], image_shape: [3, 128, 128], scale_factor: 0.13, ..d };
        let found =
            ModelSet { dit: (p("dit.onnx"), &ditinfo), encoder: (p("enc.onnx"), &e), decoder: (p("dec.onnx"), &small) }
                .mismatches();
        let said: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(found.len(), 3, "{said:?}");
        assert!(said[0].contains("`dec.onnx`") && said[0].contains("`dit.onnx`"), "{said:?}");
        assert!(said[1].contains("`enc.onnx`") && said[1].contains("`dec.onnx`"), "{said:?}");
        assert!(said[2].contains("[3, 128, 128]"), "{said:?}");
    }
}
