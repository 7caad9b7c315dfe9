//! Fully connected layer, PyTorch `nn.Linear` semantics.

use super::gemm::{gemm, MatMut, MatRef};
use crate::tensor::{OpError, OpResult, Tensor};

/// Checks `linear`'s operands; returns `(out, in, rows)`.
pub(crate) fn check_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> OpResult<(usize, usize, usize)> {
    weight.expect_rank("linear", 2, "weight [out, in]")?;
    let (out_f, in_f) = (weight.shape()[0], weight.shape()[1]);
    if x.rank() == 0 || x.shape()[x.rank() - 1] != in_f {
        return Err(OpError::shape(
            "linear",
            format!("input [..., {in_f}] for weight {:?}", weight.shape()),
            format!("input {:?}", x.shape()),
        ));
    }
    if let Some(b) = bias {
        b.expect_shape("linear bias", &[out_f])?;
    }
    Ok((out_f, in_f, x.numel() / in_f.max(1)))
}

/// `x · weightᵀ + bias` for `x [..., in]`, `weight [out, in]`, `bias [out]`; returns `[..., out]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> OpResult<Tensor> {
    let (out_f, in_f, rows) = check_linear(x, weight, bias)?;
    let mut out = match bias {
        // Start from the bias and accumulate into it (beta = 1): saves a pass over the output.
        Some(b) => b.data().repeat(rows),
        None => vec![0.0f32; rows * out_f],
    };
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    gemm(
        1.0,
        MatRef::row_major(x.data(), rows, in_f)?,
        MatRef::row_major(weight.data(), out_f, in_f)?.t(),
        beta,
        MatMut::row_major(&mut out, rows, out_f)?,
    )?;
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = out_f;
    }
    Tensor::new(shape, out)
}
