//! Parity with an independent Python reference of the MGD³ step (scripts/parity_reference.py):
//! with injected noise, every x_{i−1} of the 50-step trajectory must match within 1e-5 relative /
//! 1e-4 absolute, for t_stop ∈ {S, 25, 0} and 3 or 4 CFG-guided channels; the decoded PNG pixels
//! within one grey level. The same holds for the fused graphs of the same models
//! (`scripts/export_onnx.py fuse`: fused attention and GELU) against the reference run with
//! them (`fixtures/parity_fused`, `parity_reference.py --graph fused`): the fused DiT differs
//! from the plain one by ~3e-7 relative per call, which guidance amplifies to ~1e-4 over a
//! trajectory, so each graph has its own reference.

use std::path::PathBuf;

use mgd3_common::job::SamplingSpec;
use mgd3_onnx::{Dit, SessionConfig, VaeDecoder, init_runtime};
use mgd3_worker::cpu::CpuPool;
use mgd3_worker::models::{ClassTimings, decode_png, sample_run, schedule_for};
use ndarray::{Array4, Array5, ArrayView4, Axis};
use ndarray_npy::read_npy;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn session() -> SessionConfig {
    init_runtime(None).expect("ONNX Runtime (run scripts/setup_ort.sh)");
    SessionConfig { intra_threads: Some(1), max_batch: 64, ..Default::default() }
}

fn assert_parity(got: ArrayView4<f32>, want: ArrayView4<f32>, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}");
    for ((index, a), b) in got.indexed_iter().zip(want.iter()) {
        assert!((a - b).abs() <= 1e-4 + 1e-5 * b.abs(), "{what} at {index:?}: rust {a} vs reference {b}");
    }
}

/// The plain exports, their reference trajectories' folder.
const PLAIN: (&str, &str, &str) = ("tiny_dit.onnx", "tiny_vae_decoder.onnx", "parity");
/// Their fused rewrites, theirs.
const FUSED: (&str, &str, &str) = ("tiny_dit_fused.onnx", "tiny_vae_decoder_fused.onnx", "parity_fused");

fn run_case(case: &str) {
    run_case_with(case, PLAIN);
}

/// The case with the DiT and decoder files of `fixtures/models` and the folder of reference
/// trajectories and images; params, modes and noise are always those of `fixtures/parity`.
fn run_case_with(case: &str, (dit_file, decoder_file, reference): (&str, &str, &str)) {
    let dir = fixtures().join("parity").join(case);
    let want = fixtures().join(reference).join(case);
    let params: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("params.json")).unwrap()).unwrap();
    let guidance = SamplingSpec {
        guidance_scale: params["guidance_scale"].as_f64().unwrap() as f32,
        stop_guidance: params["t_stop"].as_u64().unwrap() as usize,
        cfg_scale: params["cfg_scale"].as_f64().unwrap() as f32,
        cfg_channels: params["cfg_channels"].as_u64().unwrap() as usize,
        steps: params["steps"].as_u64().unwrap() as usize,
        ..Default::default()
    };
    let steps = params["steps"].as_u64().unwrap() as usize;
    let label = params["label"].as_i64().unwrap();
    let modes: Array4<f32> = read_npy(dir.join("modes.npy")).unwrap();
    let noise: Array5<f32> = read_npy(dir.join("noise.npy")).unwrap();
    let trajectory: Array5<f32> = read_npy(want.join("trajectory.npy")).unwrap();
    let n = modes.shape()[0];

    let session = session();
    let mut dit = Dit::load(&fixtures().join("models").join(dit_file), &session).unwrap();
    let schedule = schedule_for(&dit, steps).unwrap();
    let mut checked = 0;
    // The functions a shard runs: one sampling run, then decode and PNG.
    let mut rows = Vec::new();
    let (latents, _) =
        sample_run(&mut dit, &schedule, &guidance, &vec![label; n], modes.view(), noise.view(), &mut rows, |k, x| {
            assert_parity(x, trajectory.index_axis(Axis(1), k), &format!("{case} step k={k}"));
            checked += 1;
        })
        .unwrap();
    assert_eq!(checked, steps);
    assert_eq!(rows, vec![2 * n; steps], "one DiT call of n cond+uncond pairs per step");

    let images: ndarray::Array4<u8> = read_npy(want.join("images.npy")).unwrap();
    let mut decoder = VaeDecoder::load(&fixtures().join("models").join(decoder_file), &session).unwrap();
    let (pngs, _) =
        decode_png(&mut decoder, &CpuPool::new(Some(1)), case, latents.view(), &mut ClassTimings::default()).unwrap();
    assert_eq!(pngs.len(), n);
    for (j, png) in pngs.iter().enumerate() {
        let ours = image::load_from_memory(png).unwrap().to_rgb8();
        for (x, y, pixel) in ours.enumerate_pixels() {
            for c in 0..3 {
                let want = images[[j, y as usize, x as usize, c]] as i32;
                assert!(
                    (pixel.0[c] as i32 - want).abs() <= 1,
                    "{case} image {j} ({x},{y},{c}): {} vs {want}",
                    pixel.0[c]
                );
            }
        }
    }
}

#[test]
fn parity_unguided_t_stop_50_three_channels() {
    run_case("tstop50_ch3");
}

#[test]
fn parity_unguided_t_stop_50_four_channels() {
    run_case("tstop50_ch4");
}

#[test]
fn parity_t_stop_25_three_channels() {
    run_case("tstop25_ch3");
}

#[test]
fn parity_t_stop_25_four_channels() {
    run_case("tstop25_ch4");
}

#[test]
fn parity_full_guidance_three_channels() {
    run_case("tstop0_ch3");
}

#[test]
fn parity_full_guidance_four_channels() {
    run_case("tstop0_ch4");
}

#[test]
fn parity_on_the_fused_graphs() {
    let session = session();
    let dit = Dit::load(&fixtures().join("models").join(FUSED.0), &session).unwrap();
    assert_eq!(dit.graph(), mgd3_onnx::contract::Graph::Fused { attention: Some(2) });
    for case in ["tstop50_ch3", "tstop50_ch4", "tstop25_ch3", "tstop25_ch4", "tstop0_ch3", "tstop0_ch4"] {
        run_case_with(case, FUSED);
    }
}
