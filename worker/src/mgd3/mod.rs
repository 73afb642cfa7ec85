//! The MGD³ algorithm, pure ndarray + rand and no ONNX: the respaced diffusion schedule
//! ([`schedule`]), the guidance loop every reverse step shares ([`guidance`]) and one module per
//! sampler ([`ddpm`], [`ddim`]), the batched sampling loop over a
//! [`sampler::Denoiser`] ([`sampler`]), mode discovery with k-means ([`modes`]) and the samples' diversity
//! and representativeness ([`quality`]).

pub mod ddim;
pub mod ddpm;
pub mod guidance;
pub mod modes;
pub mod noise;
pub mod quality;
pub mod sampler;
pub mod schedule;
