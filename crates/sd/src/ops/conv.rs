//! 2-d convolution (PyTorch `F.conv2d`, groups = 1, dilation = 1) as im2col + GEMM.

use super::gemm::{gemm, MatMut, MatRef};
use crate::tensor::{OpError, OpResult, Tensor};

/// Upper bound on the im2col buffer, in f32 elements (16 MiB): images are processed in bands of
/// output rows so memory stays bounded (a 512x512 VAE layer would otherwise need GBs). 16 MiB
/// measured fastest of 4/16/64 MiB for SD 1.5's 3x3 convs (the band stays cache-resident).
const MAX_COLS_ELEMS: usize = 4 << 20;

/// Stride and zero padding of a [`conv2d`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    /// Step between output positions, `(vertical, horizontal)`.
    pub stride: (usize, usize),
    /// Zero padding `[top, bottom, left, right]` (asymmetric padding as in diffusers' VAE encoder
    /// downsampler, which pads right/bottom by one).
    pub padding: [usize; 4],
}

impl Conv2dParams {
    /// Same stride and padding on every side, like `nn.Conv2d(stride=s, padding=p)`.
    pub fn new(stride: usize, padding: usize) -> Self {
        Conv2dParams {
            stride: (stride, stride),
            padding: [padding; 4],
        }
    }
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Conv2dParams::new(1, 0)
    }
}

/// Convolves `x [n, c, h, w]` with `weight [o, c, kh, kw]` plus optional `bias [o]`; returns
/// `[n, o, ho, wo]` with `ho = (h + top + bottom - kh) / stride_h + 1` (likewise `wo`).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    params: Conv2dParams,
) -> OpResult<Tensor> {
    conv2d_banded(x, weight, bias, params, MAX_COLS_ELEMS)
}

/// [`conv2d`] with the im2col buffer capped at `max_cols` elements (at least one output row).
fn conv2d_banded(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    params: Conv2dParams,
    max_cols: usize,
) -> OpResult<Tensor> {
    x.expect_rank("conv2d", 4, "input [n, c, h, w]")?;
    weight.expect_rank("conv2d", 4, "weight [out, in, kh, kw]")?;
    let (xs, ws) = (x.shape(), weight.shape());
    let (n, c, h, w) = (xs[0], xs[1], xs[2], xs[3]);
    let (o, wc, kh, kw) = (ws[0], ws[1], ws[2], ws[3]);
    if wc != c {
        return Err(OpError::shape(
            "conv2d",
            format!("weight [out, {c}, kh, kw] for input {:?}", x.shape()),
            format!("weight {:?}", weight.shape()),
        ));
    }
    if let Some(b) = bias {
        b.expect_shape("conv2d bias", &[o])?;
    }
    let (sh, sw) = params.stride;
    if sh == 0 || sw == 0 || kh == 0 || kw == 0 {
        return Err(OpError::invalid(
            "conv2d",
            format!(
                "stride {:?} and kernel {kh}x{kw} must be non-zero",
                params.stride
            ),
        ));
    }
    let [pt, pb, pl, pr] = params.padding;
    let (hp, wp) = (h + pt + pb, w + pl + pr);
    if hp < kh || wp < kw {
        return Err(OpError::shape(
            "conv2d",
            format!("padded input at least {kh}x{kw} (the kernel)"),
            format!("padded input {hp}x{wp}"),
        ));
    }
    let (ho, wo) = ((hp - kh) / sh + 1, (wp - kw) / sw + 1);
    let p = ho * wo;
    let ckk = c * kh * kw;

    let mut out = vec![0.0f32; n * o * p];
    if let Some(b) = bias {
        for (i, plane) in out.chunks_mut(p.max(1)).enumerate() {
            plane.fill(b.data()[i % o]);
        }
    }
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    let wmat = MatRef::row_major(weight.data(), o, ckk)?;
    let pointwise = kh == 1 && kw == 1 && sh == 1 && sw == 1 && params.padding == [0; 4];

    // Output rows per band so the column buffer stays under MAX_COLS_ELEMS.
    let band_rows = (max_cols / (ckk * wo).max(1)).clamp(1, ho.max(1));
    let mut cols = if pointwise {
        Vec::new()
    } else {
        vec![0.0f32; ckk * band_rows * wo]
    };
    for b in 0..n {
        let img = &x.data()[b * c * h * w..(b + 1) * c * h * w];
        if pointwise {
            // A 1x1 convolution is W [o, c] · X [c, h*w] directly.
            gemm(
                1.0,
                wmat,
                MatRef::row_major(img, c, p)?,
                beta,
                MatMut::new(&mut out, b * o * p, o, p, p, 1)?,
            )?;
            continue;
        }
        let mut oh0 = 0;
        while oh0 < ho {
            let rows = band_rows.min(ho - oh0);
            let bp = rows * wo;
            im2col(
                img,
                (c, h, w),
                (kh, kw),
                (sh, sw),
                (pt, pl),
                (oh0, rows, wo),
                &mut cols,
            );
            gemm(
                1.0,
                wmat,
                MatRef::row_major(&cols, ckk, bp)?,
                beta,
                MatMut::new(&mut out, b * o * p + oh0 * wo, o, bp, p, 1)?,
            )?;
            oh0 += rows;
        }
    }
    Tensor::new([n, o, ho, wo], out)
}

/// Fills `cols [c*kh*kw, rows*wo]` (row-major) with the input patches for output rows
/// `oh0..oh0 + rows`; out-of-image taps are zero.
fn im2col(
    img: &[f32],
    (c, h, w): (usize, usize, usize),
    (kh, kw): (usize, usize),
    (sh, sw): (usize, usize),
    (pt, pl): (usize, usize),
    (oh0, rows, wo): (usize, usize, usize),
    cols: &mut [f32],
) {
    let bp = rows * wo;
    for ci in 0..c {
        let plane = &img[ci * h * w..(ci + 1) * h * w];
        for ki in 0..kh {
            for kj in 0..kw {
                let row = (ci * kh + ki) * kw + kj;
                let dst = &mut cols[row * bp..(row + 1) * bp];
                // Output columns whose tap lands inside the image: pl <= ow*sw + kj < w + pl.
                let ow_lo = pl.saturating_sub(kj).div_ceil(sw).min(wo);
                let ow_hi = if w + pl > kj {
                    (w + pl - kj).div_ceil(sw).min(wo)
                } else {
                    0
                }
                .max(ow_lo);
                for r in 0..rows {
                    let d = &mut dst[r * wo..(r + 1) * wo];
                    let ih = (oh0 + r) * sh + ki;
                    if ih < pt || ih - pt >= h {
                        d.fill(0.0);
                        continue;
                    }
                    let src = &plane[(ih - pt) * w..(ih - pt + 1) * w];
                    d[..ow_lo].fill(0.0);
                    d[ow_hi..].fill(0.0);
                    if ow_hi == ow_lo {
                        continue;
                    }
                    let start = ow_lo * sw + kj - pl;
                    if sw == 1 {
                        d[ow_lo..ow_hi].copy_from_slice(&src[start..start + (ow_hi - ow_lo)]);
                    } else {
                        for (k, v) in d[ow_lo..ow_hi].iter_mut().enumerate() {
                            *v = src[start + k * sw];
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(shape: &[usize], seed: u32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let data = (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect();
        Tensor::new(shape, data).unwrap()
    }

    #[test]
    fn banding_does_not_change_bits() {
        let x = pseudo_random(&[2, 5, 13, 11], 1);
        let w = pseudo_random(&[7, 5, 3, 3], 2);
        let b = pseudo_random(&[7], 3);
        for params in [Conv2dParams::new(1, 1), Conv2dParams::new(2, 1)] {
            let whole = conv2d_banded(&x, &w, Some(&b), params, usize::MAX).unwrap();
            // One output row per band, and an uneven 4-row band.
            for cap in [1, 4 * 45 * 11] {
                let banded = conv2d_banded(&x, &w, Some(&b), params, cap).unwrap();
                assert_eq!(banded.data(), whole.data(), "cap {cap}, {params:?}");
            }
        }
    }
}
