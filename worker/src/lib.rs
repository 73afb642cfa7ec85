//! mgd3-worker: turns one class of real images into IPC mode-guided synthetic images.
//!
//! [`mgd3`] holds the algorithm (pure ndarray + rand, unit-tested without ONNX); [`data`] decodes
//! and preprocesses images. Three layers, each importing only those below it: [`models`] (the
//! ONNX networks and the batch operations every caller runs), [`pipeline`] (a shard run with its
//! stages overlapped, owning the cancel flag, latent cache, CPU pool and seed) and [`shard`]
//! (failure taxonomy, engines, the committer, `run_shard`); [`client`] is the poll loop that gets
//! the leases; [`sink`] writes PNGs and
//! `.npy` files; [`cli`] is the `worker` command line. [`toy`] is the paper's Figure 2 experiment
//! (a Gaussian mixture with an exact denoiser) run through the real sampler.

pub mod cache;
pub mod cli;
pub mod client;
pub mod cpu;
pub mod data;
pub mod engines;
pub mod failure;
pub mod import;
pub mod mgd3;
pub mod models;
pub mod pipeline;
pub mod shard;
pub mod sink;
pub mod toy;
