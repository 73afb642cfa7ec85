//! Mode discovery: k-means with k = IPC over one class's flattened latents, through
//! linfa-clustering with the reference's effective settings (sklearn `KMeans(n_init="auto")`):
//! one k-means++ run, at most 300 Lloyd iterations, tolerance 1e-4 scaled by the mean
//! per-feature variance. The RNG is seeded, so centroids are reproducible.
//!
//! Deviations: linfa's k-means++ takes one candidate per centre (sklearn's greedy variant takes
//! 2 + ⌊ln k⌋) and a different RNG, so centroids match the reference only statistically.

use linfa::DatasetBase;
use linfa::traits::Fit;
use linfa_clustering::{KMeans, KMeansInit};
use ndarray016::Array2;
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use thiserror::Error;

/// Reference k-means settings.
pub const MAX_ITERATIONS: u64 = 300;
pub const RELATIVE_TOLERANCE: f64 = 1e-4;

#[derive(Debug, Error)]
pub enum ModesError {
    #[error("k-means needs at least k = {k} points, got {points}")]
    TooFewPoints { points: usize, k: usize },
    #[error("features hold {len} values, not {points} × {dim}")]
    BadFeatures { len: usize, points: usize, dim: usize },
    #[error("k-means failed: {0}")]
    KMeans(String),
    #[error(
        "only {distinct} distinct images among {points}: IPC = {k} distinct modes cannot be found (the class holds \
         duplicate images); remove the duplicates or lower ipc"
    )]
    TooFewDistinct { distinct: usize, points: usize, k: usize },
    #[error(
        "k-means found only {distinct} distinct modes of IPC = {k} among {points} images; lower ipc or check the \
         class for near-duplicates"
    )]
    DuplicateModes { distinct: usize, points: usize, k: usize },
}

/// How many distinct rows of `dim` values `values` holds (bit-exact).
fn distinct_rows(values: &[f32], dim: usize) -> usize {
    values
        .chunks_exact(dim)
        .map(|row| row.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// sklearn's `_tolerance`: `tol × mean(var(X, axis=0))`, on squared centre shifts.
fn scaled_tolerance(features: &[f32], points: usize, dim: usize) -> f64 {
    let mut mean = vec![0f64; dim];
    for row in features.chunks_exact(dim) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += *v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= points as f64);
    let mut variance = vec![0f64; dim];
    for row in features.chunks_exact(dim) {
        for ((s, v), m) in variance.iter_mut().zip(row).zip(&mean) {
            let d = *v as f64 - m;
            *s += d * d;
        }
    }
    RELATIVE_TOLERANCE * variance.iter().sum::<f64>() / (points as f64 * dim as f64)
}

/// Clusters `points` rows of `dim` features (row-major) into `k` centroids (row-major, k × dim).
pub fn find_modes(features: &[f32], points: usize, dim: usize, k: usize, seed: u64) -> Result<Vec<f32>, ModesError> {
    if features.len() != points * dim {
        return Err(ModesError::BadFeatures { len: features.len(), points, dim });
    }
    if points < k || k == 0 {
        return Err(ModesError::TooFewPoints { points, k });
    }
    // A degenerate result is reported, never returned: IPC samples would share modes.
    let distinct = distinct_rows(features, dim);
    if distinct < k {
        return Err(ModesError::TooFewDistinct { distinct, points, k });
    }
    // linfa stops when the Euclidean norm of the whole centroid shift is below its tolerance;
    // sklearn compares the squared shift with the scaled tolerance.
    let tolerance = (scaled_tolerance(features, points, dim).sqrt() as f32).max(f32::MIN_POSITIVE);
    let records = Array2::from_shape_vec((points, dim), features.to_vec()).expect("checked length");
    let dataset = DatasetBase::from(records);
    let rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let model = KMeans::params_with_rng(k, rng)
        .n_runs(1)
        .max_n_iterations(MAX_ITERATIONS)
        .tolerance(tolerance)
        .init_method(KMeansInit::KMeansPlusPlus)
        .fit(&dataset)
        .map_err(|e| ModesError::KMeans(e.to_string()))?;
    let centroids: Vec<f32> = model.centroids().iter().copied().collect();
    let distinct = distinct_rows(&centroids, dim);
    if distinct < k {
        return Err(ModesError::DuplicateModes { distinct, points, k });
    }
    Ok(centroids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use rand_distr::StandardNormal;

    fn blobs(centres: &[[f32; 3]], per: usize, seed: u64) -> Vec<f32> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut out = vec![];
        for c in centres {
            for _ in 0..per {
                for v in c {
                    let z: f32 = rng.sample(StandardNormal);
                    out.push(v + 0.05 * z);
                }
            }
        }
        out
    }

    #[test]
    fn recovers_separated_blobs_and_is_seed_deterministic() {
        let centres = [[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, -5.0, 5.0]];
        let data = blobs(&centres, 40, 1);
        let found = find_modes(&data, 120, 3, 3, 7).unwrap();
        for c in centres {
            let best = found
                .chunks_exact(3)
                .map(|f| f.iter().zip(&c).map(|(a, b)| (a - b).powi(2)).sum::<f32>())
                .fold(f32::INFINITY, f32::min);
            assert!(best < 0.01, "centre {c:?} not found in {found:?}");
        }
        assert_eq!(found, find_modes(&data, 120, 3, 3, 7).unwrap());
    }

    #[test]
    fn k_equal_to_points_returns_the_points() {
        let data = vec![0.0, 0.0, 1.0, 1.0, 4.0, 4.0];
        let mut found: Vec<[f32; 2]> = find_modes(&data, 3, 2, 3, 0).unwrap().chunks(2).map(|c| [c[0], c[1]]).collect();
        found.sort_by(|a, b| a[0].total_cmp(&b[0]));
        assert_eq!(found, [[0.0, 0.0], [1.0, 1.0], [4.0, 4.0]]);
    }

    /// Six images holding two distinct pictures cannot give four modes: an error with the counts,
    /// not two modes each used twice.
    #[test]
    fn too_few_distinct_images_is_an_error_with_the_counts() {
        let a = [1.0f32, 2.0, 3.0];
        let b = [4.0f32, 5.0, 6.0];
        let features: Vec<f32> = [a, b, a, b, a, b].concat();
        let error = find_modes(&features, 6, 3, 4, 0).unwrap_err();
        assert!(matches!(error, ModesError::TooFewDistinct { distinct: 2, points: 6, k: 4 }), "{error}");
        assert!(error.to_string().contains("only 2 distinct images among 6"), "{error}");
        assert_eq!(find_modes(&features, 6, 3, 2, 0).unwrap().len(), 6);
    }

    #[test]
    fn rejects_too_few_points() {
        assert!(matches!(find_modes(&[1.0, 2.0], 2, 1, 3, 0), Err(ModesError::TooFewPoints { points: 2, k: 3 })));
        assert!(matches!(find_modes(&[1.0, 2.0], 3, 1, 1, 0), Err(ModesError::BadFeatures { .. })));
    }
}
