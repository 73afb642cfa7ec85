//! mgd3-worker: turns one class of real images into IPC mode-guided synthetic images.
//!
//! [`mgd3`] holds the algorithm (pure ndarray + rand, unit-tested without ONNX); [`data`] decodes
//! and preprocesses images; [`engine`] wires both to the ONNX models for a whole class;
//! [`sink`] writes PNGs and `.npy` files; [`cli`] is the `worker` command line.

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
