//! Sinusoidal timestep embedding, diffusers `get_timestep_embedding`.

use crate::tensor::{OpError, OpResult, Tensor};

/// diffusers `get_timestep_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift,
/// scale=1, max_period=10000)`; returns `[timesteps.len(), dim]`. SD's UNet uses
/// `flip_sin_to_cos = true, downscale_freq_shift = 0`.
///
/// The frequencies and arguments are formed with the same f32 operations as PyTorch (only
/// `exp`/`sin`/`cos` are evaluated in f64 and rounded), since at t ≈ 1000 an ulp in the argument
/// moves the result by ~6e-5.
pub fn timestep_embedding(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f32,
) -> OpResult<Tensor> {
    let half = dim / 2;
    let denom = half as f32 - downscale_freq_shift;
    if half == 0 || denom == 0.0 {
        return Err(OpError::invalid(
            "timestep_embedding",
            format!(
                "dim {dim} with downscale_freq_shift {downscale_freq_shift} gives no frequencies"
            ),
        ));
    }
    const MAX_PERIOD: f64 = 10000.0;
    let neg_log = -(MAX_PERIOD.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (((neg_log * i as f32) / denom) as f64).exp() as f32)
        .collect();
    let mut out = vec![0.0f32; timesteps.len() * dim];
    for (row, &t) in out.chunks_exact_mut(dim).zip(timesteps) {
        let (sin_off, cos_off) = if flip_sin_to_cos {
            (half, 0)
        } else {
            (0, half)
        };
        for (i, &f) in freqs.iter().enumerate() {
            let arg = (t * f) as f64;
            row[sin_off + i] = arg.sin() as f32;
            row[cos_off + i] = arg.cos() as f32;
        }
        // Odd dim: the last column stays zero (diffusers pads).
    }
    Tensor::new([timesteps.len(), dim], out)
}
