//! The cluster in one process on port 0, with stand-in engines: a job completes and its outputs
//! equal a 1-worker run; failures are named and resumable; two attempts racing on one shard leave
//! one winner per class and no mixed files; RPCs without the token are rejected.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use futures::TryStreamExt;
use mgd3_common::commit::ClassFiles;
use mgd3_common::job::{ClassRef, JobSpec, ResolvedJob};
use mgd3_common::layout::JobKeys;
use mgd3_common::manifest::JobManifest;
use mgd3_common::proto;
use mgd3_common::status::{JobState, JobStatus};
use mgd3_common::store::{self, Location};
use mgd3_coordinator::local::LocalCoordinator;
use mgd3_coordinator::{Coordinator, ServeConfig};
use mgd3_worker::client::{ClientError, WorkerConfig, run};
use mgd3_worker::shard::{ClassResult, FakeEngine, ShardEngine, ShardFailure, ShardLease, ShardProgress, run_shard};
use object_store::ObjectStoreExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const FINGERPRINT: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// An ImageFolder the stand-in engines never read, but which the coordinator lists at submit:
/// 40 classes `class00`.. of 8 small files each.
fn fake_dataset() -> &'static str {
    static ROOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cluster-dataset");
        for class in 0..40 {
            let dir = root.join(format!("class{class:02}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..8 {
                std::fs::write(dir.join(format!("{i}.png")), [class as u8, i as u8]).unwrap();
            }
        }
        root.display().to_string()
    })
}

fn spec_toml(classes: usize, ipc: usize, per_shard: usize, output: &str) -> String {
    let names: Vec<String> = (0..classes).map(|i| format!("\"class{i:02}\"")).collect();
    format!(
        r#"name = "cluster"
dataset = "{dataset}"
classes = [{}]
labels = "position"
ipc = {ipc}
seed = 5
output = "{output}"
classes_per_shard = {per_shard}
lease_timeout_s = 5
max_attempts = 2
[models]
dit = "/models/dit.onnx"
vae_encoder = "/models/enc.onnx"
vae_decoder = "/models/dec.onnx"
dit_fingerprint = "{FINGERPRINT}"
vae_encoder_fingerprint = "{FINGERPRINT}"
vae_decoder_fingerprint = "{FINGERPRINT}"
"#,
        names.join(", "),
        dataset = fake_dataset(),
    )
}

struct Cluster {
    url: String,
    coordinator: Coordinator,
    local: LocalCoordinator,
}

async fn start(store_url: &str, token: Option<&str>) -> Cluster {
    start_with_tls(store_url, token, None).await
}

async fn start_with_tls(store_url: &str, token: Option<&str>, tls: Option<(Vec<u8>, Vec<u8>)>) -> Cluster {
    start_on(store_url, token, tls, 0).await
}

async fn start_on(store_url: &str, token: Option<&str>, tls: Option<(Vec<u8>, Vec<u8>)>, port: u16) -> Cluster {
    start_beating(store_url, token, tls, port, 100).await
}

async fn start_beating(
    store_url: &str,
    token: Option<&str>,
    tls: Option<(Vec<u8>, Vec<u8>)>,
    port: u16,
    heartbeat_ms: u64,
) -> Cluster {
    let coordinator = Coordinator::open(store_url, 100).await.unwrap();
    let config = ServeConfig { store_url: store_url.into(), token: token.map(str::to_owned), tls, heartbeat_ms };
    let local = LocalCoordinator::start(coordinator, config, port).await.unwrap();
    Cluster { url: local.url.clone(), coordinator: local.coordinator.clone(), local }
}

/// A served coordinator on a temporary store holding one submitted job of `classes` classes at
/// `ipc`, `per_shard` classes per shard.
async fn cluster_with_job(
    classes: usize,
    ipc: usize,
    per_shard: usize,
) -> (tempfile::TempDir, Cluster, Arc<ResolvedJob>) {
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let cluster = start(&store_url, None).await;
    let (job, _) =
        cluster.coordinator.submit(&spec_toml(classes, ipc, per_shard, &store_url), dir.path(), None).await.unwrap();
    (dir, cluster, job)
}

impl Cluster {
    /// Runs `job` to success on one stand-in worker, then stops the worker.
    async fn run_to_success(&self, job: &str) {
        let engine = Box::new(FakeEngine::new(Duration::from_millis(5)));
        let (stop, handle) = worker(&self.url, "runner", None, engine);
        assert_eq!(wait_until_done(&self.coordinator, job).await.state, JobState::Succeeded);
        let _ = stop.send(());
        handle.await.unwrap().unwrap();
    }

    async fn shutdown(self) {
        self.local.stop().await.unwrap();
    }
}

fn worker(
    url: &str,
    id: &str,
    token: Option<&str>,
    engine: Box<dyn ShardEngine>,
) -> (oneshot::Sender<()>, JoinHandle<Result<(), ClientError>>) {
    let config = WorkerConfig {
        coordinator: url.into(),
        worker_id: id.into(),
        token: token.map(str::to_owned),
        tls_ca: None,
        devices: vec!["cpu".into()],
        give_up_after: None,
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(run(config, engine, async move {
        let _ = stopped.await;
    }));
    (stop, handle)
}

async fn wait_until_done(coordinator: &Coordinator, job: &str) -> JobStatus {
    for _ in 0..600 {
        let status = coordinator.status(job).unwrap();
        if status.state != JobState::Running {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {job} did not finish: {:?}", coordinator.status(job));
}

async fn dataset_files(out: &Location, job: &str) -> Vec<(String, Vec<u8>)> {
    let prefix = out.key(&format!("jobs/{job}/dataset"));
    let mut objects: Vec<_> = out.store.list(Some(&prefix)).try_collect().await.unwrap();
    objects.sort_by(|a, b| a.location.cmp(&b.location));
    let mut files = Vec::new();
    for o in objects {
        let bytes = out.store.get(&o.location).await.unwrap().bytes().await.unwrap().to_vec();
        let relative = o.location.as_ref().strip_prefix(prefix.as_ref()).unwrap().to_owned();
        files.push((relative, bytes));
    }
    files
}

async fn run_job(
    workers: usize,
    classes: usize,
    per_shard: usize,
) -> (tempfile::TempDir, String, Vec<(String, Vec<u8>)>) {
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let cluster = start(&store_url, None).await;
    let (job, existed) =
        cluster.coordinator.submit(&spec_toml(classes, 3, per_shard, &store_url), dir.path(), None).await.unwrap();
    assert!(!existed);
    let mut handles = Vec::new();
    for i in 0..workers {
        handles.push(worker(
            &cluster.url,
            &format!("w{i}"),
            None,
            Box::new(FakeEngine::new(Duration::from_millis(30))),
        ));
    }
    let status = wait_until_done(&cluster.coordinator, &job.job_id).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    assert_eq!((status.shards.done, status.images_done), (job.shards.len() as u32, (classes * 3) as u64));
    cluster.coordinator.drain();
    for (_, handle) in handles {
        handle.await.unwrap().unwrap();
    }
    cluster.coordinator.flush().await;
    let out = store::open(&store_url).unwrap();
    let files = dataset_files(&out, &job.job_id).await;
    let id = job.job_id.clone();
    cluster.shutdown().await;
    (dir, id, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_on_three_workers_equals_one_worker_run() {
    let (dir, job, three) = run_job(3, 12, 2).await;
    let (_dir1, job1, one) = run_job(1, 12, 2).await;
    assert_eq!(job, job1, "same spec, same job id");
    assert_eq!(three.len(), 36);
    assert_eq!(three, one, "PNG bytes must not depend on the number of workers");
    let out = store::open(&dir.path().display().to_string()).unwrap();
    let keys = JobKeys::new(&job);
    let manifest: JobManifest =
        serde_json::from_slice(&out.store.get(&out.key(&keys.manifest())).await.unwrap().bytes().await.unwrap())
            .unwrap();
    assert_eq!((manifest.classes.len(), manifest.images), (12, 36));
    for class in &manifest.classes {
        for (j, digest) in class.images.iter().enumerate() {
            let bytes = &three.iter().find(|(name, _)| *name == format!("/{}/{j}.png", class.wnid)).unwrap().1;
            assert_eq!(digest.sha256, mgd3_common::sha256_hex(bytes));
        }
    }
    let staging: Vec<_> = out.store.list(Some(&out.key(&format!("jobs/{job}/staging")))).try_collect().await.unwrap();
    assert!(staging.is_empty());
}

/// Fails one class with a non-retryable error until `fixed` is set.
struct Flaky {
    bad: String,
    fixed: Arc<AtomicBool>,
    inner: FakeEngine,
}

impl ShardEngine for Flaky {
    fn distill(
        &mut self,
        spec: &JobSpec,
        class: &ClassRef,
        cancel: &Arc<AtomicBool>,
    ) -> Result<ClassResult, ShardFailure> {
        if class.wnid == self.bad && !self.fixed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(ShardFailure::Reported {
                message: format!("class `{}`: image `broken.jpg` cannot be decoded", class.wnid),
                retryable: false,
            });
        }
        self.inner.distill(spec, class, cancel)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_class_is_named_the_rest_commits_and_resume_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let cluster = start(&store_url, None).await;
    let spec = spec_toml(6, 2, 1, &store_url);
    let (job, _) = cluster.coordinator.submit(&spec, dir.path(), None).await.unwrap();
    let fixed = Arc::new(AtomicBool::new(false));
    let engine =
        Flaky { bad: "class03".into(), fixed: fixed.clone(), inner: FakeEngine::new(Duration::from_millis(10)) };
    let (stop, handle) = worker(&cluster.url, "w0", None, Box::new(engine));
    let status = wait_until_done(&cluster.coordinator, &job.job_id).await;
    assert_eq!(status.state, JobState::Failed);
    assert_eq!((status.shards.done, status.shards.failed), (5, 1));
    assert_eq!(status.failures.len(), 1);
    assert_eq!(status.failures[0].wnid, "class03");
    assert!(status.failures[0].error.contains("broken.jpg"), "{:?}", status.failures[0]);
    assert!(!status.failures[0].retrying, "out of attempts: a failure, not a retry");

    // Submitting it again (what `coordinator run` does) retries nothing by itself, and says how.
    let (_, existed, notes) = cluster.coordinator.submit_noted(&spec, dir.path(), None).await.unwrap();
    assert!(
        existed
            && notes
                .iter()
                .any(|n| n.contains("has failed") && n.contains("--retry-failed") && n.contains("coordinator resume")),
        "{notes:?}"
    );
    // A different spec may not resume this job.
    let changed = spec.replace("seed = 5", "seed = 6");
    let err = cluster.coordinator.resume(&job.job_id, Some((&changed, dir.path()))).await.unwrap_err();
    assert!(err.to_string().contains("fingerprint changed"), "{err}");

    // --retry-failed while the cause lasts: the failed shard runs again and fails again.
    let retry = mgd3_coordinator::service::Resubmit { retry_failed: true, ..Default::default() };
    let (_, _, notes) = cluster.coordinator.submit_with(&spec, dir.path(), None, retry).await.unwrap();
    assert!(notes.iter().any(|n| n.contains("had failed; --retry-failed: 1 shard(s) run again")), "{notes:?}");
    let status = wait_until_done(&cluster.coordinator, &job.job_id).await;
    assert_eq!((status.state, status.shards.done, status.shards.failed), (JobState::Failed, 5, 1));

    fixed.store(true, std::sync::atomic::Ordering::Relaxed);
    // Fixed: the same command with --retry-failed (what `coordinator run --retry-failed` does)
    // runs the failed shard again and keeps the five committed ones.
    let (_, _, notes) = cluster.coordinator.submit_with(&spec, dir.path(), None, retry).await.unwrap();
    assert!(notes.iter().any(|n| n.contains("1 shard(s) run again, 5 committed shard(s) kept")), "{notes:?}");
    let status = wait_until_done(&cluster.coordinator, &job.job_id).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    // Once succeeded, --retry-failed changes nothing.
    let (_, _, notes) = cluster.coordinator.submit_with(&spec, dir.path(), None, retry).await.unwrap();
    assert!(!notes.iter().any(|n| n.contains("retry")), "{notes:?}");
    assert_eq!(cluster.coordinator.status(&job.job_id).unwrap().state, JobState::Succeeded);
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_survives_a_coordinator_restart() {
    let (dir, cluster, job) = cluster_with_job(4, 2, 1).await;
    let store_url = dir.path().display().to_string();
    cluster.run_to_success(&job.job_id).await;
    cluster.shutdown().await;
    // A new coordinator on the same store knows the job and its outcome.
    let again = start(&store_url, None).await;
    let status = again.coordinator.status(&job.job_id).unwrap();
    assert_eq!((status.state.as_str(), status.shards.done), ("succeeded", 4));
    assert_eq!(again.coordinator.list().len(), 1);
    let error = again.coordinator.cancel(&job.job_id).unwrap_err().to_string();
    assert!(error.contains("has already ended (succeeded)"), "{error}");
    again.shutdown().await;
}

/// A crash between "finished" and the manifest it certifies: state.json says finished, the
/// manifest is missing (or is another spec's). Recovery checks the artefact: the job reports
/// `running` until the manifest is rewritten, then `succeeded` with the manifest in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_rewrites_a_missing_manifest_before_reporting_success() {
    let (dir, cluster, job) = cluster_with_job(3, 2, 1).await;
    let store_url = dir.path().display().to_string();
    cluster.run_to_success(&job.job_id).await;
    cluster.shutdown().await;
    let out = store::open(&store_url).unwrap();
    let keys = JobKeys::new(&job.job_id);
    let manifest_key = out.key(&keys.manifest());
    let state: serde_json::Value =
        serde_json::from_slice(&out.store.get(&out.key(&keys.state_json())).await.unwrap().bytes().await.unwrap())
            .unwrap();
    assert!(state["finished_unix_ms"].is_u64(), "state.json records the finish once the manifest exists: {state}");
    let original = out.store.get(&manifest_key).await.unwrap().bytes().await.unwrap();

    for damage in ["deleted", "another job's"] {
        match damage {
            "deleted" => out.store.delete(&manifest_key).await.unwrap(),
            _ => {
                let mut other: serde_json::Value = serde_json::from_slice(&original).unwrap();
                other["fingerprint"] = "sha256:other".into();
                out.store.put(&manifest_key, serde_json::to_vec(&other).unwrap().into()).await.unwrap();
            }
        }
        let again = start(&store_url, None).await;
        let status = again.coordinator.status(&job.job_id).unwrap();
        assert_eq!(status.state, JobState::Succeeded, "{damage} manifest: {status:?}");
        let manifest: JobManifest =
            serde_json::from_slice(&out.store.get(&manifest_key).await.unwrap().bytes().await.unwrap()).unwrap();
        assert_eq!((manifest.fingerprint.as_str(), manifest.images), (job.fingerprint.as_str(), 6), "{damage}");
        again.shutdown().await;
    }
}

/// A long-lived worker outlives its coordinator: the coordinator comes back on another store
/// with another spec under the same job id. The worker registers again (the new coordinator does
/// not know it) and runs the spec its lease carries, writing into the new job's output only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_registers_again_and_runs_the_spec_its_lease_carries() {
    let dir = tempfile::tempdir().unwrap();
    let (first_store, second_store) = (dir.path().join("first"), dir.path().join("second"));
    let first_url = first_store.display().to_string();
    let second_url = second_store.display().to_string();
    let first = start(&first_url, None).await;
    let port: u16 = first.url.rsplit(':').next().unwrap().parse().unwrap();
    let (job, _) =
        first.coordinator.submit(&spec_toml(3, 2, 1, &first_url), dir.path(), Some("same".into())).await.unwrap();
    let (stop, handle) = worker(&first.url, "long-lived", None, Box::new(FakeEngine::new(Duration::from_millis(5))));
    assert_eq!(wait_until_done(&first.coordinator, &job.job_id).await.state, JobState::Succeeded);
    first.shutdown().await;
    let first_out = store::open(&first_url).unwrap();
    let first_files = dataset_files(&first_out, "same").await;
    assert_eq!(first_files.len(), 6);

    let second = start_on(&second_url, None, None, port).await;
    let other_spec = spec_toml(3, 4, 1, &second_url).replace("seed = 5", "seed = 9");
    let (other, _) = second.coordinator.submit(&other_spec, dir.path(), Some("same".into())).await.unwrap();
    assert_ne!(other.fingerprint, job.fingerprint);
    let status = wait_until_done(&second.coordinator, "same").await;
    assert_eq!((status.state.as_str(), status.images_done), ("succeeded", 12), "{status:?}");
    let second_out = store::open(&second_url).unwrap();
    assert_eq!(dataset_files(&second_out, "same").await.len(), 12, "IPC 4 of the new spec");
    assert_eq!(dataset_files(&first_out, "same").await, first_files, "the old job's output is untouched");
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    second.shutdown().await;
}

/// Two live workers under one id (two processes of one Slurm task given the same --worker-id):
/// the second is refused, naming both processes, instead of computing classes twice; the first
/// runs the job alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_live_worker_under_the_same_id_is_refused_naming_both() {
    let (_dir, cluster, job) = cluster_with_job(6, 2, 1).await;
    let (stop, first) = worker(&cluster.url, "twin", None, Box::new(FakeEngine::new(Duration::from_millis(300))));
    wait_for_running(&cluster.coordinator, &job.job_id).await;
    let config = WorkerConfig {
        coordinator: cluster.url.clone(),
        worker_id: "twin".into(),
        token: None,
        tls_ca: None,
        devices: vec!["cpu".into()],
        give_up_after: Some(Duration::from_millis(500)),
    };
    let engine = Box::new(FakeEngine::new(Duration::from_millis(5)));
    let second = tokio::time::timeout(Duration::from_secs(20), run(config, engine, std::future::pending()))
        .await
        .expect("the second worker gives up");
    let error = mgd3_common::error_chain(&second.expect_err("the second worker is refused"));
    let pid = format!("pid {}", std::process::id());
    assert!(
        error.contains("worker id `twin` is already used by a live worker") && error.matches(&pid).count() == 2,
        "{error}"
    );
    let status = wait_until_done(&cluster.coordinator, &job.job_id).await;
    assert_eq!(status.state, JobState::Succeeded, "{status:?}");
    assert!(status.failures.is_empty(), "no attempt was lost to the twin: {:?}", status.failures);
    let _ = stop.send(());
    first.await.unwrap().unwrap();
    cluster.shutdown().await;
}

/// A process that goes silent (SIGSTOP, a network cut) loses its worker id to a process that
/// registers under it; when the first one polls again it is refused, naming both, so the two never
/// run the same shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_that_lost_its_id_to_another_process_is_refused_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(&dir.path().display().to_string(), None).await;
    let mut client = mgd3_common::rpc::connect(&cluster.url, None, None).unwrap();
    let register = |instance: &str, pid: u32| proto::RegisterWorkerRequest {
        worker_id: "twin".into(),
        hostname: "n1".into(),
        protocol_version: mgd3_common::PROTOCOL_VERSION,
        pid,
        instance: instance.into(),
        ..Default::default()
    };
    let poll = |instance: &str, pid: u32| proto::PollWorkRequest {
        worker_id: "twin".into(),
        instance: instance.into(),
        pid,
        hostname: "n1".into(),
        ..Default::default()
    };
    client.register_worker(register("first", 10)).await.unwrap();
    client.poll_work(poll("first", 10)).await.unwrap();
    // Silent for more than three heartbeats (100 ms each): another process takes the id over.
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.register_worker(register("second", 11)).await.unwrap();
    client.poll_work(poll("second", 11)).await.unwrap();
    let refused = client.poll_work(poll("first", 10)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists);
    let text = refused.message();
    assert!(text.contains("pid 11 on `n1`") && text.contains("pid 10 on `n1`"), "{text}");
    // The holder goes on.
    client.poll_work(poll("second", 11)).await.unwrap();
    cluster.shutdown().await;
}

/// A store whose writes fail the way a full, read-only or forbidden local disk fails (the I/O
/// error inside object_store's generic error, as its local backend reports it); reads work.
#[derive(Debug)]
struct Refusing {
    inner: Arc<dyn object_store::ObjectStore>,
    errno: i32,
}

impl std::fmt::Display for Refusing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Refusing({})", self.inner)
    }
}

impl Refusing {
    fn refuse<T>(&self, _: &object_store::path::Path) -> object_store::Result<T> {
        let io = std::io::Error::from_raw_os_error(self.errno);
        Err(object_store::Error::Generic { store: "LocalFileSystem", source: Box::new(io) })
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for Refusing {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        _: object_store::PutPayload,
        _: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.refuse(location)
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        _: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.refuse(location)
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        _: &object_store::path::Path,
        to: &object_store::path::Path,
        _: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.refuse(to)
    }
}

/// An engine that commits the first `commit` classes handed to it and counts them in
/// `committed`. Then, with no `hang_up`, it reports itself cancelled, as the pipeline does when a
/// stop (SIGTERM, a revoked lease) comes during the shard's last DiT batch: the batch's classes
/// are committed, then the loop sees the flag. With `hang_up`, it runs on until it is cancelled
/// (a long class) or the flag is set.
struct CommitsFirst {
    inner: FakeEngine,
    commit: usize,
    committed: Arc<std::sync::atomic::AtomicUsize>,
    hang_up: Option<Arc<AtomicBool>>,
}

impl CommitsFirst {
    fn new(commit: usize, hang_up: Option<Arc<AtomicBool>>) -> Self {
        let (inner, committed) = (FakeEngine::new(Duration::from_millis(1)), Arc::default());
        CommitsFirst { inner, commit, committed, hang_up }
    }

    /// Waits (up to 10 s) until `count` classes are committed.
    async fn wait_for(committed: &std::sync::atomic::AtomicUsize, count: usize) {
        for _ in 0..500 {
            if committed.load(std::sync::atomic::Ordering::SeqCst) == count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl ShardEngine for CommitsFirst {
    fn distill(
        &mut self,
        spec: &JobSpec,
        class: &ClassRef,
        cancel: &Arc<AtomicBool>,
    ) -> Result<ClassResult, ShardFailure> {
        self.inner.distill(spec, class, cancel)
    }

    fn distill_shard(
        &mut self,
        spec: &JobSpec,
        classes: &[ClassRef],
        cancel: &Arc<AtomicBool>,
        sink: &mut dyn mgd3_worker::shard::ClassSink<Error = mgd3_worker::shard::ShardError>,
    ) -> Result<(), mgd3_worker::shard::ShardError> {
        for class in classes.iter().take(self.commit) {
            let result =
                self.distill(spec, class, cancel).map_err(|f| mgd3_worker::shard::ShardError::class(&class.wnid, f))?;
            sink.commit(class, result)?;
            self.committed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        if let Some(hang_up) = &self.hang_up {
            while !cancel.load(std::sync::atomic::Ordering::Relaxed)
                && !hang_up.load(std::sync::atomic::Ordering::Relaxed)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Err(mgd3_worker::shard::ShardError::shard(ShardFailure::Cancelled))
    }
}

/// Finishes its class only when `release` is set, whatever the cancel flag says (as a class in
/// the middle of its last DiT call does).
struct Held {
    release: Arc<AtomicBool>,
    started: Arc<AtomicBool>,
    inner: FakeEngine,
}

impl ShardEngine for Held {
    fn distill(
        &mut self,
        spec: &JobSpec,
        class: &ClassRef,
        _cancel: &Arc<AtomicBool>,
    ) -> Result<ClassResult, ShardFailure> {
        self.started.store(true, std::sync::atomic::Ordering::Relaxed);
        while !self.release.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.inner.distill(spec, class, &Arc::new(AtomicBool::new(false)))
    }
}

/// A served coordinator with a heartbeat of `heartbeat_ms` and a job of one shard of `classes`
/// classes, whose worker has started its first class and holds it ([`Held`]) until the returned
/// flag is set. Returns the store's folder, the cluster, the job, the flag, and the worker's stop
/// and handle.
async fn held_class_running(
    heartbeat_ms: u64,
    classes: usize,
) -> (
    tempfile::TempDir,
    Cluster,
    Arc<ResolvedJob>,
    Arc<AtomicBool>,
    (oneshot::Sender<()>, JoinHandle<Result<(), ClientError>>),
) {
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let cluster = start_beating(&store_url, None, None, 0, heartbeat_ms).await;
    let spec = spec_toml(classes, 2, classes, &store_url);
    let (job, _) = cluster.coordinator.submit(&spec, dir.path(), None).await.unwrap();
    let (release, started) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let engine =
        Held { release: release.clone(), started: started.clone(), inner: FakeEngine::new(Duration::from_millis(1)) };
    let running = worker(&cluster.url, "w0", None, Box::new(engine));
    while !started.load(std::sync::atomic::Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (dir, cluster, job, release, running)
}

/// A class that finishes after its job was cancelled (and the worker told) is not committed:
/// the job shows what it has, and a later count finds no more (a marker written after the
/// cancel made a fresh coordinator count 2 of 3 where the cancelled run said 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_class_finishing_after_its_job_was_cancelled_is_not_committed() {
    let (dir, cluster, job, release, (stop, handle)) = held_class_running(100, 1).await;
    cluster.coordinator.cancel(&job.job_id).unwrap();
    // Polls every 100 ms: the revocation reaches the worker within a few.
    tokio::time::sleep(Duration::from_millis(600)).await;
    release.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let marker = dir.path().join("jobs").join(&job.job_id).join("shards/class00.json");
    assert!(!marker.exists(), "committed after the cancel");
    assert_eq!(cluster.coordinator.status(&job.job_id).unwrap().classes_done, 0);
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    cluster.shutdown().await;
}

/// A worker stopped (SIGTERM) after commits no heartbeat has reported yet gives its lease back
/// saying how many of the shard's classes are committed, and the job's progress counts them
/// while the shard waits for another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_released_shard_keeps_its_commits_counted_though_no_heartbeat_reported_them() {
    let (_dir, cluster, job, (stop, handle), _hang_up) = two_unheard_commits().await;
    assert_eq!(cluster.coordinator.status(&job.job_id).unwrap().classes_done, 0, "no heartbeat since the commits");
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), handle).await.expect("worker stops promptly").unwrap().unwrap();
    let status = cluster.coordinator.status(&job.job_id).unwrap();
    assert_eq!((status.shards.pending, status.classes_done, status.images_done), (1, 2, 4));
    cluster.shutdown().await;
}

/// The same spec over a copy of its dataset at another location (a per-allocation scratch
/// folder) is a new job, and submit says so, naming the first job, how far it got and how to go on
/// with it; a copy whose data differs gets no such note.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_spec_over_a_moved_dataset_says_it_is_a_new_job_and_how_to_keep_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let cluster = start(&store_url, None).await;
    let spec = spec_toml(3, 2, 1, &store_url);
    let (first, _) = cluster.coordinator.submit(&spec, dir.path(), None).await.unwrap();
    let copy_to = |copy: &Path| {
        for class in 0..3 {
            let name = format!("class{class:02}");
            std::fs::create_dir_all(copy.join(&name)).unwrap();
            for entry in std::fs::read_dir(Path::new(fake_dataset()).join(&name)).unwrap() {
                let entry = entry.unwrap();
                std::fs::copy(entry.path(), copy.join(&name).join(entry.file_name())).unwrap();
            }
        }
    };
    let copy = dir.path().join("scratch-copy");
    copy_to(&copy);
    let moved = spec.replace(fake_dataset(), &copy.display().to_string());
    let (second, existed, notes) = cluster.coordinator.submit_noted(&moved, dir.path(), None).await.unwrap();
    assert!(!existed && second.job_id != first.job_id);
    let note = notes
        .iter()
        .find(|n| n.contains("dataset location is part of its identity"))
        .unwrap_or_else(|| panic!("{notes:?}"));
    for said in [first.job_id.as_str(), fake_dataset(), second.job_id.as_str(), "0 of 3 classes committed"] {
        assert!(note.contains(said), "`{said}` missing: {note}");
    }
    // The same folder written as a file:// URL is the same folder: the same job.
    let url = spec.replace(fake_dataset(), &format!("file://{}", fake_dataset()));
    let (same, existed, _) = cluster.coordinator.submit_noted(&url, dir.path(), None).await.unwrap();
    assert!(existed && same.job_id == first.job_id, "{} is not {}", same.job_id, first.job_id);
    // Other data at a third location (a file of another size) is no copy: no note.
    let other = dir.path().join("other-data");
    copy_to(&other);
    std::fs::write(other.join("class01/0.png"), [9u8, 9, 9]).unwrap();
    let spec = spec.replace(fake_dataset(), &other.display().to_string());
    let (_, _, notes) = cluster.coordinator.submit_noted(&spec, dir.path(), None).await.unwrap();
    assert!(!notes.iter().any(|n| n.contains("dataset location")), "{notes:?}");
    cluster.shutdown().await;
}

/// Classes a worker committed before it heard of a cancel are counted: a release after the
/// cancel says how many (it was refused as stale, and `status` said 0 of the 2 committed until
/// a restart counted the markers).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commits_made_before_the_worker_heard_of_a_cancel_are_counted() {
    let (_dir, cluster, job, (stop, handle), _hang_up) = two_unheard_commits().await;
    cluster.coordinator.cancel(&job.job_id).unwrap();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), handle).await.expect("worker stops promptly").unwrap().unwrap();
    let status = cluster.coordinator.status(&job.job_id).unwrap();
    assert_eq!((status.state, status.classes_done), (JobState::Cancelled, 2));
    // The class the cancel stopped before its commit is no damage: verify checks the two
    // committed ones and names no problem.
    let verified = cluster.coordinator.verify(&job.job_id).await.unwrap();
    assert_eq!((verified.state, verified.classes_committed), (Some(JobState::Cancelled), 2));
    assert!(verified.problems.is_empty(), "{:?}", verified.problems);
    cluster.shutdown().await;
}

/// Commits a worker never reported (it is gone without a word after the cancel) are counted
/// from their markers when the cancel takes its lease back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commits_of_a_worker_gone_silent_at_a_cancel_are_counted_from_the_markers() {
    let (_dir, cluster, job, (_stop, handle), _hang_up) = two_unheard_commits().await;
    handle.abort(); // no release, no heartbeat, nothing more from it
    assert_eq!(cluster.coordinator.status(&job.job_id).unwrap().classes_done, 0, "no heartbeat since the commits");
    cluster.coordinator.cancel(&job.job_id).unwrap();
    let mut status = cluster.coordinator.status(&job.job_id).unwrap();
    for _ in 0..100 {
        if status.classes_done == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = cluster.coordinator.status(&job.job_id).unwrap();
    }
    assert_eq!((status.state, status.classes_done), (JobState::Cancelled, 2));
    cluster.shutdown().await;
}

/// A shard whose last class was committed after a cancel, before its worker heard of it, is
/// reported complete; the completion is refused (the lease was taken back) but its classes are
/// counted, from their markers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_completed_after_a_cancel_has_its_classes_counted() {
    // One heartbeat a minute: the worker hears of nothing while its shard runs.
    let (_dir, cluster, job, release, (stop, handle)) = held_class_running(60_000, 3).await;
    cluster.coordinator.cancel(&job.job_id).unwrap();
    release.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut status = cluster.coordinator.status(&job.job_id).unwrap();
    for _ in 0..200 {
        if status.classes_done == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = cluster.coordinator.status(&job.job_id).unwrap();
    }
    assert_eq!((status.state, status.classes_done), (JobState::Cancelled, 3));
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    cluster.shutdown().await;
}

/// A served coordinator with one heartbeat a minute (a lease's first poll is its only one for
/// a while) and a job of one 3-class shard, whose worker has committed 2 classes and runs on
/// ([`CommitsFirst`]): commits no heartbeat has reported. Returns the store's folder, the
/// cluster, the job, the worker's stop and handle, and the guard that ends its shard thread.
async fn two_unheard_commits() -> (
    tempfile::TempDir,
    Cluster,
    Arc<ResolvedJob>,
    (oneshot::Sender<()>, JoinHandle<Result<(), ClientError>>),
    HangUpOnDrop,
) {
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let cluster = start_beating(&store_url, None, None, 0, 60_000).await;
    let (job, _) = cluster.coordinator.submit(&spec_toml(3, 2, 3, &store_url), dir.path(), None).await.unwrap();
    let hang_up = Arc::new(AtomicBool::new(false));
    let guard = HangUpOnDrop(hang_up.clone());
    let engine = CommitsFirst::new(2, Some(hang_up));
    let committed = engine.committed.clone();
    let running = worker(&cluster.url, "w", None, Box::new(engine));
    CommitsFirst::wait_for(&committed, 2).await;
    (dir, cluster, job, running, guard)
}

/// Sets its flag when dropped, also while a failed assertion unwinds: a [`CommitsFirst`]
/// left hanging would keep the test's runtime from ever shutting down.
struct HangUpOnDrop(Arc<AtomicBool>);

impl Drop for HangUpOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A worker that dies (or hangs) after commits no heartbeat reported says nothing more: once its
/// lease expires the coordinator counts the shard's markers itself, so the job's progress has
/// them while the shard waits for another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_lease_has_its_shards_markers_counted() {
    // The lease expires after 5 s (`spec_toml`) without renewals.
    let (_dir, cluster, job, (_stop, handle), _hang_up) = two_unheard_commits().await;
    // The worker dies: no renewal, no release; its shard thread hangs on.
    handle.abort();
    assert_eq!(cluster.coordinator.status(&job.job_id).unwrap().classes_done, 0, "no heartbeat since the commits");
    let mut status = cluster.coordinator.status(&job.job_id).unwrap();
    for _ in 0..200 {
        if status.shards.pending == 1 && status.classes_done == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = cluster.coordinator.status(&job.job_id).unwrap();
    }
    assert_eq!((status.shards.pending, status.classes_done, status.images_done), (1, 2, 4), "{status:?}");
    cluster.shutdown().await;
}

/// Stopped after its last class committed, a shard is done and reported so (not released for
/// another worker to find every class committed); stopped with a class left, it is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_stopped_after_its_last_class_committed_is_done() {
    let (dir, _cluster, job) = cluster_with_job(3, 2, 3).await;
    let out = store::open(&dir.path().display().to_string()).unwrap();
    // Two of three committed, then stopped: cancelled. Then the third (the first two are only
    // re-published) and stopped: done.
    for (commit, done) in [(2, false), (1, true)] {
        let lease = ShardLease {
            lease_id: format!("l{commit}"),
            attempt_id: format!("s0-a1-l{commit}"),
            attempt: 1,
            job_id: job.job_id.clone(),
            fingerprint: job.fingerprint.clone(),
            spec: Arc::new(job.spec.clone()),
            classes: job.classes.clone(),
            worker_id: "w".into(),
        };
        let (runtime, out) = (tokio::runtime::Handle::current(), out.clone());
        let result = tokio::task::spawn_blocking(move || {
            let mut engine = CommitsFirst::new(commit, None);
            run_shard(&mut engine, &runtime, &out, &lease, &ShardProgress::default(), &Arc::new(AtomicBool::new(false)))
        })
        .await
        .unwrap();
        match (result, done) {
            (Ok(report), true) => assert_eq!(report.images as usize, 3 * job.spec.ipc),
            (Err(error), false) => assert!(error.is_cancelled(), "{error}"),
            (other, _) => panic!("stopped after committing {commit} more: {other:?}"),
        }
    }
}

/// A full disk (ENOSPC), a quota (EDQUOT), a read-only file system (EROFS) or a permission
/// refusal (EACCES) under the output fails the attempt at once — not after 180 s of retries —
/// naming the store, the key and the cause, and asks the coordinator to pause the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusing_output_store_fails_the_attempt_at_once_naming_store_key_and_cause() {
    let (dir, _cluster, job) = cluster_with_job(1, 2, 1).await;
    let url = dir.path().display().to_string();
    for (errno, cause) in [
        (28, "No space left on device"),
        (122, "quota exceeded"),
        (30, "Read-only file system"),
        (13, "Permission denied"),
    ] {
        let real = store::open(&url).unwrap();
        let out = Location { store: Arc::new(Refusing { inner: real.store.clone(), errno }), ..real };
        let lease = ShardLease {
            lease_id: "l".into(),
            attempt_id: "s0-a1-l".into(),
            attempt: 1,
            job_id: job.job_id.clone(),
            fingerprint: job.fingerprint.clone(),
            spec: Arc::new(job.spec.clone()),
            classes: job.classes.clone(),
            worker_id: "w".into(),
        };
        let runtime = tokio::runtime::Handle::current();
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let mut engine = FakeEngine::new(Duration::from_millis(1));
            run_shard(&mut engine, &runtime, &out, &lease, &ShardProgress::default(), &Arc::new(AtomicBool::new(false)))
        })
        .await
        .unwrap();
        let error = result.expect_err("nothing can be written");
        assert!(started.elapsed() < Duration::from_secs(20), "errno {errno}: retried for {:?}", started.elapsed());
        assert_eq!(error.failure.disposition(), mgd3_common::lease::Disposition::Pause, "errno {errno}: {error}");
        let text = mgd3_common::error_chain(&error);
        assert!(
            text.to_lowercase().contains(&cause.to_lowercase()) && text.contains(&url) && text.contains(&job.job_id),
            "errno {errno}: {text}"
        );
    }
}

/// A worker that reports a refusing output pauses the job: one attempt is not spent, the other
/// shards are not leased (they would meet the same disk), the job says `paused` with the cause,
/// and `resume` (after a person freed space) runs it to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_output_pauses_the_job_until_resume() {
    struct Full;
    impl ShardEngine for Full {
        fn distill(&mut self, _: &JobSpec, class: &ClassRef, _: &Arc<AtomicBool>) -> Result<ClassResult, ShardFailure> {
            Err(ShardFailure::Commit(mgd3_common::commit::CommitError::Store {
                url: "/out".into(),
                context: format!("staging `jobs/j/dataset/{}/0.png#1`", class.wnid),
                source: object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(std::io::Error::from_raw_os_error(28)),
                },
            }))
        }
    }
    let (dir, cluster, job) = cluster_with_job(4, 2, 1).await;
    let (stop, handle) = worker(&cluster.url, "full", None, Box::new(Full));
    let status = wait_until_done(&cluster.coordinator, &job.job_id).await;
    assert_eq!(status.state, JobState::Paused, "{status:?}");
    assert_eq!(status.shards.done, 0);
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    let summary = cluster.coordinator.status(&job.job_id).unwrap();
    assert!(summary.shards.failed == 0, "no shard failed for good: {summary:?}");
    // Status says why, what to do, and that nothing was spent.
    let refusal = &summary.failures[0];
    assert!(refusal.error.contains("No space left on device") && refusal.attempts == 0, "{refusal:?}");
    let text = mgd3_coordinator::progress::describe(&summary, "u");
    assert!(text.contains("[paused]") && text.contains(&format!("coordinator resume {}", job.job_id)), "{text}");
    // Space freed: submitting the job again resumes it (as `coordinator run` and the sbatch
    // script do), and a healthy worker finishes it.
    let spec = spec_toml(4, 2, 1, &dir.path().display().to_string());
    let (again, existed) = cluster.coordinator.submit(&spec, dir.path(), None).await.unwrap();
    assert!(existed && again.job_id == job.job_id);
    assert_eq!(cluster.coordinator.status(&job.job_id).unwrap().state, JobState::Running);
    cluster.run_to_success(&job.job_id).await;
    let done = cluster.coordinator.status(&job.job_id).unwrap();
    assert_eq!((done.state, done.shards.done), (JobState::Succeeded, 4));
    cluster.shutdown().await;
}

/// After damage and crash leftovers, `verify` names every deviation from the markers and
/// `resume` brings the published tree back to exactly the markers' files: a file damaged in place
/// (same size) or deleted is redone (same seeds, same bytes), a stray staging copy in a class
/// folder is removed; a restart removes staging copies beside the job's records.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_names_damage_and_resume_restores_exactly_the_markers_files() {
    let (dir, cluster, job) = cluster_with_job(3, 2, 1).await;
    let store_url = dir.path().display().to_string();
    cluster.run_to_success(&job.job_id).await;
    let clean = cluster.coordinator.verify(&job.job_id).await.unwrap();
    assert_eq!((clean.classes_checked, clean.files_checked, clean.problems.len()), (3, 9, 0), "{clean:?}");
    cluster.shutdown().await;
    let out = store::open(&store_url).unwrap();
    let original = dataset_files(&out, &job.job_id).await;
    let root = dir.path().join("jobs").join(&job.job_id);

    // Damage: one PNG rewritten in place with the same size, one deleted, one stray staging copy
    // in a class folder; crash leftovers beside the manifest and a marker.
    let damaged = root.join("dataset/class01/0.png");
    let mut bytes = std::fs::read(&damaged).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&damaged, &bytes).unwrap();
    std::fs::remove_file(root.join("dataset/class02/1.png")).unwrap();
    std::fs::write(root.join("dataset/class00/1.png#0"), b"half a copy").unwrap();
    // Left by processes killed a while ago (a copy in progress is younger than 10 s).
    for leftover in [root.join("manifest.json#1"), root.join("shards/class00.json#2")] {
        std::fs::write(&leftover, b"{").unwrap();
        let past = std::time::SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options().write(true).open(&leftover).unwrap().set_modified(past).unwrap();
    }

    std::fs::create_dir_all(root.join("dataset/newclass")).unwrap();
    std::fs::write(root.join("dataset/newclass/0.png"), b"a class of no class").unwrap();
    // Another job's output put inside this one's dataset, a user's file and a crash's temporary
    // beside the class folders: named; only the temporary is this job's to remove.
    std::fs::create_dir_all(root.join("dataset/jobs/other-0123456789ab/shards")).unwrap();
    std::fs::write(root.join("dataset/jobs/other-0123456789ab/shards/x.json"), b"{}").unwrap();
    std::fs::write(root.join("dataset/notes.txt"), b"mine").unwrap();
    std::fs::write(root.join("dataset/0.png#7"), b"half").unwrap();
    // The same inside a class folder: not images mgd3 writes there, so not the class's to remove.
    std::fs::create_dir_all(root.join("dataset/class00/nested/shards")).unwrap();
    std::fs::write(root.join("dataset/class00/nested/shards/y.json"), b"{}").unwrap();
    std::fs::write(root.join("dataset/class00/readme.txt"), b"mine").unwrap();
    let again = start(&store_url, None).await;
    assert!(!root.join("manifest.json#1").exists() && !root.join("shards/class00.json#2").exists());
    // Offline (`verify --job-dir`, no coordinator): the same damage, from the output alone.
    let offline = mgd3_coordinator::state::verify_offline(&out, &job.job_id).await.unwrap();
    let seen = problem_files(&offline.problems);
    assert_eq!(
        seen,
        [
            (String::new(), "0.png#7".into()),
            (String::new(), "jobs".into()),
            (String::new(), "newclass".into()),
            (String::new(), "notes.txt".into()),
            ("class00".into(), "1.png#0".into()),
            ("class00".into(), "readme.txt".into()),
            ("class00".into(), "y.json".into()),
            ("class01".into(), "0.png".into()),
            ("class02".into(), "1.png".into())
        ],
        "{offline:?}"
    );
    let nested = offline.problems.iter().find(|p| p.file.as_deref().is_some_and(|f| f.ends_with("y.json"))).unwrap();
    assert!(nested.problem.contains("`resume` leaves it in place"), "{nested:?}");
    let foreign = offline.problems.iter().find(|p| p.file.as_deref().is_some_and(|f| f.ends_with("/jobs"))).unwrap();
    assert!(foreign.problem.contains("holding more than a class's images") && foreign.problem.contains("x.json"));
    assert_eq!((offline.classes_checked, offline.classes_committed, offline.running), (3, 3, false));
    std::fs::remove_file(root.join("manifest.json")).unwrap();
    let report = again.coordinator.verify(&job.job_id).await.unwrap();
    let found = problem_files(&report.problems);
    assert_eq!(
        found,
        [
            (String::new(), "0.png#7".into()),
            (String::new(), "jobs".into()),
            (String::new(), "manifest.json".into()),
            (String::new(), "newclass".into()),
            (String::new(), "notes.txt".into()),
            ("class00".into(), "1.png#0".into()),
            ("class00".into(), "readme.txt".into()),
            ("class00".into(), "y.json".into()),
            ("class01".into(), "0.png".into()),
            ("class02".into(), "1.png".into())
        ],
        "{report:?}"
    );
    let resumed = again.coordinator.resume(&job.job_id, None).await.unwrap();
    assert_eq!(resumed.redone, ["class01", "class02"]);
    assert!(!root.join("dataset/class00/1.png#0").exists());
    assert!(!root.join("dataset/newclass").exists(), "a folder of no class is removed");
    assert!(!root.join("dataset/0.png#7").exists(), "a temporary is removed");
    assert!(root.join("dataset/jobs/other-0123456789ab/shards/x.json").exists(), "another job's records stay");
    assert!(root.join("dataset/notes.txt").exists(), "a user's file stays");
    assert!(
        root.join("dataset/class00/nested/shards/y.json").exists() && root.join("dataset/class00/readme.txt").exists()
    );
    // Moved out by hand, as verify says.
    std::fs::remove_dir_all(root.join("dataset/jobs")).unwrap();
    std::fs::remove_file(root.join("dataset/notes.txt")).unwrap();
    std::fs::remove_dir_all(root.join("dataset/class00/nested")).unwrap();
    std::fs::remove_file(root.join("dataset/class00/readme.txt")).unwrap();
    again.run_to_success(&job.job_id).await;
    let report = again.coordinator.verify(&job.job_id).await.unwrap();
    assert!(report.problems.is_empty(), "{report:?}");
    assert_eq!(dataset_files(&out, &job.job_id).await, original, "the repaired tree equals the original");
    again.shutdown().await;
}

/// A contact sheet that is not what the attempt that committed its class wrote — another class's
/// of the same size, another class's with its record, one left without its record — is named by
/// `verify` (online and offline) and removed by `resume`, which leaves the class's images as they
/// are. (The report was shown such a sheet as the class's, and `verify` did not check sheets.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_contact_sheet_that_is_not_its_class_s_is_named_by_verify_and_removed_by_resume() {
    let (dir, cluster, job) = cluster_with_job(4, 2, 1).await;
    let store_url = dir.path().display().to_string();
    cluster.run_to_success(&job.job_id).await;
    let out = store::open(&store_url).unwrap();
    let keys = JobKeys::new(&job.job_id);
    let wnids = ["class00", "class01", "class02", "class03"];
    // Each class's sheet and record, as the worker that committed it writes them (the stand-in
    // engine makes no pictures).
    for wnid in wnids {
        let marker = marker(&out, &job.job_id, wnid).await;
        assert!(marker.sheet_record, "a marker of this version promises the sheet's record");
        let sheet = format!("sheet of {wnid}").into_bytes();
        let record = serde_json::to_vec(&mgd3_common::commit::sheet_record(&marker, &sheet)).unwrap();
        out.store.put(&out.key(&keys.contact_sheet(wnid)), sheet.into()).await.unwrap();
        out.store.put(&out.key(&keys.contact_sheet_record(wnid)), record.into()).await.unwrap();
    }
    let clean = cluster.coordinator.verify(&job.job_id).await.unwrap();
    assert_eq!((clean.files_checked, clean.problems.len()), (16, 0), "{clean:?}");
    let original = dataset_files(&out, &job.job_id).await;
    let sheets = dir.path().join("jobs").join(&job.job_id).join("contact_sheets");
    let read = |name: &str| std::fs::read(sheets.join(name)).unwrap();
    let (sheet01, record01) = (read("class01.png"), read("class01.json"));
    // class00: another class's sheet of the same size; class01 and class02: sheet and record
    // swapped; class03: its record lost.
    std::fs::copy(sheets.join("class01.png"), sheets.join("class00.png")).unwrap();
    std::fs::copy(sheets.join("class02.png"), sheets.join("class01.png")).unwrap();
    std::fs::copy(sheets.join("class02.json"), sheets.join("class01.json")).unwrap();
    std::fs::write(sheets.join("class02.png"), &sheet01).unwrap();
    std::fs::write(sheets.join("class02.json"), &record01).unwrap();
    std::fs::remove_file(sheets.join("class03.json")).unwrap();
    let expected = [
        ("class00", "class00.png", "changed since they were written"),
        ("class01", "class01.png", "contact sheet of class `class02`"),
        ("class02", "class02.png", "contact sheet of class `class01`"),
    ];
    let online = cluster.coordinator.verify(&job.job_id).await.unwrap();
    let offline = mgd3_coordinator::state::verify_offline(&out, &job.job_id).await.unwrap();
    for report in [&online, &offline] {
        let mut problems = report.problems.clone();
        problems.sort_by(|a, b| a.wnid.cmp(&b.wnid));
        assert_eq!(problems.len(), 3, "{report:?}");
        // A sheet without its record (a worker stopped between the two writes) is a note.
        assert_eq!(report.sheets_missing, ["class03"], "{report:?}");
        for (p, (wnid, file, problem)) in problems.iter().zip(expected) {
            assert_eq!(p.wnid, wnid);
            assert!(p.file.as_deref().unwrap().ends_with(&format!("contact_sheets/{file}")), "{p:?}");
            assert!(p.problem.contains(problem), "{p:?}");
        }
    }
    // Resume puts the swapped pair back and removes the others; no class is distilled again.
    let resumed = cluster.coordinator.resume(&job.job_id, None).await.unwrap();
    assert!(resumed.redone.is_empty(), "no class is distilled again for its sheet: {resumed:?}");
    assert_eq!(resumed.sheets.restored, ["class01", "class02"]);
    let removed: Vec<&str> = resumed.sheets.removed.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(removed, ["class00", "class03"]);
    assert_eq!(read("class01.png"), sheet01, "class01's own sheet is back in its place");
    let mut left: Vec<_> =
        std::fs::read_dir(&sheets).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["class01.json", "class01.png", "class02.json", "class02.png"]);
    let report = cluster.coordinator.verify(&job.job_id).await.unwrap();
    assert_eq!((report.files_checked, report.problems.len()), (14, 0), "{report:?}");
    assert_eq!(dataset_files(&out, &job.job_id).await, original);
    // A folder where a sheet goes is no sheet, and cannot be removed as one: resume names it and
    // changes nothing (it retried the delete as an outage, for minutes).
    std::fs::create_dir_all(sheets.join("class00.png/theirs")).unwrap();
    std::fs::write(sheets.join("class00.json"), read("class01.json")).unwrap();
    let error = cluster.coordinator.resume(&job.job_id, None).await.unwrap_err().to_string();
    assert!(error.contains("contact_sheets/class00.png` is a folder where the job keeps a file"), "{error}");
    assert!(sheets.join("class00.png/theirs").is_dir() && sheets.join("class00.json").exists());
    cluster.shutdown().await;
}

/// A store moved (`mv`) with the job's outputs in it: the job's records name the old output
/// folder, which is gone. The job is quarantined, saying so, instead of being distilled again
/// into a new, empty folder at the old path (it was: every class, hours at ImageNet scale).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_store_quarantines_its_job_instead_of_distilling_it_again_at_the_old_path() {
    let (dir, cluster, job) = cluster_with_job(2, 2, 1).await;
    cluster.run_to_success(&job.job_id).await;
    cluster.shutdown().await;
    let moved = tempfile::tempdir().unwrap();
    let new_home = moved.path().join("store");
    std::fs::rename(dir.path(), &new_home).unwrap();
    let again = start(&new_home.display().to_string(), None).await;
    let status = again.coordinator.status(&job.job_id).unwrap();
    assert_eq!(status.state, JobState::Quarantined, "{status:?}");
    let reason = &status.failures[0].error;
    assert!(reason.contains("is gone, and this store") && reason.contains("move it back"), "{reason}");
    assert!(!dir.path().exists(), "the old output folder was made anew");
    again.shutdown().await;
    std::fs::rename(&new_home, dir.path()).unwrap();
}

/// A file where the job keeps a folder, or a folder where it keeps a file: `verify` names it,
/// `resume` refuses before changing anything (it withdrew commit markers, then failed half way,
/// as an outage), and a link loop in one job's markers quarantines that job at start instead of
/// stopping the coordinator (each was retried as an outage for minutes first).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_and_folders_in_each_others_place_are_named_and_change_nothing() {
    let (dir, cluster, job) = cluster_with_job(3, 2, 1).await;
    let store_url = dir.path().display().to_string();
    cluster.run_to_success(&job.job_id).await;
    let root = dir.path().join("jobs").join(&job.job_id);
    let markers_before: Vec<_> = std::fs::read_dir(root.join("shards")).unwrap().map(|e| e.unwrap().path()).collect();
    // `modes` a file, class01's folder a file, an image of class02 a folder holding a user's file.
    std::fs::rename(root.join("modes"), dir.path().join("modes.kept")).unwrap();
    std::fs::write(root.join("modes"), b"x").unwrap();
    std::fs::rename(root.join("dataset/class01"), dir.path().join("class01.kept")).unwrap();
    std::fs::write(root.join("dataset/class01"), b"x").unwrap();
    let image = root.join("dataset/class02/1.png");
    let kept_image = std::fs::read(&image).unwrap();
    std::fs::remove_file(&image).unwrap();
    std::fs::create_dir_all(&image).unwrap();
    std::fs::write(image.join("mine.txt"), b"mine").unwrap();
    let report = cluster.coordinator.verify(&job.job_id).await.unwrap();
    for named in ["/modes", "/dataset/class01", "/dataset/class02/1.png"] {
        assert!(
            report.problems.iter().any(|p| p.file.as_deref().is_some_and(|f| f.ends_with(named))
                && p.problem.contains("`resume` leaves it in place")),
            "{named}: {report:?}"
        );
    }
    let error = cluster.coordinator.resume(&job.job_id, None).await.unwrap_err().to_string();
    assert!(error.contains("nothing was changed") && error.contains("dataset/class01`"), "{error}");
    let markers_after: Vec<_> = std::fs::read_dir(root.join("shards")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(markers_after.len(), markers_before.len(), "no commit was withdrawn");
    assert_eq!(std::fs::read(image.join("mine.txt")).unwrap(), b"mine");
    // Put back: resume and verify are clean again.
    std::fs::remove_file(root.join("modes")).unwrap();
    std::fs::rename(dir.path().join("modes.kept"), root.join("modes")).unwrap();
    std::fs::remove_file(root.join("dataset/class01")).unwrap();
    std::fs::rename(dir.path().join("class01.kept"), root.join("dataset/class01")).unwrap();
    std::fs::remove_dir_all(&image).unwrap();
    std::fs::write(&image, kept_image).unwrap();
    cluster.coordinator.resume(&job.job_id, None).await.unwrap();
    assert!(cluster.coordinator.verify(&job.job_id).await.unwrap().problems.is_empty());
    cluster.shutdown().await;
    // A link loop among the markers: that job is quarantined, the coordinator starts.
    std::os::unix::fs::symlink(".", root.join("shards/loop")).unwrap();
    let again = start(&store_url, None).await;
    let status = again.coordinator.status(&job.job_id).unwrap();
    assert_eq!(status.state, JobState::Quarantined, "{status:?}");
    again.shutdown().await;
}

/// Damage to one job's records quarantines that job, with a clear status; the coordinator
/// starts and the healthy jobs run. Repaired records bring the job back with `resume`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn damaged_records_quarantine_their_job_and_the_others_run() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let cluster = start(&store_url, None).await;
    let mut ids = Vec::new();
    for seed in 1..=4 {
        let spec = spec_toml(2, 2, 1, &store_url).replace("seed = 5", &format!("seed = {seed}"));
        ids.push(cluster.coordinator.submit(&spec, dir.path(), None).await.unwrap().0.job_id.clone());
    }
    let (stop, handle) = worker(&cluster.url, "w0", None, Box::new(FakeEngine::new(Duration::from_millis(5))));
    for id in &ids {
        assert_eq!(wait_until_done(&cluster.coordinator, id).await.state, JobState::Succeeded);
    }
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    cluster.shutdown().await;
    let root = |id: &str| dir.path().join("jobs").join(id);
    let truncate = |path: std::path::PathBuf| {
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    };
    truncate(root(&ids[1]).join("job.json"));
    std::fs::remove_file(root(&ids[2]).join("job.json")).unwrap();
    let marker = root(&ids[3]).join("shards/class01.json");
    let good_marker = std::fs::read(&marker).unwrap();
    truncate(marker.clone());

    let again = start(&store_url, None).await;
    let listed: std::collections::BTreeMap<String, JobStatus> =
        again.coordinator.list().into_iter().map(|s| (s.job_id.clone(), s)).collect();
    assert_eq!(listed.len(), 4, "no job vanishes from the list: {listed:?}");
    assert_eq!(listed[&ids[0]].state, JobState::Succeeded);
    for (id, what, advice) in [
        (&ids[1], "is corrupt", "submit the same job spec again"),
        (&ids[2], "is missing", "submit the same job spec again"),
        (&ids[3], "class01", "coordinator resume"),
    ] {
        let status = again.coordinator.status(id).unwrap();
        assert_eq!(status.state, JobState::Quarantined, "{id}");
        let error = &status.failures[0].error;
        assert!(
            error.contains(what) && error.contains(advice) && error.contains("coordinator forget"),
            "{id}: {error}"
        );
    }
    // Healthy jobs still run: a new one is accepted and distilled.
    let fresh = spec_toml(2, 2, 1, &store_url).replace("seed = 5", "seed = 99");
    let (job, _) = again.coordinator.submit(&fresh, dir.path(), None).await.unwrap();
    let (stop, handle) = worker(&again.url, "w1", None, Box::new(FakeEngine::new(Duration::from_millis(5))));
    assert_eq!(wait_until_done(&again.coordinator, &job.job_id).await.state, JobState::Succeeded);
    // Still damaged: resume says so. Repaired: resume brings the job back.
    let error = again.coordinator.resume(&ids[3], None).await.unwrap_err().to_string();
    assert!(error.contains("quarantined"), "{error}");
    std::fs::write(&marker, good_marker).unwrap();
    again.coordinator.resume(&ids[3], None).await.unwrap();
    assert_eq!(wait_until_done(&again.coordinator, &ids[3]).await.state, JobState::Succeeded);
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    again.shutdown().await;
}

/// Repair, not deletion. A job whose job.json is lost (deleted, truncated) is rebuilt by
/// submitting the same spec: checked against its markers and manifest, every committed class
/// kept, nothing distilled again; a different spec under its id is refused naming the
/// difference. `forget` drops a job's records but not its outputs (refused while it runs), and a
/// job folder removed by hand is forgotten without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_records_are_rebuilt_by_the_same_spec_and_forget_keeps_the_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let spec = spec_toml(3, 2, 1, &store_url);
    let cluster = start(&store_url, None).await;
    let (job, _) = cluster.coordinator.submit(&spec, dir.path(), None).await.unwrap();
    let id = job.job_id.clone();
    cluster.run_to_success(&id).await;
    cluster.shutdown().await;
    let out = store::open(&store_url).unwrap();
    let original = dataset_files(&out, &id).await;
    let root = dir.path().join("jobs").join(&id);
    let job_json = root.join("job.json");
    // The manifest certifies the work and says when it was done: nothing below redoes any, so
    // it keeps its bytes (its times) throughout.
    let manifest = std::fs::read(root.join("manifest.json")).unwrap();
    let finished = serde_json::from_slice::<serde_json::Value>(&manifest).unwrap()["finished_unix_ms"].clone();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    // Resumed once finished: nothing changes, its finish time included.
    let again = start(&store_url, None).await;
    let before = again.coordinator.status(&id).unwrap().finished_unix_ms;
    let resumed = again.coordinator.resume(&id, None).await.unwrap();
    assert_eq!((resumed.committed, resumed.requeued), (3, 0));
    assert_eq!(wait_until_done(&again.coordinator, &id).await.finished_unix_ms, before);
    again.shutdown().await;
    assert_eq!(std::fs::read(root.join("manifest.json")).unwrap(), manifest, "resumed: finished {finished}");

    for damage in ["deleted", "truncated"] {
        if damage == "deleted" {
            std::fs::remove_file(&job_json).unwrap();
        } else {
            let bytes = std::fs::read(&job_json).unwrap();
            std::fs::write(&job_json, &bytes[..bytes.len() / 3]).unwrap();
        }
        let again = start(&store_url, None).await;
        assert_eq!(again.coordinator.status(&id).unwrap().state, JobState::Quarantined, "{damage}");
        // Another spec under the job's id: refused, naming the setting that differs.
        let other = spec.replace("seed = 5", "seed = 6");
        let error = again.coordinator.submit(&other, dir.path(), Some(id.clone())).await.unwrap_err().to_string();
        for part in ["lost its job.json", "3 committed class(es)", "`seed`: 5 when committed, 6 now"] {
            assert!(error.contains(part), "{damage}: {error} lacks {part}");
        }
        assert_eq!(again.coordinator.status(&id).unwrap().state, JobState::Quarantined, "{damage}: still");
        // The same spec: rebuilt at once, succeeded, nothing redone.
        let (rebuilt, existed, notes) = again.coordinator.submit_noted(&spec, dir.path(), None).await.unwrap();
        assert!(existed && rebuilt.fingerprint == job.fingerprint, "{damage}");
        assert!(notes.iter().any(|n| n.contains("rebuilt") && n.contains("3 of 3 classes")), "{damage}: {notes:?}");
        assert_eq!(wait_until_done(&again.coordinator, &id).await.state, JobState::Succeeded, "{damage}");
        assert_eq!(dataset_files(&out, &id).await, original, "{damage}: the committed classes are kept");
        let written: ResolvedJob = serde_json::from_slice(&std::fs::read(&job_json).unwrap()).unwrap();
        assert_eq!(written.fingerprint, job.fingerprint);
        again.shutdown().await;
        assert_eq!(std::fs::read(root.join("manifest.json")).unwrap(), manifest, "{damage}");
    }

    // Nothing committed yet, job.json lost: its state.json still knows the spec it was for.
    let again = start(&store_url, None).await;
    let (fresh, _) = again.coordinator.submit(&spec.replace("seed = 5", "seed = 8"), dir.path(), None).await.unwrap();
    let fresh_root = dir.path().join("jobs").join(&fresh.job_id);
    again.shutdown().await;
    assert!(fresh_root.join("state.json").exists());
    std::fs::remove_file(fresh_root.join("job.json")).unwrap();
    let again = start(&store_url, None).await;
    let other = spec.replace("seed = 5", "seed = 9");
    let error = again.coordinator.submit(&other, dir.path(), Some(fresh.job_id.clone())).await.unwrap_err().to_string();
    assert!(error.contains("state.json was written for fingerprint"), "{error}");
    again.coordinator.submit(&spec.replace("seed = 5", "seed = 8"), dir.path(), None).await.unwrap();
    again.coordinator.cancel(&fresh.job_id).unwrap();
    assert!(!again.coordinator.forget(&fresh.job_id).await.unwrap());
    again.shutdown().await;

    // forget: refused while a job runs; a finished one loses its records, not its outputs.
    let again = start(&store_url, None).await;
    let (running, _) = again.coordinator.submit(&spec.replace("seed = 5", "seed = 7"), dir.path(), None).await.unwrap();
    let error = again.coordinator.forget(&running.job_id).await.unwrap_err().to_string();
    assert!(error.contains("is running") && error.contains("coordinator cancel"), "{error}");
    again.coordinator.cancel(&running.job_id).unwrap();
    assert!(!again.coordinator.forget(&running.job_id).await.unwrap(), "nothing of it was committed");
    assert!(!dir.path().join("jobs").join(&running.job_id).exists(), "an empty folder goes");
    assert!(again.coordinator.forget(&id).await.unwrap(), "its outputs stay");
    assert!(!job_json.exists() && !root.join("state.json").exists());
    assert!(again.coordinator.list().is_empty(), "{:?}", again.coordinator.list());
    assert!(matches!(again.coordinator.forget(&id).await, Err(mgd3_coordinator::Error::UnknownJob(_))));
    // Asked about over the wire, a forgotten job is said to be forgotten, and how to get it back.
    let mut client = mgd3_common::rpc::connect(&again.url, None, None).unwrap();
    let status = client.get_job_status(proto::GetJobStatusRequest { job_id: id.clone() }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(
        status.message().contains("was forgotten") && status.message().contains("submitting its spec"),
        "{status:?}"
    );
    again.shutdown().await;
    // A restart does not take the forgotten folder for a damaged job; another spec under its id
    // is refused naming the difference; the spec brings it back, saying what is kept.
    let again = start(&store_url, None).await;
    assert!(again.coordinator.list().is_empty(), "{:?}", again.coordinator.list());
    let other = spec.replace("seed = 5", "seed = 6");
    let error = again.coordinator.submit(&other, dir.path(), Some(id.clone())).await.unwrap_err().to_string();
    for part in ["'s folder holds committed work", "`seed`: 5 when committed, 6 now"] {
        assert!(error.contains(part), "{error} lacks {part}");
    }
    let (back, _, notes) = again.coordinator.submit_noted(&spec, dir.path(), None).await.unwrap();
    assert_eq!(back.job_id, id);
    assert!(notes.iter().any(|n| n.contains("3 of 3 classes") && n.contains("kept")), "{notes:?}");
    assert_eq!(wait_until_done(&again.coordinator, &id).await.state, JobState::Succeeded);
    assert!(!root.join("forgotten.json").exists());
    assert_eq!(dataset_files(&out, &id).await, original);
    assert_eq!(std::fs::read(root.join("manifest.json")).unwrap(), manifest, "forgotten and submitted again");

    // The folder removed by hand while the coordinator runs: verify (and resume) say it is gone
    // instead of acting on it; the same spec is a new job.
    std::fs::remove_dir_all(&root).unwrap();
    let error = again.coordinator.verify(&id).await.unwrap_err();
    assert!(matches!(error, mgd3_coordinator::Error::Vanished { .. }), "{error}");
    assert!(again.coordinator.list().is_empty(), "forgotten: {:?}", again.coordinator.list());
    let (_, existed) = again.coordinator.submit(&spec, dir.path(), None).await.unwrap();
    assert!(!existed, "a removed folder is forgotten, not returned as the finished job");
    assert_eq!(again.coordinator.status(&id).unwrap().state, JobState::Running);
    again.run_to_success(&id).await;
    assert_eq!(dataset_files(&out, &id).await, original, "distilled again, to the same bytes");
    again.shutdown().await;
}

/// Submitting a finished job's spec again (what `coordinator run` does) checks its published
/// files against its manifest: an image deleted, another cut short, a class's modes deleted are
/// each named, and their classes distilled again to the same bytes, instead of the job answered
/// as succeeded with files missing. An intact job is answered at once, untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_job_submitted_again_puts_back_missing_outputs() {
    let (dir, cluster, job) = cluster_with_job(4, 2, 1).await;
    let store_url = dir.path().display().to_string();
    let spec = spec_toml(4, 2, 1, &store_url);
    cluster.run_to_success(&job.job_id).await;
    let out = store::open(&store_url).unwrap();
    let original = dataset_files(&out, &job.job_id).await;
    let root = dir.path().join("jobs").join(&job.job_id);
    let manifest = std::fs::read(root.join("manifest.json")).unwrap();
    let (_, existed, notes) = cluster.coordinator.submit_noted(&spec, dir.path(), None).await.unwrap();
    assert!(existed && notes.is_empty(), "{notes:?}");
    assert_eq!(cluster.coordinator.status(&job.job_id).unwrap().state, JobState::Succeeded);
    // Settings that do not decide the images, changed in the spec: the job keeps its own, and
    // says which (data_fingerprint = "content" was taken without a word).
    let other = spec.replace("max_attempts = 2", "max_attempts = 5\ndata_fingerprint = \"content\"");
    let (same, _, notes) = cluster.coordinator.submit_noted(&other, dir.path(), None).await.unwrap();
    assert_eq!(same.job_id, job.job_id);
    let note = notes.iter().find(|n| n.contains("keeps the other settings")).unwrap_or_else(|| panic!("{notes:?}"));
    assert!(
        note.contains("`data_fingerprint`: unset (the default) in the job, \"content\" in this spec")
            && note.contains("`max_attempts`: 2 in the job, 5 in this spec")
            && note.contains("another `name`"),
        "{note}"
    );

    let classes: Vec<String> = job.classes.iter().map(|c| c.wnid.clone()).collect();
    std::fs::remove_file(root.join(format!("dataset/{}/1.png", classes[1]))).unwrap();
    let cut = root.join(format!("dataset/{}/0.png", classes[2]));
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(root.join(format!("modes/{}.npy", classes[3]))).unwrap();
    let modes = root.join(format!("modes/{}.npy", classes[0]));
    let modes_bytes = std::fs::read(&modes).unwrap();
    std::fs::write(&modes, &modes_bytes[..10]).unwrap();
    // An image copied in by hand: the ImageFolder would hold it too.
    std::fs::write(root.join(format!("dataset/{}/extra.png", classes[3])), b"not distilled").unwrap();
    let (_, existed, notes) = cluster.coordinator.submit_noted(&spec, dir.path(), None).await.unwrap();
    let note = notes.iter().find(|n| n.contains("had succeeded")).unwrap_or_else(|| panic!("{notes:?}"));
    for said in [
        "5 of its published files are missing or changed".to_owned(),
        format!("dataset/{}/extra.png: not in the manifest", classes[3]),
        format!("dataset/{}/1.png: missing", classes[1]),
        format!("dataset/{}/0.png: {} bytes, the manifest says {}", classes[2], bytes.len() / 2, bytes.len()),
        format!("modes/{}.npy: missing", classes[3]),
        "4 class(es) distilled again".to_owned(),
    ] {
        assert!(existed && note.contains(&said), "{said}: {note}");
    }
    assert!(note.contains(&format!("modes/{}.npy: 10 bytes, the manifest says {}", classes[0], modes_bytes.len())));
    cluster.run_to_success(&job.job_id).await;
    assert_eq!(dataset_files(&out, &job.job_id).await, original, "the same bytes, every file");
    assert_eq!(std::fs::read(&modes).unwrap(), modes_bytes);
    assert!(root.join(format!("modes/{}.npy", classes[3])).exists());
    // The job's times stay those of its work; the repair is recorded apart.
    let was: JobManifest = serde_json::from_slice(&manifest).unwrap();
    let now: JobManifest = serde_json::from_slice(&std::fs::read(root.join("manifest.json")).unwrap()).unwrap();
    assert_eq!((now.created_unix_ms, now.finished_unix_ms), (was.created_unix_ms, was.finished_unix_ms));
    assert!(was.repaired_unix_ms.is_none() && now.repaired_unix_ms.is_some_and(|r| r >= was.finished_unix_ms));
    cluster.shutdown().await;
}

/// `classes = "all"` over a dataset that gained a class folder is a new job: said, naming the
/// first one, since the new job distils every class again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_job_over_changed_folders_names_the_one_it_does_not_continue() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for class in 0..4 {
        let folder = data.join(format!("c{class}"));
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..3 {
            std::fs::write(folder.join(format!("{i}.png")), [class as u8, i as u8]).unwrap();
        }
    }
    let store_url = dir.path().join("out").display().to_string();
    let cluster = start(&store_url, None).await;
    let spec = spec_toml(1, 2, 1, &store_url)
        .replace(fake_dataset(), &data.display().to_string())
        .replace("classes = [\"class00\"]", "classes = \"all\"");
    let (first, _, notes) = cluster.coordinator.submit_noted(&spec, dir.path(), None).await.unwrap();
    assert!(!notes.iter().any(|n| n.contains("this very spec")), "{notes:?}");
    let folder = data.join("c4");
    std::fs::create_dir_all(&folder).unwrap();
    for i in 0..3 {
        std::fs::write(folder.join(format!("{i}.png")), [4, i]).unwrap();
    }
    let (second, existed, notes) = cluster.coordinator.submit_noted(&spec, dir.path(), None).await.unwrap();
    assert!(!existed && second.job_id != first.job_id);
    let note = notes.iter().find(|n| n.contains("this very spec")).unwrap_or_else(|| panic!("{notes:?}"));
    assert!(
        note.contains(&format!(
            "job `{}` has this very spec over other data (4 classes then, 5 now: 1 added, 0 removed",
            first.job_id
        )) && note.contains(&format!("this is a new job `{}`, which distils all its classes", second.job_id)),
        "{note}"
    );
    cluster.shutdown().await;
}

/// A sweep submitted again with a setting that does not decide the images changed says once
/// that its existing variants keep their own, not once per variant.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_submitted_again_says_once_which_settings_its_variants_keep() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let cluster = start(&store_url, None).await;
    let text = format!("{}[sweep]\nguidance_scale = [0.05, 0.1, 0.2]\n", spec_toml(2, 2, 1, &store_url));
    let sweep = mgd3_common::sweep::Sweep::parse(&text).unwrap().unwrap();
    let first = cluster
        .coordinator
        .submit_sweep(&sweep, dir.path(), mgd3_coordinator::service::DataChanges::Refuse)
        .await
        .unwrap();
    assert!(!first.notes.iter().any(|n| n.contains("keep")), "{:?}", first.notes);
    let again = mgd3_common::sweep::Sweep::parse(&text.replace("lease_timeout_s = 5", "lease_timeout_s = 50"))
        .unwrap()
        .unwrap();
    let second = cluster
        .coordinator
        .submit_sweep(&again, dir.path(), mgd3_coordinator::service::DataChanges::Refuse)
        .await
        .unwrap();
    let kept: Vec<&String> = second.notes.iter().filter(|n| n.contains("keep")).collect();
    assert_eq!(kept.len(), 1, "{:?}", second.notes);
    assert!(
        kept[0].starts_with(
            "3 variant(s) exist (every setting that decides their images is the same) and keep the other settings \
             they were submitted with: \
             `lease_timeout_s`: 5 in the job, 50 in this spec; give the sweep another `name`"
        ),
        "{}",
        kept[0]
    );
    cluster.shutdown().await;
}

/// A job whose lease timeout is shorter than two of the coordinator's heartbeats is refused at
/// submit, naming both and both ways out: its leases would expire between a healthy worker's
/// heartbeats, over and over, until the worker was set aside as a crash loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_timeout_shorter_than_two_heartbeats_is_refused_at_submit() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let coordinator = Coordinator::open(&store_url, 15_000).await.unwrap();
    let spec = spec_toml(2, 2, 1, &store_url).replace("lease_timeout_s = 5", "lease_timeout_s = 10");
    let error = coordinator.submit(&spec, dir.path(), None).await.unwrap_err().to_string();
    assert!(
        error.contains("lease_timeout_s")
            && error.contains("10 s is shorter than two heartbeats of this coordinator (--heartbeat-ms 15000)")
            && error.contains("at least 30 s"),
        "{error}"
    );
    assert!(coordinator.list().is_empty(), "nothing was submitted");
    let fits = spec.replace("lease_timeout_s = 10", "lease_timeout_s = 30");
    coordinator.submit(&fits, dir.path(), None).await.unwrap();
}

/// The dataset is checked at submit, every problem in one message, before any lease: missing
/// class folders, classes with fewer images than IPC and files larger than any image a worker
/// reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dataset_problems_are_reported_at_submit_in_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (class, n) in [("class00", 3), ("class01", 1), ("class02", 3)] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..n {
            std::fs::write(data.join(class).join(format!("{i}.png")), [i as u8]).unwrap();
        }
    }
    // A broken link beside the classes: listed classes numbered by position do not need the
    // root's folders, so it hides none of the other problems.
    std::os::unix::fs::symlink("/nonexistent-mgd3-test", data.join("broken")).unwrap();
    // Sparse: no disk used, but a worker would refuse to read it (every attempt of the class).
    let huge = std::fs::File::create(data.join("class02").join("huge.bmp")).unwrap();
    huge.set_len(mgd3_common::imagecheck::MAX_IMAGE_BYTES + 1).unwrap();
    let store_url = dir.path().join("store").display().to_string();
    let cluster = start(&store_url, None).await;
    let spec = spec_toml(4, 2, 1, &store_url).replace(fake_dataset(), &data.display().to_string());
    let error = cluster.coordinator.submit(&spec, dir.path(), None).await.unwrap_err().to_string();
    assert!(error.contains("`class01`: 1 image(s) but IPC = 2"), "{error}");
    assert!(error.contains("`class03`") && error.contains("does not exist"), "{error}");
    assert!(
        error.contains("class `class02`: 1 file(s) larger than the 268435456 bytes mgd3 reads for one image")
            && error.contains("huge.bmp` (268435457 bytes)"),
        "{error}"
    );
    assert!(!error.contains("`class00`"), "{error}");
    assert!(cluster.coordinator.list().is_empty(), "nothing was submitted");
    // A wrong dataset root is one line, not one per class; many missing classes are counted.
    let nowhere =
        spec_toml(40, 2, 1, &store_url).replace(fake_dataset(), &dir.path().join("nowhere").display().to_string());
    let error = cluster.coordinator.submit(&nowhere, dir.path(), None).await.unwrap_err().to_string();
    assert!(error.contains("nowhere") && error.lines().count() < 4, "{error}");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let wrong_level = spec_toml(40, 2, 1, &store_url).replace(fake_dataset(), &empty.display().to_string());
    let error = cluster.coordinator.submit(&wrong_level, dir.path(), None).await.unwrap_err().to_string();
    assert!(error.contains("none of the 40 classes has a folder") && error.lines().count() < 4, "{error}");
    // Every class missing, but folders of their names in another letter case: said, as the
    // likelier cause than a wrong root.
    let cased = dir.path().join("cased");
    for class in ["Class00", "Class01"] {
        std::fs::create_dir_all(cased.join(class)).unwrap();
        std::fs::write(cased.join(class).join("0.png"), [0]).unwrap();
    }
    let case_only = spec_toml(2, 2, 1, &store_url).replace(fake_dataset(), &cased.display().to_string());
    let error = cluster.coordinator.submit(&case_only, dir.path(), None).await.unwrap_err().to_string();
    assert!(
        error.contains("none of the 2 classes has a folder")
            && error.contains("folder `Class00` differs from it only in letter case")
            && error.contains("and 1 more class(es) with a folder of a close name"),
        "{error}"
    );
    // Many classes short of IPC: counted, one example; a root one level too high (its "classes"
    // are the splits): named as such.
    let short = spec_toml(12, 9, 1, &store_url);
    let error = cluster.coordinator.submit(&short, dir.path(), None).await.unwrap_err().to_string();
    assert!(
        error.contains("12 classes have fewer images than IPC = 9 (the fewest: 8)") && error.lines().count() < 4,
        "{error}"
    );
    let splits = dir.path().join("splits");
    for split in ["train", "val"] {
        for class in ["a", "b"] {
            std::fs::create_dir_all(splits.join(split).join(class)).unwrap();
            for i in 0..3 {
                std::fs::write(splits.join(split).join(class).join(format!("{i}.png")), [i as u8]).unwrap();
            }
        }
    }
    let one_level_up: String = spec_toml(2, 2, 1, &store_url)
        .replace(fake_dataset(), &splits.display().to_string())
        .lines()
        .map(|l| if l.starts_with("classes = ") { "classes = \"all\"".to_owned() } else { l.to_owned() })
        .collect::<Vec<_>>()
        .join("\n");
    let error = cluster.coordinator.submit(&one_level_up, dir.path(), None).await.unwrap_err().to_string();
    assert!(error.contains("are `train`, `val`: those are dataset splits") && error.contains("/train`"), "{error}");
    let too_many = spec_toml(52, 2, 1, &store_url);
    let error = cluster.coordinator.submit(&too_many, dir.path(), None).await.unwrap_err().to_string();
    assert!(error.contains("12 classes have no folder") && error.contains("and 2 more"), "{error}");
    assert!(error.lines().count() < 4, "{error}");
    cluster.shutdown().await;
}

/// Class folders that are one folder through links (`class02 -> class00`) would give one set of
/// images two labels: submit refuses, naming the classes and the folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn classes_that_are_one_folder_through_links_are_refused_at_submit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for class in ["class00", "class01"] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..3 {
            std::fs::write(data.join(class).join(format!("{i}.png")), [i as u8]).unwrap();
        }
    }
    std::os::unix::fs::symlink("class00", data.join("class02")).unwrap();
    std::fs::create_dir_all(data.join("class01/sub")).unwrap();
    std::os::unix::fs::symlink("class01/sub", data.join("class03")).unwrap();
    let store_url = dir.path().join("store").display().to_string();
    let cluster = start(&store_url, None).await;
    std::fs::write(data.join("class01/sub/9.png"), [9u8]).unwrap();
    std::fs::write(data.join("class01/sub/8.png"), [8u8]).unwrap();
    let spec = spec_toml(4, 2, 1, &store_url).replace(fake_dataset(), &data.display().to_string());
    let error = cluster.coordinator.submit(&spec, dir.path(), None).await.unwrap_err().to_string();
    assert!(error.contains("classes `class00`, `class02` are one folder"), "{error}");
    assert!(error.contains("class `class01`") && error.contains("holds the folder of class `class03`"), "{error}");
    assert!(cluster.coordinator.list().is_empty(), "nothing was submitted");
    cluster.shutdown().await;
}

/// A dataset of `classes` folders `classNN` of `per_class` 10-byte images in a scratch folder
/// that the test may change, a served coordinator on a store beside it, and an IPC 2 spec over
/// it: (scratch, dataset, store, cluster, spec).
async fn changing_dataset(classes: usize, per_class: usize) -> (tempfile::TempDir, PathBuf, Location, Cluster, String) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for class in 0..classes {
        let folder = data.join(format!("class{class:02}"));
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..per_class {
            std::fs::write(folder.join(format!("{i}.png")), [i as u8; 10]).unwrap();
        }
    }
    let store_url = dir.path().join("store").display().to_string();
    let out = store::open(&store_url).unwrap();
    let cluster = start(&store_url, None).await;
    let spec = spec_toml(classes, 2, 1, &store_url).replace(fake_dataset(), &data.display().to_string());
    (dir, data, out, cluster, spec)
}

/// The marker of `wnid` in job `job`'s output folder.
async fn marker(out: &Location, job: &str, wnid: &str) -> mgd3_common::manifest::ClassMarker {
    let key = out.key(&JobKeys::new(job).marker(wnid));
    serde_json::from_slice(&out.store.get(&key).await.unwrap().bytes().await.unwrap()).unwrap()
}

/// A copy of the dataset at the same path (`cp -r` drops modification times) or a `touch` is the
/// same data: the same job id, and resume and resubmit keep every commit. Same names and sizes
/// with other content are caught with `data_fingerprint = "content"` only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copying_or_touching_the_dataset_keeps_the_job_and_its_commits() {
    let (dir, data, out, cluster, spec) = changing_dataset(2, 3).await;
    let (first, _) = cluster.coordinator.submit(&spec, dir.path(), None).await.unwrap();
    // Each class's listing is recorded for the workers to check against.
    let listing = first.classes[1].listing.as_ref().expect("the listing submit saw");
    assert_eq!((listing.images, listing.bytes), (3, 30));
    cluster.run_to_success(&first.job_id).await;
    let committed = marker(&out, &first.job_id, "class01").await;
    assert_eq!(committed.data.as_ref(), Some(listing), "the marker records the data it was made from");
    // Re-copied to the same path without times, one file rewritten at the same size.
    std::thread::sleep(Duration::from_millis(20));
    let copy = dir.path().join("copy");
    std::fs::rename(&data, &copy).unwrap();
    for class in ["class00", "class01"] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for i in 0..3 {
            let name = format!("{i}.png");
            std::fs::write(data.join(class).join(&name), std::fs::read(copy.join(class).join(&name)).unwrap()).unwrap();
        }
    }
    std::fs::write(data.join("class01/2.png"), [9u8; 10]).unwrap();
    let (again, existed) = cluster.coordinator.submit(&spec, dir.path(), None).await.unwrap();
    assert!(existed && again.job_id == first.job_id, "the same job: {} vs {}", again.job_id, first.job_id);
    let resumed = cluster.coordinator.resume(&first.job_id, None).await.unwrap();
    assert!(resumed.data_changed.is_empty() && resumed.redone.is_empty(), "{resumed:?}");
    // (Running until the manifest is written again.)
    assert_eq!(wait_until_done(&cluster.coordinator, &first.job_id).await.state, JobState::Succeeded);
    assert_eq!(marker(&out, &first.job_id, "class01").await, committed, "the commit is kept");
    // Asked for content digests, the rewritten file is a change (of its class only).
    let hashed = format!("data_fingerprint = \"content\"\n{spec}");
    let (content_job, _) = cluster.coordinator.submit(&hashed, dir.path(), Some("hashed".into())).await.unwrap();
    assert_eq!(content_job.fingerprint, first.fingerprint, "how data is compared is no part of the identity");
    assert!(content_job.classes[1].listing.as_ref().unwrap().content_digest.is_some());
    std::fs::write(data.join("class01/2.png"), [7u8; 10]).unwrap();
    let error = cluster.coordinator.submit(&hashed, dir.path(), Some("hashed".into())).await.unwrap_err().to_string();
    assert!(
        error.contains("the data of 1 class(es) changed") && error.contains("`class01` (same names and sizes"),
        "{error}"
    );
    cluster.shutdown().await;
}

/// Removing one image from one class of a finished job (the corrupt JPEG fixed): resume,
/// resubmit and run refuse naming the class; accepted, exactly that class is distilled again
/// and every other commit is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_class_is_distilled_again_only_when_the_change_is_accepted() {
    let (dir, data, out, cluster, spec) = changing_dataset(3, 4).await;
    let (job, _) = cluster.coordinator.submit(&spec, dir.path(), None).await.unwrap();
    cluster.run_to_success(&job.job_id).await;
    let before: Vec<_> =
        futures::future::join_all(["class00", "class01", "class02"].map(|c| marker(&out, &job.job_id, c))).await;
    std::fs::remove_file(data.join("class01/3.png")).unwrap();
    let error = cluster.coordinator.resume(&job.job_id, None).await.unwrap_err();
    assert!(matches!(error, mgd3_coordinator::Error::DataChanged { .. }), "{error}");
    let error = error.to_string();
    assert!(
        error.contains("the data of 1 class(es) changed since the job recorded it: `class01` (4 images, 40 bytes then, 3 images, 30 bytes now; committed from the old data)")
            && error.contains("--accept-data-changes"),
        "{error}"
    );
    let error = cluster.coordinator.submit(&spec, dir.path(), None).await.unwrap_err().to_string();
    assert!(error.contains("`class01`") && error.contains("--accept-data-changes"), "{error}");
    // Refused: nothing was touched.
    assert_eq!(marker(&out, &job.job_id, "class01").await, before[1]);
    let resumed = cluster
        .coordinator
        .resume_with(&job.job_id, None, mgd3_coordinator::service::DataChanges::Accept)
        .await
        .unwrap();
    let changed: Vec<_> = resumed.data_changed.iter().map(|c| (c.wnid.as_str(), c.was_committed)).collect();
    assert_eq!(changed, [("class01", true)]);
    assert_eq!(cluster.coordinator.status(&job.job_id).unwrap().state, JobState::Running);
    cluster.run_to_success(&job.job_id).await;
    let after: Vec<_> =
        futures::future::join_all(["class00", "class01", "class02"].map(|c| marker(&out, &job.job_id, c))).await;
    assert_eq!((&after[0], &after[2]), (&before[0], &before[2]), "the other commits are kept");
    assert_ne!(after[1].attempt_id, before[1].attempt_id, "the changed class was distilled again");
    assert_eq!(after[1].data.as_ref().map(|d| d.images), Some(3));
    // The record is the data as it is now: nothing more to accept.
    let (again, existed) = cluster.coordinator.submit(&spec, dir.path(), None).await.unwrap();
    assert!(existed && again.classes[1].listing.as_ref().map(|l| l.images) == Some(3));
    let resumed = cluster.coordinator.resume(&job.job_id, None).await.unwrap();
    assert!(resumed.data_changed.is_empty());
    // A class folder added to a `classes = "all"` job's dataset is another job, not changed data.
    let all = spec
        .lines()
        .map(|l| if l.starts_with("classes = ") { "classes = \"all\"".to_owned() } else { l.to_owned() })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("name = \"cluster\"", "name = \"all\"");
    let (all_job, _) = cluster.coordinator.submit(&all, dir.path(), None).await.unwrap();
    std::fs::create_dir_all(data.join("class03")).unwrap();
    for i in 0..2 {
        std::fs::write(data.join("class03").join(format!("{i}.png")), [i as u8; 10]).unwrap();
    }
    let error = cluster.coordinator.resume(&all_job.job_id, None).await.unwrap_err().to_string();
    assert!(error.contains("class folders changed since the job was submitted (new `class03`)"), "{error}");
    cluster.shutdown().await;
}

/// Produces attempt-specific bytes so mixed files would be visible.
struct Salted(u8);

impl ShardEngine for Salted {
    fn distill(
        &mut self,
        spec: &JobSpec,
        _class: &ClassRef,
        _cancel: &Arc<AtomicBool>,
    ) -> Result<ClassResult, ShardFailure> {
        std::thread::sleep(Duration::from_millis(5));
        Ok(ClassResult {
            files: ClassFiles {
                images: (0..spec.ipc).map(|j| vec![self.0; 100 + j]).collect(),
                modes_npy: vec![self.0; 16],
            },
            timings: Default::default(),
            contact_sheet: None,
            quality: None,
            embedding: None,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_attempts_committing_one_shard_have_one_winner_per_class_and_no_mixed_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = store::open(&dir.path().display().to_string()).unwrap();
    let spec: JobSpec = JobSpec::from_toml(&spec_toml(5, 4, 5, "/unused")).unwrap();
    let classes = spec.class_list(|| unreachable!()).unwrap();
    let lease = |attempt: &str| ShardLease {
        lease_id: format!("lease-{attempt}"),
        attempt_id: attempt.into(),
        attempt: 1,
        job_id: "race".into(),
        fingerprint: "fp".into(),
        spec: Arc::new(spec.clone()),
        classes: classes.clone(),
        worker_id: format!("worker-{attempt}"),
    };
    let runtime = tokio::runtime::Handle::current();
    let attempts: Vec<_> = [(1u8, "a1"), (2u8, "a2")]
        .into_iter()
        .map(|(salt, attempt)| {
            let (out, lease, runtime) = (out.clone(), lease(attempt), runtime.clone());
            tokio::task::spawn_blocking(move || {
                run_shard(
                    &mut Salted(salt),
                    &runtime,
                    &out,
                    &lease,
                    &ShardProgress::default(),
                    &Arc::new(AtomicBool::new(false)),
                )
            })
        })
        .collect();
    for attempt in attempts {
        let report = attempt.await.unwrap().unwrap();
        assert_eq!(report.images, 20, "both attempts report the whole shard");
    }
    let keys = JobKeys::new("race");
    let files = dataset_files(&out, "race").await;
    assert_eq!(files.len(), 20);
    for class in &classes {
        let marker = mgd3_common::commit::read_marker(&out, &keys, &class.wnid).await.unwrap().unwrap();
        let salt = if marker.attempt_id == "a1" { 1 } else { 2 };
        for (name, bytes) in files.iter().filter(|(n, _)| n.starts_with(&format!("/{}/", class.wnid))) {
            assert!(bytes.iter().all(|b| *b == salt), "{name} mixes attempts");
        }
    }
    let staging: Vec<_> = out.store.list(Some(&out.key("jobs/race/staging"))).try_collect().await.unwrap();
    assert!(staging.is_empty(), "{staging:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rpcs_without_the_token_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let cluster = start(&store_url, Some("s3cret-token")).await;
    for token in [None, Some("wrong")] {
        let mut client = mgd3_common::rpc::connect(&cluster.url, token, None).unwrap();
        let status = client.list_jobs(proto::ListJobsRequest {}).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{token:?}");
        assert!(!status.message().contains("s3cret"));
    }
    let (_stop, handle) = worker(&cluster.url, "intruder", Some("wrong"), Box::new(FakeEngine::new(Duration::ZERO)));
    let err = mgd3_common::error_chain(&handle.await.unwrap().unwrap_err());
    assert!(err.contains("rejected worker `intruder`") && err.contains("--token-file"), "{err}");
    let mut client = mgd3_common::rpc::connect(&cluster.url, Some("s3cret-token"), None).unwrap();
    assert!(client.list_jobs(proto::ListJobsRequest {}).await.is_ok());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_with_a_private_ca_works_and_a_wrong_scheme_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert_pem).unwrap();
    let cluster = start_with_tls(&store_url, Some("t"), Some((cert_pem.into_bytes(), key_pem.into_bytes()))).await;
    let mut client = mgd3_common::rpc::connect(&cluster.url, Some("t"), Some(&ca)).unwrap();
    assert!(client.list_jobs(proto::ListJobsRequest {}).await.is_ok());
    let plain = cluster.url.replace("https://", "http://");
    let mut client = mgd3_common::rpc::connect(&plain, Some("t"), None).unwrap();
    let status = client.list_jobs(proto::ListJobsRequest {}).await.unwrap_err();
    // The wrong scheme is said as such, with the right URL, not as "unreachable" — also when the
    // connection merely dropped at the first request, once the address was seen to speak TLS.
    let text = mgd3_common::rpc::CallError::of(&plain, "ListJobs")(status).probed().await.to_string();
    assert!(text.contains(&format!("{plain} speaks TLS")) && text.contains(&format!("use {}", cluster.url)), "{text}");
    cluster.shutdown().await;

    let plain_cluster = start(&dir.path().join("plain").display().to_string(), None).await;
    let tls_url = plain_cluster.url.replace("http://", "https://");
    let mut client = mgd3_common::rpc::connect(&tls_url, None, Some(&ca)).unwrap();
    let status = client.list_jobs(proto::ListJobsRequest {}).await.unwrap_err();
    let text = mgd3_common::rpc::CallError::of(&tls_url, "ListJobs")(status).to_string();
    assert!(
        text.contains(&format!("{tls_url} does not speak TLS")) && text.contains(&format!("use {}", plain_cluster.url)),
        "{text}"
    );
    plain_cluster.shutdown().await;
}

/// A worker that straggles (20 s a class where the other takes 50 ms) holds a shard while the
/// rest of the job is done: once it is well behind the job's pace, the idle worker gets a backup
/// lease of it, commits its class and finishes the job; the straggler is told to stop and
/// exits cleanly, and the class's files are the backup's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_straggling_worker_is_overtaken_by_a_backup_lease() {
    let (dir, cluster, job) = cluster_with_job(6, 2, 1).await;
    let started = std::time::Instant::now();
    let (stop_slow, slow) = worker(&cluster.url, "slow", None, Box::new(FakeEngine::new(Duration::from_secs(20))));
    for _ in 0..200 {
        if cluster.coordinator.status(&job.job_id).unwrap().shards.running == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (stop_fast, fast) = worker(&cluster.url, "fast", None, Box::new(FakeEngine::new(Duration::from_millis(50))));
    assert_eq!(wait_until_done(&cluster.coordinator, &job.job_id).await.state, JobState::Succeeded);
    assert!(started.elapsed() < Duration::from_secs(10), "the backup finished the job, not the straggler");
    let out = store::open(&dir.path().display().to_string()).unwrap();
    for class in &job.classes {
        assert_eq!(marker(&out, &job.job_id, &class.wnid).await.worker_id, "fast", "{}", class.wnid);
    }
    for (stop, handle) in [(stop_slow, slow), (stop_fast, fast)] {
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(10), handle).await.expect("stops promptly").unwrap().unwrap();
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_mid_shard_releases_the_lease_without_spending_an_attempt() {
    let (dir, cluster, job) = cluster_with_job(2, 2, 2).await;
    let (stop, handle) = worker(&cluster.url, "w0", None, Box::new(FakeEngine::new(Duration::from_secs(30))));
    for _ in 0..200 {
        if cluster.coordinator.status(&job.job_id).unwrap().shards.running == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), handle).await.expect("worker stops promptly").unwrap().unwrap();
    let status = cluster.coordinator.status(&job.job_id).unwrap();
    assert_eq!((status.state.as_str(), status.shards.running, status.shards.pending), ("running", 0, 1));
    // The released attempt is not counted: a new worker gets attempt 1 again.
    let (stop, handle) = worker(&cluster.url, "w1", None, Box::new(FakeEngine::new(Duration::ZERO)));
    assert_eq!(wait_until_done(&cluster.coordinator, &job.job_id).await.state, JobState::Succeeded);
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    cluster.shutdown().await;
    // Shard 0's own state record (beside state.json since state schema 3).
    let record = dir.path().join(format!("jobs/{}/state/shards/0.json", job.job_id));
    let shard: serde_json::Value = serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
    assert_eq!(shard["attempts"], 1, "{shard:#}");
}

/// A client built before the protocol header existed (a raw tonic client) and a client of
/// another version are refused before any handler runs, with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_of_another_protocol_version_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start(&dir.path().display().to_string(), None).await;
    let mut old = proto::coordinator_client::CoordinatorClient::connect(cluster.url.clone()).await.unwrap();
    let status = old.list_jobs(proto::ListJobsRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let expected = format!(
        "older mgd3 protocol (it sends no `mgd3-protocol` header), the coordinator speaks protocol {}",
        mgd3_common::PROTOCOL_VERSION
    );
    assert!(status.message().contains(&expected), "{}", status.message());
    assert!(status.message().contains("run the same mgd3 version"), "{}", status.message());
    let channel = tonic::transport::Endpoint::from_shared(cluster.url.clone()).unwrap().connect().await.unwrap();
    let mut other =
        proto::coordinator_client::CoordinatorClient::with_interceptor(channel, |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("mgd3-protocol", "1".parse().unwrap());
            Ok(r)
        });
    let status = other.get_job_status(proto::GetJobStatusRequest { job_id: "x".into() }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("this client speaks mgd3 protocol 1"), "{}", status.message());
    let mut current = mgd3_common::rpc::connect(&cluster.url, None, None).unwrap();
    assert!(current.list_jobs(proto::ListJobsRequest {}).await.is_ok());
    cluster.shutdown().await;
}

/// A worker that registers with a model loaded from the job's path but with other bytes is told
/// which job it is excluded from and why, and never gets a lease of it; others do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_registering_with_other_model_files_is_excluded_with_the_reason() {
    let (_dir, cluster, job) = cluster_with_job(2, 2, 1).await;
    let mut client = mgd3_common::rpc::connect(&cluster.url, None, None).unwrap();
    let other = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    let register = |id: &str, fingerprint: &str| proto::RegisterWorkerRequest {
        worker_id: id.into(),
        protocol_version: mgd3_common::PROTOCOL_VERSION,
        model_fingerprints: [("/models/dit.onnx".to_owned(), fingerprint.to_owned())].into(),
        ..Default::default()
    };
    let response = client.register_worker(register("stale", other)).await.unwrap().into_inner();
    assert_eq!(response.excluded.len(), 1, "{response:?}");
    let reason = &response.excluded[0].reason;
    assert_eq!(response.excluded[0].job_id, job.job_id);
    for part in ["`/models/dit.onnx`", other, FINGERPRINT, &job.job_id] {
        assert!(reason.contains(part), "{reason} lacks {part}");
    }
    let poll = |id: &str| proto::PollWorkRequest { worker_id: id.into(), ..Default::default() };
    let action = client.poll_work(poll("stale")).await.unwrap().into_inner().action;
    assert!(matches!(action, Some(proto::poll_work_response::Action::WaitMs(_))), "{action:?}");
    // The status says the one live worker may not run the job, and why, as data.
    let status = cluster.coordinator.status(&job.job_id).unwrap();
    assert_eq!((status.workers, status.workers_excluded), (1, 1));
    assert_eq!(status.exclusions.len(), 1);
    assert_eq!((status.exclusions[0].worker_id.as_str(), &status.exclusions[0].reason), ("stale", reason));
    let line = mgd3_coordinator::progress::progress_line(&status, &cluster.url);
    assert!(!line.contains("model files differ") || line.contains(reason.as_str()), "{line}");
    // `submit --wait` / `run` stop waiting once every connected worker has been excluded for
    // the grace period, with the reasons (exit 3), instead of idling for ever.
    let keep_alive = {
        let mut client = client.clone();
        tokio::spawn(async move {
            loop {
                let poll = proto::PollWorkRequest { worker_id: "stale".into(), ..Default::default() };
                let _ = client.poll_work(poll).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let options = mgd3_coordinator::progress::ProgressOptions { quiet: true, every: Duration::from_secs(60) };
    let mut progress = mgd3_coordinator::progress::Progress::new(&cluster.url, options);
    let mut waiter = mgd3_common::rpc::connect(&cluster.url, None, None).unwrap();
    let grace = Some(Duration::from_secs(1));
    let started = std::time::Instant::now();
    let error = mgd3_coordinator::progress::wait_for(&mut waiter, &job.job_id, &mut progress, grace).await.unwrap_err();
    keep_alive.abort();
    let stopped = error.downcast_ref::<mgd3_common::NoWorker>().expect("a NoWorker error");
    assert_eq!(stopped.reasons, vec![format!("stale: {reason}")]);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(mgd3_common::NoWorker::EXIT_CODE, 3);
    // The same models as the job's: registered without exclusions, and leased.
    let response = client.register_worker(register("fresh", FINGERPRINT)).await.unwrap().into_inner();
    assert!(response.excluded.is_empty(), "{response:?}");
    let action = client.poll_work(poll("fresh")).await.unwrap().into_inner().action;
    assert!(matches!(action, Some(proto::poll_work_response::Action::Lease(_))), "{action:?}");
    cluster.shutdown().await;
}

/// A completion whose manifest digest does not match the markers in the store is refused and
/// recorded as a failed attempt; the correct digest is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_completion_with_the_wrong_manifest_digest_is_refused() {
    let (dir, cluster, job) = cluster_with_job(2, 2, 2).await;
    let store_url = dir.path().display().to_string();
    let out = store::open(&store_url).unwrap();
    let mut client = mgd3_common::rpc::connect(&cluster.url, None, None).unwrap();
    let register = proto::RegisterWorkerRequest {
        worker_id: "w".into(),
        protocol_version: mgd3_common::PROTOCOL_VERSION,
        ..Default::default()
    };
    client.register_worker(register).await.unwrap();
    let leaser = client.clone();
    let attempt = async || {
        let poll = proto::PollWorkRequest { worker_id: "w".into(), ..Default::default() };
        let Some(proto::poll_work_response::Action::Lease(lease)) =
            leaser.clone().poll_work(poll).await.unwrap().into_inner().action
        else {
            panic!("no lease");
        };
        let shard = ShardLease {
            lease_id: lease.lease_id.clone(),
            attempt_id: lease.attempt_id,
            attempt: lease.attempt,
            job_id: lease.job_id,
            fingerprint: lease.spec_fingerprint,
            spec: Arc::new(serde_json::from_str(&lease.spec_json).unwrap()),
            classes: lease.classes.into_iter().map(ClassRef::from).collect(),
            worker_id: "w".into(),
        };
        let (out, runtime) = (out.clone(), tokio::runtime::Handle::current());
        let report = tokio::task::spawn_blocking(move || {
            run_shard(
                &mut FakeEngine::new(Duration::ZERO),
                &runtime,
                &out,
                &shard,
                &ShardProgress::default(),
                &Arc::new(AtomicBool::new(false)),
            )
        })
        .await
        .unwrap()
        .unwrap();
        (lease.lease_id, report)
    };
    let (lease_id, report) = attempt().await;
    let wrong = proto::CompleteShardRequest {
        worker_id: "w".into(),
        lease_id,
        manifest_digest: "sha256:bogus".into(),
        images: report.images,
        seconds: report.seconds,
    };
    let status = client.complete_shard(wrong).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("manifest digest sha256:bogus"), "{}", status.message());
    assert!(status.message().contains(&report.digest), "{}", status.message());
    let refused = cluster.coordinator.status(&job.job_id).unwrap();
    assert_eq!((refused.state, refused.shards.done, refused.shards.pending), (JobState::Running, 0, 1));
    assert!(refused.failures[0].error.contains("manifest digest"), "{refused:?}");
    // The next attempt finds the classes committed and reports their digest: accepted.
    let (lease_id, again) = attempt().await;
    assert_eq!(again.digest, report.digest);
    let right = proto::CompleteShardRequest {
        worker_id: "w".into(),
        lease_id,
        manifest_digest: again.digest,
        images: again.images,
        seconds: again.seconds,
    };
    client.complete_shard(right).await.unwrap();
    assert_eq!(wait_until_done(&cluster.coordinator, &job.job_id).await.state, JobState::Succeeded);
    cluster.shutdown().await;
}

/// Records when its shard was stopped.
struct StopWatch {
    inner: FakeEngine,
    cancelled_at: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl ShardEngine for StopWatch {
    fn distill(
        &mut self,
        spec: &JobSpec,
        class: &ClassRef,
        cancel: &Arc<AtomicBool>,
    ) -> Result<ClassResult, ShardFailure> {
        let result = self.inner.distill(spec, class, cancel);
        if matches!(result, Err(ShardFailure::Cancelled)) {
            *self.cancelled_at.lock().unwrap() = Some(std::time::Instant::now());
        }
        result
    }
}

/// A worker cut off from its coordinator stops its shard once the lease has gone unrenewed for
/// the lease timeout (5 s in these specs): by then the shard is leased to someone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_cut_off_from_the_coordinator_stops_its_shard_when_the_lease_runs_out() {
    let (_dir, cluster, job) = cluster_with_job(1, 2, 1).await;
    let cancelled_at = Arc::new(std::sync::Mutex::new(None));
    let engine = StopWatch { inner: FakeEngine::new(Duration::from_secs(60)), cancelled_at: cancelled_at.clone() };
    let (stop, handle) = worker(&cluster.url, "w0", None, Box::new(engine));
    wait_for_running(&cluster.coordinator, &job.job_id).await;
    let coordinator = cluster.coordinator.clone();
    cluster.shutdown().await;
    let cut = std::time::Instant::now();
    drop(coordinator);
    for _ in 0..200 {
        if cancelled_at.lock().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at = cancelled_at.lock().unwrap().expect("the shard was never stopped");
    let after = at.duration_since(cut);
    // Not before the lease ran out (renewed at most a heartbeat before the cut), not long after.
    assert!(
        after >= Duration::from_millis(4_500) && after <= Duration::from_secs(15),
        "stopped {after:?} after the cut"
    );
    let _ = stop.send(());
    handle.abort();
}

async fn wait_for_running(coordinator: &Coordinator, job: &str) {
    for _ in 0..200 {
        if coordinator.status(job).unwrap().shards.running == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the shard never started");
}

/// A client that opens an HTTP/2 connection and then never answers (a hung worker, a half-open
/// socket, a hostile peer) cannot hold a stopping coordinator, its store lock and its Ctrl-C:
/// after the grace period the connection is dropped and the lock released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_does_not_hold_a_stopping_coordinator() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let cluster = start(&store_url, None).await;
    let address = cluster.url.trim_start_matches("http://").to_owned();
    let mut silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    // The HTTP/2 preface and an empty SETTINGS frame; then nothing, not even the ping's answer.
    silent.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let stopped =
        tokio::time::timeout(mgd3_coordinator::grpc::SHUTDOWN_GRACE + Duration::from_secs(20), cluster.local.stop())
            .await;
    assert!(stopped.is_ok(), "the coordinator was still stopping after {:?}", started.elapsed());
    stopped.unwrap().unwrap();
    // The lock is free: another coordinator opens the store at once.
    tokio::time::timeout(Duration::from_secs(5), Coordinator::open(&store_url, 100)).await.unwrap().unwrap();
    drop(silent);
}

/// Shards are sized by the batch policy the registered workers report: a job submitted before
/// any worker registered gets the default (and a note says so), one submitted after a worker
/// reported 512 DiT rows fills its calls (IPC 8: 32 classes per shard).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shards_are_sized_by_the_rows_the_registered_workers_report() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let cluster = start(&store_url, None).await;
    let spec = |seed: u64| {
        spec_toml(40, 8, 1, &store_url)
            .replace("classes_per_shard = 1\n", "")
            .replace("seed = 5", &format!("seed = {seed}"))
    };
    let (early, _, notes) = cluster.coordinator.submit_noted(&spec(1), dir.path(), None).await.unwrap();
    assert_eq!(early.shards.len(), 10, "40 classes in shards of the default 4");
    assert!(notes.iter().any(|n| n.contains("default 64 rows") && n.contains("no worker had registered")), "{notes:?}");

    let mut client = mgd3_common::rpc::connect(&cluster.url, None, None).unwrap();
    let policy = mgd3_common::batch::BatchPolicy { dit_rows: 512, ..Default::default() };
    let register = proto::RegisterWorkerRequest {
        worker_id: "h200".into(),
        protocol_version: mgd3_common::PROTOCOL_VERSION,
        batch_policy: Some(policy.into()),
        ..Default::default()
    };
    client.register_worker(register).await.unwrap();
    let (late, _, notes) = cluster.coordinator.submit_noted(&spec(2), dir.path(), None).await.unwrap();
    assert_eq!(late.shards, [(0, 32), (32, 40)]);
    assert!(notes.iter().any(|n| n.contains("512 rows") && n.contains("1 registered worker")), "{notes:?}");
    // Submitting the early job again keeps its shards: a job's plan never changes.
    let (again, existed, _) = cluster.coordinator.submit_noted(&spec(1), dir.path(), None).await.unwrap();
    assert!(existed);
    assert_eq!(again.shards, early.shards);

    // A worker with `--dit-rows auto` registers the default and chooses its rows when it loads a
    // job's models; its polls then report them, and later jobs plan with them.
    let auto = proto::RegisterWorkerRequest {
        worker_id: "auto".into(),
        protocol_version: mgd3_common::PROTOCOL_VERSION,
        batch_policy: Some(mgd3_common::batch::BatchPolicy::default().into()),
        ..Default::default()
    };
    client.register_worker(auto).await.unwrap();
    let chosen = mgd3_common::batch::BatchPolicy { dit_rows: 1024, ..Default::default() };
    let poll =
        proto::PollWorkRequest { worker_id: "auto".into(), batch_policy: Some(chosen.into()), ..Default::default() };
    client.poll_work(poll).await.unwrap();
    let (_, _, notes) = cluster.coordinator.submit_noted(&spec(3), dir.path(), None).await.unwrap();
    assert!(notes.iter().any(|n| n.contains("1024 rows") && n.contains("2 registered worker")), "{notes:?}");
    // `status` says what each worker reported, over the wire.
    let answer =
        client.get_job_status(proto::GetJobStatusRequest { job_id: late.job_id.clone() }).await.unwrap().into_inner();
    let status = mgd3_common::status::JobStatus::try_from(answer).unwrap();
    let rows: Vec<(String, u32)> = status.worker_rows.iter().map(|r| (r.worker_id.clone(), r.dit_rows)).collect();
    assert_eq!(rows, [("auto".to_owned(), 1024), ("h200".to_owned(), 512)]);
    cluster.shutdown().await;
}

/// Submitting a cancelled job's spec again does not run it: the job stays cancelled, and the
/// answer says so and names `coordinator resume`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resubmitting_a_cancelled_job_says_it_is_cancelled_and_how_to_resume() {
    let (dir, cluster, job) = cluster_with_job(2, 2, 1).await;
    cluster.coordinator.cancel(&job.job_id).unwrap();
    let store_url = dir.path().display().to_string();
    let (again, existed, notes) =
        cluster.coordinator.submit_noted(&spec_toml(2, 2, 1, &store_url), dir.path(), None).await.unwrap();
    assert!(existed);
    assert_eq!(again.job_id, job.job_id);
    let expected = format!("coordinator resume {}", job.job_id);
    assert!(notes.iter().any(|n| n.contains("was cancelled") && n.contains(&expected)), "{notes:?}");
    assert_eq!(cluster.coordinator.status(&job.job_id).unwrap().state, JobState::Cancelled);
    cluster.shutdown().await;
}

/// `verify` while the job runs: the classes still to come are no problem, the report says how
/// many are committed and that nothing is damaged (the CLI exits 0 and never says resume).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_on_a_running_job_reports_progress_not_damage() {
    let (_dir, cluster, job) = cluster_with_job(4, 2, 1).await;
    let (stop, handle) = worker(&cluster.url, "slow", None, Box::new(FakeEngine::new(Duration::from_millis(400))));
    let mut report = None;
    for _ in 0..200 {
        let status = cluster.coordinator.status(&job.job_id).unwrap();
        if status.classes_done >= 1 {
            report = Some(cluster.coordinator.verify(&job.job_id).await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = report.expect("a class committed");
    assert!(report.running, "{report:?}");
    assert!(report.problems.is_empty(), "uncommitted classes of a running job are no problems: {report:?}");
    assert!((1..4).contains(&report.classes_committed), "{report:?}");
    assert_eq!(wait_until_done(&cluster.coordinator, &job.job_id).await.state, JobState::Succeeded);
    let done = cluster.coordinator.verify(&job.job_id).await.unwrap();
    assert!(!done.running && done.problems.is_empty() && done.classes_committed == 4, "{done:?}");
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    cluster.shutdown().await;
}

/// `(class, file name)` of each problem `verify` found, sorted (empty class: the job as a whole).
fn problem_files(problems: &[mgd3_common::status::VerifyProblem]) -> Vec<(String, String)> {
    let mut named: Vec<(String, String)> = problems
        .iter()
        .map(|p| (p.wnid.clone(), p.file.as_deref().unwrap_or_default().rsplit('/').next().unwrap().to_owned()))
        .collect();
    named.sort();
    named
}

/// Two coordinators of different stores whose job writes to one output do not both distil it:
/// the second refuses the job while the first runs it (naming the first, its store and how to
/// go on), takes it up once the first is done with it, and a coordinator restarted while another
/// runs one of its jobs pauses that job, saying why, instead of distilling it a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_whose_output_another_coordinators_job_runs_is_refused_not_run_twice() {
    let (out, a_store, b_store) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_url, b_url) = (a_store.path().display().to_string(), b_store.path().display().to_string());
    let output = out.path().display().to_string();
    // Lock timeouts of 3 s: claims are renewed every second.
    let open = |store: String| async move {
        let coordinator = Coordinator::open_locked(&store, 100, Duration::from_secs(3)).await.unwrap();
        let config = ServeConfig { store_url: store, token: None, tls: None, heartbeat_ms: 100 };
        let local = LocalCoordinator::start(coordinator, config, 0).await.unwrap();
        Cluster { url: local.url.clone(), coordinator: local.coordinator.clone(), local }
    };
    let spec = spec_toml(4, 2, 1, &output);
    let a = open(a_url.clone()).await;
    let (job, _) = a.coordinator.submit(&spec, out.path(), None).await.unwrap();
    let claim = Path::new(&output).join(JobKeys::new(&job.job_id).claim());
    assert!(claim.is_file(), "the running job's output is not claimed");

    let b = open(b_url.clone()).await;
    let refused = b.coordinator.submit(&spec, out.path(), None).await.unwrap_err();
    let said = mgd3_common::error_chain(&refused);
    for part in [
        format!("job `{}`", job.job_id),
        format!("its output `{output}` is being distilled by another coordinator"),
        format!("store `{a_url}`"),
        a.url.clone(),
    ] {
        assert!(said.contains(&part), "`{part}` missing: {said}");
    }
    assert!(b.coordinator.status(&job.job_id).is_err(), "the refused job was taken in");
    assert_eq!(tonic::Status::from(refused).code(), tonic::Code::FailedPrecondition);

    // The first stops (its claim is given up with its lock); the second takes the job up, and a
    // restarted first finds it run elsewhere: paused, with the reason.
    a.shutdown().await;
    assert!(!claim.exists(), "a clean stop left the claim");
    let (_, existed) = b.coordinator.submit(&spec, out.path(), None).await.unwrap();
    assert!(!existed);
    let a = open(a_url.clone()).await;
    let mut status = a.coordinator.status(&job.job_id).unwrap();
    for _ in 0..100 {
        if !status.failures.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = a.coordinator.status(&job.job_id).unwrap();
    }
    assert_eq!(status.state, JobState::Running, "{status:?}");
    let reason = format!("{status:?}");
    assert!(
        reason.contains("waiting: job")
            && reason.contains("is being distilled by another coordinator")
            && reason.contains(&b_url),
        "{reason}"
    );
    let line = mgd3_coordinator::progress::progress_line(&status, &a.url);
    assert!(line.contains("waiting: another coordinator runs the job"), "{line}");
    let refused = a.coordinator.resume(&job.job_id, None).await.unwrap_err();
    assert!(mgd3_common::error_chain(&refused).contains(&b_url), "{refused}");
    // Nothing of it is leased here meanwhile.
    let idle = Box::new(FakeEngine::new(Duration::from_millis(5)));
    let (stop_idle, idle_handle) = worker(&a.url, "idle", None, idle);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.coordinator.status(&job.job_id).unwrap().shards.running, 0, "a job run elsewhere was leased");

    // Done there, the job is given up, and resuming it here finds every class committed.
    b.run_to_success(&job.job_id).await;
    for _ in 0..100 {
        if !claim.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!claim.exists(), "a finished job keeps its claim");
    // Given up there, the job goes on here by itself: its classes are found committed.
    assert_eq!(wait_until_done(&a.coordinator, &job.job_id).await.state, JobState::Succeeded);
    let _ = stop_idle.send(());
    idle_handle.await.unwrap().unwrap();
    // Forgotten where its output is another location, the job is said to be forgotten (its
    // outputs kept there), not unknown.
    assert!(a.coordinator.forget(&job.job_id).await.unwrap(), "the outputs stay in the output");
    let asked = a.coordinator.explained(&job.job_id, a.coordinator.status(&job.job_id)).await;
    assert!(matches!(asked, Err(mgd3_coordinator::Error::Forgotten { .. })), "{asked:?}");
    // It names the folder the outputs are in, not a placeholder.
    let said = asked.unwrap_err().to_string();
    assert!(said.contains(&format!("--job-dir {output}/jobs/{}", job.job_id)) && !said.contains("<output>"), "{said}");
    a.shutdown().await;
    b.shutdown().await;
}

/// Models moved to another folder (the same files, so the same fingerprints and job): the spec
/// that names them there, submitted again or given to `resume --spec`, makes the job read them
/// from there (they were kept at the old paths, which no worker could load any more, and the job
/// stalled), and no note says the job kept its old model paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_moved_with_the_same_fingerprints_are_read_from_where_the_spec_says() {
    let dir = tempfile::tempdir().unwrap();
    let store_url = dir.path().display().to_string();
    let cluster = start(&store_url, None).await;
    let spec = spec_toml(2, 2, 1, &store_url);
    let (job, _) = cluster.coordinator.submit(&spec, dir.path(), None).await.unwrap();
    let recorded = |id: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.path().join("jobs").join(id).join("job.json")).unwrap()).unwrap()
    };
    let moved = spec.replace("\"/models/", "\"/moved/");
    let (again, existed, notes) = cluster.coordinator.submit_noted(&moved, dir.path(), None).await.unwrap();
    assert!(existed && again.job_id == job.job_id);
    assert!(!notes.iter().any(|n| n.contains("models.")), "{notes:?}");
    assert_eq!(recorded(&job.job_id)["spec"]["models"]["dit"], "/moved/dit.onnx");
    assert_eq!(again.spec.models.vae_decoder, "/moved/dec.onnx");
    cluster.coordinator.cancel(&job.job_id).unwrap();
    let back = spec.replace("\"/models/", "\"/back/");
    cluster.coordinator.resume(&job.job_id, Some((&back, dir.path()))).await.unwrap();
    assert_eq!(recorded(&job.job_id)["spec"]["models"]["vae_encoder"], "/back/enc.onnx");
    cluster.shutdown().await;
}
