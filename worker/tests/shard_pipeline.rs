//! The shard-level engine on the tiny fixtures: classes that share DiT calls give the bytes of
//! each class sampled alone, every DiT call but the shard's last is full, and a contact sheet is
//! made only for classes this attempt committed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::{ImageFormat, RgbImage};
use mgd3_common::job::{ClassRef, SamplingSpec};
use mgd3_onnx::{SessionConfig, init_runtime};
use mgd3_worker::cpu::CpuPool;
use mgd3_worker::data::Dataset;
use mgd3_worker::models::{ClassSpec, ModelPaths, Runtime};
use mgd3_worker::pipeline::Engine;
use mgd3_worker::pipeline::{ClassResult, ClassSink, ShardOptions};

fn models() -> ModelPaths {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    ModelPaths {
        dit: dir.join("tiny_dit.onnx"),
        vae_encoder: dir.join("tiny_vae_encoder.onnx"),
        vae_decoder: dir.join("tiny_vae_decoder.onnx"),
    }
}

fn engine(max_batch: usize, cpu_threads: usize) -> Engine {
    init_runtime(None).expect("ONNX Runtime (run scripts/setup_ort.sh)");
    let session = SessionConfig { intra_threads: Some(1), max_batch, ..Default::default() };
    let sampling = SamplingSpec { steps: 10, stop_guidance: 5, ..Default::default() };
    let mut engine = Engine::load(&models(), &Runtime::uniform(session), sampling, 5).unwrap();
    engine.set_cpu_pool(CpuPool::new(Some(cpu_threads)));
    engine
}

fn image_folder(root: &Path, classes: &[&str], per_class: usize) {
    for (c, class) in classes.iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let phase = i as f32 * 0.9 + c as f32 * 2.1;
            let img = RgbImage::from_fn(24 + (i as u32 % 3) * 5, 20 + (c as u32) * 3, |x, y| {
                let v =
                    |k: f32| (127.0 + 120.0 * ((x as f32 * 0.4 + phase * k).sin() * (y as f32 * 0.25 - k).cos())) as u8;
                image::Rgb([v(1.0), v(1.7), v(2.3)])
            });
            let format = if i % 2 == 0 { ImageFormat::Png } else { ImageFormat::Jpeg };
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            img.save_with_format(dir.join(format!("{i:03}.{ext}")), format).unwrap();
        }
    }
}

/// Keeps what the pipeline hands over; `lose` classes report a lost commit race.
#[derive(Default)]
struct Collect {
    outputs: HashMap<String, ClassResult>,
    sheets: HashMap<String, Vec<u8>>,
    order: Vec<String>,
    lose: Vec<String>,
}

impl ClassSink for Collect {
    type Error = String;

    fn commit(&mut self, class: &ClassRef, result: ClassResult) -> Result<bool, String> {
        self.order.push(class.wnid.clone());
        self.outputs.insert(class.wnid.clone(), result);
        Ok(!self.lose.contains(&class.wnid))
    }
    fn contact_sheet(&mut self, class: &ClassRef, png: Vec<u8>) {
        assert!(self.sheets.insert(class.wnid.clone(), png).is_none(), "two sheets for class {}", class.wnid);
    }
}

fn specs(classes: &[&str], ipc: usize) -> Vec<ClassSpec> {
    classes
        .iter()
        .enumerate()
        .map(|(i, wnid)| {
            ClassSpec::new(
                ClassRef { wnid: (*wnid).into(), label: (i * 3 % 10) as i64, class_index: i as u64 + 7, listing: None },
                ipc,
            )
        })
        .collect()
}

#[test]
fn classes_sharing_dit_calls_give_the_bytes_of_each_class_alone_and_calls_are_full() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["n001", "n002", "n003"];
    image_folder(dir.path(), &names, 9);
    let dataset = Dataset::open(&dir.path().display().to_string()).unwrap();
    let (ipc, max_batch) = (3, 4);
    let classes = specs(&names, ipc);

    // One shard: 9 samples in calls of max_batch / 2 = 2 samples, so calls mix classes.
    let mut shard = engine(max_batch, 2);
    let mut got = Collect { lose: vec!["n002".into()], ..Default::default() };
    let stats = shard.distill_shard(&dataset, &classes, ShardOptions { contact_sheet: true }, &mut got).unwrap();
    assert_eq!(got.order, names, "classes are handed over in order");

    // Every DiT call but those of the last sampling run carries max_batch rows (cond + uncond).
    let steps = 10;
    let runs: Vec<&[usize]> = stats.dit_rows.chunks(steps).collect();
    assert_eq!(runs.len(), 5, "{:?}", stats.dit_rows);
    for run in &runs[..4] {
        assert!(run.iter().all(|rows| *rows == max_batch), "{:?}", stats.dit_rows);
    }
    assert!(runs[4].iter().all(|rows| *rows == 2), "{:?}", stats.dit_rows);

    // Each class alone, in calls that hold the whole class, on one CPU thread.
    for (slot, class) in classes.iter().enumerate() {
        let mut alone = engine(64, 1);
        let output = alone.distill_class(&dataset, class, true).unwrap();
        let sheet = output.contact_sheet.clone();
        let shared = &got.outputs[&class.wnid];
        assert_eq!(output.files.modes_npy, shared.files.modes_npy, "{}: modes", class.wnid);
        assert_eq!(output.files.images.len(), ipc);
        for (j, (a, b)) in output.files.images.iter().zip(&shared.files.images).enumerate() {
            assert!(a == b, "{} sample {j}: PNG bytes differ between the shared and the lone run", class.wnid);
        }
        // A sheet for every class this attempt committed, none for the one it lost.
        match got.sheets.get(&class.wnid) {
            Some(png) => assert_eq!(Some(png), sheet.as_ref(), "{}: contact sheet", class.wnid),
            None => assert_eq!(slot, 1, "{}: no contact sheet", class.wnid),
        }
        assert_eq!(output.timings.real_images, 9);
    }
    assert_eq!(got.sheets.len(), 2);
    let sheet = image::load_from_memory(&got.sheets["n001"]).unwrap();
    assert!(sheet.width() >= 3 * 16 && sheet.height() >= 3 * 16, "three rows of IPC images");
}

#[test]
fn a_failing_class_names_itself_and_the_other_classes_are_handed_over() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["n001", "n002", "n003"];
    image_folder(dir.path(), &names, 6);
    std::fs::write(dir.path().join("n002/005.jpg"), b"not a jpeg").unwrap();
    let dataset = Dataset::open(&dir.path().display().to_string()).unwrap();
    let mut shard = engine(4, 2);
    let mut got = Collect::default();
    let error =
        shard.distill_shard(&dataset, &specs(&names, 2), ShardOptions { contact_sheet: false }, &mut got).unwrap_err();
    match error {
        mgd3_worker::pipeline::ShardStop::Engine { class, error } => {
            assert_eq!(class.as_deref(), Some("n002"));
            assert!(error.to_string().contains("005.jpg"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(got.order, ["n001", "n003"], "the classes before and after the failing one are handed over");
    assert!(got.sheets.is_empty());
}

/// A class with fewer distinct images than IPC fails naming the identical files, group by group,
/// whether its latents were just encoded or came from the latent cache.
#[test]
fn a_class_of_too_few_distinct_images_names_the_identical_files() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data, &["n001"], 6);
    let class_dir = data.join("n001");
    for (from, to) in [("000.png", "002.png"), ("000.png", "004.png"), ("001.jpg", "003.jpg")] {
        std::fs::copy(class_dir.join(from), class_dir.join(to)).unwrap();
    }
    let dataset = Dataset::open(&data.display().to_string()).unwrap();
    let cache = mgd3_common::store::open(&dir.path().join("cache").display().to_string()).unwrap();
    let class = &specs(&["n001"], 4)[0];
    for attempt in ["encoded", "cached"] {
        let mut engine = engine(8, 1);
        engine.set_latent_cache(Some(cache.clone()));
        let error = match engine.distill_class(&dataset, class, false) {
            Err(error) => mgd3_common::error_chain(&error),
            Ok(_) => panic!("{attempt}: a class of 3 distinct images distilled at IPC 4"),
        };
        for expected in ["class `n001` holds identical images", "000.png` = `", "002.png` = `", "004.png`; `"] {
            assert!(error.contains(expected), "{attempt}: `{expected}` missing from: {error}");
        }
        assert!(error.contains("001.jpg` = `") && error.contains("003.jpg`)"), "{attempt}: {error}");
        assert!(error.contains("only 3 distinct images among 6"), "{attempt}: {error}");
        assert!(!error.contains("005.jpg"), "{attempt}: a distinct image named: {error}");
    }
}

/// A cancel while the engine waits on the data stage ends the shard promptly with `Cancelled`
/// (a lease revoked or a shutdown during decoding).
#[test]
fn a_cancel_during_the_data_phase_ends_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["n001", "n002", "n003"];
    image_folder(dir.path(), &names, 150);
    let dataset = Dataset::open(&dir.path().display().to_string()).unwrap();
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let flag = cancel.clone();
    std::thread::spawn(move || {
        let mut shard = engine(4, 1);
        shard.set_cancel_flag(flag);
        let result = shard.distill_shard(
            &dataset,
            &specs(&names, 2),
            ShardOptions { contact_sheet: false },
            &mut Collect::default(),
        );
        let _ = done_tx.send(result.map(|_| ()));
    });
    std::thread::sleep(std::time::Duration::from_millis(40));
    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    match done_rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the shard ended after the cancel") {
        Err(mgd3_worker::pipeline::ShardStop::Engine { error, .. }) => {
            assert!(matches!(*error, mgd3_worker::models::EngineError::Cancelled), "{error}")
        }
        other => panic!("expected Cancelled, got {other:?}"),
    }
}

/// A revoked lease's flag stops sampling before the next DiT call (a class is a whole trajectory:
/// minutes at DiT-XL/2 scale, all discarded), where the cancel flag alone lets the batch finish:
/// set from the start, no DiT call is made, no class is handed over, and the shard ends Cancelled.
#[test]
fn a_revoked_shard_stops_before_its_next_dit_call() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["n001", "n002"];
    image_folder(dir.path(), &names, 6);
    let dataset = Dataset::open(&dir.path().display().to_string()).unwrap();
    let mut shard = engine(8, 1);
    shard.set_stop_now(Some(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true))));
    let mut got = Collect::default();
    match shard.distill_shard(&dataset, &specs(&names, 2), ShardOptions { contact_sheet: false }, &mut got) {
        Err(mgd3_worker::pipeline::ShardStop::Engine { class: None, error }) => {
            assert!(matches!(*error, mgd3_worker::models::EngineError::Cancelled), "{error}")
        }
        other => panic!("expected Cancelled, got {other:?}"),
    }
    assert!(got.outputs.is_empty() && got.order.is_empty(), "a class was handed over");
    // Cleared, the same engine runs the shard to the end.
    shard.set_stop_now(None);
    let stats =
        shard.distill_shard(&dataset, &specs(&names, 2), ShardOptions { contact_sheet: false }, &mut got).unwrap();
    assert_eq!(got.order, names);
    assert!(!stats.dit_rows.is_empty());
}

/// A VAE that gives NaN or an infinity never reaches a committed file (fp16 SD-VAE overflow,
/// diffusers 4325, 7188, 9844): the encoder's failure names the model and the real image, the
/// decoder's the model and the sample, both say what to do, and nothing is handed to the sink.
#[test]
fn non_finite_vae_outputs_fail_the_class_naming_the_model_and_the_item() {
    let dir = tempfile::tempdir().unwrap();
    image_folder(dir.path(), &["n001"], 6);
    // One image holding black pixels: the poisoned encoders turn exactly its latent non-finite.
    RgbImage::from_fn(24, 24, |x, _| image::Rgb(if x < 12 { [0, 0, 0] } else { [200, 90, 40] }))
        .save(dir.path().join("n001/002-black.png"))
        .unwrap();
    let dataset = Dataset::open(&dir.path().display().to_string()).unwrap();
    let classes = specs(&["n001"], 2);
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let load = |paths: ModelPaths| {
        init_runtime(None).expect("ONNX Runtime (run scripts/setup_ort.sh)");
        let session = SessionConfig { intra_threads: Some(1), max_batch: 8, ..Default::default() };
        let sampling = SamplingSpec { steps: 4, stop_guidance: 2, ..Default::default() };
        Engine::load(&paths, &Runtime::uniform(session), sampling, 5).unwrap()
    };
    for (encoder, value) in [("nan_vae_encoder.onnx", "NaN"), ("inf_vae_encoder.onnx", "inf")] {
        let mut engine = load(ModelPaths { vae_encoder: fixtures.join(encoder), ..models() });
        let mut got = Collect::default();
        let error =
            engine.distill_shard(&dataset, &classes, ShardOptions { contact_sheet: true }, &mut got).unwrap_err();
        let text = match error {
            mgd3_worker::pipeline::ShardStop::Engine { error, .. } => {
                assert!(matches!(*error, mgd3_worker::models::EngineError::NonFinite { .. }), "{error:?}");
                mgd3_common::error_chain(&*error)
            }
            other => panic!("{encoder}: expected a class failure, got {other:?}"),
        };
        for needle in ["class `n001`", "real image `", "002-black.png", encoder, &format!("({value})"), "`mean`"] {
            assert!(text.contains(needle), "{encoder}: `{needle}` missing from: {text}");
        }
        assert!(got.outputs.is_empty(), "{encoder}: a class was handed over");
    }
    let mut engine = load(ModelPaths { vae_decoder: fixtures.join("nan_vae_decoder.onnx"), ..models() });
    let mut got = Collect::default();
    let error = engine.distill_shard(&dataset, &classes, ShardOptions { contact_sheet: true }, &mut got).unwrap_err();
    let text = match error {
        mgd3_worker::pipeline::ShardStop::Engine { error, .. } => mgd3_common::error_chain(&*error),
        other => panic!("expected a class failure, got {other:?}"),
    };
    for needle in ["class `n001`", "sample 0", "nan_vae_decoder.onnx", "(NaN)", "`image`"] {
        assert!(text.contains(needle), "`{needle}` missing from: {text}");
    }
    assert!(got.outputs.is_empty() && got.sheets.is_empty(), "a class was handed over");
}

/// The data a class is made from is the data submitted: images added, removed or rewritten with
/// another size after submit fail the class naming what changed, before anything is encoded; the
/// same files with other modification times (a copy staged with `cp -r`) are used.
#[test]
fn a_class_that_changed_since_submit_fails_naming_the_change() {
    let dir = tempfile::tempdir().unwrap();
    image_folder(dir.path(), &["n001"], 6);
    let dataset = Dataset::open(&dir.path().display().to_string()).unwrap();
    let submitted = mgd3_common::imagefolder::list_local_class(dir.path(), "n001").unwrap().summary();
    let class = |listing| {
        vec![ClassSpec::new(ClassRef { wnid: "n001".into(), label: 3, class_index: 0, listing: Some(listing) }, 2)]
    };
    let run = |classes: &[ClassSpec]| {
        let mut got = Collect::default();
        let result = engine(8, 1).distill_shard(&dataset, classes, ShardOptions { contact_sheet: false }, &mut got);
        let copied = got.outputs.get("n001").map(|r| r.timings.versions_changed);
        (result.map(|_| ()), got.outputs.len(), copied)
    };
    let image = dir.path().join("n001/000.png");
    let original = std::fs::read(&image).unwrap();
    // Unchanged, then the same bytes with a new modification time: distilled, and the second
    // recorded for the marker.
    assert_eq!(run(&class(submitted.clone())).2, Some(false));
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&image, &original).unwrap();
    assert_eq!(run(&class(submitted.clone())).2, Some(true));
    type Change<'a> = Box<dyn Fn() + 'a>;
    let changes: [(&str, Change, &str); 3] = [
        ("added", Box::new(|| std::fs::copy(&image, dir.path().join("n001/new.png")).map(|_| ()).unwrap()), "7 images"),
        ("removed", Box::new(|| std::fs::remove_file(dir.path().join("n001/001.jpg")).unwrap()), "5 images"),
        ("rewritten", Box::new(|| std::fs::write(&image, &original[..original.len() - 1]).unwrap()), "6 images"),
    ];
    for (what, change, now) in changes {
        let snapshot = tempfile::tempdir().unwrap();
        copy_dir(&dir.path().join("n001"), snapshot.path());
        change();
        let (result, committed, _) = run(&class(submitted.clone()));
        let error = match result {
            Err(mgd3_worker::pipeline::ShardStop::Engine { error, .. }) => mgd3_common::error_chain(&*error),
            other => panic!("{what}: expected the class to fail, got {other:?}"),
        };
        assert!(
            error.contains("class `n001` changed since the job recorded it")
                && error.contains("--accept-data-changes")
                && error.contains("6 images")
                && error.contains(&format!("{now}, ")),
            "{what}: {error}"
        );
        assert_eq!(committed, 0, "{what}");
        std::fs::remove_dir_all(dir.path().join("n001")).unwrap();
        copy_dir(snapshot.path(), &dir.path().join("n001"));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A sink for shards that must fail before any class commits.
struct Refuse;

impl ClassSink for Refuse {
    type Error = mgd3_worker::shard::ShardError;
    fn commit(&mut self, class: &ClassRef, _: ClassResult) -> Result<bool, Self::Error> {
        panic!("{} was committed", class.wnid)
    }
    fn contact_sheet(&mut self, _: &ClassRef, _: Vec<u8>) {}
}

/// The fixture models' folder, and a scratch folder holding the ImageFolder `data/n001` (4 images).
fn model_fixtures_and_one_class() -> (PathBuf, tempfile::TempDir) {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let dir = tempfile::tempdir().unwrap();
    image_folder(&dir.path().join("data"), &["n001"], 4);
    (fixtures, dir)
}

/// A model whose external data is not all on this worker (deleted, cut short or linked from
/// outside the model's folder after submit) is this worker's problem, not the job's: the shard
/// goes to other workers (no attempt spent), naming the model and the file, before ONNX Runtime
/// is asked to load it.
#[test]
fn a_model_whose_external_data_is_not_here_sends_the_shard_elsewhere() {
    use mgd3_worker::shard::{Disposition, OnnxShardEngine, ShardEngine};
    let (fixtures, dir) = model_fixtures_and_one_class();
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("weights")).unwrap();
    for file in ["tiny_vae_decoder.onnx", "model.onnx_data", "weights/rest.bin"] {
        std::fs::copy(fixtures.join("external").join(file), models.join(file)).unwrap();
    }
    let spec = |decoder: &Path| {
        mgd3_common::job::JobSpec::from_toml(&format!(
            "dataset = \"{}\"\nclasses = [\"n001\"]\nipc = 2\n[sampling]\nsteps = 4\nstop_guidance = 2\n[models]\n\
             dit = \"{}\"\nvae_encoder = \"{}\"\nvae_decoder = \"{}\"\n",
            dir.path().join("data").display(),
            fixtures.join("tiny_dit.onnx").display(),
            fixtures.join("tiny_vae_encoder.onnx").display(),
            decoder.display()
        ))
        .unwrap()
    };
    init_runtime(None).expect("ONNX Runtime (run scripts/setup_ort.sh)");
    let classes = [ClassRef { wnid: "n001".into(), label: 1, class_index: 0, listing: None }];
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let decoder = models.join("tiny_vae_decoder.onnx");
    let full = std::fs::read(models.join("model.onnx_data")).unwrap();
    let outside = dir.path().join("outside.bin");
    std::fs::write(&outside, &full).unwrap();
    type Break<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let breaks: [Break; 3] = [
        ("model.onnx_data", Box::new(|| std::fs::remove_file(models.join("model.onnx_data")).unwrap())),
        ("cut short", Box::new(|| std::fs::write(models.join("model.onnx_data"), &full[..1000]).unwrap())),
        (
            "outside its own folder",
            Box::new(|| {
                std::fs::remove_file(models.join("model.onnx_data")).unwrap();
                std::os::unix::fs::symlink(&outside, models.join("model.onnx_data")).unwrap();
            }),
        ),
    ];
    for (what, damage) in breaks {
        let _ = std::fs::remove_file(models.join("model.onnx_data"));
        std::fs::write(models.join("model.onnx_data"), &full).unwrap();
        damage();
        let session = SessionConfig { intra_threads: Some(1), max_batch: 8, ..Default::default() };
        let mut engine = OnnxShardEngine::new(Runtime::uniform(session), CpuPool::new(Some(1)));
        let error = engine.distill_shard(&spec(&decoder), &classes, &cancel, &mut Refuse).unwrap_err();
        assert_eq!(error.failure.disposition(), Disposition::Elsewhere, "{what}: {error}");
        let text = mgd3_common::error_chain(&error);
        assert!(text.contains("tiny_vae_decoder.onnx") && text.contains(what), "{what}: {text}");
    }
}

/// A model file that is another kind or no model on this worker, though the job was submitted
/// with other bytes at that path, is this node's copy gone wrong (replaced after submit, a bad
/// copy): the shard goes elsewhere naming the fingerprints. The same file as the job's own is the
/// job's mistake and fails it.
#[test]
fn a_model_file_that_changed_here_after_submit_sends_the_shard_elsewhere() {
    use mgd3_worker::shard::{Disposition, OnnxShardEngine, ShardEngine};
    let (fixtures, dir) = model_fixtures_and_one_class();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    for file in ["tiny_dit.onnx", "tiny_vae_encoder.onnx", "tiny_vae_decoder.onnx"] {
        std::fs::copy(fixtures.join(file), models.join(file)).unwrap();
    }
    let fingerprint = |file: &str| mgd3_common::fingerprint_file(&models.join(file)).unwrap();
    let spec = |encoder_fingerprint: &str| {
        mgd3_common::job::JobSpec::from_toml(&format!(
            "dataset = \"{}\"\nclasses = [\"n001\"]\nipc = 2\n[sampling]\nsteps = 4\nstop_guidance = 2\n[models]\n\
             dit = \"{m}/tiny_dit.onnx\"\nvae_encoder = \"{m}/tiny_vae_encoder.onnx\"\nvae_decoder = \"{m}/tiny_vae_decoder.onnx\"\n\
             vae_encoder_fingerprint = \"{encoder_fingerprint}\"\n",
            dir.path().join("data").display(),
            m = models.display(),
        ))
        .unwrap()
    };
    let submitted = spec(&fingerprint("tiny_vae_encoder.onnx"));
    init_runtime(None).expect("ONNX Runtime (run scripts/setup_ort.sh)");
    let classes = [ClassRef { wnid: "n001".into(), label: 1, class_index: 0, listing: None }];
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let run = |spec: &mgd3_common::job::JobSpec| {
        let session = SessionConfig { intra_threads: Some(1), max_batch: 8, ..Default::default() };
        let mut engine = OnnxShardEngine::new(Runtime::uniform(session), CpuPool::new(Some(1)));
        engine.distill_shard(spec, &classes, &cancel, &mut Refuse).unwrap_err()
    };
    let encoder = models.join("tiny_vae_encoder.onnx");
    type Break<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let breaks: [Break; 2] = [
        ("another kind", Box::new(|| std::fs::copy(models.join("tiny_vae_decoder.onnx"), &encoder).map(drop).unwrap())),
        ("no model", Box::new(|| std::fs::write(&encoder, b"not a model\n").unwrap())),
    ];
    for (what, damage) in breaks {
        damage();
        let error = run(&submitted);
        assert_eq!(error.failure.disposition(), Disposition::Elsewhere, "{what}: {error}");
        let text = mgd3_common::error_chain(&error);
        assert!(text.contains("tiny_vae_encoder.onnx") && text.contains("the job expects"), "{what}: {text}");
        // Submitted with these very bytes, the job itself is wrong: everywhere, for good.
        let error = run(&spec(&fingerprint("tiny_vae_encoder.onnx")));
        let disposition = if what == "no model" { Disposition::Elsewhere } else { Disposition::GiveUp };
        assert_eq!(error.failure.disposition(), disposition, "{what}: {error}");
        assert!(!mgd3_common::error_chain(&error).contains("the job expects"), "{what}: {error}");
    }
}

/// A latent-cache hit gives the bytes of a miss: the same modes, PNGs, contact sheet and quality
/// numbers, with no image decoded for encoding and no VAE encode.
#[test]
fn a_latent_cache_hit_gives_the_bytes_of_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    image_folder(&dir.path().join("data"), &["n001"], 9);
    let dataset = Dataset::open(&dir.path().join("data").display().to_string()).unwrap();
    let cache = mgd3_common::store::open(&dir.path().join("cache").display().to_string()).unwrap();
    let class = &specs(&["n001"], 3)[0];
    let run = || {
        let mut engine = engine(8, 1);
        engine.set_latent_cache(Some(cache.clone()));
        engine.distill_class(&dataset, class, true).unwrap()
    };
    let miss = run();
    let hit = run();
    assert!(!miss.timings.latent_cache_hit && hit.timings.latent_cache_hit);
    assert_eq!(hit.timings.stages.encode, 0.0);
    assert_eq!(hit.timings.real_images, miss.timings.real_images);
    assert!(hit.files.modes_npy == miss.files.modes_npy, "modes differ");
    assert!(hit.files.images == miss.files.images, "PNG bytes differ");
    assert!(hit.contact_sheet == miss.contact_sheet, "contact sheets differ");
    assert_eq!(hit.quality, miss.quality);

    // Entries damaged in place (same size, still well-formed `.npy`) are not used: the class is
    // encoded and clustered again, to the same bytes.
    let entries: Vec<std::path::PathBuf> = walk(&dir.path().join("cache"));
    assert_eq!(entries.len(), 2, "latents and modes: {entries:?}");
    for entry in &entries {
        let mut bytes = std::fs::read(entry).unwrap();
        let inside = bytes.len() - 80; // a value of the array, before the checksum
        bytes[inside] ^= 0x01;
        std::fs::write(entry, bytes).unwrap();
    }
    let redone = run();
    assert!(!redone.timings.latent_cache_hit, "damaged cached latents were used");
    assert!(redone.files.modes_npy == miss.files.modes_npy && redone.files.images == miss.files.images);

    // A job that records its classes' contents (`data_fingerprint = "content"`) misses the
    // entries of other contents at the same names and sizes (files rewritten in place).
    let with_content = |digest: &str| {
        let mut class = class.clone();
        let listing = dataset.list_class("n001").unwrap().summary();
        class.class.listing =
            Some(mgd3_common::imagefolder::ListingSummary { content_digest: Some(digest.into()), ..listing });
        let mut engine = engine(8, 1);
        engine.set_latent_cache(Some(cache.clone()));
        engine.distill_class(&dataset, &class, true).unwrap().timings.latent_cache_hit
    };
    assert!(!with_content("sha256:aa"), "an entry of unrecorded contents was used");
    assert!(with_content("sha256:aa"), "the same contents missed");
    assert!(!with_content("sha256:bb"), "an entry of other contents was used");
}

/// Files rewritten in place at the same names and sizes (uncompressed images, a regenerated
/// dataset) miss the latent cache whatever the job records, so the class gives the bytes of a
/// run without the cache (latents and modes of the old pixels never reach it); the same files
/// with other modification times (a copy of the dataset, a `touch`) still hit it.
#[test]
fn a_class_rewritten_at_the_same_names_and_sizes_misses_the_latent_cache() {
    let dir = tempfile::tempdir().unwrap();
    let class_dir = dir.path().join("data").join("n001");
    std::fs::create_dir_all(&class_dir).unwrap();
    // BMP: every file of one size has the same byte count whatever its pixels.
    let write = |phase: f32| {
        for i in 0..9 {
            let img = RgbImage::from_fn(24, 20, |x, y| {
                let k = i as f32 * 0.9 + phase;
                let v = |f: f32| (127.0 + 120.0 * ((x as f32 * 0.4 + k * f).sin() * (y as f32 * 0.25 - f).cos())) as u8;
                image::Rgb([v(1.0), v(1.7), v(2.3)])
            });
            img.save_with_format(class_dir.join(format!("{i:03}.bmp")), ImageFormat::Bmp).unwrap();
        }
    };
    write(0.0);
    let dataset = Dataset::open(&dir.path().join("data").display().to_string()).unwrap();
    let cache = mgd3_common::store::open(&dir.path().join("cache").display().to_string()).unwrap();
    let class = &specs(&["n001"], 3)[0];
    let run = |cached: bool| {
        let mut engine = engine(8, 1);
        if cached {
            engine.set_latent_cache(Some(cache.clone()));
        }
        engine.distill_class(&dataset, class, true).unwrap()
    };
    let first = run(true);
    assert!(!first.timings.latent_cache_hit);
    let before = dataset.list_class("n001").unwrap().summary();
    // File times come from a coarse clock: rewrites a few ms later could keep them.
    std::thread::sleep(std::time::Duration::from_millis(50));
    write(5.0);
    let now = dataset.list_class("n001").unwrap().summary();
    assert_eq!(before.names_digest, now.names_digest, "the rewrite keeps names and sizes");
    let rewritten = run(true);
    let fresh = run(false);
    assert!(!rewritten.timings.latent_cache_hit, "latents of pixels no longer there were used");
    assert!(!rewritten.timings.modes_cache_hit, "modes of pixels no longer there were used");
    assert!(rewritten.files.modes_npy != first.files.modes_npy, "the new pixels have other modes");
    assert!(rewritten.files.modes_npy == fresh.files.modes_npy, "modes differ from a run without the cache");
    assert!(rewritten.files.images == fresh.files.images, "PNGs differ from a run without the cache");

    // The same bytes written again (a copy, as `cp -r` to node-local scratch makes): other
    // modification times, the same contents: the cache is used, to the same bytes.
    std::thread::sleep(std::time::Duration::from_millis(50));
    for i in 0..9 {
        let path = class_dir.join(format!("{i:03}.bmp"));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
    assert_ne!(dataset.list_class("n001").unwrap().summary().digest, now.digest, "the copy has other times");
    let copied = run(true);
    assert!(copied.timings.latent_cache_hit && copied.timings.modes_cache_hit, "a copy of the same files missed");
    assert!(copied.files.modes_npy == fresh.files.modes_npy && copied.files.images == fresh.files.images);
    // The entry now records the copy's times: the next job over it is a hit without reading.
    let copy_listing = dataset.list_class("n001").unwrap().summary().digest;
    let entries: Vec<_> = walk(&dir.path().join("cache"))
        .into_iter()
        .filter(|p| p.starts_with(dir.path().join("cache/latents")))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = std::fs::read(&entries[0]).unwrap();
    assert!(
        entry.windows(copy_listing.len()).any(|w| w == copy_listing.as_bytes()),
        "the entry does not record the copy's listing"
    );

    // Rewritten in place once more and given the old modification times back (`touch -r`, or a
    // `cp -p` from a regenerated source onto the files): the same names, sizes and mtimes, other
    // pixels. Only the change time says so; the cache must not be a hit unread.
    let times: Vec<_> =
        (0..9).map(|i| std::fs::metadata(class_dir.join(format!("{i:03}.bmp"))).unwrap().modified().unwrap()).collect();
    std::thread::sleep(std::time::Duration::from_millis(50));
    write(9.0);
    for (i, time) in times.iter().enumerate() {
        let file = std::fs::File::options().write(true).open(class_dir.join(format!("{i:03}.bmp"))).unwrap();
        file.set_modified(*time).unwrap();
    }
    let back = dataset.list_class("n001").unwrap().summary();
    assert_eq!(back.names_digest, now.names_digest, "the rewrite keeps names and sizes");
    let retimed = run(true);
    let retimed_fresh = run(false);
    assert!(!retimed.timings.latent_cache_hit, "latents of pixels no longer there were used (mtimes restored)");
    assert!(retimed.files.modes_npy != copied.files.modes_npy, "the new pixels have other modes");
    assert!(
        retimed.files.modes_npy == retimed_fresh.files.modes_npy && retimed.files.images == retimed_fresh.files.images
    );
}

/// Every file below `root`.
fn walk(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { files.extend(walk(&path)) } else { files.push(path) }
    }
    files.sort();
    files
}

/// Every size runs and gives the same bytes (issue: one batch policy per model, bounded calls):
/// a class at IPC 128 under a per-call element ceiling forced small (calls of a few rows or
/// images of every model), and under out-of-memory faults above 3 items (backoff), equals the
/// class run with the default ceiling and no fault, PNG for PNG.
#[test]
fn forced_small_ceilings_and_out_of_memory_backoff_keep_every_byte_at_ipc_128() {
    let dir = tempfile::tempdir().unwrap();
    image_folder(&dir.path().join("data"), &["n001"], 130);
    let dataset = Dataset::open(&dir.path().join("data").display().to_string()).unwrap();
    let class = &specs(&["n001"], 128)[0];
    let run = |configure: &dyn Fn(SessionConfig) -> SessionConfig| {
        init_runtime(None).expect("ONNX Runtime (run scripts/setup_ort.sh)");
        let session = configure(SessionConfig { intra_threads: Some(1), ..Default::default() });
        let runtime = Runtime {
            policy: mgd3_common::batch::BatchPolicy { dit_rows: 256, ..Default::default() },
            ..Runtime::uniform(session)
        };
        let sampling = SamplingSpec { steps: 10, stop_guidance: 5, ..Default::default() };
        let mut engine = Engine::load(&models(), &runtime, sampling, 5).unwrap();
        engine.set_cpu_pool(CpuPool::new(Some(1)));
        let calls = (
            engine.models().dit().call_limit().items,
            engine.models().encoder().call_limit().items,
            engine.models().decoder().call_limit().items,
        );
        (engine.distill_class(&dataset, class, false).unwrap(), calls)
    };
    let (reference, calls) = run(&|s| s);
    assert_eq!(calls, (256, 64, 64));
    assert_eq!(reference.files.images.len(), 128);
    // The element ceiling of ~2 of the DiT's largest tensors: DiT calls of a few rows, VAE calls
    // of one or two images.
    let dit_item = {
        init_runtime(None).unwrap();
        mgd3_onnx::Dit::load(&models().dit, &SessionConfig::default()).unwrap().call_limit().item_elements
    };
    let (small, calls) = run(&|s| SessionConfig { max_call_elements: 2 * dit_item, ..s });
    assert!(calls.0 <= 2 && calls.1 <= 2 && calls.2 <= 2, "{calls:?}");
    assert!(small.files.modes_npy == reference.files.modes_npy, "modes differ under a small ceiling");
    assert!(small.files.images == reference.files.images, "PNGs differ under a small ceiling");
    let (backoff, _) = run(&|s| SessionConfig { fault_oom_above: Some(3), ..s });
    assert!(backoff.files.modes_npy == reference.files.modes_npy, "modes differ after backoff");
    assert!(backoff.files.images == reference.files.images, "PNGs differ after backoff");

    // Out of memory even at one item: the class fails naming the model, and another attempt
    // may run it (another worker, or this card once another process let go of it).
    let session = SessionConfig { intra_threads: Some(1), fault_oom_above: Some(0), ..Default::default() };
    let sampling = SamplingSpec { steps: 10, stop_guidance: 5, ..Default::default() };
    let mut engine = Engine::load(&models(), &Runtime::uniform(session), sampling, 5).unwrap();
    engine.set_cpu_pool(CpuPool::new(Some(1)));
    let Err(error) = engine.distill_class(&dataset, &specs(&["n001"], 7)[0], false) else {
        panic!("a class whose encoder is out of memory at one image succeeded");
    };
    assert!(error.is_retryable(), "{error}");
    let message = mgd3_common::error_chain(&error);
    assert!(message.contains("tiny_vae_encoder.onnx") && message.contains("ran out of memory"), "{message}");
    // On the CPU it is the machine's memory: --gpu-memory-limit (CUDA only) is not the advice.
    assert!(message.contains("on cpu") && !message.contains("--gpu-memory-limit"), "{message}");
}

/// Two DiT batches in flight (`--overlap on`, the default) give the same bytes as one at a time:
/// a shard of three classes (IPC 13, 11, 9: 33 samples in DiT batches of 4, mixing classes) with
/// guidance, DDPM and DDIM, makes the same DiT calls and writes the same modes, PNGs and contact
/// sheets either way; with overlap on, batches were sampled in pairs.
#[test]
fn two_batches_in_flight_give_the_same_bytes_as_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["n001", "n002", "n003"];
    image_folder(&dir.path().join("data"), &names, 16);
    let dataset = Dataset::open(&dir.path().join("data").display().to_string()).unwrap();
    let mut classes = specs(&names, 13);
    classes[1].ipc = 11;
    classes[2].ipc = 9;
    for sampler in [mgd3_common::job::SamplerKind::Ddpm, mgd3_common::job::SamplerKind::Ddim] {
        let run = |overlap: bool| {
            init_runtime(None).expect("ONNX Runtime (run scripts/setup_ort.sh)");
            let session = SessionConfig { intra_threads: Some(1), ..Default::default() };
            let runtime = Runtime {
                policy: mgd3_common::batch::BatchPolicy { dit_rows: 8, ..Default::default() },
                overlap,
                ..Runtime::uniform(session)
            };
            let sampling = SamplingSpec { steps: 10, stop_guidance: 4, sampler, ..Default::default() };
            let mut engine = Engine::load(&models(), &runtime, sampling, 11).unwrap();
            engine.set_cpu_pool(CpuPool::new(Some(1)));
            let mut got = mgd3_worker::pipeline::Kept::default();
            let stats =
                engine.distill_shard(&dataset, &classes, ShardOptions { contact_sheet: true }, &mut got).unwrap();
            // The progress the lease reports: every image once per step, in pairs or not.
            let image_steps = got.image_steps.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(image_steps, (13 + 11 + 9) * 10, "{sampler:?} overlap {overlap}: image-steps counted");
            (got.classes, stats)
        };
        let (alone, alone_stats) = run(false);
        let (paired, paired_stats) = run(true);
        assert_eq!(alone_stats.paired_batches, 0);
        assert!(paired_stats.paired_batches >= 6, "{} batches sampled in pairs", paired_stats.paired_batches);
        let sorted = |stats: &mgd3_worker::pipeline::ShardStats| {
            let mut rows = stats.dit_rows.clone();
            rows.sort_unstable();
            rows
        };
        assert_eq!(sorted(&alone_stats), sorted(&paired_stats), "the same DiT calls");
        assert_eq!(alone.len(), 3);
        let by_class = |classes: &[(ClassRef, ClassResult)]| {
            let mut v: Vec<_> = classes
                .iter()
                .map(|(c, r)| {
                    (c.wnid.clone(), r.files.modes_npy.clone(), r.files.images.clone(), r.contact_sheet.clone())
                })
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let (a, b) = (by_class(&alone), by_class(&paired));
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.0, y.0);
            assert!(x.1 == y.1, "{sampler:?} {}: modes differ", x.0);
            assert!(x.2 == y.2, "{sampler:?} {}: PNGs differ with two batches in flight", x.0);
            assert!(x.3 == y.3, "{sampler:?} {}: contact sheets differ", x.0);
        }
    }
}

/// With `--dit-rows auto` the engine chooses the DiT's rows when it loads a job's models and
/// publishes its policy (with the rows chosen) beside the models' fingerprints, where the client
/// reads it for its polls and registrations; before any load there is none.
#[test]
fn an_auto_engine_publishes_the_rows_it_chose_at_load() {
    use mgd3_worker::shard::{OnnxShardEngine, ShardEngine, ShardError};
    struct Keep(usize);
    impl ClassSink for Keep {
        type Error = ShardError;
        fn commit(&mut self, _: &ClassRef, _: ClassResult) -> Result<bool, ShardError> {
            self.0 += 1;
            Ok(true)
        }
        fn contact_sheet(&mut self, _: &ClassRef, _: Vec<u8>) {}
    }
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let dir = tempfile::tempdir().unwrap();
    image_folder(&dir.path().join("data"), &["n001"], 4);
    let spec = mgd3_common::job::JobSpec::from_toml(&format!(
        "dataset = \"{}\"\nclasses = [\"n001\"]\nipc = 2\n[sampling]\nsteps = 4\nstop_guidance = 2\n[models]\n\
         dit = \"{}\"\nvae_encoder = \"{}\"\nvae_decoder = \"{}\"\n",
        dir.path().join("data").display(),
        fixtures.join("tiny_dit.onnx").display(),
        fixtures.join("tiny_vae_encoder.onnx").display(),
        fixtures.join("tiny_vae_decoder.onnx").display()
    ))
    .unwrap();
    init_runtime(None).expect("ONNX Runtime (run scripts/setup_ort.sh)");
    let session = SessionConfig { intra_threads: Some(1), ..Default::default() };
    let runtime = Runtime {
        auto_rows: Some(mgd3_worker::models::AutoRows { free_memory_bytes: Some(1 << 40), ..Default::default() }),
        ..Runtime::uniform(session)
    };
    let mut engine = OnnxShardEngine::new(runtime, CpuPool::new(Some(1)));
    let published = engine.loaded_models();
    assert_eq!(published.policy(), None);
    let classes = [ClassRef { wnid: "n001".into(), label: 1, class_index: 0, listing: None }];
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut sink = Keep(0);
    engine.distill_shard(&spec, &classes, &cancel, &mut sink).unwrap();
    assert_eq!(sink.0, 1);
    let policy = published.policy().expect("published at load");
    assert_eq!(policy.dit_rows, 1024, "the most rows, with a terabyte free");
    assert_eq!(policy.encode_images, 64);
    assert_eq!(published.get().len(), 3, "the fingerprints beside it");
}
