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
use mgd3_worker::engine::{ClassOutput, ClassSpec, Engine, ModelPaths};
use mgd3_worker::pipeline::{ClassOutputs, ShardOptions};

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
    let mut engine = Engine::load(&models(), &session, sampling, 5).unwrap();
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
    outputs: HashMap<usize, ClassOutput>,
    sheets: HashMap<usize, Vec<u8>>,
    order: Vec<usize>,
    lose: Vec<usize>,
}

impl ClassOutputs<String> for Collect {
    fn class_done(&mut self, index: usize, output: ClassOutput) -> Result<bool, String> {
        self.order.push(index);
        self.outputs.insert(index, output);
        Ok(!self.lose.contains(&index))
    }
    fn contact_sheet(&mut self, index: usize, png: Vec<u8>) {
        assert!(self.sheets.insert(index, png).is_none(), "two sheets for class {index}");
    }
}

fn specs(classes: &[&str], ipc: usize) -> Vec<ClassSpec> {
    classes
        .iter()
        .enumerate()
        .map(|(i, wnid)| {
            ClassSpec::new(
                ClassRef { wnid: (*wnid).into(), label: (i * 3 % 10) as i64, class_index: i as u64 + 7 },
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
    let mut got = Collect { lose: vec![1], ..Default::default() };
    let stats = shard.distill_shard(&dataset, &classes, ShardOptions { contact_sheet: true }, &mut got).unwrap();
    assert_eq!(got.order, [0, 1, 2], "classes are handed over in order");

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
        let (output, sheet) = alone.distill_class(&dataset, class, true).unwrap();
        let shared = &got.outputs[&slot];
        assert_eq!(output.modes, shared.modes, "{}: modes", class.wnid);
        assert_eq!(output.images.len(), ipc);
        for (j, (a, b)) in output.images.iter().zip(&shared.images).enumerate() {
            assert!(a == b, "{} sample {j}: PNG bytes differ between the shared and the lone run", class.wnid);
        }
        // A sheet for every class this attempt committed, none for the one it lost.
        match got.sheets.get(&slot) {
            Some(png) => assert_eq!(Some(png), sheet.as_ref(), "{}: contact sheet", class.wnid),
            None => assert_eq!(slot, 1, "{}: no contact sheet", class.wnid),
        }
        assert_eq!(output.timings.real_images, 9);
    }
    assert_eq!(got.sheets.len(), 2);
    let sheet = image::load_from_memory(&got.sheets[&0]).unwrap();
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
    assert_eq!(got.order, [0, 2], "the classes before and after the failing one are handed over");
    assert!(got.sheets.is_empty());
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
            assert!(matches!(*error, mgd3_worker::engine::EngineError::Cancelled), "{error}")
        }
        other => panic!("expected Cancelled, got {other:?}"),
    }
}
