//! `DDIMScheduler` (diffusers 0.42.1) with `eta = 0`.

use super::config::{BetaConfig, RawConfig};
use super::{
    check_len, check_step, Prediction, Result, Scheduler, SchedulerError, SchedulerKind, Spacing,
};
use crate::rng::TorchGenerator;

/// DDIM, deterministic (`eta = 0`, the pipelines' default).
#[derive(Clone, Debug)]
pub struct Ddim {
    num_train_timesteps: usize,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    clip_sample: Option<f32>,
    spacing: Spacing,
    steps_offset: usize,
    num_inference_steps: usize,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
}

impl Ddim {
    /// Builds the scheduler as `DDIMScheduler.from_config(config)` does.
    pub(crate) fn from_config(cfg: &RawConfig) -> Result<Self> {
        let betas = BetaConfig::read(cfg, true)?;
        let alphas_cumprod = betas.alphas_cumprod()?;
        let set_alpha_to_one = cfg.bool_or("set_alpha_to_one", true)?;
        if cfg.bool_or("thresholding", false)? {
            return Err(SchedulerError::Unsupported(
                "DDIMScheduler with `thresholding: true` (dynamic thresholding is for pixel-space \
                 models, not Stable Diffusion)"
                    .into(),
            ));
        }
        let clip = cfg.bool_or("clip_sample", true)?;
        let range = cfg.f64_or("clip_sample_range", 1.0)? as f32;
        Ok(Self {
            num_train_timesteps: betas.num_train_timesteps,
            final_alpha_cumprod: if set_alpha_to_one {
                1.0
            } else {
                alphas_cumprod[0]
            },
            alphas_cumprod,
            prediction: Prediction::read(cfg, &["epsilon", "sample", "v_prediction"])?,
            clip_sample: clip.then_some(range),
            spacing: Spacing::read(cfg, "leading")?,
            steps_offset: cfg.usize_or("steps_offset", 0)?,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            timesteps_f32: Vec::new(),
        })
    }
}

impl Scheduler for Ddim {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let train = self.num_train_timesteps;
        if n == 0 || n > train {
            return Err(SchedulerError::Steps(format!(
                "DDIM needs 1 to {train} inference steps (num_train_timesteps), got {n}"
            )));
        }
        let mut ts = self.spacing.discrete_timesteps(train, n, self.steps_offset);
        ts.reverse();
        self.num_inference_steps = n;
        self.timesteps_f32 = ts.iter().map(|&t| t as f32).collect();
        self.timesteps = ts;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn sigmas(&self) -> &[f32] {
        &[]
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn scale_model_input(&self, _sample: &mut [f32], step_index: usize) -> Result<()> {
        self.check_index(step_index)
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        _generator: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        self.check_index(step_index)?;
        check_len(model_output, sample)?;
        let t = self.timesteps[step_index];
        // diffusers steps back by num_train // num_inference whatever the spacing.
        let prev_t = t - (self.num_train_timesteps / self.num_inference_steps) as i64;
        let a_t = alpha_at(&self.alphas_cumprod, t)?;
        let a_prev = if prev_t >= 0 {
            alpha_at(&self.alphas_cumprod, prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        // std_dev_t = eta * sqrt(variance) is 0, so the direction coefficient is sqrt(1 - a_prev).
        let dir = (1.0 - a_prev - 0.0f32).sqrt();
        let sa_prev = a_prev.sqrt();
        let clip = self.clip_sample;
        let out = model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| {
                let (mut x0, eps) = match self.prediction {
                    Prediction::Epsilon => ((x - sb * m) / sa, m),
                    Prediction::Sample => (m, (x - sa * m) / sb),
                    Prediction::VPred => (sa * x - sb * m, sa * m + sb * x),
                };
                if let Some(r) = clip {
                    x0 = x0.clamp(-r, r);
                }
                sa_prev * x0 + dir * eps
            })
            .collect();
        Ok(out)
    }
}

impl Ddim {
    fn check_index(&self, step_index: usize) -> Result<()> {
        check_step(step_index, self.timesteps.len())?;
        Ok(())
    }
}

/// `alphas_cumprod[t]` with a range check (diffusers would raise an IndexError).
pub(crate) fn alpha_at(alphas_cumprod: &[f32], t: i64) -> Result<f32> {
    usize::try_from(t)
        .ok()
        .and_then(|i| alphas_cumprod.get(i).copied())
        .ok_or_else(|| {
            SchedulerError::Steps(format!(
                "timestep {t} is outside the training range 0..{}",
                alphas_cumprod.len()
            ))
        })
}
