//! A whole job against the independent Python reference: `coordinator run` over a small
//! ImageFolder (encode, k-means, sampling in DiT calls that mix classes, decode, PNG, commit) must
//! write the PNGs `scripts/parity_reference_job.py` computes from the same modes and noise, within
//! one grey level, for DDPM and DDIM. The sampler-core fixtures (`parity.rs`, `parity_ddim.rs`)
//! pin one class in one call; this pins what production runs.
//!
//! The fixtures in `tests/fixtures/parity_job/<case>/` are made in two steps (see its README):
//! this test with `MGD3_WRITE_PARITY_JOB_INPUTS=1` writes the job's inputs to the reference
//! (`params.json`, each class's published modes and the noise of production's one generator),
//! then the Python script writes `<wnid>_images.npy`. Every run checks that the inputs still are
//! what production uses, so a change of k-means or noise cannot hide behind stale fixtures.

mod support;

use std::path::{Path, PathBuf};

use mgd3_worker::mgd3::noise::batch_noise;
use ndarray::{Array4, Array5, Axis};
use ndarray_npy::{read_npy, write_npy};
use serde_json::{Value, json};
use support::{dataset, fixtures, run_locally_with};

/// One job of the parity set: its name and the `[sampling]` table it runs.
struct Case {
    name: &'static str,
    seed: u64,
    sampler: &'static str,
    eta: f32,
    steps: usize,
    t_stop: usize,
    guidance_scale: f32,
    cfg_scale: f32,
    cfg_channels: usize,
}

const CLASSES: usize = 3;
const IPC: usize = 3;
/// DiT rows per call: two samples (cond + uncond each), so nine samples of three classes need
/// calls that hold two classes.
const MAX_BATCH: usize = 4;

fn case_dir(case: &Case) -> PathBuf {
    fixtures().parent().unwrap().join("parity_job").join(case.name)
}

fn params(case: &Case) -> Value {
    json!({
        "seed": case.seed,
        "sampler": case.sampler,
        "eta": case.eta,
        "steps": case.steps,
        "t_stop": case.t_stop,
        "guidance_scale": case.guidance_scale,
        "cfg_scale": case.cfg_scale,
        "cfg_channels": case.cfg_channels,
        "ipc": IPC,
        "max_batch": MAX_BATCH,
        // labels = "position": class c<k> has label k and class index k.
        "classes": (0..CLASSES).map(|k| json!({"wnid": format!("c{k}"), "label": k, "class_index": k})).collect::<Vec<_>>(),
    })
}

/// Runs the case's job with one local worker and returns the job's folder.
fn run_job(case: &Case, scratch: &Path, env: &[(&str, String)]) -> PathBuf {
    let data = scratch.join("data");
    dataset(&data, CLASSES, 8);
    let out = scratch.join("out");
    let m = fixtures();
    let eta = if case.sampler == "ddim" { format!("eta = {}\n", case.eta) } else { String::new() };
    let spec = format!(
        r#"name = "parity"
dataset = "{}"
classes = ["c0", "c1", "c2"]
labels = "position"
ipc = {IPC}
seed = {}
output = "{}"
classes_per_shard = {CLASSES}
[sampling]
sampler = "{}"
{eta}steps = {}
stop_guidance = {}
guidance_scale = {}
cfg_scale = {}
cfg_channels = {}
[models]
dit = "{}"
vae_encoder = "{}"
vae_decoder = "{}"
"#,
        data.display(),
        case.seed,
        out.display(),
        case.sampler,
        case.steps,
        case.t_stop,
        case.guidance_scale,
        case.cfg_scale,
        case.cfg_channels,
        m.join("tiny_dit.onnx").display(),
        m.join("tiny_vae_encoder.onnx").display(),
        m.join("tiny_vae_decoder.onnx").display()
    );
    let spec_path = scratch.join("job.toml");
    std::fs::write(&spec_path, spec).unwrap();
    run_locally_with(&spec_path, env, &[&format!("--max-batch={MAX_BATCH}")]);
    let mut jobs: Vec<PathBuf> = std::fs::read_dir(out.join("jobs")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(jobs.len(), 1, "one job in {}", out.display());
    jobs.pop().unwrap()
}

/// The noise production draws for class `k` (`[IPC, S+1, C, h, w]`).
fn production_noise(case: &Case, k: usize, latent_shape: [usize; 3]) -> Array5<f32> {
    let samples: Vec<(u64, u64)> = (0..IPC as u64).map(|j| (k as u64, j)).collect();
    batch_noise(case.seed, &samples, case.steps, latent_shape)
}

fn latent_shape(modes: &Array4<f32>) -> [usize; 3] {
    [modes.shape()[1], modes.shape()[2], modes.shape()[3]]
}

fn write_inputs(case: &Case, job: &Path) {
    let dir = case_dir(case);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("params.json"), serde_json::to_string_pretty(&params(case)).unwrap() + "\n").unwrap();
    for k in 0..CLASSES {
        let modes: Array4<f32> = read_npy(job.join("modes").join(format!("c{k}.npy"))).unwrap();
        let noise = production_noise(case, k, latent_shape(&modes));
        write_npy(dir.join(format!("c{k}_modes.npy")), &modes).unwrap();
        write_npy(dir.join(format!("c{k}_noise.npy")), &noise).unwrap();
    }
    eprintln!("wrote the inputs of {}; now run scripts/parity_reference_job.py", dir.display());
}

fn run_case(case: &Case, env: &[(&str, String)]) {
    let scratch = tempfile::tempdir().unwrap();
    let job = run_job(case, scratch.path(), env);
    if std::env::var_os("MGD3_WRITE_PARITY_JOB_INPUTS").is_some() {
        write_inputs(case, &job);
        return;
    }
    let dir = case_dir(case);
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("params.json")).unwrap()).unwrap();
    assert_eq!(stored, params(case), "{}: the fixture was made for other settings; remake it (README)", case.name);
    let mut checked = 0;
    for k in 0..CLASSES {
        let what = format!("{} class c{k}", case.name);
        // The reference's inputs are production's: the published modes and the one noise generator.
        let modes: Array4<f32> = read_npy(job.join("modes").join(format!("c{k}.npy"))).unwrap();
        let want_modes: Array4<f32> = read_npy(dir.join(format!("c{k}_modes.npy"))).unwrap();
        assert_eq!(modes.shape(), [IPC, 4, 8, 8], "{what}: modes");
        assert_eq!(modes.shape(), want_modes.shape(), "{what}: modes");
        for (a, b) in modes.iter().zip(want_modes.iter()) {
            assert!((a - b).abs() <= 1e-5 + 1e-5 * b.abs(), "{what}: published mode {a} vs fixture {b}");
        }
        let want_noise: Array5<f32> = read_npy(dir.join(format!("c{k}_noise.npy"))).unwrap();
        assert_eq!(production_noise(case, k, latent_shape(&modes)), want_noise, "{what}: noise");

        let images: ndarray::Array4<u8> = read_npy(dir.join(format!("c{k}_images.npy"))).unwrap();
        assert_eq!(images.shape(), [IPC, 16, 16, 3], "{what}: reference images");
        for j in 0..IPC {
            let png = job.join("dataset").join(format!("c{k}")).join(format!("{j}.png"));
            let got = image::open(&png).unwrap().to_rgb8();
            assert_eq!((got.width(), got.height()), (16, 16), "{what}: {}", png.display());
            let want = images.index_axis(Axis(0), j);
            for (x, y, pixel) in got.enumerate_pixels() {
                for (ch, value) in pixel.0.iter().enumerate() {
                    let reference = want[[y as usize, x as usize, ch]];
                    assert!(
                        value.abs_diff(reference) <= 1,
                        "{what} sample {j} at ({x},{y}) channel {ch}: job {value} vs reference {reference}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, CLASSES * IPC * 16 * 16 * 3);
}

const DDPM: Case = Case {
    name: "ddpm",
    seed: 11,
    sampler: "ddpm",
    eta: 0.0,
    steps: 50,
    t_stop: 25,
    guidance_scale: 0.1,
    cfg_scale: 4.0,
    cfg_channels: 3,
};

/// The same job whose every model call is cut small by the per-call element ceiling and hits
/// out-of-memory faults above one item (backoff to calls of one): the same reference PNGs.
#[test]
fn a_job_under_a_small_ceiling_and_out_of_memory_writes_the_reference_pngs() {
    if std::env::var_os("MGD3_WRITE_PARITY_JOB_INPUTS").is_some() {
        return;
    }
    run_case(&DDPM, &[("MGD3_MAX_CALL_ELEMENTS", "20000".into()), ("MGD3_FAULT_OOM_ABOVE", "1".into())]);
}

#[test]
fn a_ddpm_job_writes_the_reference_pngs() {
    run_case(&DDPM, &[]);
}

#[test]
fn a_ddim_job_writes_the_reference_pngs() {
    run_case(
        &Case {
            name: "ddim",
            seed: 12,
            sampler: "ddim",
            eta: 0.5,
            steps: 25,
            t_stop: 10,
            guidance_scale: 0.1,
            cfg_scale: 4.0,
            cfg_channels: 4,
        },
        &[],
    );
}
