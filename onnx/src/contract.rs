//! The mgd3 model contract: input/output names, element types, ranks and `mgd3.*` metadata,
//! checked once when a model is loaded so that a wrong file fails with a message naming the
//! model, the item and what was expected, instead of a shape error deep inside a run.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ort::session::Session;
use ort::value::{TensorElementType, ValueType};

use crate::error::{Error, Result};

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

/// Element types the contract allows for float tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// float32 tensors.
    F32,
    /// float16 tensors; f32 inputs are cast at the boundary and outputs cast back.
    F16,
}

/// One input or output as the model declares it; dynamic dimensions are `-1`.
#[derive(Clone, Debug)]
pub struct TensorDecl {
    /// The input or output name.
    pub name: String,
    /// Element type (a non-tensor value is recorded as `String`).
    pub element: TensorElementType,
    /// Declared dimensions, `-1` where dynamic.
    pub dims: Vec<i64>,
}

impl fmt::Display for TensorDecl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.dims.iter().map(|d| if *d < 0 { "?".into() } else { d.to_string() }).collect();
        write!(f, "{:?} [{}]", self.element, dims.join(","))
    }
}

/// Everything the contract checks, read from a session.
#[derive(Debug)]
pub struct ModelIo {
    /// The model file, named in every contract error.
    pub path: PathBuf,
    /// The graph inputs.
    pub inputs: Vec<TensorDecl>,
    /// The graph outputs.
    pub outputs: Vec<TensorDecl>,
    /// The model's custom metadata (`mgd3.*` keys written by `scripts/export_onnx.py`).
    pub metadata: HashMap<String, String>,
}

fn declare(name: &str, ty: &ValueType) -> TensorDecl {
    match ty {
        ValueType::Tensor { ty, shape, .. } => {
            TensorDecl { name: name.to_owned(), element: *ty, dims: shape.iter().copied().collect() }
        }
        _ => TensorDecl { name: name.to_owned(), element: TensorElementType::String, dims: vec![] },
    }
}

impl ModelIo {
    /// Reads the inputs, outputs and custom metadata of the session loaded from `path`.
    ///
    /// # Errors
    /// [`Error::Ort`] when ONNX Runtime cannot report the metadata.
    pub fn read(path: &Path, session: &Session) -> Result<Self> {
        let metadata = session
            .metadata()
            .and_then(|m| {
                let keys = m.custom_keys()?;
                Ok(keys.into_iter().filter_map(|k| m.custom(&k).map(|v| (k, v))).collect())
            })
            .map_err(Error::ort(format!("reading metadata of `{}`", path.display())))?;
        Ok(ModelIo {
            path: path.to_owned(),
            inputs: session.inputs().iter().map(|o| declare(o.name(), o.dtype())).collect(),
            outputs: session.outputs().iter().map(|o| declare(o.name(), o.dtype())).collect(),
            metadata,
        })
    }

    fn violation(&self, item: impl Into<String>, expected: impl Into<String>, found: impl Into<String>) -> Error {
        Error::Contract { model: self.path.clone(), item: item.into(), expected: expected.into(), found: found.into() }
    }

    fn find<'a>(&'a self, list: &'a [TensorDecl], kind: &str, name: &str) -> Result<&'a TensorDecl> {
        list.iter().find(|d| d.name == name).ok_or_else(|| {
            let names: Vec<&str> = list.iter().map(|d| d.name.as_str()).collect();
            self.violation(format!("{kind} `{name}`"), "to exist", format!("{kind}s {names:?}"))
        })
    }

    /// A float input or output of rank 4 whose non-batch dimensions are fixed; returns its
    /// precision and its `[C, H, W]`. `layout` describes the tensor in messages.
    ///
    /// # Errors
    /// [`Error::Contract`] when the tensor is missing, not f32 or f16, or not rank 4 with C, H and
    /// W fixed.
    pub fn image_like(&self, output: bool, name: &str, layout: &str) -> Result<(Precision, [usize; 3])> {
        let (list, kind) = if output { (&self.outputs, "output") } else { (&self.inputs, "input") };
        let decl = self.find(list, kind, name)?;
        let item = format!("{kind} `{name}`");
        let precision = match decl.element {
            TensorElementType::Float32 => Precision::F32,
            TensorElementType::Float16 => Precision::F16,
            _ => {
                return Err(self.violation(&item, format!("f32 or f16 {layout}"), decl.to_string()));
            }
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
    /// [`Error::Contract`] when the input is missing or not int64 of rank 1.
    pub fn int_vector(&self, name: &str, meaning: &str) -> Result<()> {
        let decl = self.find(&self.inputs, "input", name)?;
        if decl.element != TensorElementType::Int64 || decl.dims.len() != 1 {
            return Err(self.violation(format!("input `{name}`"), format!("int64 [B] ({meaning})"), decl.to_string()));
        }
        Ok(())
    }

    /// Metadata value `key`, trimmed and parsed; `expected` describes it in messages.
    ///
    /// # Errors
    /// [`Error::Contract`] when the key is missing or its value does not parse.
    pub fn meta<T: FromStr>(&self, key: &str, expected: &str) -> Result<T> {
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
    /// [`Error::Contract`] when the key is missing or names another kind.
    pub fn expect_kind(&self, kind: &str) -> Result<()> {
        let found: String = self.meta("mgd3.kind", kind)?;
        if found != kind {
            return Err(self.violation("metadata `mgd3.kind`", kind, found));
        }
        Ok(())
    }

    /// Boolean metadata value `key`: `true`/`1` or `false`/`0`, case-insensitive.
    ///
    /// # Errors
    /// [`Error::Contract`] when the key is missing or holds anything else.
    pub fn bool_meta(&self, key: &str) -> Result<bool> {
        let raw: String = self.meta(key, "true or false")?;
        match raw.to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(self.violation(format!("metadata `{key}`"), "true or false", raw)),
        }
    }
}
