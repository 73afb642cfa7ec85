//! mgd3-coordinator: shards a job's classes across workers with pull-based leases over gRPC,
//! keeps durable state in the object store, recovers after a crash and resumes failed jobs.
//!
//! [`scheduler`] is the pure lease logic; [`service`] the domain [`Coordinator`] around it;
//! [`submit`] resolves and checks submitted specs; [`jobstore`] is the seam for each job's own
//! records and [`state`] the outputs' markers and manifests; [`grpc`] the adapter to the wire
//! and [`serve`]; [`local`] a coordinator served in-process (for `run` and the tests); [`report`]
//! and [`export`] turn a job's output into an HTML report and an ADM-evaluation `.npz`; [`cli`]
//! the `coordinator` command line, including `run`, the embedded local cluster.

pub mod cli;
pub mod compare;
pub mod decodecheck;
pub mod error;
pub mod export;
pub mod grpc;
pub mod jobstore;
pub mod local;
pub mod lock;
pub mod progress;
pub mod report;
pub mod runtime;
pub mod scheduler;
pub mod service;
pub mod state;
pub mod submit;

pub use error::{Error, Result};
pub use grpc::serve;
pub use service::{Coordinator, ServeConfig};
