//! Calls through ONNX Runtime's I/O binding give the bytes of plain `Session::run` calls: across
//! sampling steps that keep the labels bound, when the labels change between calls and back, in
//! chunked calls, in fp16, and for both VAE halves.

use std::path::PathBuf;

use mgd3_onnx::{Dit, SessionConfig, VaeDecoder, VaeEncoder, init_runtime};
use ndarray::Array4;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

fn model(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(name)
}

fn config(max_batch: usize, io_binding: bool) -> SessionConfig {
    init_runtime(None).expect("ONNX Runtime (run scripts/setup_ort.sh)");
    SessionConfig { intra_threads: Some(1), max_batch, io_binding, ..Default::default() }
}

fn random(shape: (usize, usize, usize, usize), seed: u64) -> Array4<f32> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    Array4::from_shape_simple_fn(shape, || rng.gen_range(-1.0f32..1.0))
}

fn bits(a: &Array4<f32>) -> Vec<u32> {
    a.iter().map(|x| x.to_bits()).collect()
}

/// A sampling-like sequence of calls: the same labels over several steps (bound once), then other
/// labels at the same step, then the first ones again, then another batch size.
fn steps(n: usize) -> Vec<(Array4<f32>, Vec<i64>, Vec<i64>)> {
    let labels = |k: i64| (0..n as i64).map(|i| (i * 3 + k) % 11).collect::<Vec<_>>();
    let mut calls = Vec::new();
    for (step, t) in [999i64, 750, 500, 250].into_iter().enumerate() {
        calls.push((random((n, 4, 8, 8), step as u64), vec![t; n], labels(0)));
    }
    let x = random((n, 4, 8, 8), 9);
    calls.push((x.clone(), vec![250; n], labels(5)));
    calls.push((x.clone(), vec![250; n], labels(0)));
    calls.push((x, vec![0; n], labels(5)));
    calls
}

fn same_as_plain(name: &str, max_batch: usize) {
    let mut bound = Dit::load(&model(name), &config(max_batch, true)).unwrap();
    let mut plain = Dit::load(&model(name), &config(max_batch, false)).unwrap();
    assert!(bound.io_bound(), "{name}: the CPU takes the binding");
    assert!(!plain.io_bound());
    assert!(bound.describe().ends_with("I/O binding"), "{}", bound.describe());
    for n in [1, 7, 12] {
        for (i, (x, t, y)) in steps(n).into_iter().enumerate() {
            let a = bound.predict(x.view(), &t, &y).unwrap();
            let b = plain.predict(x.view(), &t, &y).unwrap();
            assert_eq!(bits(&a), bits(&b), "{name}, {n} rows, call {i}");
        }
    }
}

#[test]
fn the_dit_through_io_binding_gives_the_bytes_of_plain_runs() {
    same_as_plain("tiny_dit.onnx", 64);
    // Chunked calls: each chunk binds its own labels.
    same_as_plain("tiny_dit.onnx", 5);
    same_as_plain("tiny_dit_fp16.onnx", 64);
    same_as_plain("tiny_dit_fused.onnx", 4);
}

#[test]
fn a_stale_label_would_be_seen() {
    // The same x and t with other labels gives another output: the comparison above would catch
    // labels left bound from the call before.
    let mut dit = Dit::load(&model("tiny_dit.onnx"), &config(64, true)).unwrap();
    let x = random((3, 4, 8, 8), 1);
    let a = dit.predict(x.view(), &[500; 3], &[1, 2, 3]).unwrap();
    let b = dit.predict(x.view(), &[500; 3], &[4, 5, 6]).unwrap();
    assert_ne!(bits(&a), bits(&b));
    assert_eq!(bits(&dit.predict(x.view(), &[500; 3], &[1, 2, 3]).unwrap()), bits(&a));
}

#[test]
fn the_vae_through_io_binding_gives_the_bytes_of_plain_runs() {
    for max_batch in [64, 3] {
        let mut bound = VaeDecoder::load(&model("tiny_vae_decoder.onnx"), &config(max_batch, true)).unwrap();
        let mut plain = VaeDecoder::load(&model("tiny_vae_decoder.onnx"), &config(max_batch, false)).unwrap();
        for n in [1, 7] {
            let latents = random((n, 4, 8, 8), 30 + n as u64);
            let (a, b) = (bound.decode(latents.view()).unwrap(), plain.decode(latents.view()).unwrap());
            assert_eq!(bits(&a), bits(&b), "decode of {n} at {max_batch}");
        }
        let mut bound = VaeEncoder::load(&model("tiny_vae_encoder.onnx"), &config(max_batch, true)).unwrap();
        let mut plain = VaeEncoder::load(&model("tiny_vae_encoder.onnx"), &config(max_batch, false)).unwrap();
        for n in [1, 7] {
            let images = random((n, 3, 16, 16), 40 + n as u64);
            let (a, b) = (bound.encode(images.view()).unwrap(), plain.encode(images.view()).unwrap());
            assert_eq!(a, b, "encode of {n} at {max_batch}");
        }
    }
}
