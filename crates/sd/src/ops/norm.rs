//! Group and layer normalisation. Statistics are accumulated in f64 (two passes: mean, then the
//! mean of squared deviations) so the reference is at least as accurate as PyTorch's.

use super::activation::silu_f32;
use super::parallel::for_each_row;
use crate::tensor::{OpError, OpResult, Tensor};

fn check_affine(
    op: &'static str,
    n: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> OpResult<()> {
    for t in [weight, bias].into_iter().flatten() {
        t.expect_shape(op, &[n])?;
    }
    Ok(())
}

/// Mean and 1/sqrt(var + eps) (biased variance) of `v`.
fn stats(v: &[f32], eps: f32) -> (f32, f32) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&x| {
            let d = x as f64 - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

/// `nn.GroupNorm(groups, c, eps)` on `x [n, c, ...]` with optional per-channel affine
/// `weight [c]`, `bias [c]`; with `silu` the result goes through SiLU (diffusers' norm + act pair).
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
    silu: bool,
) -> OpResult<Tensor> {
    if x.rank() < 2 {
        return Err(OpError::shape(
            "group_norm",
            "input [n, c, ...]",
            format!("shape {:?}", x.shape()),
        ));
    }
    let c = x.shape()[1];
    if groups == 0 || !c.is_multiple_of(groups) {
        return Err(OpError::invalid(
            "group_norm",
            format!("{groups} groups must divide {c} channels"),
        ));
    }
    check_affine("group_norm affine", c, weight, bias)?;
    let spatial: usize = x.shape()[2..].iter().product();
    let cpg = c / groups;
    let group_len = cpg * spatial;
    let mut out = x.clone();
    for_each_row(out.data_mut(), group_len, |row_idx, row| {
        let g = row_idx % groups;
        let (mean, rstd) = stats(row, eps);
        for (ci, chan) in row.chunks_mut(spatial.max(1)).enumerate() {
            let ch = g * cpg + ci;
            let wv = weight.map_or(1.0, |t| t.data()[ch]);
            let bv = bias.map_or(0.0, |t| t.data()[ch]);
            for v in chan {
                let y = (*v - mean) * rstd * wv + bv;
                *v = if silu { silu_f32(y) } else { y };
            }
        }
    });
    Ok(out)
}

/// `nn.LayerNorm(d, eps)` over the last dim of `x [..., d]` with optional `weight [d]`, `bias [d]`.
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f32,
) -> OpResult<Tensor> {
    let d = match x.shape().last() {
        Some(&d) if d > 0 => d,
        _ => {
            return Err(OpError::shape(
                "layer_norm",
                "input [..., d] with d > 0",
                format!("shape {:?}", x.shape()),
            ))
        }
    };
    check_affine("layer_norm affine", d, weight, bias)?;
    let mut out = x.clone();
    for_each_row(out.data_mut(), d, |_, row| {
        let (mean, rstd) = stats(row, eps);
        for (i, v) in row.iter_mut().enumerate() {
            let wv = weight.map_or(1.0, |t| t.data()[i]);
            let bv = bias.map_or(0.0, |t| t.data()[i]);
            *v = (*v - mean) * rstd * wv + bv;
        }
    });
    Ok(out)
}
