//! Sweeps end to end: a `[sweep]` job spec run by `coordinator run` with the tiny models on the
//! CPU — each variant's images are those of the same job submitted alone, the later variants
//! reuse the first one's encodings and modes (counted in their manifests), and the comparison
//! page loads in headless Chromium with each variant's numbers; and the client commands on a
//! sweep as a whole (status, cancel, resume) and its bad input, against `coordinator serve`.

mod support;

use std::path::Path;
use std::process::Command;

use mgd3_common::sweep::{Sweep, SweepRecord};
use support::*;

const SWEEP: &str = "[sweep]\nguidance_scale = [0.02, 0.1]\nstop_guidance = [10, 40]\n";

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// `dataset/` and `modes/` of a job folder: the images and modes a job made.
fn outputs(job_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut all = files(&job_dir.join("dataset"));
    all.extend(files(&job_dir.join("modes")).into_iter().map(|(name, bytes)| (format!("modes/{name}"), bytes)));
    all
}

#[test]
fn a_sweep_runs_its_variants_as_the_jobs_alone_sharing_encodings_and_modes() {
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("data");
    dataset(&data, 3, 14);
    let out = scratch.path().join("out");
    let text = format!(
        "{}{SWEEP}",
        spec(&data.display().to_string(), &out.display().to_string(), 3, 4, 7, "classes_per_shard = 2")
    );
    let spec_path = scratch.path().join("sweep.toml");
    std::fs::write(&spec_path, &text).unwrap();
    let run = Command::new(bin("coordinator"))
        .args(["run", spec_path.to_str().unwrap(), "--local-workers", "1", "--worker-arg=--threads=1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "coordinator run of a sweep failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("comparison: "), "{stdout}");

    let sweep = Sweep::parse(&text).unwrap().unwrap();
    assert_eq!(sweep.variants.len(), 4);
    let records: Vec<_> = std::fs::read_dir(out.join("sweeps")).unwrap().map(|e| e.unwrap().path()).collect();
    let record_path = records.iter().find(|p| p.extension().is_some_and(|e| e == "json")).unwrap();
    let record: SweepRecord = serde_json::from_slice(&std::fs::read(record_path).unwrap()).unwrap();
    assert!(record.sweep_id.starts_with("chaos-sweep-"), "{}", record.sweep_id);
    assert_eq!(record.keys, ["guidance_scale", "stop_guidance"]);
    assert_eq!(record.variants.len(), 4);
    assert_eq!(record.label(&record.variants[1]), "guidance_scale=0.02 stop_guidance=40");

    // The first variant encoded and clustered every class; the others took both from the cache.
    for (i, variant) in record.variants.iter().enumerate() {
        let manifest = read_json(&out.join("jobs").join(&variant.job_id).join("manifest.json"));
        let (latents, modes) = (&manifest["reused"]["latents"], &manifest["reused"]["modes"]);
        if i == 0 {
            assert_eq!((latents.as_u64(), modes.as_u64()), (Some(0), Some(0)), "variant 1: {}", manifest["reused"]);
        } else {
            assert_eq!(
                (latents.as_u64(), modes.as_u64()),
                (Some(3), Some(3)),
                "variant {}: {}",
                i + 1,
                manifest["reused"]
            );
            assert!(manifest["classes"].as_array().unwrap().iter().all(|c| c["modes_reused"] == true));
        }
        assert_eq!(
            manifest["spec"]["sampling"]["stop_guidance"].as_u64().unwrap().to_string(),
            variant.settings["stop_guidance"]
        );
    }

    // Variant 4 (λ 0.1, t_stop 40) submitted alone, into another folder: the same job id and
    // the same images and modes, byte for byte, without any cache to draw on.
    let alone = scratch.path().join("alone");
    let variant = &sweep.variants[3];
    let alone_text = variant.toml.replace(&out.display().to_string(), &alone.display().to_string());
    assert!(alone_text.contains("guidance_scale = 0.1") && !alone_text.contains("[sweep]"), "{alone_text}");
    let alone_spec = scratch.path().join("alone.toml");
    std::fs::write(&alone_spec, alone_text).unwrap();
    run_locally(&alone_spec, &[]);
    let job = &record.variants[3].job_id;
    let alone_manifest = read_json(&alone.join("jobs").join(job).join("manifest.json"));
    assert_eq!(alone_manifest["reused"]["latents"], 0);
    let (from_sweep, by_itself) = (outputs(&out.join("jobs").join(job)), outputs(&alone.join("jobs").join(job)));
    assert_eq!(from_sweep.len(), 3 * 4 + 3);
    assert!(from_sweep == by_itself, "variant 4's images differ from the job run alone");
    // The variants do differ from each other (the settings reach the sampler).
    assert!(outputs(&out.join("jobs").join(&record.variants[0].job_id)) != from_sweep);

    // The comparison page: one row per variant with its settings and the manifest's numbers.
    let page = out.join("sweeps").join(&record.sweep_id).join("report/index.html");
    let html = std::fs::read_to_string(&page).unwrap();
    for variant in &record.variants {
        assert!(html.contains(&format!("data-job=\"{}\"", variant.job_id)), "{}", variant.job_id);
        assert!(out.join("jobs").join(&variant.job_id).join("report/index.html").exists());
    }
    assert_eq!(html.matches("data-field=\"state\" data-value=\"succeeded\"").count(), 4, "each variant's state");
    // A record whose settings were swapped between two variants would show each job's numbers
    // under the other's settings: the comparison is refused, naming the job and the setting.
    let record_file = out.join("sweeps").join(format!("{}.json", record.sweep_id));
    let kept = std::fs::read(&record_file).unwrap();
    let mut edited: serde_json::Value = serde_json::from_slice(&kept).unwrap();
    let first = edited["variants"][0]["settings"].clone();
    edited["variants"][0]["settings"] = edited["variants"][1]["settings"].clone();
    edited["variants"][1]["settings"] = first;
    std::fs::write(&record_file, serde_json::to_vec(&edited).unwrap()).unwrap();
    let refused = coordinator(&["report", &record.sweep_id, "--job-dir", out.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{text}");
    assert!(text.contains("its record does not match job") && text.contains(&record.variants[0].job_id), "{text}");
    std::fs::write(&record_file, kept).unwrap();
    // A sample changed since its commit in one variant: the refusal names the variant and its
    // job, not only the class (every variant has that class).
    let image = out.join("jobs").join(&record.variants[2].job_id).join("dataset/c0/0.png");
    let before = std::fs::read(&image).unwrap();
    std::fs::copy(out.join("jobs").join(&record.variants[2].job_id).join("dataset/c0/1.png"), &image).unwrap();
    let refused = coordinator(&["report", &record.sweep_id, "--job-dir", out.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&refused.stderr);
    let named = format!("variant 3 ({}, job `{}`)", record.label(&record.variants[2]), record.variants[2].job_id);
    assert!(!refused.status.success() && text.contains(&named), "{text}");
    assert!(text.contains("dataset/c0/0.png` is not the image its commit marker records"), "{text}");
    std::fs::write(&image, before).unwrap();
    let Some(browser) = chromium() else { return };
    let (dom, console) = browse(&browser, &page);
    assert!(console.iter().all(|l| !l.contains("not found")), "{console:?}");
    assert!(dom.contains("id=\"broken\" class=\"fail\" hidden"), "an image did not load");
    assert!(dom.contains("id=\"grid\""));
    for variant in &record.variants {
        let manifest = read_json(&out.join("jobs").join(&variant.job_id).join("manifest.json"));
        let values: Vec<f64> = manifest["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["quality"]["diversity_normalised"].as_f64().unwrap())
            .collect();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let row_start = dom.find(&format!("data-job=\"{}\"", variant.job_id)).unwrap();
        let row = &dom[row_start..row_start + dom[row_start..].find("</tr>").unwrap()];
        let shown: f64 = row
            .split("data-field=\"diversity\" data-value=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            (shown - mean).abs() <= 1e-12 * mean.abs().max(1.0),
            "{} shows {shown}, manifest mean {mean}",
            variant.job_id
        );
        for (key, value) in &variant.settings {
            assert!(row.contains(&format!("data-field=\"{key}\" data-value=\"{value}\"")), "{row}");
        }
    }
    // Opened as `#sort=diversity-desc`, the rows come most diverse first.
    let sorted = std::path::PathBuf::from(format!("{}#sort=diversity-desc", page.display()));
    let (dom, _) = browse(&browser, &sorted);
    let shown: Vec<f64> = dom
        .split("data-field=\"diversity\" data-value=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(shown.len(), 4);
    assert!(shown.windows(2).all(|w| w[0] >= w[1]), "not sorted by diversity: {shown:?}");
    assert_eq!(dom.matches("data-order=\"desc\"").count(), 1, "the sorted column is marked");
}

fn coordinator(args: &[&str]) -> std::process::Output {
    Command::new(bin("coordinator")).args(args).output().unwrap()
}

#[test]
fn without_a_coordinator_a_sweeps_report_points_to_its_output_folder() {
    let port = free_port();
    let out =
        coordinator(&["report", "nette-sweep-0123456789ab", "--coordinator", &format!("http://127.0.0.1:{port}")]);
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && message.contains("report nette-sweep-0123456789ab --job-dir <output>"),
        "{message}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = coordinator(&["report", "nette-sweep-0123456789ab", "--job-dir", dir.path().to_str().unwrap()]);
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && message.contains("holding jobs/ and sweeps/"), "{message}");
}

#[test]
fn a_sweep_is_submitted_watched_cancelled_and_resumed_as_a_whole_and_bad_sweeps_name_the_key() {
    let scratch = job_scratch(2, 6, 2, 1, "");
    let (_server, _port, url) = serve_logging_leases(&scratch.store, &scratch.dir.path().join("serve.log"));
    wait_for_coordinator(&url);
    let text = std::fs::read_to_string(&scratch.spec).unwrap();
    let sweep_spec = scratch.dir.path().join("sweep.toml");
    std::fs::write(
        &sweep_spec,
        format!("{text}[sweep]\nvariants = [{{}}, {{ seed = 2 }}, {{ ipc = 3, sampler = \"ddim\" }}]\n"),
    )
    .unwrap();
    let submitted = coordinator(&["submit", sweep_spec.to_str().unwrap(), "--coordinator", &url]);
    assert!(submitted.status.success(), "{}", String::from_utf8_lossy(&submitted.stderr));
    let id = String::from_utf8_lossy(&submitted.stdout).trim().to_owned();
    assert!(id.starts_with("chaos-sweep-"), "{id}");
    let told = String::from_utf8_lossy(&submitted.stderr);
    assert!(told.contains("3  ipc=3 seed=1 sampler=ddim"), "{told}");
    // The same sweep again: the same id and jobs.
    let again = coordinator(&["submit", sweep_spec.to_str().unwrap(), "--coordinator", &url]);
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), id);

    let status = coordinator(&["status", &id, "--json", "--coordinator", &url]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["state"], "running");
    let variants = status["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 3);
    assert_eq!(variants[2]["settings"]["sampler"], "ddim");
    assert_eq!(variants[2]["status"]["images"]["total"], 2 * 3);
    let jobs: Vec<String> = variants.iter().map(|v| v["status"]["job_id"].as_str().unwrap().to_owned()).collect();
    // A variant is a job like any other; `spec --variant` writes it alone, and it is that job.
    assert_eq!(support::status(&url, &jobs[1]).unwrap()["state"], "running");
    // Nothing committed yet (no worker): report says so instead of pointing at a folder.
    let early = coordinator(&["report", &jobs[1], "--coordinator", &url]);
    let said = String::from_utf8_lossy(&early.stderr);
    assert!(!early.status.success() && said.contains("(running) has no committed class yet"), "{said}");
    let alone = coordinator(&["spec", sweep_spec.to_str().unwrap(), "--variant", "2"]);
    assert!(alone.status.success(), "{}", String::from_utf8_lossy(&alone.stderr));
    let alone_path = scratch.dir.path().join("elsewhere").join("variant2.toml");
    std::fs::create_dir_all(alone_path.parent().unwrap()).unwrap();
    std::fs::write(&alone_path, &alone.stdout).unwrap();
    let past = coordinator(&["spec", sweep_spec.to_str().unwrap(), "--variant", "4"]);
    assert_eq!(past.status.code(), Some(2), "{}", String::from_utf8_lossy(&past.stderr));
    let checked = coordinator(&["check", alone_path.to_str().unwrap()]);
    let checked_out = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked_out.contains(&format!("job id:  {}", jobs[1])),
        "{checked_out}{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    let cancelled = coordinator(&["cancel", &id, "--coordinator", &url]);
    assert!(cancelled.status.success(), "{}", String::from_utf8_lossy(&cancelled.stderr));
    for job in &jobs {
        assert_eq!(support::status(&url, job).unwrap()["state"], "cancelled", "{job}");
    }
    // Another sweep's file is refused before any variant is resumed, naming what it lacks.
    let other = scratch.dir.path().join("other.toml");
    std::fs::write(
        &other,
        format!("{text}[sweep]\nvariants = [{{}}, {{ seed = 3 }}, {{ ipc = 3, sampler = \"ddim\" }}]\n"),
    )
    .unwrap();
    let refused = coordinator(&["resume", &id, "--spec", other.to_str().unwrap(), "--coordinator", &url]);
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && message.contains("seed=2") && message.contains("nothing was resumed"),
        "{message}"
    );
    for job in &jobs {
        assert_eq!(support::status(&url, job).unwrap()["state"], "cancelled", "{job}");
    }
    // The sweep's own file, its variants listed in another order: each is found by its settings.
    let reordered = scratch.dir.path().join("reordered.toml");
    std::fs::write(
        &reordered,
        format!("{text}[sweep]\nvariants = [{{ ipc = 3, sampler = \"ddim\" }}, {{ seed = 2 }}, {{}}]\n"),
    )
    .unwrap();
    let resumed = coordinator(&["resume", &id, "--spec", reordered.to_str().unwrap(), "--coordinator", &url]);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    for job in &jobs {
        assert_eq!(support::status(&url, job).unwrap()["state"], "running", "{job}");
    }

    // Commands of one job name the sweep's jobs instead of failing as if it were an unknown job.
    for command in ["verify", "export"] {
        let mut args = vec![command, id.as_str(), "--coordinator", url.as_str()];
        if command == "export" {
            args.extend(["--npz", "/dev/null"]);
        }
        let refused = coordinator(&args);
        let message = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && message.contains("is a sweep") && message.contains(&jobs[2]),
            "{command}: {message}"
        );
    }

    // `list` shows the sweep beside its jobs; `forget` forgets it whole, refused while it runs.
    let listed = coordinator(&["list", "--coordinator", &url]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&format!("{id}\tsweep\t0/3 variants succeeded")));
    // For scripts: each variant in `list --json` names its sweep; `status <sweep> --get` reads
    // the sweep's fields.
    let listed = coordinator(&["list", "--json", "--coordinator", &url]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    for job in &jobs {
        let entry = listed.as_array().unwrap().iter().find(|j| j["job_id"] == job.as_str()).unwrap();
        assert_eq!(entry["sweep"], id.as_str(), "{entry:#}");
    }
    let state = coordinator(&["status", &id, "--get", "state", "--coordinator", &url]);
    assert_eq!(String::from_utf8_lossy(&state.stdout).trim(), "running", "{}", String::from_utf8_lossy(&state.stderr));
    let nested = coordinator(&["status", &id, "--get", "variants.2.status.state", "--coordinator", &url]);
    assert_eq!(String::from_utf8_lossy(&nested.stdout).trim(), "running");
    let wrong = coordinator(&["status", &id, "--get", "nosuch", "--coordinator", &url]);
    let message = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success() && message.contains("its fields are sweep_id, state"), "{message}");
    let refused = coordinator(&["forget", &id, "--coordinator", &url]);
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && message.contains(&format!("coordinator cancel {id}")), "{message}");
    assert_eq!(support::status(&url, &jobs[0]).unwrap()["state"], "running", "nothing was forgotten");
    // Another sweep holding two of its variants too keeps them when this one is forgotten.
    let submitted = coordinator(&["submit", other.to_str().unwrap(), "--coordinator", &url]);
    assert!(submitted.status.success(), "{}", String::from_utf8_lossy(&submitted.stderr));
    let other_id = String::from_utf8_lossy(&submitted.stdout).trim().to_owned();
    assert!(coordinator(&["cancel", &id, "--coordinator", &url]).status.success());
    // A variant alone is not forgotten: the sweep would lose it.
    let alone = coordinator(&["forget", &jobs[1], "--coordinator", &url]);
    let message = String::from_utf8_lossy(&alone.stderr);
    assert!(
        !alone.status.success()
            && message.contains(&format!("is a variant of sweep `{id}`"))
            && message.contains(&format!("`coordinator forget {id}`")),
        "{message}"
    );
    assert_eq!(support::status(&url, &jobs[1]).unwrap()["state"], "cancelled");
    let forgotten = coordinator(&["forget", &id, "--coordinator", &url]);
    assert!(forgotten.status.success(), "{}", String::from_utf8_lossy(&forgotten.stderr));
    let said = String::from_utf8_lossy(&forgotten.stdout);
    assert!(
        said.contains("and 1 of its 3 job(s) forgotten; kept, as other sweeps hold them too")
            && said.contains(&jobs[0])
            && said.contains(&jobs[2]),
        "{said}"
    );
    assert!(support::status(&url, &jobs[1]).is_none(), "the sweep's own variant is forgotten");
    let state = coordinator(&["status", &other_id, "--get", "state", "--coordinator", &url]);
    assert!(state.status.success(), "the other sweep lost variants: {}", String::from_utf8_lossy(&state.stderr));
    assert!(coordinator(&["cancel", &other_id, "--coordinator", &url]).status.success());
    let forgotten = coordinator(&["forget", &other_id, "--coordinator", &url]);
    assert!(String::from_utf8_lossy(&forgotten.stdout).contains("and its 3 job(s) forgotten"));
    assert!(support::status(&url, &jobs[2]).is_none(), "the variants are forgotten");
    let gone = coordinator(&["status", &id, "--coordinator", &url]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("is no sweep or job this coordinator knows"));
    for command in ["resume", "forget", "cancel"] {
        let gone = coordinator(&[command, &id, "--coordinator", &url]);
        let message = String::from_utf8_lossy(&gone.stderr);
        assert!(
            !gone.status.success() && message.contains("is no sweep or job this coordinator knows: forgotten"),
            "{command}: {message}"
        );
    }
    let listed = coordinator(&["list", "--coordinator", &url]);
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&id));
    // Submitted again, the same sweep and jobs come back.
    let again = coordinator(&["submit", sweep_spec.to_str().unwrap(), "--coordinator", &url]);
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), id, "{}", String::from_utf8_lossy(&again.stderr));

    // Sweep records are read once, when a coordinator opens the store (`status` and `list` answer
    // from memory, also while the store is down): a restarted coordinator knows the sweep, and a
    // record that does not read is named by `status` and left out of `list`.
    std::fs::write(Path::new(&scratch.store).join("sweeps").join("chaos-sweep-0000deadbeef.json"), "{ not json")
        .unwrap();
    drop(_server);
    let (_server, _port, url) = serve_logging_leases(&scratch.store, &scratch.dir.path().join("serve2.log"));
    wait_for_coordinator(&url);
    let status = coordinator(&["status", &id, "--json", "--coordinator", &url]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["variants"].as_array().map(Vec::len), Some(3), "{status:#}");
    let broken = coordinator(&["status", "chaos-sweep-0000deadbeef", "--coordinator", &url]);
    let message = String::from_utf8_lossy(&broken.stderr);
    assert!(
        !broken.status.success()
            && message.contains("sweeps/chaos-sweep-0000deadbeef.json")
            && message.contains("corrupt"),
        "{message}"
    );
    let listed = coordinator(&["list", "--coordinator", &url]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains(&id) && !listed.contains("deadbeef"), "{listed}");

    // Bad sweeps: refused before anything runs (exit 2), naming the key and what to do.
    for (sweep, expected) in [
        ("[sweep]\nguidance = [0.1]\n", "did you mean `guidance_scale`"),
        ("[sweep]\nstop_guidance = []\n", "`sweep.stop_guidance`: the list is empty"),
        ("[sweep]\nstop_guidance = [10, 80]\n", "`sweep.stop_guidance`: 80 in variant 2"),
        (
            "[sweep]\nseed = [1,2,3,4,5,6,7,8,9,10,11]\nguidance_scale = [0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0]\n",
            "110 variants, more than the cap of 100",
        ),
        ("[sweep]\nguidance_scale = [0, 0.1]\nstop_guidance = [25, 50]\n", "make the same images"),
        ("[sweep]\nipc = [2, 7000]\n", "in variant 2 (ipc=7000)"),
    ] {
        let bad = scratch.dir.path().join("bad.toml");
        std::fs::write(&bad, format!("{text}{sweep}")).unwrap();
        let refused = coordinator(&["submit", bad.to_str().unwrap(), "--coordinator", &url]);
        let message = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{sweep}: {message}");
        assert!(message.contains(expected), "{sweep}: {message}");
        let checked = coordinator(&["check", bad.to_str().unwrap()]);
        assert_eq!(checked.status.code(), Some(2), "check {sweep}");
        assert!(String::from_utf8_lossy(&checked.stderr).contains(expected));
    }
}
