//! Types shared by every mgd3 crate that must not depend on ONNX Runtime or ndarray:
//! per-sample seeding, ImageNet class lists and the tracing set-up of both binaries.

pub mod classes;
pub mod seed;
pub mod telemetry;
