//! Multi-head scaled-dot-product attention in diffusers' `[batch, seq, heads * head_dim]` layout.
//!
//! Flash-style: each task takes one batch item and a block of query rows, walks the keys in
//! blocks, and keeps a running row maximum and sum (online softmax), rescaling its output
//! accumulator when the maximum grows, so only a `strip x key block` score tile exists at a
//! time. The queries are handled in strips of [`LANES`] (the vector lanes of the micro-kernels);
//! keys and values are packed once per call into the order the micro-kernels read them. Tasks
//! are independent and each runs the same fixed sequence of operations, so the result does not
//! depend on how tasks are split over threads.

use super::exp::{exp_nonpositive_fused, madd};
use super::parallel::for_each_row;
use crate::tensor::{OpError, OpResult, Tensor};

/// Query rows per task (a whole number of strips).
const BQ: usize = 128;

/// Queries per strip: the lanes of the micro-kernels (two AVX2 registers).
const LANES: usize = 16;

/// Keys per step of the score micro-kernel (`KG x 2` accumulator registers).
const KG: usize = 6;

/// Value channels per step of the `P·V` micro-kernel (`VG x 2` accumulator registers); SD's head
/// sizes 40, 80 and 160 are multiples of it.
const VG: usize = 5;

/// Keys per block: a multiple of [`KG`]; a strip's score tile (`BK x LANES`) stays in L1 and
/// the block's packed keys and values in L2.
const BK: usize = 192;

/// Signature of the task runner: calls `f(i, tile)` once for every `len`-sized tile of `data`.
type RunTasks<'a> = &'a dyn Fn(&mut [f32], usize, &(dyn Fn(usize, &mut [f32]) + Sync));

/// `softmax(q·kᵀ / sqrt(d)) · v` per head for `q [b, nq, heads*d]`, `k [b, nk, heads*d]`,
/// `v [b, nk, heads*dv]`; returns `[b, nq, heads*dv]` (diffusers `AttnProcessor2_0` semantics,
/// no mask, no dropout). Head `h` uses channels `h*d..(h+1)*d`. A query whose scores are all
/// `-inf` gets a zero output row (no NaN).
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> OpResult<Tensor> {
    attention(q, k, v, heads, false, &|d, len, f| for_each_row(d, len, f))
}

/// Causal [`scaled_dot_product_attention`] for self-attention (`nq == nk`): query `i` attends to
/// keys `0..=i` only; later keys get exactly zero weight (as CLIP's additive `finfo.min` mask).
pub(crate) fn causal_scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> OpResult<Tensor> {
    attention(q, k, v, heads, true, &|d, len, f| for_each_row(d, len, f))
}

/// Shapes and constants shared by every task.
struct Dims {
    nq: usize,
    nk: usize,
    heads: usize,
    d: usize,
    dv: usize,
    /// `dv` rounded up to a multiple of [`VG`].
    dvp: usize,
    scale: f32,
    causal: bool,
}

fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
    run: RunTasks<'_>,
) -> OpResult<Tensor> {
    for t in [q, k, v] {
        t.expect_rank("attention", 3, "[batch, seq, heads*head_dim]")?;
    }
    let (b, nq, qc) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let (nk, kc) = (k.shape()[1], k.shape()[2]);
    let vc = v.shape()[2];
    let ok = heads > 0
        && qc.is_multiple_of(heads)
        && vc.is_multiple_of(heads)
        && kc == qc
        && k.shape()[0] == b
        && v.shape()[0] == b
        && v.shape()[1] == nk
        && (!causal || nk == nq);
    if !ok {
        let want = if causal {
            format!("q, k [b, n, {heads}*d], v [b, n, {heads}*dv]")
        } else {
            format!("q [b, nq, {heads}*d], k [b, nk, {heads}*d], v [b, nk, {heads}*dv]")
        };
        return Err(OpError::shape(
            "attention",
            want,
            format!("q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape()),
        ));
    }
    let (d, dv) = (qc / heads, vc / heads);
    let mut out = vec![0.0f32; b * nq * vc];
    if nk == 0 || nq == 0 || vc == 0 {
        return Tensor::new([b, nq, vc], out);
    }
    let dims = Dims {
        nq,
        nk,
        heads,
        d,
        dv,
        dvp: dv.div_ceil(VG) * VG,
        scale: 1.0 / (d as f32).sqrt(),
        causal,
    };
    let kp = pack_keys(k.data(), b, nk, heads, d, run);
    let vp = pack_values(v.data(), b, nk, heads, dv, run);
    let qd = q.data();
    // One tile of BQ query rows x all heads per (batch, query block) task.
    let q_blocks = nq.div_ceil(BQ);
    let tile_len = BQ * vc;
    let task = |i: usize, tile: &mut [f32]| {
        let (bi, qb) = (i / q_blocks, i % q_blocks);
        attend_block(&dims, qd, &kp, &vp, bi, qb * BQ, tile);
    };
    if nq.is_multiple_of(BQ) {
        // The tiles are exactly the output's blocks of rows.
        run(&mut out, tile_len, &task);
        return Tensor::new([b, nq, vc], out);
    }
    let mut tiles = vec![0.0f32; b * q_blocks * tile_len];
    run(&mut tiles, tile_len, &task);
    for (i, tile) in tiles.chunks_exact(tile_len).enumerate() {
        let (bi, q0) = (i / q_blocks, (i % q_blocks) * BQ);
        let rows = BQ.min(nq - q0);
        let start = (bi * nq + q0) * vc;
        out[start..start + rows * vc].copy_from_slice(&tile[..rows * vc]);
    }
    Tensor::new([b, nq, vc], out)
}

/// `k [b, nk, heads*d]` as `[b, heads, nk/KG, d, KG]` (keys padded with zeros to a multiple of
/// [`KG`]): each score micro-kernel step reads `KG` keys' channel `c` side by side.
fn pack_keys(
    k: &[f32],
    b: usize,
    nk: usize,
    heads: usize,
    d: usize,
    run: RunTasks<'_>,
) -> Vec<f32> {
    let groups = nk.div_ceil(KG);
    let len = groups * d * KG;
    let mut kp = vec![0.0f32; b * heads * len];
    run(&mut kp, len, &|bh, dst| {
        let (bi, h) = (bh / heads, bh % heads);
        for (j, key) in k[bi * nk * heads * d..]
            .chunks_exact(heads * d)
            .take(nk)
            .enumerate()
        {
            let group = &mut dst[(j / KG) * d * KG..][..d * KG];
            for (c, &x) in key[h * d..(h + 1) * d].iter().enumerate() {
                group[c * KG + j % KG] = x;
            }
        }
    });
    kp
}

/// `v [b, nk, heads*dv]` as `[b, heads, dvp/VG, nk, VG]` (channels padded with zeros to a
/// multiple of [`VG`]): each `P·V` micro-kernel step reads `VG` channels of one key.
fn pack_values(
    v: &[f32],
    b: usize,
    nk: usize,
    heads: usize,
    dv: usize,
    run: RunTasks<'_>,
) -> Vec<f32> {
    let cgroups = dv.div_ceil(VG);
    let len = cgroups * nk * VG;
    let mut vp = vec![0.0f32; b * heads * len];
    run(&mut vp, len, &|bh, dst| {
        let (bi, h) = (bh / heads, bh % heads);
        for (j, key) in v[bi * nk * heads * dv..]
            .chunks_exact(heads * dv)
            .take(nk)
            .enumerate()
        {
            for (c, &x) in key[h * dv..(h + 1) * dv].iter().enumerate() {
                dst[((c / VG) * nk + j) * VG + c % VG] = x;
            }
        }
    });
    vp
}

/// All heads of query rows `q0..q0 + BQ` (clipped to `nq`) of batch item `bi`, written to `tile`
/// as `[BQ, heads*dv]`. `kp` and `vp` are packed by [`pack_keys`] and [`pack_values`].
fn attend_block(
    dm: &Dims,
    q: &[f32],
    kp: &[f32],
    vp: &[f32],
    bi: usize,
    q0: usize,
    tile: &mut [f32],
) {
    let (d, dv, dvp, nq, nk) = (dm.d, dm.dv, dm.dvp, dm.nq, dm.nk);
    let (qc, vc) = (dm.heads * d, dm.heads * dv);
    let rows = BQ.min(nq - q0);
    let strips = rows.div_ceil(LANES);
    // Keys any of these queries can see.
    let k_end = if dm.causal { (q0 + rows).min(nk) } else { nk };
    let (kp_len, vp_len) = (nk.div_ceil(KG) * d * KG, nk * dvp);
    // Per strip: scaled queries `[d, LANES]` and the output accumulator `[dvp, LANES]`; lanes
    // past `rows` stay zero queries and are never written out.
    let mut qs = vec![0.0f32; strips * d * LANES];
    let mut os = vec![0.0f32; strips * dvp * LANES];
    let mut scores = vec![0.0f32; BK * LANES];
    let mut row_max = vec![[f32::NEG_INFINITY; LANES]; strips];
    let mut row_sum = vec![[0.0f64; LANES]; strips];
    for h in 0..dm.heads {
        let head = bi * dm.heads + h;
        let (kp_h, vp_h) = (
            &kp[head * kp_len..][..kp_len],
            &vp[head * vp_len..][..vp_len],
        );
        for (i, qrow) in q[(bi * nq + q0) * qc..].chunks(qc).take(rows).enumerate() {
            let strip = &mut qs[(i / LANES) * d * LANES..][..d * LANES];
            for (c, &x) in qrow[h * d..(h + 1) * d].iter().enumerate() {
                strip[c * LANES + i % LANES] = x * dm.scale;
            }
        }
        os.fill(0.0);
        row_max.fill([f32::NEG_INFINITY; LANES]);
        row_sum.fill([0.0; LANES]);
        let mut k0 = 0;
        while k0 < k_end {
            let cols = BK.min(k_end - k0);
            for (st, ((qs, os), (max, sum))) in qs
                .chunks_exact(d * LANES)
                .zip(os.chunks_exact_mut(dvp * LANES))
                .zip(row_max.iter_mut().zip(row_sum.iter_mut()))
                .enumerate()
            {
                let first = q0 + st * LANES;
                // Causal: keys past the strip's last query are masked for all its lanes.
                let (cols, mask) = if dm.causal {
                    ((first + LANES).saturating_sub(k0).min(cols), Some(first))
                } else {
                    (cols, None)
                };
                if cols == 0 {
                    continue;
                }
                let blk = StripBlock {
                    keys: &kp_h[(k0 / KG) * d * KG..],
                    values: vp_h,
                    nk,
                    k0,
                    cols,
                    mask,
                };
                strip_block(&blk, qs, &mut scores, os, max, sum);
            }
            k0 += cols;
        }
        for (i, trow) in tile.chunks_exact_mut(vc).take(rows).enumerate() {
            let (st, lane) = (i / LANES, i % LANES);
            let sum = row_sum[st][lane];
            // A query that never saw a finite score has sum 0 and a zero accumulator: output 0.
            let inv = if sum > 0.0 { (1.0 / sum) as f32 } else { 0.0 };
            let acc = &os[st * dvp * LANES..][..dv * LANES];
            for (o, a) in trow[h * dv..(h + 1) * dv]
                .iter_mut()
                .zip(acc.iter().skip(lane).step_by(LANES))
            {
                *o = a * inv;
            }
        }
    }
}

/// One key block as seen by one strip.
struct StripBlock<'a> {
    /// This head's packed keys from the block's first key group on.
    keys: &'a [f32],
    /// This head's packed values (all keys).
    values: &'a [f32],
    nk: usize,
    /// The block's first key (a multiple of [`KG`]).
    k0: usize,
    /// Keys of the block this strip uses.
    cols: usize,
    /// Causal: the strip's first query; key `k0 + j` is masked for lane `l` when `k0 + j >
    /// first + l`.
    mask: Option<usize>,
}

/// One key block for one strip of queries `qs` (`[d, LANES]`, pre-scaled): scores into
/// `scores` (`[keys, LANES]`), online softmax against the strip's running maximum and sum, and
/// the weighted values accumulated into `acc` (`[dvp, LANES]`), rescaled when the maximum grows.
/// Scores of `-inf` get weight exactly 0; a query with no finite score yet keeps sum 0.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn strip_block<'a>(
    blk: &StripBlock<'a>,
    qs: &[f32],
    scores: &mut [f32],
    acc: &mut [f32],
    max: &mut [f32; LANES],
    sum: &mut [f64; LANES],
) {
    const FMA: bool = multiversion::target::target_cfg_f!(target_feature = "fma");
    strip_block_body::<FMA>(blk, qs, scores, acc, max, sum);
}

/// The body of [`strip_block`], inlined into each of its target versions.
#[inline(always)]
fn strip_block_body<const FMA: bool>(
    blk: &StripBlock<'_>,
    qs: &[f32],
    scores: &mut [f32],
    acc: &mut [f32],
    max: &mut [f32; LANES],
    sum: &mut [f64; LANES],
) {
    let d = qs.len() / LANES;
    let cols = blk.cols;
    // Scores, KG keys at a time (the last group may run into padding or later keys: unused).
    for (sg, kg) in scores
        .chunks_exact_mut(KG * LANES)
        .zip(blk.keys.chunks_exact(d * KG))
        .take(cols.div_ceil(KG))
    {
        let mut s = [[0.0f32; LANES]; KG];
        for (qv, kv) in qs.chunks_exact(LANES).zip(kg.chunks_exact(KG)) {
            let qv: &[f32; LANES] = qv.try_into().expect("LANES-long chunk");
            for (s, &k) in s.iter_mut().zip(kv) {
                for (s, &q) in s.iter_mut().zip(qv) {
                    *s = madd::<FMA>(k, q, *s);
                }
            }
        }
        for (dst, s) in sg.chunks_exact_mut(LANES).zip(&s) {
            dst.copy_from_slice(s);
        }
    }
    let s = &mut scores[..cols * LANES];
    if let Some(first) = blk.mask {
        for (j, key) in s.chunks_exact_mut(LANES).enumerate() {
            // Lanes l < k0 + j - first are earlier queries than key k0 + j.
            let hidden = (blk.k0 + j).saturating_sub(first).min(LANES);
            key[..hidden].fill(f32::NEG_INFINITY);
        }
    }
    // Online softmax across the strip's lanes.
    let mut m = *max;
    for key in s.chunks_exact(LANES) {
        for (m, &x) in m.iter_mut().zip(key) {
            // NaNs are skipped here; they reach the output through exp.
            *m = if x > *m { x } else { *m };
        }
    }
    let mut alpha = [0.0f32; LANES];
    for ((a, old), new) in alpha.iter_mut().zip(max.iter_mut()).zip(m.iter_mut()) {
        let seen = *new;
        // Subtracting a finite stand-in for a -inf maximum keeps exp(-inf - m) = 0, not NaN.
        if *new == f32::NEG_INFINITY {
            *new = 0.0;
        }
        // exp(-inf) = 0 on the first block; exactly 1 when the maximum did not grow.
        *a = exp_nonpositive_fused::<FMA>(*old - *new);
        *old = seen;
    }
    for row in acc.chunks_exact_mut(LANES) {
        for (x, &a) in row.iter_mut().zip(&alpha) {
            *x *= a;
        }
    }
    for (s, &a) in sum.iter_mut().zip(&alpha) {
        *s *= a as f64;
    }
    // Sums in f32 over runs of a few keys (so exp stays in f32 lanes), then in f64.
    const RUN: usize = 16;
    for run in s.chunks_mut(RUN * LANES) {
        let mut part = [0.0f32; LANES];
        for key in run.chunks_exact_mut(LANES) {
            for ((x, &m), p) in key.iter_mut().zip(&m).zip(part.iter_mut()) {
                *x = exp_nonpositive_fused::<FMA>(*x - m);
                *p += *x;
            }
        }
        for (t, &p) in sum.iter_mut().zip(&part) {
            *t += p as f64;
        }
    }
    // acc += weights · values, VG channels at a time.
    for (cg, ag) in acc.chunks_exact_mut(VG * LANES).enumerate() {
        let vals = &blk.values[(cg * blk.nk + blk.k0) * VG..][..cols * VG];
        let mut o = [[0.0f32; LANES]; VG];
        for (o, a) in o.iter_mut().zip(ag.chunks_exact(LANES)) {
            o.copy_from_slice(a);
        }
        for (pv, vv) in s.chunks_exact(LANES).zip(vals.chunks_exact(VG)) {
            let pv: &[f32; LANES] = pv.try_into().expect("LANES-long chunk");
            for (o, &v) in o.iter_mut().zip(vv) {
                for (o, &p) in o.iter_mut().zip(pv) {
                    *o = madd::<FMA>(v, p, *o);
                }
            }
        }
        for (a, o) in ag.chunks_exact_mut(LANES).zip(&o) {
            a.copy_from_slice(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk(shape: [usize; 3], seed: usize) -> Tensor {
        let n = shape.iter().product::<usize>();
        let data = (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        Tensor::new(shape, data).unwrap()
    }

    /// Straightforward f64 attention: scores, softmax and the weighted sum per (batch, head, query).
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Vec<f64> {
        let (b, nq, qc) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let (nk, vc) = (k.shape()[1], v.shape()[2]);
        let (d, dv) = (qc / heads, vc / heads);
        let mut out = vec![0.0f64; b * nq * vc];
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..nq {
                    let seen = if causal { i + 1 } else { nk };
                    let s: Vec<f64> = (0..seen)
                        .map(|j| {
                            let dot: f64 = (0..d)
                                .map(|c| {
                                    q.data()[(bi * nq + i) * qc + h * d + c] as f64
                                        * k.data()[(bi * nk + j) * qc + h * d + c] as f64
                                })
                                .sum();
                            dot / (d as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let total: f64 = e.iter().sum();
                    for c in 0..dv {
                        let o: f64 = (0..seen)
                            .map(|j| e[j] * v.data()[(bi * nk + j) * vc + h * dv + c] as f64)
                            .sum();
                        out[(bi * nq + i) * vc + h * dv + c] = o / total;
                    }
                }
            }
        }
        out
    }

    fn assert_close(got: &Tensor, want: &[f64], what: &str) {
        let peak = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let worst = got
            .data()
            .iter()
            .zip(want)
            .map(|(&g, &w)| {
                if g.is_nan() {
                    f64::INFINITY
                } else {
                    (g as f64 - w).abs()
                }
            })
            .fold(0.0f64, f64::max);
        assert!(
            worst <= 1e-5 * peak,
            "{what}: max error {worst:e}, peak {peak}"
        );
    }

    #[test]
    fn matches_f64_reference_on_awkward_shapes() {
        // (batch, nq, nk, heads, d, dv): lengths off the block sizes, one key, nq != nk.
        let cases = [
            (2, 37, 23, 4, 3, 2),
            (1, 5, 1, 2, 40, 40),
            (2, 70, 300, 2, 40, 40),
            (1, 129, 77, 3, 64, 64),
            (1, 65, 333, 1, 80, 80),
            (2, 100, 200, 1, 160, 160),
            (1, 3, 600, 1, 16, 24),
        ];
        for (b, nq, nk, heads, d, dv) in cases {
            let q = mk([b, nq, heads * d], 1);
            let k = mk([b, nk, heads * d], 2);
            let v = mk([b, nk, heads * dv], 3);
            let got = scaled_dot_product_attention(&q, &k, &v, heads).unwrap();
            assert_eq!(got.shape(), [b, nq, heads * dv]);
            let what = format!("b {b} nq {nq} nk {nk} heads {heads} d {d} dv {dv}");
            assert_close(&got, &reference(&q, &k, &v, heads, false), &what);
            if nq == nk || nk >= nq {
                // Causal needs nq == nk: use the first nq keys.
                let n = nq;
                let (k, v) = (mk([b, n, heads * d], 2), mk([b, n, heads * dv], 3));
                let got = causal_scaled_dot_product_attention(&q, &k, &v, heads).unwrap();
                assert_close(
                    &got,
                    &reference(&q, &k, &v, heads, true),
                    &format!("causal {what}"),
                );
            }
        }
    }

    #[test]
    fn fully_masked_rows_give_zero_not_nan() {
        // Query row 1 has -inf·k scores for every key: all -inf.
        let (nq, nk, d) = (3, 300, 4);
        let mut q = mk([1, nq, d], 1);
        let k = Tensor::new([1, nk, d], vec![1.0; nk * d]).unwrap();
        let v = mk([1, nk, d], 3);
        q.data_mut()[d..2 * d].fill(f32::NEG_INFINITY);
        let out = scaled_dot_product_attention(&q, &k, &v, 1).unwrap();
        assert_eq!(out.data()[d..2 * d], [0.0; 4]);
        assert!(out.data().iter().all(|x| x.is_finite()));
        // A NaN score still poisons its row.
        q.data_mut()[0] = f32::NAN;
        let out = scaled_dot_product_attention(&q, &k, &v, 1).unwrap();
        assert!(out.data()[..d].iter().all(|x| x.is_nan()));
        assert!(out.data()[2 * d..].iter().all(|x| x.is_finite()));
    }

    #[test]
    fn thread_split_does_not_change_bits() {
        // 300 queries: padded tiles, several key blocks; 256: tasks write the output directly.
        for (n, causal) in [(300, false), (300, true), (256, false), (256, true)] {
            let (q, k, v) = (mk([2, n, 80], 1), mk([2, n, 80], 2), mk([2, n, 40], 3));
            let pooled = attention(&q, &k, &v, 2, causal, &|d, len, f| for_each_row(d, len, f));
            let pooled = pooled.unwrap();
            // Tasks in reverse order on one thread, and three threads with uneven shares.
            let reversed = attention(&q, &k, &v, 2, causal, &|d, len, f| {
                for (i, t) in d.chunks_mut(len).enumerate().rev() {
                    f(i, t);
                }
            })
            .unwrap();
            let threaded = attention(&q, &k, &v, 2, causal, &|d, len, f| {
                std::thread::scope(|s| {
                    let (a, rest) = d.split_at_mut(len);
                    let (b, c) = rest.split_at_mut(2 * len);
                    s.spawn(move || f(0, a));
                    s.spawn(move || b.chunks_mut(len).enumerate().for_each(|(i, t)| f(1 + i, t)));
                    c.chunks_mut(len).enumerate().for_each(|(i, t)| f(3 + i, t));
                });
            })
            .unwrap();
            assert_eq!(pooled.data(), reversed.data(), "n {n} causal {causal}");
            assert_eq!(pooled.data(), threaded.data(), "n {n} causal {causal}");
        }
    }
}
