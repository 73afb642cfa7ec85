//! The class-conditional DiT: `predict(x, t, y)` on a batch of latents, checked against the
//! contract (`x` `[B,C,h,w]`, `t` int64 original timesteps, `y` int64 labels with the null class
//! = `num_classes`, output `out` `[B,2C,h,w]` with learned sigma or `[B,C,h,w]`).

use std::path::Path;

use ndarray::{Array4, ArrayView4};

use crate::contract::DitInfo;
use crate::error::Result;
use crate::model::{BatchInput, CallLimit, LoadedModel};
use crate::session::SessionConfig;

/// A loaded, contract-checked DiT session.
pub struct Dit {
    model: LoadedModel,
    info: DitInfo,
}

impl Dit {
    /// Loads the DiT at `path` and checks it against the contract.
    ///
    /// # Errors
    /// [`crate::Error::ModelNotFound`], [`crate::Error::RuntimeUnavailable`],
    /// [`crate::Error::CudaUnavailable`] or [`crate::Error::Ort`] when the session cannot be
    /// built; [`crate::Error::Contract`] when the model's inputs, output or `mgd3.*` metadata do
    /// not fit.
    pub fn load(path: &Path, config: &SessionConfig) -> Result<Self> {
        let model = LoadedModel::load(path, config)?;
        let info = DitInfo::from_io(&model.io)?;
        let [c, h, w] = info.latent_shape;
        let precision = info.precision;
        let mut model = model;
        let x = Array4::<f32>::zeros((1, c, h, w));
        model.probe(&[
            BatchInput::Float("x", x.view(), precision),
            BatchInput::Int("t", &[0]),
            BatchInput::Int("y", &[0]),
        ])?;
        tracing::debug!(model = %path.display(), classes = info.num_classes, latent = ?info.latent_shape,
            precision = ?info.precision, limit = ?model.limit(), "loaded DiT");
        tracing::debug!(?info, "DiT metadata");
        Ok(Dit { model, info })
    }

    /// What the model declares about itself.
    pub fn info(&self) -> &DitInfo {
        &self.info
    }

    /// Which graph the model file holds (plain or fused).
    pub fn graph(&self) -> crate::contract::Graph {
        self.model.io.graph()
    }

    /// Precision, graph and device with its provider options, for the model-load log line.
    pub fn describe(&self) -> String {
        self.model.describe(self.info.precision)
    }

    /// Whether its calls run through ONNX Runtime's I/O binding
    /// ([`SessionConfig::io_binding`], kept only where the probe item gave the same bytes).
    pub fn io_bound(&self) -> bool {
        self.model.io_bound()
    }

    /// How many rows a call carries now, and why (policy, element ceiling, backoff).
    pub fn call_limit(&self) -> CallLimit {
        self.model.limit()
    }

    /// Forgets out-of-memory backoff (at the start of a shard).
    pub fn reset_backoff(&mut self) {
        self.model.reset_backoff();
    }

    /// Sets the rows per call the batch policy allows, for rows chosen after load from
    /// [`CallLimit::item_bytes`] (the element ceiling and backoff still bound them).
    pub fn set_rows(&mut self, rows: usize) {
        self.model.set_policy(rows);
    }

    /// Runs the DiT on `x` `[B,C,h,w]` (scaled latent space) with per-item original timesteps `t`
    /// and labels `y` (`num_classes` = null class); returns `out` `[B,2C,h,w]` with learned sigma,
    /// else `[B,C,h,w]`, f32. Batches run in calls of [`Dit::call_limit`] rows, with the same
    /// result as one call.
    ///
    /// # Errors
    /// [`crate::Error::BadInput`] for a wrong `x` shape, a timestep outside 0..T, a label outside
    /// 0..=`num_classes`, `t` or `y` of another length than the batch, or an empty batch;
    /// [`crate::Error::OutOfMemory`] when one row does not fit; [`crate::Error::Ort`] when the
    /// run fails.
    pub fn predict(&mut self, x: ArrayView4<f32>, t: &[i64], y: &[i64]) -> Result<Array4<f32>> {
        let [c, h, w] = self.info.latent_shape;
        if x.shape()[1..] != [c, h, w] {
            return Err(self.model.bad_input("input `x`", format!("[B,{c},{h},{w}]"), format!("{:?}", x.shape())));
        }
        if let Some(bad) = t.iter().find(|t| !(0..self.info.train_timesteps as i64).contains(t)) {
            return Err(self.model.bad_input(
                "input `t`",
                format!("timesteps in 0..{}", self.info.train_timesteps),
                bad.to_string(),
            ));
        }
        if let Some(bad) = y.iter().find(|y| !(0..=self.info.num_classes as i64).contains(y)) {
            return Err(self.model.bad_input(
                "input `y`",
                format!("labels in 0..={} ({} = null class)", self.info.num_classes, self.info.num_classes),
                bad.to_string(),
            ));
        }
        let inputs = [BatchInput::Float("x", x, self.info.precision), BatchInput::Int("t", t), BatchInput::Int("y", y)];
        Ok(self.model.run(&inputs, &["out"])?.remove(0))
    }
}
