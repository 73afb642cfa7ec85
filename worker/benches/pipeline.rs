//! Pipeline benchmark (`scripts/bench_pipeline.sh`, which prepares its inputs and runs the
//! Python reference first): mgd3's data phase and shard pipeline against what a user would run
//! instead (the reference's PIL loader on a process pool + scikit-learn `KMeans`), side by side
//! on the same JPEG photographs, the same stand-in models (real shapes: 256 px images, 4×32×32
//! latents, 1 000 classes) and the same features. Prints a table of ratios and writes
//! `target/bench-data/pipeline.json`.
//!
//! Inputs (set by the script): `MGD3_BENCH_DATA` (ImageFolder), `MGD3_BENCH_MODELS` (folder with
//! dit.onnx, vae_encoder.onnx, vae_decoder.onnx), `MGD3_BENCH_REFERENCE` (reference.json),
//! `MGD3_BENCH_FEATURES` (features.npy, `[n, 4096]` f32), `MGD3_BENCH_CROPS` (PIL crops, uint8
//! `[m, 256, 256, 3]`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mgd3_common::job::{ClassRef, SamplingSpec};
use mgd3_onnx::{SessionConfig, init_runtime};
use mgd3_worker::cpu::{CpuPool, available_cpus};
use mgd3_worker::data::{self, Dataset};
use mgd3_worker::mgd3::modes::{find_modes, squared_distance};
use mgd3_worker::models::{ClassSpec, ModelPaths, Runtime};
use mgd3_worker::pipeline::Engine;
use mgd3_worker::pipeline::{ClassResult, ClassSink, ShardOptions, ShardStats};
use ndarray::{Array2, Array4};
use ndarray_npy::read_npy;
use rayon::prelude::*;
use serde_json::{Value, json};

fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key).map(PathBuf::from)
}

struct Discard;

impl ClassSink for Discard {
    type Error = ();

    fn commit(&mut self, _: &ClassRef, _: ClassResult) -> Result<bool, ()> {
        Ok(true)
    }
    fn contact_sheet(&mut self, _: &ClassRef, _: Vec<u8>) {}
}

/// Images/s of read + decode + `center_crop_arr` + ToTensor over `paths` on `threads` threads.
fn preprocess_rate(paths: &[PathBuf], threads: usize, decode_only: bool) -> f64 {
    let pool = CpuPool::new(Some(threads));
    let started = Instant::now();
    pool.install(|| {
        paths.par_iter().for_each_init(
            || vec![0f32; 3 * 256 * 256],
            |out, path| {
                let bytes = std::fs::read(path).unwrap();
                if decode_only {
                    std::hint::black_box(data::decode(&bytes, path, 3).unwrap());
                } else {
                    std::hint::black_box(data::preprocess_into(&bytes, path, 3, 256, out).unwrap());
                }
            },
        )
    });
    paths.len() as f64 / started.elapsed().as_secs_f64()
}

/// Σ over points of the squared distance to the nearest centroid (sklearn's `inertia_`).
fn inertia(features: &Array2<f32>, centroids: &[f32], dim: usize) -> f64 {
    features
        .outer_iter()
        .map(|x| {
            let x = x.as_slice().unwrap();
            centroids.chunks_exact(dim).map(|c| squared_distance(x, c) as f64).fold(f64::INFINITY, f64::min)
        })
        .sum()
}

fn engine(models: &Path, threads: usize, pool: &CpuPool) -> Engine {
    let paths = ModelPaths {
        dit: models.join("dit.onnx"),
        vae_encoder: models.join("vae_encoder.onnx"),
        vae_decoder: models.join("vae_decoder.onnx"),
    };
    let session = SessionConfig { intra_threads: Some(threads), max_batch: 64, ..Default::default() };
    let mut engine = Engine::load(&paths, &Runtime::uniform(session), SamplingSpec::default(), 0).unwrap();
    engine.set_cpu_pool(pool.clone());
    engine
}

fn classes(names: &[String], ipc: usize) -> Vec<ClassSpec> {
    names
        .iter()
        .enumerate()
        .map(|(i, w)| {
            ClassSpec::new(ClassRef { wnid: w.clone(), label: i as i64, class_index: i as u64, listing: None }, ipc)
        })
        .collect()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() {
    let (Some(data_dir), Some(models), Some(reference), Some(features_path)) = (
        env_path("MGD3_BENCH_DATA"),
        env_path("MGD3_BENCH_MODELS"),
        env_path("MGD3_BENCH_REFERENCE"),
        env_path("MGD3_BENCH_FEATURES"),
    ) else {
        println!("pipeline bench: run scripts/bench_pipeline.sh (it prepares the data, models and reference)");
        return;
    };
    init_runtime(None).expect("ONNX Runtime (scripts/setup_ort.sh)");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
    let cpus = available_cpus();
    let dataset = Dataset::open(&data_dir.display().to_string()).unwrap();
    let names: Vec<String> = std::fs::read_to_string(data_dir.join("classes.txt"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    let class = reference["class"].as_str().unwrap_or(&names[0]).to_owned();
    let paths: Vec<PathBuf> =
        dataset.list_class(&class).unwrap().images.iter().map(|i| PathBuf::from(i.display())).collect();
    let mut report = json!({ "cpus": cpus, "class": class, "images": paths.len() });
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!("mgd3 pipeline benchmark: class {class}, {} JPEGs, {cpus} CPUs", paths.len());
    println!("reference: {}", reference["versions"]);

    // 1. Decode + preprocess: one core vs PIL, scaling to every core.
    std::hint::black_box(preprocess_rate(&paths[..64.min(paths.len())], 1, false));
    let one = preprocess_rate(&paths, 1, false);
    let decode_one = preprocess_rate(&paths, 1, true);
    let pil = num(&reference["decode_preprocess_1core_images_per_s"]);
    let pil_decode = num(&reference["decode_only_images_per_s"]);
    println!("\n## decode + preprocess (read, decode, center_crop_arr 256, ToTensor)");
    println!("  one core      mgd3 {one:>7.1} img/s   PIL {pil:>7.1} img/s   ratio {:.2}x", one / pil);
    println!(
        "  decode only   mgd3 {decode_one:>7.1} img/s   PIL {pil_decode:>7.1} img/s   ratio {:.2}x",
        decode_one / pil_decode
    );
    let mut scaling = Vec::new();
    for threads in 1..=cpus {
        let rate = if threads == 1 { one } else { preprocess_rate(&paths, threads, false) };
        let efficiency = rate / (threads as f64 * one);
        println!("  {threads} thread(s)  {rate:>7.1} img/s   {:.2}x one core   efficiency {efficiency:.2}", rate / one);
        scaling.push(json!({ "threads": threads, "images_per_s": rate, "efficiency": efficiency }));
    }
    report["decode_preprocess"] = json!({ "one_core": one, "pil_one_core": pil, "ratio": one / pil,
        "decode_only": decode_one, "pil_decode_only": pil_decode, "scaling": scaling });

    // 2. Crops against PIL's on the same files (JPEG decoders may differ by a grey level or two).
    if let Some(crops) = env_path("MGD3_BENCH_CROPS").filter(|p| p.exists()) {
        let pil: Array4<u8> = read_npy(&crops).unwrap();
        let (mut equal, mut total, mut worst) = (0usize, 0usize, 0u8);
        for (i, want) in pil.outer_iter().enumerate() {
            let bytes = std::fs::read(&paths[i]).unwrap();
            let got = data::center_crop(&data::decode(&bytes, &paths[i], 3).unwrap(), 256);
            for (a, b) in got.data.iter().zip(want.iter()) {
                equal += usize::from(a == b);
                worst = worst.max(a.abs_diff(*b));
                total += 1;
            }
        }
        println!(
            "\n## crops vs PIL on {} photos: {:.2} % of bytes equal, largest difference {worst} (JPEG decoder)",
            pil.shape()[0],
            100.0 * equal as f64 / total as f64
        );
        report["crops_vs_pil"] =
            json!({ "images": pil.shape()[0], "equal_fraction": equal as f64 / total as f64, "max_diff": worst });
    }

    // 3. k-means on the reference's own features.
    let features: Array2<f32> = read_npy(&features_path).unwrap();
    let (n, dim) = features.dim();
    let flat = features.as_slice().unwrap();
    let pool = CpuPool::new(Some(cpus));
    println!(
        "\n## k-means on {n} × {dim} features (one k-means++ run, Lloyd; time: best of 3; inertia: mean over seeds)"
    );
    let mut kmeans = serde_json::Map::new();
    for k in [10usize, 50, 100] {
        let mut best = Duration::MAX;
        let mut centroids = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            centroids = pool.install(|| find_modes(flat, n, dim, k, 0).unwrap());
            best = best.min(started.elapsed());
        }
        let r = &reference["kmeans"][k.to_string()];
        // Quality: mean inertia over the same number of seeds on both sides (one run's inertia
        // depends on its seed by up to ~2 %).
        let seeds = r["seeds"].as_u64().unwrap_or(1);
        let ours = (0..seeds)
            .map(|seed| {
                let found = if seed == 0 {
                    centroids.clone()
                } else {
                    pool.install(|| find_modes(flat, n, dim, k, seed).unwrap())
                };
                inertia(&features, &found, dim)
            })
            .sum::<f64>()
            / seeds as f64;
        let sk_inertia = r.get("inertia_mean_seeds").map_or(num(&r["inertia"]), num);
        let (sk_all, sk_one) = (num(&r["seconds_all"]), num(&r["seconds_1thread"]));
        println!(
            "  k = {k:>3}   mgd3 {:>6.3} s   sklearn {sk_all:>6.3} s ({cpus} threads), {sk_one:>6.3} s (1 thread)   time ratio {:.2}x   inertia ratio {:.4}",
            secs(best),
            secs(best) / sk_all,
            ours / sk_inertia
        );
        kmeans.insert(
            k.to_string(),
            json!({ "seconds": secs(best), "sklearn_seconds_all": sk_all,
            "sklearn_seconds_1thread": sk_one, "time_ratio": secs(best) / sk_all, "inertia": ours,
            "sklearn_inertia": sk_inertia, "inertia_ratio": ours / sk_inertia }),
        );
    }
    report["kmeans"] = Value::Object(kmeans);

    // 4. The data phase (list, read, decode, preprocess, encode, k-means) of one class, measured
    //    inside the real shard pipeline: the time until its modes are known.
    println!("\n## data phase of one class (list, decode, resize/crop, VAE encode, k-means), {cpus} CPUs");
    let mut phases = serde_json::Map::new();
    for ipc in [10usize, 50, 100] {
        let mut engine = engine(&models, cpus, &pool);
        let one_class = classes(std::slice::from_ref(&class), ipc);
        let stats =
            engine.distill_shard(&dataset, &one_class, ShardOptions { contact_sheet: false }, &mut Discard).unwrap();
        let ours = secs(stats.modes_ready[0].unwrap());
        let theirs = num(&reference["data_phase"][ipc.to_string()]["total_s"]);
        println!("  IPC {ipc:>3}   mgd3 {ours:>6.2} s   reference {theirs:>6.2} s   speed-up {:.2}x", theirs / ours);
        phases.insert(
            ipc.to_string(),
            json!({ "seconds": ours, "reference_seconds": theirs, "speedup": theirs / ours,
            "stages": { "data": secs(stats.data), "encode": secs(stats.encode), "kmeans": secs(stats.kmeans) } }),
        );
    }
    report["data_phase"] = Value::Object(phases);

    // 5. A 4-class shard at IPC 10: wall time against its busiest stage, and DiT rows per call.
    if names.len() >= 4 {
        let mut engine = engine(&models, cpus, &pool);
        let shard = classes(&names[..4], 10);
        let stats: ShardStats =
            engine.distill_shard(&dataset, &shard, ShardOptions { contact_sheet: true }, &mut Discard).unwrap();
        let (busiest, busy) = stats.busiest_stage();
        println!("\n## 4-class shard, IPC 10 (every stage, contact sheets on)");
        println!(
            "  wall {:.2} s   stages: data {:.2}  encode {:.2}  k-means {:.2}  sample {:.2}  finish {:.2}  commit {:.2}",
            secs(stats.wall),
            secs(stats.data),
            secs(stats.encode),
            secs(stats.kmeans),
            secs(stats.sample),
            secs(stats.finish),
            secs(stats.commit)
        );
        println!(
            "  wall / busiest stage ({busiest}) = {:.3}   (sum of stages / wall = {:.2})",
            secs(stats.wall) / secs(busy),
            (secs(stats.data)
                + secs(stats.encode)
                + secs(stats.kmeans)
                + secs(stats.sample)
                + secs(stats.finish)
                + secs(stats.commit))
                / secs(stats.wall)
        );
        let steps = 50;
        let runs: Vec<usize> = stats.dit_rows.chunks(steps).map(|run| run[0]).collect();
        let full = runs.iter().filter(|rows| **rows == 64).count();
        println!(
            "  DiT calls: {} sampling runs of {steps} calls, rows per call {:?}; {full} of {} runs full (64 rows = --max-batch)",
            runs.len(),
            runs,
            runs.len()
        );
        report["shard"] = json!({ "classes": 4, "ipc": 10, "wall": secs(stats.wall), "busiest_stage": busiest,
            "busiest_seconds": secs(busy), "ratio": secs(stats.wall) / secs(busy), "stages": { "data": secs(stats.data),
            "encode": secs(stats.encode), "kmeans": secs(stats.kmeans), "sample": secs(stats.sample),
            "finish": secs(stats.finish), "commit": secs(stats.commit) }, "dit_rows_per_run": runs });
    }
    let out = data_dir.parent().unwrap_or(Path::new(".")).join("pipeline.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("\nwrote {}", out.display());
}
