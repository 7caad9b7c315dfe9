//! Multi-head scaled-dot-product attention in diffusers' `[batch, seq, heads * head_dim]` layout.
//!
//! Flash-style: each task takes one batch item and a block of query rows, walks the keys in
//! blocks, and keeps a running row maximum and sum (online softmax), rescaling its output
//! accumulator when the maximum grows, so only a `query block x key block` score tile exists at a
//! time. Tasks are independent and each runs the same fixed sequence of operations, so the
//! result does not depend on how tasks are split over threads.

use super::exp::exp_nonpositive_f32;
use super::gemm::{gemm, MatMut, MatRef};
use super::parallel::for_each_row;
use crate::tensor::{OpError, OpResult, Tensor};

/// Query rows per task: two of matrixmultiply's 64-row blocks, so each packed key/value block
/// serves 128 queries, yet below the size at which it would split rows over threads.
const BQ: usize = 128;

/// matrixmultiply splits a product over threads once `m*k + k*n` reaches 2^15; the block
/// products stay below so that each runs on the calling task's thread.
const GEMM_SINGLE_THREAD: usize = 1 << 15;

/// Keys per block for head sizes `d` (queries/keys) and `dv` (values): as many as keep both block
/// products below matrixmultiply's threading threshold (the score tile and the key/value blocks
/// then sit in L2), a multiple of 16, at least 64. Depends only on the shapes, never on the thread
/// count.
fn key_block(d: usize, dv: usize) -> usize {
    let mut bk = 512;
    while bk > 64 && !single_threaded_gemms(d, dv, bk) {
        bk -= 16;
    }
    if single_threaded_gemms(d, dv, bk) {
        bk
    } else {
        LARGE_HEAD_BK
    }
}

/// Keys per block for heads too large for single-threaded block products.
const LARGE_HEAD_BK: usize = 256;

/// Whether matrixmultiply runs both block products on the calling thread.
fn single_threaded_gemms(d: usize, dv: usize, bk: usize) -> bool {
    d * (BQ + bk) < GEMM_SINGLE_THREAD && bk * (BQ + dv) < GEMM_SINGLE_THREAD
}

/// Our threads split the tasks when each block product runs on one thread; for larger heads the
/// tasks run in order and matrixmultiply threads each product (same bits either way).
fn run_tasks(data: &mut [f32], len: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync), split: bool) {
    if split {
        for_each_row(data, len, f);
    } else {
        data.chunks_mut(len).enumerate().for_each(|(i, t)| f(i, t));
    }
}

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
    let split = split_tasks(q, v, heads);
    attention(q, k, v, heads, false, &|d, len, f| {
        run_tasks(d, len, f, split)
    })
}

/// Causal [`scaled_dot_product_attention`] for self-attention (`nq == nk`): query `i` attends to
/// keys `0..=i` only; later keys get exactly zero weight (as CLIP's additive `finfo.min` mask).
pub(crate) fn causal_scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> OpResult<Tensor> {
    let split = split_tasks(q, v, heads);
    attention(q, k, v, heads, true, &|d, len, f| {
        run_tasks(d, len, f, split)
    })
}

/// Whether our threads split the tasks (see [`run_tasks`]); shapes are checked later.
fn split_tasks(q: &Tensor, v: &Tensor, heads: usize) -> bool {
    let (d, dv) = match (q.shape().last(), v.shape().last()) {
        (Some(&qc), Some(&vc)) if heads > 0 => (qc / heads, vc / heads),
        _ => return true,
    };
    single_threaded_gemms(d, dv, key_block(d, dv))
}

/// Shapes and constants shared by every task.
struct Dims {
    nq: usize,
    nk: usize,
    heads: usize,
    d: usize,
    dv: usize,
    bk: usize,
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
        bk: key_block(d, dv),
        scale: 1.0 / (d as f32).sqrt(),
        causal,
    };
    // A per-head transposed copy `[b, heads, d, nk]` of k, so that its blocks are read in
    // contiguous runs when matrixmultiply packs them (as are the per-task copies of q blocks).
    let kt = per_head_transposed(k.data(), b, nk, heads, d, run);
    let (qd, vd) = (q.data(), v.data());
    // One tile of BQ query rows x all heads per (batch, query block) task.
    let q_blocks = nq.div_ceil(BQ);
    let tile_len = BQ * vc;
    let task = |i: usize, tile: &mut [f32]| {
        let (bi, qb) = (i / q_blocks, i % q_blocks);
        // Block views are in bounds by the shape checks above.
        attend_block(&dims, qd, &kt, vd, bi, qb * BQ, tile).expect("attention block views");
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

/// `x [b, n, heads*d]` as `[b, heads, d, n]`.
fn per_head_transposed(
    x: &[f32],
    b: usize,
    n: usize,
    heads: usize,
    d: usize,
    run: RunTasks<'_>,
) -> Vec<f32> {
    let c = heads * d;
    let mut t = vec![0.0f32; b * c * n];
    // Row r of the result is channel r % c of batch item r / c.
    run(&mut t, n, &|r, row| {
        let (bi, ch) = (r / c, r % c);
        let src = &x[bi * n * c + ch..];
        for (i, dst) in row.iter_mut().enumerate() {
            *dst = src[i * c];
        }
    });
    t
}

/// All heads of query rows `q0..q0 + BQ` (clipped to `nq`) of batch item `bi`, written to `tile`
/// as `[BQ, heads*dv]`. `kt` is per-head transposed (see [`per_head_transposed`]).
fn attend_block(
    dm: &Dims,
    q: &[f32],
    kt: &[f32],
    v: &[f32],
    bi: usize,
    q0: usize,
    tile: &mut [f32],
) -> OpResult<()> {
    let (d, dv, bk, nq, nk) = (dm.d, dm.dv, dm.bk, dm.nq, dm.nk);
    let (qc, vc) = (dm.heads * d, dm.heads * dv);
    let rows = BQ.min(nq - q0);
    // Keys any of these queries can see.
    let k_end = if dm.causal { (q0 + rows).min(nk) } else { nk };
    // Scores and then weights of one key block, key-major (`[cols, rows]`), so the softmax
    // runs across queries in lanes and the weights pack contiguously as the left operand.
    let mut scores = vec![0.0f32; bk * rows];
    let mut acc = vec![0.0f32; rows * dv];
    let mut q_t = vec![0.0f32; d * rows];
    let mut row_max = [f32::NEG_INFINITY; BQ];
    let mut row_sum = [0.0f64; BQ];
    for h in 0..dm.heads {
        acc.fill(0.0);
        let (row_max, row_sum) = (&mut row_max[..rows], &mut row_sum[..rows]);
        row_max.fill(f32::NEG_INFINITY);
        row_sum.fill(0.0);
        let head = bi * dm.heads + h;
        // This head's queries, transposed to `[d, rows]`.
        for (i, qrow) in q[(bi * nq + q0) * qc..].chunks(qc).take(rows).enumerate() {
            for (c, &x) in qrow[h * d..(h + 1) * d].iter().enumerate() {
                q_t[c * rows + i] = x;
            }
        }
        let q_h = MatRef::new(&q_t, 0, rows, d, 1, rows)?;
        let mut k0 = 0;
        while k0 < k_end {
            let cols = bk.min(k_end - k0);
            let s = &mut scores[..cols * rows];
            let k_t = MatRef::new(kt, head * d * nk + k0, d, cols, nk, 1)?;
            gemm(
                dm.scale,
                q_h,
                k_t,
                0.0,
                MatMut::new(s, 0, rows, cols, 1, rows)?,
            )?;
            if dm.causal && k0 + cols > q0 + 1 {
                // Key k0 + j is after query q0 + i when i < k0 + j - q0.
                for (j, key) in s.chunks_exact_mut(rows).enumerate() {
                    let first_seen = (k0 + j).saturating_sub(q0).min(rows);
                    key[..first_seen].fill(f32::NEG_INFINITY);
                }
            }
            online_softmax_block(s, rows, row_max, row_sum, &mut acc, dv);
            let p = MatRef::new(s, 0, rows, cols, 1, rows)?;
            let v_blk = MatRef::new(v, (bi * nk + k0) * vc + h * dv, cols, dv, vc, 1)?;
            gemm(1.0, p, v_blk, 1.0, MatMut::row_major(&mut acc, rows, dv)?)?;
            k0 += cols;
        }
        for (i, arow) in acc.chunks_exact(dv).enumerate() {
            // A query that never saw a finite score has sum 0 and a zero accumulator: output 0.
            let inv = if row_sum[i] > 0.0 {
                (1.0 / row_sum[i]) as f32
            } else {
                0.0
            };
            let o = &mut tile[i * vc + h * dv..i * vc + (h + 1) * dv];
            for (o, &a) in o.iter_mut().zip(arow) {
                *o = a * inv;
            }
        }
    }
    Ok(())
}

/// One key block of the online softmax for `rows` queries: turns the key-major scores `s`
/// (`[keys, rows]`) into weights `exp(s - m)` for each query's new running maximum `m`, and
/// rescales the running sums and the output accumulator `acc` (`[rows, dv]`) from the old
/// maximum to the new one. Scores of `-inf` get weight exactly 0; a query with no finite score
/// yet keeps sum 0.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn online_softmax_block(
    s: &mut [f32],
    rows: usize,
    max: &mut [f32],
    sum: &mut [f64],
    acc: &mut [f32],
    dv: usize,
) {
    let mut m = [f32::NEG_INFINITY; BQ];
    let m = &mut m[..rows];
    m.copy_from_slice(max);
    for key in s.chunks_exact(rows) {
        for (m, &x) in m.iter_mut().zip(key) {
            // NaNs are skipped here; they reach the output through exp.
            *m = if x > *m { x } else { *m };
        }
    }
    for (i, (arow, (old, new))) in acc
        .chunks_exact_mut(dv)
        .zip(max.iter_mut().zip(m.iter_mut()))
        .enumerate()
    {
        let seen = *new;
        // Subtracting a finite stand-in for a -inf maximum keeps exp(-inf - m) = 0, not NaN.
        if *new == f32::NEG_INFINITY {
            *new = 0.0;
        }
        // exp(-inf) = 0 on the first block; exactly 1 when the maximum did not grow.
        let alpha = exp_nonpositive_f32(*old - *new);
        if alpha != 1.0 {
            arow.iter_mut().for_each(|a| *a *= alpha);
            sum[i] *= alpha as f64;
        }
        *old = seen;
    }
    // Sums in f32 over runs of a few keys (so exp stays in f32 lanes), then in f64.
    const RUN: usize = 16;
    let mut block_sum = [0.0f64; BQ];
    let block_sum = &mut block_sum[..rows];
    for run in s.chunks_mut(RUN * rows) {
        let mut part = [0.0f32; BQ];
        let part = &mut part[..rows];
        for key in run.chunks_exact_mut(rows) {
            for ((x, &m), p) in key.iter_mut().zip(m.iter()).zip(part.iter_mut()) {
                *x = exp_nonpositive_f32(*x - m);
                *p += *x;
            }
        }
        for (b, &p) in block_sum.iter_mut().zip(part.iter()) {
            *b += p as f64;
        }
    }
    for (s, b) in sum.iter_mut().zip(block_sum.iter()) {
        *s += b;
    }
}
