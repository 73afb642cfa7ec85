//! The MGD³ algorithm, pure ndarray + rand and no ONNX: the respaced diffusion schedule
//! ([`schedule`]), one guided DDPM step ([`guidance`]), the batched sampling loop over a
//! [`sampler::Denoiser`] ([`sampler`]) and mode discovery with k-means ([`modes`]).

pub mod guidance;
pub mod modes;
pub mod noise;
pub mod sampler;
pub mod schedule;
