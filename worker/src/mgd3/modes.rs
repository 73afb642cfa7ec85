//! Mode discovery: k-means with k = IPC over one class's flattened latents, through
//! linfa-clustering with the reference's effective settings (sklearn `KMeans(n_init="auto")`):
//! one k-means++ run, at most 300 Lloyd iterations, tolerance 1e-4 scaled by the mean
//! per-feature variance. The RNG is seeded, so centroids are reproducible.
//!
//! The seeding is scikit-learn's greedy k-means++ (2 + ⌊ln k⌋ candidates per centre), done
//! here in O(n·k·trials) distances; linfa's own k-means++ takes one candidate per centre and
//! recomputes every distance for each new centre (O(n·k²)), and its centres end 2–4 % worse in
//! inertia at k = 50–100. Lloyd's loop is linfa's, with [`SqEuclidean`], a squared distance whose
//! 32 independent lanes vectorise (linfa's `L2Dist` sums one long dependency chain). Both run on
//! the caller's rayon pool. The RNG differs from numpy's, so centroids match the reference only
//! statistically.

use linfa::DatasetBase;
use linfa::traits::Fit;
use linfa_clustering::{KMeans, KMeansInit};
use linfa_nn::distance::Distance;
use ndarray016::{Array2, ArrayView, ArrayView2, Dimension};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;
use thiserror::Error;

/// Reference k-means settings: at most this many Lloyd iterations (sklearn's `max_iter`).
pub const MAX_ITERATIONS: u64 = 300;
/// sklearn's `tol`: convergence when the squared centre shift falls below this times the mean
/// per-feature variance of the data.
pub const RELATIVE_TOLERANCE: f64 = 1e-4;

/// Errors of mode discovery.
#[derive(Debug, Error)]
pub enum ModesError {
    /// Fewer points than k, or k = 0.
    #[error("k-means needs at least k = {k} points, got {points}")]
    TooFewPoints {
        /// Points given.
        points: usize,
        /// Modes asked for (IPC).
        k: usize,
    },
    /// `features` does not hold `points × dim` values.
    #[error("features hold {len} values, not {points} × {dim}")]
    BadFeatures {
        /// Values given.
        len: usize,
        /// Points claimed.
        points: usize,
        /// Values per point claimed.
        dim: usize,
    },
    /// linfa's Lloyd iterations failed.
    #[error("k-means failed")]
    KMeans(#[source] linfa_clustering::KMeansError),
    /// Fewer than k distinct points (duplicate images), so k distinct modes cannot exist.
    #[error(
        "only {distinct} distinct images among {points}: IPC = {k} distinct modes cannot be found (the class holds \
         duplicate images); remove the duplicates or lower ipc"
    )]
    TooFewDistinct {
        /// Bit-exact distinct points.
        distinct: usize,
        /// Points given.
        points: usize,
        /// Modes asked for (IPC).
        k: usize,
        /// The points that are bit-exact copies of another, as groups of row indices (each group
        /// ascending, groups by their first row), so that the caller can name the files.
        groups: Vec<Vec<usize>>,
    },
    /// k-means ended with fewer than k distinct centroids (near-duplicate images).
    #[error(
        "k-means found only {distinct} distinct modes of IPC = {k} among {points} images; lower ipc or check the \
         class for near-duplicates"
    )]
    DuplicateModes {
        /// Bit-exact distinct centroids found.
        distinct: usize,
        /// Points given.
        points: usize,
        /// Modes asked for (IPC).
        k: usize,
    },
}

/// How many distinct rows of `dim` values `values` holds (bit-exact).
fn distinct_rows(values: &[f32], dim: usize) -> usize {
    values
        .chunks_exact(dim)
        .map(|row| row.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// The rows of `dim` values in `values` that are bit-exact copies of another: groups of two or
/// more row indices, each ascending, the groups ordered by their first row.
pub fn duplicate_groups(values: &[f32], dim: usize) -> Vec<Vec<usize>> {
    let mut first: std::collections::HashMap<Vec<u32>, usize> = std::collections::HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (row, chunk) in values.chunks_exact(dim).enumerate() {
        let bits = chunk.iter().map(|v| v.to_bits()).collect();
        match first.entry(bits) {
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(groups.len());
                groups.push(vec![row]);
            }
            std::collections::hash_map::Entry::Occupied(entry) => groups[*entry.get()].push(row),
        }
    }
    groups.retain(|group| group.len() > 1);
    groups
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
/// `seed` seeds k-means++ (see [`mgd3_common::seed::kmeans_seed`]); the same inputs give the same
/// centroids.
///
/// # Errors
/// [`ModesError::BadFeatures`], [`ModesError::TooFewPoints`], [`ModesError::TooFewDistinct`]
/// before clustering; [`ModesError::KMeans`] when linfa fails; [`ModesError::DuplicateModes`]
/// when the centroids are not k distinct ones.
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
        return Err(ModesError::TooFewDistinct { distinct, points, k, groups: duplicate_groups(features, dim) });
    }
    // linfa stops when the Euclidean norm of the whole centroid shift is below its tolerance;
    // sklearn compares the squared shift with the scaled tolerance.
    let tolerance = (scaled_tolerance(features, points, dim).sqrt() as f32).max(f32::MIN_POSITIVE);
    let records = Array2::from_shape_vec((points, dim), features.to_vec()).expect("checked length");
    let rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let seeds = kmeans_plusplus(records.view(), k, &mut rng.clone());
    let dataset = DatasetBase::from(records);
    let model = KMeans::params_with(k, rng, SqEuclidean)
        .n_runs(1)
        .max_n_iterations(MAX_ITERATIONS)
        .tolerance(tolerance)
        .init_method(KMeansInit::Precomputed(seeds))
        .fit(&dataset)
        .map_err(ModesError::KMeans)?;
    let centroids: Vec<f32> = model.centroids().iter().copied().collect();
    let distinct = distinct_rows(&centroids, dim);
    if distinct < k {
        return Err(ModesError::DuplicateModes { distinct, points, k });
    }
    Ok(centroids)
}

/// Euclidean distance for linfa whose reduced form (the squared distance) is computed by
/// [`squared_distance`]: the same metric as linfa's `L2Dist`, summed in 32 lanes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SqEuclidean;

impl Distance<f32> for SqEuclidean {
    fn distance<D: Dimension>(&self, a: ArrayView<f32, D>, b: ArrayView<f32, D>) -> f32 {
        self.rdistance(a, b).sqrt()
    }

    fn rdistance<D: Dimension>(&self, a: ArrayView<f32, D>, b: ArrayView<f32, D>) -> f32 {
        assert_eq!(a.shape(), b.shape(), "points of different dimensions");
        match (a.as_slice(), b.as_slice()) {
            (Some(a), Some(b)) => squared_distance(a, b),
            _ => a.iter().zip(b.iter()).map(|(x, y)| (x - y) * (x - y)).sum(),
        }
    }

    fn rdist_to_dist(&self, rdist: f32) -> f32 {
        rdist.sqrt()
    }

    fn dist_to_rdist(&self, dist: f32) -> f32 {
        dist * dist
    }
}

const LANES: usize = 32;

/// Sums the lanes pairwise, halving the width each round: a fixed tree, so the result is the
/// same bits whichever instruction set filled the lanes.
#[inline(always)]
fn reduce_lanes(lanes: &mut [f32], mut width: usize) -> f32 {
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    lanes[0]
}

fn squared_distance_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (a_blocks, b_blocks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_blocks.remainder().iter().zip(b_blocks.remainder()).map(|(x, y)| (x - y) * (x - y)).sum();
    for (x, y) in a_blocks.zip(b_blocks) {
        for i in 0..LANES {
            let d = x[i] - y[i];
            lanes[i] += d * d;
        }
    }
    reduce_lanes(&mut lanes, LANES / 2) + tail
}

/// The same lanes and reduction as [`squared_distance_portable`], in four AVX registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn squared_distance_avx(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let blocks = a.len() / LANES;
    let mut acc = [_mm256_setzero_ps(); 4];
    for block in 0..blocks {
        let base = block * LANES;
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: base + 8r + 8 ≤ blocks·LANES ≤ len of both slices (checked equal).
            let (x, y) = unsafe {
                (_mm256_loadu_ps(a.as_ptr().add(base + 8 * r)), _mm256_loadu_ps(b.as_ptr().add(base + 8 * r)))
            };
            let d = _mm256_sub_ps(x, y);
            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(d, d));
        }
    }
    let mut lanes = [0f32; LANES];
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: lanes holds 4 × 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * r), *acc) };
    }
    let tail: f32 = a[blocks * LANES..].iter().zip(&b[blocks * LANES..]).map(|(x, y)| (x - y) * (x - y)).sum();
    reduce_lanes(&mut lanes, LANES / 2) + tail
}

/// Σ (aᵢ − bᵢ)² over two equally long slices, in 32 independent lanes (separate multiply and
/// add, no FMA) reduced by a fixed tree: vectorised, and the same bits with or without AVX.
///
/// # Panics
/// If the slices differ in length.
pub fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "points of different dimensions");
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU supports AVX (checked just above).
        return unsafe { squared_distance_avx(a, b) };
    }
    squared_distance_portable(a, b)
}

/// Greedy k-means++ seeding as scikit-learn does it (`_kmeans_plusplus`, the reference's
/// `KMeans(init="k-means++")`): the first centre uniform; each next one the best, by resulting
/// potential (Σ of squared distances to the nearest centre), of `2 + ⌊ln k⌋` candidates drawn
/// with probability proportional to the current squared distance. Returns k × dim.
fn kmeans_plusplus(points: ArrayView2<f32>, k: usize, rng: &mut Xoshiro256PlusPlus) -> Array2<f32> {
    let n = points.nrows();
    let trials = 2 + (k as f64).ln().floor() as usize;
    let mut centres = Array2::zeros((k, points.ncols()));
    let first = rng.gen_range(0..n);
    centres.row_mut(0).assign(&points.row(first));
    let row = |i: usize| points.row(i).to_slice().expect("standard layout");
    let first_row = row(first);
    let mut nearest: Vec<f32> = (0..n).into_par_iter().map(|i| squared_distance(first_row, row(i))).collect();
    let mut potential: f64 = nearest.iter().map(|d| *d as f64).sum();
    let mut cumulative = vec![0f64; n];
    for c in 1..k {
        let mut total = 0f64;
        for (sum, d) in cumulative.iter_mut().zip(&nearest) {
            total += *d as f64;
            *sum = total;
        }
        let candidates: Vec<usize> = (0..trials)
            .map(|_| {
                let target = rng.r#gen::<f64>() * potential;
                cumulative.partition_point(|sum| *sum < target).min(n - 1)
            })
            .collect();
        // Distances of every point to every candidate, one pass over the points.
        let rows: Vec<&[f32]> = candidates.iter().map(|&i| row(i)).collect();
        let per_point: Vec<Vec<f32>> = (0..n)
            .into_par_iter()
            .map(|i| rows.iter().map(|candidate| squared_distance(candidate, row(i)).min(nearest[i])).collect())
            .collect();
        let potentials: Vec<f64> = (0..trials).map(|t| per_point.iter().map(|d| d[t] as f64).sum()).collect();
        let best = (0..trials).fold(0, |best, t| if potentials[t] < potentials[best] { t } else { best });
        potential = potentials[best];
        for (d, all) in nearest.iter_mut().zip(&per_point) {
            *d = all[best];
        }
        centres.row_mut(c).assign(&points.row(candidates[best]));
    }
    centres
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
        let ModesError::TooFewDistinct { distinct, points, k, groups } = &error else { panic!("{error}") };
        assert_eq!((*distinct, *points, *k), (2, 6, 4));
        assert_eq!(groups, &[vec![0, 2, 4], vec![1, 3, 5]]);
        assert!(error.to_string().contains("only 2 distinct images among 6"), "{error}");
        assert_eq!(find_modes(&features, 6, 3, 2, 0).unwrap().len(), 6);
    }

    fn inertia(features: &[f32], centroids: &[f32], dim: usize) -> f64 {
        features
            .chunks_exact(dim)
            .map(|x| centroids.chunks_exact(dim).map(|c| squared_distance(x, c) as f64).fold(f64::INFINITY, f64::min))
            .sum()
    }

    /// Greedy seeding (scikit-learn's) ends, on average over seeds, at a lower inertia than
    /// linfa's stock one-candidate k-means++ on overlapping clusters, and finds every centre of
    /// separated ones.
    #[test]
    fn greedy_seeding_beats_linfa_stock_kmeans_plusplus() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        let (n, dim, k) = (600, 24, 30);
        let centres: Vec<f32> = (0..k * dim).map(|_| rng.sample::<f32, _>(StandardNormal) * 1.5).collect();
        let features: Vec<f32> = (0..n)
            .flat_map(|i| {
                let c = i % k;
                centres[c * dim..(c + 1) * dim].to_vec()
            })
            .map(|v| v + rng.sample::<f32, _>(StandardNormal))
            .collect();
        let (mut ours, mut stock) = (0.0, 0.0);
        for seed in 0..6 {
            ours += inertia(&features, &find_modes(&features, n, dim, k, seed).unwrap(), dim);
            let records = Array2::from_shape_vec((n, dim), features.clone()).unwrap();
            let tolerance = scaled_tolerance(&features, n, dim).sqrt() as f32;
            let model = KMeans::params_with_rng(k, Xoshiro256PlusPlus::seed_from_u64(seed))
                .n_runs(1)
                .max_n_iterations(MAX_ITERATIONS)
                .tolerance(tolerance)
                .init_method(KMeansInit::KMeansPlusPlus)
                .fit(&DatasetBase::from(records))
                .unwrap();
            stock += inertia(&features, model.centroids().as_slice().unwrap(), dim);
        }
        assert!(ours < stock, "mean inertia: greedy {} vs linfa stock {}", ours / 6.0, stock / 6.0);
    }

    #[test]
    fn squared_distance_is_exact_on_small_integers_for_every_length() {
        for len in [0, 1, 15, 16, 17, 64, 4096, 4099] {
            let a: Vec<f32> = (0..len).map(|i| (i % 7) as f32).collect();
            let b: Vec<f32> = (0..len).map(|i| (i % 5) as f32).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
            assert_eq!(squared_distance(&a, &b), want, "length {len}");
            assert_eq!(SqEuclidean.rdistance(ArrayView::from(&a[..]), ArrayView::from(&b[..])), want);
            // Non-integers: the vector path and the portable path give the same bits.
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            assert_eq!(squared_distance(&a, &b).to_bits(), squared_distance_portable(&a, &b).to_bits());
        }
    }

    #[test]
    fn rejects_too_few_points() {
        assert!(matches!(find_modes(&[1.0, 2.0], 2, 1, 3, 0), Err(ModesError::TooFewPoints { points: 2, k: 3 })));
        assert!(matches!(find_modes(&[1.0, 2.0], 3, 1, 1, 0), Err(ModesError::BadFeatures { .. })));
    }
}
