//! The real binaries and the tiny ONNX fixtures as separate processes: three workers, one
//! SIGKILLed mid-shard, the coordinator SIGKILLed and restarted on the same store; the job still
//! completes with every class committed once, byte-identical to a fault-free 1-worker run.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

#[test]
fn killed_worker_and_coordinator_do_not_change_the_result() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let classes = 8;
    dataset(&data, classes, 24);
    let data = data.display().to_string();

    // Fault-free reference: one worker, `coordinator run`.
    let reference = scratch.path().join("reference");
    let reference_spec = scratch.path().join("reference.toml");
    // One class per shard: the faults below need several shards running at once. 500 sampling
    // steps make a class last long enough (~0.5 s here, 50 steps take 0.05 s) that w0 is found
    // holding a lease it has not committed.
    let one = "classes_per_shard = 1";
    let spec = |output: &str| spec(&data, output, classes, 3, 11, one).replace("steps = 50\n", "steps = 500\n");
    std::fs::write(&reference_spec, spec(&reference.display().to_string())).unwrap();
    run_locally(&reference_spec, &[]);

    // Chaos run: 3 workers, SIGKILL one mid-shard, SIGKILL the coordinator and restart it.
    let store = scratch.path().join("store");
    let store_url = store.display().to_string();
    let chaos_spec = scratch.path().join("chaos.toml");
    std::fs::write(&chaos_spec, spec(&store_url)).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = scratch.path().join("coordinator.log");
    let mut coordinator = serve(port, &store_url, &log, &[]);
    let job = submit(&url, &chaos_spec);
    let mut workers: Vec<Killed> =
        (0..3).map(|i| worker(&url, &format!("w{i}"), &scratch.path().join(format!("worker{i}.log")), &[])).collect();
    wait_for("three running shards", Duration::from_secs(60), || {
        status(&url, &job).is_some_and(|s| s["shards"]["running"].as_u64() == Some(3))
    });
    // ... and w0's lease on disk, so that the coordinator killed below has persisted the attempt
    // the killed worker spends (on a loaded machine its flush can lag the status by a second).
    // w0 is frozen before it is killed and its attempt must not have committed by then: a class
    // committed just before the SIGKILL is rightly finished from its marker once the lease
    // expires, and the kill would then test no second attempt. If it had, w0 goes on to its next
    // shard and the test kills it there.
    let job_dir = store.join("jobs").join(&job);
    let mut committed_before_freeze = Vec::new();
    let (killed_shard, killed_attempt) = loop {
        let mut lease = None;
        wait_for("w0's lease persisted", Duration::from_secs(60), || {
            lease = shard_records(&job_dir).iter().enumerate().find_map(|(i, r)| {
                let attempt = r["state"]["attempt_id"].as_str().unwrap_or_default();
                (r["state"]["state"] == "leased"
                    && r["state"]["worker_id"] == "w0"
                    && !committed_before_freeze.iter().any(|a| a == attempt))
                .then(|| (i, attempt.to_owned()))
            });
            lease.is_some()
        });
        let (shard, attempt) = lease.unwrap();
        freeze(&workers[0].0);
        if !committed_by(&job_dir, &attempt) {
            break (shard, attempt);
        }
        committed_before_freeze.push(attempt);
        signal(&workers[0].0, 18);
    };
    workers[0].0.kill().unwrap(); // SIGKILL, mid-shard
    std::thread::sleep(Duration::from_millis(300));
    coordinator.0.kill().unwrap();
    wait_exit(&mut coordinator.0, "the SIGKILLed coordinator", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    let _restarted = serve(port, &store_url, &log, &[]);
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
    let verify = Command::new(bin("coordinator")).args(["verify", &job, "--coordinator", &url]).output().unwrap();
    let text = String::from_utf8_lossy(&verify.stdout);
    // Three images and the modes per class, and its contact sheet unless the worker was killed
    // between the class's commit and its sheet (a note, not a problem).
    let checked: usize = text
        .split(" file(s) checked")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_default();
    assert!(
        verify.status.success()
            && text.contains(&format!("{classes} class(es), "))
            && text.contains("0 problem(s)")
            && (classes * 4..=classes * 5).contains(&checked),
        "{text}"
    );

    // Graceful shutdown of the survivors.
    for w in workers.iter_mut().skip(1) {
        terminate(&w.0);
    }
    for (i, w) in workers.iter_mut().enumerate().skip(1) {
        let status = wait_exit(&mut w.0, "a worker", Duration::from_secs(30));
        let log = std::fs::read_to_string(scratch.path().join(format!("worker{i}.log"))).unwrap_or_default();
        assert!(status.success(), "worker exit {status}: {log}");
    }

    let job_dir = |root: &Path| root.join("jobs").join(&job);
    let chaos_images = files(&job_dir(&store).join("dataset"));
    let reference_images = files(&job_dir(&reference).join("dataset"));
    assert_eq!(chaos_images.len(), classes * 3);
    assert!(chaos_images == reference_images, "PNG bytes differ from the fault-free run");
    assert_eq!(files(&job_dir(&store).join("shards")).len(), classes, "one marker per class");
    assert!(files(&job_dir(&store).join("staging")).is_empty());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job_dir(&store).join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["images"].as_u64(), Some(classes as u64 * 3));
    // The killed worker's shard really was run again: by a second attempt once its lease
    // expired, or by a backup lease before that (both are another attempt's commit).
    let records = shard_records(&job_dir(&store));
    let won = records[killed_shard]["state"]["attempt_id"].as_str().unwrap_or_default();
    assert!(!committed_by(&job_dir(&store), &killed_attempt), "the killed attempt {killed_attempt} committed");
    assert!(
        records[killed_shard]["state"]["state"] == "done" && won != killed_attempt,
        "shard {killed_shard} was not run again after w0's attempt {killed_attempt}: {records:#?}"
    );
}

/// Whether a commit marker under `job_dir/shards` names `attempt`.
fn committed_by(job_dir: &Path, attempt: &str) -> bool {
    files(&job_dir.join("shards"))
        .iter()
        .any(|(_, bytes)| serde_json::from_slice::<serde_json::Value>(bytes).is_ok_and(|m| m["attempt_id"] == attempt))
}

/// The coordinator's log tells a person when a worker goes: one INFO line naming it once it has
/// been silent for three heartbeats (here SIGKILLed), and one when it comes back.
#[test]
fn a_worker_that_goes_silent_is_announced_once_by_name() {
    let scratch = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = scratch.path().join("coordinator.log");
    let _coordinator = serve(port, &scratch.path().join("store").display().to_string(), &log, &[]);
    let mut doomed = worker(&url, "doomed", &scratch.path().join("doomed.log"), &[]);
    let _steady = worker(&url, "steady", &scratch.path().join("steady.log"), &[]);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("both workers to register", Duration::from_secs(60), || read().matches("worker registered").count() == 2);
    doomed.0.kill().unwrap();
    wait_exit(&mut doomed.0, "the SIGKILLed worker", Duration::from_secs(10));
    wait_for("the coordinator to announce the silent worker", Duration::from_secs(10), || {
        read().contains("worker left")
    });
    // Several more heartbeats: still one line, and none for the worker that keeps polling.
    std::thread::sleep(Duration::from_secs(2));
    let text = read();
    let left: Vec<&str> = text.lines().filter(|l| l.contains("worker left")).collect();
    assert_eq!(left.len(), 1, "{text}");
    assert!(left[0].contains("INFO") && left[0].contains("worker=doomed") && left[0].contains("silent"), "{text}");
}

/// A class folder that is missing at submit is refused then, naming it, before any work; one
/// that disappears after submit fails that class at run time, naming it, and the other classes
/// still commit.
#[test]
fn a_missing_class_folder_is_named_at_submit_or_at_run_time() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    dataset(&data, 3, 4);
    let store = scratch.path().join("store").display().to_string();
    let text = spec(&data.display().to_string(), &store, 3, 3, 11, "");
    let spec_path = scratch.path().join("job.toml");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _coordinator = serve(port, &store, &scratch.path().join("coordinator.log"), &[]);
    let submit_wait = || {
        let mut output = None;
        wait_for("submit --wait", Duration::from_secs(120), || {
            let out = Command::new(bin("coordinator"))
                .args(["submit", spec_path.to_str().unwrap(), "--wait", "--coordinator", &url])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            let connected = !stderr.contains("nothing listens at")
                && !stderr.contains("closed the connection mid-call")
                && !stderr.contains("transport error")
                && !stderr.contains("connect error");
            output = Some(out);
            connected
        });
        let out = output.unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };

    std::fs::write(&spec_path, text.replace("\"c2\"", "\"missing_class\"")).unwrap();
    let (ok, text_out) = submit_wait();
    assert!(!ok && text_out.contains("missing_class") && text_out.contains("does not exist"), "{text_out}");
    assert!(!text_out.contains("chaos-"), "nothing was submitted: {text_out}");

    // Submitted with every folder in place; then c2's folder disappears before a worker lists it.
    std::fs::write(&spec_path, &text).unwrap();
    let job = submit(&url, &spec_path);
    std::fs::rename(data.join("c2"), scratch.path().join("moved-away")).unwrap();
    let _worker = Killed(
        Command::new(bin("worker"))
            .args(["--coordinator", &url, "--threads", "1"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the job to end", Duration::from_secs(120), || {
        status(&url, &job).is_some_and(|s| s["state"] != "running")
    });
    let out = Command::new(bin("coordinator")).args(["status", &job, "--coordinator", &url]).output().unwrap();
    let text_out = String::from_utf8_lossy(&out.stdout);
    assert!(text_out.contains("[failed]"), "{text_out}");
    assert!(text_out.contains("c2") && text_out.contains("does not exist"), "{text_out}");
    // The three classes share one shard (the default size): the shard fails, c0 and c1 commit.
    for class in ["c0", "c1"] {
        let folder = std::path::Path::new(&store).join("jobs").join(&job).join("dataset").join(class);
        let images = std::fs::read_dir(&folder).map(|d| d.count()).unwrap_or(0);
        assert_eq!(images, 3, "the other classes still commit: {} holds {images} images\n{text_out}", folder.display());
    }
}

/// Slurm preemption signals the coordinator and its workers at once: a worker must end in bounded
/// time whether its coordinator is gone or hung, idle or in the middle of a shard.
#[test]
fn a_signalled_worker_exits_in_bounded_time_when_its_coordinator_is_gone_or_hung() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    dataset(&data, 6, 8);
    let store = scratch.path().join("store").display().to_string();
    let log = scratch.path().join("coordinator.log");
    let bound = Duration::from_secs(20);

    // Never registered: no coordinator was ever there.
    let mut lonely =
        worker(&format!("http://127.0.0.1:{}", free_port()), "lonely", &scratch.path().join("w0.log"), &[]);
    std::thread::sleep(Duration::from_secs(1));
    terminate(&lonely.0);
    assert!(wait_exit(&mut lonely.0, "a worker that never reached its coordinator", bound).success());

    // Registered and idle, then the coordinator is killed.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut coordinator = serve(port, &store, &log, &[]);
    let idle_log = scratch.path().join("w1.log");
    let mut idle = worker(&url, "idle", &idle_log, &[]);
    wait_for("the idle worker to register", Duration::from_secs(60), || {
        std::fs::read_to_string(&idle_log).unwrap_or_default().contains("registered")
    });
    coordinator.0.kill().unwrap();
    wait_exit(&mut coordinator.0, "the SIGKILLed coordinator", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    terminate(&idle.0);
    let started = std::time::Instant::now();
    assert!(wait_exit(&mut idle.0, "an idle worker whose coordinator is gone", bound).success());
    eprintln!("idle worker, coordinator gone: exited {:?} after SIGTERM", started.elapsed());

    // Running a shard, then the coordinator hangs (SIGSTOP): the shard stops after its batch and
    // the report is given up after a bounded time.
    let coordinator = serve(port, &store, &log, &[]);
    let spec_path = scratch.path().join("job.toml");
    std::fs::write(&spec_path, spec(&data.display().to_string(), &store, 6, 4, 3, "")).unwrap();
    let job = submit(&url, &spec_path);
    let mut busy = worker(&url, "busy", &scratch.path().join("w2.log"), &[]);
    wait_for("a running shard", Duration::from_secs(60), || {
        status(&url, &job).is_some_and(|s| s["shards"]["running"].as_u64() == Some(1))
    });
    signal(&coordinator.0, 19);
    terminate(&busy.0);
    let started = std::time::Instant::now();
    let exit = wait_exit(&mut busy.0, "a busy worker whose coordinator hangs", bound);
    signal(&coordinator.0, 18);
    assert!(exit.success(), "worker exit {exit}");
    eprintln!("busy worker, coordinator hung: exited {:?} after SIGTERM", started.elapsed());
}

/// Once a worker is stopping cleanly, a second Ctrl-C ends it at once (exit 130), while a second
/// SIGTERM — Slurm signals the step while the batch script forwards its own — does not cut the
/// clean stop short. The clean stop is kept long here by a hung coordinator (SIGSTOP): the
/// worker would wait for it to take the lease back, bounded.
#[test]
fn a_second_ctrl_c_stops_a_stopping_worker_at_once_and_a_second_sigterm_does_not() {
    let JobScratch { dir: scratch, spec: spec_path, store, .. } = job_scratch(4, 4, 2, 3, "classes_per_shard = 4");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let coordinator = serve(port, &store, &scratch.path().join("coordinator.log"), &[]);
    let job = submit(&url, &spec_path);
    let log = scratch.path().join("worker.log");
    let mut busy = fake_worker(&url, "busy", "30", &log, &[]);
    wait_for("a running shard", Duration::from_secs(60), || {
        status(&url, &job).is_some_and(|s| s["shards"]["running"].as_u64() == Some(1))
    });
    signal(&coordinator.0, 19);
    signal(&busy.0, 2);
    std::thread::sleep(Duration::from_millis(700));
    terminate(&busy.0);
    std::thread::sleep(Duration::from_millis(700));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(busy.0.try_wait().unwrap().is_none(), "a second SIGTERM ended the clean stop: {text}");
    assert!(text.contains("already stopping cleanly"), "{text}");
    signal(&busy.0, 2);
    let started = std::time::Instant::now();
    let exit = wait_exit(&mut busy.0, "a stopping worker given a second Ctrl-C", Duration::from_secs(3));
    signal(&coordinator.0, 18);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(exit.code(), Some(130), "{text}");
    assert!(text.contains("second Ctrl-C: exiting at once"), "{text}");
    eprintln!("second Ctrl-C: exited {:?} after it", started.elapsed());
}

/// Locations written for other processes are absolute: a coordinator serving a relative store
/// from one folder and a worker started in another agree on where the job's output is.
#[test]
fn a_relative_store_means_the_same_folder_to_every_process() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    dataset(&data, 2, 6);
    let (here, there) = (scratch.path().join("coordinator-dir"), scratch.path().join("worker-dir"));
    std::fs::create_dir_all(&here).unwrap();
    std::fs::create_dir_all(&there).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = std::fs::File::create(scratch.path().join("coordinator.log")).unwrap();
    let _coordinator = Killed(
        Command::new(bin("coordinator"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--store", "out", "--heartbeat-ms", "200"])
            .args(["--allow-path", "/"])
            .current_dir(&here)
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let text = spec(&data.display().to_string(), "unused", 2, 2, 1, "");
    let text: String = text.lines().filter(|l| !l.starts_with("output")).map(|l| format!("{l}\n")).collect();
    let spec_path = scratch.path().join("job.toml");
    std::fs::write(&spec_path, text).unwrap();
    let job = submit(&url, &spec_path);
    let _worker = Killed(
        Command::new(bin("worker"))
            .args(["--coordinator", &url, "--threads", "1"])
            .current_dir(&there)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the job to end", Duration::from_secs(120), || {
        status(&url, &job).is_some_and(|s| s["state"] != "running")
    });
    let end = status(&url, &job).unwrap();
    assert_eq!(end["state"], "succeeded", "{end:#}");
    let output = here.join("out");
    let job_dir = output.join("jobs").join(&job);
    assert_eq!(end["output"].as_str(), Some(job_dir.to_str().unwrap()), "an absolute output");
    assert_eq!(files(&job_dir.join("dataset")).len(), 4);
    assert!(!there.join("out").exists(), "the worker wrote into its own folder");
}

/// One coordinator per store (`file://` here; `s3://` in s3.rs).
#[test]
fn one_coordinator_serves_a_local_store_at_a_time() {
    let scratch = tempfile::tempdir().unwrap();
    let store = format!("file://{}", scratch.path().join("store").display());
    let _third = check_one_coordinator_per_store(&store, scratch.path(), &[]);
}

/// What the models' metadata and input shapes decide is checked at submit (here through the
/// `coordinator check` dry run), every problem at once: labels beyond the DiT's classes and
/// `cfg_channels` beyond its latent channels, named as the job spec spells them.
#[test]
fn settings_that_do_not_fit_the_models_are_refused_before_any_work() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    dataset(&data, 12, 3);
    let text =
        spec(&data.display().to_string(), "out", 12, 2, 1, "").replace("steps = 50", "steps = 50\ncfg_channels = 7");
    let spec_path = scratch.path().join("job.toml");
    std::fs::write(&spec_path, &text).unwrap();
    let out = Command::new(bin("coordinator")).args(["check", spec_path.to_str().unwrap()]).output().unwrap();
    let text_err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text_err}");
    assert!(text_err.contains("`labels`: 2 class label(s) outside the DiT's 10 classes"), "{text_err}");
    assert!(text_err.contains("`c10` → 10") && text_err.contains("`c11` → 11"), "{text_err}");
    assert!(text_err.contains("`sampling.cfg_channels`: 7 exceeds the DiT's 4 latent channels"), "{text_err}");
    // Swapped models are named.
    let swapped =
        spec(&data.display().to_string(), "out", 10, 2, 1, "").replace("tiny_dit.onnx", "tiny_vae_encoder.onnx");
    std::fs::write(&spec_path, swapped).unwrap();
    let out = Command::new(bin("coordinator")).args(["check", spec_path.to_str().unwrap()]).output().unwrap();
    let text_err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text_err.contains("`models.dit`") && text_err.contains("is a vae_encoder model"),
        "{text_err}"
    );
    // DDIM steps the DiT's 1000 timesteps cannot be strided to are refused at check, naming the
    // setting; 250 fits.
    for (steps, fits) in [(400, false), (250, true)] {
        let ddim = spec(&data.display().to_string(), "out", 10, 2, 1, "")
            .replace("steps = 50", &format!("steps = {steps}\nsampler = \"ddim\""));
        std::fs::write(&spec_path, ddim).unwrap();
        let out = Command::new(bin("coordinator")).args(["check", spec_path.to_str().unwrap()]).output().unwrap();
        let text_err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), fits, "DDIM steps {steps}: {text_err}");
        if !fits {
            assert!(text_err.contains("`sampling.steps`") && text_err.contains("ddim400"), "{text_err}");
        }
    }
    // Fitting settings pass.
    let fitting = spec(&data.display().to_string(), "out", 10, 2, 1, "");
    std::fs::write(&spec_path, fitting).unwrap();
    let out = Command::new(bin("coordinator")).args(["check", spec_path.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Whether strace can inject faults here (installed by scripts/setup_test_servers.sh); without it
/// the crash tests are skipped with a note, unless MGD3_REQUIRE_STRACE=1 (CI).
fn strace_available() -> bool {
    let ok = Command::new("strace").args(["-f", "-o", "/dev/null", "true"]).status().is_ok_and(|s| s.success());
    if !ok {
        assert!(std::env::var("MGD3_REQUIRE_STRACE").as_deref() != Ok("1"), "strace is not installed");
        eprintln!("note: skipping a crash test: strace is not installed (scripts/setup_test_servers.sh)");
    }
    ok
}

/// The syscalls that make a local-store write visible (rename of a staged copy, link of a
/// create-only put).
const COMMIT_SYSCALLS: &str = "rename,renameat,renameat2,link,linkat";

/// `program args` under strace, SIGKILLed at its `when`-th commit syscall, stderr to `log`.
fn killed_at(program: &Path, args: &[&str], when: usize, log: &Path) -> Killed {
    let mut command = Command::new("strace");
    command.args(["-f", "-o", "/dev/null", "-e", &format!("trace={COMMIT_SYSCALLS}")]);
    command.args(["-e", &format!("inject={COMMIT_SYSCALLS}:signal=KILL:when={when}")]);
    // The tracee's stdout must not keep the test harness's pipe open should it outlive strace.
    command.stdout(Stdio::null());
    Killed(command.arg(program).args(args).stderr(std::fs::File::create(log).unwrap()).spawn().unwrap())
}

/// Real crashes: a worker SIGKILLed at each rename or link of its commit (staging, marker,
/// publish). After another worker finishes the job, the published tree holds exactly the files
/// the markers list (no `name#N` staging copy, nothing missing), as `coordinator verify` checks.
#[test]
fn a_worker_killed_at_any_write_of_its_commit_leaves_exactly_the_markers_files() {
    if !strace_available() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    dataset(&data, 1, 4);
    let mut kills = 0;
    for when in 1..=7 {
        let store = scratch.path().join(format!("store{when}"));
        let store_url = store.display().to_string();
        let spec_path = scratch.path().join(format!("job{when}.toml"));
        std::fs::write(&spec_path, spec(&data.display().to_string(), &store_url, 1, 2, 1, "")).unwrap();
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let _coordinator = serve(port, &store_url, &scratch.path().join(format!("c{when}.log")), &[]);
        let job = submit(&url, &spec_path);
        let worker_args = ["--coordinator", url.as_str(), "--worker-id", "doomed", "--threads", "1"];
        let mut doomed = killed_at(&bin("worker"), &worker_args, when, &scratch.path().join(format!("w{when}.log")));
        // strace counts syscalls per thread: when the commit's writes spread over several of the
        // runtime's blocking threads, no thread may reach its `when`-th one and the worker
        // finishes unharmed. That case is counted, not waited for.
        let mut killed = false;
        wait_for("the worker under strace to be killed or the job to end", Duration::from_secs(60), || {
            killed = doomed.0.try_wait().unwrap().is_some();
            killed || status(&url, &job).is_some_and(|s| s["state"] != "running")
        });
        if killed {
            kills += 1;
        } else {
            let _ = doomed.0.kill();
            wait_exit(&mut doomed.0, "the worker under strace", Duration::from_secs(10));
        }
        let _rescuer = worker(&url, "rescuer", &scratch.path().join(format!("r{when}.log")), &[]);
        wait_for("the job to end", Duration::from_secs(60), || {
            status(&url, &job).is_some_and(|s| s["state"] != "running")
        });
        assert_eq!(status(&url, &job).unwrap()["state"], "succeeded", "killed at commit write {when}");
        let verify = Command::new(bin("coordinator")).args(["verify", &job, "--coordinator", &url]).output().unwrap();
        let text = String::from_utf8_lossy(&verify.stdout);
        assert!(verify.status.success(), "killed at commit write {when}: {text}");
        let leftovers: Vec<String> = files(&store.join("jobs").join(&job))
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| name.contains('#') && !name.starts_with("staging"))
            .collect();
        assert!(leftovers.is_empty(), "killed at commit write {when}: {leftovers:?}");
    }
    // Most of the seven points must really have been crashes, or the test tests nothing.
    assert!(kills >= 4, "the worker was killed at only {kills} of 7 commit writes");
}

/// Real crashes of submit: the coordinator SIGKILLed at each write (rename or link) from its
/// start through the first submit (its lock, job.json, state.json). Whatever a kill left in the
/// store (a `job.json#N` without job.json, a half-written state), a restarted coordinator
/// accepts the same submit with no manual step and the job runs to success.
#[test]
fn a_coordinator_killed_at_any_write_of_submit_accepts_the_same_submit_once_restarted() {
    if !strace_available() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    dataset(&data, 2, 3);
    let mut during_submit = Vec::new();
    for when in 1..=8 {
        let store = scratch.path().join(format!("store{when}")).display().to_string();
        let spec_path = scratch.path().join(format!("job{when}.toml"));
        std::fs::write(&spec_path, spec(&data.display().to_string(), &store, 2, 1, 1, "")).unwrap();
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let listen = format!("127.0.0.1:{port}");
        let args = ["serve", "--listen", &listen, "--store", &store, "--heartbeat-ms", "200"];
        let args = [&args[..], &["--lock-timeout-s", "2", "--allow-path", "/"]].concat();
        let log = scratch.path().join(format!("doomed{when}.log"));
        let mut doomed = killed_at(&bin("coordinator"), &args, when, &log);
        let mut up = false;
        wait_for("the coordinator under strace to answer or die", Duration::from_secs(30), || {
            up = Command::new(bin("coordinator"))
                .args(["list", "--coordinator", &url])
                .output()
                .unwrap()
                .status
                .success();
            up || doomed.0.try_wait().unwrap().is_some()
        });
        if up {
            let submitted = Command::new(bin("coordinator"))
                .args(["submit", spec_path.to_str().unwrap(), "--coordinator", &url])
                .output()
                .unwrap();
            std::thread::sleep(Duration::from_millis(500));
            if !submitted.status.success() || doomed.0.try_wait().unwrap().is_some() {
                during_submit.push(when);
            }
        }
        // A coordinator that strace did not kill (its writes spread over threads) is killed
        // here: by its parent's pid first, since killing strace alone would let it run on.
        let _ = Command::new("pkill").args(["-KILL", "-P", &doomed.0.id().to_string()]).status();
        let _ = doomed.0.kill();
        wait_exit(&mut doomed.0, "the coordinator under strace", Duration::from_secs(10));
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let _coordinator = serve(port, &store, &scratch.path().join(format!("c{when}.log")), &[]);
        let job = submit(&url, &spec_path);
        let _worker = fake_worker(&url, "w", "0.01", &scratch.path().join(format!("w{when}.log")), &[]);
        wait_for("the job to end", Duration::from_secs(60), || {
            status(&url, &job).is_some_and(|s| s["state"] != "running")
        });
        assert_eq!(status(&url, &job).unwrap()["state"], "succeeded", "killed at write {when}");
        let leftovers: Vec<String> =
            files(Path::new(&store)).into_iter().map(|(name, _)| name).filter(|name| name.contains('#')).collect();
        assert!(leftovers.is_empty(), "killed at write {when}: {leftovers:?}");
    }
    // The kills must really have hit submit's writes, or the test tests nothing.
    eprintln!("note: the kills at writes {during_submit:?} hit the submit");
    assert!(during_submit.len() >= 2, "only kills at writes {during_submit:?} hit the submit");
}

/// `submit --wait` outlives a coordinator crash: while the coordinator is down it says so and
/// keeps waiting; the restarted coordinator recovers the job, the worker re-registers, and the
/// command ends with the job's success (exit 0).
#[test]
fn submit_wait_survives_a_coordinator_restart() {
    let JobScratch { dir: scratch, store, spec: spec_path } = job_scratch(4, 6, 2, 5, "classes_per_shard = 1");
    let log = scratch.path().join("coordinator.log");
    let (mut coordinator, port, url) = serve_logging_leases(&store, &log);
    let _worker = fake_worker(&url, "w0", "1.5", &scratch.path().join("worker.log"), &[]);
    wait_for_coordinator(&url);
    let waiting = Command::new(bin("coordinator"))
        .args(["submit", spec_path.to_str().unwrap(), "--wait", "--coordinator", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("a leased shard", Duration::from_secs(30), || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("lease granted"))
    });
    signal(&coordinator.0, 9);
    let _ = coordinator.0.wait();
    std::thread::sleep(Duration::from_secs(3));
    let _restarted = serve(port, &store, &log, &[]);
    let out = waiting.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("[succeeded]"), "{text}");
    assert!(text.contains(&format!("the coordinator at {url} is not answering")), "{text}");
    // Without a terminal, progress comes as lines a Slurm log keeps; `status --oneline` prints
    // the same line (distill.sbatch logs it).
    assert!(text.contains("[succeeded]: classes 4/4, images 8/8, succeeded in "), "{text}");
    let job = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().trim().to_owned();
    let line =
        Command::new(bin("coordinator")).args(["status", &job, "--oneline", "--coordinator", &url]).output().unwrap();
    let line = String::from_utf8_lossy(&line.stdout);
    assert!(line.starts_with(&format!("job {job} [succeeded]: classes 4/4, images 8/8")), "{line}");
}

/// On a terminal (`script` gives the run a pseudo-terminal), `coordinator run` draws a progress
/// bar and every log line — its own and its workers' — prints above it, never on the bar's line.
#[test]
fn on_a_terminal_log_lines_print_above_the_progress_bar() {
    let script_available = Command::new("script").arg("--version").output().is_ok_and(|o| o.status.success());
    if !script_available {
        eprintln!("note: skipping: script(1) is not installed");
        return;
    }
    let JobScratch { dir: _scratch, spec: spec_path, .. } = job_scratch(4, 4, 2, 3, "classes_per_shard = 1");
    let command = format!(
        "{} run {} --local-workers 1 -- --engine fake --fake-class-seconds 0.4",
        bin("coordinator").display(),
        spec_path.display()
    );
    let out = Command::new("script").args(["-qec", &command, "/dev/null"]).output().unwrap();
    let raw = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{raw}");
    // What stays visible of each line: the text after its last carriage return (the terminal
    // turns each newline into "\r\n").
    let visible: Vec<&str> = raw
        .split('\n')
        .map(|line| line.trim_end_matches('\r'))
        .map(|line| line.rsplit('\r').next().unwrap_or(line))
        .collect();
    assert!(raw.contains("/8 images"), "no progress bar was drawn: {raw}");
    let logged: Vec<&&str> = visible.iter().filter(|line| line.contains("class committed")).collect();
    assert_eq!(logged.len(), 4, "{raw}");
    for line in logged {
        assert!(!line.contains("/8 images"), "a log line shares its line with the bar: {line:?}");
    }
    assert!(visible.iter().any(|line| line.contains("[succeeded]")), "{raw}");
}

/// A worker whose coordinator dies while it runs a shard finishes the shard, cannot report it,
/// and gives up after `--give-up-after-s` like a worker that cannot poll: exit 1, naming the
/// URL. (It used to retry the report for ever, holding its GPU, and a `coordinator run` killed
/// outright left such workers behind.)
#[test]
fn a_worker_whose_coordinator_dies_mid_shard_gives_up() {
    let JobScratch { dir: scratch, store, spec: spec_path } = job_scratch(2, 6, 2, 5, "classes_per_shard = 2");
    let log = scratch.path().join("coordinator.log");
    let (mut coordinator, _, url) = serve_logging_leases(&store, &log);
    let worker_log = scratch.path().join("worker.log");
    let mut busy = fake_worker(&url, "w0", "2", &worker_log, &["--give-up-after-s", "3"]);
    submit(&url, &spec_path);
    wait_for("a leased shard", Duration::from_secs(30), || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("lease granted"))
    });
    signal(&coordinator.0, 9);
    let _ = coordinator.0.wait();
    // The shard's 4 s, then 3 s of failed reports; generously bounded.
    let exit = wait_exit(&mut busy.0, "a worker whose coordinator died mid-shard", Duration::from_secs(60));
    let text = std::fs::read_to_string(&worker_log).unwrap();
    assert_eq!(exit.code(), Some(1), "{text}");
    assert!(text.contains("could not report the shard"), "the shard was still running at the kill: {text}");
    assert!(
        text.contains(&format!("the coordinator at {url} has not answered")) && text.contains("giving up"),
        "{text}"
    );
    // What to do, in words, not a transport error's debug dump.
    assert!(text.contains("--coordinator (or MGD3_COORDINATOR)") && !text.contains("tonic::"), "{text}");
}

/// A worker pointed at its coordinator with the wrong scheme (`https://` to a plain server) says
/// so and which URL to use, and stops at once: no retry can help.
#[test]
fn a_worker_given_the_wrong_scheme_stops_at_once_naming_the_right_url() {
    let scratch = tempfile::tempdir().unwrap();
    let store = scratch.path().join("store").display().to_string();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _coordinator = serve(port, &store, &scratch.path().join("coordinator.log"), &[]);
    wait_for_coordinator(&url);
    let log = scratch.path().join("worker.log");
    let wrong = format!("https://127.0.0.1:{port}");
    let mut worker = Killed(
        Command::new(bin("worker"))
            .args(["--coordinator", &wrong, "--engine", "fake"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let exit = wait_exit(&mut worker.0, "a worker given https:// for a plain coordinator", Duration::from_secs(20));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(exit.code(), Some(1), "{text}");
    assert!(text.contains("does not speak TLS") && text.contains(&format!("use {url}")), "{text}");
    assert!(!text.contains("tonic::"), "{text}");
}

/// A model this worker's ONNX Runtime cannot load (here: a newer ONNX IR version than it reads)
/// excludes the worker from the job without spending the shard's attempts, and `coordinator run`,
/// whose local workers are all it has, stops at once with exit 3 and the worker's reason instead
/// of waiting for a worker that never comes.
#[test]
fn run_stops_at_once_when_its_workers_cannot_load_the_models() {
    let JobScratch { dir: scratch, spec: spec_path, .. } = job_scratch(2, 3, 1, 1, "");
    let bytes = std::fs::read(fixtures().join("tiny_dit.onnx")).unwrap();
    // ModelProto.ir_version: field 1, a varint, first in every file torch.onnx writes.
    assert_eq!((bytes[0], bytes[1] & 0x80), (0x08, 0), "a one-byte ir_version first");
    let newer = scratch.path().join("newer_dit.onnx");
    std::fs::write(&newer, [&[0x08, 99][..], &bytes[2..]].concat()).unwrap();
    let text = std::fs::read_to_string(&spec_path).unwrap();
    let dit = fixtures().join("tiny_dit.onnx").display().to_string();
    std::fs::write(&spec_path, text.replace(&dit, &newer.display().to_string())).unwrap();
    let run_store = scratch.path().join("run").display().to_string();
    let started = std::time::Instant::now();
    let out = Command::new(bin("coordinator"))
        .args(["run", spec_path.to_str().unwrap(), "--local-workers", "1", "--store", &run_store, "--no-report"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("newer_dit.onnx` is ONNX IR version 99") && text.contains("up to IR version"), "{text}");
    assert!(!text.contains("will be retried"), "no attempt is spent on it: {text}");
    // ONNX Runtime's "Could not write a profile" after a failed load is no second fault.
    assert!(!text.contains("ERROR ort::logging"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(60), "it stops at once, not after 120 s: {text}");
}

/// Workers a job excluded (here: its DiT was not on their disk) get another try when the same
/// command runs again after the fix, as the refusal tells: the job (same spec, same id, the
/// DiT pinned by its fingerprint) remembered its exclusions and refused at once again.
#[test]
fn running_the_same_command_again_after_the_fix_gives_excluded_workers_another_try() {
    let JobScratch { dir: scratch, spec: spec_path, .. } = job_scratch(2, 3, 1, 1, "");
    let fixture = fixtures().join("tiny_dit.onnx");
    let fingerprint = mgd3_common::fingerprint_file(&fixture).unwrap();
    let late = scratch.path().join("late").join("dit.onnx");
    let text = std::fs::read_to_string(&spec_path)
        .unwrap()
        .replace(&fixture.display().to_string(), &late.display().to_string());
    std::fs::write(&spec_path, format!("{text}dit_fingerprint = \"{fingerprint}\"\n")).unwrap();
    let run_store = scratch.path().join("run").display().to_string();
    let run = || {
        Command::new(bin("coordinator"))
            .args(["run", spec_path.to_str().unwrap(), "--local-workers", "2", "--store", &run_store, "--no-report"])
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    let out = run();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("run the same command again"), "{text}");
    // Both local workers share the reason: said once, naming both, and logged once.
    assert!(text.contains("local-0, local-1: ") || text.contains("local-1, local-0: "), "{text}");
    assert_eq!(text.matches("worker excluded from the job").count(), 2, "{text}");
    assert!(text.contains("worker excluded from the job, for the reason local-"), "{text}");
    std::fs::create_dir_all(late.parent().unwrap()).unwrap();
    std::fs::copy(&fixture, &late).unwrap();
    let out = run();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("had excluded 2 worker(s); submitted again, they may try it again"), "{text}");
}

/// A dataset problem found at submit (after `run` opened the store and its workers registered)
/// refuses the spec with exit 2 and leaves no folder `run` made for the store behind; a folder
/// that holds anything else stays.
#[test]
fn run_refused_at_submit_removes_the_store_folder_it_made() {
    let JobScratch { dir: scratch, spec: spec_path, .. } = job_scratch(2, 3, 1, 1, "");
    let text = std::fs::read_to_string(&spec_path).unwrap();
    std::fs::write(&spec_path, text.replace("classes = [\"c0\", \"c1\"]", "classes = [\"c0\", \"c1\", \"zz\"]"))
        .unwrap();
    let made = scratch.path().join("made");
    let run = |store: &Path| {
        Command::new(bin("coordinator"))
            .args(["run", spec_path.to_str().unwrap(), "--local-workers", "1", "--no-report"])
            .args(["--store", store.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = run(&made.join("twice").join("out"));
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("class `zz`") && text.contains("does not exist"), "{text}");
    assert!(!made.exists(), "the folders run made are gone: {text}");
    std::fs::create_dir_all(made.join("keep")).unwrap();
    let out = run(&made.join("out"));
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(made.join("keep").exists() && !made.join("out").exists());
}

/// A GPU asked of a CPU-only ONNX Runtime: the worker says so in one sentence naming the fix and
/// exits before it registers (no lease it cannot run, no silent CPU fallback); `coordinator run`
/// on that GPU stops at once with exit 3 and the worker's reason instead of waiting for ever.
#[test]
fn a_device_the_worker_cannot_use_stops_it_before_it_registers() {
    let JobScratch { dir: scratch, store, spec: spec_path } = job_scratch(2, 3, 1, 1, "");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = scratch.path().join("coordinator.log");
    let _coordinator = serve(port, &store, &log, &[]);
    wait_for_coordinator(&url);
    let out = Command::new(bin("worker")).args(["--coordinator", &url, "--device", "cuda:0"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("cannot use cuda:0") && text.contains("never falls back to the CPU"), "{text}");
    if !Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ort/gpu").exists() {
        assert!(text.contains("CPU build") && text.contains("scripts/setup_ort.sh gpu"), "{text}");
    }
    let served = std::fs::read_to_string(&log).unwrap();
    assert!(!served.contains("worker registered"), "it must not register: {served}");

    let run_store = scratch.path().join("run").display().to_string();
    let started = std::time::Instant::now();
    let out = Command::new(bin("coordinator"))
        .args(["run", spec_path.to_str().unwrap(), "--devices", "0", "--store", &run_store, "--no-report"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{text}");
    for part in ["no worker can run it", "local-0 exited", "cannot use cuda:0", "run the same command again"] {
        assert!(text.contains(part), "{part}: {text}");
    }
    assert!(started.elapsed() < Duration::from_secs(60), "it stops at once, not after a grace: {text}");
    assert!(text.contains("(not submitted)") && !text.contains("job submitted"), "no worker, no job: {text}");
    let jobs = Path::new(&run_store).join("jobs");
    assert!(std::fs::read_dir(&jobs).map_or(true, |mut d| d.next().is_none()), "a job was left in {}", jobs.display());
    // The store is free again: the next run on it takes no one's lock over.
    let out = Command::new(bin("coordinator"))
        .args(["run", spec_path.to_str().unwrap(), "--local-workers", "1", "--store", &run_store, "--no-report"])
        .arg("--worker-arg=--threads=1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !text.contains("taking over"), "{text}");
}

/// Find the job, and two jobs on one store: while `coordinator run` runs (on a random loopback
/// port), `list`, `status` and `verify` on the same host find it with no flag; a second
/// `coordinator run` on the same store stops with exit 2, naming the URL to submit to instead and
/// the variable for the sbatch script.
#[test]
fn a_running_coordinator_run_is_found_and_a_second_one_on_its_store_is_told_where_it_is() {
    let JobScratch { dir: scratch, store, spec: spec_path } = job_scratch(4, 3, 1, 1, "classes_per_shard = 1");
    let runtime = scratch.path().join("runtime");
    std::fs::create_dir_all(&runtime).unwrap();
    let cli = |args: &[&str]| {
        Command::new(bin("coordinator"))
            .args(args)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env_remove("MGD3_COORDINATOR")
            .output()
            .unwrap()
    };
    let log = scratch.path().join("run.log");
    let mut run = Killed(
        Command::new(bin("coordinator"))
            .args(["run", spec_path.to_str().unwrap(), "--no-report", "--"])
            .args(["--engine", "fake", "--fake-class-seconds", "5"])
            .env("XDG_RUNTIME_DIR", &runtime)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut job = String::new();
    wait_for("list to find the running `coordinator run`", Duration::from_secs(60), || {
        let out = cli(&["list"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        job = text.split_whitespace().find(|w| w.starts_with("chaos-")).unwrap_or_default().to_owned();
        out.status.success() && !job.is_empty()
    });
    let status = cli(&["status", &job]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(String::from_utf8_lossy(&status.stdout).contains("[running]"));
    let verify = cli(&["verify", &job]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));

    let other = scratch.path().join("other.toml");
    let data = scratch.path().join("data").display().to_string();
    std::fs::write(&other, spec(&data, &store, 4, 3, 2, "classes_per_shard = 1")).unwrap();
    let second = cli(&["run", other.to_str().unwrap(), "--no-report", "--", "--engine", "fake"]);
    let text = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{text}");
    for part in
        ["is served by another coordinator", "that stops once its own job has ended", "run this command again after it"]
    {
        assert!(text.contains(part), "{part}: {text}");
    }
    // Another store, the same job's output: refused too (exit 2), naming the coordinator that
    // runs it, instead of distilling it a second time.
    let elsewhere = scratch.path().join("other-store").display().to_string();
    let third =
        cli(&["run", spec_path.to_str().unwrap(), "--store", &elsewhere, "--no-report", "--", "--engine", "fake"]);
    let text = String::from_utf8_lossy(&third.stderr);
    assert_eq!(third.status.code(), Some(2), "{text}");
    assert!(text.contains("is being distilled by another coordinator") && text.contains(&store), "{text}");
    let exit = wait_exit(&mut run.0, "the first coordinator run", Duration::from_secs(120));
    assert!(exit.success(), "{}", std::fs::read_to_string(&log).unwrap());
    assert!(std::fs::read_dir(runtime.join("mgd3")).unwrap().next().is_none(), "the announcement goes with it");
    // Two other coordinators on this host (live processes: this test's and its parent's) serve
    // other stores (nothing listens at their URLs). Asked about the job without a coordinator
    // named, verify says how to verify the job's folder instead.
    for (pid, port) in [(std::process::id(), 1), (std::os::unix::process::parent_id(), 2)] {
        let announcement = serde_json::json!({
            "url": format!("http://127.0.0.1:{port}"), "store": "/elsewhere", "pid": pid, "started_unix_ms": port,
        });
        std::fs::write(runtime.join("mgd3").join(format!("coordinator-{pid}.json")), announcement.to_string()).unwrap();
    }
    let unknown = cli(&["verify", &job]);
    let text = String::from_utf8_lossy(&unknown.stderr);
    assert!(!unknown.status.success() && text.contains("--job-dir <output>/jobs/"), "{text}");
    // With the job's own coordinator gone, verify reads the job's folder offline, asking no
    // coordinator (it named the newest one found on the host, serving another store).
    let job_dir = format!("{store}/jobs/{job}");
    let offline = cli(&["verify", &job, "--job-dir", &job_dir]);
    let text = String::from_utf8_lossy(&offline.stdout);
    assert!(
        offline.status.success()
            && text.contains("succeeded (manifest.json), 4 class(es), 8 file(s) checked, 0 problem(s)"),
        "{text}"
    );
    let said = String::from_utf8_lossy(&offline.stderr);
    assert!(!said.contains("coordinator"), "verify --job-dir spoke of a coordinator: {said}");
    // Someone's file in a class folder and nothing else wrong: moved by hand, not resumed.
    let class = std::fs::read_dir(format!("{job_dir}/dataset")).unwrap().next().unwrap().unwrap().path();
    std::fs::write(class.join("notes.txt"), b"mine").unwrap();
    let offline = cli(&["verify", &job, "--job-dir", &job_dir]);
    let said = String::from_utf8_lossy(&offline.stderr);
    assert!(!offline.status.success() && said.contains("move them out of its folder by hand"), "{said}");
    assert!(!said.contains("repairs it"), "{said}");
    std::fs::remove_file(class.join("notes.txt")).unwrap();
    // An image changed in place (same size): offline, verify names it and says which coordinator
    // repairs it and how to start one; doing as it says puts the same bytes back.
    let class = std::fs::read_dir(format!("{job_dir}/dataset")).unwrap().next().unwrap().unwrap().path();
    let image = class.join("0.png");
    let original = std::fs::read(&image).unwrap();
    let mut damaged = original.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    std::fs::write(&image, &damaged).unwrap();
    let offline = cli(&["verify", &job, "--job-dir", &job_dir]);
    let said = String::from_utf8_lossy(&offline.stderr);
    assert!(!offline.status.success() && String::from_utf8_lossy(&offline.stdout).contains("0.png"), "{said}");
    for part in
        [format!("`coordinator serve --store {store}`"), format!("`coordinator resume {job} --coordinator <its URL>`")]
    {
        assert!(said.contains(&part), "`{part}` missing: {said}");
    }
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _server = serve(port, &store, &scratch.path().join("repair.log"), &[]);
    wait_for_coordinator(&url);
    let _worker = fake_worker(&url, "repairer", "0.1", &scratch.path().join("repairer.log"), &[]);
    let resumed = cli(&["resume", &job, "--coordinator", &url]);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    wait_for("the damaged image to be distilled again", Duration::from_secs(60), || {
        std::fs::read(&image).is_ok_and(|bytes| bytes == original)
            && cli(&["verify", &job, "--job-dir", &job_dir]).status.success()
    });
}

/// A loopback listener answering every connection as `how`: `None` closes at once, `Some(b"")`
/// reads then closes, other bytes are read then answered. Returns its URL.
fn raw_listener(how: Option<&'static [u8]>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut socket in listener.incoming().map_while(Result::ok) {
            // Each connection on its own thread: one that sends nothing (a client's idle
            // reconnect) must not hold up the next one, the CLI's probe.
            std::thread::spawn(move || {
                if let Some(answer) = how {
                    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let _ = socket.read(&mut [0u8; 4096]);
                    let _ = socket.write_all(answer);
                }
            });
        }
    });
    url
}

/// The CLI says what really happened to a call, the worker the same: a listener that closes at
/// once or after reading is a coordinator that closed the connection mid-call (try again),
/// nothing listening is said as such, an HTTP/1.1 answer is another service on the port; none
/// of them gets TLS advice. A worker stops at once at an HTTP/1.1 service, naming it.
#[test]
fn connection_failures_are_told_as_what_they_are() {
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let http = raw_listener(Some(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"));
    let cases = [
        (raw_listener(None), "closed the connection mid-call"),
        (raw_listener(Some(b"")), "closed the connection mid-call"),
        (http.clone(), "answers HTTP/1.1"),
        (nobody, "nothing listens at"),
    ];
    for (url, words) in &cases {
        for args in [&["list"][..], &["status", "j"], &["resume", "j"], &["cancel", "j"]] {
            let out = Command::new(bin("coordinator")).args(args).args(["--coordinator", url]).output().unwrap();
            let text = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} at {url}");
            assert!(text.contains(words) && !text.contains("TLS"), "{args:?} at {url}: {text}");
            // With nothing to ask, a job's status points at its output folder, which answers offline.
            if args[0] == "status" && *words == "nothing listens at" {
                assert!(text.contains("coordinator verify j --job-dir <output>/jobs/j"), "{text}");
            }
        }
    }
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("worker.log");
    let mut worker = fake_worker(&http, "w", "0.01", &log, &[]);
    let exit = wait_exit(&mut worker.0, "a worker pointed at an HTTP/1.1 service", Duration::from_secs(20));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(exit.code(), Some(1), "{text}");
    assert!(text.contains("answers HTTP/1.1") && text.contains("not an mgd3 coordinator"), "{text}");
}

/// A `coordinator run` killed outright (SIGKILL, the OOM killer) takes its local workers with it:
/// the kernel sends them SIGTERM when their parent dies, and they stop instead of outliving it
/// until their give-up time (10 minutes by default), holding GPUs.
#[test]
fn local_workers_stop_when_their_coordinator_run_is_killed() {
    let JobScratch { dir: scratch, spec: spec_path, .. } = job_scratch(4, 4, 2, 3, "classes_per_shard = 1");
    let log = scratch.path().join("run.log");
    let mut run = Killed(
        Command::new(bin("coordinator"))
            .args(["run", spec_path.to_str().unwrap(), "--local-workers", "2", "--"])
            .args(["--engine", "fake", "--fake-class-seconds", "30"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("both workers to register", Duration::from_secs(60), || {
        std::fs::read_to_string(&log).unwrap_or_default().matches("worker registered").count() == 2
    });
    let children = |pid: u32| -> Vec<u32> {
        let out = Command::new("pgrep").args(["-P", &pid.to_string()]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
    };
    let workers = children(run.0.id());
    assert_eq!(workers.len(), 2, "{workers:?}");
    signal(&run.0, 9);
    let _ = run.0.wait();
    wait_for("the orphaned workers to stop", Duration::from_secs(30), || {
        workers.iter().all(|pid| {
            // Gone, or a zombie waiting for init to reap it.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |stat| stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
        })
    });
}

/// `submit --wait` stopped by a signal stops the waiting, not the job: it says so and how to
/// watch or stop the job, and exits 128 + the signal (130 after Ctrl-C, 143 after SIGTERM).
#[test]
fn a_signal_stops_submit_wait_not_the_job() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    dataset(&data, 2, 4);
    let store = scratch.path().join("store").display().to_string();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let _coordinator = serve(port, &store, &scratch.path().join("coordinator.log"), &[]);
    wait_for_coordinator(&url);
    for (seed, number, code, said) in [(1, 15, 143, "stopped by SIGTERM"), (2, 2, 130, "interrupted")] {
        let spec_path = scratch.path().join(format!("job{seed}.toml"));
        std::fs::write(&spec_path, spec(&data.display().to_string(), &store, 2, 2, seed, "")).unwrap();
        let mut waiting = Killed(
            Command::new(bin("coordinator"))
                .args(["submit", spec_path.to_str().unwrap(), "--wait", "--coordinator", &url])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        // No worker: the job waits; once its id is printed, the command is waiting.
        let mut job = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(waiting.0.stdout.take().unwrap()), &mut job).unwrap();
        let job = job.trim().to_owned();
        std::thread::sleep(Duration::from_millis(300));
        signal(&waiting.0, number);
        let exit = wait_exit(&mut waiting.0, "submit --wait after a signal", Duration::from_secs(10));
        let mut text = String::new();
        std::io::Read::read_to_string(waiting.0.stderr.as_mut().unwrap(), &mut text).unwrap();
        assert_eq!(exit.code(), Some(code), "{text}");
        assert!(text.contains(&format!("{said}; the job goes on: `coordinator status {job}`")), "{text}");
        let state = status(&url, &job).unwrap();
        assert_eq!(state["state"], "running", "the job goes on: {state}");
    }
}

/// A coordinator restarted in the middle of a long shard (36 s here; minutes on a GPU): the
/// worker registers again at once — its registration never waits for the shard, which holds the
/// engine — and goes on renewing its lease, so the lease is not given away; it answers SIGTERM
/// within its stop grace mid-shard, and the job then completes with each class committed once.
#[test]
fn a_coordinator_restarted_mid_shard_finds_the_worker_renewing_and_stoppable() {
    let JobScratch { dir: scratch, store, spec: spec_path } = job_scratch(3, 4, 2, 5, "classes_per_shard = 3");
    let log = scratch.path().join("coordinator.log");
    let (mut coordinator, port, url) = serve_logging_leases(&store, &log);
    let worker_log = scratch.path().join("worker.log");
    let mut slow = fake_worker(&url, "slow", "12", &worker_log, &[]);
    let job = submit(&url, &spec_path);
    // The lease is in the shard's state record (the coordinator writes it within ~100 ms of the
    // grant), so the restarted coordinator knows the lease the worker renews.
    let folder = Path::new(&store).join("jobs").join(&job);
    wait_for("the lease recorded in the shard's state record", Duration::from_secs(30), || {
        shard_records(&folder).iter().any(|record| record.to_string().contains("\"leased\""))
    });
    signal(&coordinator.0, 9);
    let _ = coordinator.0.wait();
    std::thread::sleep(Duration::from_secs(1));
    let restarted_log = scratch.path().join("restarted.log");
    let _restarted =
        serve(port, &store, &restarted_log, &[("RUST_LOG", "info,mgd3_coordinator::service=debug".into())]);
    let registered = |text: &str| text.matches("registered").count();
    wait_for("the worker registering again mid-shard", Duration::from_secs(15), || {
        std::fs::read_to_string(&worker_log).is_ok_and(|text| registered(&text) >= 2)
    });
    // Three lease periods (the spec's lease_timeout_s is 5): the lease is renewed, never expired
    // and never granted again.
    std::thread::sleep(Duration::from_secs(15));
    let now = status(&url, &job).expect("the restarted coordinator answers");
    assert_eq!(now["shards"]["running"], 1, "{now}");
    assert!(now["failures"].as_array().unwrap().is_empty(), "the lease expired: {now}");
    let restarted = std::fs::read_to_string(&restarted_log).unwrap();
    assert!(!restarted.contains("lease granted"), "the shard was leased again: {restarted}");
    // SIGTERM mid-shard: the worker stops within its stop grace.
    terminate(&slow.0);
    let exit = wait_exit(&mut slow.0, "a worker stopped mid-shard", Duration::from_secs(20));
    let text = std::fs::read_to_string(&worker_log).unwrap();
    assert!(exit.success(), "{text}");
    // It said so on its way out: the coordinator logs it as stopping, never as silent (died or
    // cut off) three heartbeats later.
    let stopping = |text: &str| text.lines().any(|l| l.contains("it is stopping") && l.contains("slow"));
    wait_for("the coordinator to log the worker stopping", Duration::from_secs(10), || {
        std::fs::read_to_string(&restarted_log).is_ok_and(|text| stopping(&text))
    });
    let _fast = fake_worker(&url, "fast", "0.1", &scratch.path().join("fast.log"), &[]);
    wait_for("the job to succeed", Duration::from_secs(60), || {
        status(&url, &job).is_some_and(|s| s["state"] == "succeeded")
    });
    let markers = std::fs::read_dir(Path::new(&store).join("jobs").join(&job).join("shards")).unwrap().count();
    assert_eq!(markers, 3);
    let restarted = std::fs::read_to_string(&restarted_log).unwrap();
    let silent = restarted.lines().filter(|l| l.contains("silent for three heartbeats") && l.contains("slow"));
    assert_eq!(silent.count(), 0, "{restarted}");
    let done = status(&url, &job).unwrap();
    assert_eq!(
        (done["images"]["done"].as_u64(), done["failures"].as_array().map(Vec::len)),
        (Some(6), Some(0)),
        "{done}"
    );
}

/// The first-day corrupt JPEG, as a user meets it with `coordinator run`: the class fails; once
/// the file is removed, running again refuses (exit 2) naming the class and the flag; with
/// `--accept-data-changes` exactly that class is distilled and every other commit is kept.
/// Re-copying the dataset to the same place without its modification times changes nothing.
#[test]
fn a_corrupt_image_removed_mid_job_redistils_only_its_class_once_accepted() {
    let scratch = job_scratch(3, 4, 2, 5, "classes_per_shard = 1");
    let data = scratch.dir.path().join("data");
    let bad = data.join("c1/zz_cut.jpg");
    std::fs::write(&bad, [0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F']).unwrap();
    let run = |extra: &[&str]| {
        let accept = extra.contains(&"MGD3_ACCEPT_DATA_CHANGES=1");
        let out = Command::new(bin("coordinator"))
            .args(["run", scratch.spec.to_str().unwrap(), "--local-workers", "1", "--worker-arg=--threads=1"])
            .args(extra.iter().filter(|a| !a.contains('=')))
            .env("MGD3_ACCEPT_DATA_CHANGES", if accept { "1" } else { "0" })
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, text) = run(&[]);
    assert_eq!(code, Some(1), "the job fails on the cut JPEG:\n{text}");
    assert!(
        text.contains("zz_cut.jpg") && text.contains("then run the same command again with --accept-data-changes"),
        "{text}"
    );
    let jobs = Path::new(&scratch.store).join("jobs");
    let job = std::fs::read_dir(&jobs).unwrap().next().unwrap().unwrap().file_name().into_string().unwrap();
    let marker = |class: &str| -> Option<serde_json::Value> {
        let path = jobs.join(&job).join("shards").join(format!("{class}.json"));
        std::fs::read(path).ok().map(|bytes| serde_json::from_slice(&bytes).unwrap())
    };
    let (c0, c2) = (marker("c0").expect("c0 committed"), marker("c2").expect("c2 committed"));
    assert!(marker("c1").is_none());

    std::fs::remove_file(&bad).unwrap();
    // `check` with the store says the refusal `run` gives, with the same exit status.
    let check = || {
        let out = Command::new(bin("coordinator"))
            .args(["check", scratch.spec.to_str().unwrap(), "--store", &scratch.store])
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text)
    };
    let (code, text) = check();
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("the data of 1 class(es) changed since the job recorded it: `c1` (5 images"), "{text}");
    let (code, text) = run(&[]);
    assert_eq!(code, Some(2), "refused before anything ran:\n{text}");
    assert!(
        text.contains("the data of 1 class(es) changed since the job recorded it: `c1` (5 images")
            && text.contains("4 images")
            && text.contains("--accept-data-changes"),
        "{text}"
    );
    // As a shell or distill.sbatch user says it: the variable, set to 1.
    let (code, text) = run(&["MGD3_ACCEPT_DATA_CHANGES=1"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("taking over"), "the refused run released the store: {text}");
    assert!(text.contains("the data of 1 class(es) changed and is distilled again"), "{text}");
    assert_eq!((marker("c0").unwrap(), marker("c2").unwrap()), (c0.clone(), c2.clone()), "other commits kept");
    assert_eq!(marker("c1").expect("c1 committed")["data"]["images"], 4);
    let (code, text) = check();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("data:    job `{job}` is known to the store (3 of 3 classes committed)")), "{text}");
    // The job's report keeps what happened before the accepted resume.
    let report = std::fs::read_to_string(jobs.join(&job).join("report/index.html")).unwrap();
    assert!(report.contains("before resume") && report.contains("before a resume: ") && report.contains("zz_cut.jpg"));
    assert!(!report.contains("Every shard succeeded at its first attempt"));

    // Staged again to the same place by a copy that keeps no modification times.
    std::thread::sleep(Duration::from_millis(20));
    let staged = scratch.dir.path().join("staged");
    std::fs::rename(&data, &staged).unwrap();
    for class in ["c0", "c1", "c2"] {
        std::fs::create_dir_all(data.join(class)).unwrap();
        for entry in std::fs::read_dir(staged.join(class)).unwrap() {
            let entry = entry.unwrap();
            std::fs::write(data.join(class).join(entry.file_name()), std::fs::read(entry.path()).unwrap()).unwrap();
        }
    }
    let c1 = marker("c1").unwrap();
    let (code, text) = run(&[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("job {job} ")), "the same job: {text}");
    assert_eq!((marker("c0").unwrap(), marker("c1").unwrap(), marker("c2").unwrap()), (c0, c1, c2));
}

/// A coordinator frozen for longer than its lease timeout (SIGSTOP: a stopped process, a paused
/// VM) gives its leases and workers that time back when it runs again, instead of expiring the
/// leases its workers could not renew meanwhile: the job succeeds with no attempt spent.
#[test]
fn a_coordinator_frozen_past_its_lease_timeout_spends_no_attempt_of_its_workers() {
    let JobScratch { dir, store, spec } = job_scratch(4, 3, 2, 1, "classes_per_shard = 1");
    let log = dir.path().join("serve.log");
    let (server, _port, url) = serve_logging_leases(&store, &log);
    wait_for_coordinator(&url);
    let job = submit(&url, &spec);
    let _worker = fake_worker(&url, "w0", "3", &dir.path().join("worker.log"), &[]);
    wait_for("a running shard", Duration::from_secs(60), || {
        status(&url, &job).is_some_and(|s| s["shards"]["running"].as_u64() == Some(1))
    });
    freeze(&server.0);
    std::thread::sleep(Duration::from_secs(8)); // the spec's leases last 5 s
    signal(&server.0, 18);
    wait_for("the job to finish", Duration::from_secs(120), || {
        status(&url, &job).is_some_and(|s| s["state"] != "running")
    });
    let text = std::fs::read_to_string(&log).unwrap();
    let final_status = status(&url, &job).unwrap();
    assert_eq!(final_status["state"], "succeeded", "{final_status:#}\n{text}");
    assert!(text.contains("did not run for") && !text.contains("lease expired"), "{text}");
    for record in shard_records(&Path::new(&store).join("jobs").join(&job)) {
        assert_eq!(record["attempts"], 1, "{record:#}\n{text}");
    }
}

/// `coordinator run` runs its own job: an unfinished job of another spec in the same store (a
/// sweep's variants dropped from its spec ran to the end first, ahead of the new ones) is named
/// in a note and left as it was, for whoever runs it.
#[test]
fn coordinator_run_runs_its_own_job_and_names_the_unfinished_ones_it_leaves() {
    let JobScratch { dir: scratch, store, spec: first_spec } = job_scratch(4, 3, 1, 1, "classes_per_shard = 1");
    let log = scratch.path().join("first.log");
    let mut first = Killed(
        Command::new(bin("coordinator"))
            .args(["run", first_spec.to_str().unwrap(), "--no-report", "--"])
            .args(["--engine", "fake", "--fake-class-seconds", "30"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let jobs = Path::new(&store).join("jobs");
    let mut job = String::new();
    wait_for("the first job to be submitted", Duration::from_secs(60), || {
        job = std::fs::read_dir(&jobs)
            .ok()
            .and_then(|mut entries| entries.next())
            .and_then(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .unwrap_or_default();
        !job.is_empty() && jobs.join(&job).join("job.json").exists()
    });
    // Killed outright: its job stays unfinished in the store.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let second_spec = scratch.path().join("second.toml");
    let data = scratch.path().join("data").display().to_string();
    std::fs::write(&second_spec, spec(&data, &store, 4, 1, 2, "classes_per_shard = 1")).unwrap();
    let out = Command::new(bin("coordinator"))
        .args(["run", second_spec.to_str().unwrap(), "--no-report", "--", "--engine", "fake"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("note: 1 other unfinished job(s) in this store are not run by this `coordinator run`")
            && text.contains(&job),
        "{text}"
    );
    // Nothing of the first job was distilled by the second run.
    let markers = std::fs::read_dir(jobs.join(&job).join("shards")).map_or(0, |d| d.count());
    assert!(markers < 4, "the other job was run to its end ({markers} markers)");
    assert!(!jobs.join(&job).join("manifest.json").exists(), "the other job was finished");
}
