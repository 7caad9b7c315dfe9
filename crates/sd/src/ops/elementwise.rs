//! Element-wise arithmetic, broadcasts SD needs, channel concat and means.

use super::parallel::{for_each_row, map, zip_inplace, zip_map};
use crate::tensor::{OpError, OpResult, Tensor};

fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> OpResult<()> {
    if a.shape() == b.shape() {
        Ok(())
    } else {
        Err(OpError::shape(
            op,
            format!("operands of equal shape {:?}", a.shape()),
            format!("{:?}", b.shape()),
        ))
    }
}

/// `a + b` for equal shapes (residual connections).
pub fn add(a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
    same_shape("add", a, b)?;
    Tensor::new(a.shape(), zip_map(a.data(), b.data(), |x, y| x + y))
}

/// `a += b` for equal shapes.
pub fn add_assign(a: &mut Tensor, b: &Tensor) -> OpResult<()> {
    same_shape("add", a, b)?;
    zip_inplace(a.data_mut(), b.data(), |x, y| x + y);
    Ok(())
}

/// `a * b` for equal shapes.
pub fn mul(a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
    same_shape("mul", a, b)?;
    Tensor::new(a.shape(), zip_map(a.data(), b.data(), |x, y| x * y))
}

/// `x * s`.
pub fn scale(x: &Tensor, s: f32) -> Tensor {
    Tensor::new(x.shape(), map(x.data(), |v| v * s)).expect("same shape and length")
}

/// `x + b[:, :, None, None]`: adds `b [n, c]` (e.g. a ResNet block's time embedding) or `b [c]`
/// (a bias) to every spatial position of `x [n, c, ...]`.
pub fn add_channel_bias(x: &Tensor, b: &Tensor) -> OpResult<Tensor> {
    let err = || {
        OpError::shape(
            "add_channel_bias",
            format!("bias [n, c] or [c] for input {:?}", x.shape()),
            format!("bias {:?}", b.shape()),
        )
    };
    if x.rank() < 2 {
        return Err(err());
    }
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let per_sample = match b.shape() {
        [bn, bc] if *bn == n && *bc == c => true,
        [bc] if *bc == c => false,
        _ => return Err(err()),
    };
    let spatial: usize = x.shape()[2..].iter().product::<usize>().max(1);
    let src = x.data();
    let mut out = vec![0.0f32; x.numel()];
    // Rows are (sample, channel) planes; a small plane still splits (rows are independent).
    for_each_row(&mut out, spatial, |i, plane| {
        let bv = b.data()[if per_sample { i } else { i % c }];
        for (o, &v) in plane.iter_mut().zip(&src[i * spatial..]) {
            *o = v + bv;
        }
    });
    Tensor::new(x.shape(), out)
}

/// `torch.cat(tensors, dim=1)`: UNet skip connections on NCHW tensors.
pub fn cat_channels(tensors: &[&Tensor]) -> OpResult<Tensor> {
    Tensor::concat(tensors, 1)
}

/// `x.mean(dim)` (the dim is removed), accumulated in f64.
pub fn mean_dim(x: &Tensor, dim: usize) -> OpResult<Tensor> {
    let size = x.dim(dim)?;
    if size == 0 {
        return Err(OpError::shape(
            "mean_dim",
            format!("a non-empty dim {dim}"),
            format!("shape {:?}", x.shape()),
        ));
    }
    let outer: usize = x.shape()[..dim].iter().product();
    let inner: usize = x.shape()[dim + 1..].iter().product();
    let mut out = vec![0.0f32; outer * inner];
    let src = x.data();
    // Each output sums its `size` inputs in order (k = 0, 1, ...) in f64; an f64 row of
    // partial sums keeps the inner loop contiguous (and vectorisable) without reordering.
    let inner_rows = inner.max(1);
    for_each_row(&mut out, inner_rows, |o, dst| {
        let block = &src[o * size * inner..(o + 1) * size * inner];
        let mut acc = vec![0.0f64; dst.len()];
        for row in block.chunks_exact(inner_rows) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
        for (d, a) in dst.iter_mut().zip(&acc) {
            *d = (a / size as f64) as f32;
        }
    });
    let mut shape = x.shape().to_vec();
    shape.remove(dim);
    Tensor::new(shape, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::parallel::for_each_chunk;

    #[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
    fn add_into(dst: &mut [f32], a: &[f32], b: &[f32]) {
        for ((o, &x), &y) in dst.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
    }

    /// zip_map (baseline x86-64) vs a multiversioned add, all threads:
    /// `cargo test -p ferry-sd --release --lib -- --ignored --nocapture perf_add`.
    #[test]
    #[ignore = "timing, run by hand in release"]
    fn perf_add() {
        use crate::ops::geglu::tests::{time_runs, Run};
        let n = 2 * 320 * 64 * 64;
        let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
        let x = Tensor::new([n], a.clone()).unwrap();
        let bias = Tensor::new([2, 320], (0..640).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
        let x4 = Tensor::new([2, 320, 64, 64], a.clone()).unwrap();
        let runs: Vec<Run<'_, Vec<f32>>> = vec![
            ("old add".into(), Box::new(|| zip_map(&a, &b, |x, y| x + y))),
            (
                "multiversioned add".into(),
                Box::new(|| {
                    let mut out = vec![0.0f32; n];
                    for_each_chunk(&mut out, |s, d| {
                        add_into(d, &a[s..s + d.len()], &b[s..s + d.len()])
                    });
                    out
                }),
            ),
            ("scale".into(), Box::new(|| scale(&x, 0.5).into_data())),
            (
                "add_channel_bias".into(),
                Box::new(|| add_channel_bias(&x4, &bias).unwrap().into_data()),
            ),
        ];
        let (best, _) = time_runs(&runs, 9);
        for ((name, _), t) in runs.iter().zip(&best) {
            println!("{name} [{n}]: {t:.2} ms");
        }
    }
}
