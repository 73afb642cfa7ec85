//! The reference DDPM step (MGD3-SPEC §2.2, the authors' code): with learned-range variance σ,
//! x̂₀ = √(1/ᾱ)·x − √(1/ᾱ − 1)·ε, the posterior mean c₁·x̂₀ + c₂·x, plus the mode term λσ(m − x̂₀)
//! while i > t_stop, plus σ·ξ while i > 0. Timesteps `space_timesteps(T, "S")`.

use ndarray::{Array4, ArrayView4};

use mgd3_common::job::SamplingSpec;

use super::guidance::{Element, StepRule, guided_loop};
use super::schedule::{Respacing, StepCoefficients};

/// The timesteps DDPM visits.
pub const RESPACING: Respacing = Respacing::Uniform;

/// The DDPM step's rule: step i's coefficients and whether the model predicts its variance.
struct Ddpm {
    c: StepCoefficients,
    learn_sigma: bool,
}

impl StepRule for Ddpm {
    #[inline(always)]
    fn element(&self, e: Element) -> f32 {
        let StepCoefficients {
            sqrt_recip_alphas_cumprod: sra,
            sqrt_recipm1_alphas_cumprod: srm1,
            posterior_mean_coef1: c1,
            posterior_mean_coef2: c2,
            min_log,
            max_log,
            fixed_log_variance,
        } = self.c;
        let log_variance = if self.learn_sigma {
            let frac = (e.variance + 1.0) / 2.0;
            frac * max_log + (1.0 - frac) * min_log
        } else {
            fixed_log_variance
        };
        let sigma = (0.5 * log_variance).exp();
        let x0 = sra * e.x - srm1 * e.eps;
        let mean = c1 * x0 + c2 * e.x;
        let guidance = if e.guided { -(x0 - e.mode) * e.lambda * sigma } else { 0.0 };
        let noise_term = if e.add_noise { sigma * e.noise } else { 0.0 };
        (mean + guidance) + noise_term
    }
}

/// x_{i−1} for a batch: `x` `[n,C,h,w]`, `model_out` `[2n, C or 2C, h, w]`, `modes` and `noise` `[n,C,h,w]`.
///
/// Shapes are the caller's contract (the sampler checks them once per run).
#[allow(clippy::too_many_arguments)]
pub fn guided_step(
    coefficients: &StepCoefficients,
    i: usize,
    x: ArrayView4<f32>,
    model_out: ArrayView4<f32>,
    modes: ArrayView4<f32>,
    noise: ArrayView4<f32>,
    config: &SamplingSpec,
    learn_sigma: bool,
) -> Array4<f32> {
    guided_loop(&Ddpm { c: *coefficients, learn_sigma }, i, x, model_out, modes, noise, config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mgd3::schedule::Schedule;
    use ndarray::{Array, Axis, concatenate};

    fn filled(shape: (usize, usize, usize, usize), f: impl Fn(usize) -> f32) -> Array4<f32> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Array::from_shape_vec(shape, (0..n).map(f).collect()).unwrap()
    }

    /// Scalar restatement of the reference step for one element.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        c: &StepCoefficients,
        i: usize,
        cfg: &SamplingSpec,
        ch: usize,
        xv: f32,
        oc: f32,
        ou: f32,
        v: f32,
        m: f32,
        z: f32,
    ) -> f32 {
        let eps = if ch < cfg.cfg_channels { ou + cfg.cfg_scale * (oc - ou) } else { oc };
        let f = (v + 1.0) / 2.0;
        let sigma = (0.5 * (f * c.max_log + (1.0 - f) * c.min_log)).exp();
        let x0 = c.sqrt_recip_alphas_cumprod * xv - c.sqrt_recipm1_alphas_cumprod * eps;
        let mu = c.posterior_mean_coef1 * x0 + c.posterior_mean_coef2 * xv;
        let g = if i > cfg.stop_guidance { -(x0 - m) * cfg.guidance_scale * sigma } else { 0.0 };
        (mu + g) + if i > 0 { sigma * z } else { 0.0 }
    }

    #[test]
    fn matches_the_scalar_reference_for_every_channel_and_gate() {
        let sched = Schedule::linear(1000, 1e-4, 0.02, 50).unwrap();
        let (n, c, h, w) = (2, 4, 3, 3);
        let x = filled((n, c, h, w), |k| (k as f32 * 0.37).sin() * 2.0);
        let out = filled((2 * n, 2 * c, h, w), |k| (k as f32 * 0.11).cos());
        let modes = filled((n, c, h, w), |k| (k as f32 * 0.05).sin());
        let noise = filled((n, c, h, w), |k| (k as f32 * 0.73).cos());
        for (i, t_stop, channels) in [(49, 25, 3), (26, 25, 4), (25, 25, 3), (0, 0, 3), (10, 50, 4)] {
            let cfg = SamplingSpec { stop_guidance: t_stop, cfg_channels: channels, ..Default::default() };
            let coeffs = sched.coefficients(i);
            let next = guided_step(&coeffs, i, x.view(), out.view(), modes.view(), noise.view(), &cfg, true);
            for ((b, ch, y, xx), got) in next.indexed_iter() {
                let want = reference(
                    &coeffs,
                    i,
                    &cfg,
                    ch,
                    x[[b, ch, y, xx]],
                    out[[b, ch, y, xx]],
                    out[[n + b, ch, y, xx]],
                    out[[b, c + ch, y, xx]],
                    modes[[b, ch, y, xx]],
                    noise[[b, ch, y, xx]],
                );
                assert_eq!(*got, want, "i={i} b={b} ch={ch}");
            }
        }
    }

    #[test]
    fn guidance_pulls_toward_the_mode_and_stops_at_t_stop() {
        let sched = Schedule::linear(1000, 1e-4, 0.02, 50).unwrap();
        let x = filled((1, 4, 2, 2), |_| 0.0);
        let out = filled((2, 8, 2, 2), |_| 0.0); // eps = 0, v = 0: x0 = 0
        let modes = filled((1, 4, 2, 2), |_| 1.0);
        let zero = filled((1, 4, 2, 2), |_| 0.0);
        let cfg = SamplingSpec::default();
        let step =
            |i| guided_step(&sched.coefficients(i), i, x.view(), out.view(), modes.view(), zero.view(), &cfg, true);
        assert!(step(26).iter().all(|v| *v > 0.0), "guided steps move x toward m = 1");
        assert!(step(25).iter().all(|v| *v == 0.0), "i = t_stop is unguided");
        let no_guidance = SamplingSpec { guidance_scale: 0.0, ..cfg };
        let plain = guided_step(
            &sched.coefficients(40),
            40,
            x.view(),
            out.view(),
            modes.view(),
            zero.view(),
            &no_guidance,
            true,
        );
        assert!(plain.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn noise_is_masked_at_the_last_step_and_scaled_by_sigma_before() {
        let sched = Schedule::linear(1000, 1e-4, 0.02, 50).unwrap();
        let x = filled((1, 4, 2, 2), |_| 0.0);
        let out = filled((2, 8, 2, 2), |_| 0.0);
        let modes = x.clone();
        let ones = filled((1, 4, 2, 2), |_| 1.0);
        let cfg = SamplingSpec::default();
        let last = guided_step(&sched.coefficients(0), 0, x.view(), out.view(), modes.view(), ones.view(), &cfg, true);
        assert!(last.iter().all(|v| *v == 0.0));
        let c = sched.coefficients(30);
        let expected = (0.5 * (0.5 * c.max_log + 0.5 * c.min_log)).exp();
        let step = guided_step(&c, 30, x.view(), out.view(), modes.view(), ones.view(), &cfg, true);
        assert!(step.iter().all(|v| *v == expected));
    }

    #[test]
    fn cfg_channels_decide_which_channels_are_mixed() {
        let sched = Schedule::linear(1000, 1e-4, 0.02, 50).unwrap();
        let x = filled((1, 4, 1, 1), |_| 0.5);
        let cond = filled((1, 8, 1, 1), |_| 1.0);
        let uncond = filled((1, 8, 1, 1), |_| 0.0);
        let out = concatenate(Axis(0), &[cond.view(), uncond.view()]).unwrap();
        let zero = filled((1, 4, 1, 1), |_| 0.0);
        let run = |channels| {
            let cfg = SamplingSpec { cfg_channels: channels, stop_guidance: 50, ..Default::default() };
            guided_step(&sched.coefficients(10), 10, x.view(), out.view(), zero.view(), zero.view(), &cfg, true)
        };
        let three = run(3);
        let four = run(4);
        assert_eq!(three[[0, 0, 0, 0]], four[[0, 0, 0, 0]]);
        assert_ne!(three[[0, 3, 0, 0]], four[[0, 3, 0, 0]], "channel 3 is conditional-only with 3 guided channels");
    }
}
