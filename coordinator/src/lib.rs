//! mgd3-coordinator: shards a job's classes across workers with pull-based leases over gRPC,
//! keeps durable state in the object store, recovers after a crash and resumes failed jobs.
//!
//! [`scheduler`] is the pure lease logic; [`state`] the durable objects; [`service`] the tonic
//! service and [`service::serve`]; [`cli`] the `coordinator` command line, including `run`, the
//! embedded local cluster.

pub mod cli;
pub mod error;
pub mod lock;
pub mod scheduler;
pub mod service;
pub mod state;

pub use error::{Error, Result};
pub use service::{Coordinator, ServeConfig, serve};
