//! Nearest-neighbour resize to any size (diffusers `Upsample2D` with `output_size`).

use super::parallel::for_each_row;
use crate::tensor::{OpError, OpResult, Tensor};

/// PyTorch's source-index scale of `mode="nearest"` for a dimension resized from `input` to
/// `output`: `input / output` in f32 (`compute_scales_value` when no scale factor is given).
pub fn nearest_scale(input: usize, output: usize) -> f32 {
    input as f32 / output as f32
}

/// The input index that output index `dst` reads: `min(floor(dst * scale), input - 1)`, the
/// product in f32 as PyTorch's `nearest_neighbor_compute_source_index` does (`input > 0`).
pub fn nearest_source_index(dst: usize, scale: f32, input: usize) -> usize {
    ((dst as f32 * scale).floor() as usize).min(input.saturating_sub(1))
}

/// `F.interpolate(x, size=(h, w), mode="nearest")` for `x [n, c, ih, iw]` -> `[n, c, h, w]`.
///
/// Output row `i` reads input row `floor(i * (ih / h))` with the scale and product in f32,
/// clamped to `ih - 1` (PyTorch's formula, including its rounding); columns likewise. Sizes must
/// be non-zero, as PyTorch requires.
pub fn resize_nearest(x: &Tensor, h: usize, w: usize) -> OpResult<Tensor> {
    x.expect_rank("resize_nearest", 4, "[n, c, h, w]")?;
    let s = x.shape();
    let (n, c, ih, iw) = (s[0], s[1], s[2], s[3]);
    if ih == 0 || iw == 0 || h == 0 || w == 0 {
        return Err(OpError::invalid(
            "resize_nearest",
            format!("input and output sizes must be non-zero, found {ih}x{iw} -> {h}x{w}"),
        ));
    }
    let src = |o: usize, i: usize| -> Vec<usize> {
        let scale = nearest_scale(i, o);
        (0..o).map(|d| nearest_source_index(d, scale, i)).collect()
    };
    let (rows, cols) = (src(h, ih), src(w, iw));
    let mut out = vec![0.0f32; n * c * h * w];
    let src = x.data();
    for_each_row(&mut out, h * w, |p, plane| {
        let input = &src[p * ih * iw..(p + 1) * ih * iw];
        for (dst, &r) in plane.chunks_exact_mut(w).zip(&rows) {
            let row = &input[r * iw..(r + 1) * iw];
            for (d, &c) in dst.iter_mut().zip(&cols) {
                *d = row[c];
            }
        }
    });
    Tensor::new([n, c, h, w], out)
}
