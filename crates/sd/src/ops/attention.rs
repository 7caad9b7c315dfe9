//! Multi-head scaled-dot-product attention in diffusers' `[batch, seq, heads * head_dim]` layout.

use super::gemm::{gemm, MatMut, MatRef};
use super::softmax::softmax_rows_inplace;
use crate::tensor::{OpError, OpResult, Tensor};

/// Upper bound on the score block held at once, in f32 elements (16 MiB): long sequences are
/// processed in bands of query rows (a 4096-token self-attention would otherwise need 64 MiB per
/// head).
const MAX_SCORE_ELEMS: usize = 4 << 20;

/// `softmax(q·kᵀ / sqrt(d)) · v` per head for `q [b, nq, heads*d]`, `k [b, nk, heads*d]`,
/// `v [b, nk, heads*dv]`; returns `[b, nq, heads*dv]` (diffusers `AttnProcessor2_0` semantics,
/// no mask, no dropout). Head `h` uses channels `h*d..(h+1)*d`.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> OpResult<Tensor> {
    attention_banded(q, k, v, heads, MAX_SCORE_ELEMS)
}

/// [`scaled_dot_product_attention`] with the score block capped at `max_scores` elements.
fn attention_banded(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    max_scores: usize,
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
        && v.shape()[1] == nk;
    if !ok {
        return Err(OpError::shape(
            "attention",
            format!("q [b, nq, {heads}*d], k [b, nk, {heads}*d], v [b, nk, {heads}*dv]"),
            format!("q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape()),
        ));
    }
    let (d, dv) = (qc / heads, vc / heads);
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0.0f32; b * nq * vc];
    if nk == 0 || nq == 0 {
        return Tensor::new([b, nq, vc], out);
    }
    let band = (max_scores / nk).clamp(1, nq);
    let mut scores = vec![0.0f32; band * nk];
    for bi in 0..b {
        for h in 0..heads {
            let k_t = MatRef::new(k.data(), bi * nk * kc + h * d, d, nk, 1, kc)?;
            let v_h = MatRef::new(v.data(), bi * nk * vc + h * dv, nk, dv, vc, 1)?;
            let mut q0 = 0;
            while q0 < nq {
                let rows = band.min(nq - q0);
                let s = &mut scores[..rows * nk];
                let q_h = MatRef::new(q.data(), (bi * nq + q0) * qc + h * d, rows, d, qc, 1)?;
                gemm(scale, q_h, k_t, 0.0, MatMut::row_major(s, rows, nk)?)?;
                softmax_rows_inplace(s, nk)?;
                let o_h = MatMut::new(&mut out, (bi * nq + q0) * vc + h * dv, rows, dv, vc, 1)?;
                gemm(1.0, MatRef::row_major(s, rows, nk)?, v_h, 0.0, o_h)?;
                q0 += rows;
            }
        }
    }
    Tensor::new([b, nq, vc], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banding_does_not_change_bits() {
        let mk = |n: usize, c: usize, seed: usize| {
            let data = (0..2 * n * c)
                .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            Tensor::new([2, n, c], data).unwrap()
        };
        let (q, k, v) = (mk(37, 12, 1), mk(23, 12, 2), mk(23, 8, 3));
        let whole = attention_banded(&q, &k, &v, 4, usize::MAX).unwrap();
        for cap in [1, 23 * 5] {
            let banded = attention_banded(&q, &k, &v, 4, cap).unwrap();
            assert_eq!(banded.data(), whole.data(), "cap {cap}");
        }
    }
}
