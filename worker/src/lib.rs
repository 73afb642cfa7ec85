//! mgd3-worker: turns one class of real images into IPC mode-guided synthetic images.
//!
//! [`mgd3`] holds the algorithm (pure ndarray + rand, unit-tested without ONNX); [`data`] decodes
//! and preprocesses images; [`engine`] wires both to the ONNX models for a whole class;
//! [`pipeline`] runs a whole shard with its stages overlapped; [`shard`] commits what it makes
//! under a lease and [`client`] is the poll loop that gets the leases; [`sink`] writes PNGs and
//! `.npy` files; [`cli`] is the `worker` command line. [`toy`] is the paper's Figure 2 experiment
//! (a Gaussian mixture with an exact denoiser) run through the real sampler.

pub mod cache;
pub mod cli;
pub mod client;
pub mod cpu;
pub mod data;
pub mod engine;
pub mod import;
pub mod mgd3;
pub mod pipeline;
pub mod shard;
pub mod sink;
pub mod toy;
