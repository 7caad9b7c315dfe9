//! Reading a diffusers `scheduler_config.json` the way `XScheduler.from_config(config, **kwargs)`
//! does, and the training noise schedule (betas, `alphas_cumprod`) every scheduler starts from.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::numerics::{cumprod_f64_acc, torch_linspace_f32};
use super::{Result, SchedulerError};

/// A parsed config plus the overrides (`from_config` kwargs) a scheduler choice adds.
///
/// diffusers' `from_config` takes, for each `__init__` parameter of the target class, the kwarg if
/// given, else the config's value unless the key is listed in `_use_default_values`, else the
/// target class's own default. Every other key is ignored for construction but kept on the
/// config (`hidden_dict`), which matters where code reads `self.config.<key>` with `hasattr`.
#[derive(Clone, Debug)]
pub(crate) struct RawConfig {
    map: Map<String, Value>,
}

impl RawConfig {
    /// Parses `config_json`, dropping the keys listed in `_use_default_values`.
    pub(crate) fn parse(config_json: &str) -> Result<Self> {
        let value = crate::json::parse(config_json)?;
        let Value::Object(mut map) = value else {
            return Err(SchedulerError::Json(format!(
                "expected a JSON object, found {}",
                kind_of(&value)
            )));
        };
        if let Some(defaults) = map.remove("_use_default_values") {
            let Value::Array(keys) = defaults else {
                return Err(bad("_use_default_values", "a list of key names", &defaults));
            };
            let keys: HashSet<String> = keys
                .iter()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect();
            map.retain(|k, _| !keys.contains(k));
        }
        Ok(Self { map })
    }

    /// The config's `_class_name`, if it has one.
    pub(crate) fn class_name(&self) -> Result<Option<&str>> {
        match self.map.get("_class_name") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(bad("_class_name", "a string", other)),
        }
    }

    /// Sets `key` as a `from_config` kwarg would (it wins over the file's value).
    pub(crate) fn set(&mut self, key: &str, value: Value) {
        self.map.insert(key.to_owned(), value);
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    /// A float parameter (JSON integers accepted).
    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => crate::json::number(v).ok_or_else(|| bad(key, "a number", v)),
        }
    }

    /// An optional float parameter (`null` or absent is `None`).
    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => crate::json::number(v)
                .map(Some)
                .ok_or_else(|| bad(key, "a number or null", v)),
        }
    }

    /// An optional string parameter (`null` or absent is `None`).
    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(bad(key, "a string or null", v)),
        }
    }

    /// A non-negative integer parameter.
    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| bad(key, "a non-negative integer", v)),
        }
    }

    /// A boolean parameter; `null` counts as false, as Python's truthiness does.
    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(bad(key, "true or false", v)),
        }
    }

    /// A string parameter that must be one of `allowed`.
    pub(crate) fn choice_or(
        &self,
        key: &str,
        default: &'static str,
        allowed: &[&'static str],
    ) -> Result<&'static str> {
        let s = match self.get(key) {
            None => return Ok(default),
            Some(Value::String(s)) => s.as_str(),
            Some(v) => return Err(bad(key, &format!("one of {allowed:?}"), v)),
        };
        allowed
            .iter()
            .copied()
            .find(|a| *a == s)
            .ok_or_else(|| SchedulerError::Config {
                key: key.to_owned(),
                expected: format!("one of {allowed:?}"),
                found: format!("{s:?}"),
            })
    }

    /// `trained_betas`: an optional list of numbers.
    pub(crate) fn trained_betas(&self) -> Result<Option<Vec<f64>>> {
        match self.get("trained_betas") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    crate::json::number(v)
                        .ok_or_else(|| bad("trained_betas", "a list of numbers", v))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(bad("trained_betas", "a list of numbers or null", v)),
        }
    }
}

fn kind_of(v: &Value) -> String {
    if let Some(x) = crate::json::number(v).filter(|x| !x.is_finite()) {
        return format!("{x}");
    }
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("{n}"),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("a list of {} items", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

/// A config error for `key`: what was expected and what the file holds.
pub(crate) fn bad(key: &str, expected: &str, found: &Value) -> SchedulerError {
    SchedulerError::Config {
        key: key.to_owned(),
        expected: expected.to_owned(),
        found: kind_of(found),
    }
}

/// The beta schedule parameters shared by all five schedulers.
#[derive(Clone, Debug)]
pub(crate) struct BetaConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: &'static str,
    pub trained_betas: Option<Vec<f64>>,
    pub rescale_betas_zero_snr: bool,
}

impl BetaConfig {
    /// Reads the beta parameters with the class defaults diffusers uses (all five classes share
    /// them: 1000, 0.0001, 0.02, "linear"). `rescale_key` is false for classes without the
    /// `rescale_betas_zero_snr` parameter (PNDM).
    pub(crate) fn read(cfg: &RawConfig, has_rescale: bool) -> Result<Self> {
        let num_train_timesteps = cfg.usize_or("num_train_timesteps", 1000)?;
        if num_train_timesteps < 2 {
            return Err(SchedulerError::Config {
                key: "num_train_timesteps".into(),
                expected: "at least 2".into(),
                found: num_train_timesteps.to_string(),
            });
        }
        Ok(Self {
            num_train_timesteps,
            beta_start: cfg.f64_or("beta_start", 0.0001)?,
            beta_end: cfg.f64_or("beta_end", 0.02)?,
            beta_schedule: cfg.choice_or(
                "beta_schedule",
                "linear",
                &["linear", "scaled_linear", "squaredcos_cap_v2"],
            )?,
            trained_betas: cfg.trained_betas()?,
            rescale_betas_zero_snr: has_rescale && cfg.bool_or("rescale_betas_zero_snr", false)?,
        })
    }

    /// Betas as float32, as the scheduler constructors build them.
    pub(crate) fn betas(&self) -> Result<Vec<f32>> {
        let n = self.num_train_timesteps;
        let betas = if let Some(tb) = &self.trained_betas {
            if tb.len() != n {
                return Err(SchedulerError::Config {
                    key: "trained_betas".into(),
                    expected: format!("{n} values (num_train_timesteps)"),
                    found: format!("{} values", tb.len()),
                });
            }
            tb.iter().map(|&b| b as f32).collect()
        } else {
            match self.beta_schedule {
                "linear" => torch_linspace_f32(self.beta_start, self.beta_end, n),
                "scaled_linear" => {
                    // `beta_start**0.5` is Python's pow in double.
                    torch_linspace_f32(self.beta_start.powf(0.5), self.beta_end.powf(0.5), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect()
                }
                _ => betas_for_alpha_bar_cosine(n),
            }
        };
        Ok(if self.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        })
    }

    /// `alphas_cumprod` (float32, accumulated in double as torch's CPU `cumprod` does).
    pub(crate) fn alphas_cumprod(&self) -> Result<Vec<f32>> {
        let alphas: Vec<f32> = self.betas()?.iter().map(|b| 1.0 - b).collect();
        Ok(cumprod_f64_acc(&alphas))
    }
}

/// `betas_for_alpha_bar(n)` with the cosine transform, in Python doubles, stored as float32.
fn betas_for_alpha_bar_cosine(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powf(2.0)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `rescale_zero_terminal_snr` in float32 torch ops.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = cumprod_f64_acc(&alphas).iter().map(|a| a.sqrt()).collect();
    let (Some(&first), Some(&last)) = (sqrt_bar.first(), sqrt_bar.last()) else {
        return betas.to_vec();
    };
    let scale = first / (first - last);
    for v in sqrt_bar.iter_mut() {
        *v -= last;
        *v *= scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for w in bar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}
