//! The diffusion schedule exactly as the reference (ADM / DiT `gaussian_diffusion.py` +
//! `respace.py`): linear betas in float64, `space_timesteps(T, "S")` (DDPM) or
//! `space_timesteps(T, "ddimS")` (DDIM: every stride-th timestep from 0), recomputed betas and
//! every derived coefficient in float64. Step maths gathers them as float32, like the reference.

use thiserror::Error;

/// Errors of building a schedule.
#[derive(Debug, Error, PartialEq)]
pub enum ScheduleError {
    /// The model's `mgd3.beta_schedule` names a schedule other than `linear`.
    #[error("unsupported beta schedule `{0}` (only `linear` is implemented)")]
    UnsupportedBetaSchedule(String),
    /// No stride gives exactly `steps` DDIM timesteps of `train` (`ddim_stride` has none).
    #[error(
        "DDIM cannot take {steps} evenly strided steps of {train} training timesteps (ADM's `ddim{steps}`); \
         choose steps such as 10, 20, 25, 50, 100 or 250"
    )]
    NoDdimStride {
        /// Training timesteps T.
        train: usize,
        /// Sampling steps S asked for.
        steps: usize,
    },
    /// `steps` is 0, above `train`, or rounds to repeated timesteps.
    #[error(
        "cannot respace the DiT's {train} training timesteps into {steps} sampling steps (steps must be 1 to {train})"
    )]
    BadStepCount {
        /// Training timesteps T.
        train: usize,
        /// Sampling steps S asked for.
        steps: usize,
    },
    /// Linear betas outside 0 < start ≤ end < 1.
    #[error("invalid linear betas: start {start}, end {end} (need 0 < start <= end < 1)")]
    BadBetas {
        /// β of the first training timestep.
        start: f64,
        /// β of the last training timestep.
        end: f64,
    },
}

/// Python's `round()` on floats: ties go to the even neighbour. The reference code rounds
/// respaced timesteps and `center_crop_arr` sizes this way.
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 { 2.0 * (x / 2.0).round() } else { r }
}

/// `space_timesteps(train, str(steps))` for a single section: the kept original timesteps,
/// ascending. The stride is accumulated by repeated float addition, as in the reference.
///
/// # Errors
/// [`ScheduleError::BadStepCount`] when `steps` is 0, above `train`, or gives repeated timesteps.
pub fn spaced_timesteps(train: usize, steps: usize) -> Result<Vec<usize>, ScheduleError> {
    if steps == 0 || steps > train {
        return Err(ScheduleError::BadStepCount { train, steps });
    }
    let stride = if steps <= 1 { 1.0 } else { (train as f64 - 1.0) / (steps as f64 - 1.0) };
    let mut current = 0.0f64;
    let mut kept = Vec::with_capacity(steps);
    for _ in 0..steps {
        kept.push(round_half_even(current) as usize);
        current += stride;
    }
    kept.dedup();
    if kept.len() != steps {
        return Err(ScheduleError::BadStepCount { train, steps });
    }
    Ok(kept)
}

/// `space_timesteps(train, "ddim{steps}")`: `range(0, train, stride)` for the smallest stride
/// that gives exactly `steps` timesteps (T = 1000, S = 50: 0, 20, …, 980), ascending.
///
/// # Errors
/// [`ScheduleError::NoDdimStride`] when no stride gives exactly `steps`.
pub fn ddim_timesteps(train: usize, steps: usize) -> Result<Vec<usize>, ScheduleError> {
    mgd3_common::job::ddim_stride(train, steps)
        .map(|stride| (0..train).step_by(stride).collect())
        .ok_or(ScheduleError::NoDdimStride { train, steps })
}

/// The beta schedules a DiT's metadata may name (`mgd3.beta_schedule`), parsed once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, T)`, DiT's.
    Linear,
}

impl std::str::FromStr for BetaSchedule {
    type Err = ScheduleError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "linear" => Ok(BetaSchedule::Linear),
            other => Err(ScheduleError::UnsupportedBetaSchedule(other.to_owned())),
        }
    }
}

/// Which S of the T training timesteps a sampler visits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Respacing {
    /// `space_timesteps(T, "S")`: S evenly rounded timesteps from 0 to T−1 (the reference DDPM).
    #[default]
    Uniform,
    /// `space_timesteps(T, "ddimS")`: every stride-th timestep from 0.
    Ddim,
}

/// `numpy.linspace(start, end, train)`: start + k·step, with the last value pinned to `end`.
pub fn linear_betas(train: usize, beta_start: f64, beta_end: f64) -> Vec<f64> {
    if train == 1 {
        return vec![beta_start];
    }
    let step = (beta_end - beta_start) / (train as f64 - 1.0);
    (0..train).map(|k| if k == train - 1 { beta_end } else { beta_start + k as f64 * step }).collect()
}

/// ᾱ_t = ∏_{s≤t} (1 − β_s), accumulated in order as `numpy.cumprod`.
pub fn cumulative_alphas(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}

/// The respaced schedule of S sampling steps; index i runs 0..S with i = S−1 the noisiest.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Original timestep t_i fed to the model.
    pub timesteps: Vec<i64>,
    /// Respaced β_i = 1 − ᾱ_i / ᾱ_{i−1}, so that ᾱ at each kept timestep is the training ᾱ there.
    pub betas: Vec<f64>,
    /// ᾱ_i = ∏_{j≤i} (1 − β_j).
    pub alphas_cumprod: Vec<f64>,
    /// ᾱ_{i−1}, with ᾱ_{−1} = 1.
    pub alphas_cumprod_prev: Vec<f64>,
    /// √(1/ᾱ_i).
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    /// √(1/ᾱ_i − 1).
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    /// β_i (1 − ᾱ_{i−1}) / (1 − ᾱ_i), the variance of q(x_{i−1} | x_i, x₀).
    pub posterior_variance: Vec<f64>,
    /// log of the posterior variance; index 0 borrows index 1 (its variance is 0).
    pub posterior_log_variance_clipped: Vec<f64>,
    /// β_i √ᾱ_{i−1} / (1 − ᾱ_i), the weight of x̂₀ in the posterior mean.
    pub posterior_mean_coef1: Vec<f64>,
    /// (1 − ᾱ_{i−1}) √(1 − β_i) / (1 − ᾱ_i), the weight of x_i in the posterior mean.
    pub posterior_mean_coef2: Vec<f64>,
    /// log β_i, the upper bound of the learned-range variance.
    pub log_betas: Vec<f64>,
}

impl Schedule {
    /// Linear betas `linspace(start, end, train)` respaced to `steps` steps
    /// (`space_timesteps(train, "steps")`).
    ///
    /// # Errors
    /// [`ScheduleError::BadBetas`] for betas outside 0 < start ≤ end < 1,
    /// [`ScheduleError::BadStepCount`] for `train` = 0 or `steps` not in 1..=train.
    pub fn linear(train: usize, beta_start: f64, beta_end: f64, steps: usize) -> Result<Self, ScheduleError> {
        if !(beta_start > 0.0 && beta_start <= beta_end && beta_end < 1.0) {
            return Err(ScheduleError::BadBetas { start: beta_start, end: beta_end });
        }
        if train == 0 {
            return Err(ScheduleError::BadStepCount { train, steps });
        }
        Self::respaced(&linear_betas(train, beta_start, beta_end), steps)
    }

    /// Builds the schedule for a named beta schedule (only `linear`, as the DiT reference),
    /// respaced for the DDPM sampler.
    ///
    /// # Errors
    /// [`ScheduleError::UnsupportedBetaSchedule`] for another name; those of [`Schedule::linear`].
    pub fn named(
        name: &str,
        train: usize,
        beta_start: f64,
        beta_end: f64,
        steps: usize,
    ) -> Result<Self, ScheduleError> {
        Self::new(name.parse()?, train, beta_start, beta_end, steps, Respacing::Uniform)
    }

    /// The schedule of `steps` sampling steps of a `train`-step beta schedule, respaced for a
    /// sampler.
    ///
    /// # Errors
    /// Betas out of (0, 1), no `steps` within 1..=train, or no DDIM stride giving `steps`.
    pub fn new(
        betas: BetaSchedule,
        train: usize,
        beta_start: f64,
        beta_end: f64,
        steps: usize,
        respacing: Respacing,
    ) -> Result<Self, ScheduleError> {
        match (betas, respacing) {
            (BetaSchedule::Linear, Respacing::Uniform) => Self::linear(train, beta_start, beta_end, steps),
            (BetaSchedule::Linear, Respacing::Ddim) => {
                if !(beta_start > 0.0 && beta_start <= beta_end && beta_end < 1.0) {
                    return Err(ScheduleError::BadBetas { start: beta_start, end: beta_end });
                }
                let kept = ddim_timesteps(train, steps)?;
                Ok(Self::respaced_at(&linear_betas(train, beta_start, beta_end), kept))
            }
        }
    }

    /// Respaces base betas to `steps` steps (`SpacedDiffusion` over `space_timesteps(T, "steps")`).
    ///
    /// # Errors
    /// [`ScheduleError::BadStepCount`] as [`spaced_timesteps`].
    pub fn respaced(base_betas: &[f64], steps: usize) -> Result<Self, ScheduleError> {
        Ok(Self::respaced_at(base_betas, spaced_timesteps(base_betas.len(), steps)?))
    }

    /// `SpacedDiffusion` over the kept original timesteps `kept` (ascending): betas recomputed so
    /// that ᾱ at each kept timestep is the training ᾱ there.
    fn respaced_at(base_betas: &[f64], kept: Vec<usize>) -> Self {
        let mut alpha_cumprod = 1.0f64;
        let mut last = 1.0f64;
        let mut betas = Vec::with_capacity(kept.len());
        let mut next = kept.iter().peekable();
        for (t, beta) in base_betas.iter().enumerate() {
            alpha_cumprod *= 1.0 - beta;
            if next.peek() == Some(&&t) {
                next.next();
                betas.push(1.0 - alpha_cumprod / last);
                last = alpha_cumprod;
            }
        }
        Self::from_betas(kept.into_iter().map(|t| t as i64).collect(), betas)
    }

    fn from_betas(timesteps: Vec<i64>, betas: Vec<f64>) -> Self {
        let n = betas.len();
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0f64;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        let alphas_cumprod_prev: Vec<f64> =
            std::iter::once(1.0).chain(alphas_cumprod[..n - 1].iter().copied()).collect();
        let map = |f: &dyn Fn(usize) -> f64| (0..n).map(f).collect::<Vec<f64>>();
        let posterior_variance = map(&|i| betas[i] * (1.0 - alphas_cumprod_prev[i]) / (1.0 - alphas_cumprod[i]));
        let posterior_log_variance_clipped = map(&|i| {
            let v = if i == 0 && n > 1 { posterior_variance[1] } else { posterior_variance[i] };
            v.ln()
        });
        Schedule {
            sqrt_recip_alphas_cumprod: map(&|i| (1.0 / alphas_cumprod[i]).sqrt()),
            sqrt_recipm1_alphas_cumprod: map(&|i| (1.0 / alphas_cumprod[i] - 1.0).sqrt()),
            posterior_mean_coef1: map(&|i| betas[i] * alphas_cumprod_prev[i].sqrt() / (1.0 - alphas_cumprod[i])),
            posterior_mean_coef2: map(&|i| {
                (1.0 - alphas_cumprod_prev[i]) * (1.0 - betas[i]).sqrt() / (1.0 - alphas_cumprod[i])
            }),
            log_betas: map(&|i| betas[i].ln()),
            posterior_variance,
            posterior_log_variance_clipped,
            alphas_cumprod_prev,
            alphas_cumprod,
            betas,
            timesteps,
        }
    }

    /// Sampling steps S.
    pub fn steps(&self) -> usize {
        self.betas.len()
    }

    /// The float32 coefficients of step i, as the reference gathers them.
    pub fn coefficients(&self, i: usize) -> StepCoefficients {
        StepCoefficients {
            sqrt_recip_alphas_cumprod: self.sqrt_recip_alphas_cumprod[i] as f32,
            sqrt_recipm1_alphas_cumprod: self.sqrt_recipm1_alphas_cumprod[i] as f32,
            posterior_mean_coef1: self.posterior_mean_coef1[i] as f32,
            posterior_mean_coef2: self.posterior_mean_coef2[i] as f32,
            min_log: self.posterior_log_variance_clipped[i] as f32,
            max_log: self.log_betas[i] as f32,
            fixed_log_variance: if i == 0 && self.steps() > 1 {
                self.posterior_variance[1].ln() as f32
            } else {
                self.log_betas[i] as f32
            },
        }
    }
}

impl Schedule {
    /// The float32 coefficients of DDIM step i with η = `eta` (ADM's `ddim_sample`), computed in
    /// float64 and gathered as float32.
    pub fn ddim_coefficients(&self, i: usize, eta: f64) -> DdimCoefficients {
        let (abar, prev) = (self.alphas_cumprod[i], self.alphas_cumprod_prev[i]);
        let sigma = eta * ((1.0 - prev) / (1.0 - abar)).sqrt() * (1.0 - abar / prev).sqrt();
        DdimCoefficients {
            sqrt_recip_alphas_cumprod: self.sqrt_recip_alphas_cumprod[i] as f32,
            sqrt_recipm1_alphas_cumprod: self.sqrt_recipm1_alphas_cumprod[i] as f32,
            sqrt_one_minus_alpha_cumprod: (1.0 - abar).sqrt() as f32,
            sqrt_alpha_cumprod_prev: prev.sqrt() as f32,
            sigma: sigma as f32,
            direction: (1.0 - prev - sigma * sigma).max(0.0).sqrt() as f32,
        }
    }
}

/// Per-step float32 coefficients of a DDIM step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DdimCoefficients {
    /// √(1/ᾱ_i)
    pub sqrt_recip_alphas_cumprod: f32,
    /// √(1/ᾱ_i − 1)
    pub sqrt_recipm1_alphas_cumprod: f32,
    /// √(1 − ᾱ_i), the scale of the mode term in ε (Algorithm 1).
    pub sqrt_one_minus_alpha_cumprod: f32,
    /// √ᾱ_{i−1}
    pub sqrt_alpha_cumprod_prev: f32,
    /// σ_i = η·√((1−ᾱ_{i−1})/(1−ᾱ_i))·√(1 − ᾱ_i/ᾱ_{i−1})
    pub sigma: f32,
    /// √(1 − ᾱ_{i−1} − σ_i²), the weight of ε in the direction term.
    pub direction: f32,
}

/// Per-step float32 coefficients of a DDPM step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepCoefficients {
    /// √(1/ᾱ_i)
    pub sqrt_recip_alphas_cumprod: f32,
    /// √(1/ᾱ_i − 1)
    pub sqrt_recipm1_alphas_cumprod: f32,
    /// Weight of x̂₀ in the posterior mean.
    pub posterior_mean_coef1: f32,
    /// Weight of x_i in the posterior mean.
    pub posterior_mean_coef2: f32,
    /// Learned-range lower bound (clipped posterior log-variance).
    pub min_log: f32,
    /// Learned-range upper bound (log β).
    pub max_log: f32,
    /// FIXED_LARGE log-variance for models without learned sigma.
    pub fixed_log_variance: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MGD3-SPEC §4: i, t, beta, alpha_bar, min_log, max_log, sqrt(1/abar), sqrt(1/abar-1).
    const TABLE: &str = include_str!("schedule_table.txt");

    #[test]
    fn kept_timesteps_match_the_reference() {
        let kept = spaced_timesteps(1000, 50).unwrap();
        assert_eq!(&kept[..6], &[0, 20, 41, 61, 82, 102]);
        assert_eq!(&kept[44..], &[897, 917, 938, 958, 979, 999]);
        assert_eq!(spaced_timesteps(1000, 1000).unwrap().len(), 1000);
        assert_eq!(spaced_timesteps(1000, 1).unwrap(), vec![0]);
        assert!(spaced_timesteps(1000, 0).is_err());
        assert!(spaced_timesteps(10, 11).is_err());
    }

    #[test]
    fn ddim_timesteps_follow_adm_ddim_respacing() {
        let kept = ddim_timesteps(1000, 50).unwrap();
        assert_eq!(kept, (0..1000).step_by(20).collect::<Vec<_>>());
        assert_eq!(ddim_timesteps(1000, 25).unwrap().last(), Some(&960));
        assert_eq!(ddim_timesteps(1000, 1000).unwrap().len(), 1000);
        assert!(matches!(ddim_timesteps(1000, 999), Err(ScheduleError::NoDdimStride { .. })));
        let s = Schedule::new(BetaSchedule::Linear, 1000, 1e-4, 0.02, 50, Respacing::Ddim).unwrap();
        let training = cumulative_alphas(&linear_betas(1000, 1e-4, 0.02));
        for (i, t) in kept.iter().enumerate() {
            assert_eq!(s.timesteps[i], *t as i64);
            assert!((s.alphas_cumprod[i] - training[*t]).abs() < 1e-12, "ᾱ at t = {t}");
        }
        // η = 0 is deterministic; η = 1 at i = 0 has no noise (ᾱ_prev = 1).
        assert_eq!(s.ddim_coefficients(30, 0.0).sigma, 0.0);
        assert_eq!(s.ddim_coefficients(0, 1.0).sigma, 0.0);
        assert!(s.ddim_coefficients(30, 1.0).sigma > 0.0);
        assert_eq!("linear".parse::<BetaSchedule>(), Ok(BetaSchedule::Linear));
        assert!("cosine".parse::<BetaSchedule>().is_err());
    }

    #[test]
    fn python_rounding() {
        assert_eq!(round_half_even(0.5), 0.0);
        assert_eq!(round_half_even(1.5), 2.0);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(2.4999), 2.0);
        assert_eq!(round_half_even(20.387), 20.0);
    }

    #[test]
    fn fifty_step_schedule_matches_the_spec_table() {
        let s = Schedule::linear(1000, 1e-4, 0.02, 50).unwrap();
        let rows: Vec<Vec<f64>> = TABLE
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split_whitespace().map(|v| v.parse().unwrap()).collect())
            .collect();
        assert_eq!(rows.len(), 50);
        for row in rows {
            let i = row[0] as usize;
            let close = |name: &str, ours: f64, theirs: f64, rel: f64| {
                let tol = rel * theirs.abs().max(1e-12);
                assert!((ours - theirs).abs() <= tol, "row {i} {name}: ours {ours}, spec {theirs}");
            };
            assert_eq!(s.timesteps[i], row[1] as i64, "row {i} t");
            // The table prints 9 significant digits for beta/abar and 6 decimals for the rest.
            close("beta", s.betas[i], row[2], 1e-8);
            close("alpha_bar", s.alphas_cumprod[i], row[3], 1e-8);
            assert!((s.posterior_log_variance_clipped[i] - row[4]).abs() <= 1.5e-6, "row {i} min_log");
            assert!((s.log_betas[i] - row[5]).abs() <= 1.5e-6, "row {i} max_log");
            assert!((s.sqrt_recip_alphas_cumprod[i] - row[6]).abs() <= 1.5e-6, "row {i} sqrt_recip");
            assert!((s.sqrt_recipm1_alphas_cumprod[i] - row[7]).abs() <= 1.5e-6, "row {i} sqrt_recipm1");
        }
    }

    #[test]
    fn derived_arrays_are_consistent() {
        let s = Schedule::linear(1000, 1e-4, 0.02, 50).unwrap();
        assert!((s.betas[0] - 1e-4).abs() < 1e-15);
        assert_eq!(s.posterior_variance[0], 0.0);
        assert_eq!(s.posterior_log_variance_clipped[0], s.posterior_log_variance_clipped[1]);
        for i in 0..50 {
            // A noiseless x_t = sqrt(abar_t) x0 has posterior mean sqrt(abar_{t-1}) x0.
            let mean = s.posterior_mean_coef1[i] + s.posterior_mean_coef2[i] * s.alphas_cumprod[i].sqrt();
            assert!((mean - s.alphas_cumprod_prev[i].sqrt()).abs() < 1e-12, "step {i}");
            assert!(s.posterior_log_variance_clipped[i] <= s.log_betas[i] + 1e-12);
        }
        assert!(Schedule::named("cosine", 1000, 1e-4, 0.02, 50).is_err());
        assert!(Schedule::linear(1000, 0.0, 0.02, 50).is_err());
    }
}
