//! 2-d convolution (PyTorch `F.conv2d`, groups = 1, dilation = 1) as im2col + GEMM.
//!
//! Deep channels at low resolution (weights larger than the patches) take one whole-batch
//! product, so the weights are packed once. Otherwise the output is computed in bands of output
//! rows: each band's input patches are gathered into a bounded column buffer (im2col) and
//! multiplied by the weights `[o, c * kh * kw]`. Bands are independent and split over threads,
//! each running a single-threaded GEMM, so the gather and the GEMM's packing run in parallel too.
//! Each output's reduction (bias, then the GEMM's fixed K order) is the same whatever the path,
//! band size or thread count, so results are bit-identical for any of them.

use super::gemm::{gemm, gemm_serial, gemm_threads, MatMut, MatRef};
use crate::tensor::{OpError, OpResult, Tensor};

/// Upper bound on the im2col buffers of all threads together, in f32 elements (16 MiB; each
/// thread gets an equal share): a band stays cache-resident and memory stays bounded (a 512x512
/// VAE layer would otherwise need GBs).
const MAX_COLS_ELEMS: usize = 4 << 20;

/// Upper bound on the whole-batch column buffer of [`conv_batched`], in f32 elements (64 MiB).
const MAX_BATCH_COLS_ELEMS: usize = 16 << 20;

/// Below this many multiply-adds a convolution runs on the calling thread.
const MIN_PARALLEL_MACS: usize = 1 << 21;

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

/// Shapes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geom {
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    pt: usize,
    pl: usize,
    wo: usize,
}

/// Convolves `x [n, c, h, w]` with `weight [o, c, kh, kw]` plus optional `bias [o]`; returns
/// `[n, o, ho, wo]` with `ho = (h + top + bottom - kh) / stride_h + 1` (likewise `wo`).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    params: Conv2dParams,
) -> OpResult<Tensor> {
    conv2d_banded(x, weight, bias, params, None, gemm_threads())
}

/// [`conv2d`] with `band_rows` output rows per band (default: from [`MAX_COLS_ELEMS`]) on at
/// most `threads` threads.
fn conv2d_banded(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    params: Conv2dParams,
    band_rows: Option<usize>,
    threads: usize,
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
    let g = Geom {
        c,
        h,
        w,
        o,
        kh,
        kw,
        sh,
        sw,
        pt,
        pl,
        wo,
    };

    let mut out = vec![0.0f32; n * o * p];
    if n == 0 || o == 0 || p == 0 {
        return Tensor::new([n, o, ho, wo], out);
    }
    let bias = bias.map(|b| b.data());
    let macs = (n * o * p).saturating_mul(c * kh * kw);
    let threads = if macs < MIN_PARALLEL_MACS { 1 } else { threads };
    if kh == 1 && kw == 1 && sh == 1 && sw == 1 && params.padding == [0; 4] {
        // A 1x1 convolution is W [o, c] · X [c, h*w] directly; gemm splits it over threads.
        let wmat = MatRef::row_major(weight.data(), o, c)?;
        for (b, img_out) in out.chunks_mut(o * p).enumerate() {
            let beta = fill_bias(img_out, p, bias);
            let img = &x.data()[b * c * p..(b + 1) * c * p];
            let dst = MatMut::row_major(img_out, o, p)?;
            if threads > 1 {
                gemm(1.0, wmat, MatRef::row_major(img, c, p)?, beta, dst)?;
            } else {
                gemm_serial(1.0, wmat, MatRef::row_major(img, c, p)?, beta, dst)?;
            }
        }
        return Tensor::new([n, o, ho, wo], out);
    }

    let ckk = c * kh * kw;
    if band_rows.is_none() && o >= n * p / 2 && ckk * n * p <= MAX_BATCH_COLS_ELEMS {
        // Deep channels at low resolution: the weights outweigh the patches, so gather the
        // whole batch once and pack the weights once (bands would re-pack them per band).
        conv_batched(&g, n, x.data(), weight.data(), bias, threads, &mut out)?;
        return Tensor::new([n, o, ho, wo], out);
    }

    // Equal bands under the column-buffer cap; enough of them to keep every thread busy.
    let band_rows = band_rows.unwrap_or_else(|| {
        let cap_rows = (MAX_COLS_ELEMS / threads / (ckk * wo)).clamp(1, ho);
        let mut per_img = ho.div_ceil(cap_rows);
        while per_img < ho && (n * per_img) % threads != 0 && n * per_img < 4 * threads {
            per_img += 1;
        }
        ho.div_ceil(per_img)
    });
    let band_rows = band_rows.clamp(1, ho);
    let bands_per_img = ho.div_ceil(band_rows);

    // Each band's output: one slice of rows per output channel.
    let mut bands: Vec<(usize, usize, Vec<&mut [f32]>)> = Vec::new();
    for (b, img_out) in out.chunks_mut(o * p).enumerate() {
        let first = bands.len();
        for j in 0..bands_per_img {
            bands.push((b, j * band_rows, Vec::with_capacity(o)));
        }
        for plane in img_out.chunks_mut(p) {
            for (j, rows) in plane.chunks_mut(band_rows * wo).enumerate() {
                bands[first + j].2.push(rows);
            }
        }
    }
    let threads = threads.clamp(1, bands.len());
    let per_thread = bands.len().div_ceil(threads);
    let xd = x.data();
    let wd = weight.data();
    let run = |chunk: Vec<(usize, usize, Vec<&mut [f32]>)>| -> OpResult<()> {
        let mut scratch = BandScratch::default();
        for (b, oh0, mut dst) in chunk {
            let img = &xd[b * c * h * w..(b + 1) * c * h * w];
            conv_band(&g, img, wd, bias, oh0, &mut dst, &mut scratch)?;
        }
        Ok(())
    };
    let mut chunks = Vec::new();
    let mut it = bands.into_iter();
    loop {
        let chunk: Vec<_> = it.by_ref().take(per_thread).collect();
        if chunk.is_empty() {
            break;
        }
        chunks.push(chunk);
    }
    std::thread::scope(|s| {
        let mut chunks = chunks.into_iter();
        let first = chunks.next();
        let run = &run;
        let handles: Vec<_> = chunks.map(|ch| s.spawn(move || run(ch))).collect();
        let mut result = first.map_or(Ok(()), run);
        for h in handles {
            result = result.and(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
        }
        result
    })?;
    Tensor::new([n, o, ho, wo], out)
}

/// The whole batch as one product: patches `[c*kh*kw, n*p]` (gathered in parallel over channel
/// ranges), `W [o, c*kh*kw]` times them into `[o, n*p]` (split over threads by output channel,
/// so each thread packs its share of the weights once), then scattered into `out [n, o, p]`.
/// Each output's reduction (bias, then the GEMM's fixed K order) is the one the bands use.
fn conv_batched(
    g: &Geom,
    n: usize,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    threads: usize,
    out: &mut [f32],
) -> OpResult<()> {
    let (c, h, w, o) = (g.c, g.h, g.w, g.o);
    let kk = g.kh * g.kw;
    let ho = out.len() / (n * o * g.wo).max(1);
    let p = ho * g.wo;
    let np = n * p;
    let mut cols = vec![0.0f32; c * kk * np];
    let chans_per = c.div_ceil(threads.clamp(1, c));
    let gather = |c0: usize, block: &mut [f32]| {
        let cn = block.len() / (kk * np);
        for b in 0..n {
            let img = &x[(b * c + c0) * h * w..(b * c + c0 + cn) * h * w];
            im2col(
                img,
                (cn, h, w),
                (g.kh, g.kw),
                (g.sh, g.sw),
                (g.pt, g.pl),
                (0, ho, g.wo),
                (&mut *block, np, b * p),
            );
        }
    };
    std::thread::scope(|s| {
        for (t, block) in cols.chunks_mut(chans_per * kk * np).enumerate() {
            let gather = &gather;
            s.spawn(move || gather(t * chans_per, block));
        }
    });
    let mut acc = vec![0.0f32; o * np];
    let beta = fill_bias(&mut acc, np, bias);
    let wmat = MatRef::row_major(weight, o, c * kk)?;
    let cmat = MatRef::row_major(&cols, c * kk, np)?;
    let dst = MatMut::row_major(&mut acc, o, np)?;
    if threads > 1 {
        gemm(1.0, wmat, cmat, beta, dst)?;
    } else {
        gemm_serial(1.0, wmat, cmat, beta, dst)?;
    }
    for (b, img_out) in out.chunks_mut(o * p).enumerate() {
        for (dst, row) in img_out.chunks_mut(p).zip(acc.chunks_exact(np)) {
            dst.copy_from_slice(&row[b * p..(b + 1) * p]);
        }
    }
    Ok(())
}

/// Fills each `p`-sized plane of `dst` with its channel's bias; returns the GEMM `beta` (1 with
/// a bias to accumulate onto, else 0 so the old contents are ignored).
fn fill_bias(dst: &mut [f32], p: usize, bias: Option<&[f32]>) -> f32 {
    match bias {
        Some(bias) => {
            for (plane, &v) in dst.chunks_mut(p).zip(bias) {
                plane.fill(v);
            }
            1.0
        }
        None => 0.0,
    }
}

/// Per-thread buffers reused across bands.
#[derive(Default)]
struct BandScratch {
    /// The band's input patches, `[c * kh * kw][rows * wo]`.
    cols: Vec<f32>,
    /// The band's output, `[o][rows * wo]`.
    acc: Vec<f32>,
}

/// Computes output rows `oh0..oh0 + rows` of one image into `dst` (one slice per output channel,
/// `rows * wo` long).
fn conv_band(
    g: &Geom,
    img: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    oh0: usize,
    dst: &mut [&mut [f32]],
    scratch: &mut BandScratch,
) -> OpResult<()> {
    let Geom {
        c,
        h,
        w,
        o,
        kh,
        kw,
        sh,
        sw,
        pt,
        pl,
        wo,
    } = *g;
    let bp = dst.first().map_or(0, |d| d.len());
    if bp == 0 {
        return Ok(());
    }
    let ckk = c * kh * kw;
    scratch.cols.resize(ckk * bp, 0.0);
    im2col(
        img,
        (c, h, w),
        (kh, kw),
        (sh, sw),
        (pt, pl),
        (oh0, bp / wo, wo),
        (&mut scratch.cols, bp, 0),
    );
    scratch.acc.resize(o * bp, 0.0);
    let beta = fill_bias(&mut scratch.acc, bp, bias);
    gemm_serial(
        1.0,
        MatRef::row_major(weight, o, ckk)?,
        MatRef::row_major(&scratch.cols, ckk, bp)?,
        beta,
        MatMut::row_major(&mut scratch.acc, o, bp)?,
    )?;
    for (d, acc) in dst.iter_mut().zip(scratch.acc.chunks_exact(bp)) {
        d.copy_from_slice(acc);
    }
    Ok(())
}

/// Fills columns `col0..col0 + rows*wo` of `cols [c*kh*kw, ld]` (row-major) with the input
/// patches for output rows `oh0..oh0 + rows`; out-of-image taps are zero.
fn im2col(
    img: &[f32],
    (c, h, w): (usize, usize, usize),
    (kh, kw): (usize, usize),
    (sh, sw): (usize, usize),
    (pt, pl): (usize, usize),
    (oh0, rows, wo): (usize, usize, usize),
    (cols, ld, col0): (&mut [f32], usize, usize),
) {
    let bp = rows * wo;
    for ci in 0..c {
        let plane = &img[ci * h * w..(ci + 1) * h * w];
        for ki in 0..kh {
            for kj in 0..kw {
                let row = (ci * kh + ki) * kw + kj;
                let dst = &mut cols[row * ld + col0..row * ld + col0 + bp];
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
        crate::ops::lcg_tensor(shape, seed, 1.0, -0.5)
    }

    /// Direct f64 convolution.
    fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams) -> Vec<f64> {
        let (xs, ws) = (x.shape(), w.shape());
        let (n, c, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
        let (o, kh, kw) = (ws[0], ws[2], ws[3]);
        let [pt, pb, pl, pr] = p.padding;
        let (sh, sw) = p.stride;
        let ho = (h + pt + pb - kh) / sh + 1;
        let wo = (wd + pl + pr - kw) / sw + 1;
        let mut out = Vec::with_capacity(n * o * ho * wo);
        for bi in 0..n {
            for oi in 0..o {
                for oh in 0..ho {
                    for ow in 0..wo {
                        let mut acc = b.map_or(0.0, |b| b.data()[oi] as f64);
                        for ci in 0..c {
                            for ki in 0..kh {
                                for kj in 0..kw {
                                    let (ih, iw) = (oh * sh + ki, ow * sw + kj);
                                    if ih < pt || iw < pl || ih - pt >= h || iw - pl >= wd {
                                        continue;
                                    }
                                    let xv = x.data()[((bi * c + ci) * h + ih - pt) * wd + iw - pl];
                                    let wv = w.data()[((oi * c + ci) * kh + ki) * kw + kj];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out.push(acc);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_direct_reference_on_awkward_shapes() {
        // (x shape, weight shape, stride, padding [t, b, l, r], bias)
        type Case = ([usize; 4], [usize; 4], (usize, usize), [usize; 4], bool);
        let cases: &[Case] = &[
            ([1, 3, 7, 9], [4, 3, 3, 3], (1, 1), [1, 1, 1, 1], true),
            ([2, 5, 13, 11], [7, 5, 3, 3], (2, 2), [1, 1, 1, 1], true),
            ([1, 4, 8, 8], [3, 4, 3, 3], (2, 2), [0, 1, 0, 1], false),
            ([2, 6, 5, 7], [5, 6, 1, 1], (1, 1), [0, 0, 0, 0], true),
            ([1, 2, 6, 6], [3, 2, 1, 1], (2, 1), [1, 0, 0, 2], true),
            ([1, 2, 2, 3], [2, 2, 5, 5], (1, 1), [2, 2, 2, 2], true),
            ([3, 1, 9, 4], [1, 1, 3, 2], (1, 1), [0, 2, 1, 0], false),
            ([1, 3, 10, 12], [2, 3, 4, 3], (3, 2), [1, 2, 0, 1], true),
            ([2, 1, 1, 1], [4, 1, 1, 1], (1, 1), [0, 0, 0, 0], true),
        ];
        for (i, &(xs, ws, stride, padding, with_bias)) in cases.iter().enumerate() {
            let x = pseudo_random(&xs, 10 + i as u32);
            let w = pseudo_random(&ws, 20 + i as u32);
            let b = pseudo_random(&[ws[0]], 30 + i as u32);
            let b = with_bias.then_some(&b);
            let params = Conv2dParams { stride, padding };
            let want = reference(&x, &w, b, params);
            for threads in [1, 3] {
                let got = conv2d_banded(&x, &w, b, params, None, threads).unwrap();
                assert_eq!(got.numel(), want.len(), "case {i}");
                for (j, (g, r)) in got.data().iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()),
                        "case {i} elem {j}: {g} vs {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn banding_and_threads_do_not_change_bits() {
        let x = pseudo_random(&[2, 5, 13, 11], 1);
        let w = pseudo_random(&[7, 5, 3, 3], 2);
        let b = pseudo_random(&[7], 3);
        for params in [
            Conv2dParams::new(1, 1),
            Conv2dParams::new(2, 1),
            Conv2dParams::new(1, 0),
        ] {
            let whole = conv2d_banded(&x, &w, Some(&b), params, Some(usize::MAX), 1).unwrap();
            for (rows, threads) in [
                (None, 1),
                (None, 2),
                (Some(1), 1),
                (Some(1), 4),
                (Some(4), 3),
            ] {
                let banded = conv2d_banded(&x, &w, Some(&b), params, rows, threads).unwrap();
                assert_eq!(banded.data(), whole.data(), "{rows:?} {threads} {params:?}");
            }
        }
    }

    #[test]
    fn whole_batch_path_matches_bands_and_reference() {
        // o >= n*p/2: deep channels at low resolution take the whole-batch product.
        for (xs, ws) in [
            ([2, 24, 5, 6], [64, 24, 3, 3]),
            ([2, 64, 8, 8], [256, 64, 3, 3]),
        ] {
            let x = pseudo_random(&xs, 7);
            let w = pseudo_random(&ws, 8);
            let b = pseudo_random(&[ws[0]], 9);
            for params in [Conv2dParams::new(1, 1), Conv2dParams::new(2, 1)] {
                let want = reference(&x, &w, Some(&b), params);
                let bands = conv2d_banded(&x, &w, Some(&b), params, Some(1), 2).unwrap();
                for threads in [1, 2, 3] {
                    let got = conv2d_banded(&x, &w, Some(&b), params, None, threads).unwrap();
                    assert_eq!(got.data(), bands.data(), "{xs:?} {params:?} {threads}");
                    for (g, r) in got.data().iter().zip(&want) {
                        assert!(
                            (*g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()),
                            "{g} vs {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn large_conv_same_bits_on_any_thread_count() {
        // Big enough to take the threaded path (and gemm's for the 1x1 case).
        let x = pseudo_random(&[1, 64, 40, 36], 4);
        let b = pseudo_random(&[96], 6);
        for k in [1, 3] {
            let w = pseudo_random(&[96, 64, k, k], 5);
            let params = Conv2dParams::new(1, k / 2);
            let one = conv2d_banded(&x, &w, Some(&b), params, None, 1).unwrap();
            let two = conv2d_banded(&x, &w, Some(&b), params, None, 2).unwrap();
            let auto = conv2d(&x, &w, Some(&b), params).unwrap();
            assert_eq!(one.data(), two.data(), "k {k}");
            assert_eq!(one.data(), auto.data(), "k {k}");
        }
    }
}
