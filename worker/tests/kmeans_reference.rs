//! The README's k-means claim, measured: on a fixed imbalanced mixture (1,300 × 64, 30 clusters;
//! `scripts/kmeans_reference.py`), mode discovery's mean inertia over seeds 0–39 is within 0.5 % of
//! scikit-learn's `KMeans(n_init="auto")` (the reference code's k-means), at k = 10, 50 and 100.
//! The seeds' RNGs differ, so only the means over seeds can be compared.

use std::path::PathBuf;

use mgd3_worker::mgd3::modes::{find_modes, squared_distance};
use ndarray::Array2;
use ndarray_npy::read_npy;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/kmeans")
}

/// Σ over points of the squared distance to the nearest centre (float64).
fn inertia(features: &[f32], dim: usize, centres: &[f32]) -> f64 {
    features
        .chunks(dim)
        .map(|point| centres.chunks(dim).map(|c| squared_distance(point, c) as f64).fold(f64::INFINITY, f64::min))
        .sum()
}

#[test]
fn mean_inertia_is_within_half_a_percent_of_scikit_learn() {
    let features: Array2<f32> = read_npy(fixtures().join("features.npy")).unwrap();
    let (points, dim) = features.dim();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("sklearn.json")).unwrap()).unwrap();
    let seeds: Vec<u64> = reference["seeds"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    let flat = features.as_slice().unwrap();
    for k in [10usize, 50, 100] {
        let theirs: Vec<f64> =
            reference["inertia"][k.to_string()].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(theirs.len(), seeds.len());
        let ours: Vec<f64> =
            seeds.iter().map(|&seed| inertia(flat, dim, &find_modes(flat, points, dim, k, seed).unwrap())).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let ratio = mean(&ours) / mean(&theirs);
        eprintln!("k = {k}: mean inertia {:.1} vs scikit-learn {:.1}: {ratio:.4}×", mean(&ours), mean(&theirs));
        assert!(ratio <= 1.005, "k = {k}: mean inertia {ratio:.4}× scikit-learn's (the README says within 0.5 %)");
    }
}
