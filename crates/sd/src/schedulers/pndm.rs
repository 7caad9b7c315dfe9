//! `PNDMScheduler` (diffusers 0.42.1): pseudo-linear multistep (PLMS), with the Runge-Kutta
//! warm-up steps (PRK) when `skip_prk_steps` is false.

use super::config::{BetaConfig, RawConfig};
use super::ddim::alpha_at;
use super::{
    check_len, check_step, Prediction, Result, Scheduler, SchedulerError, SchedulerKind, Spacing,
};
use crate::rng::TorchGenerator;

/// PNDM. Stateful: steps must be taken in order after [`Scheduler::set_timesteps`].
#[derive(Clone, Debug)]
pub struct Pndm {
    num_train_timesteps: usize,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    spacing: Spacing,
    steps_offset: usize,
    skip_prk_steps: bool,
    num_inference_steps: usize,
    num_prk: usize,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    // Step state, reset by set_timesteps.
    counter: usize,
    ets: Vec<Vec<f32>>,
    cur_sample: Option<Vec<f32>>,
    cur_model_output: Option<Vec<f32>>,
}

impl Pndm {
    /// Builds the scheduler as `PNDMScheduler.from_config(config)` does.
    pub(crate) fn from_config(cfg: &RawConfig) -> Result<Self> {
        let betas = BetaConfig::read(cfg, false)?;
        let alphas_cumprod = betas.alphas_cumprod()?;
        let set_alpha_to_one = cfg.bool_or("set_alpha_to_one", false)?;
        Ok(Self {
            num_train_timesteps: betas.num_train_timesteps,
            final_alpha_cumprod: if set_alpha_to_one {
                1.0
            } else {
                alphas_cumprod[0]
            },
            alphas_cumprod,
            prediction: Prediction::read(cfg, &["epsilon", "v_prediction"])?,
            spacing: Spacing::read(cfg, "leading")?,
            steps_offset: cfg.usize_or("steps_offset", 0)?,
            skip_prk_steps: cfg.bool_or("skip_prk_steps", false)?,
            num_inference_steps: 0,
            num_prk: 0,
            timesteps: Vec::new(),
            timesteps_f32: Vec::new(),
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    fn prev_sample(
        &self,
        sample: &[f32],
        t: i64,
        prev_t: i64,
        model_output: &[f32],
    ) -> Result<Vec<f32>> {
        let a_t = alpha_at(&self.alphas_cumprod, t)?;
        let a_prev = if prev_t >= 0 {
            alpha_at(&self.alphas_cumprod, prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let diff = a_prev - a_t;
        let v_pred = self.prediction == Prediction::VPred;
        Ok(model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| {
                let m = if v_pred { sa * m + sb * x } else { m };
                sample_coeff * x - diff * m / denom
            })
            .collect())
    }

    fn step_prk(&mut self, model_output: &[f32], t: i64, sample: &[f32]) -> Result<Vec<f32>> {
        let half_ratio = (self.num_train_timesteps / self.num_inference_steps / 2) as i64;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half_ratio };
        let prev_t = t - diff_to_prev;
        let t = self.timesteps[self.counter / 4 * 4];
        let mo: Vec<f32> = match self.counter % 4 {
            0 => {
                let acc = self.cur_model_output.take();
                self.cur_model_output = Some(axpy_into(acc, (1.0 / 6.0) as f32, model_output));
                self.ets.push(model_output.to_vec());
                self.cur_sample = Some(sample.to_vec());
                model_output.to_vec()
            }
            1 | 2 => {
                let acc = self.cur_model_output.take();
                self.cur_model_output = Some(axpy_into(acc, (1.0 / 3.0) as f32, model_output));
                model_output.to_vec()
            }
            _ => {
                let acc = self.cur_model_output.take();
                axpy_into(acc, (1.0 / 6.0) as f32, model_output)
            }
        };
        let cur = self.cur_sample.clone().unwrap_or_else(|| sample.to_vec());
        let out = self.prev_sample(&cur, t, prev_t, &mo)?;
        self.counter += 1;
        Ok(out)
    }

    fn step_plms(&mut self, model_output: &[f32], t: i64, sample: &[f32]) -> Result<Vec<f32>> {
        if !self.skip_prk_steps && self.ets.len() < 3 {
            return Err(SchedulerError::Steps(
                "PNDM's PLMS steps need the 3 PRK warm-up results first".into(),
            ));
        }
        let ratio = (self.num_train_timesteps / self.num_inference_steps) as i64;
        let mut prev_t = t - ratio;
        let mut t = t;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.to_vec());
        } else {
            prev_t = t;
            t += ratio;
        }
        let n = self.ets.len();
        let mut sample: Vec<f32> = sample.to_vec();
        let mo: Vec<f32> = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.to_vec()
        } else if n == 1 && self.counter == 1 {
            let e1 = &self.ets[0];
            if let Some(cur) = self.cur_sample.take() {
                sample = cur;
            }
            model_output
                .iter()
                .zip(e1)
                .map(|(&m, &e)| (m + e) / 2.0)
                .collect()
        } else if n == 2 {
            let (e1, e2) = (&self.ets[1], &self.ets[0]);
            e1.iter()
                .zip(e2)
                .map(|(&a, &b)| (3.0 * a - b) / 2.0)
                .collect()
        } else if n == 3 {
            let (e1, e2, e3) = (&self.ets[2], &self.ets[1], &self.ets[0]);
            (0..e1.len())
                .map(|i| (23.0 * e1[i] - 16.0 * e2[i] + 5.0 * e3[i]) / 12.0)
                .collect()
        } else {
            let (e1, e2, e3, e4) = (&self.ets[3], &self.ets[2], &self.ets[1], &self.ets[0]);
            let c = (1.0f64 / 24.0) as f32;
            (0..e1.len())
                .map(|i| c * (55.0 * e1[i] - 59.0 * e2[i] + 37.0 * e3[i] - 9.0 * e4[i]))
                .collect()
        };
        let out = self.prev_sample(&sample, t, prev_t, &mo)?;
        self.counter += 1;
        Ok(out)
    }
}

/// `acc + c * x` where a missing `acc` is diffusers' integer 0 (so the result is just `c * x`).
fn axpy_into(acc: Option<Vec<f32>>, c: f32, x: &[f32]) -> Vec<f32> {
    match acc {
        Some(mut a) => {
            for (a, &x) in a.iter_mut().zip(x) {
                *a += c * x;
            }
            a
        }
        None => x.iter().map(|&x| c * x).collect(),
    }
}

impl Scheduler for Pndm {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Pndm
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let train = self.num_train_timesteps;
        if n == 0 || n > train {
            return Err(SchedulerError::Steps(format!(
                "PNDM needs 1 to {train} inference steps (num_train_timesteps), got {n}"
            )));
        }
        // `_timesteps`, ascending.
        let base = self.spacing.discrete_timesteps(train, n, self.steps_offset);
        let len = base.len();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.skip_prk_steps {
            // _timesteps[:-1], _timesteps[-2:-1], _timesteps[-1:], reversed.
            let mut p: Vec<i64> = base[..len - 1].to_vec();
            if len >= 2 {
                p.push(base[len - 2]);
            }
            p.push(base[len - 1]);
            p.reverse();
            (Vec::new(), p)
        } else {
            if len < 4 {
                return Err(SchedulerError::Steps(format!(
                    "PNDM with PRK warm-up (skip_prk_steps false) needs at least 4 inference \
                     steps, got {n}"
                )));
            }
            let half = (train / n / 2) as i64;
            // _timesteps[-4:].repeat(2) + tile([0, half], 4)
            let mut prk: Vec<i64> = base[len - 4..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            prk.pop(); // [:-1]
            let rep: Vec<i64> = prk.iter().flat_map(|&t| [t, t]).collect(); // .repeat(2)
            let mut prk: Vec<i64> = rep[1..rep.len() - 1].to_vec(); // [1:-1]
            prk.reverse();
            let mut plms: Vec<i64> = base[..len - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        self.num_inference_steps = n;
        self.num_prk = prk.len();
        self.timesteps = prk.into_iter().chain(plms).collect();
        self.timesteps_f32 = self.timesteps.iter().map(|&t| t as f32).collect();
        self.counter = 0;
        self.ets.clear();
        self.cur_sample = None;
        self.cur_model_output = None;
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
        check_step(step_index, self.timesteps.len())?;
        Ok(())
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        _generator: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        check_len(model_output, sample)?;
        if self.timesteps.is_empty() {
            return Err(SchedulerError::Steps(
                "PNDM: call set_timesteps before step".into(),
            ));
        }
        if step_index != self.counter || step_index >= self.timesteps.len() {
            return Err(SchedulerError::Steps(format!(
                "PNDM steps must be taken in order: expected step {} of {}, got {step_index}",
                self.counter,
                self.timesteps.len()
            )));
        }
        let t = self.timesteps[step_index];
        if self.counter < self.num_prk && !self.skip_prk_steps {
            self.step_prk(model_output, t, sample)
        } else {
            self.step_plms(model_output, t, sample)
        }
    }
}
