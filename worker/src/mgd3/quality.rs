//! How good a class's samples are, measured where the worker already holds everything: the real
//! latents it clustered and the sampled latents, in the scaled VAE latent space (flattened to
//! `C·h·w` vectors). [`class_quality`] gives the paper's diversity and representativeness
//! (MGD³ §5.2, Table 9; definitions in [`ClassQuality`]); [`embedding`] the 2-D PCA picture of
//! real latents, modes and samples that the job report draws (the paper's Figures 1 and 3 use
//! t-SNE). Both are deterministic: same inputs, same numbers.

use mgd3_common::manifest::{ClassQuality, Embedding};
use ndarray::{Array1, Array2, ArrayView2, Axis};

/// Nearest real latents a sample's representativeness averages over (the paper's 50).
pub const NEIGHBOURS: usize = 50;
/// At most this many real latents (evenly spaced in listing order) estimate the real spread and
/// fit the PCA: the full n² would cost more than k-means for large classes.
const SUBSET: usize = 512;
/// Real latents drawn in the embedding.
const EMBEDDED_REAL: usize = 300;
/// Power-iteration steps per principal component.
const POWER_STEPS: usize = 40;

/// `k` indices evenly spaced over `0..n` (all of them when `n <= k`).
fn evenly(n: usize, k: usize) -> Vec<usize> {
    if n <= k { (0..n).collect() } else { (0..k).map(|i| i * n / k).collect() }
}

/// Euclidean distances between the rows of `a` `[m,d]` and `b` `[n,d]`, as `[m,n]`, through
/// `|a|² + |b|² − 2a·b` (one matrix product) in f64.
fn distances(a: &Array2<f64>, b: &Array2<f64>) -> Array2<f64> {
    let a_norms: Array1<f64> = a.rows().into_iter().map(|r| r.dot(&r)).collect();
    let b_norms: Array1<f64> = b.rows().into_iter().map(|r| r.dot(&r)).collect();
    let mut d = a.dot(&b.t());
    for ((i, j), v) in d.indexed_iter_mut() {
        *v = (a_norms[i] + b_norms[j] - 2.0 * *v).max(0.0).sqrt();
    }
    d
}

fn rows_f64(x: ArrayView2<f32>, rows: &[usize]) -> Array2<f64> {
    x.select(Axis(0), rows).mapv(f64::from)
}

/// Diversity and representativeness of `samples` `[IPC, D]` against the class's `real` latents
/// `[n, D]` (both scaled latents, flattened). Zero where undefined (IPC 1 has no diversity; a
/// class with one real latent has no spread, and its normalised values are 0).
///
/// # Panics
/// When the two arrays' widths differ.
pub fn class_quality(real: ArrayView2<f32>, samples: ArrayView2<f32>) -> ClassQuality {
    assert_eq!(real.ncols(), samples.ncols(), "real and sampled latents must have the same width");
    let (n, ipc) = (real.nrows(), samples.nrows());
    let all_samples: Vec<usize> = (0..ipc).collect();
    let s = rows_f64(samples, &all_samples);
    let r = rows_f64(real, &(0..n).collect::<Vec<_>>());
    let among = distances(&s, &s);
    let diversity = if ipc < 2 {
        0.0
    } else {
        let nearest = among.rows().into_iter().enumerate().map(|(i, row)| {
            row.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, d)| *d).fold(f64::INFINITY, f64::min)
        });
        nearest.sum::<f64>() / ipc as f64
    };
    let neighbours = NEIGHBOURS.min(n);
    let to_real = distances(&s, &r);
    let representativeness = if neighbours == 0 || ipc == 0 {
        0.0
    } else {
        let per_sample = to_real.rows().into_iter().map(|row| {
            let mut row = row.to_vec();
            row.select_nth_unstable_by(neighbours - 1, f64::total_cmp);
            row[..neighbours].iter().sum::<f64>() / neighbours as f64
        });
        per_sample.sum::<f64>() / ipc as f64
    };
    let subset = rows_f64(real, &evenly(n, SUBSET));
    let m = subset.nrows();
    let real_spread = if m < 2 {
        0.0
    } else {
        let pairs = distances(&subset, &subset);
        // The diagonal is zero: the sum over all entries is the sum over distinct pairs.
        pairs.sum() / (m * (m - 1)) as f64
    };
    let normalised = |v: f64| if real_spread > 0.0 { v / real_spread } else { 0.0 };
    ClassQuality {
        diversity,
        representativeness,
        neighbours: neighbours as u32,
        real_spread,
        diversity_normalised: normalised(diversity),
        representativeness_normalised: normalised(representativeness),
    }
}

/// Projects real latents `[n, D]`, `modes` `[IPC, D]` and `samples` `[IPC, D]` onto the first two
/// principal components of the real latents (fitted on at most 512 of them by power iteration
/// from a fixed start; each axis's sign is chosen so that its largest coefficient is positive).
pub fn embedding(real: ArrayView2<f32>, modes: ArrayView2<f32>, samples: ArrayView2<f32>) -> Embedding {
    let width = real.ncols();
    let fit = rows_f64(real, &evenly(real.nrows(), SUBSET));
    let mean = fit.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(width));
    let centred = &fit - &mean;
    let total: f64 = centred.iter().map(|v| v * v).sum();
    let mut axes: Vec<Array1<f64>> = Vec::new();
    let mut explained = [0.0; 2];
    for (k, share) in explained.iter_mut().enumerate() {
        // A fixed, non-degenerate start (no RNG: the picture is the same on every run).
        let mut v: Array1<f64> = (0..width).map(|j| ((j * 7919 + k * 104_729) % 1009) as f64 / 1009.0 - 0.5).collect();
        for _ in 0..POWER_STEPS {
            let mut w = centred.t().dot(&centred.dot(&v));
            for axis in &axes {
                let along = w.dot(axis);
                w.scaled_add(-along, axis);
            }
            let norm = w.dot(&w).sqrt();
            if norm <= f64::EPSILON {
                break;
            }
            v = w / norm;
        }
        let projected = centred.dot(&v);
        *share = if total > 0.0 { projected.dot(&projected) / total } else { 0.0 };
        let largest = v.iter().copied().fold(0.0f64, |a, b| if b.abs() > a.abs() { b } else { a });
        if largest < 0.0 {
            v.mapv_inplace(|x| -x);
        }
        axes.push(v);
    }
    let project = |x: ArrayView2<f32>, rows: &[usize]| -> Vec<[f32; 2]> {
        let points = rows_f64(x, rows) - &mean;
        let (a, b) = (points.dot(&axes[0]), points.dot(&axes[1]));
        a.iter().zip(b.iter()).map(|(a, b)| [*a as f32, *b as f32]).collect()
    };
    Embedding {
        method: "pca".into(),
        explained_variance: explained,
        real: project(real, &evenly(real.nrows(), EMBEDDED_REAL)),
        modes: project(modes, &(0..modes.nrows()).collect::<Vec<_>>()),
        samples: project(samples, &(0..samples.nrows()).collect::<Vec<_>>()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn the_numbers_follow_their_definitions_on_points_worked_by_hand() {
        // Real latents on a line at 0, 1, 2, 3; samples at 0.5 and 2.5 (2-D, second axis 0).
        let real = array![[0.0f32, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]];
        let samples = array![[0.5f32, 0.0], [2.5, 0.0]];
        let q = class_quality(real.view(), samples.view());
        assert!((q.diversity - 2.0).abs() < 1e-12, "each sample's nearest other sample is 2 away");
        // Four real neighbours (fewer than 50): 0.5, 0.5, 1.5, 2.5 from either sample.
        assert_eq!(q.neighbours, 4);
        assert!((q.representativeness - 1.25).abs() < 1e-12, "{q:?}");
        // Mean over the 12 ordered pairs of distinct points: (3·1 + 2·2 + 1·3)·2 / 12 = 5/3.
        assert!((q.real_spread - 5.0 / 3.0).abs() < 1e-12, "{q:?}");
        assert!((q.diversity_normalised - 1.2).abs() < 1e-12);
        assert!((q.representativeness_normalised - 0.75).abs() < 1e-12);
        // IPC 1 and a single real latent are defined, not NaN.
        let one = class_quality(real.slice(ndarray::s![..1, ..]), samples.slice(ndarray::s![..1, ..]));
        assert_eq!((one.diversity, one.real_spread, one.diversity_normalised), (0.0, 0.0, 0.0));
        assert!((one.representativeness - 0.5).abs() < 1e-12);
    }

    #[test]
    fn the_nearest_fifty_real_latents_count_not_all() {
        // 60 real latents: 50 at distance 1, 10 far away.
        let mut real = Array2::<f32>::zeros((60, 3));
        for i in 0..60 {
            real[[i, 0]] = if i < 50 { 1.0 } else { 100.0 };
        }
        let samples = Array2::<f32>::zeros((1, 3));
        let q = class_quality(real.view(), samples.view());
        assert_eq!(q.neighbours, 50);
        assert!((q.representativeness - 1.0).abs() < 1e-12, "{q:?}");
    }

    #[test]
    fn the_embedding_finds_the_direction_of_most_variance_and_is_deterministic() {
        // Real latents spread along the third axis (variance 100×) and a little along the first.
        let real: Array2<f32> = Array2::from_shape_fn((40, 4), |(i, j)| match j {
            2 => (i as f32 - 19.5) * 10.0,
            // +1 −1 −1 +1 …: uncorrelated with the ramp, so the axes are exactly these two.
            0 => {
                if i % 4 == 0 || i % 4 == 3 {
                    1.0
                } else {
                    -1.0
                }
            }
            _ => 0.0,
        });
        let modes = array![[0.0f32, 0.0, 50.0, 0.0]];
        let samples = array![[1.0f32, 0.0, -50.0, 0.0]];
        let e = embedding(real.view(), modes.view(), samples.view());
        assert_eq!(e.method, "pca");
        assert_eq!((e.real.len(), e.modes.len(), e.samples.len()), (40, 1, 1));
        assert!(e.explained_variance[0] > 0.99, "{:?}", e.explained_variance);
        // The mode sits 50 along the first axis (sign fixed), the sample −50; the second axis is
        // the ±1 direction.
        assert!((e.modes[0][0] - 50.0).abs() < 1e-3 && e.modes[0][1].abs() < 1e-3, "{:?}", e.modes);
        assert!((e.samples[0][0] + 50.0).abs() < 1e-3 && (e.samples[0][1].abs() - 1.0).abs() < 1e-3);
        assert_eq!(e, embedding(real.view(), modes.view(), samples.view()));
    }
}
