//! Diffusion schedulers with diffusers 0.42.1 semantics, configured from a diffusers
//! `scheduler_config.json`.
//!
//! [`build`] makes a scheduler the way `XScheduler.from_config(pipe.scheduler.config)` does: each
//! parameter of the chosen class comes from the config if present there (and not listed in
//! `_use_default_values`), else from that class's own default; other keys are ignored. So a
//! DDIM config switched to Euler keeps its betas and `timestep_spacing` but Euler's defaults for
//! what DDIM's config lacks (e.g. `interpolation_type`), and a config without `timestep_spacing`
//! gets `linspace` for Euler/DPM but `leading` for DDIM/PNDM.
//!
//! | name | class | notes |
//! | --- | --- | --- |
//! | `ddim` | `DDIMScheduler` | `eta = 0` |
//! | `pndm` | `PNDMScheduler` | PLMS; PRK warm-up when `skip_prk_steps` is false |
//! | `euler` | `EulerDiscreteScheduler` | `s_churn = 0`; Karras / exponential sigmas |
//! | `euler-a` | `EulerAncestralDiscreteScheduler` | noise from the caller's [`TorchGenerator`] |
//! | `dpmpp-2m` | `DPMSolverMultistepScheduler` | forced to `dpmsolver++`, order 2, midpoint; Karras |
//!
//! Precision, as diffusers on CPU computes it (reproduced operation by operation):
//! - betas: float32 `torch.linspace` (x86-64 torch contracts its `start + step * i` into an FMA),
//!   squared in float32 for `scaled_linear`; `squaredcos_cap_v2` in double, stored as float32;
//! - `alphas_cumprod`: torch's CPU `cumprod` accumulates in double and stores float32;
//! - training sigmas `((1 - a) / a) ** 0.5` in float32; inference sigmas interpolated (or Karras)
//!   in numpy float64, then stored as float32; timesteps float32 (Euler) or int64;
//! - step math: float32, one rounding per torch op in diffusers' order (0-dim coefficients first).
//!
//! Known, tiny differences: torch computes `log`/`exp` of float32 with SIMD approximations
//! (Sleef, within 1 ulp) and numpy's float32 `log` differs from the correctly rounded value in
//! ~10% of inputs; we use correctly rounded results. This touches DPM-Solver's `lambda`
//! (relative error ~1e-7 in its step coefficients), and Karras / continuous timesteps.
//! Euler's `s_churn` and DDIM's `eta > 0` are not offered (the pipelines' defaults are 0).

mod config;
mod ddim;
mod dpm;
mod euler;
mod numerics;
mod pndm;

pub use ddim::Ddim;
pub use dpm::DpmSolverMultistep;
pub use euler::Euler;
pub use pndm::Pndm;

use crate::rng::TorchGenerator;
use config::RawConfig;
use serde_json::Value;

/// Errors from configuring or stepping a scheduler.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedulerError {
    /// The config is not a JSON object.
    #[error("scheduler config is not valid: {0}")]
    Json(String),
    /// The config does not parse as JSON.
    #[error("scheduler config is not valid JSON: {0}")]
    Parse(#[from] crate::json::JsonError),
    /// A config key has a value of the wrong type or out of range.
    #[error("scheduler config key `{key}`: expected {expected}, found {found}")]
    Config {
        /// The key.
        key: String,
        /// What was expected.
        expected: String,
        /// What the config holds.
        found: String,
    },
    /// An unknown `--scheduler` name.
    #[error("unknown scheduler {0:?}: expected one of ddim, pndm, euler, euler-a, dpmpp-2m")]
    UnknownName(String),
    /// A valid diffusers option this port does not implement, or one the algorithm lacks.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// Misuse at run time: bad step count or index, out-of-order steps, mismatched lengths.
    #[error("{0}")]
    Steps(String),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, SchedulerError>;

/// The scheduler algorithms offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `DDIMScheduler`.
    Ddim,
    /// `PNDMScheduler`.
    Pndm,
    /// `EulerDiscreteScheduler`.
    Euler,
    /// `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// `DPMSolverMultistepScheduler`.
    DpmSolverMultistep,
}

impl SchedulerKind {
    /// All kinds, in CLI order.
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmSolverMultistep,
    ];

    /// The `--scheduler` name.
    pub fn cli_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmSolverMultistep => "dpmpp-2m",
        }
    }

    /// The diffusers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
        }
    }

    /// The sampler name AUTOMATIC1111 writes in a PNG's `parameters` text.
    pub fn a1111_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Pndm => "PLMS",
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerAncestral => "Euler a",
            SchedulerKind::DpmSolverMultistep => "DPM++ 2M",
        }
    }

    /// Whether diffusers' class has `use_karras_sigmas`.
    pub fn supports_karras(self) -> bool {
        matches!(
            self,
            SchedulerKind::Euler | SchedulerKind::DpmSolverMultistep
        )
    }

    /// Parses a `--scheduler` name (case-insensitive; `_` and `-` alike; diffusers class names
    /// also accepted).
    pub fn from_name(name: &str) -> Result<Self> {
        let norm = name.trim().to_ascii_lowercase().replace('_', "-");
        let kind = match norm.as_str() {
            "ddim" | "ddimscheduler" => SchedulerKind::Ddim,
            "pndm" | "plms" | "pndmscheduler" => SchedulerKind::Pndm,
            "euler" | "eulerdiscretescheduler" => SchedulerKind::Euler,
            "euler-a" | "euler-ancestral" | "eulera" | "eulerancestraldiscretescheduler" => {
                SchedulerKind::EulerAncestral
            }
            "dpmpp-2m" | "dpm++2m" | "dpm++-2m" | "dpmsolvermultistepscheduler" => {
                SchedulerKind::DpmSolverMultistep
            }
            _ => return Err(SchedulerError::UnknownName(name.to_owned())),
        };
        Ok(kind)
    }

    /// The kind of a diffusers `_class_name`, if it is one of ours.
    pub fn from_class_name(class: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == class)
    }
}

/// A diffusion scheduler operating on flat float32 latents.
///
/// Use as diffusers' pipelines do: [`set_timesteps`](Scheduler::set_timesteps); multiply the
/// initial noise by [`init_noise_sigma`](Scheduler::init_noise_sigma); then for each
/// `i in 0..timesteps().len()`: scale a copy of the latents with
/// [`scale_model_input`](Scheduler::scale_model_input), run the model at `timesteps()[i]`, and
/// replace the latents with [`step`](Scheduler::step)`(output, i, latents)`.
pub trait Scheduler: Send + std::fmt::Debug {
    /// Which algorithm this is.
    fn kind(&self) -> SchedulerKind;
    /// Sets the number of inference steps and resets any multistep state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// The timesteps to run the model at, in order (all are exact in f32; PNDM's has a repeat).
    fn timesteps(&self) -> &[f32];
    /// The sigmas (one more than the timesteps), for Euler and DPM-Solver; empty for DDIM/PNDM.
    fn sigmas(&self) -> &[f32];
    /// The training `alphas_cumprod` (float32).
    fn alphas_cumprod(&self) -> &[f32];
    /// The factor initial noise is multiplied by.
    fn init_noise_sigma(&self) -> f32;
    /// Scales the model input in place for step `step_index` (a no-op except for Euler types).
    fn scale_model_input(&self, sample: &mut [f32], step_index: usize) -> Result<()>;
    /// One denoising step: the latents for step `step_index + 1`. Stateful schedulers (PNDM,
    /// DPM-Solver) require steps in order. Euler ancestral draws its noise from `generator`
    /// exactly as diffusers' `randn_tensor` does with a CPU generator; others ignore it.
    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        generator: &mut TorchGenerator,
    ) -> Result<Vec<f32>>;
}

/// Builds a scheduler from a diffusers `scheduler_config.json` text.
///
/// `name` picks the algorithm (a `--scheduler` name, see [`SchedulerKind::from_name`]); `None`
/// uses the config's own `_class_name`. `karras` sets `use_karras_sigmas = true` as a
/// `from_config` kwarg (it never turns off a config's own Karras setting); it is an error for
/// schedulers without Karras sigmas. `dpmpp-2m` is `from_config` with
/// `algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint"`; a config whose own
/// class is DPM-Solver, used with `name = None`, keeps its own settings.
pub fn build(name: Option<&str>, karras: bool, config_json: &str) -> Result<Box<dyn Scheduler>> {
    let mut cfg = RawConfig::parse(config_json)?;
    let kind = match name {
        Some(n) => SchedulerKind::from_name(n)?,
        None => {
            let class = cfg.class_name()?.ok_or_else(|| {
                SchedulerError::Unsupported(
                    "the scheduler config has no `_class_name`; choose a scheduler by name".into(),
                )
            })?;
            SchedulerKind::from_class_name(class).ok_or_else(|| {
                SchedulerError::Unsupported(format!(
                    "the model's scheduler class {class:?}; choose one of ddim, pndm, euler, \
                     euler-a, dpmpp-2m"
                ))
            })?
        }
    };
    if karras {
        if !kind.supports_karras() {
            return Err(SchedulerError::Unsupported(format!(
                "Karras sigmas with {} ({}); they exist for euler and dpmpp-2m",
                kind.cli_name(),
                kind.class_name()
            )));
        }
        cfg.set("use_karras_sigmas", Value::Bool(true));
    }
    if name.is_some() && kind == SchedulerKind::DpmSolverMultistep {
        cfg.set("algorithm_type", Value::from("dpmsolver++"));
        cfg.set("solver_order", Value::from(2));
        cfg.set("solver_type", Value::from("midpoint"));
    }
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(Ddim::from_config(&cfg)?),
        SchedulerKind::Pndm => Box::new(Pndm::from_config(&cfg)?),
        SchedulerKind::Euler => Box::new(Euler::from_config(&cfg, false)?),
        SchedulerKind::EulerAncestral => Box::new(Euler::from_config(&cfg, true)?),
        SchedulerKind::DpmSolverMultistep => Box::new(DpmSolverMultistep::from_config(&cfg)?),
    })
}

/// What the model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prediction {
    Epsilon,
    VPred,
    /// `sample` (and Euler's alias `original_sample`): the denoised sample itself.
    Sample,
}

impl Prediction {
    fn read(cfg: &RawConfig, allowed: &[&'static str]) -> Result<Self> {
        let all = ["epsilon", "v_prediction", "sample", "original_sample"];
        let p = cfg.choice_or("prediction_type", "epsilon", &all)?;
        if !allowed.contains(&p) {
            return Err(SchedulerError::Unsupported(format!(
                "prediction_type {p:?} for this scheduler (expected one of {allowed:?})"
            )));
        }
        Ok(match p {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPred,
            _ => Prediction::Sample,
        })
    }
}

/// `timestep_spacing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl Spacing {
    /// The integer training timesteps of `n` inference steps out of `train`, ascending, as
    /// DDIM and PNDM compute them (`steps_offset` applies to "leading" only, as in diffusers).
    pub(crate) fn discrete_timesteps(
        self,
        train: usize,
        n: usize,
        steps_offset: usize,
    ) -> Vec<i64> {
        match self {
            Spacing::Linspace => numerics::np_linspace(0.0, (train - 1) as f64, n)
                .iter()
                .map(|&t| numerics::np_round(t) as i64)
                .collect(),
            Spacing::Leading => {
                let ratio = train / n;
                (0..n).map(|i| (i * ratio + steps_offset) as i64).collect()
            }
            Spacing::Trailing => {
                let ratio = train as f64 / n as f64;
                numerics::np_arange_f64(train as f64, 0.0, -ratio)
                    .iter()
                    .rev()
                    .map(|&t| numerics::np_round(t) as i64 - 1)
                    .collect()
            }
        }
    }
}

impl Spacing {
    fn read(cfg: &RawConfig, default: &'static str) -> Result<Self> {
        Ok(
            match cfg.choice_or(
                "timestep_spacing",
                default,
                &["linspace", "leading", "trailing"],
            )? {
                "linspace" => Spacing::Linspace,
                "leading" => Spacing::Leading,
                _ => Spacing::Trailing,
            },
        )
    }
}

/// Training sigmas `((1 - a) / a) ** 0.5` in float32, indexed by timestep.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// Model output and sample must have the same length.
/// `step_index` must name one of the `count` timesteps set.
pub(crate) fn check_step(step_index: usize, count: usize) -> Result<()> {
    if step_index >= count {
        return Err(SchedulerError::Steps(format!(
            "step index {step_index} out of range: {count} timesteps set"
        )));
    }
    Ok(())
}

pub(crate) fn check_len(model_output: &[f32], sample: &[f32]) -> Result<()> {
    if model_output.len() != sample.len() {
        return Err(SchedulerError::Steps(format!(
            "model output has {} values but the sample has {}",
            model_output.len(),
            sample.len()
        )));
    }
    Ok(())
}
