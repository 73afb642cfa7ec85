//! `scripts/evaluate.py`, the paper's evaluation protocols, proved on a tiny configuration: a real
//! distillation with the tiny models, trained on and tested against the real images (IPC 4,
//! 32 px, 2 epochs). It needs PyTorch in `.venv-eval` (`scripts/setup_test_servers.sh`); without it
//! the test is skipped with a note, unless `MGD3_REQUIRE_TORCH=1` (CI).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

fn python() -> Option<PathBuf> {
    let python = std::env::var_os("MGD3_EVAL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv-eval/bin/python"));
    let ready = python.exists()
        && Command::new(&python).args(["-c", "import torch, torchvision"]).status().is_ok_and(|s| s.success());
    if !ready {
        assert!(
            std::env::var("MGD3_REQUIRE_TORCH").as_deref() != Ok("1"),
            "PyTorch is not installed at {}: run scripts/setup_test_servers.sh",
            python.display()
        );
        eprintln!("note: skipping the evaluation test: no PyTorch in .venv-eval (scripts/setup_test_servers.sh)");
        return None;
    }
    Some(python)
}

fn evaluate(python: &Path, args: &[&str]) -> (serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("result.json");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/evaluate.py");
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .args(["--size", "32", "--epochs", "2", "--threads", "1", "--device", "cpu", "--out", json.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "evaluate.py {args:?} failed:\n{stderr}");
    (serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap(), stderr)
}

#[test]
fn both_protocols_train_on_a_distilled_set_and_report_deterministic_numbers() {
    let Some(python) = python() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    dataset(&data, 3, 6);
    let out = scratch.path().join("out");
    let spec_path = scratch.path().join("job.toml");
    std::fs::write(&spec_path, spec(&data.display().to_string(), &out.display().to_string(), 3, 4, 5, "")).unwrap();
    run_locally(&spec_path, &[]);
    let job = std::fs::read_dir(out.join("jobs")).unwrap().next().unwrap().unwrap().path();
    let train = job.join("dataset").display().to_string();
    let val = data.display().to_string();

    // Hard labels: ConvNet (depth capped at 32 px, said), evaluated every epoch (E/100 < 1).
    let args = ["hard", "--net", "convnet6", "--train", &train, "--val", &val];
    let (hard, stderr) = evaluate(&python, &args);
    assert!(stderr.contains("ConvNet depth 4 instead of 6 at 32 px"), "{stderr}");
    assert!(stderr.contains("epoch 2/2") && stderr.contains("ETA"), "progress with an ETA: {stderr}");
    assert_eq!(hard["protocol"], "hard");
    let run = &hard["runs"][0];
    assert_eq!((run["ipc"].as_u64(), run["classes"].as_u64(), run["epochs"].as_u64()), (Some(4), Some(3), Some(2)));
    assert_eq!(run["evaluations"].as_array().unwrap().len(), 2);
    let top1 = hard["top1_mean"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&top1));
    let best = run["evaluations"].as_array().unwrap().iter().map(|e| e["top1"].as_f64().unwrap()).fold(0.0, f64::max);
    assert_eq!(run["top1"].as_f64().unwrap(), best, "the best evaluation is the number");
    // Deterministic: the same command gives the same numbers.
    let (again, _) = evaluate(&python, &args);
    assert_eq!(again["runs"][0]["evaluations"], run["evaluations"]);
    assert_eq!(run["distillation_seed"].as_u64(), Some(5), "the set's seed is named");
    assert_eq!(run["job_id"].as_str(), job.file_name().unwrap().to_str());
    // Several sets (seeds of one experiment): mean and standard deviation over them, each seed named.
    let second = scratch.path().join("seed6.toml");
    std::fs::write(&second, spec(&data.display().to_string(), &out.display().to_string(), 3, 4, 6, "")).unwrap();
    run_locally(&second, &[]);
    let other = std::fs::read_dir(out.join("jobs")).unwrap().map(|e| e.unwrap().path()).find(|p| *p != job).unwrap();
    let other = other.display().to_string();
    let (two, stderr) = evaluate(&python, &["hard", "--net", "resnet_ap10", "--train", &train, &other, "--val", &val]);
    assert_eq!(two["runs"].as_array().unwrap().len(), 2);
    assert!(two["top1_std"].as_f64().is_some(), "{two}");
    assert!(stderr.contains("distillation seed 5") && stderr.contains("distillation seed 6"), "{stderr}");

    // Soft labels: a ResNet-18 teacher trained on the real images, then KD at temperature 20.
    let teacher = scratch.path().join("teacher.pth");
    let (_, _) = evaluate(
        &python,
        &[
            "hard",
            "--net",
            "resnet18",
            "--norm",
            "batch",
            "--train",
            &val,
            "--val",
            &val,
            "--save-model",
            teacher.to_str().unwrap(),
        ],
    );
    let (soft, _) =
        evaluate(&python, &["soft", "--teacher", teacher.to_str().unwrap(), "--train", &train, "--val", &val]);
    assert_eq!((soft["protocol"].as_str(), soft["network"].as_str()), (Some("soft"), Some("resnet18")));
    assert!(soft["top1_mean"].as_f64().is_some_and(|t| (0.0..=100.0).contains(&t)));

    // A validation folder with other classes is refused, naming both.
    let other = scratch.path().join("other");
    dataset(&other, 2, 2);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/evaluate.py");
    let out = Command::new(&python)
        .arg(script)
        .args(["hard", "--train", &train, "--val", other.to_str().unwrap(), "--quick", "--size", "32"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("name different classes"), "{text}");
    // Other mistakes are one line naming the flag, not a traceback.
    let job_id = job.file_name().unwrap().to_str().unwrap().to_owned();
    for (args, wanted) in [
        (vec!["hard", "--train", "/no/such/folder", "--val", &val], "--train `/no/such/folder` is not a folder"),
        (vec!["hard", "--train", &job_id, "--val", &val], "a job id needs --store"),
        (vec!["hard", "--train", &train, "--val", &val, "--ipc", "50"], "--ipc 50: class `c0`"),
        (vec!["soft", "--teacher", &val, "--train", &train, "--val", &val], "is not a ResNet-18 checkpoint"),
    ] {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/evaluate.py");
        let out = Command::new(&python).arg(script).args(&args).args(["--quick", "--size", "32"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && text.contains(wanted) && !text.contains("Traceback"), "{args:?}: {text}");
    }
    assert!(hard["top1_std"].is_null(), "one set has no spread: {hard:#}");
    assert_eq!(hard["val_images"], 18);
}

/// The sets given to one evaluation must be seeds of one experiment: jobs that differ in another
/// setting, or the same seed twice, are refused before any training, naming what differs; a job
/// folder and a job id with `--store` are taken for their `dataset/`.
#[test]
fn sets_that_are_not_seeds_of_one_experiment_are_refused_naming_why() {
    let Some(python) = python() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    dataset(&data, 3, 6);
    let out = scratch.path().join("out");
    let mut jobs = Vec::new();
    for (name, ipc, seed) in [("a", 2, 1), ("b", 3, 2)] {
        let spec_path = scratch.path().join(format!("{name}.toml"));
        let text = spec(&data.display().to_string(), &out.display().to_string(), 3, ipc, seed, "");
        std::fs::write(&spec_path, text).unwrap();
        run_locally(&spec_path, &[]);
    }
    for entry in std::fs::read_dir(out.join("jobs")).unwrap() {
        jobs.push(entry.unwrap().path());
    }
    jobs.sort();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/evaluate.py");
    let refused = |train: &[&str], extra: &[&str]| {
        let out = Command::new(&python)
            .arg(&script)
            .args(["hard", "--val", data.to_str().unwrap(), "--size", "32", "--epochs", "1", "--device", "cpu"])
            .args(extra)
            .arg("--train")
            .args(train)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{train:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (a, b) = (jobs[0].to_str().unwrap(), jobs[1].to_str().unwrap());
    let text = refused(&[a, b], &[]);
    let ipc = text.contains("`ipc`: 2 vs 3") || text.contains("`ipc`: 3 vs 2");
    assert!(text.contains("not seeds of one experiment") && ipc, "{text}");
    let id = jobs[0].file_name().unwrap().to_str().unwrap();
    let text = refused(&[a, id], &["--store", out.to_str().unwrap()]);
    assert!(text.contains("both distilled with seed"), "{text}");
    // A class folder given for the set: a sentence, not a traceback.
    let class = std::fs::read_dir(jobs[0].join("dataset")).unwrap().next().unwrap().unwrap().path();
    let text = refused(&[class.to_str().unwrap()], &[]);
    assert!(text.contains("is no ImageFolder") && !text.contains("Traceback"), "{text}");
}

#[test]
fn a_sweep_is_evaluated_variant_by_variant_into_one_table_and_resumes() {
    let Some(python) = python() else { return };
    let (scratch, data, out, record) = distilled_sweep("guidance_scale = [0.02, 0.1]");
    let args = ["hard", "--net", "convnet6", "--sweep", record.to_str().unwrap(), "--val", data.to_str().unwrap()];
    let (result, stderr) = evaluate(&python, &args);
    let variants = result["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 2, "{result}");
    assert_eq!(variants[0]["settings"]["guidance_scale"], "0.02");
    assert_eq!(variants[1]["settings"]["guidance_scale"], "0.1");
    assert!(variants.iter().all(|v| v["top1"].as_f64().is_some_and(|t| (0.0..=100.0).contains(&t))));
    assert!(stderr.contains("variant 2/2 (guidance_scale=0.1): training on"), "{stderr}");
    // Run again: every variant's result is kept, nothing is trained, the table is the same.
    let (again, stderr) = evaluate(&python, &args);
    assert!(stderr.contains("kept from an earlier run") && !stderr.contains("training on"), "{stderr}");
    assert_eq!(again["variants"], result["variants"]);
    // Another validation set (a copy with one image fewer, then the same folder with one image
    // changed in size) is another evaluation: nothing kept is shown for it.
    let other = scratch.path().join("other_val");
    copy_tree(&data, &other);
    let first_class = std::fs::read_dir(&other).unwrap().map(|e| e.unwrap().path()).min().unwrap();
    let first_image = std::fs::read_dir(&first_class).unwrap().map(|e| e.unwrap().path()).min().unwrap();
    std::fs::remove_file(&first_image).unwrap();
    let other_args = args.map(|a| if a == data.to_str().unwrap() { other.to_str().unwrap() } else { a });
    let (_, stderr) = evaluate(&python, &other_args);
    assert!(
        !stderr.contains("kept from an earlier run")
            && stderr.contains("variant 1/2 (guidance_scale=0.02): training on"),
        "{stderr}"
    );
    let (_, stderr) = evaluate(&python, &other_args);
    assert!(stderr.contains("kept from an earlier run"), "{stderr}");
    let second_image = std::fs::read_dir(&first_class).unwrap().map(|e| e.unwrap().path()).min().unwrap();
    let mut bytes = std::fs::read(&second_image).unwrap();
    bytes.extend([0; 16]);
    std::fs::write(&second_image, bytes).unwrap();
    let (_, stderr) = evaluate(&python, &other_args);
    assert!(!stderr.contains("kept from an earlier run"), "{stderr}");

    // The same names and sizes with other bytes are another validation set too.
    let scripts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts");
    let probe = format!(
        "import sys, os, types; sys.path.insert(0, {:?}); import evaluate\n\
         def digest(byte):\n    os.makedirs('v/c', exist_ok=True); open('v/c/0.png', 'wb').write(byte)\n    \
         return evaluate.inputs_digest(types.SimpleNamespace(val='v', protocol='hard', teacher=None))\n\
         print(digest(b'abc') != digest(b'abd'))",
        scripts.display().to_string()
    );
    let probed = Command::new(&python).args(["-c", &probe]).current_dir(scratch.path()).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&probed.stdout).trim(), "True", "{}", String::from_utf8_lossy(&probed.stderr));
    // Arguments that cannot be meant are refused before any training.
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/evaluate.py");
    let missing_out = scratch.path().join("no/such/folder/r.json");
    for (extra, said) in [
        (vec!["--epochs", "0"], "--epochs 0: give a whole number of at least 1"),
        (vec!["--size", "0"], "--size 0"),
        (vec!["--train", "x"], "--train and --sweep exclude each other"),
        (vec!["--out", missing_out.to_str().unwrap()], "is not a folder this process may write in"),
        (vec!["--save-model", missing_out.to_str().unwrap()], "--save-model `"),
        (vec!["--train-seed", "-1"], "--train-seed -1: give a whole number"),
    ] {
        let out = Command::new(&python).arg(&script).args(args).args(&extra).output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && text.contains(said) && !text.contains("training on"), "{extra:?}: {text}");
    }
    // Two variants' job folders swapped: each folder's manifest names the other job. Refused,
    // rather than each score shown under the other's settings.
    let jobs = out.join("jobs");
    let (a, b) = (variants[0]["job_id"].as_str().unwrap(), variants[1]["job_id"].as_str().unwrap());
    std::fs::rename(jobs.join(a), jobs.join("swap")).unwrap();
    std::fs::rename(jobs.join(b), jobs.join(a)).unwrap();
    std::fs::rename(jobs.join("swap"), jobs.join(b)).unwrap();
    let swapped = Command::new(&python).arg(&script).args(args).args(["--epochs", "1"]).output().unwrap();
    let text = String::from_utf8_lossy(&swapped.stderr);
    assert!(!swapped.status.success() && text.contains(&format!("holds job {b}'s manifest.json")), "{text}");
    std::fs::rename(jobs.join(a), jobs.join("swap")).unwrap();
    std::fs::rename(jobs.join(b), jobs.join(a)).unwrap();
    std::fs::rename(jobs.join("swap"), jobs.join(b)).unwrap();
    // The record's settings swapped between the variants: refused, naming the setting.
    let kept_record = std::fs::read(&record).unwrap();
    let mut edited: serde_json::Value = serde_json::from_slice(&kept_record).unwrap();
    let first = edited["variants"][0]["settings"].clone();
    edited["variants"][0]["settings"] = edited["variants"][1]["settings"].clone();
    edited["variants"][1]["settings"] = first;
    std::fs::write(&record, serde_json::to_vec(&edited).unwrap()).unwrap();
    let edited_run = Command::new(&python).arg(&script).args(args).args(["--epochs", "1"]).output().unwrap();
    let text = String::from_utf8_lossy(&edited_run.stderr);
    assert!(!edited_run.status.success() && text.contains("the sweep's record says guidance_scale = 0.1"), "{text}");
    std::fs::write(&record, kept_record).unwrap();

    // A variant's image changed in place: refused, naming it, rather than scored as the job's.
    let job = variants[0]["job_id"].as_str().unwrap();
    let job_dir = out.join("jobs").join(job);
    let manifest_path = job_dir.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let wnid = manifest["classes"][0]["wnid"].as_str().unwrap().to_owned();
    let image = job_dir.join("dataset").join(&wnid).join("0.png");
    let original = std::fs::read(&image).unwrap();
    let mut changed = original.clone();
    let last = changed.len() - 1;
    changed[last] ^= 0xff;
    std::fs::write(&image, &changed).unwrap();
    let refused = Command::new(&python)
        .arg(&script)
        .args(args)
        .args(["--size", "32", "--epochs", "1", "--device", "cpu"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && said.contains(&format!("{wnid}/0.png: other bytes than the manifest's"))
            && said.contains(&format!("coordinator resume {job}")),
        "{said}"
    );
    // The same job with other images and a manifest that lists them (distilled again after a
    // data change): the result kept for its old images is not shown for it.
    manifest["classes"][0]["images"][0]["sha256"] = mgd3_common::sha256_hex(&changed).into();
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let (_, stderr) = evaluate(&python, &args);
    assert!(
        stderr.contains("variant 1/2 (guidance_scale=0.02): its images changed since the result kept for it")
            && stderr.contains("variant 2/2 (guidance_scale=0.1): top-1"),
        "{stderr}"
    );
}

/// A sweep of `keys` (its `[sweep]` table's lines) over 3 classes of 6 images at IPC 4, run to
/// its end: the scratch folder, the dataset, the output and the sweep's record.
fn distilled_sweep(keys: &str) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    dataset(&data, 3, 6);
    let out = scratch.path().join("out");
    let spec_path = scratch.path().join("sweep.toml");
    let text = spec(&data.display().to_string(), &out.display().to_string(), 3, 4, 5, "");
    std::fs::write(&spec_path, format!("{text}[sweep]\n{keys}\n")).unwrap();
    run_locally(&spec_path, &[]);
    let record = std::fs::read_dir(out.join("sweeps"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    (scratch, data, out, record)
}

/// A copy of folder `from` at `to` (files and folders).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() { copy_tree(&path, &target) } else { std::fs::copy(&path, &target).map(|_| ()).unwrap() }
    }
}

/// A sweep over distillation seeds is also summarised per setting of its other keys: the mean
/// and sample standard deviation of top-1 over the seeds, as the paper reports them.
#[test]
fn a_sweep_over_seeds_is_summarised_as_mean_and_spread_per_setting() {
    let Some(python) = python() else { return };
    let (_scratch, data, _out, record) = distilled_sweep("seed = [1, 2]");
    let args = ["hard", "--net", "convnet6", "--sweep", record.to_str().unwrap(), "--val", data.to_str().unwrap()];
    let (result, _) = evaluate(&python, &args);
    let tops: Vec<f64> = result["variants"].as_array().unwrap().iter().map(|v| v["top1"].as_f64().unwrap()).collect();
    let summary = result["over_seeds"].as_array().unwrap();
    assert_eq!(summary.len(), 1, "{result}");
    assert_eq!(summary[0]["seeds"], serde_json::json!(["1", "2"]));
    let mean = (tops[0] + tops[1]) / 2.0;
    let std = ((tops[0] - mean).powi(2) + (tops[1] - mean).powi(2)).sqrt(); // n - 1 = 1
    assert!((summary[0]["top1_mean"].as_f64().unwrap() - mean).abs() < 1e-9, "{result}");
    assert!((summary[0]["top1_std"].as_f64().unwrap() - std).abs() < 1e-9, "{result}");
}
