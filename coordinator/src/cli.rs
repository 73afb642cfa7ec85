//! The `coordinator` command line: `serve`, the client commands (`submit`, `status`, `resume`,
//! `cancel`, `list`) and `run`, the embedded default — a coordinator on loopback, N local
//! `worker` processes, the job submitted and awaited.

use mgd3_common::{errln, out, outln};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use mgd3_common::job::DataChange;
use mgd3_common::proto;
use mgd3_common::rpc::{CallError, Client, connect, read_token_file};
use mgd3_common::status::{JobState, JobStatus, VerifyReport};
use mgd3_common::sweep::{Sweep, SweepRecord};
use tokio::net::TcpListener;

use crate::grpc::serve;
use crate::progress::{
    DEFAULT_PROGRESS_EVERY_S, Progress, ProgressOptions, describe, job_status, progress_line, wait_for,
};
use crate::service::{Coordinator, ServeConfig};

/// How long `check` retries a store that does not answer before saying so (a coordinator and
/// its workers retry for [`mgd3_common::store::STORE_RETRY_TIMEOUT`]).
const CHECK_STORE_PATIENCE: Duration = Duration::from_secs(30);

/// The `coordinator` command line, parsed by clap.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about = "mgd3 coordinator: distributes MGD³ distillation over workers")]
pub struct Cli {
    /// The subcommand to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The `coordinator` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the coordinator.
    Serve(ServeArgs),
    /// Submit a job.toml; prints the job id.
    Submit(SubmitArgs),
    /// Progress of one job (or of all jobs).
    Status(StatusArgs),
    /// Re-queue every shard without a commit marker (failed or missing).
    Resume(ResumeArgs),
    /// Cancel a job.
    Cancel(JobArgs),
    /// Forget a job (or a sweep: each of its jobs) that is not running: its records go, its images stay
    ///
    /// Deletes the job's records (job.json, state.json) and drops it from the coordinator; its
    /// outputs (images, markers, manifest) stay, and submitting the same spec again brings it
    /// back with its committed classes. The way out for a quarantined job that keeps its
    /// finished images. Refused while the job runs (`coordinator cancel` it first).
    Forget(JobArgs),
    /// Check every published file of a job against the sha256 in its class's marker, and that
    /// class folders hold nothing else; exits non-zero on any problem (`resume` repairs). With
    /// --job-dir, offline: no coordinator needed.
    Verify(JobDirArgs),
    /// List jobs.
    List(ListArgs),
    /// Wait until the coordinator serves (the standard gRPC health check); exits 0 once it does,
    /// 1 after --timeout-s. For launch scripts: `coordinator ready --coordinator URL && ...`.
    Ready(ReadyArgs),
    /// Run a job on this machine: a coordinator on loopback, N local worker processes and the
    /// job, awaited; exits 0 when the job succeeded. Running it again continues the job. A spec
    /// with a `[sweep]` table runs every variant and writes the sweep's comparison page.
    #[command(after_help = "Examples:\n  \
        coordinator run examples/fashion-mnist.toml --local-workers 2\n  \
        coordinator run job.toml --device cuda --devices 0,1,2,3     # one worker per GPU\n  \
        coordinator run job.toml --local-workers 2 -- --threads 1 --max-batch 32")]
    Run(RunArgs),
    /// Dry run of a submit, offline: validates the spec, lists and checks the dataset (every
    /// class folder present with at least IPC images), fingerprints the models, and prints the
    /// job id, classes with labels and image counts, shards and the output. Exits non-zero with
    /// every problem at once.
    Check(CheckArgs),
    /// Reads and validates a job.toml offline and prints it as JSON, relative paths resolved
    /// against the spec's folder (`--get output` prints one setting: what scripts use instead of
    /// parsing TOML themselves).
    Spec(SpecArgs),
    /// Write a job's report: a static HTML site (index.html, a page per class with its contact
    /// sheet wrapped into labelled rows, its diversity and representativeness and a latent-space
    /// plot) and overview.png. Opens from a file or from object storage; fetches nothing.
    ///
    /// Given a sweep's id, the sweep's comparison page (each variant's report first) in
    /// `<output>/sweeps/<sweep>/report/`.
    #[command(after_help = "Examples:\n  \
        coordinator report JOB                      # into <output>/jobs/JOB/report/\n  \
        coordinator report JOB --out ~/reports/JOB  # elsewhere, contact sheets copied\n  \
        coordinator report JOB --job-dir out/fashion-mnist/jobs/JOB   # offline, no coordinator\n  \
        coordinator report SWEEP                    # the comparison page of a sweep's variants\n  \
        coordinator report SWEEP --job-dir out/fashion-mnist          # offline: the sweep's output folder")]
    Report(ReportArgs),
    /// Export a job's distilled images as the .npz of DiT's sample_ddp.py (`arr_0`, uint8
    /// `[N,H,W,3]` RGB, class by class in the job's order), the input of the ADM evaluation suite
    /// (FID, sFID, IS, precision, recall).
    #[command(after_help = "Example:\n  \
        coordinator export JOB --npz samples.npz\n  \
        python evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz   # guided-diffusion's evaluations/")]
    Export(ExportArgs),
}

impl Command {
    /// The command's way to the coordinator, for those that talk to one.
    /// The coordinator connection the command uses; none where it asks no coordinator (a job
    /// folder named with --job-dir is read directly: another coordinator on this host, serving
    /// another store, is neither looked for nor named).
    fn connection(&mut self) -> Option<&mut Connection> {
        match self {
            Command::Submit(args) => Some(&mut args.connection),
            Command::Status(args) => Some(&mut args.connection),
            Command::Resume(args) => Some(&mut args.connection),
            Command::Cancel(args) | Command::Forget(args) => Some(&mut args.connection),
            Command::Verify(args) if args.job_dir.is_some() => None,
            Command::Verify(args) => Some(&mut args.connection),
            Command::List(args) => Some(&mut args.connection),
            Command::Ready(args) => Some(&mut args.connection),
            Command::Report(args) if args.job.job_dir.is_some() => None,
            Command::Export(args) if args.job.job_dir.is_some() => None,
            Command::Report(args) => Some(&mut args.job.connection),
            Command::Export(args) => Some(&mut args.job.connection),
            Command::Serve(_) | Command::Run(_) | Command::Check(_) | Command::Spec(_) => None,
        }
    }
}

/// What `list` and `status` say, on standard error, when the coordinator has no jobs.
const NO_JOBS: &str = "no jobs (`coordinator submit <spec>` adds one)";

/// Where a job's output folder is: named, or asked of the coordinator.
#[derive(Debug, Args)]
pub struct JobDirArgs {
    /// The job id.
    pub job: String,
    /// The job's output folder `<output>/jobs/<job>` (a path or URL); without it the coordinator
    /// is asked where the job's output is.
    #[arg(long)]
    pub job_dir: Option<String>,
    /// How to reach the coordinator (when --job-dir is not given).
    #[command(flatten)]
    pub connection: Connection,
}

impl JobDirArgs {
    async fn location(&self) -> Result<mgd3_common::store::Location> {
        let (url, known) = match &self.job_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                let mut client = self.connection.client()?;
                let status = job_status(&mut client, &self.connection.coordinator, &self.job).await.with_context(|| {
                    format!(
                        "asking the coordinator where job `{}` is; without a coordinator, pass the folder: --job-dir <output>/jobs/{}",
                        self.job, self.job
                    )
                })?;
                (status.output.clone(), Some(status))
            }
        };
        // The coordinator knows the job and nothing of it is committed: there is nothing to read
        // (the folder, when the output is not the store, is made by the first commit).
        if let Some(status) = known
            && status.classes_done == 0
        {
            anyhow::bail!(
                "job `{}` ({}) has no committed class yet, so its folder `{url}` holds nothing to read; `coordinator \
                 status {}` shows its progress",
                self.job,
                status.state,
                self.job
            );
        }
        // Opening a local store creates its folder: a mistyped folder must not be made.
        if missing_local_folder(&url) {
            return Err(crate::report::ReportError::NoFolder { url }.into());
        }
        Ok(mgd3_common::store::open(&url)?)
    }
}

/// Arguments of `coordinator report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The job and where its output is.
    #[command(flatten)]
    pub job: JobDirArgs,
    /// Write the report here (a folder or URL) with copies of the contact sheets, instead of into
    /// the job's output folder as `report/`.
    #[arg(long)]
    pub out: Option<String>,
}

/// Arguments of `coordinator export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The job and where its output is.
    #[command(flatten)]
    pub job: JobDirArgs,
    /// The .npz file to write.
    #[arg(long)]
    pub npz: PathBuf,
    /// Export the classes committed so far of a job that has not finished.
    #[arg(long)]
    pub partial: bool,
}

/// Arguments of `coordinator check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The job spec (job.toml) to check.
    pub spec: PathBuf,
    /// The coordinator's store, where a job without `output` would write.
    #[arg(long)]
    pub store: Option<String>,
    /// Also read and decode every real image of the job's classes (in parallel, with progress),
    /// as the workers will, and list every unreadable file at once; exits 1 if there is any.
    #[arg(long)]
    pub decode: bool,
}

/// Arguments of `coordinator spec`.
#[derive(Debug, Args)]
pub struct SpecArgs {
    /// The job spec (job.toml) to read.
    pub spec: PathBuf,
    /// Print only this setting (a dotted path such as `output`, `ipc` or `sampling.steps`):
    /// strings bare, anything else as JSON. Exits non-zero when the setting is not set.
    #[arg(long)]
    pub get: Option<String>,
    /// For a spec with `[sweep]`: variant N (from 1, as `coordinator check` numbers them) alone —
    /// its TOML, the spec that submitted by itself makes the same job, or with --get one of its
    /// settings.
    #[arg(long)]
    pub variant: Option<usize>,
}

/// Arguments of `coordinator serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on. Loopback by default; an address other machines can reach needs
    /// `--token-file` (or, knowingly, `--insecure-no-auth`).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Serve a non-loopback address without a bearer token: anyone who can reach the port can
    /// submit jobs and take leases. Only on a network you trust completely.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Object-store URL or local folder for coordinator state (and default job outputs).
    #[arg(long)]
    pub store: String,
    /// Require this bearer token (file contents) on every RPC. The file must be readable by its
    /// owner only (`chmod 600`).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Use a --token-file that other users can read.
    #[arg(long)]
    pub insecure_token_file: bool,
    /// TLS certificate (PEM) to serve https:// with; needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Worker heartbeat (poll) interval.
    #[arg(long, default_value_t = 2000)]
    pub heartbeat_ms: u64,
    /// A local folder submitted specs may name (dataset, class-list file, models, output, latent
    /// cache), in addition to the folder the coordinator was started in and, for a local store,
    /// the store (which are always allowed); repeatable. Object-store URLs are governed by their
    /// credentials instead.
    #[arg(long = "allow-path")]
    pub allow_paths: Vec<PathBuf>,
    /// One coordinator serves a store at a time (a lock object in the store): another waits
    /// this long after this one stops renewing the lock (killed) before taking the store over.
    #[arg(long, default_value_t = 30)]
    pub lock_timeout_s: u64,
    /// Tell idle workers to exit whenever every job in the store has ended (including jobs that
    /// had ended before the workers connected). For a coordinator started for one job, as
    /// `scripts/slurm/distill.sbatch` does; a long-lived coordinator keeps its workers waiting.
    #[arg(long)]
    pub drain_when_done: bool,
}

/// How client commands reach the coordinator.
#[derive(Debug, Args, Clone)]
pub struct Connection {
    /// Coordinator URL (http:// or https://). Default: the `coordinator run` or `serve` running on
    /// this host (the newest, if several), else http://127.0.0.1:50051.
    #[arg(long = "coordinator", env = "MGD3_COORDINATOR", value_name = "URL")]
    pub coordinator_arg: Option<String>,
    /// The URL used: `--coordinator`, else found ([`Connection::resolve`]).
    #[arg(skip)]
    pub coordinator: String,
    /// Bearer token file (the one the coordinator was started with), sent with every RPC; mode
    /// 600 (a file others can read is refused). MGD3_TOKEN_FILE, as the sbatch scripts take it.
    #[arg(long, env = "MGD3_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Use a --token-file that other users can read.
    #[arg(long)]
    pub insecure_token_file: bool,
    /// CA certificate (PEM) for an https:// coordinator with a private CA.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
}

/// Where `serve` listens by default, and so where clients look when nothing else says.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:50051";

impl Connection {
    /// Settles the URL (and, when none was given, the token file) to use: `--coordinator` (or
    /// `MGD3_COORDINATOR`) as given; else the coordinator running on this host that announced
    /// itself ([`crate::runtime`]: a `coordinator run` on its random port, a `serve`), the newest
    /// when several do (said on stderr); else [`DEFAULT_COORDINATOR`].
    pub fn resolve(&mut self) {
        if let Some(url) = &self.coordinator_arg {
            self.coordinator = url.clone();
            return;
        }
        let running = crate::runtime::running();
        let Some(newest) = running.first() else {
            self.coordinator = DEFAULT_COORDINATOR.to_owned();
            return;
        };
        if running.len() > 1 {
            let others: Vec<String> = running[1..].iter().map(|r| format!("{} (store {})", r.url, r.store)).collect();
            errln!(
                "note: using the newest coordinator on this host, {} (store {}); also running: {}; pass --coordinator to choose",
                newest.url,
                newest.store,
                others.join(", ")
            );
        }
        self.coordinator = newest.url.clone();
        if self.token_file.is_none() {
            self.token_file = newest.token_file.as_ref().map(PathBuf::from);
        }
    }

    fn client(&self) -> Result<Client> {
        let token = self.token_file.as_deref().map(|p| read_token_file(p, self.insecure_token_file)).transpose()?;
        Ok(connect(&self.coordinator, token.as_deref(), self.tls_ca.as_deref())?)
    }
}

/// Arguments of `coordinator submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job spec (job.toml); relative paths in it are resolved against its folder.
    pub spec: PathBuf,
    /// Show live progress and exit non-zero when any shard failed.
    #[arg(long)]
    pub wait: bool,
    /// Explicit job id (default: `<name>-<fingerprint prefix>`).
    #[arg(long)]
    pub job_id: Option<String>,
    /// How `--wait` shows progress.
    #[command(flatten)]
    pub progress: ProgressArgs,
    /// What to do when the job exists and some classes' data changed.
    #[command(flatten)]
    pub data: DataChangeArgs,
    /// What to do when the job exists and has failed.
    #[command(flatten)]
    pub retry: RetryArgs,
    /// How to reach the coordinator.
    #[command(flatten)]
    pub connection: Connection,
}

/// What a command does when the job exists and the data of some of its classes changed since
/// the job recorded it (names or sizes; content with `data_fingerprint = "content"`).
#[derive(Debug, Args)]
pub struct DataChangeArgs {
    /// Distil the classes whose data changed again, from the data as it is now, and keep every
    /// other commit (without it the command refuses and names the classes). Modification times
    /// never count: a copy (`cp -r`) or a `touch` is the same data.
    #[arg(
        long,
        env = "MGD3_ACCEPT_DATA_CHANGES",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    pub accept_data_changes: bool,
}

impl DataChangeArgs {
    /// The coordinator's setting for these flags.
    pub fn setting(&self) -> crate::service::DataChanges {
        crate::service::DataChanges::from_flag(self.accept_data_changes)
    }
}

/// What submitting a failed job's spec again does.
#[derive(Debug, Args)]
pub struct RetryArgs {
    /// When the job exists and has failed (its status names each failed class and why), run its
    /// failed shards again with fresh attempts, keeping every committed class: how to say the
    /// cause is fixed (a corrupt image replaced, a class's files restored). Without it a failed
    /// job stays failed and the command says how.
    #[arg(
        long,
        env = "MGD3_RETRY_FAILED",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    pub retry_failed: bool,
}

/// How long `submit --wait` waits while every connected worker is excluded from its job, unless
/// `--give-up-when-excluded-s` says.
const SUBMIT_EXCLUDED_GRACE: Duration = Duration::from_secs(120);

/// How a waiting command shows a job's progress.
#[derive(Debug, Args)]
pub struct ProgressArgs {
    /// Without a terminal (a Slurm log, a pipe), print a progress line this often, in seconds.
    #[arg(long, env = "MGD3_PROGRESS_EVERY_S", default_value_t = DEFAULT_PROGRESS_EVERY_S)]
    pub progress_every_s: u64,
    /// Show no progress (the final status is still printed).
    #[arg(long)]
    pub quiet: bool,
    /// Stop waiting (exit 3, with every worker's reason) once every connected worker has been
    /// excluded from the job for this many seconds: no one will run it. 0 waits for ever.
    /// Default: 120 for `submit --wait` (a cluster's next worker may come); `coordinator run`
    /// stops at once, as its local workers are all it has.
    #[arg(long, env = "MGD3_GIVE_UP_WHEN_EXCLUDED_S")]
    pub give_up_when_excluded_s: Option<u64>,
}

impl ProgressArgs {
    /// How long every connected worker may be excluded before the wait stops (`None`: never),
    /// `default` unless the flag says.
    pub fn excluded_grace(&self, default: Duration) -> Option<Duration> {
        match self.give_up_when_excluded_s {
            Some(0) => None,
            Some(seconds) => Some(Duration::from_secs(seconds)),
            None => Some(default),
        }
    }

    /// The options these flags ask for.
    pub fn options(&self) -> ProgressOptions {
        ProgressOptions { quiet: self.quiet, every: Duration::from_secs(self.progress_every_s.max(1)) }
    }
}

/// Arguments of `coordinator status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The job id (default: every job).
    pub job: Option<String>,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print only this field of the JSON status of JOB (a dotted path such as `state` or
    /// `shards.done`): strings bare, anything else as JSON.
    #[arg(long, requires = "job", conflicts_with = "json")]
    pub get: Option<String>,
    /// One line per job, as `submit --wait` prints progress without a terminal (for logs).
    #[arg(long, conflicts_with_all = ["json", "get"])]
    pub oneline: bool,
    /// How to reach the coordinator.
    #[command(flatten)]
    pub connection: Connection,
}

/// Arguments of `coordinator resume`.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The job id to resume.
    pub job: String,
    /// Refuse unless this job.toml has the job's fingerprint.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// What to do about classes whose data changed.
    #[command(flatten)]
    pub data: DataChangeArgs,
    /// How to reach the coordinator.
    #[command(flatten)]
    pub connection: Connection,
}

/// Arguments of the commands about one job (`cancel`, `verify`).
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job id.
    pub job: String,
    /// How to reach the coordinator.
    #[command(flatten)]
    pub connection: Connection,
}

/// Arguments of `coordinator list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print the jobs as JSON.
    #[arg(long)]
    pub json: bool,
    /// How to reach the coordinator.
    #[command(flatten)]
    pub connection: Connection,
}

/// Arguments of `coordinator ready`.
#[derive(Debug, Args)]
pub struct ReadyArgs {
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    pub timeout_s: f64,
    /// How to reach the coordinator (the health check needs no token).
    #[command(flatten)]
    pub connection: Connection,
}

/// Asks the coordinator's health service until it says SERVING or `args.timeout_s` passed.
async fn ready(args: &ReadyArgs) -> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let url = &args.connection.coordinator;
    let channel = mgd3_common::rpc::channel(url, args.connection.tls_ca.as_deref())?;
    let mut client = HealthClient::new(channel);
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(args.timeout_s.max(0.0));
    let service =
        <proto::coordinator_server::CoordinatorServer<crate::grpc::Service> as tonic::server::NamedService>::NAME;
    loop {
        let answer = client.check(HealthCheckRequest { service: service.into() }).await;
        let last = match answer {
            Ok(response) if response.get_ref().status == ServingStatus::Serving as i32 => return Ok(()),
            Ok(response) => format!("status {:?}", response.get_ref().status()),
            Err(status) => CallError::of(url, "Health.Check")(status).to_string(),
        };
        if std::time::Instant::now() >= deadline {
            bail!("the coordinator at {url} is not serving after {} s: {last}", args.timeout_s);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Arguments of `coordinator run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job spec (job.toml) to run.
    pub spec: PathBuf,
    /// Worker processes to start on this machine (default: one per `--devices` GPU, else 1).
    #[arg(long)]
    pub local_workers: Option<usize>,
    /// Where the local workers run their models: `cpu` (the default without `--devices`), or
    /// `cuda` to give worker i its own GPU (`cuda:i`, or the i-th of `--devices`).
    #[arg(long, value_enum)]
    pub device: Option<LocalDevice>,
    /// The GPUs the local workers take, one each in turn (e.g. `--devices 0,2,3`); implies
    /// `--device cuda`.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<u32>,
    /// Coordinator state (default: the job's `output`, else ./out).
    #[arg(long)]
    pub store: Option<String>,
    /// The `worker` binary (default: next to this one).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// One argument passed to every worker, written with `=`: `--worker-arg=--threads=1`;
    /// repeatable. Arguments after `--` go to every worker too:
    /// `coordinator run job.toml -- --threads 1 --max-batch 32`.
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    pub worker_args: Vec<String>,
    /// Arguments after `--`, passed to every worker.
    #[arg(last = true)]
    pub trailing_worker_args: Vec<String>,
    /// Worker heartbeat (poll) interval of the embedded coordinator, in ms.
    #[arg(long, default_value_t = 500)]
    pub heartbeat_ms: u64,
    /// Do not write the job's HTML report (`<output>/jobs/<job>/report/index.html`) when it succeeds.
    #[arg(long)]
    pub no_report: bool,
    /// How progress is shown.
    #[command(flatten)]
    pub progress: ProgressArgs,
    /// What to do when the job exists and some classes' data changed.
    #[command(flatten)]
    pub data: DataChangeArgs,
    /// What to do when the job exists and has failed.
    #[command(flatten)]
    pub retry: RetryArgs,
}

impl RunArgs {
    /// What the run's submit may do to an existing job.
    fn resubmit(&self) -> crate::service::Resubmit {
        crate::service::Resubmit { data: self.data.setting(), retry_failed: self.retry.retry_failed }
    }
}

impl TryFrom<&ServeArgs> for ServeConfig {
    type Error = anyhow::Error;

    /// The serving settings the flags ask for, with the token and TLS files read; nothing is
    /// opened or bound.
    ///
    /// # Errors
    /// A token, certificate or key file that cannot be read (or an empty token file).
    fn try_from(args: &ServeArgs) -> Result<Self> {
        let token = args.token_file.as_deref().map(|p| read_token_file(p, args.insecure_token_file)).transpose()?;
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some((
                std::fs::read(cert).with_context(|| format!("cannot read TLS certificate `{}`", cert.display()))?,
                std::fs::read(key).with_context(|| format!("cannot read TLS key `{}`", key.display()))?,
            )),
            _ => None,
        };
        Ok(ServeConfig { store_url: args.store.clone(), token, tls, heartbeat_ms: args.heartbeat_ms })
    }
}

/// The output root of a job folder `<output>/jobs/<job>` (`None` when `dir` is not one).
fn output_root(dir: &mgd3_common::store::Location, job: &str) -> Option<mgd3_common::store::Location> {
    let url = dir.url.trim_end_matches('/');
    let root = url.strip_suffix(&format!("/jobs/{job}")).or_else(|| url.strip_suffix(&format!("jobs/{job}")))?;
    mgd3_common::store::open(if root.is_empty() { "." } else { root }).ok()
}

/// The URL other machines reach a coordinator listening on `address` at: the host's name when it
/// listens on every interface.
pub(crate) fn advertised_url(address: &std::net::SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    let host = if address.ip().is_unspecified() {
        hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "localhost".into())
    } else if address.is_ipv6() {
        format!("[{}]", address.ip())
    } else {
        address.ip().to_string()
    };
    format!("{scheme}://{host}:{}", address.port())
}

fn read_spec(path: &Path) -> Result<(String, String)> {
    // Not read at all when it is larger than any spec may be (a file given by mistake).
    if let Ok(meta) = std::fs::metadata(path)
        && meta.is_file()
        && meta.len() > mgd3_common::job::MAX_SPEC_BYTES as u64
    {
        return Err(anyhow::Error::new(mgd3_common::job::JobError::TooLarge {
            bytes: meta.len() as usize,
            max: mgd3_common::job::MAX_SPEC_BYTES,
        })
        .context(format!("job spec `{}`", path.display())));
    }
    // Read with a bound: a device or pipe given by mistake (`/dev/zero`) has no size to check.
    let mut bytes = Vec::new();
    {
        use std::io::Read as _;
        std::fs::File::open(path)
            .and_then(|file| file.take(mgd3_common::job::MAX_SPEC_BYTES as u64 + 1).read_to_end(&mut bytes))
            .with_context(|| format!("cannot read job spec `{}`", path.display()))?;
    }
    if bytes.len() > mgd3_common::job::MAX_SPEC_BYTES {
        return Err(anyhow::Error::new(mgd3_common::job::JobError::TooLarge {
            bytes: bytes.len(),
            max: mgd3_common::job::MAX_SPEC_BYTES,
        })
        .context(format!("job spec `{}` (read no further)", path.display())));
    }
    let text = String::from_utf8(bytes)
        .with_context(|| format!("cannot read job spec `{}`: it is not UTF-8 text", path.display()))?;
    let base = std::path::absolute(path)?.parent().map(|p| p.display().to_string()).unwrap_or_default();
    Ok((text, base))
}

fn status_json(status: &JobStatus) -> serde_json::Value {
    let shards = &status.shards;
    serde_json::json!({
        "job_id": status.job_id,
        "state": status.state.as_str(),
        "shards": {"total": shards.total, "done": shards.done, "running": shards.running,
                   "pending": shards.pending, "failed": shards.failed},
        "classes": {"done": status.classes_done, "total": status.classes_total},
        "images": {"done": status.images_done, "total": status.images_total},
        "images_per_second": status.images_per_second,
        "eta_seconds": status.eta_seconds,
        "workers": status.workers,
        "workers_excluded": status.workers_excluded,
        "exclusions": status.exclusions.iter().map(|e| serde_json::json!({
            "worker": e.worker_id, "reason": e.reason})).collect::<Vec<_>>(),
        "dit_rows": status.worker_rows.iter().map(|r| serde_json::json!({
            "worker": r.worker_id, "rows": r.dit_rows})).collect::<Vec<_>>(),
        "fingerprint": status.fingerprint,
        "output": status.output,
        "failures": status.failures.iter().map(|f| serde_json::json!({
            "shard": f.shard_index, "class": f.wnid, "attempts": f.attempts, "error": f.error,
            "retrying": f.retrying})).collect::<Vec<_>>(),
        // Unix ms; null while the answering coordinator holds its store.
        "store_unheld_since_unix_ms": status.store_unheld_since_unix_ms,
    })
}

/// `ListJobs` as domain statuses.
async fn list_jobs(client: &mut Client, url: &str) -> Result<Vec<JobStatus>> {
    let jobs =
        client.list_jobs(proto::ListJobsRequest {}).await.map_err(CallError::of(url, "ListJobs"))?.into_inner().jobs;
    Ok(jobs.into_iter().map(JobStatus::try_from).collect::<Result<_, _>>()?)
}

/// The sweep `id` names, or `None` when it names none (a job id, or a coordinator from before
/// sweeps, which does not know `GetSweep`).
async fn sweep_of(client: &mut Client, url: &str, id: &str) -> Result<Option<SweepRecord>> {
    match client.get_sweep(proto::GetSweepRequest { sweep_id: id.to_owned() }).await {
        Ok(answer) => Ok(Some(serde_json::from_str(&answer.into_inner().record_json)?)),
        Err(status) if matches!(status.code(), tonic::Code::NotFound | tonic::Code::Unimplemented) => Ok(None),
        Err(status) => Err(CallError::of(url, "GetSweep")(status).into()),
    }
}

/// An error about `id` as a job, when `id` has a sweep id's shape and the coordinator knows no
/// such sweep: said as a sweep's (forgotten, or of another store), as `status` says it.
fn unknown_sweep(error: anyhow::Error, id: &str) -> anyhow::Error {
    // `CancelJob` answers an unknown job with FailedPrecondition.
    let not_found = error.downcast_ref::<CallError>().is_some_and(|e| {
        e.code() == tonic::Code::NotFound
            || (e.code() == tonic::Code::FailedPrecondition && e.status.message().starts_with("unknown job"))
    });
    if looks_like_sweep(id) && not_found {
        error.context(format!(
            "`{id}` is no sweep or job this coordinator knows: forgotten (submitting the sweep's spec again brings it \
             back, its committed classes kept), or submitted to another store (`coordinator list` shows what it has)"
        ))
    } else {
        error
    }
}

/// `sweep <id>: N variants (keys)` and one line per variant: its number, settings and job id.
fn sweep_lines(record: &SweepRecord) -> Vec<String> {
    let mut lines = vec![format!(
        "sweep {}: {} variant(s) over {}",
        record.sweep_id,
        record.variants.len(),
        record.keys.join(", ")
    )];
    for (i, variant) in record.variants.iter().enumerate() {
        lines.push(format!("  {:>3}  {}  {}", i + 1, record.label(variant), variant.job_id));
    }
    lines
}

/// Waits for every variant of a sweep in turn (the scheduler runs the oldest first), showing
/// each one's progress; returns their final statuses in the sweep's order.
async fn wait_for_sweep(
    client: &mut Client,
    record: &SweepRecord,
    url: &str,
    options: ProgressOptions,
    excluded_grace: Option<Duration>,
) -> Result<Vec<JobStatus>> {
    let mut statuses = Vec::with_capacity(record.variants.len());
    for (i, variant) in record.variants.iter().enumerate() {
        if !options.quiet {
            let n = record.variants.len();
            errln!("variant {}/{n} ({}): {}", i + 1, record.label(variant), variant.job_id);
        }
        let mut progress = Progress::new(url, options);
        statuses.push(wait_for(client, &variant.job_id, &mut progress, excluded_grace).await?);
    }
    Ok(statuses)
}

/// Resumes one job (`named` as the lines say it) and tells what happened: the data changes
/// accepted, shards committed and re-queued, classes distilled again.
async fn resume_one(client: &mut Client, url: &str, request: proto::ResumeJobRequest, named: &str) -> Result<()> {
    let job = request.job_id.clone();
    let response = client.resume_job(request).await.map_err(CallError::of(url, "ResumeJob"))?.into_inner();
    if !response.data_changed.is_empty() {
        let changes: Vec<DataChange> = response.data_changed.into_iter().map(DataChange::from).collect();
        outln!("{}", crate::service::data_changes_note(&job, &changes));
    }
    outln!("job {named}: {} shard(s) committed, {} re-queued", response.committed, response.requeued);
    if !response.redone.is_empty() {
        outln!(
            "  {} class(es) whose published files could not be restored are distilled again: {}",
            response.redone.len(),
            response.redone.join(", ")
        );
    }
    if !response.sheets_restored.is_empty() {
        outln!(
            "  {} contact sheet(s) found in another class's place, put back: {}",
            response.sheets_restored.len(),
            response.sheets_restored.join(", ")
        );
    }
    if !response.sheets_removed.is_empty() {
        outln!(
            "  {} contact sheet(s) removed, not being what the attempt that committed their class wrote (distilling \
             the class again makes it anew):",
            response.sheets_removed.len()
        );
        for line in &response.sheets_removed {
            outln!("    {line}");
        }
    }
    for line in &response.sheets_left {
        errln!("warning: cannot remove {line}: move it out of the job's contact_sheets/ by hand");
    }
    Ok(())
}

/// The sweep `args.job` names and the output root its variants are under: with `--job-dir`,
/// that folder when it holds `sweeps/<id>.json` (offline); else as the coordinator knows it.
/// `None` for a job.
async fn sweep_to_report(args: &JobDirArgs) -> Result<Option<(mgd3_common::store::Location, SweepRecord)>> {
    match &args.job_dir {
        Some(dir) => {
            if missing_local_folder(dir) {
                return Ok(None);
            }
            let root = mgd3_common::store::open(dir)?;
            let key = SweepRecord::key(&args.job);
            match mgd3_common::store::get_optional(root.store.as_ref(), &root.key(&key)).await {
                Ok(Some(bytes)) => {
                    let record = serde_json::from_slice(&bytes).with_context(|| format!("`{key}` in `{dir}`"))?;
                    Ok(Some((root, record)))
                }
                _ if looks_like_sweep(&args.job) => bail!(
                    "`{dir}` holds no `{key}`: for a sweep, --job-dir is the output folder its variants write \
                     to (the one holding jobs/ and sweeps/, the spec's `output`)"
                ),
                _ => Ok(None),
            }
        }
        None => {
            let mut client = args.connection.client()?;
            match sweep_of(&mut client, &args.connection.coordinator, &args.job).await {
                Ok(Some(record)) => Ok(Some((mgd3_common::store::open(&record.output)?, record))),
                Err(error) if looks_like_sweep(&args.job) => Err(error.context(format!(
                    "asking the coordinator about sweep `{0}`; without a coordinator, pass the sweep's output folder: \
                     coordinator report {0} --job-dir <output>",
                    args.job
                ))),
                _ => Ok(None),
            }
        }
    }
}

/// Refuses `command` on a sweep id (it acts on one job), naming the sweep's jobs to give it
/// instead; nothing for a job id or a coordinator that cannot say.
async fn refuse_sweep(connection: &Connection, id: &str, command: &str) -> Result<()> {
    let Ok(mut client) = connection.client() else { return Ok(()) };
    if let Ok(Some(record)) = sweep_of(&mut client, &connection.coordinator, id).await {
        bail!(
            "`{id}` is a sweep, and `coordinator {command}` acts on one job: give each of its variants' job ids ({})",
            record.variants.iter().map(|v| v.job_id.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// An id of the shape sweep ids have (`<name>-sweep-<12 hex>`): what errors about a missing
/// coordinator or folder address as a sweep's.
fn looks_like_sweep(id: &str) -> bool {
    id.rsplit_once("-sweep-").is_some_and(|(_, hex)| hex.len() == 12 && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The sweep's variants with their states; an error unless every one succeeded. `served`: a
/// coordinator goes on serving the jobs (`submit --wait`), so `status` can say why; after a
/// `run` nothing serves them, and the failures printed above and the output folder say it.
fn exit_for_sweep(record: &SweepRecord, statuses: &[JobStatus], served: bool) -> Result<()> {
    outln!("sweep {}:", record.sweep_id);
    for (variant, status) in record.variants.iter().zip(statuses) {
        outln!("  {:<40} {:<10} {}", record.label(variant), status.state.to_string(), variant.job_id);
    }
    let failed: Vec<String> = record
        .variants
        .iter()
        .zip(statuses)
        .filter(|(_, s)| s.state != JobState::Succeeded)
        .map(|(v, s)| format!("{} ({}) {}", v.job_id, record.label(v), s.state))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} variant(s) of sweep {} did not succeed: {} ({})",
            failed.len(),
            statuses.len(),
            record.sweep_id,
            failed.join("; "),
            if served {
                "`coordinator status <job>` says why"
            } else {
                "each one's failures are named above and `coordinator verify <job> --job-dir <output>/jobs/<job>` \
                 counts what it committed; the same command with --retry-failed runs a failed one's failed shards \
                 again, and a cancelled one stays cancelled until `coordinator resume <job>` on a coordinator serving \
                 the store"
            }
        );
    }
    Ok(())
}

fn exit_for(status: &JobStatus, url: &str) -> Result<()> {
    out!("{}", describe(status, url));
    if status.state == JobState::Paused {
        errln!(
            "note: deal with what paused the job (said above: free space or fix the permissions of the output, or let \
             the other coordinator finish it), then run this command again: submitting a paused job resumes it (no \
             committed class is redone)"
        );
    }
    if status.state != JobState::Succeeded {
        bail!("job {} ended {}", status.job_id, status.state);
    }
    Ok(())
}

/// `check --decode`: decodes every image of `classes` (of `counts` images each) and prints each
/// unreadable one and what its class would keep without them. Returns how many are unreadable.
///
/// # Errors
/// A class that cannot be listed.
async fn decode_and_tell(
    root: &mgd3_common::imagefolder::Root,
    classes: &[mgd3_common::job::ClassRef],
    counts: &[usize],
    ipc: usize,
) -> Result<usize> {
    let parallel = 2 * std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = std::time::Instant::now();
    let report = crate::decodecheck::decode_all(root, classes, parallel, false).await?;
    let seconds = started.elapsed().as_secs_f64();
    if report.unreadable.is_empty() {
        outln!(
            "decoded all {} images ({:.1} MB) in {seconds:.1} s: every one is readable",
            report.images,
            report.bytes as f64 / 1e6
        );
        return Ok(0);
    }
    outln!(
        "{} of {} images cannot be used (each would fail its class during the run):",
        report.unreadable.len(),
        report.images
    );
    for bad in &report.unreadable {
        outln!("  {}: {}: {}", bad.class, bad.image, bad.problem);
    }
    for (class, count) in classes.iter().zip(counts) {
        let bad = report.unreadable.iter().filter(|b| b.class == class.wnid).count();
        if bad > 0 {
            let left = count.saturating_sub(bad);
            outln!(
                "  class {} would keep {left} images once these are removed{}",
                class.wnid,
                if left < ipc {
                    format!(", fewer than IPC {ipc}: replace them instead")
                } else {
                    format!(", enough for IPC {ipc}")
                }
            );
        }
    }
    Ok(report.unreadable.len())
}

/// `check --decode` of a spec refused for other problems: decodes the images of every class that
/// lists (said first), so that one check names them too. Silent when the spec does not read or
/// its dataset cannot be opened (the refusal says so).
async fn decode_listable(text: &str, base: &Path) {
    let Ok(mut spec) = mgd3_common::job::JobSpec::from_toml(text) else { return };
    spec.resolve_paths(base);
    let Some((root, classes)) = crate::submit::listable_classes(&spec).await else { return };
    let mut listed = Vec::new();
    let mut counts = Vec::new();
    for class in classes {
        if let Ok(listing) = root.list_class(&class.wnid).await {
            counts.push(listing.images.len());
            listed.push(class);
        }
    }
    if listed.is_empty() {
        return;
    }
    outln!("the spec is refused (below); the images of the {} class(es) that list were decoded anyway:", listed.len());
    if let Err(error) = decode_and_tell(&root, &listed, &counts, spec.ipc).await {
        outln!("  (decoding stopped: {error:#})");
    }
}

/// Runs one `coordinator` command to its end.
///
/// # Errors
/// Whatever the command fails with, as an `anyhow` chain with its causes. A job that ends other
/// than succeeded (`submit --wait`, `run`) and a `verify` that finds problems are errors too.
pub async fn run(cli: Cli) -> Result<()> {
    match run_command(cli).await {
        // A store another live coordinator serves: exit 2 (a set-up refused; the message says
        // where to submit instead), so that a script can tell it from a failed job.
        Err(error) if error.chain().any(store_held) || error.chain().any(submit_refused) => {
            Err(mgd3_common::ExitWith { code: 2, message: format!("{error:#}") }.into())
        }
        Err(error) => Err(with_peer_probed(error).await),
        done => done,
    }
}

/// Whether `url` is a local folder (a path or `file://` URL) that does not exist; an object
/// store's URL is never said missing here. Checked before opening one, which would make it.
fn missing_local_folder(url: &str) -> bool {
    let local = url.strip_prefix("file://").unwrap_or(url);
    !mgd3_common::store::is_url(local) && !Path::new(local).exists()
}

/// Refuses a local `report --out` folder the report would damage or be mixed into: inside an
/// mgd3 job's folder (its contact sheets or its distilled set would be overwritten or joined), a
/// file, or a folder of other files (an earlier report's folder is written over, as `report/` is).
fn report_target_problem(out: &str) -> Result<()> {
    let local = out.strip_prefix("file://").unwrap_or(out);
    if mgd3_common::store::is_url(local) {
        return Ok(());
    }
    let path = Path::new(local);
    if let Some(folder) = crate::submit::job_folder_around(path) {
        bail!(
            "--out `{out}` is inside `{}`, the folder of mgd3 job `{}`: the report would overwrite or join that job's \
             contact sheets or distilled images; name a folder outside it",
            folder.display(),
            folder.file_name().unwrap_or_default().to_string_lossy()
        );
    }
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => bail!("--out `{out}` is a file: name a folder for the report"),
        Ok(_) => {
            let earlier_report = path.join("index.html").is_file() && path.join("overview.png").is_file();
            let mut others: Vec<String> = std::fs::read_dir(path)
                .with_context(|| format!("reading --out `{out}`"))?
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect();
            if !earlier_report && !others.is_empty() {
                others.sort();
                let shown = others.iter().take(3).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
                bail!(
                    "--out `{out}` holds other files ({shown}{}), which the report would be mixed with{}: name a new or \
                     empty folder, or an earlier report's",
                    if others.len() > 3 { format!(" and {} more", others.len() - 3) } else { String::new() },
                    if path.join("index.html").exists() { " or overwrite (its index.html)" } else { "" }
                );
            }
            Ok(())
        }
        Err(_) => Ok(()),
    }
}

/// `check --store`: when the store already holds job `job` (the same id and fingerprint), the
/// data of its classes now (as `check` listed them) against what each commit was made from or the
/// job recorded ([`crate::service::data_review`]); says the job is known and its data the same, or
/// fails with the [`crate::Error::DataChanged`] that `run` and `submit` would refuse with.
async fn check_recorded_data(store_url: &str, job: &mgd3_common::job::ResolvedJob) -> Result<()> {
    use crate::jobstore::JobStore;
    // Opening a local store makes its folder: a store not there yet holds no job (and a check
    // makes nothing).
    if missing_local_folder(store_url) {
        return Ok(());
    }
    let jobs = crate::jobstore::ObjectJobStore::new(mgd3_common::store::open(store_url)?);
    let recorded = match jobs.read_job(&job.job_id).await {
        Ok(recorded) if recorded.fingerprint == job.fingerprint => recorded,
        Ok(_) | Err(crate::Error::UnknownJob(_)) => return Ok(()),
        Err(error) => return Err(anyhow::Error::new(error).context("reading the job's record to compare its data")),
    };
    let out = mgd3_common::store::open(job.spec.output.as_deref().unwrap_or(store_url))?;
    let (changes, markers) = crate::service::data_review(&out, &recorded, &job.classes).await?;
    if !changes.is_empty() {
        return Err(crate::Error::DataChanged { job: recorded.job_id, changes }.into());
    }
    let hashed = job.classes.iter().any(|c| c.listing.as_ref().is_some_and(|l| l.content_digest.is_some()));
    outln!(
        "data:    job `{}` is known to the store ({} of {} classes committed); every class's data is what the job \
         recorded ({})",
        job.job_id,
        markers.iter().flatten().count(),
        job.classes.len(),
        if hashed { "names, sizes and contents" } else { "file names and sizes" }
    );
    Ok(())
}

/// A submit or resume the coordinator refused before anything ran: a spec problem, or data
/// that changed and was not accepted (exit 2, "a spec or set-up error", like a held store), in
/// this process (`run`) or answered over gRPC.
fn submit_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    // A spec that does not read or validate, wherever it was read (`run`, `check`, `spec`).
    if error.downcast_ref::<mgd3_common::job::JobError>().is_some() {
        return true;
    }
    if let Some(error) = error.downcast_ref::<crate::Error>() {
        return matches!(
            error,
            crate::Error::DataChanged { .. } | crate::Error::ClassListChanged { .. } | crate::Error::Job(_)
        );
    }
    error.downcast_ref::<CallError>().is_some_and(|call| {
        matches!(call.rpc, "SubmitJob" | "ResumeJob")
            && matches!(call.status.code(), tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition)
    })
}

/// True for the refusal of a store another live coordinator serves, or of a job's output another
/// coordinator runs the job in (as the lock says, or as the coordinator's error wraps it).
fn store_held(error: &(dyn std::error::Error + 'static)) -> bool {
    use crate::lock::LockError;
    // The store, or a job's output (another coordinator runs the job).
    let held = |lock: &LockError| matches!(lock, LockError::Held { .. } | LockError::JobHeld { .. });
    error.downcast_ref().is_some_and(held)
        || matches!(error.downcast_ref(), Some(crate::Error::Lock(lock)) if held(lock))
}

/// A call whose connection dropped is told by what its address answers a probe
/// ([`CallError::probed`]): a TLS server (the scheme is wrong), a web server (the port is
/// wrong), or a coordinator that stopped or restarted mid-call. Any other error is returned as
/// it is.
async fn with_peer_probed(error: anyhow::Error) -> anyhow::Error {
    let Some(call) = error.downcast_ref::<CallError>() else { return error };
    let probed = call.clone().probed().await;
    if probed.failure() != call.failure() { anyhow::Error::new(probed) } else { error }
}

async fn run_command(cli: Cli) -> Result<()> {
    let mut command = cli.command;
    if let Some(connection) = command.connection() {
        connection.resolve();
    }
    match command {
        Command::Serve(args) => {
            // A stop signal while the store is opened and recovered is kept and acted on once it
            // serves (a clean stop, the lock released), not the default death half way through.
            mgd3_common::listen_for_stop();
            let config = ServeConfig::try_from(&args)?;
            let listener = TcpListener::bind(&args.listen).await.map_err(|error| {
                let hint = if error.kind() == std::io::ErrorKind::AddrInUse {
                    " (another process uses the port: pick another with --listen; under distill.sbatch, set \
                         MGD3_PORT)"
                } else {
                    ""
                };
                anyhow::Error::new(error).context(format!("cannot listen on {}{hint}", args.listen))
            })?;
            let address = listener.local_addr()?;
            if !address.ip().is_loopback() && config.token.is_none() && !args.insecure_no_auth {
                bail!(
                    "refusing to serve {address} (reachable from other machines) without authentication: pass \
                     --token-file FILE (workers and clients use the same file), listen on 127.0.0.1, or pass \
                     --insecure-no-auth on a network you trust completely"
                );
            }
            let coordinator = Coordinator::open_locked(
                &config.store_url,
                config.heartbeat_ms,
                Duration::from_secs(args.lock_timeout_s.max(1)),
            )
            .await?;
            if args.drain_when_done {
                coordinator.drain_when_done();
            }
            // --allow-path adds to the defaults: a job whose output defaults to the store must
            // never be refused because another folder was allowed.
            let mut allowed: Vec<PathBuf> = vec![std::env::current_dir()?];
            let store = coordinator.store_url();
            if let Some(path) = store.strip_prefix("file://") {
                allowed.push(PathBuf::from(path));
            } else if !mgd3_common::store::is_url(store) {
                allowed.push(PathBuf::from(store));
            }
            for path in &args.allow_paths {
                allowed.push(std::path::absolute(path)?);
            }
            tracing::info!(allowed = ?allowed, "local paths submitted specs may use");
            coordinator.allow_paths(allowed);
            let advertised = advertised_url(&address, config.tls.is_some());
            // A `serve --drain-when-done` (the sbatch script's) goes away once its jobs have ended:
            // a second coordinator is told to wait for it rather than submit to it.
            coordinator.advertise(&advertised, args.token_file.as_deref(), args.drain_when_done).await;
            // Clients on this host find it without --coordinator while it serves.
            let _announced = crate::runtime::announce(&advertised, store, args.token_file.as_deref());
            let seen = std::sync::Arc::new(std::sync::OnceLock::new());
            serve(coordinator, &config, listener, mgd3_common::termination_into(seen.clone())).await?;
            match seen.get() {
                Some(mgd3_common::StopSignal::Interrupt) => {
                    Err(mgd3_common::Interrupted { signal: mgd3_common::StopSignal::Interrupt, next: None }.into())
                }
                _ => Ok(()),
            }
        }
        Command::Submit(args) => {
            let (text, base) = read_spec(&args.spec)?;
            let mut client = args.connection.client()?;
            let request = proto::SubmitJobRequest {
                spec_toml: text,
                base_dir: base,
                job_id: args.job_id.unwrap_or_default(),
                accept_data_changes: args.data.accept_data_changes,
                retry_failed: args.retry.retry_failed,
            };
            let response = client
                .submit_job(request)
                .await
                .map_err(CallError::of(&args.connection.coordinator, "SubmitJob"))?
                .into_inner();
            for note in &response.notes {
                errln!("note: {note}");
            }
            outln!("{}", response.job_id);
            if !response.variants.is_empty() {
                // A sweep: its id above (for scripts), its variants for the person.
                let url = args.connection.coordinator.clone();
                let record = sweep_of(&mut client, &url, &response.job_id).await?.with_context(|| {
                    format!("the coordinator submitted sweep {} but has no record of it", response.job_id)
                })?;
                for line in sweep_lines(&record) {
                    errln!("{line}");
                }
                if args.wait {
                    let statuses = tokio::select! {
                        statuses = wait_for_sweep(&mut client, &record, &url, args.progress.options(), args.progress.excluded_grace(SUBMIT_EXCLUDED_GRACE)) => statuses?,
                        signal = mgd3_common::termination() => {
                            let next = format!(
                                "the sweep goes on: `coordinator status {0}` shows it, `coordinator cancel {0}` stops it",
                                record.sweep_id
                            );
                            return Err(mgd3_common::Interrupted { signal, next: Some(next) }.into());
                        }
                    };
                    exit_for_sweep(&record, &statuses, true)?;
                }
                return Ok(());
            }
            if args.wait {
                let url = &args.connection.coordinator;
                let mut progress = Progress::new(url, args.progress.options());
                // A signal stops the waiting, not the job: said, with how to watch it again.
                let status = tokio::select! {
                    status = wait_for(&mut client, &response.job_id, &mut progress, args.progress.excluded_grace(SUBMIT_EXCLUDED_GRACE)) => status?,
                    signal = mgd3_common::termination() => {
                        let next = format!(
                            "the job goes on: `coordinator status {0}` shows it, `coordinator cancel {0}` stops it",
                            response.job_id
                        );
                        return Err(mgd3_common::Interrupted { signal, next: Some(next) }.into());
                    }
                };
                exit_for(&status, url)?;
            }
            Ok(())
        }
        Command::Status(args) => {
            let mut client = args.connection.client()?;
            let url = args.connection.coordinator.clone();
            // A sweep id whose record the coordinator cannot use (it does not read) is named as
            // such, not as an unknown job.
            if let Some(id) = &args.job
                && looks_like_sweep(id)
                && let Err(error) = sweep_of(&mut client, &url, id).await
            {
                return Err(error);
            }
            if let Some(id) = &args.job
                && let Ok(Some(record)) = sweep_of(&mut client, &url, id).await
            {
                let mut statuses = Vec::new();
                for variant in &record.variants {
                    statuses.push(job_status(&mut client, &url, &variant.job_id).await?);
                }
                let succeeded = statuses.iter().filter(|s| s.state == JobState::Succeeded).count();
                // The sweep's state: running while any variant is, succeeded when all did, else
                // ended (some failed or were cancelled: each variant's own state says which).
                let state = if statuses.iter().any(|s| !s.state.is_final()) {
                    "running"
                } else if succeeded == statuses.len() {
                    "succeeded"
                } else {
                    "ended"
                };
                let variants: Vec<_> = record
                    .variants
                    .iter()
                    .zip(&statuses)
                    .map(|(v, s)| serde_json::json!({"settings": v.settings, "status": status_json(s)}))
                    .collect();
                let value = serde_json::json!({"sweep_id": record.sweep_id, "state": state,
                    "succeeded": succeeded, "keys": record.keys, "variants": variants});
                if let Some(path) = &args.get {
                    // One field of the sweep's JSON (`state`, `succeeded`, `variants.0.status.state`).
                    let Some(field) = get_field(&value, path) else {
                        bail!(
                            "sweep {id} has no field `{path}`: its fields are sweep_id, state, succeeded, keys and \
                             variants (`coordinator status {id} --json` shows them)"
                        );
                    };
                    outln!("{field}");
                } else if args.json {
                    outln!("{}", serde_json::to_string_pretty(&value)?);
                } else if args.oneline {
                    for (variant, status) in record.variants.iter().zip(&statuses) {
                        outln!("{} [{}]: {}", record.sweep_id, record.label(variant), progress_line(status, &url));
                    }
                } else {
                    outln!(
                        "sweep {} [{state}]: {succeeded} of {} variant(s) succeeded, over {}",
                        record.sweep_id,
                        statuses.len(),
                        record.keys.join(", ")
                    );
                    for (i, (variant, status)) in record.variants.iter().zip(&statuses).enumerate() {
                        outln!("  {:>3}  {}  {}", i + 1, record.label(variant), progress_line(status, &url));
                    }
                }
                return Ok(());
            }
            let statuses = match &args.job {
                Some(job) => match job_status(&mut client, &args.connection.coordinator, job).await {
                    Ok(status) => vec![status],
                    // A finished `coordinator run` takes its coordinator with it: the job's folder
                    // still answers, offline.
                    Err(error)
                        if error
                            .downcast_ref::<CallError>()
                            .is_some_and(|e| e.failure() == mgd3_common::rpc::Failure::NothingListens) =>
                    {
                        return Err(error.context(format!(
                            "no coordinator to ask about job `{job}`; once its run has ended its output folder answers: \
                             `coordinator verify {job} --job-dir <output>/jobs/{job}` counts its committed classes and \
                             `coordinator report {job} --job-dir <output>/jobs/{job}` shows them (`coordinator spec \
                             job.toml --get output` prints <output>)"
                        )));
                    }
                    // A sweep's id the coordinator does not know (forgotten, another store).
                    Err(error) if looks_like_sweep(job) => {
                        return Err(error.context(format!(
                            "`{job}` is no sweep or job this coordinator knows: forgotten, or submitted to another \
                             store (`coordinator list` shows what it has)"
                        )));
                    }
                    Err(error) => return Err(error),
                },
                None => list_jobs(&mut client, &args.connection.coordinator).await?,
            };
            if statuses.is_empty() && !args.json {
                // Not a silent nothing: say so, as `list` does, on standard error (standard
                // output holds jobs only; `--json` prints `[]`).
                errln!("{NO_JOBS}");
                return Ok(());
            }
            if let Some(path) = &args.get {
                let value = statuses.first().map(status_json).unwrap_or_default();
                outln!("{}", get_field(&value, path).with_context(|| format!("the job status has no field `{path}`"))?);
            } else if args.json {
                let value: Vec<_> = statuses.iter().map(status_json).collect();
                let value =
                    if args.job.is_some() { value.into_iter().next().unwrap_or_default() } else { value.into() };
                outln!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                if args.oneline {
                    statuses.iter().for_each(|s| outln!("{}", progress_line(s, &args.connection.coordinator)));
                } else {
                    statuses.iter().for_each(|s| out!("{}", describe(s, &args.connection.coordinator)));
                }
            }
            Ok(())
        }
        Command::Resume(args) => {
            let mut client = args.connection.client()?;
            if let Some(record) = sweep_of(&mut client, &args.connection.coordinator, &args.job).await? {
                // Every variant, each checked against its own part of the sweep's spec when given.
                let specs: Vec<(String, String)> = match &args.spec {
                    Some(path) => {
                        let (text, base) = read_spec(path)?;
                        let sweep = Sweep::parse(&text)
                            .with_context(|| format!("job spec `{}`", path.display()))?
                            .with_context(|| {
                                format!("`{}` has no [sweep] table, and {} is a sweep", path.display(), args.job)
                            })?;
                        // Each variant of the sweep by its settings (whatever order the file lists
                        // them in), all found before any is resumed.
                        let settings = |v: &mgd3_common::sweep::Variant| -> std::collections::BTreeMap<String, String> {
                            v.settings.iter().map(|(k, value)| (k.name().to_owned(), value.clone())).collect()
                        };
                        let mut matched = Vec::with_capacity(record.variants.len());
                        let mut missing = Vec::new();
                        for variant in &record.variants {
                            match sweep.variants.iter().find(|v| settings(v) == variant.settings) {
                                Some(found) => matched.push((found.toml.clone(), base.clone())),
                                None => missing.push(format!("{} ({})", variant.job_id, record.label(variant))),
                            }
                        }
                        if !missing.is_empty() {
                            bail!(
                                "`{}` is not the spec of sweep {}: it has no variant with the settings of {}; nothing was \
                                 resumed (resume without --spec, or give the sweep's own file)",
                                path.display(),
                                args.job,
                                missing.join(", ")
                            );
                        }
                        matched
                    }
                    None => vec![Default::default(); record.variants.len()],
                };
                let url = args.connection.coordinator.clone();
                // Every variant must be a job the coordinator knows before any is resumed.
                let mut unknown = Vec::new();
                for variant in &record.variants {
                    let asked =
                        client.get_job_status(proto::GetJobStatusRequest { job_id: variant.job_id.clone() }).await;
                    if let Err(status) = asked {
                        if status.code() != tonic::Code::NotFound {
                            return Err(CallError::of(&url, "GetJobStatus")(status).into());
                        }
                        unknown.push(format!("{} ({})", variant.job_id, record.label(variant)));
                    }
                }
                if !unknown.is_empty() {
                    bail!(
                        "sweep {}: the coordinator does not know its variant(s) {}; nothing was resumed (submit the \
                         sweep's spec again: it brings the variants back with their committed classes, then resume)",
                        args.job,
                        unknown.join(", ")
                    );
                }
                for (variant, (spec_toml, base_dir)) in record.variants.iter().zip(specs) {
                    let named = format!("{} ({})", variant.job_id, record.label(variant));
                    let request = proto::ResumeJobRequest {
                        job_id: variant.job_id.clone(),
                        spec_toml,
                        base_dir,
                        accept_data_changes: args.data.accept_data_changes,
                    };
                    resume_one(&mut client, &url, request, &named).await?;
                }
                return Ok(());
            }
            let (spec_toml, base_dir) = match &args.spec {
                Some(path) => read_spec(path)?,
                None => Default::default(),
            };
            let request = proto::ResumeJobRequest {
                job_id: args.job.clone(),
                spec_toml,
                base_dir,
                accept_data_changes: args.data.accept_data_changes,
            };
            resume_one(&mut client, &args.connection.coordinator, request, &args.job)
                .await
                .map_err(|error| unknown_sweep(error, &args.job))
        }
        Command::Verify(args) => {
            if args.job_dir.is_none() {
                refuse_sweep(&args.connection, &args.job, "verify").await?;
            }
            let response: VerifyReport = match &args.job_dir {
                Some(_) => {
                    let dir = args.location().await?;
                    let Some(out) = output_root(&dir, &args.job) else {
                        bail!("--job-dir must be a job's folder, `<output>/jobs/{}`", args.job);
                    };
                    crate::state::verify_offline(&out, &args.job).await?
                }
                None => {
                    let mut client = args.connection.client()?;
                    let failed = CallError::of(&args.connection.coordinator, "VerifyJob");
                    let answer = client.verify_job(proto::VerifyJobRequest { job_id: args.job.clone() }).await;
                    match answer.map_err(failed) {
                        Ok(answer) => answer.into_inner().into(),
                        Err(error) if error.failure() == mgd3_common::rpc::Failure::NothingListens => {
                            return Err(anyhow::Error::new(error).context(format!(
                                "no coordinator to ask; without one, verify the job's folder: `coordinator verify {} --job-dir <output>/jobs/{}`",
                                args.job, args.job
                            )));
                        }
                        // The coordinator was found on this host, not named: the job's own (a
                        // `coordinator run` that has ended) may be gone.
                        Err(error)
                            if error.code() == tonic::Code::NotFound && args.connection.coordinator_arg.is_none() =>
                        {
                            return Err(anyhow::Error::new(error).context(format!(
                                "the coordinator found on this host does not know job `{}`; if the job ran under a \
                                 `coordinator run` that has ended, verify its folder: `coordinator verify {} --job-dir \
                                 <output>/jobs/{}` (or name its coordinator with --coordinator)",
                                args.job, args.job, args.job
                            )));
                        }
                        Err(error) => return Err(error.into()),
                    }
                }
            };
            for p in &response.problems {
                let whose = if p.wnid.is_empty() { "job".to_owned() } else { format!("class {}", p.wnid) };
                outln!("{whose}: {}{}", p.file.as_ref().map(|f| format!("`{f}`: ")).unwrap_or_default(), p.problem);
            }
            // Not damage to the dataset, but a picture a person expected: said, not hidden.
            if !response.sheets_missing.is_empty() {
                let shown: Vec<&str> = response.sheets_missing.iter().take(10).map(String::as_str).collect();
                errln!(
                    "note: {} committed class(es) have no contact sheet, though the attempt that committed them made \
                     one after its commit (deleted since, or writing it failed: the worker's log says why; a sheet is \
                     made only when its class is distilled): {}{}",
                    response.sheets_missing.len(),
                    shown.join(", "),
                    if response.sheets_missing.len() > shown.len() { ", ..." } else { "" }
                );
            }
            // What was checked of a job that promised not every class yet (or any more).
            let damage = match response.problems.len() {
                0 => "nothing damaged".to_owned(),
                n => format!("{n} problem(s)"),
            };
            // A job cancelled or failed before some classes promised none of them: what it
            // committed is checked, the rest is no damage.
            let stopped = matches!(response.state, Some(JobState::Cancelled | JobState::Failed));
            if stopped && !response.running {
                let state = response.state.map_or("", |s| s.as_str());
                outln!(
                    "job {}: {state}: {} of {} classes committed, {} file(s) checked, {}",
                    args.job,
                    response.classes_committed,
                    response.classes_checked,
                    response.files_checked,
                    damage
                );
                let go_on = if response.state == Some(JobState::Failed) {
                    format!(
                        "once what failed it is fixed (its status names each failed class and why), `coordinator run` or \
                         `submit` of its spec with --retry-failed (or `coordinator resume {}`) runs its failed shards again",
                        args.job
                    )
                } else {
                    format!("`coordinator resume {}` distils the other classes", args.job)
                };
                if !response.problems.is_empty() {
                    bail!("job {} has damaged committed files: {go_on} and repairs them", args.job);
                }
                errln!("note: {go_on}");
                return Ok(());
            }
            if response.running {
                // Classes still to come are no damage, and resume is no advice for a job that runs.
                // Offline, a job without a manifest has not finished (or lost its manifest), and
                // how many classes it has is in its job.json, not in its output.
                let committed = match args.job_dir {
                    Some(_) => format!("no manifest.json yet (not finished): {} class(es)", response.classes_committed),
                    None => format!("running: {} of {} classes", response.classes_committed, response.classes_checked),
                };
                outln!("job {}: {committed} committed, {} file(s) checked, {damage}", args.job, response.files_checked);
                if !response.problems.is_empty() {
                    bail!(
                        "job {} has damaged committed files; it is still running: once it has ended, `coordinator resume {}` repairs them",
                        args.job,
                        args.job
                    );
                }
                return Ok(());
            }
            // Offline, a job folder with its manifest is a job that succeeded: said, not left to
            // be inferred from the class count.
            let finished = if args.job_dir.is_some() { "succeeded (manifest.json), " } else { "" };
            outln!(
                "job {}: {finished}{} class(es), {} file(s) checked, {} problem(s)",
                args.job,
                response.classes_checked,
                response.files_checked,
                response.problems.len()
            );
            // What resume leaves in place (another job's output, someone's files) is moved by
            // hand; when that is all there is, resume is not the advice.
            let by_hand = |p: &mgd3_common::status::VerifyProblem| p.problem.contains("`resume` leaves it in place");
            if !response.problems.is_empty() && response.problems.iter().all(by_hand) {
                bail!(
                    "job {} holds {} thing(s) that are not its own (listed above): move them out of its folder by hand; \
                     `coordinator resume` leaves them in place",
                    args.job,
                    response.problems.len()
                );
            }
            // What resume does about a contact sheet is not a repair of the same bytes.
            let sheets = if response
                .problems
                .iter()
                .any(|p| p.file.as_deref().is_some_and(|f| f.contains("/contact_sheets/")))
            {
                "; a contact sheet that is not its class's own is put back in its class's place, or removed"
            } else {
                ""
            };
            if !response.problems.is_empty() {
                if let Some(dir) = &args.job_dir {
                    // Offline, no coordinator is at hand: say which one repairs it, and how to
                    // start one where the job ran under a `coordinator run`.
                    let suffix = format!("/jobs/{}", args.job);
                    let output = dir.trim_end_matches('/').strip_suffix(&suffix).unwrap_or("<output>");
                    bail!(
                        "job {job} does not match its markers: `coordinator resume {job}` on a coordinator serving the \
                         store the job ran with repairs it (every damaged file, the same seeds give the same bytes{sheets}). \
                         For a job of `coordinator run`, start one on its store (its --store, else the job's output): \
                         `coordinator serve --store {}`, then `coordinator resume {job} --coordinator <its URL>`; \
                         running the same `coordinator run` again puts back missing or cut files, not ones changed in \
                         place",
                        output,
                        job = args.job
                    );
                }
                bail!(
                    "job {} does not match its markers: `coordinator resume {}` repairs it{sheets}",
                    args.job,
                    args.job
                );
            }
            Ok(())
        }
        Command::Cancel(args) => {
            let mut client = args.connection.client()?;
            let url = args.connection.coordinator.clone();
            if let Some(record) = sweep_of(&mut client, &url, &args.job).await? {
                // The variants still to run; those that ended stay as they are.
                for variant in &record.variants {
                    let status = job_status(&mut client, &url, &variant.job_id).await?;
                    if status.state.is_final() {
                        outln!("job {} ({}) already {}", variant.job_id, record.label(variant), status.state);
                        continue;
                    }
                    client
                        .cancel_job(proto::CancelJobRequest { job_id: variant.job_id.clone() })
                        .await
                        .map_err(CallError::of(&url, "CancelJob"))?;
                    outln!("job {} ({}) cancelled", variant.job_id, record.label(variant));
                }
                return Ok(());
            }
            client
                .cancel_job(proto::CancelJobRequest { job_id: args.job.clone() })
                .await
                .map_err(CallError::of(&args.connection.coordinator, "CancelJob"))
                .map_err(|error| unknown_sweep(error.into(), &args.job))?;
            outln!("job {} cancelled", args.job);
            Ok(())
        }
        Command::Forget(args) => {
            let mut client = args.connection.client()?;
            if let Some(record) = sweep_of(&mut client, &args.connection.coordinator, &args.job).await? {
                let kept = client
                    .forget_job(proto::ForgetJobRequest { job_id: args.job.clone() })
                    .await
                    .map_err(CallError::of(&args.connection.coordinator, "ForgetJob"))?
                    .into_inner()
                    .kept_job_ids;
                if kept.is_empty() {
                    outln!("sweep {} and its {} job(s) forgotten", args.job, record.variants.len());
                } else {
                    outln!(
                        "sweep {} and {} of its {} job(s) forgotten; kept, as other sweeps hold them too: {}",
                        args.job,
                        record.variants.len() - kept.len(),
                        record.variants.len(),
                        kept.join(", ")
                    );
                }
                errln!(
                    "their outputs stay in their folders; submitting the same sweep again brings the jobs back with their committed classes"
                );
                return Ok(());
            }
            // Where the job's outputs are, asked first: once forgotten, the coordinator no longer says.
            let folder = job_status(&mut client, &args.connection.coordinator, &args.job).await.ok().map(|s| s.output);
            let response = client
                .forget_job(proto::ForgetJobRequest { job_id: args.job.clone() })
                .await
                .map_err(CallError::of(&args.connection.coordinator, "ForgetJob"))
                .map_err(|error| unknown_sweep(error.into(), &args.job))?
                .into_inner();
            outln!("job {} forgotten", args.job);
            if response.outputs_kept {
                // A local folder that was never made: nothing of the job was committed.
                let folder = folder.filter(|folder| !missing_local_folder(folder));
                match folder {
                    Some(folder) => errln!(
                        "its outputs stay in `{folder}`; submitting the same spec again (with the same `output`) brings \
                         the job back with its committed classes, and `coordinator verify {} --job-dir {folder}` checks \
                         them offline",
                        args.job
                    ),
                    None => errln!(
                        "its outputs stay in its folder; submitting the same spec again brings the job back with its \
                         committed classes"
                    ),
                }
            }
            Ok(())
        }
        Command::Ready(args) => ready(&args).await,
        Command::Report(args) => {
            if let Some((root, record)) = sweep_to_report(&args.job).await? {
                if args.out.is_some() {
                    bail!(
                        "--out writes one job's report elsewhere; a sweep's comparison goes beside its variants, under <output>/sweeps/{}/report/",
                        record.sweep_id
                    );
                }
                let summary = crate::compare::write_sweep_report(&root, &record, true).await?;
                let reported = summary.variants.iter().filter(|v| v.report.is_some()).count();
                errln!(
                    "comparison of {} variant(s) written, with the reports of the {reported} that have committed classes",
                    summary.variants.len()
                );
                outln!("{}", summary.index);
                return Ok(());
            }
            let dir = args.job.location().await?;
            let (target, copy) = match &args.out {
                Some(out) => {
                    report_target_problem(out)?;
                    (mgd3_common::store::open(out)?, true)
                }
                None => (dir.child("report"), false),
            };
            let summary = crate::report::write_report(&dir, &args.job.job, &target, copy).await?;
            errln!("report of {} class(es) written", summary.classes);
            warn_quality(&summary);
            warn_sheets(&summary, &args.job.job);
            outln!("{}", summary.index);
            Ok(())
        }
        Command::Export(args) => {
            if args.job.job_dir.is_none() {
                refuse_sweep(&args.job.connection, &args.job.job, "export").await?;
            }
            let dir = args.job.location().await?;
            let done = crate::export::export_npz(&dir, &args.job.job, &args.npz, args.partial).await?;
            errln!(
                "{} image(s) of {} class(es), {}×{} RGB, written as arr_0 to {}",
                done.images,
                done.classes,
                done.size.0,
                done.size.1,
                args.npz.display()
            );
            // The array holds no labels: the classes' order is how to label its rows.
            let shown: Vec<String> = done.order.iter().take(10).map(|(wnid, n)| format!("{wnid} ({n})")).collect();
            errln!(
                "classes in the array's order (the job's class order, images per class): {}{}",
                shown.join(", "),
                if done.order.len() > 10 { format!(", and {} more", done.order.len() - 10) } else { String::new() }
            );
            if !done.missing.is_empty() {
                let shown: Vec<&str> = done.missing.iter().take(10).map(String::as_str).collect();
                errln!(
                    "not in the array (no commit: running, failed or not started): {} class(es): {}{}",
                    done.missing.len(),
                    shown.join(", "),
                    if done.missing.len() > 10 { ", ..." } else { "" }
                );
            }
            Ok(())
        }
        Command::List(args) => {
            let mut client = args.connection.client()?;
            let jobs = list_jobs(&mut client, &args.connection.coordinator).await?;
            // Which of those jobs are sweeps' variants (a coordinator from before sweeps has
            // none to tell).
            let sweeps: Vec<SweepRecord> = match client.list_sweeps(proto::ListSweepsRequest {}).await {
                Ok(answer) => answer
                    .into_inner()
                    .record_json
                    .iter()
                    .map(|text| serde_json::from_str(text))
                    .collect::<Result<_, _>>()?,
                Err(status) if status.code() == tonic::Code::Unimplemented => Vec::new(),
                Err(status) => return Err(CallError::of(&args.connection.coordinator, "ListSweeps")(status).into()),
            };
            if args.json {
                // Each job as `status --json` has it, a sweep's variant with its sweep's id added.
                let listed: Vec<serde_json::Value> = jobs
                    .iter()
                    .map(|j| {
                        let mut value = status_json(j);
                        let sweep = sweeps.iter().find(|r| r.variants.iter().any(|v| v.job_id == j.job_id));
                        if let (Some(record), Some(object)) = (sweep, value.as_object_mut()) {
                            object.insert("sweep".into(), record.sweep_id.clone().into());
                        }
                        value
                    })
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&listed)?);
            } else if jobs.is_empty() {
                // On standard error: standard output lists jobs, one a line, for scripts.
                errln!("{NO_JOBS}");
            } else {
                for j in &jobs {
                    if j.state == JobState::Quarantined {
                        // No counts to show (its records cannot be read): what is wrong instead.
                        let reason = j.failures.first().map(|f| f.error.as_str()).unwrap_or_default();
                        outln!("{}\t{}\t{reason}", j.job_id, j.state);
                        continue;
                    }
                    outln!(
                        "{}\t{}\t{}/{} shards\t{}/{} images",
                        j.job_id,
                        j.state,
                        j.shards.done,
                        j.shards.total,
                        j.images_done,
                        j.images_total
                    );
                }
                for record in &sweeps {
                    let succeeded = record
                        .variants
                        .iter()
                        .filter(|v| jobs.iter().any(|j| j.job_id == v.job_id && j.state == JobState::Succeeded))
                        .count();
                    outln!(
                        "{}\tsweep\t{succeeded}/{} variants succeeded\tover {}",
                        record.sweep_id,
                        record.variants.len(),
                        record.keys.join(", ")
                    );
                }
            }
            Ok(())
        }
        Command::Run(args) => run_local(args).await,
        Command::Check(args) => {
            // A preflight says an unreachable store in seconds; a coordinator rides an outage out.
            mgd3_common::store::set_retry_timeout(CHECK_STORE_PATIENCE);
            let (text, base) = read_spec(&args.spec)?;
            // A relative --store is where `run` would put it: against this folder.
            let default_output = match &args.store {
                Some(store) => mgd3_common::store::resolve(store, &std::env::current_dir().unwrap_or_default()),
                None => "(the coordinator's --store)".to_owned(),
            };
            if let Some(sweep) = Sweep::parse(&text).with_context(|| format!("job spec `{}`", args.spec.display()))? {
                let resolved = crate::submit::resolve_sweep(
                    &sweep,
                    Path::new(&base),
                    &default_output,
                    None,
                    mgd3_common::batch::PlannedRows::Default,
                )
                .await
                .with_context(|| format!("job spec `{}`", args.spec.display()))?;
                for note in &resolved.notes {
                    outln!("note: {note}");
                }
                for line in sweep_lines(&resolved.record) {
                    outln!("{line}");
                }
                let first = &resolved.variants[0];
                outln!("dataset: {}", first.job.spec.dataset);
                outln!("output:  {}", first.job.spec.output.as_deref().unwrap_or_default());
                outln!(
                    "classes: {} ({} images in all); each variant is a job of its own (`coordinator spec {} --variant N \
                     > variant.toml` writes one alone, and `coordinator check variant.toml` lists its classes and shards)",
                    first.job.classes.len(),
                    first.image_counts.iter().sum::<usize>(),
                    args.spec.display()
                );
                return Ok(());
            }
            // `check` talks to no coordinator: no worker has reported, so the shards are the
            // default's (and a note says so).
            let resolved = match crate::submit::resolve_spec(
                &text,
                Path::new(&base),
                None,
                &default_output,
                None,
                mgd3_common::batch::PlannedRows::Default,
            )
            .await
            {
                Ok(resolved) => resolved,
                Err(error) => {
                    // --decode still decodes every class that lists, so that one check names the
                    // unreadable images beside the other problems.
                    if args.decode {
                        decode_listable(&text, Path::new(&base)).await;
                    }
                    return Err(anyhow::Error::new(error).context(format!("job spec `{}`", args.spec.display())));
                }
            };
            let job = &resolved.job;
            for note in &resolved.notes {
                outln!("note: {note}");
            }
            if job.spec.classes_per_shard.is_none() {
                outln!(
                    "note: shards below are sized for DiT calls of the default {} rows; at submit they are sized by the \
                     largest --dit-rows of the workers registered then (and one shard per worker at least); \
                     classes_per_shard sets the size",
                    mgd3_common::batch::DEFAULT_DIT_ROWS
                );
            }
            outln!("job id:  {}", job.job_id);
            outln!("dataset: {}", job.spec.dataset);
            outln!("output:  {}", job.spec.output.as_deref().unwrap_or_default());
            outln!(
                "classes: {} ({} images in all), IPC {}, {} shard(s) of {} class(es)",
                job.classes.len(),
                resolved.image_counts.iter().sum::<usize>(),
                job.spec.ipc,
                job.shards.len(),
                job.spec.shard_size_for(job.classes.len(), resolved.planned).min(job.classes.len())
            );
            for (class, count) in job.classes.iter().zip(&resolved.image_counts) {
                outln!("  {:>5}  label {:>4}  {:>6} images  {}", class.class_index, class.label, count, class.wnid);
            }
            outln!("models:");
            for line in crate::submit::model_lines(&job.spec) {
                outln!("{line}");
            }
            // With the store named, a job of this id already there is compared with its data now,
            // as submit and run compare it: the refusal they would give is given here.
            if args.store.is_some() {
                check_recorded_data(&default_output, job).await?;
            }
            if args.decode {
                let root = mgd3_common::imagefolder::Root::open(&job.spec.dataset)?;
                let counts: Vec<usize> = resolved.image_counts.clone();
                let unreadable = decode_and_tell(&root, &job.classes, &counts, job.spec.ipc).await?;
                if unreadable > 0 {
                    anyhow::bail!(
                        "{unreadable} unreadable image(s) in `{}`: replace or remove them (a class may keep fewer images, as \
                         long as it has at least IPC {}), then check again",
                        job.spec.dataset,
                        job.spec.ipc
                    );
                }
            }
            Ok(())
        }
        Command::Spec(args) => {
            let (text, base) = read_spec(&args.spec)?;
            let sweep = Sweep::parse(&text).with_context(|| format!("job spec `{}`", args.spec.display()))?;
            if let Some(n) = args.variant {
                let Some(sweep) = &sweep else {
                    // A usage mistake about the spec: exit 2, as a spec that does not read.
                    let message = format!(
                        "--variant picks one variant of a sweep, and `{}` has no [sweep] table",
                        args.spec.display()
                    );
                    return Err(mgd3_common::ExitWith { code: 2, message }.into());
                };
                let count = sweep.variants.len();
                let Some(variant) = n.checked_sub(1).and_then(|i| sweep.variants.get(i)) else {
                    let message =
                        format!("--variant {n}: the sweep in `{}` has variants 1 to {count}", args.spec.display());
                    return Err(mgd3_common::ExitWith { code: 2, message }.into());
                };
                match &args.get {
                    Some(path) => {
                        let mut spec = variant.spec.clone();
                        spec.resolve_paths(Path::new(&base));
                        let value: serde_json::Value = serde_json::from_str(&serde_json::to_string(&spec)?)?;
                        let field = get_field(&value, path);
                        outln!("{}", field.with_context(|| format!("`{path}` is not set in variant {n}"))?);
                    }
                    None => {
                        let text = variant_with_absolute_paths(&variant.toml, &variant.spec, Path::new(&base));
                        out!("# variant {n} of {count} of `{}`: {}\n{text}", args.spec.display(), variant.label());
                    }
                }
                return Ok(());
            }
            if let Some(sweep) = sweep {
                let variants: Vec<serde_json::Value> = sweep
                    .variants
                    .iter()
                    .map(|v| {
                        let mut spec = v.spec.clone();
                        spec.resolve_paths(Path::new(&base));
                        let spec: serde_json::Value =
                            serde_json::from_str(&serde_json::to_string(&spec).expect("serialisable")).expect("JSON");
                        let settings: serde_json::Map<String, serde_json::Value> =
                            v.settings.iter().map(|(k, value)| (k.name().to_owned(), value.clone().into())).collect();
                        serde_json::json!({"settings": settings, "spec": spec})
                    })
                    .collect();
                match &args.get {
                    Some(path) if path.starts_with("sweep.") => {
                        let keys: Vec<&str> = sweep.keys.iter().map(|k| k.name()).collect();
                        let value = serde_json::json!({"sweep": {"keys": keys, "variants": variants}});
                        let field = get_field(&value, path);
                        outln!(
                            "{}",
                            field.with_context(|| format!("the sweep in `{}` has no `{path}`", args.spec.display()))?
                        );
                    }
                    // A setting every variant shares (`output`) reads as for a job; a swept one
                    // has no one value.
                    Some(path) => {
                        let values: Vec<Option<String>> =
                            variants.iter().map(|v| get_field(&v["spec"], path)).collect();
                        if values.iter().any(|v| *v != values[0]) {
                            bail!("`{path}` differs between the variants of the sweep in `{}`", args.spec.display());
                        }
                        let value = values[0].clone();
                        outln!(
                            "{}",
                            value.with_context(|| format!("`{path}` is not set in `{}`", args.spec.display()))?
                        );
                    }
                    None => {
                        let keys: Vec<&str> = sweep.keys.iter().map(|k| k.name()).collect();
                        let value = serde_json::json!({"sweep": {"keys": keys, "variants": variants}});
                        outln!("{}", serde_json::to_string_pretty(&value)?);
                    }
                }
                return Ok(());
            }
            let mut spec = mgd3_common::job::JobSpec::from_toml(&text)
                .with_context(|| format!("job spec `{}`", args.spec.display()))?;
            spec.resolve_paths(Path::new(&base));
            spec.validate().with_context(|| format!("job spec `{}`", args.spec.display()))?;
            // Through the text form: `to_value` widens f32 settings to f64 digits (λ = 0.1 read
            // back as 0.10000000149011612); the text keeps the shortest form.
            let value: serde_json::Value = serde_json::from_str(&serde_json::to_string(&spec)?)?;
            match &args.get {
                Some(path) => outln!(
                    "{}",
                    get_field(&value, path)
                        .with_context(|| format!("`{path}` is not set in `{}`", args.spec.display()))?
                ),
                None => outln!("{}", serde_json::to_string_pretty(&value)?),
            }
            Ok(())
        }
    }
}

/// A variant's TOML with every location made absolute against the sweep spec's folder `base`,
/// so that the file names the same data, models and output wherever it is saved (the job it
/// makes is the same: its fingerprint holds the resolved locations).
fn variant_with_absolute_paths(toml_text: &str, spec: &mgd3_common::job::JobSpec, base: &Path) -> String {
    let Ok(mut table) = toml::from_str::<toml::Table>(toml_text) else { return toml_text.to_owned() };
    let mut resolved = spec.clone();
    resolved.resolve_paths(base);
    let set = |table: &mut toml::Table, key: &str, value: &str| {
        if table.get(key).is_some_and(toml::Value::is_str) {
            table.insert(key.to_owned(), toml::Value::String(value.to_owned()));
        }
    };
    set(&mut table, "dataset", &resolved.dataset);
    if let Some(output) = &resolved.output {
        set(&mut table, "output", output);
    }
    if let Some(mgd3_common::job::LatentCache::At(cache)) = &resolved.latent_cache {
        set(&mut table, "latent_cache", cache);
    }
    if let (mgd3_common::job::ClassSelection::File { file }, Some(toml::Value::Table(classes))) =
        (&resolved.classes, table.get_mut("classes"))
    {
        set(classes, "file", file);
    }
    if let Some(toml::Value::Table(models)) = table.get_mut("models") {
        set(models, "dit", &resolved.models.dit);
        set(models, "vae_encoder", &resolved.models.vae_encoder);
        set(models, "vae_decoder", &resolved.models.vae_decoder);
    }
    toml::to_string(&table).unwrap_or_else(|_| toml_text.to_owned())
}

/// One field of a JSON document by dotted path, for scripts: a string bare, anything else as
/// compact JSON; `None` when absent or null.
fn get_field(value: &serde_json::Value, path: &str) -> Option<String> {
    // A number indexes a list (`variants.2.status.state`).
    let field = path.split('.').try_fold(value, |v, key| match (v, key.parse::<usize>()) {
        (serde_json::Value::Array(items), Ok(index)) => items.get(index),
        _ => v.get(key),
    })?;
    match field {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Where a run's images go and, when elsewhere (`--store`), where its state is: "output X" or
/// "output X; state in Y".
fn output_and_store(output: &str, store: &str) -> String {
    let same = |a: &str| a.strip_prefix("file://").unwrap_or(a).trim_end_matches('/').to_owned();
    if same(output) == same(store) { format!("output {output}") } else { format!("output {output}; state in {store}") }
}

/// The rest of `coordinator run` for a sweep: every variant awaited in turn, each one's report
/// and the sweep's comparison page written.
#[allow(clippy::too_many_arguments)]
async fn run_local_sweep(
    args: &RunArgs,
    submitted: crate::service::SubmittedSweep,
    coordinator: Coordinator,
    local: crate::local::LocalCoordinator,
    mut workers: Vec<tokio::process::Child>,
    last_errors: &std::sync::Mutex<Vec<Option<String>>>,
    store: &str,
) -> Result<()> {
    let record = submitted.record;
    for note in &submitted.notes {
        errln!("note: {note}");
    }
    for line in sweep_lines(&record) {
        errln!("{line}");
    }
    errln!("on {} local worker(s); {}", workers.len(), output_and_store(&record.output, store));
    let url = local.url.clone();
    let mut client = connect(&url, None, None)?;
    let outcome = tokio::select! {
        statuses = wait_for_sweep(&mut client, &record, &url, args.progress.options(), args.progress.excluded_grace(Duration::ZERO)) => statuses,
        signal = mgd3_common::termination() => {
            let next = format!("`coordinator run` again (or `coordinator resume {}`) continues the sweep", record.sweep_id);
            Err(mgd3_common::Interrupted { signal, next: Some(next) }.into())
        }
        _ = all_exited_telling(&mut workers, &coordinator) => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let reasons = exit_reasons(&mut workers, last_errors).await;
            Err(mgd3_common::NoWorker { job: record.sweep_id.clone(), reasons }.into())
        }
    };
    drop(client);
    stop_local(&coordinator, &mut workers, local).await;
    let statuses = outcome?;
    // The comparison is written whatever became of the variants: which one failed is part of it.
    if !args.no_report {
        let written = match mgd3_common::store::open(&record.output) {
            Ok(root) => {
                crate::compare::write_sweep_report(&root, &record, true).await.map_err(|e| mgd3_common::error_chain(&e))
            }
            Err(e) => Err(mgd3_common::error_chain(&e)),
        };
        match written {
            Ok(summary) => outln!("comparison: {}", summary.index),
            Err(error) => {
                tracing::warn!(%error, "no comparison report written; `coordinator report {}` tries again", record.sweep_id)
            }
        }
    }
    exit_for_sweep(&record, &statuses, false)
}

/// Says which unfinished jobs of the store `coordinator run` leaves alone (it runs its own).
fn note_left_out(others: &[String], name: Option<&str>) {
    if others.is_empty() {
        return;
    }
    // Jobs of this spec's name first (a sweep's variants since dropped from it): the ones a
    // person most needs to hear about.
    let mut others: Vec<&String> = others.iter().collect();
    let ours = |id: &str| name.is_some_and(|name| id.starts_with(&format!("{name}-")));
    others.sort_by_key(|id| (!ours(id), id.as_str()));
    let shown: Vec<&str> = others.iter().take(10).map(|id| id.as_str()).collect();
    errln!(
        "note: {} other unfinished job(s) in this store are not run by this `coordinator run`, which runs its own: {}{} \
         (`coordinator run` of their spec, or `resume <job>` on a served coordinator, goes on with one; `coordinator \
         cancel <job>` ends one)",
        others.len(),
        shown.join(", "),
        if others.len() > shown.len() { ", ..." } else { "" }
    );
}

/// What `coordinator run` says when a signal stops it, before its workers have stopped: their
/// batches can take a while, and silence looks like a hang.
fn stopping_message(signal: mgd3_common::StopSignal) {
    let again = match signal {
        mgd3_common::StopSignal::Interrupt => "; Ctrl-C again exits at once",
        mgd3_common::StopSignal::Terminate => "",
    };
    errln!("stopping: the local workers finish their batch and give their leases back{again}");
}

/// Resolves once every child has exited, describing each one's exit status.
/// Tells the contact sheets the report left out (not what their class's committing attempt
/// wrote) on stderr: a report that silently lacks pictures looks like a bug.
fn warn_sheets(summary: &crate::report::ReportSummary, job: &str) {
    if summary.sheets_left_out.is_empty() {
        return;
    }
    errln!(
        "warning: {} contact sheet(s) left out of the report, not being what the attempt that committed their class wrote \
         (`coordinator verify {job}` lists them, `coordinator resume {job}` removes them):",
        summary.sheets_left_out.len()
    );
    for (wnid, problem) in summary.sheets_left_out.iter().take(10) {
        errln!("  class `{wnid}`: `{}` {}", problem.file, problem.problem);
    }
    if summary.sheets_left_out.len() > 10 {
        errln!("  and {} more (the report lists them)", summary.sheets_left_out.len() - 10);
    }
}

/// Tells the classes outside the quality band on stderr, so that a run that succeeded with
/// models or labels that do not fit its data does not look like a good one.
fn warn_quality(summary: &crate::report::ReportSummary) {
    if summary.warnings.is_empty() {
        return;
    }
    errln!(
        "warning: {} of {} classes fall outside the quality band (see the report's Warnings):",
        summary.warnings.len(),
        summary.classes
    );
    for line in summary.warning_lines(10) {
        errln!("  {line}");
    }
}

/// Each exited local worker as `local-i exited (status): its last error line`.
async fn exit_reasons(
    workers: &mut [tokio::process::Child],
    last_errors: &std::sync::Mutex<Vec<Option<String>>>,
) -> Vec<String> {
    let exits = all_exited(workers).await;
    let errors = last_errors.lock().expect("last errors").clone();
    exits
        .iter()
        .zip(errors)
        .enumerate()
        .map(|(i, (exit, error))| {
            format!("local-{i} exited ({exit}): {}", error.as_deref().unwrap_or("see its log above"))
        })
        .collect()
}

/// Stops `coordinator run`'s own workers (drained, then killed after 30 s), writes the
/// coordinator's state and stops it, which releases the store's lock.
async fn stop_local(
    coordinator: &Coordinator,
    workers: &mut [tokio::process::Child],
    local: crate::local::LocalCoordinator,
) {
    coordinator.drain();
    // The drain reaches a worker at its next poll; SIGTERM asks the same of one that has not
    // registered yet (loading its models, or connecting), which would otherwise be waited for.
    for worker in workers.iter_mut() {
        if let Some(pid) = worker.id().and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: kill(2) on our own child's pid, which tokio has not reaped (id() is Some).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    for worker in workers.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(30), worker.wait()).await.is_err() {
            let _ = worker.start_kill();
        }
    }
    coordinator.flush().await;
    let _ = local.stop().await;
}

/// Waits for every local worker to exit, telling `coordinator` of each as it goes (its leases go
/// to the other workers at once, not a lease timeout later) and saying so when others still run;
/// returns each one's exit status as text.
async fn all_exited_telling(children: &mut [tokio::process::Child], coordinator: &Coordinator) -> Vec<String> {
    use futures::StreamExt;
    use futures::stream::FuturesUnordered;
    let total = children.len();
    let mut statuses = vec![String::new(); total];
    let mut waits: FuturesUnordered<_> =
        children.iter_mut().enumerate().map(|(i, child)| async move { (i, child.wait().await) }).collect();
    let mut exited = 0;
    while let Some((i, result)) = waits.next().await {
        exited += 1;
        let text = match result {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        };
        if exited < total {
            tracing::warn!(worker = %format!("local-{i}"), status = %text, running = total - exited, "a local worker exited; its lease is given up now, not a lease timeout later (the shard goes to another worker while it has attempts left)");
        }
        coordinator.worker_gone(&format!("local-{i}"));
        statuses[i] = text;
    }
    statuses
}

async fn all_exited(children: &mut [tokio::process::Child]) -> Vec<String> {
    let mut statuses = Vec::new();
    for child in children.iter_mut() {
        match child.wait().await {
            Ok(status) => statuses.push(status.to_string()),
            Err(e) => statuses.push(e.to_string()),
        }
    }
    statuses
}

/// Where `coordinator run`'s workers run their models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LocalDevice {
    /// On the CPU.
    Cpu,
    /// On GPUs, one per worker.
    Cuda,
}

impl RunArgs {
    /// The `--device` argument of each local worker: `None` for the CPU, else `cuda:N` for
    /// worker i in turn over `--devices` (or GPU i without it).
    ///
    /// # Errors
    /// `--local-workers 0`.
    pub fn worker_devices(&self) -> Result<Vec<Option<String>>> {
        if self.device == Some(LocalDevice::Cpu) && !self.devices.is_empty() {
            bail!("--devices gives the workers GPUs and --device cpu keeps them on the CPU: drop one of the two");
        }
        let cuda = self.device == Some(LocalDevice::Cuda) || !self.devices.is_empty();
        let count = self.local_workers.unwrap_or(if self.devices.is_empty() { 1 } else { self.devices.len() });
        if count == 0 {
            bail!("--local-workers must be at least 1");
        }
        Ok((0..count)
            .map(|i| {
                cuda.then(|| {
                    let gpu = if self.devices.is_empty() { i as u32 } else { self.devices[i % self.devices.len()] };
                    format!("cuda:{gpu}")
                })
            })
            .collect())
    }
}

/// `coordinator run`: everything on this machine.
/// How long `coordinator run` waits for its workers to load their models and register before
/// it submits the job anyway (its shards then sized for the default DiT rows).
const REGISTRATION_WAIT: Duration = Duration::from_secs(600);

/// Waits until every local worker has registered, one has exited (its error is reported once
/// the job runs), a stop signal came, or `limit` has passed.
async fn wait_for_registrations(coordinator: &Coordinator, workers: &mut [tokio::process::Child], limit: Duration) {
    let started = tokio::time::Instant::now();
    loop {
        let exited = workers.iter_mut().any(|w| !matches!(w.try_wait(), Ok(None)));
        let stopped = mgd3_common::stop_requested().is_some();
        if coordinator.live_workers() >= workers.len() || exited || stopped || started.elapsed() >= limit {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A submit error of `coordinator run`, prefixed with the spec's file where the spec is what was
/// refused (as `check` says it).
fn spec_refusal(error: crate::Error, spec: &Path) -> anyhow::Error {
    let refused = matches!(error, crate::Error::Job(_));
    let error = anyhow::Error::new(error);
    if refused { error.context(format!("job spec `{}`", spec.display())) } else { error }
}

async fn run_local(args: RunArgs) -> Result<()> {
    // A Ctrl-C from here on stops cleanly, whatever step the run is in: said at once, acted on
    // once the step in progress ends (the store's lock is released, a job not yet submitted is
    // not); a second one exits at once.
    let mut signals = mgd3_common::listen_for_stop();
    tokio::spawn(async move {
        let signal = signals.wait_for(Option::is_some).await.map(|signal| *signal);
        if let Ok(Some(signal)) = signal {
            stopping_message(signal);
        }
    });
    let devices = args.worker_devices()?;
    let local_workers = devices.len();
    let (text, base) = read_spec(&args.spec)?;
    let sweep = Sweep::parse(&text).with_context(|| format!("job spec `{}`", args.spec.display()))?;
    let spec = match &sweep {
        Some(sweep) => sweep.variants[0].spec.clone(),
        None => mgd3_common::job::JobSpec::from_toml(&text)?,
    };
    let worker_bin = match &args.worker_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.parent().context("executable folder")?.join("worker"),
    };
    if !worker_bin.exists() {
        bail!("worker binary `{}` not found (build it, or pass --worker-bin)", worker_bin.display());
    }
    // A spec that cannot run is refused before the store is opened and workers start.
    let worker_device = args.worker_args.iter().chain(&args.trailing_worker_args).any(|a| a.starts_with("--device"));
    let cpu_workers = devices.iter().all(Option::is_none) && !worker_device;
    // A state store inside the dataset (`--store` apart from the output) is refused with the
    // rest, before it is made: its lock and `jobs/` would sit beside the class folders.
    let cwd = std::env::current_dir()?;
    let apart = args.store.as_deref().map(|store| mgd3_common::store::resolve(store, &cwd));
    crate::submit::check_before_workers(&spec, Path::new(&base), apart.as_deref(), cpu_workers)
        .with_context(|| format!("job spec `{}`", args.spec.display()))?;
    let store = match (&args.store, &spec.output) {
        (Some(store), _) => store.clone(),
        (None, Some(output)) => mgd3_common::store::resolve(output, Path::new(&base)),
        (None, None) => mgd3_common::store::resolve("out", Path::new(&base)),
    };
    // A local store folder this run makes is removed again, when still empty, should the job not
    // be submitted (a dataset problem found at submit): a refused spec leaves nothing behind.
    let made_folders: Vec<PathBuf> = {
        let local = store.strip_prefix("file://").unwrap_or(&store);
        match mgd3_common::store::is_url(local) {
            true => Vec::new(),
            // The folder and each missing parent, innermost first.
            false => Path::new(local).ancestors().take_while(|p| !p.exists()).map(Path::to_owned).collect(),
        }
    };
    let coordinator = Coordinator::open(&store, args.heartbeat_ms).await?;
    // This run runs its own job (or sweep), once submitted: nothing before that, and not the
    // unfinished jobs recovered from the store beside it (a sweep's variants dropped from its
    // spec, another spec's job), which are named below and keep their state.
    coordinator.run_only(Some(Default::default()));
    let config = ServeConfig { store_url: store.clone(), token: None, tls: None, heartbeat_ms: args.heartbeat_ms };
    let local = crate::local::LocalCoordinator::start(coordinator.clone(), config, 0).await?;
    let url = local.url.clone();
    // `coordinator status`, `list`, `verify` on this host find this run's random port; a second
    // `run` on the store is told this one stops when its job ends.
    let _announced = crate::runtime::announce(&url, &store, None);
    coordinator.advertise(&url, None, true).await;
    // N workers on one machine share its CPUs: each gets its share for decoding and k-means
    // (MGD3_CPU_THREADS, which an explicit --cpu-threads in --worker-arg overrides).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu_share = (cpus / local_workers).max(1).to_string();
    // The workers' log lines go through this process, so that on a terminal they print above
    // the progress bar instead of through it.
    let mut progress = Progress::new(&url, args.progress.options());
    let mut workers = Vec::new();
    // Each worker's last `error:` line: why it stopped, should every one stop.
    let last_errors = std::sync::Arc::new(std::sync::Mutex::new(vec![None::<String>; devices.len()]));
    for (i, device) in devices.iter().enumerate() {
        let mut command = tokio::process::Command::new(&worker_bin);
        // A `coordinator run` that is killed outright (SIGKILL, the OOM killer) cannot stop its
        // workers: the kernel sends them SIGTERM instead, on which they release their shards and
        // exit, rather than outliving it until their give-up time.
        // SAFETY: the closure runs in the child between fork and exec and calls only prctl(2),
        // which is async-signal-safe and touches no memory of the parent.
        #[cfg(target_os = "linux")]
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            // The user's own value when set; empty counts as unset, as for every flag's variable.
            .env(
                "MGD3_CPU_THREADS",
                std::env::var("MGD3_CPU_THREADS").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| cpu_share.clone()),
            )
            .arg("--coordinator")
            .arg(&url)
            .arg("--worker-id")
            .arg(format!("local-{i}"))
            .args(device.iter().flat_map(|d| ["--device", d.as_str()]))
            .args(&args.worker_args)
            .args(&args.trailing_worker_args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start `{}`", worker_bin.display()))?;
        let mut child = child;
        if let Some(stderr) = child.stderr.take() {
            let last_errors = last_errors.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    mgd3_common::telemetry::write_stderr(format!("{line}\n").as_bytes());
                    if let Some(error) = line.strip_prefix("error: ") {
                        last_errors.lock().expect("last errors")[i] = Some(error.to_owned());
                    }
                }
            });
        }
        workers.push(child);
    }
    // The job is submitted once the workers have registered (or given up), so that its shards
    // are sized by the batch policy they report rather than the default.
    wait_for_registrations(&coordinator, &mut workers, REGISTRATION_WAIT).await;
    // Every local worker gone before it registered (a device it cannot use): nothing to run the
    // job, so it is not submitted; a refused submit stops the workers and frees the store too.
    let all_gone = workers.iter_mut().all(|w| !matches!(w.try_wait(), Ok(None)));
    let submitted = if let Some(signal) = mgd3_common::stop_requested() {
        let next = "nothing was submitted; `coordinator run` again starts the job".to_owned();
        Err(anyhow::Error::new(mgd3_common::Interrupted { signal, next: Some(next) }))
    } else if all_gone {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let reasons = exit_reasons(&mut workers, &last_errors).await;
        let job = format!("in `{}` (not submitted)", args.spec.display());
        Err(anyhow::Error::new(mgd3_common::NoWorker { job, reasons }))
    } else if let Some(sweep) = &sweep {
        let submitted = coordinator.submit_sweep(sweep, Path::new(&base), args.resubmit()).await;
        match submitted {
            Ok(submitted) => {
                let ids = submitted.record.variants.iter().map(|v| v.job_id.clone()).collect();
                note_left_out(&coordinator.run_only(Some(ids)), spec.name.as_deref());
                return run_local_sweep(&args, submitted, coordinator, local, workers, &last_errors, &store).await;
            }
            Err(error) => Err(spec_refusal(error, &args.spec)),
        }
    } else {
        coordinator
            .submit_with(&text, Path::new(&base), None, args.resubmit())
            .await
            .map_err(|error| spec_refusal(error, &args.spec))
    };
    let (job, _, notes) = match submitted {
        Ok(submitted) => submitted,
        Err(error) => {
            stop_local(&coordinator, &mut workers, local).await;
            progress.finish();
            // Only empty folders go (the lock is released by now); anything else stays.
            for folder in &made_folders {
                if std::fs::remove_dir(folder).is_err() {
                    break;
                }
            }
            return Err(error);
        }
    };
    for note in &notes {
        errln!("note: {note}");
    }
    note_left_out(&coordinator.run_only(Some([job.job_id.clone()].into())), spec.name.as_deref());
    errln!(
        "job {} ({} classes, {} shards) on {} local worker(s); {}",
        job.job_id,
        job.classes.len(),
        job.shards.len(),
        local_workers,
        output_and_store(job.spec.output.as_deref().unwrap_or(&store), &store)
    );
    let mut client = connect(&url, None, None)?;
    let outcome = tokio::select! {
        status = wait_for(&mut client, &job.job_id, &mut progress, args.progress.excluded_grace(Duration::ZERO)) => status,
        signal = mgd3_common::termination() => {
            let next = format!("`coordinator run` again (or `coordinator resume {}`) continues the job", job.job_id);
            Err(mgd3_common::Interrupted { signal, next: Some(next) }.into())
        }
        _ = all_exited_telling(&mut workers, &coordinator) => {
            // Their stderr may still be draining: the reasons come with the last lines.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let reasons = exit_reasons(&mut workers, &last_errors).await;
            Err(mgd3_common::NoWorker { job: job.job_id.clone(), reasons }.into())
        }
    };
    // Our own channel must not keep the server's graceful shutdown waiting.
    drop(client);
    stop_local(&coordinator, &mut workers, local).await;
    progress.finish();
    let status = outcome?;
    exit_for(&status, &url)?;
    outln!("dataset: {}/dataset", status.output);
    if !args.no_report {
        // The report is for looking at; a failure to write it leaves the job as it is.
        let written = match mgd3_common::store::open(&status.output) {
            Ok(dir) => crate::report::write_report(&dir, &status.job_id, &dir.child("report"), false)
                .await
                .map_err(|e| mgd3_common::error_chain(&e)),
            Err(e) => Err(mgd3_common::error_chain(&e)),
        };
        match written {
            Ok(summary) => {
                outln!("report: {}", summary.index);
                warn_quality(&summary);
                warn_sheets(&summary, &status.job_id);
            }
            Err(error) => tracing::warn!(%error, "no report written; `coordinator report` tries again"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep that did not wholly succeed points to `status` while a coordinator serves it, and,
    /// after a `run` took its coordinator with it, to what still answers.
    #[test]
    fn a_sweep_that_did_not_succeed_says_where_to_look() {
        let record = SweepRecord {
            schema_version: 1,
            sweep_id: "s-sweep-000000000000".into(),
            keys: vec!["seed".into()],
            variants: vec![mgd3_common::sweep::VariantRecord {
                job_id: "s-0".into(),
                fingerprint: String::new(),
                settings: [("seed".to_owned(), "1".to_owned())].into(),
            }],
            output: "/o".into(),
            created_unix_ms: 0,
        };
        let mut status = JobStatus::quarantined("s-0".into(), String::new(), "");
        status.state = JobState::Cancelled;
        let served = exit_for_sweep(&record, std::slice::from_ref(&status), true).unwrap_err().to_string();
        assert!(served.contains("s-0 (seed=1) cancelled") && served.contains("`coordinator status <job>`"), "{served}");
        let ran = exit_for_sweep(&record, &[status], false).unwrap_err().to_string();
        assert!(
            !ran.contains("coordinator status") && ran.contains("--job-dir") && ran.contains("--retry-failed"),
            "{ran}"
        );
    }

    /// `run` names where the images go and, only when it is elsewhere, where the state is: with
    /// `--store` apart from the spec's output it said "output <store>".
    #[test]
    fn the_run_line_names_the_output_and_a_store_apart() {
        assert_eq!(output_and_store("/o/ro", "/o/ro/"), "output /o/ro");
        assert_eq!(output_and_store("file:///o/ro", "/o/ro"), "output file:///o/ro");
        assert_eq!(output_and_store("/o/ro", "/o/rostore"), "output /o/ro; state in /o/rostore");
        assert_eq!(output_and_store("s3://b/out", "/state"), "output s3://b/out; state in /state");
    }
}
