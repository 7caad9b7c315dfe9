//! `DPMSolverMultistepScheduler` (diffusers 0.42.1): DPM-Solver++ / DPM-Solver, orders 1-3,
//! midpoint or Heun second-order updates.

use super::config::{BetaConfig, RawConfig};
use super::numerics::{
    exp_f32, exponential_sigmas, karras_sigmas, ln_f32, np_arange_f64, np_interp_index,
    np_linspace, np_round, sigma_to_t,
};
use super::{
    check_len, check_step, train_sigmas, Prediction, Result, Scheduler, SchedulerError,
    SchedulerKind, Spacing,
};
use crate::rng::TorchGenerator;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SigmaSpacing {
    Interpolated,
    Karras,
    Exponential,
    LuLambdas,
}

/// DPM-Solver multistep. Stateful: steps must be taken in order after
/// [`Scheduler::set_timesteps`].
#[derive(Clone, Debug)]
pub struct DpmSolverMultistep {
    num_train_timesteps: usize,
    alphas_cumprod: Vec<f32>,
    cosine_betas: bool,
    prediction: Prediction,
    plus_plus: bool,
    heun: bool,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_min: bool,
    sigma_spacing: SigmaSpacing,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    lambda_min_clipped: f64,
    spacing: Spacing,
    steps_offset: usize,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    sigmas: Vec<f32>,
    // Step state.
    model_outputs: Vec<Option<Vec<f32>>>,
    lower_order_nums: usize,
    next_step: usize,
}

impl DpmSolverMultistep {
    /// Builds the scheduler as `DPMSolverMultistepScheduler.from_config(config)` does.
    pub(crate) fn from_config(cfg: &RawConfig) -> Result<Self> {
        const NAME: &str = "DPMSolverMultistepScheduler";
        let betas = BetaConfig::read(cfg, true)?;
        let mut alphas_cumprod = betas.alphas_cumprod()?;
        if betas.rescale_betas_zero_snr {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let unsupported =
            |what: &str| Err(SchedulerError::Unsupported(format!("{NAME} with {what}")));
        let solver_order = cfg.usize_or("solver_order", 2)?;
        if !(1..=3).contains(&solver_order) {
            return Err(SchedulerError::Config {
                key: "solver_order".into(),
                expected: "1, 2 or 3".into(),
                found: solver_order.to_string(),
            });
        }
        let algorithm = cfg.choice_or(
            "algorithm_type",
            "dpmsolver++",
            &[
                "dpmsolver++",
                "dpmsolver",
                "sde-dpmsolver++",
                "sde-dpmsolver",
                "deis",
            ],
        )?;
        let plus_plus = match algorithm {
            "dpmsolver++" | "deis" => true,
            "dpmsolver" => false,
            other => return unsupported(&format!("algorithm_type {other:?}")),
        };
        let solver_type = cfg.choice_or(
            "solver_type",
            "midpoint",
            &["midpoint", "heun", "logrho", "bh1", "bh2"],
        )?;
        let final_sigma_min =
            cfg.choice_or("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        if !plus_plus && !final_sigma_min {
            return Err(SchedulerError::Unsupported(format!(
                "{NAME}: final_sigmas_type \"zero\" is not supported for algorithm_type \
                 \"dpmsolver\"; use \"sigma_min\""
            )));
        }
        if cfg.bool_or("thresholding", false)? {
            return unsupported("thresholding: true");
        }
        if cfg.opt_str("variance_type")?.is_some() {
            return unsupported("a learned variance_type");
        }
        if cfg.bool_or("use_flow_sigmas", false)? || cfg.bool_or("use_dynamic_shifting", false)? {
            return unsupported("flow-matching sigmas");
        }
        let karras = cfg.bool_or("use_karras_sigmas", false)?;
        let exponential = cfg.bool_or("use_exponential_sigmas", false)?;
        let beta = cfg.bool_or("use_beta_sigmas", false)?;
        if [karras, exponential, beta].iter().filter(|b| **b).count() > 1 {
            return Err(SchedulerError::Unsupported(format!(
                "{NAME}: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas \
                 can be true"
            )));
        }
        if beta {
            return unsupported("use_beta_sigmas (needs scipy's beta quantiles)");
        }
        let sigma_spacing = if karras {
            SigmaSpacing::Karras
        } else if cfg.bool_or("use_lu_lambdas", false)? {
            SigmaSpacing::LuLambdas
        } else if exponential {
            SigmaSpacing::Exponential
        } else {
            SigmaSpacing::Interpolated
        };
        Ok(Self {
            num_train_timesteps: betas.num_train_timesteps,
            alphas_cumprod,
            cosine_betas: betas.trained_betas.is_none()
                && betas.beta_schedule == "squaredcos_cap_v2",
            prediction: Prediction::read(cfg, &["epsilon", "sample", "v_prediction"])?,
            plus_plus,
            heun: solver_type == "heun",
            solver_order,
            lower_order_final: cfg.bool_or("lower_order_final", true)?,
            euler_at_final: cfg.bool_or("euler_at_final", false)?,
            final_sigma_min,
            sigma_spacing,
            // Not parameters of this class, but `from_config` keeps them on the config, where
            // `_convert_to_karras` finds them.
            sigma_min: cfg.opt_f64("sigma_min")?,
            sigma_max: cfg.opt_f64("sigma_max")?,
            lambda_min_clipped: cfg
                .opt_f64("lambda_min_clipped")?
                .unwrap_or(f64::NEG_INFINITY),
            spacing: Spacing::read(cfg, "linspace")?,
            steps_offset: cfg.usize_or("steps_offset", 0)?,
            timesteps: Vec::new(),
            timesteps_f32: Vec::new(),
            sigmas: Vec::new(),
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    /// `(alpha_t, sigma_t, lambda_t)` of a sigma, in float32 as diffusers computes them.
    fn alpha_sigma_lambda(sigma: f32) -> (f32, f32, f32) {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        let s = sigma * alpha;
        (alpha, s, ln_f32(alpha) - ln_f32(s))
    }

    /// `convert_model_output`: the data (x0) prediction for DPM-Solver++, noise for DPM-Solver.
    fn convert(&self, model_output: &[f32], sample: &[f32], step: usize) -> Vec<f32> {
        let (alpha, sigma, _) = Self::alpha_sigma_lambda(self.sigmas[step]);
        let pred = self.prediction;
        let plus = self.plus_plus;
        model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| match (plus, pred) {
                (true, Prediction::Epsilon) => (x - sigma * m) / alpha,
                (true, Prediction::Sample) => m,
                (true, Prediction::VPred) => alpha * x - sigma * m,
                (false, Prediction::Epsilon) => m,
                (false, Prediction::Sample) => (x - alpha * m) / sigma,
                (false, Prediction::VPred) => alpha * m + sigma * x,
            })
            .collect()
    }
}

impl Scheduler for DpmSolverMultistep {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmSolverMultistep
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let train = self.num_train_timesteps;
        if n == 0 {
            return Err(SchedulerError::Steps(
                "DPM-Solver needs at least 1 inference step, got 0".into(),
            ));
        }
        let train_sig = train_sigmas(&self.alphas_cumprod);
        // clipped_idx = searchsorted(flip(lambda_t), lambda_min_clipped).
        let clipped_idx = if self.lambda_min_clipped == f64::NEG_INFINITY {
            0
        } else {
            self.alphas_cumprod
                .iter()
                .rev()
                .map(|&a| ln_f32(a.sqrt()) - ln_f32((1.0 - a).sqrt()))
                .filter(|&l| (l as f64) < self.lambda_min_clipped)
                .count()
        };
        let last_t = train - clipped_idx;
        let mut timesteps: Vec<i64> = match self.spacing {
            Spacing::Linspace => {
                let mut v = np_linspace(0.0, last_t as f64 - 1.0, n + 1);
                v.remove(0);
                v.iter().rev().map(|&t| np_round(t) as i64).collect()
            }
            Spacing::Leading => {
                let ratio = last_t / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + self.steps_offset) as i64)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = train as f64 / n as f64;
                np_arange_f64(last_t as f64, 0.0, -ratio)
                    .iter()
                    .map(|&t| np_round(t) as i64 - 1)
                    .collect()
            }
        };
        let log_sigmas: Vec<f32> = train_sig.iter().map(|&s| ln_f32(s)).collect();
        let (first, last) = (train_sig[train - 1] as f64, train_sig[0] as f64);
        let respaced: Option<Vec<f64>> = match self.sigma_spacing {
            SigmaSpacing::Interpolated => None,
            SigmaSpacing::Karras => Some(karras_sigmas(
                self.sigma_min.unwrap_or(last),
                self.sigma_max.unwrap_or(first),
                n,
            )),
            SigmaSpacing::Exponential => Some(exponential_sigmas(
                self.sigma_min.unwrap_or(last),
                self.sigma_max.unwrap_or(first),
                n,
            )),
            SigmaSpacing::LuLambdas => {
                let (lmin, lmax) = (log_sigmas[0] as f64, log_sigmas[train - 1] as f64);
                Some(
                    np_linspace(0.0, 1.0, n)
                        .into_iter()
                        .map(|r| (lmax + r * (lmin - lmax)).exp())
                        .collect(),
                )
            }
        };
        let sigmas: Vec<f64> = match respaced {
            Some(sig) => {
                let round = self.sigma_spacing != SigmaSpacing::Exponential && !self.cosine_betas;
                timesteps = sig
                    .iter()
                    .map(|&s| {
                        let t = sigma_to_t(s, &log_sigmas);
                        // `.round()` where diffusers rounds, then `.to(int64)` truncates.
                        (if round { np_round(t) } else { t }) as i64
                    })
                    .collect();
                sig
            }
            None => {
                let fp: Vec<f64> = train_sig.iter().map(|&s| s as f64).collect();
                timesteps
                    .iter()
                    .map(|&t| np_interp_index(t as f64, &fp))
                    .collect()
            }
        };
        let sigma_last = if self.final_sigma_min {
            train_sig[0]
        } else {
            0.0
        };
        let mut sig32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sig32.push(sigma_last);
        self.timesteps_f32 = timesteps.iter().map(|&t| t as f32).collect();
        self.timesteps = timesteps;
        self.sigmas = sig32;
        self.model_outputs = vec![None; self.solver_order];
        self.lower_order_nums = 0;
        self.next_step = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
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
        let len = self.timesteps.len();
        if step_index != self.next_step || step_index >= len || step_index + 1 >= self.sigmas.len()
        {
            return Err(SchedulerError::Steps(format!(
                "DPM-Solver steps must be taken in order: expected step {} of {len}, got \
                 {step_index}",
                self.next_step
            )));
        }
        let i = step_index;
        let lower_order_final = i == len - 1
            && (self.euler_at_final
                || (self.lower_order_final && len < 15)
                || !self.final_sigma_min);
        let lower_order_second = len >= 2 && i == len - 2 && self.lower_order_final && len < 15;
        let converted = self.convert(model_output, sample, i);
        self.model_outputs.rotate_left(1);
        if let Some(last) = self.model_outputs.last_mut() {
            *last = Some(converted);
        }
        let order = self.solver_order;
        let use_first = order == 1 || self.lower_order_nums < 1 || lower_order_final;
        let use_second = order == 2 || self.lower_order_nums < 2 || lower_order_second;
        let k = self.model_outputs.len();
        let m = |back: usize| -> Result<&Vec<f32>> {
            self.model_outputs[k - 1 - back]
                .as_ref()
                .ok_or_else(|| SchedulerError::Steps("DPM-Solver history is missing".into()))
        };
        let (alpha_t, sigma_t, lambda_t) = Self::alpha_sigma_lambda(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0, lambda_s0) = Self::alpha_sigma_lambda(self.sigmas[i]);
        let h = lambda_t - lambda_s0;
        let plus = self.plus_plus;
        // Coefficient of the sample, and of D0 (subtracted).
        let (c_x, c_d0) = if plus {
            (sigma_t / sigma_s0, alpha_t * (exp_f32(-h) - 1.0))
        } else {
            (alpha_t / alpha_s0, sigma_t * (exp_f32(h) - 1.0))
        };
        let out: Vec<f32> = if use_first {
            let m0 = m(0)?;
            sample
                .iter()
                .zip(m0)
                .map(|(&x, &d0)| c_x * x - c_d0 * d0)
                .collect()
        } else if use_second {
            let (m0, m1) = (m(0)?, m(1)?);
            let lambda_s1 = Self::alpha_sigma_lambda(self.sigmas[i - 1]).2;
            let h0 = lambda_s0 - lambda_s1;
            let r0 = h0 / h;
            let c_r = 1.0 / r0;
            // x_t = c_x x - c_d0 D0 +- c_d1 D1 (sign per solver).
            let (c_d1, add_d1) = match (plus, self.heun) {
                (true, false) => (0.5 * (alpha_t * (exp_f32(-h) - 1.0)), false),
                (true, true) => (alpha_t * ((exp_f32(-h) - 1.0) / h + 1.0), true),
                (false, false) => (0.5 * (sigma_t * (exp_f32(h) - 1.0)), false),
                (false, true) => (sigma_t * ((exp_f32(h) - 1.0) / h - 1.0), false),
            };
            sample
                .iter()
                .zip(m0.iter().zip(m1))
                .map(|(&x, (&a, &b))| {
                    let d1 = c_r * (a - b);
                    let y = c_x * x - c_d0 * a;
                    if add_d1 {
                        y + c_d1 * d1
                    } else {
                        y - c_d1 * d1
                    }
                })
                .collect()
        } else {
            let (m0, m1, m2) = (m(0)?, m(1)?, m(2)?);
            let lambda_s1 = Self::alpha_sigma_lambda(self.sigmas[i - 1]).2;
            let lambda_s2 = Self::alpha_sigma_lambda(self.sigmas[i - 2]).2;
            let (h0, h1) = (lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
            let (r0, r1) = (h0 / h, h1 / h);
            let (c_r0, c_r1) = (1.0 / r0, 1.0 / r1);
            let c_mix = r0 / (r0 + r1);
            let c_d2r = 1.0 / (r0 + r1);
            let (c_d1, add_d1, c_d2) = if plus {
                let e = exp_f32(-h) - 1.0;
                (
                    alpha_t * (e / h + 1.0),
                    true,
                    alpha_t * ((exp_f32(-h) - 1.0 + h) / (h * h) - 0.5),
                )
            } else {
                let e = exp_f32(h) - 1.0;
                (
                    sigma_t * (e / h - 1.0),
                    false,
                    sigma_t * ((exp_f32(h) - 1.0 - h) / (h * h) - 0.5),
                )
            };
            (0..sample.len())
                .map(|j| {
                    let d1_0 = c_r0 * (m0[j] - m1[j]);
                    let d1_1 = c_r1 * (m1[j] - m2[j]);
                    let d1 = d1_0 + c_mix * (d1_0 - d1_1);
                    let d2 = c_d2r * (d1_0 - d1_1);
                    let y = c_x * sample[j] - c_d0 * m0[j];
                    let y = if add_d1 { y + c_d1 * d1 } else { y - c_d1 * d1 };
                    y - c_d2 * d2
                })
                .collect()
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_step += 1;
        Ok(out)
    }
}
