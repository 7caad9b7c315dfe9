//! Group and layer normalisation. Statistics are accumulated in f64 (two passes: mean, then the
//! mean of squared deviations) so the reference is at least as accurate as PyTorch's.

use super::activation::silu_inplace;
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

/// Accumulator lanes of the statistics sums: a fixed count, so the summation order (lane `j`
/// takes elements `j, j + LANES, ...`; lanes are then added in order) never depends on threads.
const LANES: usize = 8;

/// Sum of `f(x)` over `v` in f64, in the fixed lane order above.
#[inline(always)]
fn lane_sum(v: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for ch in chunks {
        for (a, &x) in acc.iter_mut().zip(ch) {
            *a += f(x as f64);
        }
    }
    for (a, &x) in acc.iter_mut().zip(tail) {
        *a += f(x as f64);
    }
    acc.iter().sum()
}

/// Mean and 1/sqrt(var + eps) (biased variance) of `v`.
fn stats(v: &[f32], eps: f32) -> (f32, f32) {
    let n = v.len().max(1) as f64;
    let mean = lane_sum(v, |x| x) / n;
    let var = lane_sum(v, |x| (x - mean) * (x - mean)) / n;
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
    let mut out = vec![0.0f32; x.numel()];
    let src = x.data();
    let ones = vec![1.0f32; c];
    let zeros = vec![0.0f32; c];
    let w = weight.map_or(&ones[..], |t| t.data());
    let b = bias.map_or(&zeros[..], |t| t.data());
    for_each_row(&mut out, group_len, |row_idx, dst| {
        let g = row_idx % groups;
        let row = &src[row_idx * group_len..(row_idx + 1) * group_len];
        let (mean, rstd) = stats(row, eps);
        let sp = spatial.max(1);
        for (ci, (d, s)) in dst.chunks_mut(sp).zip(row.chunks(sp)).enumerate() {
            let (wv, bv) = (w[g * cpg + ci], b[g * cpg + ci]);
            for (o, &v) in d.iter_mut().zip(s) {
                *o = (v - mean) * rstd * wv + bv;
            }
            if silu {
                silu_inplace(d);
            }
        }
    });
    let out = Tensor::new(x.shape(), out)?;
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
    let mut out = vec![0.0f32; x.numel()];
    let src = x.data();
    let ones = vec![1.0f32; d];
    let zeros = vec![0.0f32; d];
    let w = weight.map_or(&ones[..], |t| t.data());
    let b = bias.map_or(&zeros[..], |t| t.data());
    for_each_row(&mut out, d, |i, dst| {
        let row = &src[i * d..(i + 1) * d];
        let (mean, rstd) = stats(row, eps);
        for (((o, &v), &wv), &bv) in dst.iter_mut().zip(row).zip(w).zip(b) {
            *o = (v - mean) * rstd * wv + bv;
        }
    });
    Tensor::new(x.shape(), out)
}
