//! Bounded calls on the CPU: the load-time probe measures each model's largest tensor per item,
//! a per-call element ceiling forced small splits calls, and out-of-memory backoff (through the
//! fault seam) halves them; none of it changes one byte of any result.

use std::path::PathBuf;

use mgd3_onnx::{Dit, Error, SessionConfig, VaeDecoder, VaeEncoder, init_runtime};
use ndarray::Array4;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

fn model(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(name)
}

fn config(max_batch: usize) -> SessionConfig {
    init_runtime(None).expect("ONNX Runtime (run scripts/setup_ort.sh)");
    SessionConfig { intra_threads: Some(1), max_batch, ..Default::default() }
}

fn random(shape: (usize, usize, usize, usize), seed: u64) -> Array4<f32> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    Array4::from_shape_simple_fn(shape, || rng.gen_range(-1.0f32..1.0))
}

/// Batch sizes of the issue: IPC 1, 7, 128 and 500.
const SIZES: [usize; 4] = [1, 7, 128, 500];

#[test]
fn the_probe_measures_the_largest_tensor_per_item() {
    let decoder = VaeDecoder::load(&model("tiny_vae_decoder.onnx"), &config(64)).unwrap();
    let limit = decoder.call_limit();
    // The decoder's output alone is 3 × 16 × 16 per image; its 32-channel 16 × 16 activations
    // after the upsample are the largest (8,192, as shape inference on the graph says).
    assert!(limit.item_elements >= 32 * 16 * 16, "{limit:?}");
    assert_eq!(limit.ceiling as u64, i32::MAX as u64 / limit.item_elements);
    assert_eq!(limit.items, 64, "the policy binds at the default ceiling");
    let dit = Dit::load(&model("tiny_dit.onnx"), &config(64)).unwrap();
    assert!(dit.call_limit().item_elements >= 8 * 8 * 8, "{:?}", dit.call_limit());
}

#[test]
fn calls_split_by_a_small_ceiling_give_the_bytes_of_one_call() {
    let items_per_call = 3;
    let mut one_call = VaeDecoder::load(&model("tiny_vae_decoder.onnx"), &config(1000)).unwrap();
    let element = one_call.call_limit().item_elements;
    let forced = SessionConfig { max_call_elements: element * items_per_call, ..config(1000) };
    let mut split = VaeDecoder::load(&model("tiny_vae_decoder.onnx"), &forced).unwrap();
    assert_eq!(split.call_limit().items, items_per_call as usize, "{:?}", split.call_limit());
    for n in SIZES {
        let latents = random((n, 4, 8, 8), n as u64);
        assert_eq!(split.decode(latents.view()).unwrap(), one_call.decode(latents.view()).unwrap(), "decode of {n}");
    }

    let mut one_call = VaeEncoder::load(&model("tiny_vae_encoder.onnx"), &config(1000)).unwrap();
    let element = one_call.call_limit().item_elements;
    let forced = SessionConfig { max_call_elements: element * 2, ..config(1000) };
    let mut split = VaeEncoder::load(&model("tiny_vae_encoder.onnx"), &forced).unwrap();
    assert_eq!(split.call_limit().items, 2);
    for n in SIZES {
        let images = random((n, 3, 16, 16), 100 + n as u64);
        assert_eq!(split.encode(images.view()).unwrap(), one_call.encode(images.view()).unwrap(), "encode of {n}");
    }

    let mut one_call = Dit::load(&model("tiny_dit.onnx"), &config(1000)).unwrap();
    let element = one_call.call_limit().item_elements;
    let forced = SessionConfig { max_call_elements: element * 5, ..config(1000) };
    let mut split = Dit::load(&model("tiny_dit.onnx"), &forced).unwrap();
    assert_eq!(split.call_limit().items, 5);
    for n in SIZES {
        let x = random((n, 4, 8, 8), 200 + n as u64);
        let t: Vec<i64> = (0..n as i64).map(|i| (i * 37) % 1000).collect();
        let y: Vec<i64> = (0..n as i64).map(|i| i % 11).collect();
        assert_eq!(split.predict(x.view(), &t, &y).unwrap(), one_call.predict(x.view(), &t, &y).unwrap(), "DiT {n}");
    }
}

#[test]
fn out_of_memory_halves_the_call_keeps_the_bytes_and_fails_at_one_item() {
    let latents = random((40, 4, 8, 8), 7);
    let want = VaeDecoder::load(&model("tiny_vae_decoder.onnx"), &config(64)).unwrap().decode(latents.view()).unwrap();
    // Calls of more than 5 images fail as an exhausted CUDA arena would: the call of 40 is
    // retried as 20, 10, then 5.
    let faulty = SessionConfig { fault_oom_above: Some(5), ..config(64) };
    let mut decoder = VaeDecoder::load(&model("tiny_vae_decoder.onnx"), &faulty).unwrap();
    assert_eq!(decoder.decode(latents.view()).unwrap(), want);
    let limit = decoder.call_limit();
    assert_eq!((limit.items, limit.backoff, limit.policy), (5, 5, 64), "{limit:?}");
    // The smaller size is kept: the next call starts at 5.
    assert_eq!(decoder.decode(latents.view()).unwrap(), want);
    assert_eq!(decoder.call_limit().items, 5);
    // A new shard tries the policy again.
    decoder.reset_backoff();
    assert_eq!(decoder.call_limit().items, 64);

    let hopeless = SessionConfig { fault_oom_above: Some(0), ..config(64) };
    let mut decoder = VaeDecoder::load(&model("tiny_vae_decoder.onnx"), &hopeless).unwrap();
    let error = decoder.decode(latents.view()).unwrap_err();
    match &error {
        Error::OutOfMemory { model, requested_bytes, device, .. } => {
            assert!(model.ends_with("tiny_vae_decoder.onnx"));
            assert_eq!(device, "cpu");
            assert!(requested_bytes.is_some_and(|b| b > 0), "{requested_bytes:?}");
        }
        other => panic!("expected OutOfMemory, got {other}"),
    }
    let message = error.to_string();
    assert!(message.contains("tiny_vae_decoder.onnx") && message.contains("1 item per call"), "{message}");
}

#[test]
fn the_memory_one_item_takes_is_measured_at_load_when_asked() {
    let measured = SessionConfig { measure_item_bytes: true, ..config(64) };
    // The decoder's activations per image: its largest tensor alone is item_elements f32s, and
    // the arena holds at least that per extra image, and less than a hundred such tensors.
    let decoder = VaeDecoder::load(&model("tiny_vae_decoder.onnx"), &measured).unwrap();
    let limit = decoder.call_limit();
    assert!(limit.item_bytes >= limit.item_elements * 4, "{limit:?}");
    assert!(limit.item_bytes < limit.item_elements * 4 * 100, "{limit:?}");
    let mut dit = Dit::load(&model("tiny_dit.onnx"), &measured).unwrap();
    let rows = dit.call_limit();
    assert!(rows.item_bytes >= rows.item_elements * 4, "{rows:?}");
    // Unasked, nothing is measured (two calls fewer at load).
    assert_eq!(Dit::load(&model("tiny_dit.onnx"), &config(64)).unwrap().call_limit().item_bytes, 0);

    // Rows chosen after load bound the calls as the policy does, and change no result.
    let x = random((12, 4, 8, 8), 3);
    let t: Vec<i64> = (0..12).map(|i| 50 * i).collect();
    let y: Vec<i64> = (0..12).map(|i| i % 10).collect();
    let want = dit.predict(x.view(), &t, &y).unwrap();
    dit.set_rows(5);
    assert_eq!((dit.call_limit().policy, dit.call_limit().items), (5, 5));
    assert_eq!(dit.predict(x.view(), &t, &y).unwrap(), want);
}
