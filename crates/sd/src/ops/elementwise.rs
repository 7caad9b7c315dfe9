//! Element-wise arithmetic, broadcasts SD needs, channel concat and means.

use crate::tensor::{OpError, OpResult, Tensor};

fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> OpResult<()> {
    if a.shape() == b.shape() {
        Ok(())
    } else {
        Err(OpError::shape(
            op,
            format!("operands of equal shape {:?}", a.shape()),
            format!("{:?}", b.shape()),
        ))
    }
}

/// `a + b` for equal shapes (residual connections).
pub fn add(a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
    let mut out = a.clone();
    add_assign(&mut out, b)?;
    Ok(out)
}

/// `a += b` for equal shapes.
pub fn add_assign(a: &mut Tensor, b: &Tensor) -> OpResult<()> {
    same_shape("add", a, b)?;
    for (x, y) in a.data_mut().iter_mut().zip(b.data()) {
        *x += y;
    }
    Ok(())
}

/// `a * b` for equal shapes.
pub fn mul(a: &Tensor, b: &Tensor) -> OpResult<Tensor> {
    same_shape("mul", a, b)?;
    let data = a.data().iter().zip(b.data()).map(|(x, y)| x * y).collect();
    Tensor::new(a.shape(), data)
}

/// `x * s`.
pub fn scale(x: &Tensor, s: f32) -> Tensor {
    let mut out = x.clone();
    out.data_mut().iter_mut().for_each(|v| *v *= s);
    out
}

/// `x + b[:, :, None, None]`: adds `b [n, c]` (e.g. a ResNet block's time embedding) or `b [c]`
/// (a bias) to every spatial position of `x [n, c, ...]`.
pub fn add_channel_bias(x: &Tensor, b: &Tensor) -> OpResult<Tensor> {
    let err = || {
        OpError::shape(
            "add_channel_bias",
            format!("bias [n, c] or [c] for input {:?}", x.shape()),
            format!("bias {:?}", b.shape()),
        )
    };
    if x.rank() < 2 {
        return Err(err());
    }
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let per_sample = match b.shape() {
        [bn, bc] if *bn == n && *bc == c => true,
        [bc] if *bc == c => false,
        _ => return Err(err()),
    };
    let spatial: usize = x.shape()[2..].iter().product();
    let mut out = x.clone();
    for (i, plane) in out.data_mut().chunks_mut(spatial.max(1)).enumerate() {
        let bv = b.data()[if per_sample { i } else { i % c }];
        plane.iter_mut().for_each(|v| *v += bv);
    }
    Ok(out)
}

/// `torch.cat(tensors, dim=1)`: UNet skip connections on NCHW tensors.
pub fn cat_channels(tensors: &[&Tensor]) -> OpResult<Tensor> {
    Tensor::concat(tensors, 1)
}

/// `x.mean(dim)` (the dim is removed), accumulated in f64.
pub fn mean_dim(x: &Tensor, dim: usize) -> OpResult<Tensor> {
    let size = x.dim(dim)?;
    if size == 0 {
        return Err(OpError::shape(
            "mean_dim",
            format!("a non-empty dim {dim}"),
            format!("shape {:?}", x.shape()),
        ));
    }
    let outer: usize = x.shape()[..dim].iter().product();
    let inner: usize = x.shape()[dim + 1..].iter().product();
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        let block = &x.data()[o * size * inner..(o + 1) * size * inner];
        out.extend((0..inner).map(|i| {
            let s: f64 = (0..size).map(|k| block[k * inner + i] as f64).sum();
            (s / size as f64) as f32
        }));
    }
    let mut shape = x.shape().to_vec();
    shape.remove(dim);
    Tensor::new(shape, out)
}
