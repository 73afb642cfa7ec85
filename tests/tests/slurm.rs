//! scripts/slurm/distill.sbatch on a real Slurm (scripts/slurm/local_cluster.sh: slurmctld, two
//! slurmd nodes with fake GPUs, munge): one worker step is killed mid-run and the job requeued
//! once; the job completes, every class is committed exactly once, classes committed before the
//! requeue are not redone, and Slurm's job-completion log shows the requeue.
//!
//! Needs a running local Slurm; skipped with a note otherwise, unless MGD3_REQUIRE_SLURM=1 (CI).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

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

fn scontrol_job(id: &str) -> String {
    String::from_utf8_lossy(&Command::new("scontrol").args(["show", "job", id]).output().unwrap().stdout).into_owned()
}

fn field(text: &str, key: &str) -> String {
    text.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).unwrap_or_default().to_owned()
}

fn attempts_by_class(markers: &Path) -> BTreeMap<String, String> {
    files(markers)
        .into_iter()
        .map(|(name, bytes)| {
            let marker: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            (name, marker["attempt_id"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[test]
fn sbatch_survives_a_killed_worker_step_and_a_requeue() {
    if !slurm_up() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    let classes = 10; // the tiny DiT has 10 labels
    dataset(&data, classes, 40);
    let out = scratch.path().join("out");
    let spec_path = scratch.path().join("job.toml");
    std::fs::write(&spec_path, spec(&data.display().to_string(), &out.display().to_string(), classes, 4, 2, ""))
        .unwrap();
    let port = free_port();
    let bin_dir = bin("worker").parent().unwrap().to_owned();
    let sbatch = Command::new("sbatch")
        .args(["--parsable", "--nodes=2", "--ntasks-per-node=2"])
        .arg(format!("--output={}/slurm-%j.out", scratch.path().display()))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/slurm/distill.sbatch"))
        .arg(&spec_path)
        .env("MGD3_BIN", &bin_dir)
        .env("MGD3_DEVICE", "cpu")
        .env("MGD3_PORT", port.to_string())
        .env("MGD3_WORKER_ARGS", "--threads 1 --max-batch 2")
        .current_dir(scratch.path())
        .output()
        .unwrap();
    assert!(sbatch.status.success(), "sbatch: {}", String::from_utf8_lossy(&sbatch.stderr));
    let slurm_job = String::from_utf8_lossy(&sbatch.stdout).trim().split(';').next().unwrap().to_owned();
    let url = format!("http://127.0.0.1:{port}");
    let output_log = scratch.path().join(format!("slurm-{slurm_job}.out"));
    let log = || std::fs::read_to_string(&output_log).unwrap_or_default();

    // The mgd3 job id, once the batch script has submitted it.
    let mut job = String::new();
    wait_for("the mgd3 job", Duration::from_secs(60), || {
        job = log().lines().find_map(|l| l.split("] job ").nth(1)).unwrap_or_default().trim().to_owned();
        !job.is_empty()
    });
    wait_for("two committed shards", Duration::from_secs(120), || {
        status(&url, &job).is_some_and(|s| s["shards"]["done"].as_u64() >= Some(2))
    });

    // Kill one worker step outright, then requeue the whole allocation.
    let steps = String::from_utf8_lossy(
        &Command::new("squeue").args(["-h", "-s", "-j", &slurm_job, "-o", "%i"]).output().unwrap().stdout,
    )
    .lines()
    .map(str::to_owned)
    .filter(|s| !s.ends_with(".batch") && !s.ends_with(".extern"))
    .collect::<Vec<_>>();
    assert!(!steps.is_empty(), "no worker steps running:\n{}", log());
    assert!(Command::new("scancel").args(["--signal=KILL", &steps[0]]).status().unwrap().success());
    std::thread::sleep(Duration::from_secs(1));
    let before_requeue = attempts_by_class(&out.join("jobs").join(&job).join("shards"));
    assert!(!before_requeue.is_empty());
    assert!(Command::new("scontrol").args(["requeue", &slurm_job]).status().unwrap().success());

    wait_for("the requeued allocation to complete", Duration::from_secs(300), || {
        let info = scontrol_job(&slurm_job);
        field(&info, "JobState") == "COMPLETED" || field(&info, "JobState") == "FAILED"
    });
    let info = scontrol_job(&slurm_job);
    assert_eq!(field(&info, "JobState"), "COMPLETED", "{info}\n{}", log());
    assert_eq!(field(&info, "ExitCode"), "0:0");
    assert!(field(&info, "Restarts").parse::<u32>().unwrap() >= 1, "{info}");
    let jobcomp = std::fs::read_to_string("/tmp/mgd3-slurm/jobcomp.log").unwrap_or_default();
    let attempts = jobcomp.lines().filter(|l| l.contains(&format!("JobId={slurm_job} "))).count();
    assert!(attempts >= 2, "the job-completion log shows no requeue:\n{jobcomp}");
    assert!(log().contains("restart 1"), "{}", log());

    let job_dir = out.join("jobs").join(&job);
    let after = attempts_by_class(&job_dir.join("shards"));
    assert_eq!(after.len(), classes, "one marker per class");
    for (class, attempt) in &before_requeue {
        assert_eq!(after.get(class), Some(attempt), "{class} was redone after the requeue");
    }
    assert_eq!(files(&job_dir.join("dataset")).len(), classes * 4, "every image exactly once");
    assert!(job_dir.join("manifest.json").exists());
}
