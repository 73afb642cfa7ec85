//! scripts/slurm/distill.sbatch on a real Slurm (scripts/slurm/local_cluster.sh: slurmctld, two
//! slurmd nodes with fake GPUs, munge), requeued in both orders a preemption can come in:
//!
//! - while classes remain: one worker step is killed mid-run and the job requeued; the job
//!   completes, every class is committed exactly once, classes committed before the requeue are
//!   not redone;
//! - after the last commit: the relaunch finds the job finished, launches no worker step and
//!   completes at once, redoing nothing.
//!
//! Slurm's job-completion log shows the requeue in both. Every wait has its own bound, far below
//! CI's limit, and a timeout reports what it was waiting for with the batch log and Slurm's view
//! of the job; a test's Slurm job is cancelled whatever happens, so a failure does not hold the
//! two nodes for the next test. The tests share the two nodes, so they run one at a time.
//!
//! Needs a running local Slurm; skipped with a note otherwise, unless MGD3_REQUIRE_SLURM=1 (CI).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use support::*;

/// The two nodes hold one test's allocation at a time.
static NODES: Mutex<()> = Mutex::new(());

/// The tiny DiT has 10 labels.
const CLASSES: usize = 10;

fn slurm_up() -> bool {
    let up = Command::new("sinfo")
        .args(["-h", "-o", "%t"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if !up {
        assert!(
            std::env::var("MGD3_REQUIRE_SLURM").as_deref() != Ok("1"),
            "no Slurm cluster: run scripts/slurm/local_cluster.sh start"
        );
        eprintln!("note: skipping the Slurm test: no Slurm cluster (scripts/slurm/local_cluster.sh start)");
    }
    up
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn field(text: &str, key: &str) -> String {
    text.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).unwrap_or_default().to_owned()
}

fn attempts_by_class(markers: &Path) -> BTreeMap<String, String> {
    files(markers)
        .into_iter()
        // `name#N` is the local store's staging copy of a marker being written.
        .filter(|(name, _)| !name.contains('#'))
        .map(|(name, bytes)| {
            let marker: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            (name, marker["attempt_id"].as_str().unwrap().to_owned())
        })
        .collect()
}

/// One `distill.sbatch` allocation of a job over [`CLASSES`] synthetic classes; cancelled on drop.
struct Allocation {
    slurm_job: String,
    log: PathBuf,
    out: PathBuf,
    job: String,
    ipc: usize,
    _scratch: tempfile::TempDir,
}

impl Drop for Allocation {
    fn drop(&mut self) {
        let _ = Command::new("scancel").arg(&self.slurm_job).output();
    }
}

impl Allocation {
    /// Submits the batch script (2 nodes × 2 worker steps) and waits for the mgd3 job id.
    fn submit(ipc: usize) -> Allocation {
        Self::submit_with(ipc, &[], &[])
    }

    /// [`Allocation::submit`] with more `sbatch` arguments and environment.
    fn submit_with(ipc: usize, sbatch_args: &[&str], env: &[(&str, &str)]) -> Allocation {
        assert!(ipc <= 40, "the synthetic classes hold 40 images");
        let scratch = tempfile::tempdir().unwrap();
        let data = scratch.path().join("data");
        dataset(&data, CLASSES, 40);
        let out = scratch.path().join("out");
        let spec_path = scratch.path().join("job.toml");
        // A relative output: the batch script asks the coordinator where it is.
        std::fs::write(&spec_path, spec(&data.display().to_string(), "out", CLASSES, ipc, 2, "")).unwrap();
        let port = free_port();
        let bin_dir = bin("worker").parent().unwrap().to_owned();
        let sbatch = Command::new("sbatch")
            .args(["--parsable", "--nodes=2", "--ntasks-per-node=2"])
            .args(sbatch_args)
            .arg(format!("--output={}/slurm-%j.out", scratch.path().display()))
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/slurm/distill.sbatch"))
            .arg(&spec_path)
            .env("MGD3_BIN", &bin_dir)
            .env("MGD3_DEVICE", "cpu")
            .env("MGD3_PORT", port.to_string())
            .env("MGD3_STOP_GRACE", "20")
            .env("MGD3_WORKER_ARGS", "--threads 1 --max-batch 2")
            .envs(env.iter().copied())
            .current_dir(scratch.path())
            .output()
            .unwrap();
        assert!(sbatch.status.success(), "sbatch: {}", String::from_utf8_lossy(&sbatch.stderr));
        let slurm_job = String::from_utf8_lossy(&sbatch.stdout).trim().split(';').next().unwrap().to_owned();
        let mut allocation = Allocation {
            log: scratch.path().join(format!("slurm-{slurm_job}.out")),
            slurm_job,
            out,
            job: String::new(),
            ipc,
            _scratch: scratch,
        };
        // Another test's allocation may still be completing: allow for its node release.
        let mut job = String::new();
        allocation.wait_while_running("the batch script to submit the mgd3 job", Duration::from_secs(120), |a| {
            job = a.log_text().lines().find_map(|l| l.split("] job ").nth(1)).unwrap_or_default().trim().to_owned();
            !job.is_empty()
        });
        allocation.job = job;
        allocation
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn scontrol(&self) -> String {
        run("scontrol", &["show", "job", &self.slurm_job])
    }

    /// What a timeout reports: the batch log and Slurm's view of the job and its steps.
    fn diagnostics(&self) -> String {
        format!(
            "--- batch log {}:\n{}\n--- scontrol show job:\n{}\n--- squeue -s:\n{}",
            self.log.display(),
            self.log_text(),
            self.scontrol(),
            run("squeue", &["-s", "-j", &self.slurm_job])
        )
    }

    /// Polls `condition` every 200 ms for at most `timeout`; a timeout names `what` and shows
    /// [`Allocation::diagnostics`].
    fn wait(&self, what: &str, timeout: Duration, condition: impl FnMut(&Self) -> bool) {
        self.wait_checked(what, timeout, false, condition);
    }

    /// [`Allocation::wait`] for something the running allocation must do: fails at once,
    /// instead of at the timeout, when the allocation has ended first.
    fn wait_while_running(&self, what: &str, timeout: Duration, condition: impl FnMut(&Self) -> bool) {
        self.wait_checked(what, timeout, true, condition);
    }

    fn wait_checked(&self, what: &str, timeout: Duration, running: bool, mut condition: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !condition(self) {
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.diagnostics()
            );
            if running {
                let state = field(&self.scontrol(), "JobState");
                let ended = matches!(
                    state.as_str(),
                    "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT" | "NODE_FAIL" | "OUT_OF_MEMORY"
                );
                // Looked at again: it may have happened just before the allocation ended.
                if ended && condition(self) {
                    return;
                }
                assert!(!ended, "the allocation ended ({state}) before {what}\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn job_dir(&self) -> PathBuf {
        self.out.join("jobs").join(&self.job)
    }

    fn markers(&self) -> BTreeMap<String, String> {
        attempts_by_class(&self.job_dir().join("shards"))
    }

    fn worker_steps(&self) -> Vec<String> {
        run("squeue", &["-h", "-s", "-j", &self.slurm_job, "-o", "%i"])
            .lines()
            .map(str::to_owned)
            .filter(|s| s.contains('.') && !s.ends_with(".batch") && !s.ends_with(".extern"))
            .collect()
    }

    fn requeue(&self) {
        let out = Command::new("scontrol").args(["requeue", &self.slurm_job]).output().unwrap();
        assert!(
            out.status.success(),
            "scontrol requeue: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.diagnostics()
        );
    }

    /// Waits for the relaunch (restart ≥ 1) to end and checks it ended well: exit 0, the
    /// requeue in the job-completion log, one marker per class, every image exactly once and
    /// the manifest in place.
    fn relaunch_completes(&self, timeout: Duration) {
        self.wait("the requeued allocation to complete", timeout, |a| {
            let info = a.scontrol();
            let restarted = field(&info, "Restarts").parse::<u32>().unwrap_or(0) >= 1;
            restarted && matches!(field(&info, "JobState").as_str(), "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT")
        });
        let info = self.scontrol();
        assert_eq!(field(&info, "JobState"), "COMPLETED", "{}", self.diagnostics());
        assert_eq!(field(&info, "ExitCode"), "0:0", "{}", self.diagnostics());
        let jobcomp = std::fs::read_to_string("/tmp/mgd3-slurm/jobcomp.log").unwrap_or_default();
        let attempts = jobcomp.lines().filter(|l| l.contains(&format!("JobId={} ", self.slurm_job))).count();
        assert!(attempts >= 2, "the job-completion log shows no requeue:\n{jobcomp}");
        assert!(self.log_text().contains("restart 1]"), "{}", self.diagnostics());
        assert_eq!(self.markers().len(), CLASSES, "one marker per class");
        assert_eq!(files(&self.job_dir().join("dataset")).len(), CLASSES * self.ipc, "every image exactly once");
        assert!(self.job_dir().join("manifest.json").exists());
    }
}

#[test]
fn sbatch_survives_a_killed_worker_step_and_a_requeue_while_classes_remain() {
    let _nodes = NODES.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    // IPC 10 on 2 samples per DiT call: enough work per class that most classes are left when
    // the first ones are committed.
    let a = Allocation::submit(10);
    a.wait_while_running("the first committed class", Duration::from_secs(180), |a| !a.markers().is_empty());

    // Kill one worker step outright, then requeue the whole allocation.
    let steps = a.worker_steps();
    assert!(!steps.is_empty(), "no worker steps running\n{}", a.diagnostics());
    assert!(Command::new("scancel").args(["--signal=KILL", &steps[0]]).status().unwrap().success());
    let before_requeue = a.markers();
    a.requeue();
    eprintln!("requeued with {} of {CLASSES} classes committed", before_requeue.len());
    assert!(
        before_requeue.len() < CLASSES,
        "every class was committed before the requeue: this test needs classes left\n{}",
        a.diagnostics()
    );

    a.relaunch_completes(Duration::from_secs(300));
    let after = a.markers();
    for (class, attempt) in &before_requeue {
        assert_eq!(after.get(class), Some(attempt), "{class} was redone after the requeue");
    }
    assert!(a.log_text().contains("restart 1] job"), "{}", a.diagnostics());
}

/// Preemption's warning, `--signal=B:TERM@120`, is a SIGTERM to the batch shell alone: the
/// script has each worker finish its batch and give its lease back (a TERM to their `srun`s made
/// srun SIGKILL them: their leases waited out lease_timeout_s after the requeue and each cost
/// its shard an attempt), exits 75, and the requeued allocation completes on attempt 1 of every
/// shard.
#[test]
fn a_preempted_allocation_gives_back_every_lease_and_its_requeue_completes() {
    let _nodes = NODES.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let a = Allocation::submit(10);
    a.wait_while_running("the first committed class", Duration::from_secs(180), |a| !a.markers().is_empty());
    // The local cluster's nodes are this machine: the batch shell is a process here.
    let script = format!("job{:0>5}/slurm_script", a.slurm_job);
    let shell = run("pgrep", &["-f", &script]);
    let shell = shell.lines().next().unwrap_or_else(|| panic!("no batch shell `{script}`\n{}", a.diagnostics()));
    assert!(Command::new("kill").args(["-TERM", shell]).status().unwrap().success());
    let before = a.markers();
    a.relaunch_completes(Duration::from_secs(300));
    let log = a.log_text();
    let first = &log[..log.find("restart 1]").expect("checked by relaunch_completes")];
    assert!(first.contains("exit 75 so Slurm requeues it"), "{}", a.diagnostics());
    for said in ["forcing job termination", "Killed", "killing srun"] {
        assert!(!first.contains(said), "the preempted allocation's log says `{said}`\n{}", a.diagnostics());
    }
    let workers_running = first.matches("lease released").count();
    assert!(workers_running >= 1 || before.len() == CLASSES, "no lease was given back\n{}", a.diagnostics());
    // No lease expired and no shard spent a second attempt.
    assert!(!log.contains("lease expired"), "{}", a.diagnostics());
    for (class, attempt) in a.markers() {
        assert!(attempt.contains("-a1-"), "{class} committed on attempt `{attempt}`\n{}", a.diagnostics());
    }
}

#[test]
fn sbatch_requeued_after_the_last_commit_launches_no_workers_and_completes() {
    let _nodes = NODES.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let a = Allocation::submit(4);
    // Requeue the moment the last class is committed: the first allocation may still be
    // stopping its workers, or may have completed already (a finished batch job is requeued too).
    a.wait_while_running("every class committed", Duration::from_secs(240), |a| a.markers().len() == CLASSES);
    let before_requeue = a.markers();
    let state = field(&a.scontrol(), "JobState");
    a.requeue();
    eprintln!("requeued after the last commit; the allocation was {state}");

    // The relaunch's coordinator recovers the finished job and its allocation completes at once:
    // no worker step, nothing redone.
    a.relaunch_completes(Duration::from_secs(120));
    assert_eq!(a.markers(), before_requeue, "a class was redone after the requeue");
    let relaunch: String =
        a.log_text().lines().filter(|l| l.contains("restart 1]")).map(|l| format!("{l}\n")).collect();
    assert!(relaunch.contains("is already succeeded: no worker steps launched"), "{}", a.diagnostics());
    assert!(relaunch.contains("succeeded"), "{}", a.diagnostics());
    assert!(!relaunch.contains("cancelling") && !relaunch.contains("killing srun"), "{}", a.diagnostics());
}

/// An allocation whose job succeeds ends as a person expects: exit 0, and a log without errors.
/// Its workers are drained by the coordinator and exit by themselves, so neither srun ("task 0:
/// Killed") nor slurmstepd ("STEP … CANCELLED") has anything to complain about.
#[test]
fn a_successful_allocation_ends_with_a_clean_log() {
    let _nodes = NODES.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    // CPU workers on an allocation without GPUs: the worker steps must not ask for one.
    let a = Allocation::submit_with(2, &["--gpus-per-task=0"], &[]);
    a.wait("the allocation to complete", Duration::from_secs(300), |a| {
        matches!(field(&a.scontrol(), "JobState").as_str(), "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT")
    });
    let info = a.scontrol();
    assert_eq!(
        (field(&info, "JobState"), field(&info, "ExitCode")),
        ("COMPLETED".into(), "0:0".into()),
        "{}",
        a.diagnostics()
    );
    let log = a.log_text();
    assert!(log.contains("succeeded"), "{}", a.diagnostics());
    for alarming in ["srun: error", "CANCELLED", "Killed", "Terminated", "cancelling", "killing srun", "still running"]
    {
        assert!(!log.contains(alarming), "the log of a successful job says `{alarming}`:\n{log}");
    }
    // Its report is written, and the log says where.
    assert!(log.contains("report: ") && a.job_dir().join("report/index.html").is_file(), "{log}");
}

/// Worker steps that cannot use their device (here: CUDA asked of a CPU-only ONNX Runtime) never
/// register: the allocation ends at once with exit 3, "no worker can run the job", and the
/// reason, instead of exit 1 as if the job had failed.
#[test]
fn an_allocation_whose_workers_cannot_use_their_device_ends_with_exit_3() {
    let _nodes = NODES.lock().unwrap_or_else(|e| e.into_inner());
    if !slurm_up() {
        return;
    }
    let a = Allocation::submit_with(2, &[], &[("MGD3_DEVICE", "cuda")]);
    a.wait("the allocation to end", Duration::from_secs(120), |a| {
        matches!(field(&a.scontrol(), "JobState").as_str(), "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT")
    });
    let info = a.scontrol();
    assert_eq!(field(&info, "ExitCode"), "3:0", "{}", a.diagnostics());
    let log = a.log_text();
    assert!(log.contains("cannot use cuda:0") && log.contains("no worker can run it"), "{log}");
    assert!(log.contains("MGD3_DEVICE=cpu"), "the way out is named: {log}");
}
