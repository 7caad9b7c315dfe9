//! The CPU backend: every op is the f32 reference op of [`crate::ops`].

use super::profile::timed;
use super::Backend;
use crate::error::Result;
use crate::ops::{self, Activation, Conv2dParams};
use crate::tensor::{DType, OpError, Tensor};

/// The f32 CPU reference ops behind [`Backend`]; results are bit-identical to [`crate::ops`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl CpuBackend {
    /// The CPU backend.
    pub fn new() -> Self {
        CpuBackend
    }
}

impl Backend for CpuBackend {
    type Tensor = Tensor;
    type Mark = ();

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn upload(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn download(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn shape<'t>(&self, t: &'t Tensor) -> &'t [usize] {
        t.shape()
    }

    fn mark(&self) {}

    fn keep(&self, _mark: (), t: Tensor) -> Result<Tensor> {
        Ok(t)
    }

    fn release(&self, _mark: ()) -> Result<()> {
        Ok(())
    }

    fn linear(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let label = || format!("linear {:?} -> {:?}", x.shape(), weight.shape());
        Ok(timed(label, || ops::linear(x, weight, bias))?)
    }

    fn conv2d(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        params: Conv2dParams,
    ) -> Result<Tensor> {
        let label = || format!("conv2d x{:?} w{:?} {params:?}", x.shape(), weight.shape());
        Ok(timed(label, || ops::conv2d(x, weight, bias, params))?)
    }

    fn group_norm(
        &self,
        x: &Tensor,
        groups: usize,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
        silu: bool,
    ) -> Result<Tensor> {
        let label = || format!("group_norm silu={silu} {:?}", x.shape());
        Ok(timed(label, || {
            ops::group_norm(x, groups, weight, bias, eps, silu)
        })?)
    }

    fn layer_norm(
        &self,
        x: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        let label = || format!("layer_norm {:?}", x.shape());
        Ok(timed(label, || ops::layer_norm(x, weight, bias, eps))?)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        causal: bool,
    ) -> Result<Tensor> {
        let label = || format!("attention q{:?} k{:?} heads {heads}", q.shape(), k.shape());
        timed(label, || {
            if causal {
                Ok(causal_attention(q, k, v, heads)?)
            } else {
                Ok(ops::scaled_dot_product_attention(q, k, v, heads)?)
            }
        })
    }

    fn activation(&self, act: Activation, x: &Tensor) -> Result<Tensor> {
        timed(|| format!("{act:?} {:?}", x.shape()), || Ok(act.forward(x)))
    }

    fn geglu(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let label = || format!("geglu {:?} -> {:?}", x.shape(), weight.shape());
        Ok(timed(label, || ops::geglu(x, weight, bias))?)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok(timed(|| format!("add {:?}", a.shape()), || ops::add(a, b))?)
    }

    fn scale(&self, x: &Tensor, s: f32) -> Result<Tensor> {
        Ok(timed(
            || format!("scale {:?}", x.shape()),
            || ops::scale(x, s),
        ))
    }

    fn add_channel_bias(&self, x: &Tensor, b: &Tensor) -> Result<Tensor> {
        let label = || format!("add_channel_bias {:?}", x.shape());
        Ok(timed(label, || ops::add_channel_bias(x, b))?)
    }

    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        let label = || format!("upsample_nearest2x {:?}", x.shape());
        Ok(timed(label, || ops::upsample_nearest2x(x))?)
    }

    fn cat_channels(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let label = || format!("cat_channels {:?} {:?}", a.shape(), b.shape());
        Ok(timed(label, || ops::cat_channels(&[a, b]))?)
    }

    fn nchw_to_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let &[b, c, h, w] = x.shape() else {
            let found = format!("{:?}", x.shape());
            return Err(OpError::shape("nchw_to_tokens", "x [b, c, h, w]", found).into());
        };
        let label = || format!("nchw_to_tokens {:?}", x.shape());
        Ok(timed(label, || x.permute(&[0, 2, 3, 1]))?.reshape([b, h * w, c])?)
    }

    fn tokens_to_nchw(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let op = "tokens_to_nchw";
        let &[b, p, c] = x.shape() else {
            return Err(OpError::shape(op, "x [b, h*w, c]", format!("{:?}", x.shape())).into());
        };
        if h.checked_mul(w) != Some(p) {
            return Err(OpError::shape(
                op,
                format!("x [b, {h}*{w}, c]"),
                format!("{:?}", x.shape()),
            )
            .into());
        }
        let label = || format!("tokens_to_nchw {:?}", x.shape());
        Ok(timed(label, || x.transpose(1, 2))?.reshape([b, c, h, w])?)
    }

    fn embedding(&self, table: &Tensor, ids: &[Vec<u32>]) -> Result<Tensor> {
        let (b, n, _, d) = super::check_ids(table.shape(), ids)?;
        let mut out = Vec::with_capacity(b * n * d);
        for &id in ids.iter().flatten() {
            let id = id as usize;
            out.extend_from_slice(&table.data()[id * d..(id + 1) * d]);
        }
        Ok(Tensor::new([b, n, d], out)?)
    }

    fn gather_rows(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let (b, n, d) = super::check_rows(x.shape(), rows)?;
        let mut out = Vec::with_capacity(b * d);
        for (bi, &r) in rows.iter().enumerate() {
            let start = (bi * n + r) * d;
            out.extend_from_slice(&x.data()[start..start + d]);
        }
        Ok(Tensor::new([b, d], out)?)
    }

    fn resize_nearest(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        Ok(ops::resize_nearest(x, h, w)?)
    }

    fn reshape(&self, x: Tensor, shape: &[usize]) -> Result<Tensor> {
        super::check_reshape(x.shape(), shape)?;
        Ok(x.reshape(shape)?)
    }

    fn timestep_embedding(
        &self,
        timesteps: &[f32],
        dim: usize,
        flip_sin_to_cos: bool,
        downscale_freq_shift: f32,
    ) -> Result<Tensor> {
        Ok(ops::timestep_embedding(
            timesteps,
            dim,
            flip_sin_to_cos,
            downscale_freq_shift,
        )?)
    }
}

/// Causal multi-head attention for `q, k, v [b, n, heads*d]`: keys after each query get exactly
/// zero weight, as the additive `finfo.min` mask of transformers gives (the ops' blocked
/// attention, which skips those keys).
fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor, OpError> {
    ops::attention::causal_scaled_dot_product_attention(q, k, v, heads)
}
