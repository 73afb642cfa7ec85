//! The ONNX wrappers against goldens computed by onnxruntime in Python on the tiny fixtures, plus
//! contract and input checks.

use std::path::PathBuf;

use mgd3_onnx::{Dit, Error, SessionConfig, VaeDecoder, VaeEncoder, init_runtime};
use ndarray::{Array1, Array4};
use ndarray_npy::read_npy;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn golden4(name: &str) -> Array4<f32> {
    read_npy(fixtures().join("goldens").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn golden1(name: &str) -> Array1<i64> {
    read_npy(fixtures().join("goldens").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn config(max_batch: usize) -> SessionConfig {
    init_runtime(None).expect("ONNX Runtime (run scripts/setup_ort.sh)");
    SessionConfig { intra_threads: Some(1), max_batch, ..Default::default() }
}

fn assert_close(got: &Array4<f32>, want: &Array4<f32>, tolerance: f32, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= tolerance, "{what}: max abs error {worst} > {tolerance}");
}

#[test]
fn dit_matches_python_onnxruntime_for_every_chunk_size() {
    let x = golden4("dit_x.npy");
    let (t, y) = (golden1("dit_t.npy"), golden1("dit_y.npy"));
    let want = golden4("dit_out.npy");
    for max_batch in [1, 2, 64] {
        let mut dit = Dit::load(&model("tiny_dit.onnx"), &config(max_batch)).unwrap();
        let info = dit.info().clone();
        assert_eq!(info.latent_shape, [4, 8, 8]);
        assert_eq!((info.num_classes, info.learn_sigma, info.train_timesteps), (10, true, 1000));
        assert_eq!((info.beta_schedule.as_str(), info.beta_start, info.beta_end), ("linear", 1e-4, 0.02));
        let got = dit.predict(x.view(), t.as_slice().unwrap(), y.as_slice().unwrap()).unwrap();
        assert_close(&got, &want, 1e-5, &format!("tiny DiT, max_batch {max_batch}"));
    }
}

#[test]
fn fp16_and_diffusers_dits_match_their_goldens() {
    let x = golden4("dit_x.npy");
    let (t, y) = (golden1("dit_t.npy"), golden1("dit_y.npy"));
    let mut fp16 = Dit::load(&model("tiny_dit_fp16.onnx"), &config(64)).unwrap();
    assert_eq!(fp16.info().precision, mgd3_onnx::contract::Precision::F16);
    let got = fp16.predict(x.view(), t.as_slice().unwrap(), y.as_slice().unwrap()).unwrap();
    assert_close(&got, &golden4("dit_fp16_out.npy"), 2e-3, "fp16 DiT");
    // fp16 is an approximation of the fp32 model, not a different model.
    assert_close(&got, &golden4("dit_out.npy"), 5e-2, "fp16 vs fp32 DiT");
    let mut diffusers = Dit::load(&model("tiny_dit_diffusers.onnx"), &config(64)).unwrap();
    let got = diffusers.predict(x.view(), t.as_slice().unwrap(), y.as_slice().unwrap()).unwrap();
    assert_close(&got, &golden4("dit_diffusers_out.npy"), 1e-5, "diffusers DiT");
}

#[test]
fn vae_halves_match_python_onnxruntime() {
    let mut encoder = VaeEncoder::load(&model("tiny_vae_encoder.onnx"), &config(1)).unwrap();
    assert_eq!(encoder.info().image_shape, [3, 16, 16]);
    assert_eq!(encoder.info().scale_factor, 0.18215);
    let (mean, logvar) = encoder.encode(golden4("vae_enc_image.npy").view()).unwrap();
    assert_close(&mean, &golden4("vae_enc_mean.npy"), 1e-5, "encoder mean");
    assert_close(&logvar, &golden4("vae_enc_logvar.npy"), 1e-5, "encoder logvar");
    let mut decoder = VaeDecoder::load(&model("tiny_vae_decoder.onnx"), &config(64)).unwrap();
    let image = decoder.decode(golden4("vae_dec_latent.npy").view()).unwrap();
    assert_close(&image, &golden4("vae_dec_image.npy"), 1e-5, "decoder image");
}

#[test]
fn wrong_model_kinds_and_missing_files_are_named() {
    let err = Dit::load(&model("tiny_vae_decoder.onnx"), &config(8)).err().expect("a decoder is no DiT");
    let text = err.to_string();
    assert!(text.contains("tiny_vae_decoder.onnx") && text.contains("mgd3.kind") && text.contains("dit"), "{text}");
    let err = VaeEncoder::load(&model("tiny_dit.onnx"), &config(8)).err().unwrap();
    assert!(matches!(err, Error::Contract(_)), "{err}");
    let err = Dit::load(&model("does_not_exist.onnx"), &config(8)).err().unwrap();
    assert!(matches!(err, Error::ModelNotFound(_)) && err.to_string().contains("does_not_exist.onnx"), "{err}");
}

/// A model of a newer ONNX IR version than the runtime reads (exported with a newer `onnx`
/// package) is told as such, with both versions and the way out, not as ONNX Runtime's raw
/// error (which the worker would retry).
#[test]
fn a_model_of_a_newer_ir_version_says_so() {
    let bytes = std::fs::read(model("tiny_dit.onnx")).unwrap();
    // ModelProto.ir_version is field 1, a varint, first in every file torch.onnx writes.
    assert_eq!(bytes[0], 0x08, "ir_version first");
    let mut newer = vec![0x08, 99];
    let mut at = 1;
    while bytes[at] & 0x80 != 0 {
        at += 1;
    }
    newer.extend_from_slice(&bytes[at + 1..]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("newer_dit.onnx");
    std::fs::write(&path, newer).unwrap();
    let err = Dit::load(&path, &config(8)).err().expect("IR 99 is refused");
    let text = err.to_string();
    assert!(matches!(err, Error::UnsupportedIrVersion { found: Some(99), max: Some(_), .. }), "{err:?}");
    assert!(text.contains("newer_dit.onnx` is ONNX IR version 99") && text.contains("export_onnx.py"), "{text}");
}

#[test]
fn corrupt_model_files_fail_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken_dit.onnx");
    let bytes = std::fs::read(model("tiny_dit.onnx")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    let err = Dit::load(&path, &config(8)).err().expect("truncated model");
    // Not ONNX Runtime's retryable error: the same file fails the same way every time.
    assert!(matches!(err, Error::LoadFailed { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.starts_with("ONNX Runtime cannot load model `") && text.contains("broken_dit.onnx"), "{text}");
    assert!(!text.contains("Load model from"), "the path is said once: {text}");
}

#[test]
fn malformed_contract_models_name_the_offending_item() {
    let cases = [
        ("bad_dit_rank.onnx", "input `x`"),
        ("bad_dit_no_metadata.onnx", "mgd3.num_classes"),
        ("bad_dit_missing_t.onnx", "input `t`"),
    ];
    for (file, item) in cases {
        let err = Dit::load(&model(file), &config(8)).err().unwrap_or_else(|| panic!("{file} must be refused"));
        let text = err.to_string();
        assert!(text.contains(file) && text.contains(item), "{file}: {text}");
    }
}

/// A DiT whose declared class count disagrees with its class embedding is refused at load: on
/// CUDA, labels past the table would be read with no error.
#[test]
fn a_dit_declaring_more_classes_than_its_embedding_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relabelled_dit.onnx");
    let bytes = std::fs::read(model("tiny_dit.onnx")).unwrap();
    std::fs::write(&path, mgd3_common::modelmeta::with_metadata(&bytes, "mgd3.num_classes", "1000").unwrap()).unwrap();
    let err = Dit::load(&path, &config(8)).err().expect("a DiT declaring 1000 classes over 11 rows");
    let text = err.to_string();
    assert!(text.contains("relabelled_dit.onnx") && text.contains("`mgd3.num_classes` = 1000"), "{text}");
    assert!(text.contains("11 rows: 10 classes and the null class"), "{text}");
}

#[test]
fn bad_inputs_are_rejected_before_running() {
    let mut dit = Dit::load(&model("tiny_dit.onnx"), &config(8)).unwrap();
    let x = Array4::<f32>::zeros((2, 4, 8, 8));
    let err = dit.predict(x.view(), &[10, 10], &[3, 11]).unwrap_err();
    assert!(err.to_string().contains("input `y`") && err.to_string().contains("11"), "{err}");
    let err = dit.predict(x.view(), &[1000, 10], &[3, 3]).unwrap_err();
    assert!(err.to_string().contains("input `t`"), "{err}");
    let wrong = Array4::<f32>::zeros((2, 4, 16, 16));
    let err = dit.predict(wrong.view(), &[1, 1], &[3, 3]).unwrap_err();
    assert!(err.to_string().contains("input `x`"), "{err}");
    let err = dit.predict(x.view(), &[1], &[3, 3]).unwrap_err();
    assert!(err.to_string().contains("batch"), "{err}");
}
