//! The tracing subscriber both binaries install: human-readable by default, JSON lines when
//! `MGD3_LOG_FORMAT=json`, filtered by `RUST_LOG` (default [`DEFAULT_FILTER`]: our events at
//! INFO, ONNX Runtime's own chatter — arena extensions, graph transformers — at WARN; set
//! `RUST_LOG=info,ort=info` to see it; the AWS SDK's credential chain, which warns about every
//! provider it tried before the one that answered, at ERROR: what failed in the end reaches the
//! person as the store error; object_store's line per retry at WARN).
//!
//! Log lines go to stderr one event per write, through an optional [`StderrGate`]: while a
//! terminal progress bar is drawn, the CLI installs one that clears the bar, writes the line and
//! redraws the bar, so log lines print above it instead of through it.

use std::io::Write;
use std::sync::{Arc, RwLock};

use tracing_subscriber::EnvFilter;

/// The filter when `RUST_LOG` is unset.
pub const DEFAULT_FILTER: &str = "info,ort=warn,aws_config=error,aws_smithy_runtime=error,object_store=warn";

/// Runs a write to stderr at a moment it cannot tear what else is on the terminal (a progress
/// bar's `suspend`).
pub type StderrGate = Arc<dyn Fn(&mut dyn FnMut()) + Send + Sync>;

static GATE: RwLock<Option<StderrGate>> = RwLock::new(None);

/// Routes every later log line (and [`write_stderr`]) through `gate`; `None` writes directly again.
pub fn set_stderr_gate(gate: Option<StderrGate>) {
    *GATE.write().expect("stderr gate") = gate;
}

/// Writes `bytes` to stderr in one piece, through the gate when one is installed.
pub fn write_stderr(bytes: &[u8]) {
    let gate = GATE.read().expect("stderr gate").clone();
    let mut write = || {
        let _ = std::io::stderr().lock().write_all(bytes);
    };
    match gate {
        Some(gate) => gate(&mut write),
        None => write(),
    }
}

/// One log event, buffered and written in one piece when the subscriber is done with it.
struct EventWriter(Vec<u8>);

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            write_stderr(&self.0);
        }
    }
}

/// Installs the global subscriber; a second call (tests) is a no-op.
///
/// A `MGD3_LOG_FORMAT` other than `json` or `text`, or a `RUST_LOG` that does not parse, is
/// said in a warning once logging runs (plain text, the default filter), not silently ignored.
pub fn init() {
    let rust_log = std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty());
    let (filter, bad_filter) = match &rust_log {
        Some(directives) => match EnvFilter::try_new(directives) {
            Ok(filter) => (filter, None),
            Err(error) => (EnvFilter::new(DEFAULT_FILTER), Some((directives.clone(), error))),
        },
        None => (EnvFilter::new(DEFAULT_FILTER), None),
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| EventWriter(Vec::new()))
        .with_ansi(std::io::stderr().is_terminal());
    let format = std::env::var("MGD3_LOG_FORMAT").unwrap_or_default();
    let installed = if format.trim() == "json" { builder.json().try_init() } else { builder.try_init() };
    if installed.is_err() {
        return;
    }
    if !matches!(format.trim(), "" | "json" | "text") {
        tracing::warn!(
            "MGD3_LOG_FORMAT={format:?} is not a log format (`json`, or `text`, the default): logging as text"
        );
    }
    if let Some((directives, error)) = bad_filter {
        tracing::warn!(%error, "RUST_LOG={directives:?} cannot be parsed: logging with the default filter `{DEFAULT_FILTER}`");
    }
}
