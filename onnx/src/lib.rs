//! mgd3-onnx — the only crate that touches ONNX Runtime.
//!
//! It loads the ONNX Runtime library once ([`session::init_runtime`]), builds every session in one
//! place ([`session`]), checks each model against the mgd3 model contract at load time
//! ([`contract`]) and wraps the three networks MGD³ needs: the class-conditional DiT ([`Dit`]) and
//! the two halves of the VAE ([`VaeEncoder`], [`VaeDecoder`]). Inputs are always f32 ndarrays;
//! fp16 models are cast at the boundary and large batches are split into `max_batch` chunks.

pub mod contract;
pub mod dit;
pub mod error;
mod model;
pub mod session;
pub mod vae;

pub use contract::{DitInfo, VaeInfo};
pub use dit::Dit;
pub use error::{Error, Result};
pub use model::{CallLimit, MEASURE_ITEMS};
pub use session::{Device, SessionConfig, init_runtime};
pub use vae::{VaeDecoder, VaeEncoder};
