//! Nearest-neighbour upsampling (diffusers `Upsample2D`'s interpolate step).

use super::parallel::for_each_row;
use crate::tensor::{OpResult, Tensor};

/// `F.interpolate(x, scale_factor=2, mode="nearest")` for `x [n, c, h, w]` -> `[n, c, 2h, 2w]`.
pub fn upsample_nearest2x(x: &Tensor) -> OpResult<Tensor> {
    x.expect_rank("upsample_nearest2x", 4, "[n, c, h, w]")?;
    let (h, w) = (x.shape()[2], x.shape()[3]);
    let s = x.shape();
    let mut out = vec![0.0f32; x.numel() * 4];
    if h > 0 && w > 0 {
        let src = x.data();
        // One (sample, channel) plane per row of work: planes are independent.
        for_each_row(&mut out, 4 * h * w, |p, plane| {
            let input = &src[p * h * w..(p + 1) * h * w];
            for (pair, row) in plane.chunks_exact_mut(4 * w).zip(input.chunks_exact(w)) {
                let (top, bottom) = pair.split_at_mut(2 * w);
                for (d, &v) in top.chunks_exact_mut(2).zip(row) {
                    d[0] = v;
                    d[1] = v;
                }
                bottom.copy_from_slice(top);
            }
        });
    }
    Tensor::new([s[0], s[1], 2 * h, 2 * w], out)
}
