//! Engine benchmark (`cargo bench -p mgd3-worker --bench engine`, or scripts/bench_engine.sh):
//! one class end to end with the per-stage time split, the share of sampling time spent in the
//! DiT (ONNX Runtime) versus the guidance maths, and images/s at batch 1 vs batched, measured
//! side by side in one run. Defaults to the tiny fixtures; point MGD3_BENCH_DIT,
//! MGD3_BENCH_VAE_ENCODER, MGD3_BENCH_VAE_DECODER (+ MGD3_BENCH_DEVICE, MGD3_BENCH_DATA,
//! MGD3_BENCH_CLASS) at real models and data to measure those.

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::{ImageFormat, RgbImage};
use mgd3_common::job::{ClassRef, SamplingSpec};
use mgd3_onnx::{SessionConfig, init_runtime};
use mgd3_worker::models::{ClassSpec, ClassTimings, ModelPaths, Runtime};
use mgd3_worker::pipeline::Engine;

fn env_or(key: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(key).map(PathBuf::from).unwrap_or(default)
}

fn synthetic_class(root: &Path, class: &str, count: usize) {
    let dir = root.join(class);
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..count {
        let phase = i as f32 * 0.37;
        let img = RgbImage::from_fn(500, 375, |x, y| {
            let v =
                |k: f32| (127.0 + 120.0 * ((x as f32 * 0.02 + phase * k).sin() * (y as f32 * 0.03 - k).cos())) as u8;
            image::Rgb([v(1.0), v(2.0), v(3.0)])
        });
        img.save_with_format(dir.join(format!("{i:04}.jpg")), ImageFormat::Jpeg).unwrap();
    }
}

fn row(name: &str, secs: f64, total: f64) {
    println!("  {name:<22} {secs:>9.3} s  {:>5.1} %", 100.0 * secs / total);
}

fn main() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let paths = ModelPaths {
        dit: env_or("MGD3_BENCH_DIT", fixtures.join("tiny_dit.onnx")),
        vae_encoder: env_or("MGD3_BENCH_VAE_ENCODER", fixtures.join("tiny_vae_encoder.onnx")),
        vae_decoder: env_or("MGD3_BENCH_VAE_DECODER", fixtures.join("tiny_vae_decoder.onnx")),
    };
    let device = std::env::var("MGD3_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let ipc: usize = std::env::var("MGD3_BENCH_IPC").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let scratch = tempfile::tempdir().unwrap();
    let (data, class) = match (std::env::var_os("MGD3_BENCH_DATA"), std::env::var("MGD3_BENCH_CLASS")) {
        (Some(d), Ok(c)) => (PathBuf::from(d), c),
        _ => {
            let images: usize = std::env::var("MGD3_BENCH_IMAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(260);
            synthetic_class(scratch.path(), "n01440764", images);
            (scratch.path().to_owned(), "n01440764".to_owned())
        }
    };
    init_runtime(None).expect("ONNX Runtime: run scripts/setup_ort.sh");
    let spec = ClassSpec::new(ClassRef { wnid: class.clone(), label: 0, class_index: 0, listing: None }, ipc);
    println!("mgd3 engine benchmark: DiT {}, device {device}, class {class}, IPC {ipc}, 50 steps", paths.dit.display());

    // One full class, batched.
    let session =
        SessionConfig { device: device.parse().unwrap(), intra_threads: None, max_batch: 64, ..Default::default() };
    let mut engine = Engine::load(&paths, &Runtime::uniform(session), SamplingSpec::default(), 0).unwrap();
    let started = Instant::now();
    let output = engine
        .distill_class(&mgd3_worker::data::Dataset::open(&data.display().to_string()).unwrap(), &spec, false)
        .unwrap();
    let modes: ndarray::Array4<f32> = ndarray_npy::ReadNpyExt::read_npy(&output.files.modes_npy[..]).unwrap();
    let wall = started.elapsed().as_secs_f64();
    let t: ClassTimings = output.timings;
    let total = t.total().as_secs_f64();
    println!("\nper-class time split ({} real images, {} samples, wall {wall:.3} s):", t.real_images, ipc);
    row("image decode+resize", t.stages.decode, total);
    row("VAE encode", t.stages.encode, total);
    row("k-means", t.stages.kmeans, total);
    row("DiT calls", t.stages.dit, total);
    row("guidance maths", t.stages.guidance, total);
    row("VAE decode", t.stages.vae_decode, total);
    row("PNG encode", t.stages.png, total);
    let sampling = t.stages.dit + t.stages.guidance;
    println!("  share of sampling time inside ONNX Runtime (DiT calls): {:.1} %", 100.0 * t.stages.dit / sampling);

    // Sampling throughput at batch 1 vs batched, same modes and noise.
    let noise = engine.class_noise(&spec);
    let labels = vec![0i64; ipc];
    let mut rates = vec![];
    for max_batch in [2, 2 * ipc.min(32)] {
        let session =
            SessionConfig { device: device.parse().unwrap(), intra_threads: None, max_batch, ..Default::default() };
        let mut engine = Engine::load(&paths, &Runtime::uniform(session), SamplingSpec::default(), 0).unwrap();
        let mut timings = ClassTimings::default();
        let started = Instant::now();
        engine.sample_latents(&class, &labels, modes.view(), noise.view(), &mut timings).unwrap();
        let secs = started.elapsed().as_secs_f64();
        rates.push(ipc as f64 / secs);
        println!(
            "sampling, {:>2} samples per DiT call: {:>8.2} images/s ({} DiT calls)",
            engine.samples_per_call(),
            ipc as f64 / secs,
            timings.dit_calls
        );
    }
    println!("batched / batch-1 throughput ratio: {:.2}x", rates[1] / rates[0]);
}
