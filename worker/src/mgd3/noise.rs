//! The noise of one synthetic sample, drawn up front from its own RNG stream: x_T first, then
//! the noise of denoising steps k = 1..S, each C×h×w standard normals in C order. This is the
//! `noise.npy` layout of `worker sample`, so production runs and parity runs share one path.

use ndarray::Array4;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_xoshiro::Xoshiro256PlusPlus;

/// `[S+1, C, h, w]` noise of the sample whose stream is seeded with `seed`.
pub fn sample_noise(seed: u64, steps: usize, latent_shape: [usize; 3]) -> Array4<f32> {
    let [c, h, w] = latent_shape;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    Array4::from_shape_simple_fn((steps + 1, c, h, w), || rng.sample::<f32, _>(StandardNormal))
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
}
