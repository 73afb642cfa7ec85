//! The MGD³ sampling loop for a batch of samples: S steps of a [`Sampler`] (the reference DDPM
//! step, or DDIM with mode guidance, the paper's Algorithm 1), each one DiT call on the
//! `[cond, uncond]` pair batch followed by the step. All noise is an argument (`noise[:, 0]` = x_T,
//! `noise[:, k]` = the noise of the k-th step, for DDIM too; with η = 0 DDIM uses only x_T), so
//! the loop is a pure function of the model, the modes and the noise.

use std::time::{Duration, Instant};

use ndarray::{Array4, ArrayView3, ArrayView4, ArrayView5, Axis, concatenate, s};
use thiserror::Error;

use mgd3_common::job::{SamplerKind, SamplingSpec};

use super::schedule::{Respacing, Schedule};

/// The reverse step a sampling run takes: the job's sampler ([`SamplerKind`], the one sampler
/// type from the job spec to the maths) and its η. Each kind's step lives in its own module over
/// the shared guidance loop ([`super::guidance`]): a new sampler is a [`SamplerKind`] variant, a
/// module with its [`super::guidance::StepRule`], and its two arms here.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Sampler {
    /// Which step.
    pub kind: SamplerKind,
    /// DDIM's η in `[0, 1]` (0: deterministic, 1: DDPM-like noise); 0 for DDPM.
    pub eta: f32,
}

impl Sampler {
    /// The reference DDPM step (MGD3-SPEC §2.2).
    pub const DDPM: Sampler = Sampler { kind: SamplerKind::Ddpm, eta: 0.0 };

    /// The sampler a job spec or the CLI names (`eta` is DDIM's; checked by the caller).
    pub fn new(kind: SamplerKind, eta: f32) -> Self {
        Sampler { kind, eta }
    }

    /// DDIM with mode guidance (the paper's Algorithm 1) at `eta`.
    pub fn ddim(eta: f32) -> Self {
        Sampler { kind: SamplerKind::Ddim, eta }
    }

    /// The timesteps this sampler visits.
    pub fn respacing(&self) -> Respacing {
        match self.kind {
            SamplerKind::Ddpm => super::ddpm::RESPACING,
            SamplerKind::Ddim => super::ddim::RESPACING,
        }
    }

    /// x_{i−1} from x_i and the model output (see [`super::ddpm::guided_step`] and
    /// [`super::ddim::ddim_step`]).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        schedule: &Schedule,
        i: usize,
        x: ArrayView4<f32>,
        model_out: ArrayView4<f32>,
        modes: ArrayView4<f32>,
        noise: ArrayView4<f32>,
        guidance: &SamplingSpec,
        model: DenoiserInfo,
    ) -> Array4<f32> {
        match self.kind {
            SamplerKind::Ddpm => super::ddpm::guided_step(
                &schedule.coefficients(i),
                i,
                x,
                model_out,
                modes,
                noise,
                guidance,
                model.learn_sigma,
            ),
            SamplerKind::Ddim => super::ddim::ddim_step(
                &schedule.ddim_coefficients(i, self.eta as f64),
                i,
                x,
                model_out,
                modes,
                noise,
                guidance,
            ),
        }
    }
}

/// Errors of the network behind a [`Denoiser`].
pub type ModelError = Box<dyn std::error::Error + Send + Sync>;

/// The network the sampler needs: ε (and variance) prediction for latents at original timesteps.
pub trait Denoiser {
    /// `x` `[B,C,h,w]`, `t` original timesteps, `y` labels (null class for the unconditional half);
    /// returns `[B, 2C, h, w]` (learned sigma) or `[B, C, h, w]`.
    ///
    /// # Errors
    /// Whatever the network reports; the sampler wraps it in [`SampleError::Model`].
    fn predict(&mut self, x: ArrayView4<f32>, t: &[i64], y: &[i64]) -> Result<Array4<f32>, ModelError>;
}

/// Errors of a sampling run.
#[derive(Debug, Error)]
pub enum SampleError {
    /// Labels, noise or the model output do not have the shape the modes imply.
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        /// `labels`, `noise` or `model output`.
        what: &'static str,
        /// The shape expected.
        expected: String,
        /// The shape given.
        got: String,
    },
    /// t_stop is above the number of sampling steps.
    #[error("t_stop {t_stop} is larger than the number of steps {steps}")]
    StopAfterEnd {
        /// The t_stop given.
        t_stop: usize,
        /// Sampling steps S.
        steps: usize,
    },
    /// CFG was asked to mix more channels than the latents have.
    #[error("cfg_channels {cfg_channels} exceeds the {channels} latent channels")]
    CfgChannels {
        /// Channels CFG was asked to mix.
        cfg_channels: usize,
        /// Latent channels C.
        channels: usize,
    },
    /// Once guidance has been applied, a sample's latent RMS rose above [`DIVERGENCE_FACTOR`] ×
    /// its mode's RMS (at least 1), or turned non-finite, where the same step without guidance
    /// would not have: λ is too large for the model.
    #[error(
        "sample {sample} diverged at step i = {step} (t = {timestep}): latent RMS {rms} is above {bound} \
         ({DIVERGENCE_FACTOR} × the scale of its mode); the mode-guidance scale λ = {guidance_scale} is too \
         large for this model (or the DiT returned NaN/Inf)"
    )]
    Diverged {
        /// Index of the sample within the batch (or its class, see [`SampleError::with_sample`]).
        sample: usize,
        /// Respaced step index i.
        step: usize,
        /// Original timestep t of that step.
        timestep: i64,
        /// The sample's latent RMS (not finite when the latent is not).
        rms: f32,
        /// The RMS bound it crossed.
        bound: f32,
        /// λ of the run.
        guidance_scale: f32,
    },
    /// A sample's latent turned NaN or infinite before any guidance was applied, or would have
    /// without guidance: the DiT's own output is at fault.
    #[error(
        "sample {sample} became non-finite at step i = {step} (t = {timestep}), as it does without mode guidance: \
         the DiT itself returned NaN/Inf (check the model file and its export)"
    )]
    NonFinite {
        /// Index of the sample within the batch (or its class).
        sample: usize,
        /// Respaced step index i.
        step: usize,
        /// Original timestep t of that step.
        timestep: i64,
    },
    /// The [`Denoiser`] returned an error.
    #[error("the denoiser failed at step i = {step} (t = {timestep})")]
    Model {
        /// Respaced step index i.
        step: usize,
        /// Original timestep t of that step.
        timestep: i64,
        /// The denoiser's error.
        #[source]
        source: ModelError,
    },
}

impl SampleError {
    /// The sample (index within the sampled batch) the error is about, if any.
    pub fn sample_index(&self) -> Option<usize> {
        match self {
            SampleError::Diverged { sample, .. } | SampleError::NonFinite { sample, .. } => Some(*sample),
            _ => None,
        }
    }

    /// The same error about sample `index` (its index within its class, when the batch mixed
    /// classes).
    pub fn with_sample(self, index: usize) -> Self {
        match self {
            SampleError::Diverged { step, timestep, rms, bound, guidance_scale, .. } => {
                SampleError::Diverged { sample: index, step, timestep, rms, bound, guidance_scale }
            }
            SampleError::NonFinite { step, timestep, .. } => SampleError::NonFinite { sample: index, step, timestep },
            other => other,
        }
    }

    /// Renumbers the sample of a [`SampleError::Diverged`] when this batch started at sample `first`.
    pub fn offset_sample(self, first: usize) -> Self {
        match self {
            SampleError::Diverged { sample, step, timestep, rms, bound, guidance_scale } => {
                SampleError::Diverged { sample: sample + first, step, timestep, rms, bound, guidance_scale }
            }
            SampleError::NonFinite { sample, step, timestep } => {
                SampleError::NonFinite { sample: sample + first, step, timestep }
            }
            other => other,
        }
    }
}

/// A latent whose RMS exceeds this multiple of its data scale (its mode's RMS, at least 1) has left
/// the DiT's input distribution for good: a too-large λ makes the guidance feedback loop unstable at
/// high noise, where x̂₀ errors are amplified by 1/√ᾱ, and the DiT cannot pull such a latent back
/// (on the demo model λ = 0.4 reaches RMS 10⁵–10⁹ while λ ≤ 0.2 stays below 2). Failing names the
/// sample and step instead of writing saturated images.
pub const DIVERGENCE_FACTOR: f32 = 10.0;

fn rms(a: ArrayView3<f32>) -> f32 {
    (a.iter().map(|v| v * v).sum::<f32>() / a.len().max(1) as f32).sqrt()
}

/// Per sample, the latent RMS beyond which it has run away: [`DIVERGENCE_FACTOR`] × its data scale.
fn divergence_bounds(modes: ArrayView4<f32>) -> Vec<f32> {
    modes.outer_iter().map(|m| DIVERGENCE_FACTOR * rms(m).max(1.0)).collect()
}

/// The first sample of `x` whose latent is non-finite or beyond its bound, with its RMS and bound.
fn runaway(x: ArrayView4<f32>, bounds: &[f32]) -> Option<(usize, f32, f32)> {
    x.outer_iter().zip(bounds).enumerate().find_map(|(j, (xj, &bound))| {
        let r = rms(xj);
        (!r.is_finite() || r > bound).then_some((j, r, bound))
    })
}

/// What the loop needs to know about the model besides its outputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DenoiserInfo {
    /// Label of the unconditional (null) class.
    pub null_label: i64,
    /// The output carries 2C channels: ε, then the learned-range variance interpolation v.
    pub learn_sigma: bool,
}

/// Where sampling time went.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SampleTimings {
    /// Time inside [`Denoiser::predict`].
    pub model: Duration,
    /// Time in the reverse steps and divergence checks between model calls.
    pub maths: Duration,
    /// Calls to [`Denoiser::predict`] (one per step).
    pub model_calls: usize,
}

/// [`sample_with`] the reference DDPM step.
///
/// # Errors
/// Those of [`sample_with`].
#[allow(clippy::too_many_arguments)]
pub fn sample(
    denoiser: &mut dyn Denoiser,
    schedule: &Schedule,
    guidance: &SamplingSpec,
    model: DenoiserInfo,
    labels: &[i64],
    modes: ArrayView4<f32>,
    noise: ArrayView5<f32>,
    observe: impl FnMut(usize, ArrayView4<f32>),
) -> Result<(Array4<f32>, SampleTimings), SampleError> {
    sample_with(Sampler::DDPM, denoiser, schedule, guidance, model, labels, modes, noise, observe)
}

/// Samples a batch with `sampler` over `schedule` (respaced for it, see
/// [`Sampler::respacing`]): `labels` `[n]` (one per sample, so one call may mix classes), `modes`
/// `[n,C,h,w]` in scaled latent space (sample j is pulled toward `modes[j]`), `noise` `[n,S+1,C,h,w]`.
/// `observe(k, x)` sees the state after every step k = 1..S. Returns x₀ (scaled latent space).
///
/// # Errors
/// [`SampleError::Shape`], [`SampleError::StopAfterEnd`] or [`SampleError::CfgChannels`] for
/// inconsistent arguments or model output; [`SampleError::Model`] when the denoiser fails;
/// [`SampleError::Diverged`] for a sample that runs away under guidance,
/// [`SampleError::NonFinite`] for one that turns non-finite before any guidance.
#[allow(clippy::too_many_arguments)]
pub fn sample_with(
    sampler: Sampler,
    denoiser: &mut dyn Denoiser,
    schedule: &Schedule,
    guidance: &SamplingSpec,
    model: DenoiserInfo,
    labels: &[i64],
    modes: ArrayView4<f32>,
    noise: ArrayView5<f32>,
    mut observe: impl FnMut(usize, ArrayView4<f32>),
) -> Result<(Array4<f32>, SampleTimings), SampleError> {
    let steps = schedule.steps();
    let (n, c, h, w) = modes.dim();
    let shape = |what, expected: String, got: &[usize]| SampleError::Shape { what, expected, got: format!("{got:?}") };
    if labels.len() != n {
        return Err(shape("labels", format!("{n} (one per mode)"), &[labels.len()]));
    }
    if noise.shape() != [n, steps + 1, c, h, w] {
        return Err(shape("noise", format!("[{n}, {}, {c}, {h}, {w}]", steps + 1), noise.shape()));
    }
    if guidance.stop_guidance > steps {
        return Err(SampleError::StopAfterEnd { t_stop: guidance.stop_guidance, steps });
    }
    if guidance.cfg_channels > c {
        return Err(SampleError::CfgChannels { cfg_channels: guidance.cfg_channels, channels: c });
    }
    let out_channels = if model.learn_sigma { 2 * c } else { c };
    let pair_labels: Vec<i64> = labels.iter().copied().chain(std::iter::repeat_n(model.null_label, n)).collect();
    let mut timings = SampleTimings::default();
    let mut bounds = divergence_bounds(modes);
    let unguided_spec = SamplingSpec { guidance_scale: 0.0, ..*guidance };
    let mut guided = false;
    let mut x = noise.index_axis(Axis(1), 0).to_owned();
    for k in 1..=steps {
        let i = steps - k;
        let timestep = schedule.timesteps[i];
        let started = Instant::now();
        let pair = concatenate(Axis(0), &[x.view(), x.view()]).expect("same shapes");
        let out = denoiser
            .predict(pair.view(), &vec![timestep; 2 * n], &pair_labels)
            .map_err(|source| SampleError::Model { step: i, timestep, source })?;
        let model_done = Instant::now();
        timings.model += model_done - started;
        timings.model_calls += 1;
        if out.shape() != [2 * n, out_channels, h, w] {
            return Err(shape("model output", format!("[{}, {out_channels}, {h}, {w}]", 2 * n), out.shape()));
        }
        let step_noise = noise.slice(s![.., k, .., .., ..]);
        let next = sampler.step(schedule, i, x.view(), out.view(), modes, step_noise, guidance, model);
        // The bound guards against guidance running away; a trajectory no guidance has touched
        // is the model's own (random-weight models leave the modes' scale far behind) and fails
        // only when it is no longer finite, naming the model.
        guided |= guidance.guidance_scale != 0.0 && i > guidance.stop_guidance;
        if guided {
            // A sample past its bound is λ's doing only if the same step without guidance, from
            // the same latent, stays inside it; if the model's own step leaves the bound too,
            // the trajectory is the model's (as at λ = 0) and only a non-finite latent fails.
            let mut unguided: Option<Array4<f32>> = None;
            while let Some((sample, rms, bound)) = runaway(next.view(), &bounds) {
                let own = unguided.get_or_insert_with(|| {
                    sampler.step(schedule, i, x.view(), out.view(), modes, step_noise, &unguided_spec, model)
                });
                let own_rms = self::rms(own.index_axis(Axis(0), sample));
                if !own_rms.is_finite() {
                    return Err(SampleError::NonFinite { sample, step: i, timestep });
                }
                if rms.is_finite() && own_rms > bound {
                    bounds[sample] = f32::INFINITY;
                    continue;
                }
                let guidance_scale = guidance.guidance_scale;
                return Err(SampleError::Diverged { sample, step: i, timestep, rms, bound, guidance_scale });
            }
        } else if let Some((sample, _, _)) = runaway(next.view(), &vec![f32::INFINITY; n]) {
            return Err(SampleError::NonFinite { sample, step: i, timestep });
        }
        x = next;
        timings.maths += model_done.elapsed();
        observe(k, x.view());
    }
    Ok((x, timings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mgd3::schedule::{cumulative_alphas, linear_betas};
    use ndarray::{Array, Array5};

    /// The exact ε-predictor for standard-normal data (ε = √(1−ᾱ_t)·x), with a small label
    /// offset so that labels matter; v = tanh(t/1000).
    struct GaussianData {
        calls: Vec<(Vec<i64>, Vec<i64>)>,
        alphas_cumprod: Vec<f64>,
    }

    impl GaussianData {
        fn new() -> Self {
            let alphas_cumprod = cumulative_alphas(&linear_betas(1000, 1e-4, 0.02));
            GaussianData { calls: vec![], alphas_cumprod }
        }
    }

    impl Denoiser for GaussianData {
        fn predict(&mut self, x: ArrayView4<f32>, t: &[i64], y: &[i64]) -> Result<Array4<f32>, ModelError> {
            self.calls.push((t.to_vec(), y.to_vec()));
            let (b, c, h, w) = x.dim();
            let mut out = Array4::zeros((b, 2 * c, h, w));
            for ((bi, ch, yy, xx), v) in out.indexed_iter_mut() {
                let scale = (1.0 - self.alphas_cumprod[t[bi] as usize]).sqrt() as f32;
                *v = if ch < c {
                    x[[bi, ch, yy, xx]] * scale + 0.01 * y[bi] as f32
                } else {
                    (t[bi] as f32 / 1000.0).tanh()
                };
            }
            Ok(out)
        }
    }

    fn noise(n: usize, steps: usize) -> Array5<f32> {
        let len = n * (steps + 1) * 4 * 2 * 2;
        Array::from_shape_vec(
            (n, steps + 1, 4, 2, 2),
            (0..len).map(|k| ((k * 7919) % 97) as f32 / 48.0 - 1.0).collect(),
        )
        .unwrap()
    }

    const SPEC: DenoiserInfo = DenoiserInfo { null_label: 10, learn_sigma: true };

    #[test]
    fn calls_the_model_on_pairs_with_original_timesteps() {
        let schedule = Schedule::linear(1000, 1e-4, 0.02, 5).unwrap();
        let modes = Array4::zeros((2, 4, 2, 2));
        let mut model = GaussianData::new();
        let mut seen = vec![];
        let cfg = SamplingSpec { stop_guidance: 2, ..Default::default() };
        sample(&mut model, &schedule, &cfg, SPEC, &[3, 7], modes.view(), noise(2, 5).view(), |k, _| seen.push(k))
            .unwrap();
        assert_eq!(seen, [1, 2, 3, 4, 5]);
        let ts: Vec<i64> = model.calls.iter().map(|(t, _)| t[0]).collect();
        assert_eq!(ts, [999, 749, 500, 250, 0]);
        assert!(model.calls.iter().all(|(t, y)| t.len() == 4 && y == &[3, 7, 10, 10]));
    }

    #[test]
    fn a_sample_does_not_depend_on_its_batch_mates() {
        let schedule = Schedule::linear(1000, 1e-4, 0.02, 8).unwrap();
        let all_noise = noise(3, 8);
        let modes = Array::from_shape_fn((3, 4, 2, 2), |(b, c, _, _)| (b as f32) - (c as f32) * 0.5);
        let cfg = SamplingSpec { stop_guidance: 3, ..Default::default() };
        let (together, _) = sample(
            &mut GaussianData::new(),
            &schedule,
            &cfg,
            SPEC,
            &[1, 2, 3],
            modes.view(),
            all_noise.view(),
            |_, _| {},
        )
        .unwrap();
        for j in 0..3 {
            let (alone, _) = sample(
                &mut GaussianData::new(),
                &schedule,
                &cfg,
                SPEC,
                &[j as i64 + 1],
                modes.slice(s![j..j + 1, .., .., ..]),
                all_noise.slice(s![j..j + 1, .., .., .., ..]),
                |_, _| {},
            )
            .unwrap();
            assert_eq!(alone.index_axis(Axis(0), 0), together.index_axis(Axis(0), j));
        }
    }

    #[test]
    fn mode_guidance_moves_samples_toward_their_mode() {
        let schedule = Schedule::linear(1000, 1e-4, 0.02, 20).unwrap();
        let n = 32;
        let modes = Array4::from_elem((n, 4, 2, 2), 3.0f32);
        let z = noise(n, 20);
        let labels = vec![1; n];
        let run = |t_stop, scale| {
            let cfg = SamplingSpec { stop_guidance: t_stop, guidance_scale: scale, ..Default::default() };
            sample(&mut GaussianData::new(), &schedule, &cfg, SPEC, &labels, modes.view(), z.view(), |_, _| {})
                .unwrap()
                .0
        };
        let distance = |x: Array4<f32>| (&x - &modes).mapv(|v| v * v).sum() / n as f32;
        let (guided, unguided) = (distance(run(0, 0.5)), distance(run(20, 0.5)));
        assert!(guided < 0.25 * unguided, "mean squared distances {guided} vs {unguided}");
        // t_stop = S is plain DiT sampling, whatever λ is.
        assert_eq!(run(20, 0.5), run(0, 0.0));
    }

    /// [`GaussianData`], except that from timestep `from_t` on, samples labelled `bad` get ε = `eps`.
    struct BreaksAt {
        inner: GaussianData,
        bad: i64,
        from_t: i64,
        eps: f32,
    }

    impl Denoiser for BreaksAt {
        fn predict(&mut self, x: ArrayView4<f32>, t: &[i64], y: &[i64]) -> Result<Array4<f32>, ModelError> {
            let mut out = self.inner.predict(x, t, y)?;
            let c = x.dim().1;
            for (b, mut row) in out.outer_iter_mut().enumerate() {
                if y[b] == self.bad && t[b] <= self.from_t {
                    row.slice_mut(s![..c, .., ..]).fill(self.eps);
                }
            }
            Ok(out)
        }
    }

    /// A λ that throws a sample past its bound is named, with the sample and the step; under
    /// guidance, a model whose own step leaves the bound (as random weights do) is not λ's
    /// fault: its finite trajectory is kept as at λ = 0, and a NaN is the model's.
    #[test]
    fn a_diverging_or_non_finite_sample_is_an_error_naming_it_and_the_step() {
        let schedule = Schedule::linear(1000, 1e-4, 0.02, 5).unwrap();
        let modes = Array4::zeros((3, 4, 2, 2));
        let cfg = SamplingSpec { stop_guidance: 2, ..Default::default() };
        let run = |eps: f32, cfg: &SamplingSpec| {
            let mut model = BreaksAt { inner: GaussianData::new(), bad: 7, from_t: 500, eps };
            sample(&mut model, &schedule, cfg, SPEC, &[3, 7, 3], modes.view(), noise(3, 5).view(), |_, _| {})
        };
        // Timesteps 999, 749, 500, ...: the third step (i = 2, t = 500) is the first with the broken ε.
        assert!(run(1e4, &cfg).is_ok(), "the model's own runaway is kept, as at λ = 0");
        let err = run(f32::NAN, &cfg).unwrap_err();
        assert!(matches!(err, SampleError::NonFinite { sample: 1, step: 2, timestep: 500 }), "{err:?}");
        assert!(!err.to_string().contains("λ"), "{err}");
        // A sound model and a λ far too large: the guided step leaves the bound, the same step
        // without guidance would not.
        let wild = SamplingSpec { guidance_scale: 1e3, ..cfg };
        match run(0.0, &wild) {
            Err(SampleError::Diverged { step: 4, timestep: 999, rms, bound, .. }) => {
                assert!(rms > bound, "rms {rms} bound {bound}");
                assert_eq!(bound, DIVERGENCE_FACTOR);
            }
            other => panic!("λ = 1000: {other:?}"),
        }
        let err = run(0.0, &wild).unwrap_err().offset_sample(8);
        assert!(matches!(err, SampleError::Diverged { sample: 8, .. }), "{err:?}");
        assert!(err.to_string().contains("sample 8 diverged at step i = 4 (t = 999)"), "{err}");
        assert!(err.to_string().contains("λ = 1000"), "{err}");
    }

    /// With guidance off (t_stop = steps, or λ = 0) the bound never applies: a large but finite
    /// trajectory is the model's own and is kept; a non-finite one fails naming the model, not λ.
    #[test]
    fn without_guidance_only_a_non_finite_sample_fails_and_lambda_is_not_blamed() {
        let schedule = Schedule::linear(1000, 1e-4, 0.02, 5).unwrap();
        let modes = Array4::zeros((3, 4, 2, 2));
        for cfg in [
            SamplingSpec { stop_guidance: 5, ..Default::default() },
            SamplingSpec { guidance_scale: 0.0, stop_guidance: 0, ..Default::default() },
        ] {
            let run = |eps: f32| {
                let mut model = BreaksAt { inner: GaussianData::new(), bad: 7, from_t: 500, eps };
                sample(&mut model, &schedule, &cfg, SPEC, &[3, 7, 3], modes.view(), noise(3, 5).view(), |_, _| {})
            };
            assert!(run(1e4).is_ok(), "{cfg:?}: an unguided trajectory far from the modes is kept");
            let err = run(f32::NAN).unwrap_err();
            assert!(matches!(err, SampleError::NonFinite { sample: 1, step: 2, timestep: 500 }), "{cfg:?}: {err:?}");
            assert!(!err.to_string().contains("λ") && err.to_string().contains("without mode guidance"), "{err}");
        }
    }

    #[test]
    fn rejects_inconsistent_shapes() {
        let schedule = Schedule::linear(1000, 1e-4, 0.02, 5).unwrap();
        let modes = Array4::zeros((2, 4, 2, 2));
        let run = |cfg: SamplingSpec, labels: &[i64], z: Array5<f32>| {
            sample(&mut GaussianData::new(), &schedule, &cfg, SPEC, labels, modes.view(), z.view(), |_, _| {})
        };
        let fine = SamplingSpec { stop_guidance: 2, ..Default::default() };
        assert!(run(fine, &[1, 2], noise(2, 5)).is_ok());
        assert!(matches!(run(fine, &[1], noise(2, 5)), Err(SampleError::Shape { what: "labels", .. })));
        assert!(matches!(run(fine, &[1, 2], noise(2, 4)), Err(SampleError::Shape { what: "noise", .. })));
        let late = SamplingSpec { stop_guidance: 6, ..Default::default() };
        assert!(matches!(run(late, &[1, 2], noise(2, 5)), Err(SampleError::StopAfterEnd { .. })));
        let wide = SamplingSpec { cfg_channels: 5, ..fine };
        assert!(matches!(run(wide, &[1, 2], noise(2, 5)), Err(SampleError::CfgChannels { .. })));
    }
}
