//! The tracing subscriber both binaries install: human-readable by default, JSON lines when
//! `MGD3_LOG_FORMAT=json`, filtered by `RUST_LOG` (default [`DEFAULT_FILTER`]: our events at
//! INFO, ONNX Runtime's own chatter — arena extensions, graph transformers — at WARN; set
//! `RUST_LOG=info,ort=info` to see it).

use tracing_subscriber::EnvFilter;

/// The filter when `RUST_LOG` is unset.
pub const DEFAULT_FILTER: &str = "info,ort=warn";

/// Installs the global subscriber; a second call (tests) is a no-op.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if std::env::var("MGD3_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
