//! The guidance loop every sampler's reverse step shares: the batch layout (the model output of n
//! samples is laid out [cond(n), uncond(n)]), classifier-free guidance ([`cfg_eps`]: the first
//! `cfg_channels` ε channels are mixed — 3 reproduces DiT's quirk, 4 is standard CFG — the others,
//! and a learned-range variance output, come from the conditional half), the mode-guidance gate
//! (i > t_stop) and the last step's missing noise. What differs between samplers — the step's
//! coefficients and how one element of x_{i−1} follows — is a [`StepRule`], one module per
//! sampler: [`super::ddpm`] (the reference step) and [`super::ddim`] (the paper's Algorithm 1).
//! No step draws noise: `noise` is an argument. Every operation is float32 in the reference's
//! order so fixtures match to rounding.

use ndarray::{Array4, ArrayView4};

use mgd3_common::job::SamplingSpec;

/// CFG on one ε value: `uncond + s·(cond − uncond)` for a mixed channel, else `cond`.
#[inline(always)]
pub fn cfg_eps(cond: f32, uncond: f32, mixed: bool, scale: f32) -> f32 {
    if mixed { uncond + scale * (cond - uncond) } else { cond }
}

/// What one element of a reverse step sees.
#[derive(Clone, Copy, Debug)]
pub struct Element {
    /// x_i.
    pub x: f32,
    /// ε after CFG.
    pub eps: f32,
    /// The model's variance output for this element (learned-range σ), 0 when it has none.
    pub variance: f32,
    /// The element's mode.
    pub mode: f32,
    /// The element's noise for this step.
    pub noise: f32,
    /// Mode guidance applies (i > t_stop).
    pub guided: bool,
    /// Noise is added (i > 0).
    pub add_noise: bool,
    /// λ.
    pub lambda: f32,
}

/// One sampler's reverse step, element by element, over the shared [`guided_loop`].
pub trait StepRule {
    /// x_{i−1} of one element.
    fn element(&self, e: Element) -> f32;
}

/// Standard-layout views of a step's inputs as slices: x, model output, modes, noise.
struct StepInputs<'a> {
    x: ndarray::CowArray<'a, f32, ndarray::Ix4>,
    out: ndarray::CowArray<'a, f32, ndarray::Ix4>,
    modes: ndarray::CowArray<'a, f32, ndarray::Ix4>,
    noise: ndarray::CowArray<'a, f32, ndarray::Ix4>,
}

/// The view itself when it is in standard layout, else a standard-layout copy.
fn standard(a: ArrayView4<'_, f32>) -> ndarray::CowArray<'_, f32, ndarray::Ix4> {
    if a.is_standard_layout() { a.into() } else { a.to_owned().into() }
}

impl<'a> StepInputs<'a> {
    fn new(
        x: ArrayView4<'a, f32>,
        out: ArrayView4<'a, f32>,
        modes: ArrayView4<'a, f32>,
        noise: ArrayView4<'a, f32>,
    ) -> Self {
        StepInputs { x: standard(x), out: standard(out), modes: standard(modes), noise: standard(noise) }
    }

    fn slices(&self) -> (&[f32], &[f32], &[f32], &[f32]) {
        let layout = "standard layout";
        (
            self.x.as_slice().expect(layout),
            self.out.as_slice().expect(layout),
            self.modes.as_slice().expect(layout),
            self.noise.as_slice().expect(layout),
        )
    }
}

/// x_{i−1} for a batch by `rule`: `x` `[n,C,h,w]`, `model_out` `[2n, C or 2C, h, w]`, `modes`
/// and `noise` `[n,C,h,w]`. Shapes are the caller's contract (the sampler checks them once per
/// run).
#[allow(clippy::too_many_arguments)]
pub fn guided_loop(
    rule: &impl StepRule,
    i: usize,
    x: ArrayView4<f32>,
    model_out: ArrayView4<f32>,
    modes: ArrayView4<f32>,
    noise: ArrayView4<f32>,
    config: &SamplingSpec,
) -> Array4<f32> {
    let (n, channels, h, w) = x.dim();
    let plane = h * w;
    let (guided, add_noise) = (i > config.stop_guidance, i > 0);
    let (s, lambda) = (config.cfg_scale, config.guidance_scale);
    let inputs = StepInputs::new(x, model_out, modes, noise);
    let (xs, os, ms, ns) = inputs.slices();
    let out_channels = model_out.dim().1;
    let has_variance = out_channels > channels;
    let mut next = vec![0f32; xs.len()];
    for b in 0..n {
        for ch in 0..channels {
            let base = (b * channels + ch) * plane;
            let cond = (b * out_channels + ch) * plane;
            let uncond = ((n + b) * out_channels + ch) * plane;
            let var = (b * out_channels + channels + ch) * plane;
            let mix = ch < config.cfg_channels;
            for p in 0..plane {
                next[base + p] = rule.element(Element {
                    x: xs[base + p],
                    eps: cfg_eps(os[cond + p], os[uncond + p], mix, s),
                    variance: if has_variance { os[var + p] } else { 0.0 },
                    mode: ms[base + p],
                    noise: ns[base + p],
                    guided,
                    add_noise,
                    lambda,
                });
            }
        }
    }
    Array4::from_shape_vec((n, channels, h, w), next).expect("shape of x")
}
