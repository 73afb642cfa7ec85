//! The two halves of the VAE: the encoder maps images in `[-1, 1]` to the posterior `mean` and
//! `logvar` (unscaled), the decoder maps unscaled latents back to images in about `[-1, 1]`.

use std::path::Path;

use ndarray::{Array4, ArrayView4};

use crate::contract::{Precision, VaeInfo};
use crate::error::{Error, Result};
use crate::model::{BatchInput, CallLimit, LoadedModel};
use crate::session::SessionConfig;

/// [`Error::NonFinite`] for the first batch item of `output` holding a NaN or an infinity: what a
/// VAE gives is never used unless every value is finite.
fn check_finite(model: &LoadedModel, output: &Array4<f32>, name: &str, precision: Precision) -> Result<()> {
    for (item, values) in output.outer_iter().enumerate() {
        if let Some(&value) = values.iter().find(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                model: model.path.clone(),
                output: name.into(),
                item,
                value,
                fp16: precision == Precision::F16,
            });
        }
    }
    Ok(())
}

/// A loaded, contract-checked VAE encoder session (`image` → `mean`, `logvar`).
pub struct VaeEncoder {
    model: LoadedModel,
    info: VaeInfo,
}

impl VaeEncoder {
    /// Loads the VAE encoder at `path` and checks it against the contract.
    ///
    /// # Errors
    /// [`Error::ModelNotFound`], [`Error::RuntimeUnavailable`], [`Error::CudaUnavailable`] or
    /// [`Error::Ort`] when the session cannot be built; [`Error::Contract`] when its input,
    /// outputs or `mgd3.*` metadata do not fit, `logvar` differs from `mean` in shape or
    /// `mgd3.image_size` from the image side ([`VaeInfo::encoder_from_io`]).
    pub fn load(path: &Path, config: &SessionConfig) -> Result<Self> {
        let model = LoadedModel::load(path, config)?;
        let info = VaeInfo::encoder_from_io(&model.io)?;
        let (image_shape, precision) = (info.image_shape, info.precision);
        let mut model = model;
        let [ic, ih, iw] = image_shape;
        let probe = Array4::<f32>::zeros((1, ic, ih, iw));
        model.probe(&[BatchInput::Float("image", probe.view(), precision)])?;
        tracing::debug!(model = %path.display(), image = ?info.image_shape, latent = ?info.latent_shape,
            precision = ?info.precision, limit = ?model.limit(), "loaded VAE encoder");
        tracing::debug!(?info, "VAE encoder metadata");
        Ok(VaeEncoder { model, info })
    }

    /// Shapes and metadata of the encoder.
    pub fn info(&self) -> &VaeInfo {
        &self.info
    }

    /// Precision, graph and device with its provider options, for the model-load log line.
    pub fn describe(&self) -> String {
        self.model.describe(self.info.precision)
    }

    /// How many images a call carries now, and why (policy, element ceiling, backoff).
    pub fn call_limit(&self) -> CallLimit {
        self.model.limit()
    }

    /// Forgets out-of-memory backoff (at the start of a shard).
    pub fn reset_backoff(&mut self) {
        self.model.reset_backoff();
    }

    /// Encodes images `[B,c,S,S]` in `[-1, 1]`; returns the unscaled posterior (mean, logvar), each
    /// `[B,C,h,w]` f32. Multiply `mean` by [`VaeInfo::scale_factor`] for diffusion latents.
    ///
    /// # Errors
    /// [`Error::BadInput`] for images of another shape or an empty batch; [`Error::OutOfMemory`]
    /// when one image does not fit; [`Error::Ort`] when the run fails; [`Error::NonFinite`] when `mean` holds a NaN or an infinity (naming the item).
    pub fn encode(&mut self, images: ArrayView4<f32>) -> Result<(Array4<f32>, Array4<f32>)> {
        let want = self.info.image_shape;
        if images.shape()[1..] != want {
            return Err(self.model.bad_input(
                "input `image`",
                format!("[B,{},{},{}]", want[0], want[1], want[2]),
                format!("{:?}", images.shape()),
            ));
        }
        let mut out =
            self.model.run(&[BatchInput::Float("image", images, self.info.precision)], &["mean", "logvar"])?;
        let logvar = out.pop().expect("two outputs");
        let mean = out.pop().expect("two outputs");
        check_finite(&self.model, &mean, "mean", self.info.precision)?;
        Ok((mean, logvar))
    }
}

/// A loaded, contract-checked VAE decoder session (`latent` → `image`).
pub struct VaeDecoder {
    model: LoadedModel,
    info: VaeInfo,
}

impl VaeDecoder {
    /// Loads the VAE decoder at `path` and checks it against the contract.
    ///
    /// # Errors
    /// [`Error::ModelNotFound`], [`Error::RuntimeUnavailable`], [`Error::CudaUnavailable`] or
    /// [`Error::Ort`] when the session cannot be built; [`Error::Contract`] when its input,
    /// output or `mgd3.*` metadata do not fit.
    pub fn load(path: &Path, config: &SessionConfig) -> Result<Self> {
        let model = LoadedModel::load(path, config)?;
        let info = VaeInfo::decoder_from_io(&model.io)?;
        let (latent_shape, precision) = (info.latent_shape, info.precision);
        let mut model = model;
        let [lc, lh, lw] = latent_shape;
        let probe = Array4::<f32>::zeros((1, lc, lh, lw));
        model.probe(&[BatchInput::Float("latent", probe.view(), precision)])?;
        tracing::debug!(model = %path.display(), image = ?info.image_shape, latent = ?info.latent_shape,
            precision = ?info.precision, limit = ?model.limit(), "loaded VAE decoder");
        tracing::debug!(?info, "VAE decoder metadata");
        Ok(VaeDecoder { model, info })
    }

    /// Shapes and metadata of the decoder.
    pub fn info(&self) -> &VaeInfo {
        &self.info
    }

    /// Precision, graph and device with its provider options, for the model-load log line.
    pub fn describe(&self) -> String {
        self.model.describe(self.info.precision)
    }

    /// How many images a call carries now, and why (policy, element ceiling, backoff).
    pub fn call_limit(&self) -> CallLimit {
        self.model.limit()
    }

    /// Forgets out-of-memory backoff (at the start of a shard).
    pub fn reset_backoff(&mut self) {
        self.model.reset_backoff();
    }

    /// Decodes unscaled latents `[B,C,h,w]` (diffusion latents divided by
    /// [`VaeInfo::scale_factor`]) into images `[B,c,S,S]` of about `[-1, 1]`, f32.
    ///
    /// # Errors
    /// [`Error::BadInput`] for latents of another shape or an empty batch; [`Error::OutOfMemory`]
    /// when one image does not fit; [`Error::Ort`] when the run fails; [`Error::NonFinite`] when the image holds a NaN or an infinity (naming the item).
    pub fn decode(&mut self, latents: ArrayView4<f32>) -> Result<Array4<f32>> {
        let want = self.info.latent_shape;
        if latents.shape()[1..] != want {
            return Err(self.model.bad_input(
                "input `latent`",
                format!("[B,{},{},{}]", want[0], want[1], want[2]),
                format!("{:?}", latents.shape()),
            ));
        }
        let image = self.model.run(&[BatchInput::Float("latent", latents, self.info.precision)], &["image"])?.remove(0);
        check_finite(&self.model, &image, "image", self.info.precision)?;
        Ok(image)
    }
}
