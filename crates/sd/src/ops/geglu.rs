//! diffusers' GEGLU feed-forward input: project, split in two, gate one half with GELU.

use super::activation::gelu_gate_into;
use super::linear::linear;
use super::parallel::for_each_row;
use crate::tensor::{OpError, OpResult, Tensor};

/// `hidden * gelu(gate)` where `[hidden, gate] = h.chunk(2, dim=-1)`; `h [..., 2*f]` -> `[..., f]`.
pub fn geglu_gate(h: &Tensor) -> OpResult<Tensor> {
    let two_f = h.shape().last().copied().unwrap_or(0);
    if two_f == 0 || !two_f.is_multiple_of(2) {
        return Err(OpError::shape(
            "geglu",
            "projected input [..., 2*f] with f > 0",
            format!("shape {:?}", h.shape()),
        ));
    }
    let f = two_f / 2;
    let mut out = vec![0.0f32; h.numel() / 2];
    // erf per element is the cost here: split rows over threads.
    for_each_row(&mut out, f, |i, dst| {
        let (hidden, gate) = h.data()[i * two_f..(i + 1) * two_f].split_at(f);
        gelu_gate_into(dst, hidden, gate);
    });
    let mut shape = h.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = f;
    }
    Tensor::new(shape, out)
}

/// diffusers `GEGLU.forward`: `linear(x, weight [2f, in], bias)` then [`geglu_gate`].
pub fn geglu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> OpResult<Tensor> {
    geglu_gate(&linear(x, weight, bias)?)
}
