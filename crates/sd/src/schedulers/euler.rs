//! `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler` (diffusers 0.42.1).

use super::config::{BetaConfig, RawConfig};
use super::numerics::{
    exp_f32, exponential_sigmas, karras_sigmas, ln_f32, np_arange_f64, np_interp_index,
    np_linspace, np_round, sigma_to_t, torch_linspace_f32,
};
use super::{
    check_len, check_step, train_sigmas, Prediction, Result, Scheduler, SchedulerError,
    SchedulerKind, Spacing,
};
use crate::rng::TorchGenerator;

/// Which sigma spacing replaces the interpolated one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SigmaSpacing {
    Interpolated,
    Karras,
    Exponential,
}

/// Euler (`EulerDiscreteScheduler`), or Euler ancestral when `ancestral` is set.
#[derive(Clone, Debug)]
pub struct Euler {
    ancestral: bool,
    num_train_timesteps: usize,
    alphas_cumprod: Vec<f32>,
    prediction: Prediction,
    spacing: Spacing,
    steps_offset: usize,
    log_linear: bool,
    sigma_spacing: SigmaSpacing,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    continuous_v: bool,
    final_sigma_min: bool,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
}

impl Euler {
    /// Builds the scheduler as `EulerDiscreteScheduler.from_config(config)` (or
    /// `EulerAncestralDiscreteScheduler.from_config`) does.
    pub(crate) fn from_config(cfg: &RawConfig, ancestral: bool) -> Result<Self> {
        let betas = BetaConfig::read(cfg, true)?;
        let mut alphas_cumprod = betas.alphas_cumprod()?;
        if betas.rescale_betas_zero_snr {
            // diffusers avoids an infinite sigma at the last training step.
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let name = if ancestral {
            "EulerAncestralDiscreteScheduler"
        } else {
            "EulerDiscreteScheduler"
        };
        let prediction = if ancestral {
            Prediction::read(cfg, &["epsilon", "v_prediction"])?
        } else {
            Prediction::read(
                cfg,
                &["epsilon", "v_prediction", "sample", "original_sample"],
            )?
        };
        let spacing = Spacing::read(cfg, "linspace")?;
        let steps_offset = cfg.usize_or("steps_offset", 0)?;
        let (mut log_linear, mut sigma_spacing, mut continuous_v, mut final_sigma_min) =
            (false, SigmaSpacing::Interpolated, false, false);
        let (mut sigma_min, mut sigma_max) = (None, None);
        if !ancestral {
            log_linear =
                cfg.choice_or("interpolation_type", "linear", &["linear", "log_linear"])?
                    == "log_linear";
            let karras = cfg.bool_or("use_karras_sigmas", false)?;
            let exponential = cfg.bool_or("use_exponential_sigmas", false)?;
            let beta = cfg.bool_or("use_beta_sigmas", false)?;
            if [karras, exponential, beta].iter().filter(|b| **b).count() > 1 {
                return Err(SchedulerError::Unsupported(format!(
                    "{name}: only one of use_karras_sigmas, use_exponential_sigmas, \
                     use_beta_sigmas can be true"
                )));
            }
            if beta {
                return Err(SchedulerError::Unsupported(format!(
                    "{name} with use_beta_sigmas (needs scipy's beta quantiles)"
                )));
            }
            sigma_spacing = if karras {
                SigmaSpacing::Karras
            } else if exponential {
                SigmaSpacing::Exponential
            } else {
                SigmaSpacing::Interpolated
            };
            sigma_min = cfg.opt_f64("sigma_min")?;
            sigma_max = cfg.opt_f64("sigma_max")?;
            continuous_v =
                cfg.choice_or("timestep_type", "discrete", &["discrete", "continuous"])?
                    == "continuous"
                    && prediction == Prediction::VPred;
            final_sigma_min =
                cfg.choice_or("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        }
        // Before set_timesteps: the training sigmas, largest first, then 0.
        let mut sigmas: Vec<f32> = train_sigmas(&alphas_cumprod).into_iter().rev().collect();
        sigmas.push(0.0);
        Ok(Self {
            ancestral,
            num_train_timesteps: betas.num_train_timesteps,
            alphas_cumprod,
            prediction,
            spacing,
            steps_offset,
            log_linear,
            sigma_spacing,
            sigma_min,
            sigma_max,
            continuous_v,
            final_sigma_min,
            timesteps: Vec::new(),
            sigmas,
        })
    }

    fn check_index(&self, step_index: usize) -> Result<()> {
        check_step(
            step_index,
            self.timesteps
                .len()
                .min(self.sigmas.len().saturating_sub(1)),
        )?;
        Ok(())
    }
}

impl Scheduler for Euler {
    fn kind(&self) -> SchedulerKind {
        if self.ancestral {
            SchedulerKind::EulerAncestral
        } else {
            SchedulerKind::Euler
        }
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let train = self.num_train_timesteps;
        if n == 0 {
            return Err(SchedulerError::Steps(
                "Euler needs at least 1 inference step, got 0".into(),
            ));
        }
        // float32 timesteps, as diffusers makes them.
        let mut timesteps: Vec<f32> = match self.spacing {
            Spacing::Linspace => np_linspace(0.0, (train - 1) as f64, n)
                .iter()
                .rev()
                .map(|&t| t as f32)
                .collect(),
            Spacing::Leading => {
                let ratio = train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio) as f32 + self.steps_offset as f32)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = train as f64 / n as f64;
                np_arange_f64(train as f64, 0.0, -ratio)
                    .iter()
                    .map(|&t| np_round(t) as f32 - 1.0)
                    .collect()
            }
        };
        let train_sig = train_sigmas(&self.alphas_cumprod);
        let log_sigmas: Vec<f32> = train_sig.iter().map(|&s| ln_f32(s)).collect();
        let train_sig64: Vec<f64> = train_sig.iter().map(|&s| s as f64).collect();
        let mut sigmas: Vec<f64> = if self.ancestral || !self.log_linear {
            timesteps
                .iter()
                .map(|&t| np_interp_index(t as f64, &train_sig64))
                .collect()
        } else {
            // torch.linspace(log(sigma_max), log(sigma_min), n + 1).exp(), all float32.
            let (hi, lo) = (log_sigmas[train - 1], log_sigmas[0]);
            torch_linspace_f32(hi as f64, lo as f64, n + 1)
                .into_iter()
                .map(|l| exp_f32(l) as f64)
                .collect()
        };
        if !self.ancestral && self.sigma_spacing != SigmaSpacing::Interpolated {
            let (Some(&first), Some(&last)) = (sigmas.first(), sigmas.last()) else {
                return Err(SchedulerError::Steps("no sigmas to respace".into()));
            };
            let smin = self.sigma_min.unwrap_or(last);
            let smax = self.sigma_max.unwrap_or(first);
            sigmas = match self.sigma_spacing {
                SigmaSpacing::Karras => karras_sigmas(smin, smax, n),
                _ => exponential_sigmas(smin, smax, n),
            };
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
                .collect();
        }
        let last = if self.final_sigma_min {
            train_sig[0] as f64
        } else {
            0.0
        };
        let mut sig32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sig32.push(last as f32);
        if self.continuous_v {
            timesteps = sig32[..sig32.len() - 1]
                .iter()
                .map(|&s| 0.25 * ln_f32(s))
                .collect();
        }
        self.timesteps = timesteps;
        self.sigmas = sig32;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn init_noise_sigma(&self) -> f32 {
        // torch's max propagates NaN.
        let max = self.sigmas.iter().copied().fold(f32::NEG_INFINITY, |a, b| {
            if a.is_nan() || b.is_nan() {
                f32::NAN
            } else {
                a.max(b)
            }
        });
        match self.spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    fn scale_model_input(&self, sample: &mut [f32], step_index: usize) -> Result<()> {
        self.check_index(step_index)?;
        let sigma = self.sigmas[step_index];
        let denom = (sigma * sigma + 1.0).sqrt();
        for v in sample.iter_mut() {
            *v /= denom;
        }
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        generator: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        self.check_index(step_index)?;
        check_len(model_output, sample)?;
        let sigma = self.sigmas[step_index];
        let sigma_next = self.sigmas[step_index + 1];
        // v-prediction coefficients.
        let c_in = sigma * sigma + 1.0;
        let c_out = -sigma / c_in.sqrt();
        let pred = |m: f32, x: f32| match self.prediction {
            Prediction::Epsilon => x - sigma * m,
            Prediction::VPred => m * c_out + x / c_in,
            Prediction::Sample => m,
        };
        if !self.ancestral {
            // s_churn = 0: gamma = 0 and sigma_hat = sigma * 1.0 = sigma.
            let dt = sigma_next - sigma;
            return Ok(model_output
                .iter()
                .zip(sample)
                .map(|(&m, &x)| {
                    let d = (x - pred(m, x)) / sigma;
                    x + d * dt
                })
                .collect());
        }
        let (sf2, st2) = (sigma * sigma, sigma_next * sigma_next);
        let sigma_up = (st2 * (sf2 - st2) / sf2).sqrt();
        let sigma_down = (st2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let noise = generator.randn(model_output.len());
        Ok(model_output
            .iter()
            .zip(sample)
            .zip(noise)
            .map(|((&m, &x), z)| {
                let d = (x - pred(m, x)) / sigma;
                let prev = x + d * dt;
                prev + z * sigma_up
            })
            .collect())
    }
}
