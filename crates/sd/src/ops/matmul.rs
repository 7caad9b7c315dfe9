//! Matrix and batched matrix products.

use super::gemm::{gemm, MatMut, MatRef};
use crate::tensor::{OpError, OpResult, Tensor};

/// `a · b` for `a [..., m, k]` and `b [..., k, n]` (like `torch.matmul` without broadcasting
/// except that a 2-d `b` is shared by every batch of `a`). Leading dims must match exactly.
pub fn matmul(a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
    let (ar, br) = (a.rank(), b.rank());
    let shape_err = || {
        OpError::shape(
            "matmul",
            "a [..., m, k] and b [..., k, n] (or b [k, n]) with equal leading dims",
            format!("a {:?}, b {:?}", a.shape(), b.shape()),
        )
    };
    if ar < 2 || br < 2 || (br != 2 && br != ar) {
        return Err(shape_err());
    }
    let (m, k) = (a.shape()[ar - 2], a.shape()[ar - 1]);
    let (kb, n) = (b.shape()[br - 2], b.shape()[br - 1]);
    if k != kb || (br == ar && a.shape()[..ar - 2] != b.shape()[..br - 2]) {
        return Err(shape_err());
    }
    let batch: usize = a.shape()[..ar - 2].iter().product();
    let mut out_shape = a.shape()[..ar - 2].to_vec();
    out_shape.extend([m, n]);
    let mut out = vec![0.0f32; batch * m * n];
    let b_step = if br == 2 { 0 } else { k * n };
    for i in 0..batch {
        gemm(
            1.0,
            MatRef::new(a.data(), i * m * k, m, k, k, 1)?,
            MatRef::new(b.data(), i * b_step, k, n, n, 1)?,
            0.0,
            MatMut::new(&mut out, i * m * n, m, n, n, 1)?,
        )?;
    }
    Tensor::new(out_shape, out)
}
