//! Numerically stable softmax.

use super::exp::exp_nonpositive_f32;
use super::parallel::for_each_row;
use crate::tensor::{OpError, OpResult, Tensor};

/// Softmax of one row in place: `exp(v - max) / sum`. The max and the (f64) sum use a fixed
/// number of interleaved accumulators so they vectorise while the order stays fixed.
pub(crate) fn softmax_row(row: &mut [f32]) {
    const LANES: usize = 8;
    let mut maxes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in maxes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for m in maxes {
        max = if m > max { m } else { max };
    }
    if max == f32::NEG_INFINITY {
        // All -inf (fully masked): PyTorch yields NaN; keep that.
        row.fill(f32::NAN);
        return;
    }
    for v in row.iter_mut() {
        *v = exp_nonpositive_f32(*v - max);
    }
    let mut sums = [0.0f64; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (s, &v) in sums.iter_mut().zip(c) {
            *s += v as f64;
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    let sum = sums.iter().sum::<f64>() + tail;
    let inv = (1.0 / sum) as f32;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Softmax over each `row_len`-sized row of `data`, in place (rows split over threads).
pub fn softmax_rows_inplace(data: &mut [f32], row_len: usize) -> OpResult<()> {
    if row_len == 0 || !data.len().is_multiple_of(row_len) {
        return Err(OpError::shape(
            "softmax_rows_inplace",
            format!("a buffer made of rows of {row_len}"),
            format!("{} elements", data.len()),
        ));
    }
    for_each_row(data, row_len, |_, row| softmax_row(row));
    Ok(())
}

/// `torch.softmax(x, dim=-1)`.
pub fn softmax_last_dim(x: &Tensor) -> OpResult<Tensor> {
    let d = x.shape().last().copied().unwrap_or(0);
    if d == 0 {
        return Err(OpError::shape(
            "softmax_last_dim",
            "input [..., d] with d > 0",
            format!("shape {:?}", x.shape()),
        ));
    }
    let mut out = x.clone();
    softmax_rows_inplace(out.data_mut(), d)?;
    Ok(out)
}
