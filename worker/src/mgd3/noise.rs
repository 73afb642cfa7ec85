//! The noise of one synthetic sample, drawn up front from its own RNG stream: x_T first, then
//! the noise of denoising steps k = 1..S, each C×h×w standard normals in C order. This is the
//! `noise.npy` layout of `worker sample`, so production runs and parity runs share one path.

use ndarray::{Array4, Array5};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_xoshiro::Xoshiro256PlusPlus;

/// `[S+1, C, h, w]` noise of the sample whose stream is seeded with `seed`.
pub fn sample_noise(seed: u64, steps: usize, latent_shape: [usize; 3]) -> Array4<f32> {
    let [c, h, w] = latent_shape;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    Array4::from_shape_simple_fn((steps + 1, c, h, w), || rng.sample::<f32, _>(StandardNormal))
}

/// `[n, S+1, C, h, w]` noise of `samples` ((class index, sample index) pairs, any mix of
/// classes) under the job seed `seed`: each sample's own stream
/// ([`mgd3_common::seed::sample_seed`]), drawn in parallel on the current rayon pool. The one
/// noise generator of every sampling run (shards, benchmarks), so a sample's noise never depends
/// on its batch mates.
pub fn batch_noise(seed: u64, samples: &[(u64, u64)], steps: usize, latent_shape: [usize; 3]) -> Array5<f32> {
    use rayon::prelude::*;
    let [c, h, w] = latent_shape;
    let per_sample = (steps + 1) * c * h * w;
    let mut out = vec![0f32; samples.len() * per_sample];
    out.par_chunks_mut(per_sample.max(1)).zip(samples.par_iter()).for_each(|(slot, &(class_index, j))| {
        let noise = sample_noise(mgd3_common::seed::sample_seed(seed, class_index, j), steps, latent_shape);
        slot.copy_from_slice(noise.as_slice().expect("standard layout"));
    });
    Array5::from_shape_vec((samples.len(), steps + 1, c, h, w), out).expect("n × (S+1) × C × h × w")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_standard_normal() {
        let a = sample_noise(42, 50, [4, 8, 8]);
        assert_eq!(a, sample_noise(42, 50, [4, 8, 8]));
        assert_ne!(a, sample_noise(43, 50, [4, 8, 8]));
        let n = a.len() as f64;
        let mean = a.iter().map(|v| *v as f64).sum::<f64>() / n;
        let var = a.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
        // x_T is the first slice: a longer schedule starts from the same x_T.
        assert_eq!(sample_noise(42, 10, [4, 8, 8]).index_axis(ndarray::Axis(0), 0), a.index_axis(ndarray::Axis(0), 0));
    }

    /// A batch's noise is each sample's own stream, whatever the batch mates and order.
    #[test]
    fn batch_noise_is_each_samples_own_stream() {
        let samples = [(3u64, 0u64), (7, 2), (3, 1)];
        let batch = batch_noise(9, &samples, 5, [2, 3, 3]);
        assert_eq!(batch.shape(), [3, 6, 2, 3, 3]);
        for (row, &(class_index, j)) in samples.iter().enumerate() {
            let alone = sample_noise(mgd3_common::seed::sample_seed(9, class_index, j), 5, [2, 3, 3]);
            assert_eq!(batch.index_axis(ndarray::Axis(0), row), alone);
        }
        assert_eq!(
            batch_noise(9, &samples[1..2], 5, [2, 3, 3]).index_axis(ndarray::Axis(0), 0),
            batch.index_axis(ndarray::Axis(0), 1)
        );
    }
}
