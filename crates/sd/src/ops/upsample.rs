//! Nearest-neighbour upsampling (diffusers `Upsample2D`'s interpolate step).

use crate::tensor::{OpResult, Tensor};

/// `F.interpolate(x, scale_factor=2, mode="nearest")` for `x [n, c, h, w]` -> `[n, c, 2h, 2w]`.
pub fn upsample_nearest2x(x: &Tensor) -> OpResult<Tensor> {
    x.expect_rank("upsample_nearest2x", 4, "[n, c, h, w]")?;
    let (h, w) = (x.shape()[2], x.shape()[3]);
    let mut out = Vec::with_capacity(x.numel() * 4);
    for plane in x.data().chunks_exact((h * w).max(1)) {
        for row in plane.chunks_exact(w.max(1)) {
            let start = out.len();
            for &v in row {
                out.extend([v, v]);
            }
            out.extend_from_within(start..);
        }
    }
    let s = x.shape();
    Tensor::new([s[0], s[1], 2 * h, 2 * w], out)
}
