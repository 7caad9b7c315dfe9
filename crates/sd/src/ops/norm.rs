//! Group and layer normalisation. Statistics are accumulated in f64 (two passes: mean, then the
//! mean of squared deviations) so the reference is at least as accurate as PyTorch's.

use super::activation::silu1;
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

/// `sum(v)` in f64 lanes (compiled for AVX2 too; the same bits on every target).
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn sum_lanes(v: &[f32]) -> f64 {
    lane_sum(v, |x| x)
}

/// `sum((v - mean)^2)` in f64 lanes.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn sq_dev_lanes(v: &[f32], mean: f64) -> f64 {
    lane_sum(v, |x| (x - mean) * (x - mean))
}

/// Mean and 1/sqrt(var + eps) (biased variance) of `v`.
fn stats(v: &[f32], eps: f32) -> (f32, f32) {
    let n = v.len().max(1) as f64;
    let mean = sum_lanes(v) / n;
    let var = sq_dev_lanes(v, mean) / n;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

/// `dst = (src - mean) * rstd * w + b` for one channel's scalar `w`, `b`.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn normalize_channel(dst: &mut [f32], src: &[f32], mean: f32, rstd: f32, w: f32, b: f32) {
    for (o, &v) in dst.iter_mut().zip(src) {
        *o = (v - mean) * rstd * w + b;
    }
}

/// [`normalize_channel`] then SiLU, in one pass.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn normalize_channel_silu(dst: &mut [f32], src: &[f32], mean: f32, rstd: f32, w: f32, b: f32) {
    for (o, &v) in dst.iter_mut().zip(src) {
        *o = silu1((v - mean) * rstd * w + b);
    }
}

/// `dst = (src - mean) * rstd * w + b` with per-element `w`, `b`.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn normalize_affine(dst: &mut [f32], src: &[f32], mean: f32, rstd: f32, w: &[f32], b: &[f32]) {
    for (((o, &v), &wv), &bv) in dst.iter_mut().zip(src).zip(w).zip(b) {
        *o = (v - mean) * rstd * wv + bv;
    }
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
            if silu {
                normalize_channel_silu(d, s, mean, rstd, wv, bv);
            } else {
                normalize_channel(d, s, mean, rstd, wv, bv);
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
        normalize_affine(dst, row, mean, rstd, w, b);
    });
    Tensor::new(x.shape(), out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(shape: &[usize], seed: u32) -> Tensor {
        crate::ops::lcg_tensor(shape, seed, 3.0, -1.0)
    }

    /// The statistics before the multiversioned kernels (baseline x86-64 loops).
    fn stats_old(v: &[f32], eps: f32) -> (f32, f32) {
        let n = v.len().max(1) as f64;
        let mean = lane_sum(v, |x| x) / n;
        let var = lane_sum(v, |x| (x - mean) * (x - mean)) / n;
        (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
    }

    /// group_norm before the multiversioned kernels.
    fn group_norm_old(x: &Tensor, groups: usize, w: &Tensor, b: &Tensor, silu: bool) -> Tensor {
        let (c, spatial) = (x.shape()[1], x.shape()[2..].iter().product::<usize>());
        let (cpg, src) = (c / groups, x.data());
        let group_len = cpg * spatial;
        let mut out = vec![0.0f32; x.numel()];
        for_each_row(&mut out, group_len, |row_idx, dst| {
            let g = row_idx % groups;
            let row = &src[row_idx * group_len..(row_idx + 1) * group_len];
            let (mean, rstd) = stats_old(row, 1e-5);
            for (ci, (d, s)) in dst.chunks_mut(spatial).zip(row.chunks(spatial)).enumerate() {
                let (wv, bv) = (w.data()[g * cpg + ci], b.data()[g * cpg + ci]);
                for (o, &v) in d.iter_mut().zip(s) {
                    *o = (v - mean) * rstd * wv + bv;
                }
                if silu {
                    d.iter_mut()
                        .for_each(|v| *v = *v / (1.0 + crate::ops::exp::exp_f32(-*v)));
                }
            }
        });
        Tensor::new(x.shape(), out).unwrap()
    }

    /// layer_norm before the multiversioned kernels.
    fn layer_norm_old(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        let d = *x.shape().last().unwrap();
        let src = x.data();
        let mut out = vec![0.0f32; x.numel()];
        for_each_row(&mut out, d, |i, dst| {
            let row = &src[i * d..(i + 1) * d];
            let (mean, rstd) = stats_old(row, 1e-5);
            for (((o, &v), &wv), &bv) in dst.iter_mut().zip(row).zip(w.data()).zip(b.data()) {
                *o = (v - mean) * rstd * wv + bv;
            }
        });
        Tensor::new(x.shape(), out).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.data().iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn multiversioned_norms_give_the_old_bits() {
        let x = filled(&[2, 64, 9, 7], 1);
        let (w, b) = (filled(&[64], 2), filled(&[64], 3));
        for silu in [false, true] {
            let got = group_norm(&x, 8, Some(&w), Some(&b), 1e-5, silu).unwrap();
            assert_eq!(
                bits(&got),
                bits(&group_norm_old(&x, 8, &w, &b, silu)),
                "silu {silu}"
            );
        }
        let y = filled(&[3, 50, 77], 4);
        let (w, b) = (filled(&[77], 5), filled(&[77], 6));
        let got = layer_norm(&y, Some(&w), Some(&b), 1e-5).unwrap();
        assert_eq!(bits(&got), bits(&layer_norm_old(&y, &w, &b)));
        // Statistics against a plain f64 reference.
        let row = &y.data()[..77];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / 77.0;
        let (m, _) = stats(row, 1e-5);
        assert!((m as f64 - mean).abs() < 1e-6, "{m} vs {mean}");
    }

    /// Old vs new norms at the UNet's shapes, all threads:
    /// `cargo test -p ferry-sd --release --lib -- --ignored --nocapture perf_norms`.
    #[test]
    #[ignore = "timing, run by hand in release"]
    fn perf_norms() {
        use crate::ops::geglu::tests::{time_runs, Run};
        for (c, hw) in [(320, 64), (640, 32), (1280, 16)] {
            let x = filled(&[2, c, hw, hw], 1);
            let (w, b) = (filled(&[c], 2), filled(&[c], 3));
            let runs: Vec<Run<'_, Tensor>> = vec![
                (
                    "old".into(),
                    Box::new(|| group_norm_old(&x, 32, &w, &b, true)),
                ),
                (
                    "new".into(),
                    Box::new(|| group_norm(&x, 32, Some(&w), Some(&b), 1e-5, true).unwrap()),
                ),
            ];
            let (best, _) = time_runs(&runs, 9);
            println!(
                "group_norm+silu [2, {c}, {hw}, {hw}]: old {:.2} ms, new {:.2} ms",
                best[0], best[1]
            );
        }
        for (t, c) in [(4096, 320), (1024, 640), (256, 1280)] {
            let x = filled(&[2, t, c], 1);
            let (w, b) = (filled(&[c], 2), filled(&[c], 3));
            let runs: Vec<Run<'_, Tensor>> = vec![
                ("old".into(), Box::new(|| layer_norm_old(&x, &w, &b))),
                (
                    "new".into(),
                    Box::new(|| layer_norm(&x, Some(&w), Some(&b), 1e-5).unwrap()),
                ),
            ];
            let (best, _) = time_runs(&runs, 9);
            println!(
                "layer_norm [2, {t}, {c}]: old {:.2} ms, new {:.2} ms",
                best[0], best[1]
            );
        }
    }
}
