//! Helpers shared by the multi-process tests: the built binaries, free ports, child processes
//! killed on drop, polling, synthetic ImageFolders and job specs over the tiny fixtures, and a
//! moto S3 server.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::{GrayImage, ImageFormat};
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;

/// The shard state records of a job folder on disk (`state/shards/<index>.json`, state schema
/// 3), in shard order; shards never leased have none.
pub fn shard_records(job_dir: &Path) -> Vec<serde_json::Value> {
    let Ok(entries) = std::fs::read_dir(job_dir.join("state").join("shards")) else { return Vec::new() };
    let mut records: Vec<(usize, serde_json::Value)> = entries
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let index = path.file_stem()?.to_str()?.parse().ok()?;
            let text = std::fs::read(&path).ok()?;
            Some((index, serde_json::from_slice(&text).ok()?))
        })
        .collect();
    records.sort_by_key(|(index, _)| *index);
    records.into_iter().map(|(_, record)| record).collect()
}

/// A binary of the workspace, built next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_owned();
    let path = dir.join(name);
    assert!(path.exists(), "{} not built (run `cargo build --workspace`)", path.display());
    path
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/models")
}

/// A child process killed (SIGKILL) when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Grayscale 28×28 PNGs, `per_class` in each of `classes` folders `c0`, `c1`, ...
pub fn dataset(root: &Path, classes: usize, per_class: usize) {
    for c in 0..classes {
        let dir = root.join(format!("c{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let img = GrayImage::from_fn(28, 28, |x, y| {
                image::Luma([((x * (c as u32 + 3) + y * (i as u32 + 1)) % 256) as u8])
            });
            img.save_with_format(dir.join(format!("{i:03}.png")), ImageFormat::Png).unwrap();
        }
    }
}

/// A job over classes c0.. of `dataset` with the tiny fixture models.
pub fn spec(dataset: &str, output: &str, classes: usize, ipc: usize, seed: u64, extra: &str) -> String {
    let names: Vec<String> = (0..classes).map(|c| format!("\"c{c}\"")).collect();
    let m = fixtures();
    format!(
        r#"name = "chaos"
dataset = "{dataset}"
classes = [{}]
labels = "position"
ipc = {ipc}
seed = {seed}
output = "{output}"
lease_timeout_s = 5
max_attempts = 4
{extra}
[sampling]
steps = 50
[models]
dit = "{}"
vae_encoder = "{}"
vae_decoder = "{}"
"#,
        names.join(", "),
        m.join("tiny_dit.onnx").display(),
        m.join("tiny_vae_encoder.onnx").display(),
        m.join("tiny_vae_decoder.onnx").display()
    )
}

/// `coordinator serve` on a port, logging to `log`.
pub fn serve(port: u16, store: &str, log: &Path, env: &[(&str, String)]) -> Killed {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Killed(
        Command::new(bin("coordinator"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--store", store, "--heartbeat-ms", "200"])
            // Tests kill coordinators and restart them on the same store at once.
            .args(["--lock-timeout-s", "2"])
            // Scratch data in /tmp, fixtures in the checkout.
            .args(["--allow-path", "/"])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// A second coordinator on a store that another one serves must refuse in bounded time, naming
/// the holder; once the holder is SIGKILLed, a new one takes the store over after the lock
/// timeout and serves. Returns the new coordinator.
pub fn check_one_coordinator_per_store(store: &str, scratch: &Path, env: &[(&str, String)]) -> Killed {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut first = serve(port, store, &scratch.join("first.log"), env);
    wait_for_coordinator(&url);
    let second_log = scratch.join("second.log");
    let mut second = serve(free_port(), store, &second_log, env);
    let status = wait_exit(&mut second.0, "a second coordinator on a served store", Duration::from_secs(30));
    let text = std::fs::read_to_string(&second_log).unwrap();
    assert!(!status.success() && text.contains("is served by another coordinator"), "{text}");
    first.0.kill().unwrap();
    wait_exit(&mut first.0, "the SIGKILLed coordinator", Duration::from_secs(10));
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let third = serve(port, store, &scratch.join("third.log"), env);
    wait_for("a coordinator to take over the store", Duration::from_secs(30), || {
        Command::new(bin("coordinator")).args(["list", "--coordinator", &url]).output().unwrap().status.success()
    });
    let text = std::fs::read_to_string(scratch.join("third.log")).unwrap();
    assert!(text.contains("taking over the store"), "{text}");
    third
}

/// A scratch folder for one job: an ImageFolder `data/` of `classes` × `per_class` images, a store
/// folder `store/`, and `job.toml`, a [`spec`] of IPC `ipc` over all the classes into the store.
pub struct JobScratch {
    /// The folder (removed when dropped).
    pub dir: tempfile::TempDir,
    /// The store (and the job's output).
    pub store: String,
    /// The job spec.
    pub spec: PathBuf,
}

/// A [`JobScratch`]; `extra` goes into the spec's top level (`classes_per_shard = 1`).
pub fn job_scratch(classes: usize, per_class: usize, ipc: usize, seed: u64, extra: &str) -> JobScratch {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    dataset(&data, classes, per_class);
    let store = dir.path().join("store").display().to_string();
    let spec_path = dir.path().join("job.toml");
    std::fs::write(&spec_path, spec(&data.display().to_string(), &store, classes, ipc, seed, extra)).unwrap();
    JobScratch { dir, store, spec: spec_path }
}

/// `coordinator serve` on a free port logging lease grants (DEBUG of its service) to `log`:
/// the process, its port and its URL.
pub fn serve_logging_leases(store: &str, log: &Path) -> (Killed, u16, String) {
    let port = free_port();
    let server = serve(port, store, log, &[("RUST_LOG", "info,mgd3_coordinator::service=debug".into())]);
    (server, port, format!("http://127.0.0.1:{port}"))
}

/// Waits until the coordinator at `url` answers `coordinator list`.
pub fn wait_for_coordinator(url: &str) {
    wait_for(&format!("the coordinator at {url}"), Duration::from_secs(30), || {
        Command::new(bin("coordinator")).args(["list", "--coordinator", url]).output().unwrap().status.success()
    });
}

/// A worker with the fake engine (`class_seconds` per class) against `url`, stderr in `log`,
/// with `extra` flags.
pub fn fake_worker(url: &str, id: &str, class_seconds: &str, log: &Path, extra: &[&str]) -> Killed {
    Killed(
        Command::new(bin("worker"))
            .args(["--coordinator", url, "--worker-id", id, "--engine", "fake", "--fake-class-seconds", class_seconds])
            .args(extra)
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// A worker process against `url`.
pub fn worker(url: &str, id: &str, log: &Path, env: &[(&str, String)]) -> Killed {
    let log = std::fs::File::create(log).unwrap();
    Killed(
        Command::new(bin("worker"))
            .args(["--coordinator", url, "--worker-id", id, "--threads", "1"])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// `coordinator status JOB --json`, or None while the coordinator is unreachable.
pub fn status(url: &str, job: &str) -> Option<serde_json::Value> {
    let out = Command::new(bin("coordinator")).args(["status", job, "--json", "--coordinator", url]).output().unwrap();
    out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// Submits (retrying while the coordinator starts) and returns the job id.
pub fn submit(url: &str, spec: &Path) -> String {
    let start = Instant::now();
    loop {
        let out = Command::new(bin("coordinator"))
            .args(["submit", spec.to_str().unwrap(), "--coordinator", url])
            .output()
            .unwrap();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        let last_error = String::from_utf8_lossy(&out.stderr);
        assert!(start.elapsed() < Duration::from_secs(30), "submit kept failing for 30 s; last error:\n{last_error}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every file under `root`, relative name and bytes, sorted.
pub fn files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.strip_prefix(root).unwrap().display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// `coordinator run` of a spec with one local worker; panics on failure.
pub fn run_locally(spec: &Path, env: &[(&str, String)]) {
    run_locally_with(spec, env, &[]);
}

/// `coordinator run` of a spec with one local worker given `worker_args` (each `--flag=value`)
/// besides `--threads=1`; panics on failure.
pub fn run_locally_with(spec: &Path, env: &[(&str, String)], worker_args: &[&str]) {
    let extra = worker_args.iter().map(|arg| format!("--worker-arg={arg}"));
    let out = Command::new(bin("coordinator"))
        .args(["run", spec.to_str().unwrap(), "--local-workers", "1", "--worker-arg=--threads=1"])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(out.status.success(), "coordinator run failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

/// Sends SIGTERM.
pub fn terminate(child: &Child) {
    signal(child, 15);
}

/// Sends a signal (SIGSTOP is 19, SIGCONT 18 on Linux).
pub fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) takes two integers and touches no memory of this process; the pid is a
    // child this test spawned and still holds (not yet waited for, so not reused).
    unsafe { libc_kill(child.id() as i32, signal) };
}

/// SIGSTOPs `child` and waits until every one of its threads is stopped: from then on it writes
/// nothing until SIGCONT (18), so what it has written can be read without a race. Linux only
/// (`/proc/<pid>/task/*/stat`).
pub fn freeze(child: &Child) {
    signal(child, 19);
    let tasks = PathBuf::from(format!("/proc/{}/task", child.id()));
    let stopped = |stat: &str| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'));
    wait_for("a SIGSTOPped process to stop", Duration::from_secs(10), || {
        std::fs::read_dir(&tasks).is_ok_and(|entries| {
            entries.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok()).all(|s| stopped(&s))
        })
    });
}

/// Waits at most `timeout` for `child` to exit; a timeout kills it and fails naming `what`.
pub fn wait_exit(child: &mut Child, what: &str, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} had not exited {timeout:?} after being stopped");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A moto S3 server on a free port, killed on drop.
pub struct Moto {
    _server: Killed,
    pub port: u16,
}

/// Starts moto from `.venv-test` (or `MGD3_MOTO_PYTHON`); `None` (a skip) when it is not
/// installed, a failure when `MGD3_REQUIRE_S3=1`.
pub fn moto() -> Option<Moto> {
    let python = std::env::var_os("MGD3_MOTO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv-test/bin/python"));
    let installed =
        python.exists() && Command::new(&python).args(["-c", "import moto.server"]).status().is_ok_and(|s| s.success());
    if !installed {
        assert!(
            std::env::var("MGD3_REQUIRE_S3").as_deref() != Ok("1"),
            "moto is not installed at {}: run scripts/setup_test_servers.sh",
            python.display()
        );
        eprintln!("note: skipping the S3 test: moto is not installed (scripts/setup_test_servers.sh)");
        return None;
    }
    let port = free_port();
    let server = Killed(
        Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("moto to listen", Duration::from_secs(30), || TcpStream::connect(("127.0.0.1", port)).is_ok());
    Some(Moto { _server: server, port })
}

/// Creates a bucket with a plain request (moto does not check signatures).
pub fn create_bucket(port: u16, bucket: &str) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "creating bucket {bucket}: {response}");
}

/// The environment that points AWS clients at moto.
pub fn aws_env(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]
}

/// A client for bucket `name` on moto.
pub fn bucket(port: u16, name: &str) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_bucket_name(name)
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_allow_http(true)
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_region("us-east-1")
            .build()
            .unwrap(),
    )
}

/// The browser, or None (a skip) when none is installed and CI does not require one.
pub fn chromium() -> Option<PathBuf> {
    let named = std::env::var_os("MGD3_CHROMIUM").map(PathBuf::from);
    let found = named.or_else(|| {
        ["chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
            Command::new("which")
                .arg(name)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        })
    });
    if found.is_none() {
        assert!(
            std::env::var("MGD3_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
            "no Chromium found: run scripts/setup_test_servers.sh (it installs chromium-headless-shell)"
        );
        eprintln!("note: skipping the browser checks: no Chromium (scripts/setup_test_servers.sh installs one)");
    }
    found
}

/// Loads `page` in headless Chromium; returns the DOM after load and the console messages.
pub fn browse(browser: &Path, page: &Path) -> (String, Vec<String>) {
    browse_at(browser, page, 1400)
}

/// [`browse`] in a window `width` CSS pixels wide.
pub fn browse_at(browser: &Path, page: &Path, width: u32) -> (String, Vec<String>) {
    let out = Command::new(browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"])
        .arg(format!("--window-size={width},3000"))
        .args(["--virtual-time-budget=5000", "--dump-dom"])
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let console =
        String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.contains(":CONSOLE")).map(str::to_owned).collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}
