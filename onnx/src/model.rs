//! A loaded, contract-checked session and the chunked `run` shared by the DiT and VAE wrappers:
//! inputs are f32 (or i64) ndarrays, split into `max_batch` chunks, cast to f16 where the model
//! wants it, and the named outputs come back as owned f32 arrays.

use std::path::{Path, PathBuf};

use half::f16;
use ndarray::{Array4, ArrayView4, Axis, Ix4, concatenate, s};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType};

use crate::contract::{ModelIo, Precision};
use crate::error::{Error, Result};
use crate::session::{SessionConfig, build_session};

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

/// A session with the contract view of its model.
pub(crate) struct LoadedModel {
    /// The ONNX Runtime session.
    pub session: Session,
    /// The model's declared inputs, outputs and metadata.
    pub io: ModelIo,
    /// The model file, named in every error.
    pub path: PathBuf,
    /// Largest batch per `run` call (at least 1).
    pub max_batch: usize,
}

impl LoadedModel {
    /// Builds the session for `path` and reads its contract view.
    pub fn load(path: &Path, config: &SessionConfig) -> Result<Self> {
        let session = build_session(path, config)?;
        let io = ModelIo::read(path, &session)?;
        Ok(LoadedModel { session, io, path: path.to_owned(), max_batch: config.max_batch.max(1) })
    }

    /// An [`Error::BadInput`] about this model.
    pub fn bad_input(&self, item: impl Into<String>, expected: impl Into<String>, got: impl Into<String>) -> Error {
        Error::BadInput { model: self.path.clone(), item: item.into(), expected: expected.into(), got: got.into() }
    }

    /// Runs the model over the whole batch in `max_batch` chunks and concatenates each output.
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
            let to = (from + self.max_batch).min(batch);
            let values = inputs
                .iter()
                .map(|i| i.chunk(from, to))
                .collect::<Result<Vec<_>, _>>()
                .map_err(Error::ort(context.clone()))?;
            let values: Vec<(String, SessionInputValue<'_>)> =
                values.into_iter().map(|(n, v)| (n, SessionInputValue::from(v))).collect();
            let result = self.session.run(values).map_err(Error::ort(context.clone()))?;
            for (slot, name) in parts.iter_mut().zip(outputs) {
                let value = result.get(name).ok_or_else(|| Error::Contract {
                    model: self.path.clone(),
                    item: format!("output `{name}`"),
                    expected: "to be produced by the run".into(),
                    found: "nothing".into(),
                })?;
                slot.push(extract_f32(value).map_err(Error::ort(format!("{context}: output `{name}`")))?);
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
