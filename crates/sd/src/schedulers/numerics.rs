//! Ports of the numpy / torch primitives the diffusers schedulers use, with their rounding.

/// `torch.linspace(start, end, steps, dtype=float32)` on CPU.
///
/// torch's kernel computes in float32 with `step = (end - start) / (steps - 1)`, the first half
/// as `start + step * i` and the second as `end - step * (steps - 1 - i)`; x86-64 builds contract
/// each of those into one fused multiply-add, which this reproduces bit for bit.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` of a float32 tensor on CPU: the running product is kept in double.
pub(crate) fn cumprod_f64_acc(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in float64.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = num - 1;
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            for v in y.iter_mut() {
                *v = *v / div as f64 * delta;
            }
        } else {
            for v in y.iter_mut() {
                *v *= step;
            }
        }
    } else {
        for v in y.iter_mut() {
            *v *= delta;
        }
    }
    for v in y.iter_mut() {
        *v += start;
    }
    if num > 1 {
        y[div] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` with a float step, in float64: numpy takes
/// `ceil((stop - start) / step)` values and fills them as `start + i * ((start + step) - start)`.
pub(crate) fn np_arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)` for one point, in float64.
pub(crate) fn np_interp_index(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x > last as f64 {
        return fp[last];
    }
    if x < 0.0 || x.is_nan() {
        return fp[0];
    }
    let j = (x.floor() as usize).min(last);
    if j == last || j as f64 == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    slope * (x - j as f64) + fp[j]
}

/// The natural log of a float32, correctly rounded. numpy and torch use SIMD approximations
/// (within 1-4 ulp) whose results depend on the CPU; see the module docs for where this matters.
pub(crate) fn ln_f32(x: f32) -> f32 {
    (x as f64).ln() as f32
}

/// `exp` of a float32, correctly rounded (torch: Sleef `expf_u10`, within 1 ulp).
pub(crate) fn exp_f32(x: f32) -> f32 {
    (x as f64).exp() as f32
}

/// Karras et al. (2022) sigmas, `_convert_to_karras`, in float64 (rho = 7).
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Exponential sigmas, `_convert_to_exponential`, in float64.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// `_sigma_to_t(sigma, log_sigmas)`: the fractional training timestep of a sigma, interpolating
/// in log space. `log_sigmas` is float32 (numpy's `np.log` of a float32 array); `low - high` is a
/// float32 subtraction there, the rest is float64.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of the cumulative count of `log_sigma - log_sigmas[i] >= 0`: the last such i, or 0.
    let mut low_idx = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            low_idx = i;
        }
    }
    let low_idx = low_idx.min(log_sigmas.len().saturating_sub(2));
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// numpy's `round` (half to even).
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}
