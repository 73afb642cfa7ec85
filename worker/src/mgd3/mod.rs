//! The MGD³ algorithm, pure ndarray + rand and no ONNX: the respaced diffusion schedule
//! ([`schedule`]), one guided DDPM step ([`guidance`]), the batched sampling loop over a
//! [`sampler::Denoiser`] ([`sampler`]), mode discovery with k-means ([`modes`]) and the samples' diversity
//! and representativeness ([`quality`]).

pub mod guidance;
pub mod modes;
pub mod noise;
pub mod quality;
pub mod sampler;
pub mod schedule;
