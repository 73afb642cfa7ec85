//! The worker's gRPC loop: register, then poll (heartbeat + lease renewal + work request) while
//! a leased shard runs on a blocking thread; report the result with retries. On shutdown the
//! running shard stops after its current batch, its lease is released and the loop exits. When
//! the coordinator is unreachable the loop backs off and retries; committed classes are durable
//! in the store, so nothing committed is lost.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mgd3_common::batch::BatchPolicy;
use tokio::time::Instant;

use mgd3_common::job::{ClassRef, JobSpec};
use mgd3_common::lease::{Completion, Failure, Registration, RunningLease};
use mgd3_common::proto::{self, poll_work_response::Action};
use mgd3_common::rpc::{Client, connect};
use mgd3_common::store::{self, Location};
use tokio::task::JoinHandle;
use tonic::Code;
use tracing::{debug, info, warn};

use crate::shard::{
    Disposition, LoadedModels, ShardEngine, ShardError, ShardFailure, ShardLease, ShardProgress, ShardReport, run_shard,
};

/// How a worker connects and identifies itself.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The coordinator URL (http:// or https://).
    pub coordinator: String,
    /// This worker's id, as the coordinator and its status show it.
    pub worker_id: String,
    /// The bearer token sent with every RPC, when the coordinator requires one.
    pub token: Option<String>,
    /// CA certificate (PEM) for an https:// coordinator with a private CA.
    pub tls_ca: Option<std::path::PathBuf>,
    /// The devices the models run on (`cpu`, `cuda:0`), reported at registration.
    pub devices: Vec<String>,
    /// How long the coordinator may stay unreachable (never answered, or stopped answering)
    /// before the worker gives up with an error; `None`: retry for ever.
    pub give_up_after: Option<Duration>,
}

impl WorkerConfig {
    /// A worker `worker_id` of the coordinator at `coordinator`: no token, no private CA, no
    /// devices reported, and [`DEFAULT_GIVE_UP_AFTER`].
    pub fn new(coordinator: impl Into<String>, worker_id: impl Into<String>) -> Self {
        WorkerConfig {
            coordinator: coordinator.into(),
            worker_id: worker_id.into(),
            token: None,
            tls_ca: None,
            devices: Vec::new(),
            give_up_after: Some(DEFAULT_GIVE_UP_AFTER),
        }
    }
}

/// How long a worker waits for an unreachable coordinator by default: long enough for a
/// coordinator restart or a Slurm requeue of the coordinator's node, short enough that a job
/// array of workers pointed at a wrong URL, or left behind by a finished job, does not hold its
/// GPUs for hours.
pub const DEFAULT_GIVE_UP_AFTER: Duration = Duration::from_secs(600);

/// Why the worker's loop stopped before it was drained or told to stop.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator URL, CA file or token cannot be used.
    #[error(transparent)]
    Connect(#[from] mgd3_common::rpc::ConnectError),
    /// The coordinator was unreachable for longer than [`WorkerConfig::give_up_after`].
    #[error(
        "the coordinator at {url} has not answered for {} s; giving up (--give-up-after-s / MGD3_GIVE_UP_AFTER_S \
         sets the wait, 0 waits for ever)",
        .after.as_secs()
    )]
    GaveUp {
        /// The coordinator URL.
        url: String,
        /// How long it was unreachable.
        after: Duration,
        /// The last failed call.
        #[source]
        source: mgd3_common::rpc::CallError,
    },
    /// The URL's scheme is not what the coordinator speaks (`https://` to a plain server,
    /// `http://` to a TLS one), or what answers at the address is no coordinator (HTTP/1.1): no
    /// retry can help, so the worker stops at the first answer.
    #[error("cannot talk to the coordinator")]
    WrongScheme {
        /// The failed call; its message names the URL to use.
        #[source]
        source: mgd3_common::rpc::CallError,
    },
    /// The coordinator refused the registration (another protocol version, a wrong token).
    #[error("the coordinator rejected worker `{worker}`")]
    Rejected {
        /// The worker's id.
        worker: String,
        /// What the coordinator answered.
        #[source]
        source: mgd3_common::rpc::CallError,
    },
}

type ShardOutcome = Result<ShardReport, ShardError>;

struct Running {
    lease: ShardLease,
    progress: Arc<ShardProgress>,
    cancel: Arc<AtomicBool>,
    /// Set when the coordinator revoked the lease: sampling stops before its next DiT call.
    stop_now: Arc<AtomicBool>,
    task: JoinHandle<ShardOutcome>,
    /// When the lease was last renewed, as far as this worker can prove.
    clock: LeaseClock,
}

/// A lease's life as this worker sees it, on tokio's clock (so tests run it on paused time).
#[derive(Clone, Copy, Debug)]
struct LeaseClock {
    /// How long the lease lives without renewal (`None`: the coordinator did not say).
    timeout: Option<Duration>,
    /// When the last poll the coordinator answered without revoking the lease was sent: the
    /// coordinator renewed the lease no earlier than that.
    renewed: Instant,
}

impl LeaseClock {
    /// A lease granted by an answer to a call sent at `sent`.
    fn granted(timeout: Option<Duration>, sent: Instant) -> Self {
        LeaseClock { timeout, renewed: sent }
    }

    /// The coordinator answered a poll sent at `sent` without revoking the lease.
    fn renewed_by(&mut self, sent: Instant) {
        self.renewed = self.renewed.max(sent);
    }

    /// True once the lease has gone unrenewed for its whole timeout: the coordinator has
    /// requeued the shard by now, so computing on would only duplicate another worker's work.
    fn expired(&self, now: Instant) -> bool {
        self.timeout.is_some_and(|timeout| now.saturating_duration_since(self.renewed) >= timeout)
    }
}

/// While shutting down, no RPC may hold the process longer than this: Slurm preemption signals
/// the coordinator and its workers at once, so the coordinator may be gone or hung.
const STOPPING_RPC_TIMEOUT: Duration = Duration::from_secs(5);

/// A `PollWork` of this worker process reporting `running`, `draining` once it stops.
fn poll_request(
    config: &WorkerConfig,
    instance: &str,
    loaded: &LoadedModels,
    running: Vec<proto::RunningLease>,
    draining: bool,
) -> proto::PollWorkRequest {
    proto::PollWorkRequest {
        worker_id: config.worker_id.clone(),
        running,
        draining,
        instance: instance.to_owned(),
        pid: std::process::id(),
        hostname: hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
        // What the loaded models run with (with `--dit-rows auto`, chosen at load).
        batch_policy: loaded.policy().map(Into::into),
    }
}

/// How long a stopping worker waits for the coordinator to take note that it leaves.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// The shutdown signal, remembered once it has fired, so every wait and every RPC of the loop
/// can race it and a stopping worker never waits for an unreachable or hung coordinator.
struct Stop<F> {
    signal: std::pin::Pin<Box<F>>,
    fired: bool,
}

impl<F: Future<Output = ()>> Stop<F> {
    fn new(signal: F) -> Self {
        Stop { signal: Box::pin(signal), fired: false }
    }

    /// Resolves when the signal fires; never again afterwards.
    async fn signalled(&mut self) {
        if self.fired {
            return std::future::pending().await;
        }
        self.signal.as_mut().await;
        self.fired = true;
    }

    /// Runs `rpc`; once stopping, bounded by [`STOPPING_RPC_TIMEOUT`]. A call in flight when the
    /// signal arrives gets that long to finish, not longer: its answer may grant a lease, which
    /// the worker must learn of to release it.
    async fn rpc<T>(&mut self, rpc: impl Future<Output = Result<T, tonic::Status>>) -> Result<T, tonic::Status> {
        tokio::pin!(rpc);
        if !self.fired {
            tokio::select! {
                result = &mut rpc => return result,
                _ = self.signalled() => {}
            }
        }
        tokio::time::timeout(STOPPING_RPC_TIMEOUT, rpc).await.unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded("the coordinator did not answer while the worker was stopping"))
        })
    }

    /// Sleeps for `duration` unless the signal fires first.
    async fn sleep(&mut self, duration: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(duration) => {}
            _ = self.signalled() => {}
        }
    }
}

/// How long the coordinator has been unreachable, against [`WorkerConfig::give_up_after`].
struct Reach {
    since: Option<Instant>,
    limit: Option<Duration>,
    /// The coordinator has answered over this URL once: its scheme is right, and an answer that
    /// looks like a scheme mismatch is a connection cut mid-call (a coordinator killed while it
    /// answered), to be retried.
    answered_once: bool,
}

impl Reach {
    fn new(limit: Option<Duration>) -> Self {
        Reach { since: None, limit, answered_once: false }
    }

    /// The coordinator answered.
    fn answered(&mut self) {
        self.since = None;
        self.answered_once = true;
    }

    /// A call of `rpc` failed with a transport error: the failure as the CLI would tell it
    /// (before the coordinator ever answered, with the address probed: a dropped connection may
    /// be a TLS server or another service on the port). `Err` once the coordinator has not
    /// answered for the limit, or at once when, before any answer, the URL's scheme is wrong or
    /// something other than a coordinator answers: no retry helps either.
    async fn failed(
        &mut self,
        config: &WorkerConfig,
        rpc: &'static str,
        status: tonic::Status,
    ) -> Result<mgd3_common::rpc::CallError, ClientError> {
        use mgd3_common::rpc::Failure;
        let since = *self.since.get_or_insert_with(Instant::now);
        let mut call = mgd3_common::rpc::CallError::of(&config.coordinator, rpc)(status);
        if !self.answered_once {
            call = call.probed().await;
            if matches!(call.failure(), Failure::SchemeMismatch | Failure::NotACoordinator) {
                return Err(ClientError::WrongScheme { source: call });
            }
        }
        match self.limit {
            Some(limit) if since.elapsed() >= limit => {
                Err(ClientError::GaveUp { url: config.coordinator.clone(), after: since.elapsed(), source: call })
            }
            _ => Ok(call),
        }
    }
}

/// Tries at reporting a shard once stopping, each bounded by [`STOPPING_RPC_TIMEOUT`].
const STOPPING_REPORT_ATTEMPTS: u32 = 2;

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((200u64 << attempt.min(6)).min(10_000))
}

fn transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Internal
            | Code::ResourceExhausted
    )
}

/// Runs the worker until it is drained or `shutdown` resolves. An unreachable coordinator is
/// retried with backoff, not an error.
///
/// # Errors
/// [`ClientError::Connect`] when the URL, CA file or token cannot be used;
/// [`ClientError::Rejected`] when the coordinator refuses the registration.
pub async fn run(
    config: WorkerConfig,
    engine: Box<dyn ShardEngine>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    let mut client = connect(&config.coordinator, config.token.as_deref(), config.tls_ca.as_deref())?;
    // Read by registration without the engine, which a running shard holds.
    let loaded = engine.loaded_models();
    let policy = engine.batch_policy();
    let engine = Arc::new(Mutex::new(engine));
    let mut stop = Stop::new(shutdown);

    let mut reach = Reach::new(config.give_up_after);
    // This run's identity: a second live process (or run) under the same worker id is refused.
    let instance = format!("{:016x}", rand::random::<u64>());
    let Some(mut heartbeat) = register(&mut client, &config, &instance, &loaded, policy, &mut stop, &mut reach).await?
    else {
        return Ok(());
    };

    let mut outputs: HashMap<String, Location> = HashMap::new();
    let mut current: Option<Running> = None;
    let mut wait = Duration::ZERO;
    let mut failures = 0u32;
    loop {
        if stop.fired
            && let Some(running) = &current
        {
            running.cancel.store(true, Ordering::Relaxed);
        }
        if let Some(running) = &current
            && running.clock.expired(Instant::now())
            && !running.cancel.swap(true, Ordering::Relaxed)
        {
            warn!(
                lease = %running.lease.lease_id,
                job = %running.lease.job_id,
                coordinator = %config.coordinator,
                timeout_s = running.clock.timeout.unwrap_or_default().as_secs_f64(),
                "the coordinator has not renewed this lease for its whole timeout: stopping the shard (the coordinator may lease it to another worker; committed classes stay)"
            );
        }
        tokio::select! {
            _ = stop.signalled() => {
                match &current {
                    Some(_) => info!(worker = %config.worker_id, "shutting down: stopping after the current batch"),
                    None => info!(worker = %config.worker_id, "shutting down"),
                }
                continue;
            }
            outcome = async { (&mut current.as_mut().expect("guarded").task).await }, if current.is_some() => {
                let running = current.take().expect("guarded");
                let outcome = outcome.unwrap_or_else(|e| {
                    Err(ShardError::shard(ShardFailure::Reported { message: format!("shard task panicked: {e}"), retryable: true }))
                });
                let committed = running.progress.classes.load(Ordering::Relaxed);
                report(&mut client, &config, &running.lease, outcome, committed, &mut stop, &mut reach).await?;
                wait = Duration::ZERO;
                continue;
            }
            _ = tokio::time::sleep(wait) => {}
        }
        if stop.fired && current.is_none() {
            // Nothing left to release (a cancelled shard was reported above). One poll saying
            // so, that the coordinator logs this worker as stopping, not as silent (died or cut
            // off) three heartbeats later; bounded, as the coordinator may be down or stopping
            // too, and its answer does not matter.
            let farewell = poll_request(&config, &instance, &loaded, Vec::new(), true);
            let _ = tokio::time::timeout(FAREWELL_TIMEOUT, client.poll_work(farewell)).await;
            info!(worker = %config.worker_id, "stopped");
            return Ok(());
        }
        let running = current.iter().map(|r| {
            proto::RunningLease::from(RunningLease {
                lease_id: r.lease.lease_id.clone(),
                classes_done: r.progress.classes.load(Ordering::Relaxed),
                images_done: r.progress.images.load(Ordering::Relaxed),
                image_steps_done: r.progress.image_steps.load(Ordering::Relaxed),
            })
        });
        let request = poll_request(&config, &instance, &loaded, running.collect(), stop.fired);
        let sent = Instant::now();
        let response = match stop.rpc(client.poll_work(request)).await {
            Ok(response) => {
                failures = 0;
                reach.answered();
                response.into_inner()
            }
            Err(status) if status.code() == Code::NotFound => {
                // The coordinator restarted (or forgot this worker): register again; the running
                // shard's lease, recovered from its state, is renewed by the next poll.
                info!(worker = %config.worker_id, coordinator = %config.coordinator, "the coordinator restarted: registering again");
                if let Some(interval) =
                    register(&mut client, &config, &instance, &loaded, policy, &mut stop, &mut reach).await?
                {
                    heartbeat = interval;
                }
                wait = Duration::ZERO;
                continue;
            }
            // Another process took this worker id over while this one was silent (stopped,
            // cut off): the two must not run the same shards. This one stops.
            Err(status) if status.code() == Code::AlreadyExists => {
                if let Some(running) = &current {
                    running.cancel.store(true, Ordering::Relaxed);
                }
                let source = mgd3_common::rpc::CallError::of(&config.coordinator, "PollWork")(status);
                return Err(ClientError::Rejected { worker: config.worker_id.clone(), source });
            }
            // Stopping: the running shard (if any) is told to stop at the top of the loop.
            Err(_) if stop.fired => {
                wait = Duration::from_millis(100);
                continue;
            }
            Err(status) => {
                failures += 1;
                wait = backoff(failures);
                match reach.failed(&config, "PollWork", status).await {
                    Ok(call) => {
                        warn!(worker = %config.worker_id, error = %call, retry_in_ms = wait.as_millis() as u64, "poll failed");
                    }
                    Err(gave_up) => {
                        if let Some(running) = &current {
                            running.cancel.store(true, Ordering::Relaxed);
                        }
                        return Err(gave_up);
                    }
                }
                continue;
            }
        };
        if let Some(running) = &mut current {
            if response.revoked.contains(&running.lease.lease_id) {
                // Said once: the coordinator answers every poll until the shard has stopped.
                if !running.progress.revoked.swap(true, Ordering::Relaxed) {
                    info!(lease = %running.lease.lease_id, "the coordinator revoked this lease (job cancelled, or leased elsewhere): stopping it before its next DiT call");
                }
                running.stop_now.store(true, Ordering::Relaxed);
                running.cancel.store(true, Ordering::Relaxed);
            } else {
                running.clock.renewed_by(sent);
            }
        }
        wait = heartbeat;
        match response.action {
            Some(Action::Lease(lease)) => match start(&config, lease, sent, &engine, &mut outputs) {
                Ok(running) => current = Some(running),
                Err((lease, error)) => {
                    let failure = Failure {
                        worker_id: config.worker_id.clone(),
                        lease_id: lease,
                        class: None,
                        error,
                        disposition: Disposition::GiveUp,
                        classes_committed: 0,
                    };
                    let _ = stop.rpc(client.fail_shard(proto::FailShardRequest::from(failure))).await;
                    wait = Duration::ZERO;
                }
            },
            Some(Action::WaitMs(ms)) => wait = Duration::from_millis(ms.max(10)),
            Some(Action::Drain(_)) if current.is_none() => {
                info!(worker = %config.worker_id, "drained: exiting");
                return Ok(());
            }
            _ => {}
        }
    }
}

/// Registers with the coordinator, retrying while it is unreachable. Returns the heartbeat
/// interval, or `None` when the shutdown signal came first.
/// How long a worker whose id is in use keeps registering before it gives up (or its give-up
/// time, when shorter): long enough for a killed previous process under the same id to lapse
/// (three heartbeats).
const ID_IN_USE_WAIT: Duration = Duration::from_secs(30);

async fn register<F: Future<Output = ()>>(
    client: &mut Client,
    config: &WorkerConfig,
    instance: &str,
    loaded: &LoadedModels,
    policy: Option<BatchPolicy>,
    stop: &mut Stop<F>,
    reach: &mut Reach,
) -> Result<Option<Duration>, ClientError> {
    let mut attempt = 0;
    let started = Instant::now();
    loop {
        let fingerprints = loaded.get().into_iter().collect();
        let registration = Registration {
            worker_id: config.worker_id.clone(),
            hostname: hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
            devices: config.devices.clone(),
            protocol_version: mgd3_common::PROTOCOL_VERSION,
            model_fingerprints: fingerprints,
            pid: std::process::id(),
            instance: instance.to_owned(),
            // The loaded models' policy once there are some (`--dit-rows auto` chooses the
            // DiT's rows at load), else the flags'.
            batch_policy: loaded.policy().or(policy),
        };
        match stop.rpc(client.register_worker(proto::RegisterWorkerRequest::from(registration))).await {
            _ if stop.fired => return Ok(None),
            Ok(response) => {
                reach.answered();
                let response = response.into_inner();
                info!(worker = %config.worker_id, coordinator = %config.coordinator, "registered");
                for excluded in &response.excluded {
                    warn!(worker = %config.worker_id, job = %excluded.job_id, reason = %excluded.reason, "the coordinator will lease nothing of this job to this worker");
                }
                return Ok(Some(Duration::from_millis(response.heartbeat_interval_ms.max(50))));
            }
            // The id is held by another live process: that may be this worker's own previous
            // process, killed a moment ago, whose registration lapses after three heartbeats.
            Err(status)
                if status.code() == tonic::Code::AlreadyExists
                    && started.elapsed() < config.give_up_after.unwrap_or(ID_IN_USE_WAIT).min(ID_IN_USE_WAIT) =>
            {
                reach.answered();
                attempt += 1;
                let retry_in = backoff(attempt);
                warn!(worker = %config.worker_id, error = %status.message(), retry_in_ms = retry_in.as_millis() as u64, "worker id in use; retrying in case its holder has just died");
                stop.sleep(retry_in).await;
            }
            Err(status) if transient(&status) => {
                attempt += 1;
                let retry_in = backoff(attempt);
                let call = reach.failed(config, "RegisterWorker", status).await?;
                warn!(worker = %config.worker_id, error = %call, retry_in_ms = retry_in.as_millis() as u64, "cannot register; retrying");
                stop.sleep(retry_in).await;
            }
            Err(status) => {
                let source = mgd3_common::rpc::CallError::of(&config.coordinator, "RegisterWorker")(status);
                return Err(ClientError::Rejected { worker: config.worker_id.clone(), source });
            }
        }
    }
}

/// Starts the shard of `lease`, granted by the answer to a poll sent at `sent`.
fn start(
    config: &WorkerConfig,
    lease: proto::Lease,
    sent: Instant,
    engine: &Arc<Mutex<Box<dyn ShardEngine>>>,
    outputs: &mut HashMap<String, Location>,
) -> Result<Running, (String, String)> {
    // The spec this lease carries, every time: a job id can name another spec after the
    // coordinator moved to another store, so nothing is cached by id.
    let spec: JobSpec = serde_json::from_str(&lease.spec_json)
        .map_err(|e| (lease.lease_id.clone(), format!("unreadable job spec: {e}")))?;
    let spec = Arc::new(spec);
    let output_url = spec.output.clone().unwrap_or_default();
    let out = match outputs.get(&output_url) {
        Some(out) => out.clone(),
        None => {
            let out = store::open(&output_url).map_err(|e| (lease.lease_id.clone(), mgd3_common::error_chain(&e)))?;
            outputs.insert(output_url, out.clone());
            out
        }
    };
    let lease_timeout = (lease.lease_timeout_ms > 0).then(|| Duration::from_millis(lease.lease_timeout_ms));
    let shard = ShardLease {
        lease_id: lease.lease_id,
        attempt_id: lease.attempt_id,
        attempt: lease.attempt,
        job_id: lease.job_id,
        fingerprint: lease.spec_fingerprint,
        spec,
        classes: lease.classes.into_iter().map(ClassRef::from).collect(),
        worker_id: config.worker_id.clone(),
    };
    debug!(job = %shard.job_id, lease = %shard.lease_id, classes = shard.classes.len(), attempt = shard.attempt, "starting shard");
    let progress = Arc::new(ShardProgress::default());
    let cancel = Arc::new(AtomicBool::new(false));
    let stop_now = Arc::new(AtomicBool::new(false));
    let task = {
        let (engine, lease, progress, cancel) = (engine.clone(), shard.clone(), progress.clone(), cancel.clone());
        let stop_now = stop_now.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let span = tracing::info_span!("shard", job = %lease.job_id, worker = %lease.worker_id, lease = %lease.lease_id, attempt = lease.attempt);
            let _guard = span.enter();
            let mut engine = engine.lock().expect("engine");
            engine.set_stop_now(stop_now);
            run_shard(engine.as_mut(), &runtime, &out, &lease, &progress, &cancel)
        })
    };
    Ok(Running { lease: shard, progress, cancel, stop_now, task, clock: LeaseClock::granted(lease_timeout, sent) })
}

/// Reports a finished shard, retrying while the coordinator is unreachable; once stopping, at
/// most [`STOPPING_REPORT_ATTEMPTS`] bounded tries (the commits are in the store either way, and
/// an unreported lease expires). A failure carries `classes_committed`, the shard's classes with
/// markers when the attempt ended.
///
/// # Errors
/// [`ClientError::GaveUp`] when the coordinator has not answered for
/// [`WorkerConfig::give_up_after`] (counted with the polls before, through `reach`): a worker
/// whose coordinator died mid-shard must not retry for ever.
async fn report<F: Future<Output = ()>>(
    client: &mut Client,
    config: &WorkerConfig,
    lease: &ShardLease,
    outcome: ShardOutcome,
    classes_committed: u32,
    stop: &mut Stop<F>,
    reach: &mut Reach,
) -> Result<(), ClientError> {
    let worker_id = config.worker_id.clone();
    let lease_id = lease.lease_id.clone();
    let mut stopping_attempts = 0;
    for attempt in 0u32.. {
        stopping_attempts += stop.fired as u32;
        let result = match &outcome {
            Ok(report) => {
                debug!(lease = %lease_id, images = report.images, seconds = report.seconds, "shard done");
                let completion = Completion {
                    worker_id: worker_id.clone(),
                    lease_id: lease_id.clone(),
                    manifest_digest: report.digest.clone(),
                    images: report.images,
                    seconds: report.seconds,
                };
                stop.rpc(client.complete_shard(proto::CompleteShardRequest::from(completion))).await.map(|_| ())
            }
            Err(failed) => {
                let disposition = failed.failure.disposition();
                let error = failed.failure.describe();
                match (disposition, failed.class.as_deref()) {
                    (Disposition::Release, _) => {}
                    (Disposition::Elsewhere, _) => {
                        warn!(lease = %lease_id, %error, "this worker cannot run the job: it goes to other workers")
                    }
                    (Disposition::Retry, Some(class)) => {
                        warn!(lease = %lease_id, class, %error, "shard failed; it will be retried")
                    }
                    (Disposition::Retry, None) => warn!(lease = %lease_id, %error, "shard failed; it will be retried"),
                    (Disposition::GiveUp, Some(class)) => {
                        warn!(lease = %lease_id, class, %error, "shard failed for good")
                    }
                    (Disposition::GiveUp, None) => warn!(lease = %lease_id, %error, "shard failed for good"),
                    (Disposition::Pause, _) => {
                        warn!(lease = %lease_id, %error, "the output store refuses writes: the job is paused")
                    }
                }
                let failure = Failure {
                    worker_id: worker_id.clone(),
                    lease_id: lease_id.clone(),
                    class: failed.class.clone(),
                    error,
                    disposition,
                    classes_committed,
                };
                stop.rpc(client.fail_shard(proto::FailShardRequest::from(failure))).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                reach.answered();
                if attempt > 0 {
                    info!(lease = %lease_id, tries = attempt + 1, "shard reported");
                }
                return Ok(());
            }
            Err(status) if transient(&status) && stopping_attempts < STOPPING_REPORT_ATTEMPTS => {
                let rpc = if outcome.is_ok() { "CompleteShard" } else { "FailShard" };
                match reach.failed(config, rpc, status).await {
                    // Said once; the retries (every 0.2 s growing to 10 s) go to DEBUG.
                    Ok(call) if attempt == 0 => {
                        warn!(lease = %lease_id, error = %call, "could not report the shard; retrying until the coordinator answers")
                    }
                    Ok(call) => {
                        debug!(lease = %lease_id, error = %call, attempt, "could not report the shard; retrying")
                    }
                    Err(gave_up) => {
                        warn!(lease = %lease_id, "could not report the shard");
                        return Err(gave_up);
                    }
                }
                stop.sleep(backoff(attempt)).await;
            }
            // Stopping, and the coordinator is unreachable: the lease is not given back, it
            // expires on the coordinator (committed classes stay).
            Err(status) if transient(&status) => {
                warn!(lease = %lease_id, coordinator = %config.coordinator, error = %status.message(),
                    "stopping without reaching the coordinator: the lease expires there after the job's lease_timeout_s and its shard is requeued then (committed classes stay)");
                return Ok(());
            }
            // Giving back a lease the coordinator already took back (revoked, cancelled) is
            // expected, not a problem.
            Err(status) if matches!(&outcome, Err(f) if f.failure.disposition() == Disposition::Release) => {
                reach.answered();
                info!(lease = %lease_id, reason = %status.message(), "lease already given back");
                return Ok(());
            }
            Err(status) => {
                warn!(lease = %lease_id, coordinator = %config.coordinator, error = %status.message(), "shard report not accepted");
                return Ok(());
            }
        }
    }
    unreachable!("an attempt counter of u32 runs out only after years of backoff")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On tokio's paused clock. A lease expires one whole timeout after the last poll the
    /// coordinator answered was *sent* (it renewed no earlier), not after the answer came; an
    /// answer to an older poll never moves the renewal back.
    #[tokio::test(start_paused = true)]
    async fn a_lease_expires_one_timeout_after_the_last_renewing_poll_was_sent() {
        let timeout = Duration::from_secs(60);
        let granted = Instant::now();
        let mut clock = LeaseClock::granted(Some(timeout), granted);
        tokio::time::sleep(Duration::from_secs(20)).await;
        let sent = Instant::now();
        // The answer takes 15 s to arrive (a slow coordinator).
        tokio::time::sleep(Duration::from_secs(15)).await;
        clock.renewed_by(sent);
        clock.renewed_by(granted);
        assert_eq!(clock.renewed, sent);
        tokio::time::sleep(timeout - Duration::from_secs(15) - Duration::from_millis(1)).await;
        assert!(!clock.expired(Instant::now()), "1 ms before the timeout");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(clock.expired(Instant::now()), "at the timeout");
        assert_eq!(Instant::now() - sent, timeout);
        // A coordinator that gave no timeout never has the worker stop on its own.
        let open = LeaseClock::granted(None, granted);
        assert!(!open.expired(Instant::now() + Duration::from_secs(86_400)));
    }

    /// On tokio's paused clock. An unreachable coordinator is retried until it has not
    /// answered for `give_up_after`, counted from the first failure since its last answer.
    #[tokio::test(start_paused = true)]
    async fn an_unreachable_coordinator_is_given_up_after_exactly_its_limit() {
        let limit = Duration::from_secs(300);
        let config = WorkerConfig { give_up_after: Some(limit), ..WorkerConfig::new("http://127.0.0.1:1", "w") };
        let mut reach = Reach::new(config.give_up_after);
        reach.answered();
        let unavailable = || tonic::Status::unavailable("connection refused");
        reach.failed(&config, "PollWork", unavailable()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(200)).await;
        // An answer in between starts the count again.
        reach.answered();
        reach.failed(&config, "PollWork", unavailable()).await.unwrap();
        tokio::time::sleep(limit - Duration::from_millis(1)).await;
        reach.failed(&config, "PollWork", unavailable()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        match reach.failed(&config, "PollWork", unavailable()).await {
            Err(ClientError::GaveUp { after, .. }) => assert_eq!(after, limit),
            other => panic!("expected GaveUp, got {other:?}"),
        }
        let never = WorkerConfig { give_up_after: None, ..config.clone() };
        let mut patient = Reach::new(None);
        patient.failed(&never, "PollWork", unavailable()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(86_400)).await;
        patient.failed(&never, "PollWork", unavailable()).await.unwrap();
    }
}
