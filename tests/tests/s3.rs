//! Object storage for real, against moto (an S3-compatible server on loopback that honours
//! create-only puts): a distillation that reads its dataset from s3:// and keeps state and outputs
//! in s3:// (models too), byte-identical to the same job on local folders; the latent cache reused by a second
//! job; a 30 s store outage mid-job survived without spending an attempt; a missing bucket
//! failing fast in one sentence; credentials from the AWS SDK's chain (an assume-role profile over a
//! `credential_process`) and none at all told in one sentence.
//!
//! moto comes from `scripts/setup_test_servers.sh` (.venv-test). Without it these tests are
//! skipped with a note, unless MGD3_REQUIRE_S3=1 (CI), which makes a missing moto a failure.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use support::*;

async fn upload_dir(store: &dyn ObjectStore, local: &std::path::Path, prefix: &str) {
    for (name, bytes) in files(local) {
        store.put(&object_store::path::Path::from(format!("{prefix}/{name}")), PutPayload::from(bytes)).await.unwrap();
    }
}

async fn download(store: &dyn ObjectStore, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let prefix = object_store::path::Path::from(prefix);
    let listed: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
    let mut out = Vec::new();
    for meta in listed {
        let bytes = store.get(&meta.location).await.unwrap().bytes().await.unwrap().to_vec();
        out.push((
            meta.location.as_ref().strip_prefix(prefix.as_ref()).unwrap().trim_start_matches('/').to_owned(),
            bytes,
        ));
    }
    out.sort();
    out
}

/// An object read whole and parsed as JSON; `key` is taken as it is (no re-encoding).
async fn get_json(store: &dyn ObjectStore, key: &str) -> serde_json::Value {
    let key = object_store::path::Path::parse(key).unwrap();
    serde_json::from_slice(&store.get(&key).await.unwrap().bytes().await.unwrap()).unwrap()
}

fn finish(url: &str, job: &str, timeout: Duration, log: &std::path::Path) -> serde_json::Value {
    wait_for("the job to finish", timeout, || status(url, job).is_some_and(|s| s["state"] != "running"));
    let s = status(url, job).unwrap();
    assert_eq!(s["state"], "succeeded", "{s:#}\n{}", std::fs::read_to_string(log).unwrap_or_default());
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distillation_from_s3_to_s3_matches_local_and_reuses_cached_latents() {
    let Some(moto) = moto() else { return };
    create_bucket(moto.port, "mgd3");
    let s3 = bucket(moto.port, "mgd3");
    let scratch = tempfile::tempdir().unwrap();
    let mut env = aws_env(moto.port);
    env.push(("MGD3_MODEL_CACHE", scratch.path().join("model-cache").display().to_string()));
    let data = scratch.path().join("data");
    dataset(&data, 3, 12);
    upload_dir(s3.as_ref(), &data, "data").await;
    upload_dir(s3.as_ref(), &fixtures(), "models").await;
    let models_in_s3 = |text: String| text.replace(&format!("{}/", fixtures().display()), "s3://mgd3/models/");

    // Local reference of the same images.
    let local_out = scratch.path().join("local");
    let local_spec = scratch.path().join("local.toml");
    std::fs::write(&local_spec, spec(&data.display().to_string(), &local_out.display().to_string(), 3, 2, 3, ""))
        .unwrap();
    run_locally(&local_spec, &[]);

    // The same job on S3: dataset, coordinator state, outputs and latent cache in the bucket.
    let cached = "latent_cache = \"s3://mgd3/cache\"";
    let s3_spec = scratch.path().join("s3.toml");
    let text = models_in_s3(
        spec("s3://mgd3/data", "s3://mgd3/out", 3, 2, 3, cached)
            .replace("classes = [\"c0\", \"c1\", \"c2\"]", "classes = \"all\""),
    );
    assert!(text.contains("dit = \"s3://mgd3/models/tiny_dit.onnx\""), "{text}");
    std::fs::write(&s3_spec, text).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = scratch.path().join("coordinator.log");
    let _coordinator = serve(port, "s3://mgd3/state", &log, &env);
    let job = submit(&url, &s3_spec);
    let _workers: Vec<Killed> =
        (0..2).map(|i| worker(&url, &format!("w{i}"), &scratch.path().join(format!("w{i}.log")), &env)).collect();
    finish(&url, &job, Duration::from_secs(120), &log);

    let ours = download(s3.as_ref(), &format!("out/jobs/{job}/dataset")).await;
    let local_job = std::fs::read_dir(local_out.join("jobs")).unwrap().next().unwrap().unwrap().path();
    assert_eq!(ours.len(), 6);
    assert!(ours == files(&local_job.join("dataset")), "S3 and local runs differ");
    assert!(s3.head(&object_store::path::Path::from(format!("state/jobs/{job}/job.json"))).await.is_ok());
    assert!(s3.head(&object_store::path::Path::from(format!("out/jobs/{job}/manifest.json"))).await.is_ok());
    let markers = download(s3.as_ref(), &format!("out/jobs/{job}/shards")).await;
    assert_eq!(markers.len(), 3);
    assert!(
        markers
            .iter()
            .all(|(_, m)| serde_json::from_slice::<serde_json::Value>(m).unwrap()["latent_cache_hit"] == false)
    );
    assert_eq!(download(s3.as_ref(), "cache/latents").await.len(), 3, "one cached latent file per class");
    assert!(scratch.path().join("model-cache").exists(), "models were fetched from s3:// into the model cache");

    // Another IPC and seed over the same dataset and VAE: no image is decoded or encoded again.
    let second = scratch.path().join("second.toml");
    std::fs::write(&second, spec("s3://mgd3/data", "s3://mgd3/out", 3, 3, 9, cached)).unwrap();
    let job2 = submit(&url, &second);
    assert_ne!(job, job2);
    finish(&url, &job2, Duration::from_secs(120), &log);
    let markers = download(s3.as_ref(), &format!("out/jobs/{job2}/shards")).await;
    assert_eq!(markers.len(), 3);
    for (name, bytes) in markers {
        let marker: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(marker["latent_cache_hit"], true, "{name}");
        assert_eq!(marker["timings"]["encode"], 0.0, "{name}");
    }
    let logs: String =
        (0..2).map(|i| std::fs::read_to_string(scratch.path().join(format!("w{i}.log"))).unwrap()).collect();
    assert!(logs.contains("latent cache hit"), "the reuse shows in the worker logs");
}

/// A loopback TCP proxy that can drop every connection (new and open) while `down` is set.
fn flaky_proxy(target: u16) -> (u16, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let down = Arc::new(AtomicBool::new(false));
    let flag = down.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            if flag.load(Ordering::Relaxed) {
                drop(client);
                continue;
            }
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
            for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                let flag = flag.clone();
                std::thread::spawn(move || {
                    from.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                    let mut buffer = [0u8; 64 * 1024];
                    loop {
                        if flag.load(Ordering::Relaxed) {
                            break;
                        }
                        match from.read(&mut buffer) {
                            Ok(0) => break,
                            Ok(n) => {
                                if to.write_all(&buffer[..n]).is_err() {
                                    break;
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => break,
                        }
                    }
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    (port, down)
}

/// A worker with the fake engine (`class_seconds` per class) against `url`, in `env` (the
/// store's endpoint and keys), stderr in `log`.
fn fake_worker_with(url: &str, id: &str, class_seconds: &str, log: &std::path::Path, env: &[(&str, String)]) -> Killed {
    Killed(
        Command::new(bin("worker"))
            .args(["--coordinator", url, "--worker-id", id, "--engine", "fake", "--fake-class-seconds", class_seconds])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_second_store_outage_mid_job_loses_duplicates_and_spends_nothing() {
    let Some(moto) = moto() else { return };
    create_bucket(moto.port, "flaky");
    let s3 = bucket(moto.port, "flaky");
    // The coordinator and the worker reach the store through proxies of their own, so that the
    // outage can begin on the coordinator's side first.
    let (proxy, down) = flaky_proxy(moto.port);
    let env = aws_env(proxy);
    let (worker_proxy, worker_down) = flaky_proxy(moto.port);
    let worker_env = aws_env(worker_proxy);
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    // One class per shard (all ten the tiny DiT knows) at IPC 4, so the first commit comes long
    // before the last: the outage has to land while leases are still being handed out.
    let classes = 10;
    let one = "classes_per_shard = 1";
    dataset(&data, classes, 30);
    let job_spec = scratch.path().join("job.toml");
    std::fs::write(&job_spec, spec(&data.display().to_string(), "s3://flaky/out", classes, 4, 4, one)).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = scratch.path().join("coordinator.log");
    let _coordinator = serve(port, "s3://flaky/state", &log, &env);
    let job = submit(&url, &job_spec);
    let _worker = worker(&url, "w0", &scratch.path().join("w0.log"), &worker_env);
    wait_for("the first committed shard", Duration::from_secs(60), || {
        status(&url, &job).is_some_and(|s| s["shards"]["done"].as_u64() >= Some(1))
    });
    // A second worker whose class takes ten minutes holds a shard and polls every heartbeat
    // through the outage, as a cluster's other workers do: a poll expires whatever lease is due.
    // It is stopped (its lease given back, no attempt spent) once the store is back.
    let holder = fake_worker_with(&url, "w1", "600", &scratch.path().join("w1.log"), &worker_env);
    wait_for("the second worker's lease", Duration::from_secs(30), || {
        status(&url, &job).is_some_and(|s| s["shards"]["running"].as_u64() >= Some(2))
    });
    down.store(true, Ordering::Relaxed);
    let outage = Instant::now();
    eprintln!("outage begins with {} of {classes} shards done", status(&url, &job).unwrap()["shards"]["done"]);
    // For 10 s (two lease timeouts) only the coordinator's calls fail: the worker commits its
    // shard and reports it, and waits without heartbeats while the coordinator cannot read the
    // markers. That wait must not expire the lease (it did: the shard was leased again, with an
    // attempt spent, whenever the outage began while a completion was being verified).
    std::thread::sleep(Duration::from_secs(10));
    worker_down.store(true, Ordering::Relaxed);
    // The coordinator answers from memory while its store is down (`status` and `list` asked the
    // store for sweep records first, and hung until it came back).
    let during = status(&url, &job).expect("`coordinator status` answers during the outage");
    assert_eq!(during["state"], "running", "{during:#}");
    let listed = Command::new(bin("coordinator")).args(["list", "--coordinator", &url]).output().unwrap();
    assert!(listed.status.success(), "`coordinator list` answers during the outage: {listed:?}");
    // 30 s in all: longer than three attempts' worth of the old retry budget (12 retries, 4–17 s
    // per call).
    std::thread::sleep(Duration::from_secs(20));
    down.store(false, Ordering::Relaxed);
    worker_down.store(false, Ordering::Relaxed);
    let during = status(&url, &job).unwrap();
    assert_eq!(during["state"], "running", "the outage must hit the job mid-run: {during:#}");
    terminate(&holder.0);
    finish(&url, &job, Duration::from_secs(240), &log);
    eprintln!("job finished {:.1} s after the outage began", outage.elapsed().as_secs_f64());
    // The outage was said: once per store when it had lasted 15 s, once when it ended.
    let text = std::fs::read_to_string(&log).unwrap();
    let down: Vec<&str> = text.lines().filter(|l| l.contains("answered nothing but errors")).collect();
    let back: Vec<&str> = text.lines().filter(|l| l.contains("answers again after an outage of")).collect();
    assert!(!down.is_empty() && down.len() == back.len(), "{text}");
    for store in ["s3://flaky/state", "s3://flaky/out"] {
        assert!(down.iter().filter(|l| l.contains(store)).count() <= 1, "told once per store: {down:#?}");
    }
    assert!(down.iter().all(|l| l.contains("WARN")) && back.iter().all(|l| l.contains("INFO")), "{down:?} {back:?}");

    let images = download(s3.as_ref(), &format!("out/jobs/{job}/dataset")).await;
    assert_eq!(images.len(), classes * 4, "every image exactly once");
    let markers = download(s3.as_ref(), &format!("out/jobs/{job}/shards")).await;
    assert_eq!(markers.len(), classes);
    assert!(download(s3.as_ref(), &format!("out/jobs/{job}/staging")).await.is_empty(), "no staging left behind");
    // The outage was survived call by call: no class failed, no attempt was spent.
    let records = download(s3.as_ref(), &format!("state/jobs/{job}/state/shards")).await;
    assert_eq!(records.len(), classes, "one state record per shard");
    for (name, bytes) in &records {
        let shard: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        assert!(shard["attempts"] == 1 && shard["last_error"].is_null(), "{name}: {shard:#}");
    }
    // Same bytes as an undisturbed local run.
    let local_spec = scratch.path().join("local.toml");
    let local_out = scratch.path().join("local");
    std::fs::write(
        &local_spec,
        spec(&data.display().to_string(), &local_out.display().to_string(), classes, 4, 4, one),
    )
    .unwrap();
    run_locally(&local_spec, &[]);
    assert!(images == files(&local_out.join("jobs").join(&job).join("dataset")));
}

/// A worker that has no credentials for the output store is excluded from the job (its reason
/// in `status`), and the shards it took go to a worker that has them without spending an
/// attempt: one misconfigured node failed the whole job in a second (every shard's attempts spent
/// on "no AWS credentials found").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_store_credentials_is_excluded_and_the_others_finish_the_job() {
    let Some(moto) = moto() else { return };
    let env = aws_env(moto.port);
    let classes = 3;
    let BucketJob { scratch, url, log, job, _coordinator } = bucket_job(moto.port, "creds", classes, &env);
    // The store's endpoint and region, but no keys anywhere (an empty home, no metadata).
    let home = tempfile::tempdir().unwrap();
    let keyless: Vec<(&str, String)> =
        env.iter().filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET")).cloned().collect();
    let keyless = [keyless, vec![("HOME", home.path().display().to_string())]].concat();
    let _bad = fake_worker_with(&url, "keyless", "0.1", &scratch.path().join("keyless.log"), &keyless);
    wait_for("the keyless worker's exclusion", Duration::from_secs(60), || {
        status(&url, &job).is_some_and(|s| s["workers_excluded"].as_u64() == Some(1))
    });
    let during = status(&url, &job).unwrap();
    assert_eq!(during["state"], "running", "{during:#}");
    let reason = during["exclusions"][0]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(during["exclusions"][0]["worker"] == "keyless" && reason.contains("no AWS credentials"), "{during:#}");
    let _good = fake_worker_with(&url, "good", "0.1", &scratch.path().join("good.log"), &env);
    let done = finish(&url, &job, Duration::from_secs(120), &log);
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let s3 = bucket(moto.port, "creds");
    assert_eq!(download(s3.as_ref(), &format!("out/jobs/{job}/shards")).await.len(), classes);
    for (name, bytes) in download(s3.as_ref(), &format!("state/jobs/{job}/state/shards")).await {
        let shard: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(shard["attempts"], 1, "{name}: {shard:#}");
    }
}

/// A job submitted to a coordinator whose state and output are in the moto bucket `bucket`.
struct BucketJob {
    scratch: tempfile::TempDir,
    url: String,
    log: std::path::PathBuf,
    job: String,
    _coordinator: Killed,
}

/// Creates `bucket`, serves a coordinator on `s3://<bucket>/state` (with `env`) and submits a
/// job of `classes` classes of 30 images at IPC 2, one class per shard, output `s3://<bucket>/out`.
fn bucket_job(moto_port: u16, bucket: &str, classes: usize, env: &[(&str, String)]) -> BucketJob {
    create_bucket(moto_port, bucket);
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    dataset(&data, classes, 30);
    let job_spec = scratch.path().join("job.toml");
    let output = format!("s3://{bucket}/out");
    let text = spec(&data.display().to_string(), &output, classes, 2, 4, "classes_per_shard = 1");
    std::fs::write(&job_spec, text).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = scratch.path().join("coordinator.log");
    let coordinator = serve(port, &format!("s3://{bucket}/state"), &log, env);
    let job = submit(&url, &job_spec);
    BucketJob { scratch, url, log, job, _coordinator: coordinator }
}

/// A worker told to stop (SIGTERM) while its store does not answer leaves the commit it is in
/// after a short grace and gives its lease back, spending no attempt: it took three minutes (the
/// store calls' whole retry budget, past any stop grace) and spent an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_during_a_store_outage_exits_promptly_and_spends_no_attempt() {
    let Some(moto) = moto() else { return };
    let env = aws_env(moto.port);
    let (worker_proxy, worker_down) = flaky_proxy(moto.port);
    let worker_env = aws_env(worker_proxy);
    let BucketJob { scratch, url, log, job, _coordinator } = bucket_job(moto.port, "stopping", 2, &env);
    // Its class takes 3 s; the store goes away for it while the class runs, so its commit waits.
    let mut stopping = fake_worker_with(&url, "stopping", "3", &scratch.path().join("stopping.log"), &worker_env);
    wait_for("the worker's lease", Duration::from_secs(30), || {
        status(&url, &job).is_some_and(|s| s["shards"]["running"].as_u64() >= Some(1))
    });
    worker_down.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(5));
    let stopped = Instant::now();
    terminate(&stopping.0);
    let exit = wait_exit(&mut stopping.0, "the stopped worker", Duration::from_secs(60));
    let took = stopped.elapsed();
    let said = std::fs::read_to_string(scratch.path().join("stopping.log")).unwrap();
    assert!(took < Duration::from_secs(40), "the worker took {took:?} to stop:\n{said}");
    assert!(exit.success(), "{exit:?}\n{said}");
    assert!(said.contains("the class is left uncommitted and the lease given back"), "{said}");
    // The store comes back for a worker that has it: the job ends, every shard on its first attempt.
    worker_down.store(false, Ordering::Relaxed);
    let _good = fake_worker_with(&url, "good", "0.1", &scratch.path().join("good.log"), &env);
    let done = finish(&url, &job, Duration::from_secs(120), &log);
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let s3 = bucket(moto.port, "stopping");
    for (name, bytes) in download(s3.as_ref(), &format!("state/jobs/{job}/state/shards")).await {
        let shard: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert!(shard["attempts"] == 1 && shard["last_error"].is_null(), "{name}: {shard:#}");
    }
}

/// A coordinator started (or restarted) while its store does not answer waits for the store,
/// as any other call does, instead of exiting at its first failed write of the lock.
#[test]
fn a_coordinator_started_during_a_store_outage_waits_for_the_store() {
    let Some(moto) = moto() else { return };
    create_bucket(moto.port, "later");
    let (proxy, down) = flaky_proxy(moto.port);
    down.store(true, Ordering::Relaxed);
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("coordinator.log");
    let port = free_port();
    let mut coordinator = serve(port, "s3://later/state", &log, &aws_env(proxy));
    std::thread::sleep(Duration::from_secs(5));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(coordinator.0.try_wait().unwrap().is_none(), "it must wait for the store, not exit: {text}");
    down.store(false, Ordering::Relaxed);
    wait_for_coordinator(&format!("http://127.0.0.1:{port}"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("coordinator lock taken"), "{text}");
}

/// A coordinator cut off from its store for longer than its lock timeout may have been replaced:
/// it stops acting on the store (no lease, no commit, no state written) before another one can
/// take the store over, and stops for good once it sees the new holder. Here its worker's shard
/// completion is in flight when its store comes back after a second coordinator took over: that
/// completion is not recorded by the old one (it was, a few seconds after the takeover).
#[test]
fn a_coordinator_cut_off_past_its_lock_timeout_commits_nothing_after_a_takeover() {
    let Some(moto) = moto() else { return };
    create_bucket(moto.port, "fenced");
    let (proxy, down) = flaky_proxy(moto.port);
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    dataset(&data, 10, 3);
    let job_spec = scratch.path().join("job.toml");
    let one = "classes_per_shard = 1";
    std::fs::write(&job_spec, spec(&data.display().to_string(), "s3://fenced/out", 10, 2, 1, one)).unwrap();
    let debug = ("RUST_LOG", "info,mgd3_coordinator::service=debug".to_owned());
    let mut env_a = aws_env(proxy);
    env_a.push(debug.clone());
    let (port_a, log_a) = (free_port(), scratch.path().join("a.log"));
    let url_a = format!("http://127.0.0.1:{port_a}");
    let mut a = serve(port_a, "s3://fenced/state", &log_a, &env_a);
    let job = submit(&url_a, &job_spec);
    // The worker reaches the store directly, so it commits while the coordinator cannot.
    let _worker = fake_worker_with(&url_a, "w0", "0.5", &scratch.path().join("w0.log"), &aws_env(moto.port));
    wait_for("the first committed shard", Duration::from_secs(60), || {
        status(&url_a, &job).is_some_and(|s| s["shards"]["done"].as_u64() >= Some(1))
    });
    down.store(true, Ordering::Relaxed);
    // A second coordinator on the same store (lock timeout 2 s) takes it over.
    let log_b = scratch.path().join("b.log");
    let port_b = free_port();
    let _b = serve(port_b, "s3://fenced/state", &log_b, &[aws_env(moto.port), vec![debug]].concat());
    wait_for_coordinator(&format!("http://127.0.0.1:{port_b}"));
    let text_b = std::fs::read_to_string(&log_b).unwrap();
    let takeover = text_b
        .lines()
        .find(|l| l.contains("taking over the store from a coordinator that stopped renewing its lock"))
        .unwrap_or_else(|| panic!("{text_b}"))
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    std::thread::sleep(Duration::from_secs(2));
    // The replaced coordinator, still cut off, says in its status since when it has not held
    // the store (what `submit --wait` gives up on after as long as on a silent coordinator).
    let asked_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let unheld = status(&url_a, &job).and_then(|s| s["store_unheld_since_unix_ms"].as_u64());
    // Its lock (2 s) lapsed before the takeover, which came before the 2 s just slept.
    assert!(unheld.is_some_and(|since| since + 2_000 <= asked_ms), "unheld since {unheld:?}, asked at {asked_ms}");
    down.store(false, Ordering::Relaxed);
    let stopped = wait_exit(&mut a.0, "the replaced coordinator", Duration::from_secs(30));
    let text_a = std::fs::read_to_string(&log_a).unwrap();
    assert!(!stopped.success() && text_a.contains("stopping: the store has another coordinator"), "{text_a}");
    // RFC 3339 times in one format on one host: ordered as text.
    let acted_after: Vec<&str> = text_a
        .lines()
        .filter(|l| l.contains("shard committed") || l.contains("lease granted"))
        .filter(|l| l.split_whitespace().next().is_some_and(|at| at > takeover.as_str()))
        .collect();
    assert!(acted_after.is_empty(), "acted after the takeover at {takeover}: {acted_after:#?}\n{text_a}");
}

#[test]
fn a_missing_bucket_fails_fast_naming_the_url() {
    let Some(moto) = moto() else { return };
    let started = Instant::now();
    let out = Command::new(bin("coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store", "s3://no-such-bucket/state"])
        .envs(aws_env(moto.port))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("s3://no-such-bucket/state"), "{text}");
    assert!(text.contains("the bucket `no-such-bucket` does not exist: create it"), "one plain sentence: {text}");
    assert!(!text.contains("<?xml") && !text.contains("Error performing"), "no request dump: {text}");
    assert!(started.elapsed() < Duration::from_secs(15), "a permanent error must not be retried for long");
}

/// `coordinator serve` on `store` in an environment that has AWS settings only where a test puts
/// them: nothing inherited (a developer's own keys or profile), an empty HOME, no instance metadata.
fn serve_with_only(store: &str, home: &std::path::Path, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(bin("coordinator"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--store", store, "--lock-timeout-s", "2"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    command
}

/// Credentials come from the AWS SDK's chain, not only from static keys: a profile that assumes a
/// role (STS on moto) from a source profile whose keys a `credential_process` prints, with the
/// region and the endpoint in the profile too. The coordinator takes the store's lock with them.
#[test]
fn an_assume_role_profile_over_a_credential_process_opens_the_store() {
    let Some(moto) = moto() else { return };
    create_bucket(moto.port, "profiled");
    let home = tempfile::tempdir().unwrap();
    let process = home.path().join("print-credentials.sh");
    let ran = home.path().join("credential-process-ran");
    std::fs::write(
        &process,
        format!(
            "#!/bin/sh\ntouch '{}'\necho '{{\"Version\": 1, \"AccessKeyId\": \"AKIDPROCESS\", \"SecretAccessKey\": \"s\"}}'\n",
            ran.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&process, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = home.path().join("aws-config");
    let endpoint = format!("http://127.0.0.1:{}", moto.port);
    std::fs::write(
        &config,
        format!(
            "[profile base]\ncredential_process = {}\nregion = us-east-1\nendpoint_url = {endpoint}\n\n\
             [profile distill]\nrole_arn = arn:aws:iam::123456789012:role/mgd3-distill\nsource_profile = base\n\
             region = us-east-1\nendpoint_url = {endpoint}\n",
            process.display()
        ),
    )
    .unwrap();
    let log = home.path().join("serve.log");
    let mut serve = serve_with_only(
        "s3://profiled/state",
        home.path(),
        &[("AWS_PROFILE", "distill".into()), ("AWS_CONFIG_FILE", config.display().to_string())],
    );
    let _serve = Killed(serve.stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap());
    let lock = bucket(moto.port, "profiled");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    wait_for("the coordinator to take the lock on s3://profiled/state", Duration::from_secs(30), || {
        runtime.block_on(lock.head(&object_store::path::Path::from("state/coordinator.lock"))).is_ok()
    });
    assert!(ran.exists(), "the credential_process ran: {}", std::fs::read_to_string(&log).unwrap());
}

/// No credentials anywhere: the coordinator says so in one sentence that says what to set, at
/// once, instead of an instance-metadata 403 or a retry loop.
#[test]
fn no_credentials_anywhere_is_one_sentence_saying_what_to_set() {
    let Some(moto) = moto() else { return };
    create_bucket(moto.port, "unsigned");
    let home = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = serve_with_only(
        "s3://unsigned/state",
        home.path(),
        &[("AWS_REGION", "us-east-1".into()), ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", moto.port))],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("s3://unsigned/state"), "{text}");
    assert!(
        text.contains("no AWS credentials found for profile `default`")
            && text.contains("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        "{text}"
    );
    assert!(!text.contains("169.254") && !text.contains("WARN"), "no metadata dump, no chain warnings: {text}");
    assert_eq!(text.trim().lines().count(), 1, "one line: {text}");
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
}

/// Off EC2 the SDK's chain ends in the instance metadata provider, whose failure (here a
/// metadata endpoint that answers 403, as on machines where IMDS is blocked) is still "no
/// credentials found" for a person: one sentence saying what to set, with the service's answer.
#[test]
fn no_credentials_where_instance_metadata_refuses_is_the_same_sentence() {
    let Some(moto) = moto() else { return };
    create_bucket(moto.port, "unsigned");
    let metadata = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metadata_port = metadata.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in metadata.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut request);
            let _ = std::io::Write::write_all(
                &mut stream,
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let home = tempfile::tempdir().unwrap();
    let out = serve_with_only(
        "s3://unsigned/state",
        home.path(),
        &[
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", moto.port)),
            ("AWS_EC2_METADATA_DISABLED", "false".into()),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", format!("http://127.0.0.1:{metadata_port}")),
        ],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("no AWS credentials found for profile `default`")
            && text.contains("instance metadata answered")
            && text.contains("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        "{text}"
    );
    assert_eq!(text.trim().lines().count(), 1, "one line: {text}");
}

/// Names are used as the listing or the disk gives them, on every backend: a dataset prefix with a
/// space, class folders `café` and `x%y`, files `100%.png`, `café.png` and `sub/a b.png`, a hidden
/// `.ipynb_checkpoints/` beside the classes. The job on S3 reads every image and writes its
/// folders under the same names (no `caf%C3%A9/`), and matches the same job on local folders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_reach_every_read_and_write_unchanged_on_s3_and_local_disks() {
    let Some(moto) = moto() else { return };
    create_bucket(moto.port, "names");
    let s3 = bucket(moto.port, "names");
    let env = aws_env(moto.port);
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("my data").join("train");
    for (c, class) in ["café", "x%y"].iter().enumerate() {
        for (i, name) in ["100%.png", "café.png", "sub/a b.png", "n3.png", "n4.png"].iter().enumerate() {
            let path = data.join(class).join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            image::GrayImage::from_fn(28, 28, |x, y| {
                image::Luma([((x * (c as u32 + 2) + y * (i as u32 + 1)) % 256) as u8])
            })
            .save_with_format(&path, image::ImageFormat::Png)
            .unwrap();
        }
    }
    std::fs::create_dir_all(data.join(".ipynb_checkpoints")).unwrap();
    std::fs::write(data.join(".ipynb_checkpoints/x.png"), b"not an image").unwrap();
    for (name, bytes) in files(&data) {
        let key = object_store::path::Path::parse(format!("my data/train/{name}")).unwrap();
        s3.put(&key, PutPayload::from(bytes)).await.unwrap();
    }
    let all = |text: String| text.replace("classes = [\"c0\", \"c1\"]", "classes = \"all\"");

    let local_out = scratch.path().join("local");
    let local_spec = scratch.path().join("local.toml");
    std::fs::write(&local_spec, all(spec(&data.display().to_string(), &local_out.display().to_string(), 2, 2, 3, "")))
        .unwrap();
    run_locally(&local_spec, &[]);
    let local_job = std::fs::read_dir(local_out.join("jobs")).unwrap().next().unwrap().unwrap().path();
    for class in ["café", "x%y"] {
        assert!(local_job.join("dataset").join(class).join("0.png").is_file(), "local dataset/{class}/");
        assert!(local_job.join("modes").join(format!("{class}.npy")).is_file(), "local modes/{class}.npy");
    }

    let s3_spec = scratch.path().join("s3.toml");
    std::fs::write(&s3_spec, all(spec("s3://names/my data/train", "s3://names/out", 2, 2, 3, ""))).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = scratch.path().join("coordinator.log");
    let _coordinator = serve(port, "s3://names/state", &log, &env);
    let job = submit(&url, &s3_spec);
    let _worker = worker(&url, "w0", &scratch.path().join("w0.log"), &env);
    finish(&url, &job, Duration::from_secs(120), &log);
    for key in ["dataset/café/0.png", "dataset/x%y/1.png", "shards/café.json", "modes/x%y.npy"] {
        let key = object_store::path::Path::parse(format!("out/jobs/{job}/{key}")).unwrap();
        assert!(s3.head(&key).await.is_ok(), "`{key}` missing in the bucket");
    }
    let keys: Vec<_> = s3.list(None).try_collect::<Vec<_>>().await.unwrap();
    assert!(
        !keys.iter().any(|m| m.location.as_ref().contains("%C3%A9") || m.location.as_ref().contains("%25")),
        "{keys:?}"
    );
    let marker = get_json(s3.as_ref(), &format!("out/jobs/{job}/shards/café.json")).await;
    assert_eq!(marker["real_images"], 5, "every image read, the nested one included: {marker:#}");
    let ours = download(s3.as_ref(), &format!("out/jobs/{job}/dataset")).await;
    assert!(ours == files(&local_job.join("dataset")), "S3 and local runs differ");
}

/// One coordinator per store on S3 too: a lock object with a heartbeat, takeover after expiry.
#[test]
fn one_coordinator_serves_an_s3_store_at_a_time() {
    let Some(moto) = moto() else { return };
    create_bucket(moto.port, "locked");
    let scratch = tempfile::tempdir().unwrap();
    let _third = check_one_coordinator_per_store("s3://locked/state", scratch.path(), &aws_env(moto.port));
}
