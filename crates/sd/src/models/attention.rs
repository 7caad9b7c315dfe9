//! diffusers' attention modules: `Attention` (self or cross, optionally with the VAE's group norm,
//! residual and output rescale), `FeedForward` with GEGLU, `BasicTransformerBlock` and
//! `Transformer2DModel` (continuous inputs), with the checkpoint's weight names.
//!
//! `Attention`, `FeedForward` and `BasicTransformerBlock` read their weights from an acquired
//! [`Weights`] group under a key prefix; `Transformer2DModel` acquires its own groups (see
//! [`Transformer2DConfig::groups`]) one at a time, so a budget need only hold one transformer block.

use crate::backend::{Backend, CpuBackend};
use crate::error::{Error, Result};
use crate::exec::{Executor, Weights};
use crate::models::resnet::WeightShape;
use crate::ops::Conv2dParams;
use crate::tensor::Tensor;
use crate::weights::{WeightGroup, WeightSource};

/// Joins a key prefix (`""` or ending in `.`) and a key.
fn key(prefix: &str, k: &str) -> String {
    format!("{prefix}{k}")
}

/// `[b, c, h, w]` -> `[b, h*w, c]` (diffusers' `permute(0, 2, 3, 1).reshape(b, h*w, c)`).
pub fn nchw_to_tokens(x: &Tensor) -> Result<Tensor> {
    x.expect_rank("nchw_to_tokens", 4, "[b, c, h, w]")?;
    let s = x.shape();
    let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
    Ok(x.permute(&[0, 2, 3, 1])?.reshape([b, h * w, c])?)
}

/// `[b, h*w, c]` -> `[b, c, h, w]`.
pub fn tokens_to_nchw(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    x.expect_rank("tokens_to_nchw", 3, "[b, h*w, c]")?;
    let (b, c) = (x.shape()[0], x.shape()[2]);
    Ok(x.transpose(1, 2)?.reshape([b, c, h, w])?)
}

/// Group normalisation applied before attention (the VAE mid-block's `group_norm`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupNormSpec {
    /// Number of groups.
    pub groups: usize,
    /// Epsilon.
    pub eps: f32,
}

/// A diffusers `Attention` module: `to_q`, `to_k`, `to_v`, `to_out.0` (and optional `group_norm`).
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionConfig {
    /// Channels of the query input (and of the output).
    pub query_dim: usize,
    /// Channels of the context for cross-attention; `None` for self-attention.
    pub cross_attention_dim: Option<usize>,
    /// Number of heads.
    pub heads: usize,
    /// Channels per head.
    pub dim_head: usize,
    /// Whether `to_q`/`to_k`/`to_v` have biases (`to_out.0` always has one).
    pub bias: bool,
    /// Group norm over the (NCHW) input before the projections.
    pub group_norm: Option<GroupNormSpec>,
    /// Add the input to the output.
    pub residual_connection: bool,
    /// The output is divided by this.
    pub rescale_output_factor: f32,
}

impl AttentionConfig {
    /// The UNet transformer's attention: no q/k/v bias, no norm, no residual.
    pub fn transformer(
        query_dim: usize,
        cross_attention_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
    ) -> Self {
        AttentionConfig {
            query_dim,
            cross_attention_dim,
            heads,
            dim_head,
            bias: false,
            group_norm: None,
            residual_connection: false,
            rescale_output_factor: 1.0,
        }
    }

    /// `heads * dim_head`.
    pub fn inner_dim(&self) -> usize {
        self.heads * self.dim_head
    }

    /// The weights it reads (names relative to its module prefix) and their shapes.
    pub fn weight_shapes(&self) -> Vec<WeightShape> {
        let (qd, inner) = (self.query_dim, self.inner_dim());
        let kv = self.cross_attention_dim.unwrap_or(qd);
        let mut v = Vec::new();
        if self.group_norm.is_some() {
            v.push(("group_norm.weight".to_string(), vec![qd]));
            v.push(("group_norm.bias".to_string(), vec![qd]));
        }
        for (name, in_dim) in [("to_q", qd), ("to_k", kv), ("to_v", kv)] {
            v.push((format!("{name}.weight"), vec![inner, in_dim]));
            if self.bias {
                v.push((format!("{name}.bias"), vec![inner]));
            }
        }
        v.push(("to_out.0.weight".to_string(), vec![qd, inner]));
        v.push(("to_out.0.bias".to_string(), vec![qd]));
        v
    }

    /// Runs the module on `x` (`[b, n, query_dim]`, or `[b, query_dim, h, w]` which is flattened
    /// to tokens and restored, as diffusers does) attending to `context` (`[b, m, cross_dim]`) or
    /// to itself. Weights are read from `w` under `prefix` (`""` or ending in `.`).
    pub fn forward(
        &self,
        w: &Weights<'_>,
        prefix: &str,
        x: &Tensor,
        context: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_on(&CpuBackend::new(), w, prefix, x, context)
    }

    /// [`AttentionConfig::forward`] on backend `b`; only the output survives the module's
    /// temporaries.
    pub fn forward_on<B: Backend, W: WeightGroup<B>>(
        &self,
        b: &B,
        w: &W,
        prefix: &str,
        x: &B::Tensor,
        context: Option<&B::Tensor>,
    ) -> Result<B::Tensor> {
        let (qd, inner) = (self.query_dim, self.inner_dim());
        let kv_dim = self.cross_attention_dim.unwrap_or(qd);
        let spatial = match *b.shape(x) {
            [_, _, h, ww] => Some((h, ww)),
            [_, _, _] => None,
            ref s => {
                return Err(Error::InvalidArgument(format!(
                    "{}: expected input [batch, tokens, channels] or [batch, channels, h, w], \
                     found {s:?}",
                    w.name()
                )))
            }
        };
        let m = b.mark();
        let h = match (self.group_norm, spatial) {
            (Some(g), _) => {
                let wt = w.get_shaped(&key(prefix, "group_norm.weight"), &[qd])?;
                let bs = w.get_shaped(&key(prefix, "group_norm.bias"), &[qd])?;
                match spatial {
                    Some(_) => {
                        let y = b.group_norm(x, g.groups, Some(wt), Some(bs), g.eps, false)?;
                        b.nchw_to_tokens(&y)?
                    }
                    None => {
                        // [b, n, c] -> [b, c, n, 1] for the norm over channels, and back.
                        let n = b.shape(x)[1];
                        let t = b.tokens_to_nchw(x, n, 1)?;
                        let y = b.group_norm(&t, g.groups, Some(wt), Some(bs), g.eps, false)?;
                        b.nchw_to_tokens(&y)?
                    }
                }
            }
            (None, Some(_)) => b.nchw_to_tokens(x)?,
            (None, None) => x.clone(),
        };
        let ctx = context.unwrap_or(&h);
        let proj = |name: &str, input: &B::Tensor, in_dim: usize| -> Result<B::Tensor> {
            let wt = w.get_shaped(&key(prefix, &format!("{name}.weight")), &[inner, in_dim])?;
            let bias = if self.bias {
                Some(w.get_shaped(&key(prefix, &format!("{name}.bias")), &[inner])?)
            } else {
                None
            };
            b.linear(input, wt, bias)
        };
        let q = proj("to_q", &h, qd)?;
        let k = proj("to_k", ctx, kv_dim)?;
        let v = proj("to_v", ctx, kv_dim)?;
        let a = b.attention(&q, &k, &v, self.heads, false)?;
        let ow = w.get_shaped(&key(prefix, "to_out.0.weight"), &[qd, inner])?;
        let ob = w.get_shaped(&key(prefix, "to_out.0.bias"), &[qd])?;
        let mut out = b.linear(&a, ow, Some(ob))?;
        if let Some((hh, ww)) = spatial {
            out = b.tokens_to_nchw(&out, hh, ww)?;
        }
        if self.residual_connection {
            out = b.add(&out, x)?;
        }
        if self.rescale_output_factor != 1.0 {
            // diffusers divides; multiplying by the reciprocal is exact for powers of two (SD
            // uses 1).
            out = b.scale(&out, 1.0 / self.rescale_output_factor)?;
        }
        b.keep(m, out)
    }
}

/// diffusers `FeedForward` with `activation_fn="geglu"`: `net.0.proj` (GEGLU), `net.2` (linear).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedForwardConfig {
    /// Input and output channels.
    pub dim: usize,
    /// Hidden channels (`dim * 4` in SD).
    pub inner_dim: usize,
}

impl FeedForwardConfig {
    /// The weights it reads (relative to its module prefix) and their shapes.
    pub fn weight_shapes(&self) -> Vec<WeightShape> {
        let (d, f) = (self.dim, self.inner_dim);
        vec![
            ("net.0.proj.weight".to_string(), vec![2 * f, d]),
            ("net.0.proj.bias".to_string(), vec![2 * f]),
            ("net.2.weight".to_string(), vec![d, f]),
            ("net.2.bias".to_string(), vec![d]),
        ]
    }

    /// Runs the feed-forward on `x [b, n, dim]`, weights under `prefix`.
    pub fn forward(&self, w: &Weights<'_>, prefix: &str, x: &Tensor) -> Result<Tensor> {
        self.forward_on(&CpuBackend::new(), w, prefix, x)
    }

    /// [`FeedForwardConfig::forward`] on backend `b`.
    pub fn forward_on<B: Backend, W: WeightGroup<B>>(
        &self,
        b: &B,
        w: &W,
        prefix: &str,
        x: &B::Tensor,
    ) -> Result<B::Tensor> {
        let (d, f) = (self.dim, self.inner_dim);
        let m = b.mark();
        let pw = w.get_shaped(&key(prefix, "net.0.proj.weight"), &[2 * f, d])?;
        let pb = w.get_shaped(&key(prefix, "net.0.proj.bias"), &[2 * f])?;
        let h = b.geglu(x, pw, Some(pb))?;
        let ow = w.get_shaped(&key(prefix, "net.2.weight"), &[d, f])?;
        let ob = w.get_shaped(&key(prefix, "net.2.bias"), &[d])?;
        let out = b.linear(&h, ow, Some(ob))?;
        b.keep(m, out)
    }
}

/// diffusers `BasicTransformerBlock` (layer norms, self-attention `attn1`, cross-attention `attn2`,
/// GEGLU feed-forward `ff`, each with a residual).
#[derive(Clone, Debug, PartialEq)]
pub struct BasicTransformerBlockConfig {
    /// Channels of the token stream.
    pub dim: usize,
    /// Number of heads.
    pub heads: usize,
    /// Channels per head.
    pub dim_head: usize,
    /// Context channels of `attn2`.
    pub cross_attention_dim: usize,
    /// Layer norm epsilon (1e-5 in SD).
    pub norm_eps: f32,
}

impl BasicTransformerBlockConfig {
    fn parts(&self) -> (AttentionConfig, AttentionConfig, FeedForwardConfig) {
        (
            AttentionConfig::transformer(self.dim, None, self.heads, self.dim_head),
            AttentionConfig::transformer(
                self.dim,
                Some(self.cross_attention_dim),
                self.heads,
                self.dim_head,
            ),
            FeedForwardConfig {
                dim: self.dim,
                inner_dim: self.dim * 4,
            },
        )
    }

    /// The weights it reads (relative to its module prefix) and their shapes.
    pub fn weight_shapes(&self) -> Vec<WeightShape> {
        let (attn1, attn2, ff) = self.parts();
        let mut v = Vec::new();
        for n in ["norm1", "norm2", "norm3"] {
            v.push((format!("{n}.weight"), vec![self.dim]));
            v.push((format!("{n}.bias"), vec![self.dim]));
        }
        let sub = |p: &str, shapes: Vec<WeightShape>| {
            shapes
                .into_iter()
                .map(move |(k, s)| (format!("{p}.{k}"), s))
                .collect::<Vec<_>>()
        };
        v.extend(sub("attn1", attn1.weight_shapes()));
        v.extend(sub("attn2", attn2.weight_shapes()));
        v.extend(sub("ff", ff.weight_shapes()));
        v
    }

    fn layer_norm_on<B: Backend, W: WeightGroup<B>>(
        &self,
        b: &B,
        w: &W,
        prefix: &str,
        name: &str,
        x: &B::Tensor,
    ) -> Result<B::Tensor> {
        let wt = w.get_shaped(&key(prefix, &format!("{name}.weight")), &[self.dim])?;
        let bias = w.get_shaped(&key(prefix, &format!("{name}.bias")), &[self.dim])?;
        b.layer_norm(x, Some(wt), Some(bias), self.norm_eps)
    }

    /// Runs the block on `x [b, n, dim]` with `context [b, m, cross_attention_dim]`.
    pub fn forward(
        &self,
        w: &Weights<'_>,
        prefix: &str,
        x: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        self.forward_on(&CpuBackend::new(), w, prefix, x, context)
    }

    /// [`BasicTransformerBlockConfig::forward`] on backend `b`; each sub-layer's temporaries
    /// are released as it ends.
    pub fn forward_on<B: Backend, W: WeightGroup<B>>(
        &self,
        b: &B,
        w: &W,
        prefix: &str,
        x: &B::Tensor,
        context: &B::Tensor,
    ) -> Result<B::Tensor> {
        let (attn1, attn2, ff) = self.parts();
        let m = b.mark();
        let n = self.layer_norm_on(b, w, prefix, "norm1", x)?;
        let a = attn1.forward_on(b, w, &key(prefix, "attn1."), &n, None)?;
        let h = b.keep(m, b.add(x, &a)?)?;
        let n = self.layer_norm_on(b, w, prefix, "norm2", &h)?;
        let a = attn2.forward_on(b, w, &key(prefix, "attn2."), &n, Some(context))?;
        let h = b.keep(m, b.add(&h, &a)?)?;
        let n = self.layer_norm_on(b, w, prefix, "norm3", &h)?;
        let f = ff.forward_on(b, w, &key(prefix, "ff."), &n)?;
        b.keep(m, b.add(&h, &f)?)
    }
}

/// diffusers `Transformer2DModel` on continuous (NCHW) inputs: `norm` (GroupNorm, eps 1e-6),
/// `proj_in`, `transformer_blocks.*`, `proj_out`, plus the input as residual.
#[derive(Clone, Debug, PartialEq)]
pub struct Transformer2DConfig {
    /// Input and output channels.
    pub in_channels: usize,
    /// Number of heads.
    pub heads: usize,
    /// Channels per head (`heads * dim_head` is the token width).
    pub dim_head: usize,
    /// Number of `BasicTransformerBlock`s.
    pub num_layers: usize,
    /// Context channels.
    pub cross_attention_dim: usize,
    /// Groups of `norm`.
    pub norm_num_groups: usize,
    /// `proj_in`/`proj_out` are linear layers (SD 2.x, SDXL) rather than 1×1 convolutions.
    pub use_linear_projection: bool,
}

impl Transformer2DConfig {
    fn inner_dim(&self) -> usize {
        self.heads * self.dim_head
    }

    /// The weight groups of a model at module `prefix`, in forward order: `norm`, `proj_in`,
    /// each `transformer_blocks.i`, `proj_out`.
    pub fn groups(&self, prefix: &str) -> Vec<String> {
        let mut g = vec![format!("{prefix}.norm"), format!("{prefix}.proj_in")];
        g.extend((0..self.num_layers).map(|i| format!("{prefix}.transformer_blocks.{i}")));
        g.push(format!("{prefix}.proj_out"));
        g
    }

    fn block(&self) -> BasicTransformerBlockConfig {
        BasicTransformerBlockConfig {
            dim: self.inner_dim(),
            heads: self.heads,
            dim_head: self.dim_head,
            cross_attention_dim: self.cross_attention_dim,
            norm_eps: 1e-5,
        }
    }

    /// The weights it reads (relative to its module prefix) and their shapes.
    pub fn weight_shapes(&self) -> Vec<WeightShape> {
        let (c, inner) = (self.in_channels, self.inner_dim());
        let mut v = vec![
            ("norm.weight".to_string(), vec![c]),
            ("norm.bias".to_string(), vec![c]),
            ("proj_in.weight".to_string(), self.proj_shape(inner, c)),
            ("proj_in.bias".to_string(), vec![inner]),
        ];
        let block = self.block().weight_shapes();
        for i in 0..self.num_layers {
            v.extend(
                block
                    .iter()
                    .map(|(k, s)| (format!("transformer_blocks.{i}.{k}"), s.clone())),
            );
        }
        v.push(("proj_out.weight".to_string(), self.proj_shape(c, inner)));
        v.push(("proj_out.bias".to_string(), vec![c]));
        v
    }

    /// Projection weight shape: linear `[out, in]` or 1×1 conv `[out, in, 1, 1]`.
    fn proj_shape(&self, out: usize, inp: usize) -> Vec<usize> {
        if self.use_linear_projection {
            vec![out, inp]
        } else {
            vec![out, inp, 1, 1]
        }
    }

    /// Runs the model on `x [b, in_channels, h, w]` with `context [b, m, cross_attention_dim]`,
    /// acquiring the groups of module `prefix` of `component` from `exec` one at a time.
    pub fn forward(
        &self,
        exec: &Executor,
        component: &str,
        prefix: &str,
        x: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        self.forward_on(&CpuBackend::new(), exec, component, prefix, x, context)
    }

    /// [`Transformer2DConfig::forward`] on backend `b`, acquiring the groups from `src` one at
    /// a time; only the output survives the model's temporaries.
    pub fn forward_on<B: Backend, S: WeightSource<B>>(
        &self,
        b: &B,
        src: &S,
        component: &str,
        prefix: &str,
        x: &B::Tensor,
        context: &B::Tensor,
    ) -> Result<B::Tensor> {
        let (c, inner) = (self.in_channels, self.inner_dim());
        let (hh, ww) = match *b.shape(x) {
            [_, _, hh, ww] => (hh, ww),
            ref s => {
                return Err(Error::InvalidArgument(format!(
                    "Transformer2DModel {component}.{prefix}: expected input [b, c, h, w], \
                     found {s:?}"
                )))
            }
        };
        let m = b.mark();
        let normed = {
            let w = src.group(component, &format!("{prefix}.norm"))?;
            let wt = w.get_shaped("weight", &[c])?;
            let bias = w.get_shaped("bias", &[c])?;
            b.group_norm(x, self.norm_num_groups, Some(wt), Some(bias), 1e-6, false)?
        };
        let mut h = {
            let w = src.group(component, &format!("{prefix}.proj_in"))?;
            let wt = w.get_shaped("weight", &self.proj_shape(inner, c))?;
            let bias = w.get_shaped("bias", &[inner])?;
            let h = if self.use_linear_projection {
                b.linear(&b.nchw_to_tokens(&normed)?, wt, Some(bias))?
            } else {
                let y = b.conv2d(&normed, wt, Some(bias), Conv2dParams::default())?;
                b.nchw_to_tokens(&y)?
            };
            b.keep(m, h)?
        };
        let block = self.block();
        for i in 0..self.num_layers {
            let w = src.group(component, &format!("{prefix}.transformer_blocks.{i}"))?;
            h = block.forward_on(b, &w, "", &h, context)?;
            h = b.keep(m, h)?;
        }
        let w = src.group(component, &format!("{prefix}.proj_out"))?;
        let wt = w.get_shaped("weight", &self.proj_shape(c, inner))?;
        let bias = w.get_shaped("bias", &[c])?;
        let out = if self.use_linear_projection {
            b.tokens_to_nchw(&b.linear(&h, wt, Some(bias))?, hh, ww)?
        } else {
            let y = b.tokens_to_nchw(&h, hh, ww)?;
            b.conv2d(&y, wt, Some(bias), Conv2dParams::default())?
        };
        drop(w);
        let out = b.add(&out, x)?;
        b.keep(m, out)
    }
}
