//! Types shared by every mgd3 crate that must not depend on ONNX Runtime or ndarray: the wire
//! protocol, job specs and their fingerprints, the object-store key layout and manifests, store
//! URLs, per-sample seeding, ImageNet class lists, and the argument parsing and tracing set-up of
//! both binaries.

pub mod args;
pub mod aws;
pub mod batch;
pub mod classes;
pub mod commit;
pub mod contract;
pub mod imagecheck;
pub mod imagefolder;
pub mod job;
pub mod layout;
pub mod lease;
pub mod manifest;
pub mod modelmeta;
pub mod onnx_ops;
pub mod rpc;
pub mod seed;
pub mod sheet;
pub mod status;
pub mod store;
pub mod storewatch;
pub mod sweep;
pub mod telemetry;
pub mod wire;

/// The generated gRPC types and clients/servers of `proto/mgd3.proto`.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("mgd3.v1");
}

/// Bumped on any incompatible change of the wire protocol or of the meaning of its fields.
/// 2: job and shard states as enums, per-shard status, class counts, the protocol header on
/// every request, lease timeouts, registration exclusions.
pub const PROTOCOL_VERSION: u32 = 2;

/// Writes the binaries' results to standard output (what `out!` and `outln!` expand to).
///
/// SIGPIPE stays ignored, as Rust sets it up: the gRPC connections are written with `writev`,
/// which raises SIGPIPE when the peer has gone, so its default action would kill a coordinator
/// whenever a worker or client disconnects while it writes (seen: a coordinator ending with 141
/// while sending GOAWAY to its own closed channel). A reader of standard output that stops early
/// (`coordinator list | head -1`) is handled here instead: the process ends quietly with 141, the
/// status a shell shows for a process ended by SIGPIPE, where `println!` would panic.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(error) = out.write_fmt(args).and_then(|()| out.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        let _ = writeln!(std::io::stderr(), "error: cannot write to standard output: {error}");
        std::process::exit(1);
    }
}

/// Writes a message for a person to standard error through [`telemetry::write_stderr`]: above
/// a live progress bar like the log lines, and, unlike `eprintln!`, without a panic when standard
/// error is closed.
pub fn write_stderr_message(args: std::fmt::Arguments<'_>) {
    telemetry::write_stderr(args.to_string().as_bytes());
}

/// `print!` for results on standard output, ending the process quietly when its reader has gone
/// (see [`write_stdout`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::write_stdout(format_args!($($arg)*)) };
}

/// `println!` for results on standard output, ending the process quietly when its reader has
/// gone (see [`write_stdout`]).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => { $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `eprintln!` for messages to a person, without a panic when standard error is closed.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => { $crate::write_stderr_message(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Which signal asked a process to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGINT (Ctrl-C): the process stops cleanly, then exits 130 as shells expect.
    Interrupt,
    /// SIGTERM (Slurm preemption, `kill`): a requested stop; the process exits as its work says.
    Terminate,
}

/// The first stop signal, once one came, from the listener [`listen_for_stop`] started in this
/// process's runtime (a test process runs several runtimes one after the other: a listener whose
/// runtime has gone is started again in the current one).
static STOP: std::sync::Mutex<Option<tokio::sync::watch::Receiver<Option<StopSignal>>>> = std::sync::Mutex::new(None);

/// Starts listening for SIGTERM and SIGINT now, if this process does not already: from here on the
/// first one is remembered until [`termination`] asks (a Ctrl-C while a command is still setting
/// up is not lost, nor does it kill the process half way through taking its store), and a second
/// Ctrl-C ends the process at once (exit 130), as a person pressing it again means: what is
/// committed stays, the work in progress is lost and a worker's lease expires on the coordinator.
/// A second SIGTERM does not: Slurm's preemption signals every process of the step while the
/// batch script forwards its own SIGTERM to the worker too, and that double delivery must not cut
/// the clean stop short (Slurm sends SIGKILL itself once its grace period is over). It is only
/// acknowledged on standard error.
///
/// Commands that stop cleanly call it first thing; the others keep the default (Ctrl-C ends them).
///
/// # Panics
/// Outside a Tokio runtime with its I/O driver, or when the signal handlers cannot be installed.
pub fn listen_for_stop() -> tokio::sync::watch::Receiver<Option<StopSignal>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut slot = STOP.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(rx) = slot.as_ref()
        && rx.has_changed().is_ok()
    {
        return rx.clone();
    }
    // Both handlers are installed here, before this returns, not when a future is first polled.
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(async move {
        let first = tokio::select! {
            _ = term.recv() => StopSignal::Terminate,
            _ = int.recv() => StopSignal::Interrupt,
        };
        let _ = tx.send(Some(first));
        loop {
            tokio::select! {
                _ = term.recv() => errln!(
                    "already stopping cleanly (another SIGTERM changes nothing; a second Ctrl-C or SIGKILL stops at once)"
                ),
                _ = int.recv() => {
                    errln!(
                        "second Ctrl-C: exiting at once; committed work is kept, the work in progress is lost \
                         (a worker's lease expires on its coordinator and the shard runs again)"
                    );
                    std::process::exit(130);
                }
            }
        }
    });
    *slot = Some(rx.clone());
    rx
}

/// The stop signal that has come so far, if any (only once [`listen_for_stop`] listens).
pub fn stop_requested() -> Option<StopSignal> {
    STOP.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().and_then(|rx| *rx.borrow())
}

/// Resolves on SIGTERM or SIGINT, saying which: the shutdown signal both binaries pass to their
/// `run`, which then stop cleanly (a worker after its batch, giving its lease back). A signal that
/// came since [`listen_for_stop`] started listening resolves it at once. From then on a second
/// Ctrl-C ends the process at once (see [`listen_for_stop`]).
pub async fn termination() -> StopSignal {
    let mut rx = listen_for_stop();
    // Copied out of the guard at once: it must not be held across an await.
    let signal = rx.wait_for(Option::is_some).await.map(|signal| *signal);
    match signal {
        Ok(Some(signal)) => signal,
        // The listener's runtime is shutting down, and this future with it.
        _ => std::future::pending().await,
    }
}

/// [`termination`] as a plain future for a `shutdown` argument, remembering the signal in
/// `seen` so the caller can tell a Ctrl-C (exit 130) from a requested stop afterwards.
pub async fn termination_into(seen: std::sync::Arc<std::sync::OnceLock<StopSignal>>) {
    let _ = seen.set(termination().await);
}

/// A run stopped by a signal before its work was done, after stopping cleanly: the binaries exit
/// 128 + the signal's number on it (130 after Ctrl-C, 143 after SIGTERM), as a shell reports a
/// process the signal ended, printing `next` (what to run to continue), if any.
#[derive(Debug, thiserror::Error)]
#[error("{}", match .signal { StopSignal::Interrupt => "interrupted", StopSignal::Terminate => "stopped by SIGTERM" })]
pub struct Interrupted {
    /// The signal that stopped the run.
    pub signal: StopSignal,
    /// What to run to continue, for the last line the user sees.
    pub next: Option<String>,
}

impl Interrupted {
    /// The exit status for it: 128 + the signal's number.
    pub fn exit_code(&self) -> u8 {
        match self.signal {
            StopSignal::Interrupt => 130,
            StopSignal::Terminate => 143,
        }
    }
}

/// A job that no worker can run: every worker it could use was excluded from it (each with its
/// reason) or exited, for longer than a grace period. Waiting longer would idle the allocation;
/// the binaries exit [`NoWorker::EXIT_CODE`].
#[derive(Debug, thiserror::Error)]
#[error(
    "job {job}: no worker can run it: {}; fix that and run the same command again (committed classes are kept)",
    reasons.iter().map(|r| r.trim_end().trim_end_matches('.')).collect::<Vec<_>>().join("; ")
)]
pub struct NoWorker {
    /// The job.
    pub job: String,
    /// Why each worker cannot run it (`worker: reason`), as the workers or the coordinator said.
    pub reasons: Vec<String>,
}

impl NoWorker {
    /// The exit status of a run that stopped because no worker could run its job.
    pub const EXIT_CODE: u8 = 3;
}

/// An error that asks for its own exit status (`2`: a set-up the command refuses, with what to run
/// instead).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ExitWith {
    /// The exit status.
    pub code: u8,
    /// The error with its whole chain, as it is printed.
    pub message: String,
}

/// The exit status of a binary whose `run` ended with `result`: success, 130 after Ctrl-C or 143
/// after SIGTERM (an [`Interrupted`] anywhere in the chain, its hint on stderr), 3 when no worker
/// could run the job ([`NoWorker`]), an [`ExitWith`]'s own code, else 1 with the error's whole
/// chain on stderr.
pub fn exit_status<E>(result: Result<(), E>) -> std::process::ExitCode
where
    E: AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    let Err(error) = result else {
        return std::process::ExitCode::SUCCESS;
    };
    let error: &(dyn std::error::Error + 'static) = error.as_ref();
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(interrupted) = e.downcast_ref::<Interrupted>() {
            match &interrupted.next {
                Some(next) => errln!("{interrupted}; {next}"),
                None => errln!("{interrupted}"),
            }
            return std::process::ExitCode::from(interrupted.exit_code());
        }
        if e.downcast_ref::<NoWorker>().is_some() {
            errln!("error: {}", error_chain(error));
            return std::process::ExitCode::from(NoWorker::EXIT_CODE);
        }
        if let Some(exit) = e.downcast_ref::<ExitWith>() {
            errln!("error: {}", error_chain(error));
            return std::process::ExitCode::from(exit.code);
        }
        cause = e.source();
    }
    errln!("error: {}", error_chain(error));
    if let Some(variable) = coordinator_url_from_environment(error) {
        errln!("note: the URL came from the environment: {variable}");
    }
    std::process::ExitCode::FAILURE
}

/// `MGD3_COORDINATOR=<value>` when `error` is about a coordinator URL that does not parse
/// ([`rpc::ConnectError`]) and that URL is the variable's, not given with `--coordinator`: a job
/// script exported it, and the message should say where to fix it.
fn coordinator_url_from_environment(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(error);
    let mut url = None;
    while let Some(e) = cause {
        if let Some(
            rpc::ConnectError::NoScheme { url: bad }
            | rpc::ConnectError::UnsupportedScheme { url: bad, .. }
            | rpc::ConnectError::BadUrl { url: bad, .. },
        ) = e.downcast_ref::<rpc::ConnectError>()
        {
            url = Some(bad.clone());
        }
        cause = e.source();
    }
    let url = url?;
    let given = std::env::args().skip(1).any(|a| a == "--coordinator" || a.starts_with("--coordinator="));
    let value = std::env::var("MGD3_COORDINATOR").ok()?;
    (!given && value.trim() == url.trim()).then(|| format!("MGD3_COORDINATOR={value}"))
}

/// Milliseconds since the Unix epoch (the clock leases and state files use).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// sha256 of bytes as `sha256:<hex>`, the form of every fingerprint and image digest.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Fingerprint of a model: sha256 over the model file followed by every external-data file it
/// names ([`modelmeta::model_files`], in order of first use), as `sha256:<hex>`. For a model
/// saved as `<model>` + `<model>.data` this is the fingerprint mgd3 has always computed.
///
/// # Errors
/// [`modelmeta::ModelFilesError`] when a file cannot be read, or an external-data file is missing
/// or outside the model's folder.
pub fn fingerprint_file(path: &std::path::Path) -> Result<String, modelmeta::ModelFilesError> {
    use sha2::Digest;
    use std::io::Read;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    for file in modelmeta::model_files(path)? {
        let io = |source| modelmeta::ModelFilesError::Io { path: file.clone(), source };
        let mut reader = std::fs::File::open(&file).map_err(io)?;
        loop {
            let n = reader.read(&mut buffer).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// An error and its causes as one line, `outer: cause: root`: how every error reaches a person
/// (the binaries' last line, gRPC status messages, logs). The project's errors follow the
/// standard convention: a message describes its own level only and its cause is reached through
/// `source()`, so nothing is repeated and nothing needs matching.
///
/// object_store's errors are the exception: their messages already quote their causes, so the
/// chain ends at one, and a failure a person can act on (a missing bucket, refused or missing
/// credentials) is told as one [`store::StoreProblem`] sentence instead of the request dump.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(error);
    while let Some(cause) = current {
        if let Some(store_error) = cause.downcast_ref::<object_store::Error>() {
            match store::StoreProblem::of(store_error) {
                Some(problem) => parts.push(problem.to_string()),
                None => parts.push(cause.to_string()),
            }
            break;
        }
        let text = cause.to_string();
        // A wrapper that already prints its source (the `image` crate's decoding errors do) is
        // not followed by the same words again.
        if !parts.last().is_some_and(|last| !text.is_empty() && last.ends_with(&text)) {
            parts.push(text);
        }
        current = cause.source();
    }
    parts.join(": ")
}

/// Makes ring the process-wide rustls crypto provider. Both ring (tonic) and aws-lc (the cloud
/// object-store clients) are linked in, and rustls refuses to guess between two; every TLS user in
/// the project calls this first. Idempotent.
pub fn ensure_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("disk full")]
        Full,
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot write `a.png`")]
        Quoting(#[source] Inner),
        #[error("class `n01440764`")]
        Wrapping(#[source] Inner),
        #[error("cannot write: {0}")]
        Printing(#[source] Inner),
    }

    #[test]
    fn error_chain_names_every_cause_once() {
        assert_eq!(super::error_chain(&Outer::Quoting(Inner::Full)), "cannot write `a.png`: disk full");
        assert_eq!(super::error_chain(&Outer::Wrapping(Inner::Full)), "class `n01440764`: disk full");
        let wrapped = anyhow::Error::new(Outer::Quoting(Inner::Full)).context("distilling");
        assert_eq!(super::error_chain(wrapped.as_ref()), "distilling: cannot write `a.png`: disk full");
        // A wrapper that prints its source itself: the source is not said twice.
        assert_eq!(super::error_chain(&Outer::Printing(Inner::Full)), "cannot write: disk full");
        // The image crate's decoding errors are such wrappers.
        let decoding = image::ImageError::Decoding(image::error::DecodingError::new(
            image::ImageFormat::Jpeg.into(),
            "Unknown marker in bit stream",
        ));
        assert_eq!(super::error_chain(&decoding), "Format error decoding Jpeg: Unknown marker in bit stream");
    }
}
