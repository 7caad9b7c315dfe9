//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D` (shared by the UNet and the VAE).
//!
//! Each `forward` takes the acquired [`Weights`] of the group that holds the module and a key
//! prefix inside that group (`""` when the group is the module itself, e.g. `"resnets.0."` when a
//! group holds a whole block), so callers choose the group granularity.

use crate::backend::{Backend, CpuBackend};
use crate::error::{Error, Result};
use crate::exec::Weights;
use crate::ops::{Activation, Conv2dParams};
use crate::tensor::Tensor;
use crate::weights::WeightGroup;

/// A weight name and the shape the config implies for it.
pub type WeightShape = (String, Vec<usize>);

/// `ResnetBlock2D` with `time_embedding_norm="default"` and SiLU: norm1, silu, conv1,
/// (+ time_emb_proj(silu(temb)) per channel), norm2, silu, (dropout: no-op), conv2,
/// `(shortcut(x) + h) / output_scale_factor`.
#[derive(Clone, Debug, PartialEq)]
pub struct ResnetBlock2D {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Width of the time embedding fed to `time_emb_proj`; `None` = the block has none (VAE).
    pub temb_channels: Option<usize>,
    /// Groups of `norm1`.
    pub groups: usize,
    /// Groups of `norm2`.
    pub groups_out: usize,
    /// GroupNorm epsilon (both norms).
    pub eps: f32,
    /// The sum with the shortcut is divided by this.
    pub output_scale_factor: f32,
    /// Whether the shortcut is a 1×1 `conv_shortcut` (diffusers: when in != out).
    pub use_conv_shortcut: bool,
}

fn key(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

/// A convolution `{name}.weight [out, in, k, k]` + `{name}.bias [out]` from `w`.
fn conv_on<B: Backend, W: WeightGroup<B>>(
    b: &B,
    w: &W,
    prefix: &str,
    name: &str,
    x: &B::Tensor,
    (cin, cout, k): (usize, usize, usize),
    params: Conv2dParams,
) -> Result<B::Tensor> {
    let weight = w.get_shaped(&key(prefix, &format!("{name}.weight")), &[cout, cin, k, k])?;
    let bias = w.get_shaped(&key(prefix, &format!("{name}.bias")), &[cout])?;
    b.conv2d(x, weight, Some(bias), params)
}

/// GroupNorm `{name}.weight`/`{name}.bias [c]` from `w`, optionally followed by SiLU.
pub(crate) fn norm_on<B: Backend, W: WeightGroup<B>>(
    b: &B,
    w: &W,
    prefix: &str,
    name: &str,
    x: &B::Tensor,
    (c, groups, eps): (usize, usize, f32),
    silu: bool,
) -> Result<B::Tensor> {
    let weight = w.get_shaped(&key(prefix, &format!("{name}.weight")), &[c])?;
    let bias = w.get_shaped(&key(prefix, &format!("{name}.bias")), &[c])?;
    b.group_norm(x, groups, Some(weight), Some(bias), eps, silu)
}

/// Checks that `shape` is `[n, channels, h, w]`, naming the module in the error.
fn expect_channels(module: &str, shape: &[usize], channels: usize) -> Result<()> {
    if shape.len() == 4 && shape[1] == channels {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{module}: expected input [n, {channels}, h, w], found {shape:?}"
        )))
    }
}

impl ResnetBlock2D {
    /// A block as diffusers builds it by default: `groups_out = groups`, output scale 1, a conv
    /// shortcut exactly when `in_channels != out_channels`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f32,
    ) -> Self {
        ResnetBlock2D {
            in_channels,
            out_channels,
            temb_channels,
            groups,
            groups_out: groups,
            eps,
            output_scale_factor: 1.0,
            use_conv_shortcut: in_channels != out_channels,
        }
    }

    /// The weights the block reads (names relative to its module prefix) and their shapes.
    pub fn weight_shapes(&self) -> Vec<WeightShape> {
        let (i, o) = (self.in_channels, self.out_channels);
        let mut v = vec![
            ("norm1.weight".to_string(), vec![i]),
            ("norm1.bias".to_string(), vec![i]),
            ("conv1.weight".to_string(), vec![o, i, 3, 3]),
            ("conv1.bias".to_string(), vec![o]),
        ];
        if let Some(t) = self.temb_channels {
            v.push(("time_emb_proj.weight".to_string(), vec![o, t]));
            v.push(("time_emb_proj.bias".to_string(), vec![o]));
        }
        v.extend([
            ("norm2.weight".to_string(), vec![o]),
            ("norm2.bias".to_string(), vec![o]),
            ("conv2.weight".to_string(), vec![o, o, 3, 3]),
            ("conv2.bias".to_string(), vec![o]),
        ]);
        if self.use_conv_shortcut {
            v.push(("conv_shortcut.weight".to_string(), vec![o, i, 1, 1]));
            v.push(("conv_shortcut.bias".to_string(), vec![o]));
        }
        v
    }

    /// Runs the block on `x [n, in, h, w]` with weights `w` under `prefix`; `temb [n, temb_channels]`
    /// is required exactly when the block has a `time_emb_proj`.
    pub fn forward(
        &self,
        w: &Weights,
        prefix: &str,
        x: &Tensor,
        temb: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_on(&CpuBackend::new(), w, prefix, x, temb)
    }

    /// [`ResnetBlock2D::forward`] on backend `b`; only the output survives the block's
    /// temporaries.
    pub fn forward_on<B: Backend, W: WeightGroup<B>>(
        &self,
        b: &B,
        w: &W,
        prefix: &str,
        x: &B::Tensor,
        temb: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        let (i, o) = (self.in_channels, self.out_channels);
        let xs = b.shape(x);
        expect_channels(w.name(), xs, i)?;
        let n = xs[0];
        let m = b.mark();
        let h = norm_on(b, w, prefix, "norm1", x, (i, self.groups, self.eps), true)?;
        let mut h = conv_on(
            b,
            w,
            prefix,
            "conv1",
            &h,
            (i, o, 3),
            Conv2dParams::new(1, 1),
        )?;
        match (self.temb_channels, temb) {
            (Some(tc), Some(t)) => {
                if b.shape(t) != [n, tc] {
                    return Err(Error::InvalidArgument(format!(
                        "{}: expected time embedding [{n}, {tc}], found {:?}",
                        w.name(),
                        b.shape(t)
                    )));
                }
                let pw = w.get_shaped(&key(prefix, "time_emb_proj.weight"), &[o, tc])?;
                let pb = w.get_shaped(&key(prefix, "time_emb_proj.bias"), &[o])?;
                let t = b.linear(&b.activation(Activation::Silu, t)?, pw, Some(pb))?;
                h = b.add_channel_bias(&h, &t)?;
            }
            (None, None) => {}
            (Some(tc), None) => {
                return Err(Error::InvalidArgument(format!(
                    "{}: the block has a time_emb_proj and needs a time embedding [n, {tc}], none given",
                    w.name()
                )))
            }
            (None, Some(_)) => {
                return Err(Error::InvalidArgument(format!(
                    "{}: the block has no time_emb_proj, but a time embedding was given",
                    w.name()
                )))
            }
        }
        // Keeping each conv's output frees the norm before it: one copy of the (smaller) conv
        // output buys back a full-size temporary, which sets the VAE decoder's peak.
        let h = b.keep(m, h)?;
        let h = norm_on(
            b,
            w,
            prefix,
            "norm2",
            &h,
            (o, self.groups_out, self.eps),
            true,
        )?;
        let h = conv_on(
            b,
            w,
            prefix,
            "conv2",
            &h,
            (o, o, 3),
            Conv2dParams::new(1, 1),
        )?;
        let h = b.keep(m, h)?;
        let out = if self.use_conv_shortcut {
            let s = conv_on(
                b,
                w,
                prefix,
                "conv_shortcut",
                x,
                (i, o, 1),
                Conv2dParams::default(),
            )?;
            b.add(&s, &h)?
        } else {
            b.add(x, &h)?
        };
        let out = if self.output_scale_factor != 1.0 {
            // diffusers divides; multiplying by the reciprocal is exact for the powers of two
            // SD configs use (1, and 2 in some upscalers).
            b.scale(&out, 1.0 / self.output_scale_factor)?
        } else {
            out
        };
        b.keep(m, out)
    }
}

/// `Downsample2D` with `use_conv=True`: a 3×3 stride-2 `conv`. With `padding = 0` (the VAE
/// encoder) the input is first padded by one on the right and bottom, as diffusers does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Downsample2D {
    /// Input channels.
    pub channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Convolution padding (1 in the UNet, 0 in the VAE encoder).
    pub padding: usize,
}

impl Downsample2D {
    /// The weights it reads (relative to its module prefix) and their shapes.
    pub fn weight_shapes(&self) -> Vec<WeightShape> {
        vec![
            (
                "conv.weight".to_string(),
                vec![self.out_channels, self.channels, 3, 3],
            ),
            ("conv.bias".to_string(), vec![self.out_channels]),
        ]
    }

    /// Runs it on `x [n, channels, h, w]` with weights `w` under `prefix`.
    pub fn forward(&self, w: &Weights, prefix: &str, x: &Tensor) -> Result<Tensor> {
        self.forward_on(&CpuBackend::new(), w, prefix, x)
    }

    /// [`Downsample2D::forward`] on backend `b`.
    pub fn forward_on<B: Backend, W: WeightGroup<B>>(
        &self,
        b: &B,
        w: &W,
        prefix: &str,
        x: &B::Tensor,
    ) -> Result<B::Tensor> {
        expect_channels(w.name(), b.shape(x), self.channels)?;
        let p = self.padding;
        let padding = if p == 0 { [0, 1, 0, 1] } else { [p; 4] };
        let params = Conv2dParams {
            stride: (2, 2),
            padding,
        };
        conv_on(
            b,
            w,
            prefix,
            "conv",
            x,
            (self.channels, self.out_channels, 3),
            params,
        )
    }
}

/// `Upsample2D` with `use_conv=True`: nearest-neighbour ×2, then a 3×3 `conv` (padding 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upsample2D {
    /// Input channels.
    pub channels: usize,
    /// Output channels.
    pub out_channels: usize,
}

impl Upsample2D {
    /// The weights it reads (relative to its module prefix) and their shapes.
    pub fn weight_shapes(&self) -> Vec<WeightShape> {
        vec![
            (
                "conv.weight".to_string(),
                vec![self.out_channels, self.channels, 3, 3],
            ),
            ("conv.bias".to_string(), vec![self.out_channels]),
        ]
    }

    /// Runs it on `x [n, channels, h, w]`, giving `[n, out_channels, 2h, 2w]`.
    pub fn forward(&self, w: &Weights, prefix: &str, x: &Tensor) -> Result<Tensor> {
        self.forward_on(&CpuBackend::new(), w, prefix, x, None)
    }

    /// [`Upsample2D::forward`] on backend `b`; with `size = Some((h, w))` the input is resized
    /// (nearest) to exactly that size instead of doubled (diffusers' `output_size`, used when a
    /// UNet skip connection has an odd size).
    pub fn forward_on<B: Backend, W: WeightGroup<B>>(
        &self,
        b: &B,
        w: &W,
        prefix: &str,
        x: &B::Tensor,
        size: Option<(usize, usize)>,
    ) -> Result<B::Tensor> {
        expect_channels(w.name(), b.shape(x), self.channels)?;
        let m = b.mark();
        let up = match size {
            Some((h, ww)) => b.resize_nearest(x, h, ww)?,
            None => b.upsample_nearest2x(x)?,
        };
        let out = conv_on(
            b,
            w,
            prefix,
            "conv",
            &up,
            (self.channels, self.out_channels, 3),
            Conv2dParams::new(1, 1),
        )?;
        b.keep(m, out)
    }
}
