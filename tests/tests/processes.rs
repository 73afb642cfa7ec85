//! The real binaries and the tiny ONNX fixtures as separate processes: three workers, one
//! SIGKILLed mid-shard, the coordinator SIGKILLed and restarted on the same store; the job still
//! completes with every class committed once, byte-identical to a fault-free 1-worker run.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image::{GrayImage, ImageFormat};

fn bin(name: &str) -> PathBuf {
    let dir = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_owned();
    let path = dir.join(name);
    assert!(path.exists(), "{} not built (run `cargo build --workspace`)", path.display());
    path
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/models")
}

fn dataset(root: &Path, classes: usize, per_class: usize) {
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

fn spec(data: &Path, output: &Path, classes: usize) -> String {
    let names: Vec<String> = (0..classes).map(|c| format!("\"c{c}\"")).collect();
    let m = fixtures();
    format!(
        r#"name = "chaos"
dataset = "{}"
classes = [{}]
labels = "position"
ipc = 3
seed = 11
output = "{}"
lease_timeout_s = 5
max_attempts = 4
[sampling]
steps = 50
[models]
dit = "{}"
vae_encoder = "{}"
vae_decoder = "{}"
"#,
        data.display(),
        names.join(", "),
        output.display(),
        m.join("tiny_dit.onnx").display(),
        m.join("tiny_vae_encoder.onnx").display(),
        m.join("tiny_vae_decoder.onnx").display()
    )
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn serve(port: u16, store: &Path, log: &Path) -> Killed {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Killed(
        Command::new(bin("coordinator"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--store",
                store.to_str().unwrap(),
                "--heartbeat-ms",
                "200",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn status(url: &str, job: &str) -> Option<serde_json::Value> {
    let out = Command::new(bin("coordinator")).args(["status", job, "--json", "--coordinator", url]).output().unwrap();
    out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
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

#[test]
fn killed_worker_and_coordinator_do_not_change_the_result() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let classes = 8;
    dataset(&data, classes, 24);

    // Fault-free reference: one worker, `coordinator run`.
    let reference = scratch.path().join("reference");
    let reference_spec = scratch.path().join("reference.toml");
    std::fs::write(&reference_spec, spec(&data, &reference, classes)).unwrap();
    let out = Command::new(bin("coordinator"))
        .args(["run", reference_spec.to_str().unwrap(), "--local-workers", "1", "--worker-arg=--threads=1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "reference run failed:\n{}", String::from_utf8_lossy(&out.stderr));

    // Chaos run: 3 workers, SIGKILL one mid-shard, SIGKILL the coordinator and restart it.
    let store = scratch.path().join("store");
    let chaos_spec = scratch.path().join("chaos.toml");
    std::fs::write(&chaos_spec, spec(&data, &store, classes)).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = scratch.path().join("coordinator.log");
    let mut coordinator = serve(port, &store, &log);
    let mut job = String::new();
    wait_for("submit", Duration::from_secs(30), || {
        let out = Command::new(bin("coordinator"))
            .args(["submit", chaos_spec.to_str().unwrap(), "--coordinator", &url])
            .output()
            .unwrap();
        job = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        out.status.success()
    });
    let mut workers: Vec<Killed> = (0..3)
        .map(|i| {
            let log = std::fs::File::create(scratch.path().join(format!("worker{i}.log"))).unwrap();
            Killed(
                Command::new(bin("worker"))
                    .args(["--coordinator", &url, "--worker-id", &format!("w{i}"), "--threads", "1"])
                    .stderr(log)
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    wait_for("three running shards", Duration::from_secs(60), || {
        status(&url, &job).is_some_and(|s| s["shards"]["running"].as_u64() == Some(3))
    });
    workers[0].0.kill().unwrap(); // SIGKILL, mid-shard
    std::thread::sleep(Duration::from_millis(300));
    coordinator.0.kill().unwrap();
    coordinator.0.wait().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let _restarted = serve(port, &store, &log);
    wait_for("the job to finish", Duration::from_secs(180), || {
        status(&url, &job).is_some_and(|s| s["state"] != "running")
    });
    let final_status = status(&url, &job).unwrap();
    assert_eq!(
        final_status["state"],
        "succeeded",
        "{final_status:#}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(final_status["images"]["done"].as_u64(), Some(classes as u64 * 3));

    // Graceful shutdown of the survivors.
    for w in workers.iter_mut().skip(1) {
        unsafe { libc_kill(w.0.id() as i32, 15) };
    }
    for w in workers.iter_mut().skip(1) {
        let status = w.0.wait().unwrap();
        assert!(status.success(), "worker exit {status}");
    }

    let job_dir = |root: &Path| root.join("jobs").join(&job);
    let chaos_images = files(&job_dir(&store).join("dataset"));
    let reference_images = files(&job_dir(&reference).join("dataset"));
    assert_eq!(chaos_images.len(), classes * 3);
    assert!(chaos_images == reference_images, "PNG bytes differ from the fault-free run");
    assert_eq!(files(&job_dir(&store).join("shards")).len(), classes, "one marker per class");
    assert!(!job_dir(&store).join("staging").exists() || files(&job_dir(&store).join("staging")).is_empty());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job_dir(&store).join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["images"].as_u64(), Some(classes as u64 * 3));
    // The killed worker's shard really was attempted again.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job_dir(&store).join("state.json")).unwrap()).unwrap();
    let retried =
        state["shards"].as_array().unwrap().iter().filter(|s| s["attempts"].as_u64().unwrap_or(0) >= 2).count();
    assert!(retried >= 1, "no shard was re-leased: {state:#}");
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

#[test]
fn submit_wait_fails_naming_the_class_whose_folder_is_missing() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    dataset(&data, 2, 4);
    let store = scratch.path().join("store");
    let text =
        spec(&data, &store, 2).replace("classes = [\"c0\", \"c1\"]", "classes = [\"c0\", \"c1\", \"missing_class\"]");
    let spec_path = scratch.path().join("job.toml");
    std::fs::write(&spec_path, text).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _coordinator = serve(port, &store, &scratch.path().join("coordinator.log"));
    let _worker = Killed(
        Command::new(bin("worker"))
            .args(["--coordinator", &url, "--threads", "1"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut output = None;
    wait_for("submit --wait", Duration::from_secs(120), || {
        let out = Command::new(bin("coordinator"))
            .args(["submit", spec_path.to_str().unwrap(), "--wait", "--coordinator", &url])
            .output()
            .unwrap();
        let connected = !String::from_utf8_lossy(&out.stderr).contains("transport error");
        output = Some(out);
        connected
    });
    let out = output.unwrap();
    assert!(!out.status.success(), "a failed job must exit non-zero");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("missing_class") && text.contains("does not exist") && text.contains("failed"), "{text}");
    assert!(text.contains("2 done"), "the other classes still commit: {text}");
}
