//! An imbalanced mixture of Gaussians with an exact (analytic) denoiser, for the MGD³ paper's
//! Figure 2 experiment through the real sampler: plain sampling piles onto the dominant mode,
//! mode guidance toward k-means modes covers them all. Used by a test and by
//! `cargo run -p mgd3-worker --example mode_coverage`.

use ndarray::{Array4, ArrayView4};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::mgd3::modes::find_modes;
use crate::mgd3::noise::sample_noise;
use crate::mgd3::sampler::{Denoiser, DenoiserInfo, ModelError, sample};
use crate::mgd3::schedule::{Schedule, cumulative_alphas, linear_betas};
use mgd3_common::job::SamplingSpec;

/// A mixture of isotropic Gaussians in `dim` dimensions (laid out as a `[dim, 1, 1]` latent).
#[derive(Clone, Debug)]
pub struct Mixture {
    /// Component means, each of `dim` coordinates.
    pub means: Vec<Vec<f64>>,
    /// Component weights (summing to 1), in the order of `means`.
    pub weights: Vec<f64>,
    /// Standard deviation of every component, in every dimension.
    pub std: f64,
}

impl Mixture {
    /// Four corners of a square, one holding most of the mass.
    pub fn imbalanced_square() -> Self {
        Mixture {
            means: vec![vec![3.0, 3.0], vec![-3.0, 3.0], vec![-3.0, -3.0], vec![3.0, -3.0]],
            weights: vec![0.85, 0.05, 0.05, 0.05],
            std: 0.4,
        }
    }

    /// Dimensions of the data (of the first mean).
    pub fn dim(&self) -> usize {
        self.means[0].len()
    }

    /// `n` samples of the data distribution.
    pub fn draw(&self, n: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let u: f64 = rng.r#gen();
                let mut k = 0;
                let mut acc = self.weights[0];
                while u > acc && k + 1 < self.weights.len() {
                    k += 1;
                    acc += self.weights[k];
                }
                self.means[k].iter().map(|m| m + self.std * rng.sample::<f64, _>(StandardNormal)).collect()
            })
            .collect()
    }

    /// Index of the nearest mixture mean.
    pub fn nearest(&self, x: &[f32]) -> usize {
        let d = |m: &Vec<f64>| m.iter().zip(x).map(|(a, b)| (a - *b as f64).powi(2)).sum::<f64>();
        (0..self.means.len()).min_by(|a, b| d(&self.means[*a]).total_cmp(&d(&self.means[*b]))).expect("means")
    }
}

/// The exact ε-prediction of the mixture under the linear 1000-step schedule.
pub struct AnalyticDenoiser {
    mixture: Mixture,
    alphas_cumprod: Vec<f64>,
}

impl AnalyticDenoiser {
    /// The denoiser of `mixture` under the linear schedule (1000 steps, β from 1e-4 to 0.02).
    pub fn new(mixture: Mixture) -> Self {
        let alphas_cumprod = cumulative_alphas(&linear_betas(1000, 1e-4, 0.02));
        AnalyticDenoiser { mixture, alphas_cumprod }
    }
}

impl Denoiser for AnalyticDenoiser {
    fn predict(&mut self, x: ArrayView4<f32>, t: &[i64], _y: &[i64]) -> Result<Array4<f32>, ModelError> {
        let (b, c, _, _) = x.dim();
        let m = &self.mixture;
        let mut out = Array4::zeros((b, c, 1, 1));
        for i in 0..b {
            let abar = self.alphas_cumprod[t[i] as usize];
            let (sa, var) = (abar.sqrt(), abar * m.std * m.std + 1.0 - abar);
            let xt: Vec<f64> = (0..c).map(|ch| x[[i, ch, 0, 0]] as f64).collect();
            let logs: Vec<f64> = m
                .means
                .iter()
                .zip(&m.weights)
                .map(|(mu, w)| {
                    w.ln() - mu.iter().zip(&xt).map(|(a, b)| (b - sa * a).powi(2)).sum::<f64>() / (2.0 * var)
                })
                .collect();
            let top = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = logs.iter().map(|l| (l - top).exp()).collect();
            let total: f64 = weights.iter().sum();
            let gain = sa * m.std * m.std / var;
            for ch in 0..c {
                let x0: f64 = m
                    .means
                    .iter()
                    .zip(&weights)
                    .map(|(mu, w)| w / total * (mu[ch] + gain * (xt[ch] - sa * mu[ch])))
                    .sum();
                out[[i, ch, 0, 0]] = ((xt[ch] - sa * x0) / (1.0 - abar).sqrt()) as f32;
            }
        }
        Ok(out)
    }
}

/// Samples `n` points (2-D latents `[n, 2, 1, 1]`) with the real sampler; `modes` given = MGD³.
pub fn sample_points(
    mixture: &Mixture,
    modes: &[Vec<f32>],
    guidance: SamplingSpec,
    n: usize,
    seed: u64,
) -> Vec<Vec<f32>> {
    let dim = mixture.dim();
    let steps = 50;
    let schedule = Schedule::linear(1000, 1e-4, 0.02, steps).expect("schedule");
    let mode_array =
        Array4::from_shape_fn(
            (n, dim, 1, 1),
            |(j, c, _, _)| if modes.is_empty() { 0.0 } else { modes[j % modes.len()][c] },
        );
    let noises: Vec<_> = (0..n).map(|j| sample_noise(seed.wrapping_mul(1000) + j as u64, steps, [dim, 1, 1])).collect();
    let views: Vec<_> = noises.iter().map(|a| a.view().insert_axis(ndarray::Axis(0))).collect();
    let noise = ndarray::concatenate(ndarray::Axis(0), &views).expect("noise");
    let spec = DenoiserInfo { null_label: 1, learn_sigma: false };
    let mut model = AnalyticDenoiser::new(mixture.clone());
    let (x, _) =
        sample(&mut model, &schedule, &guidance, spec, &vec![0; n], mode_array.view(), noise.view(), |_, _| {})
            .expect("toy sampling");
    x.outer_iter().map(|p| p.iter().copied().collect()).collect()
}

/// Result of one coverage experiment.
#[derive(Clone, Debug)]
pub struct Coverage {
    /// The modes guidance aims at; guided sample j is guided toward mode j mod k.
    pub modes: Vec<Vec<f32>>,
    /// The samples without mode guidance (λ = 0; CFG scale 1 in both runs).
    pub unguided: Vec<Vec<f32>>,
    /// The samples with mode guidance.
    pub guided: Vec<Vec<f32>>,
    /// Samples per mixture component.
    pub unguided_counts: Vec<usize>,
    /// Guided samples per mixture component (by nearest mean).
    pub guided_counts: Vec<usize>,
}

/// Where the experiment's modes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeSource {
    /// The mixture's component means: guidance in isolation.
    TrueMeans,
    /// k-means (k = number of components, one k-means++ run as the reference) on 2000 data
    /// points: the full MGD³ pipeline, including k-means' tendency to split a dominant cluster.
    KMeans,
}

/// `ipc` samples unguided and with mode guidance of strength λ, stopped at t_stop.
pub fn coverage_experiment(
    mixture: &Mixture,
    ipc: usize,
    seed: u64,
    source: ModeSource,
    lambda: f32,
    t_stop: usize,
) -> Coverage {
    let k = mixture.means.len();
    let modes: Vec<Vec<f32>> = match source {
        ModeSource::TrueMeans => mixture.means.iter().map(|m| m.iter().map(|v| *v as f32).collect()).collect(),
        ModeSource::KMeans => {
            let data = mixture.draw(2000, seed);
            let flat: Vec<f32> = data.iter().flatten().map(|v| *v as f32).collect();
            let centroids = find_modes(&flat, data.len(), mixture.dim(), k, seed).expect("k-means");
            centroids.chunks(mixture.dim()).map(<[f32]>::to_vec).collect()
        }
    };
    let plain =
        SamplingSpec { guidance_scale: 0.0, stop_guidance: 50, cfg_scale: 1.0, cfg_channels: 0, ..Default::default() };
    let mgd3 = SamplingSpec {
        guidance_scale: lambda,
        stop_guidance: t_stop,
        cfg_scale: 1.0,
        cfg_channels: 0,
        ..Default::default()
    };
    let unguided = sample_points(mixture, &[], plain, ipc, seed);
    let guided = sample_points(mixture, &modes, mgd3, ipc, seed);
    let count = |points: &[Vec<f32>]| {
        let mut counts = vec![0; k];
        points.iter().for_each(|p| counts[mixture.nearest(p)] += 1);
        counts
    };
    Coverage { unguided_counts: count(&unguided), guided_counts: count(&guided), modes, unguided, guided }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples that landed on the component of the mode they were guided to, and distinct
    /// components covered, summed over seeds.
    fn tally(lambda: f32, t_stop: usize, seeds: u64) -> (usize, usize, usize, usize) {
        let mixture = Mixture::imbalanced_square();
        let (mut plain_covered, mut guided_covered, mut plain_dominant, mut on_mode) = (0, 0, 0, 0);
        for seed in 0..seeds {
            let r = coverage_experiment(&mixture, 4, seed, ModeSource::TrueMeans, lambda, t_stop);
            plain_covered += r.unguided_counts.iter().filter(|c| **c > 0).count();
            guided_covered += r.guided_counts.iter().filter(|c| **c > 0).count();
            plain_dominant += r.unguided_counts[0];
            on_mode += r.guided.iter().enumerate().filter(|(j, p)| mixture.nearest(p) == *j).count();
        }
        (plain_covered, guided_covered, plain_dominant, on_mode)
    }

    #[test]
    fn plain_sampling_piles_onto_the_dominant_mode_and_guidance_covers_them() {
        // Strong guidance (λ = 0.3, t_stop = 10): every sample lands on its own mode.
        let (plain_covered, guided_covered, plain_dominant, on_mode) = tally(0.3, 10, 10);
        assert_eq!((guided_covered, on_mode), (40, 40), "all 4 modes, every seed");
        assert!(plain_covered <= 25, "plain sampling covered {plain_covered}/40 modes");
        assert!(plain_dominant >= 25, "plain sampling put only {plain_dominant}/40 samples on the dominant mode");
        // The paper's λ = 0.1, t_stop = 25 still more than doubles the samples on their mode
        // (chance, with plain sampling, is about 10 of 40).
        let (_, _, _, on_mode) = tally(0.1, 25, 10);
        assert!(on_mode >= 20, "{on_mode}/40 on their mode at the paper's settings");
    }

    #[test]
    fn the_analytic_denoiser_reproduces_the_mixture() {
        let mixture = Mixture::imbalanced_square();
        let plain = SamplingSpec {
            guidance_scale: 0.0,
            stop_guidance: 50,
            cfg_scale: 1.0,
            cfg_channels: 0,
            ..Default::default()
        };
        let points = sample_points(&mixture, &[], plain, 400, 3);
        let dominant = points.iter().filter(|p| mixture.nearest(p) == 0).count() as f64 / 400.0;
        assert!((dominant - 0.85).abs() < 0.06, "dominant share {dominant}");
    }
}
