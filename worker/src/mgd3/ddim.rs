//! The paper's Algorithm 1 (DDIM with mode guidance): ε = CFG(ε_c, ε_u);
//! x̂₀ = √(1/ᾱ_i)·x − √(1/ᾱ_i − 1)·ε; while i > t_stop ε̂ = ε − √(1−ᾱ_i)·λ·(m − x̂₀), else ε̂ = ε;
//! x̂₀′ from ε̂ the same way; x_{i−1} = √ᾱ_{i−1}·x̂₀′ + √(1 − ᾱ_{i−1} − σ_i²)·ε̂ + 𝟙(i > 0)·σ_i·ξ
//! (σ_i from η, ADM's `ddim_sample`). Timesteps `space_timesteps(T, "ddimS")`.

use ndarray::{Array4, ArrayView4};

use mgd3_common::job::SamplingSpec;

use super::guidance::{Element, StepRule, guided_loop};
use super::schedule::{DdimCoefficients, Respacing};

/// The timesteps DDIM visits.
pub const RESPACING: Respacing = Respacing::Ddim;

/// The DDIM step's rule: step i's coefficients (η included).
struct Ddim(DdimCoefficients);

impl StepRule for Ddim {
    #[inline(always)]
    fn element(&self, e: Element) -> f32 {
        let DdimCoefficients {
            sqrt_recip_alphas_cumprod: sra,
            sqrt_recipm1_alphas_cumprod: srm1,
            sqrt_one_minus_alpha_cumprod: som,
            sqrt_alpha_cumprod_prev: sap,
            sigma,
            direction,
        } = self.0;
        let eps = if e.guided {
            let x0 = sra * e.x - srm1 * e.eps;
            e.eps - ((e.mode - x0) * e.lambda) * som
        } else {
            e.eps
        };
        let x0 = sra * e.x - srm1 * eps;
        let noise_term = if e.add_noise { sigma * e.noise } else { 0.0 };
        sap * x0 + direction * eps + noise_term
    }
}

/// x_{i−1} for a batch by the paper's Algorithm 1 (DDIM with mode guidance): `x` `[n,C,h,w]`,
/// `model_out` `[2n, C or 2C, h, w]` (variance channels unused), `modes` and `noise` `[n,C,h,w]`.
/// Shapes are the caller's contract.
pub fn ddim_step(
    coefficients: &DdimCoefficients,
    i: usize,
    x: ArrayView4<f32>,
    model_out: ArrayView4<f32>,
    modes: ArrayView4<f32>,
    noise: ArrayView4<f32>,
    config: &SamplingSpec,
) -> Array4<f32> {
    guided_loop(&Ddim(*coefficients), i, x, model_out, modes, noise, config)
}
