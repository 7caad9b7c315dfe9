//! diffusers' `AutoencoderKL` (the SD 1.x / 2.x / XL VAE), built from its `config.json`: the
//! encoder gives the posterior's mean and std, the decoder turns latents back into images.
//!
//! Weight groups (forward order): `encoder.conv_in`, each encoder resnet and downsampler, the
//! encoder's mid-block resnets and attention, `encoder` (what is left of it: `conv_norm_out` and
//! `conv_out`), `quant_conv`; then `post_quant_conv`, `decoder.conv_in`, the decoder's mid block,
//! each decoder resnet and upsampler, and `decoder` (its `conv_norm_out` and `conv_out`).
//! Because the `encoder` / `decoder` groups catch every key the longer prefixes do not, use
//! [`Vae::check_weights`] to reject unknown keys up front.

use super::attention::{AttentionConfig, GroupNormSpec};
use super::resnet::{norm_on, Downsample2D, ResnetBlock2D, Upsample2D, WeightShape};
use crate::backend::{Backend, CpuBackend};
use crate::error::{Error, Result};
use crate::exec::{ComponentGroups, Executor};
use crate::ops::Conv2dParams;
use crate::tensor::Tensor;
use crate::weights::{WeightGroup, WeightSource};
use serde::Deserialize;
use std::path::Path;

/// GroupNorm epsilon diffusers' VAE uses everywhere (not a config field).
const VAE_EPS: f32 = 1e-6;

/// `AutoencoderKL`'s `config.json` (diffusers 0.42 defaults; unknown keys ignored).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct VaeConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// One per encoder level; only `DownEncoderBlock2D` exists.
    pub down_block_types: Vec<String>,
    /// One per decoder level; only `UpDecoderBlock2D` exists.
    pub up_block_types: Vec<String>,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level (the decoder has one more).
    pub layers_per_block: usize,
    /// Activation; only `silu` is supported.
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: usize,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// Nominal image size (unused here).
    pub sample_size: serde_json::Value,
    /// Latents are multiplied by this after encoding (divided before decoding).
    pub scaling_factor: f32,
    /// Subtracted from latents before scaling (SD3 / Flux VAEs); `None` for SD.
    pub shift_factor: Option<f32>,
    /// Per-channel latent means, if the model has them.
    pub latents_mean: Option<Vec<f32>>,
    /// Per-channel latent stds, if the model has them.
    pub latents_std: Option<Vec<f32>>,
    /// The model overflows in fp16 (SDXL); recorded only, since this VAE runs in f32.
    pub force_upcast: bool,
    /// Whether `quant_conv` exists.
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have their attention.
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: serde_json::Value::from(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// Parses a `config.json` text.
    pub fn from_json(json: &str) -> Result<VaeConfig> {
        crate::json::from_str(json).map_err(|source| Error::Json {
            what: "VAE config.json".into(),
            source,
        })
    }

    /// Reads and parses a `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<VaeConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        crate::json::from_str(&text).map_err(|source| Error::Json {
            what: path.display().to_string(),
            source,
        })
    }
}

/// The mid block (`UNetMidBlock2D` with one attention): resnet, attention, resnet.
#[derive(Debug)]
struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<AttentionConfig>,
}

/// One encoder or decoder level: its resnets and optional down/upsampler.
#[derive(Debug)]
struct Level {
    resnets: Vec<ResnetBlock2D>,
    down: Option<Downsample2D>,
    up: Option<Upsample2D>,
}

/// `AutoencoderKL` built from a [`VaeConfig`]; weights come from an [`Executor`] component.
#[derive(Debug)]
pub struct Vae {
    config: VaeConfig,
    component: String,
    enc_levels: Vec<Level>,
    enc_mid: MidBlock,
    dec_mid: MidBlock,
    dec_levels: Vec<Level>,
}

fn mid_block(c: usize, groups: usize, attention: bool) -> MidBlock {
    let r = ResnetBlock2D::new(c, c, None, groups, VAE_EPS);
    MidBlock {
        resnets: [r.clone(), r],
        // diffusers: attention_head_dim = channels, so one head over all channels; GroupNorm
        // with the resnets' groups and eps, residual connection, output scale 1.
        attention: attention.then_some(AttentionConfig {
            query_dim: c,
            cross_attention_dim: None,
            heads: 1,
            dim_head: c,
            bias: true,
            group_norm: Some(GroupNormSpec {
                groups,
                eps: VAE_EPS,
            }),
            residual_connection: true,
            rescale_output_factor: 1.0,
        }),
    }
}

impl Vae {
    /// Builds the model from its config, for weights registered under component `"vae"`.
    pub fn new(config: VaeConfig) -> Result<Vae> {
        let c = &config;
        let n = c.block_out_channels.len();
        if n == 0 {
            return Err(Error::Config(
                "block_out_channels: expected at least one level, found []".into(),
            ));
        }
        if c.down_block_types.len() != n {
            return Err(Error::Config(format!(
                "down_block_types: expected {n} entries (one per block_out_channels), found {}",
                c.down_block_types.len()
            )));
        }
        if c.up_block_types.len() != n {
            return Err(Error::Config(format!(
                "up_block_types: expected {n} entries (one per block_out_channels), found {}",
                c.up_block_types.len()
            )));
        }
        for (i, t) in c.down_block_types.iter().enumerate() {
            if t != "DownEncoderBlock2D" {
                return Err(Error::Config(format!(
                    "down_block_types[{i}]: unknown block type '{t}' (expected DownEncoderBlock2D)"
                )));
            }
        }
        for (i, t) in c.up_block_types.iter().enumerate() {
            if t != "UpDecoderBlock2D" {
                return Err(Error::Config(format!(
                    "up_block_types[{i}]: unknown block type '{t}' (expected UpDecoderBlock2D)"
                )));
            }
        }
        if c.act_fn != "silu" {
            return Err(Error::Config(format!(
                "act_fn: only 'silu' is supported, found '{}'",
                c.act_fn
            )));
        }
        let g = c.norm_num_groups;
        if let Some(&ch) = c
            .block_out_channels
            .iter()
            .find(|&&ch| g == 0 || ch == 0 || ch % g != 0)
        {
            return Err(Error::Config(format!(
                "norm_num_groups: {g} groups must divide every block_out_channels entry, found {ch}"
            )));
        }
        for (field, v) in [
            ("in_channels", c.in_channels),
            ("out_channels", c.out_channels),
            ("latent_channels", c.latent_channels),
            ("layers_per_block", c.layers_per_block),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("{field}: expected > 0, found 0")));
            }
        }
        if c.layers_per_block > crate::models::unet::MAX_LAYERS {
            return Err(Error::Config(format!(
                "layers_per_block: {} layers is more than the {} supported",
                c.layers_per_block,
                crate::models::unet::MAX_LAYERS
            )));
        }
        if !(c.scaling_factor.is_finite() && c.scaling_factor != 0.0) {
            return Err(Error::Config(format!(
                "scaling_factor: expected a finite non-zero number, found {}",
                c.scaling_factor
            )));
        }

        let boc = &c.block_out_channels;
        let mut enc_levels = Vec::with_capacity(n);
        let mut prev = boc[0];
        for (i, &out) in boc.iter().enumerate() {
            let resnets = (0..c.layers_per_block)
                .map(|j| ResnetBlock2D::new(if j == 0 { prev } else { out }, out, None, g, VAE_EPS))
                .collect();
            let down = (i + 1 < n).then_some(Downsample2D {
                channels: out,
                out_channels: out,
                padding: 0,
            });
            enc_levels.push(Level {
                resnets,
                down,
                up: None,
            });
            prev = out;
        }
        let top = boc[n - 1];
        let mut dec_levels = Vec::with_capacity(n);
        let mut prev = top;
        for (i, &out) in boc.iter().rev().enumerate() {
            let resnets = (0..=c.layers_per_block)
                .map(|j| ResnetBlock2D::new(if j == 0 { prev } else { out }, out, None, g, VAE_EPS))
                .collect();
            let up = (i + 1 < n).then_some(Upsample2D {
                channels: out,
                out_channels: out,
            });
            dec_levels.push(Level {
                resnets,
                down: None,
                up,
            });
            prev = out;
        }
        Ok(Vae {
            enc_mid: mid_block(top, g, c.mid_block_add_attention),
            dec_mid: mid_block(top, g, c.mid_block_add_attention),
            enc_levels,
            dec_levels,
            component: "vae".into(),
            config,
        })
    }

    /// Builds the model from a `config.json` file.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Vae> {
        Self::new(VaeConfig::from_file(path)?)
    }

    /// The same model reading its weights from component `name` (default `"vae"`).
    pub fn with_component(mut self, name: impl Into<String>) -> Vae {
        self.component = name.into();
        self
    }

    /// The executor component the weights are registered under.
    pub fn component(&self) -> &str {
        &self.component
    }

    /// The config.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Latent scaling factor (latents for the UNet = posterior sample × this).
    pub fn scaling_factor(&self) -> f32 {
        self.config.scaling_factor
    }

    /// Whether diffusers would upcast this VAE from fp16 (recorded; this VAE runs in f32).
    pub fn force_upcast(&self) -> bool {
        self.config.force_upcast
    }

    /// Spatial downscale factor between image and latents (2^(levels - 1)).
    pub fn scale_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// Group prefixes of the encoder path (encoder, then `quant_conv`), in forward order.
    pub fn encoder_groups(&self) -> Vec<String> {
        let mut g = vec!["encoder.conv_in".to_string()];
        for (i, l) in self.enc_levels.iter().enumerate() {
            for j in 0..l.resnets.len() {
                g.push(format!("encoder.down_blocks.{i}.resnets.{j}"));
            }
            if l.down.is_some() {
                g.push(format!("encoder.down_blocks.{i}.downsamplers.0"));
            }
        }
        g.extend(mid_groups("encoder", &self.enc_mid));
        g.push("encoder".into());
        if self.config.use_quant_conv {
            g.push("quant_conv".into());
        }
        g
    }

    /// Group prefixes of the decoder path (`post_quant_conv`, then the decoder), in forward order.
    pub fn decoder_groups(&self) -> Vec<String> {
        let mut g = Vec::new();
        if self.config.use_post_quant_conv {
            g.push("post_quant_conv".into());
        }
        g.push("decoder.conv_in".to_string());
        g.extend(mid_groups("decoder", &self.dec_mid));
        for (i, l) in self.dec_levels.iter().enumerate() {
            for j in 0..l.resnets.len() {
                g.push(format!("decoder.up_blocks.{i}.resnets.{j}"));
            }
            if l.up.is_some() {
                g.push(format!("decoder.up_blocks.{i}.upsamplers.0"));
            }
        }
        g.push("decoder".into());
        g
    }

    /// All weight groups for an [`Executor`]: the encoder path, then the decoder path.
    pub fn groups(&self) -> ComponentGroups {
        let mut groups = self.encoder_groups();
        groups.extend(self.decoder_groups());
        ComponentGroups {
            component: self.component.clone(),
            groups,
        }
    }

    /// Every weight the model reads (diffusers names, without the component prefix) and the shape
    /// the config implies.
    pub fn weight_shapes(&self) -> Vec<WeightShape> {
        let c = &self.config;
        let boc = &c.block_out_channels;
        let (first, top) = (boc[0], boc[boc.len() - 1]);
        let lat = c.latent_channels;
        let mut v: Vec<WeightShape> = Vec::new();
        let conv = |v: &mut Vec<WeightShape>, name: &str, o: usize, i: usize, k: usize| {
            v.push((format!("{name}.weight"), vec![o, i, k, k]));
            v.push((format!("{name}.bias"), vec![o]));
        };
        let sub = |v: &mut Vec<WeightShape>, prefix: &str, shapes: Vec<WeightShape>| {
            v.extend(
                shapes
                    .into_iter()
                    .map(|(k, s)| (format!("{prefix}.{k}"), s)),
            );
        };
        conv(&mut v, "encoder.conv_in", first, c.in_channels, 3);
        for (i, l) in self.enc_levels.iter().enumerate() {
            for (j, r) in l.resnets.iter().enumerate() {
                sub(
                    &mut v,
                    &format!("encoder.down_blocks.{i}.resnets.{j}"),
                    r.weight_shapes(),
                );
            }
            if let Some(d) = &l.down {
                sub(
                    &mut v,
                    &format!("encoder.down_blocks.{i}.downsamplers.0"),
                    d.weight_shapes(),
                );
            }
        }
        mid_shapes(&mut v, "encoder", &self.enc_mid);
        v.push(("encoder.conv_norm_out.weight".into(), vec![top]));
        v.push(("encoder.conv_norm_out.bias".into(), vec![top]));
        conv(&mut v, "encoder.conv_out", 2 * lat, top, 3);
        if c.use_quant_conv {
            conv(&mut v, "quant_conv", 2 * lat, 2 * lat, 1);
        }
        if c.use_post_quant_conv {
            conv(&mut v, "post_quant_conv", lat, lat, 1);
        }
        conv(&mut v, "decoder.conv_in", top, lat, 3);
        mid_shapes(&mut v, "decoder", &self.dec_mid);
        for (i, l) in self.dec_levels.iter().enumerate() {
            for (j, r) in l.resnets.iter().enumerate() {
                sub(
                    &mut v,
                    &format!("decoder.up_blocks.{i}.resnets.{j}"),
                    r.weight_shapes(),
                );
            }
            if let Some(u) = &l.up {
                sub(
                    &mut v,
                    &format!("decoder.up_blocks.{i}.upsamplers.0"),
                    u.weight_shapes(),
                );
            }
        }
        v.push(("decoder.conv_norm_out.weight".into(), vec![first]));
        v.push(("decoder.conv_norm_out.bias".into(), vec![first]));
        conv(&mut v, "decoder.conv_out", c.out_channels, first, 3);
        v
    }

    /// Checks a checkpoint's `(name, shape)` list (diffusers names without the component prefix)
    /// against the config: every weight present with its shape, and no unknown key.
    pub fn check_weights<'a>(
        &self,
        tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ) -> Result<()> {
        super::check_weight_shapes(&self.component, "VAE", &self.weight_shapes(), tensors)
    }

    /// Encodes `image [n, in_channels, h, w]` (values in [-1, 1]) to the posterior's
    /// `(mean, std)`, each `[n, latent_channels, h / f, w / f]` (not scaled).
    pub fn encode(&self, exec: &Executor, image: &Tensor) -> Result<(Tensor, Tensor)> {
        self.encode_on(&CpuBackend::new(), exec, image)
    }

    /// [`Vae::encode`] on backend `b` with weights from `src`: the encoder runs on the backend,
    /// the posterior (split, clamp, exp) on the host from the downloaded moments.
    pub fn encode_on<B: Backend, S: WeightSource<B>>(
        &self,
        b: &B,
        src: &S,
        image: &B::Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let moments = self.encode_moments_on(b, src, image)?;
        let x = b.download(&moments)?;
        // DiagonalGaussianDistribution: mean, logvar = chunk(2, dim=1); logvar clamped.
        let mut parts = x.chunk(2, 1)?.into_iter();
        let (Some(mean), Some(mut std)) = (parts.next(), parts.next()) else {
            return Err(Error::InvalidArgument(
                "encoder output did not split into mean and logvar".into(),
            ));
        };
        std.data_mut()
            .iter_mut()
            .for_each(|v| *v = (0.5 * v.clamp(-30.0, 20.0)).exp());
        Ok((mean, std))
    }

    /// The encoder (and `quant_conv`) on backend `b`: the posterior's moments
    /// `[n, 2 * latent_channels, h / f, w / f]` (mean, then log-variance), left on the backend.
    pub fn encode_moments_on<B: Backend, S: WeightSource<B>>(
        &self,
        b: &B,
        src: &S,
        image: &B::Tensor,
    ) -> Result<B::Tensor> {
        let c = &self.config;
        check_input("encode", b.shape(image), c.in_channels)?;
        let boc = &c.block_out_channels;
        let (first, top) = (boc[0], boc[boc.len() - 1]);
        let lat = c.latent_channels;
        let comp = self.component.as_str();
        let m = b.mark();
        let mut x = {
            let w = src.group(comp, "encoder.conv_in")?;
            conv_on(b, &w, "", image, (c.in_channels, first, 3))?
        };
        for (i, l) in self.enc_levels.iter().enumerate() {
            for (j, r) in l.resnets.iter().enumerate() {
                let w = src.group(comp, &format!("encoder.down_blocks.{i}.resnets.{j}"))?;
                x = b.keep(m, r.forward_on(b, &w, "", &x, None)?)?;
            }
            if let Some(d) = &l.down {
                let w = src.group(comp, &format!("encoder.down_blocks.{i}.downsamplers.0"))?;
                x = b.keep(m, d.forward_on(b, &w, "", &x)?)?;
            }
        }
        x = self.mid_on(b, src, "encoder", &self.enc_mid, &x)?;
        x = b.keep(m, x)?;
        x = {
            let w = src.group(comp, "encoder")?;
            let h = norm_on(
                b,
                &w,
                "",
                "conv_norm_out",
                &x,
                (top, c.norm_num_groups, VAE_EPS),
                true,
            )?;
            conv_on(b, &w, "conv_out.", &h, (top, 2 * lat, 3))?
        };
        x = b.keep(m, x)?;
        if c.use_quant_conv {
            let w = src.group(comp, "quant_conv")?;
            x = conv_on(b, &w, "", &x, (2 * lat, 2 * lat, 1))?;
        }
        b.keep(m, x)
    }

    /// Decodes latents that were already divided by the scaling factor (and shifted back),
    /// `[n, latent_channels, h, w]`, to the raw image `[n, out_channels, h * f, w * f]` in about
    /// [-1, 1] (see [`postprocess`]).
    pub fn decode(&self, exec: &Executor, latents: &Tensor) -> Result<Tensor> {
        self.decode_on(&CpuBackend::new(), exec, latents)
    }

    /// [`Vae::decode`] on backend `b` with weights from `src`; only the image survives the
    /// decoder's temporaries.
    pub fn decode_on<B: Backend, S: WeightSource<B>>(
        &self,
        b: &B,
        src: &S,
        latents: &B::Tensor,
    ) -> Result<B::Tensor> {
        let c = &self.config;
        let lat = c.latent_channels;
        check_input("decode", b.shape(latents), lat)?;
        let boc = &c.block_out_channels;
        let (first, top) = (boc[0], boc[boc.len() - 1]);
        let comp = self.component.as_str();
        let m = b.mark();
        let mut z = latents.clone();
        if c.use_post_quant_conv {
            let w = src.group(comp, "post_quant_conv")?;
            z = conv_on(b, &w, "", &z, (lat, lat, 1))?;
        }
        let mut x = {
            let w = src.group(comp, "decoder.conv_in")?;
            conv_on(b, &w, "", &z, (lat, top, 3))?
        };
        x = b.keep(m, x)?;
        x = self.mid_on(b, src, "decoder", &self.dec_mid, &x)?;
        x = b.keep(m, x)?;
        for (i, l) in self.dec_levels.iter().enumerate() {
            for (j, r) in l.resnets.iter().enumerate() {
                let w = src.group(comp, &format!("decoder.up_blocks.{i}.resnets.{j}"))?;
                x = b.keep(m, r.forward_on(b, &w, "", &x, None)?)?;
            }
            if let Some(u) = &l.up {
                let w = src.group(comp, &format!("decoder.up_blocks.{i}.upsamplers.0"))?;
                x = b.keep(m, u.forward_on(b, &w, "", &x, None)?)?;
            }
        }
        let w = src.group(comp, "decoder")?;
        let h = norm_on(
            b,
            &w,
            "",
            "conv_norm_out",
            &x,
            (first, c.norm_num_groups, VAE_EPS),
            true,
        )?;
        let out = conv_on(b, &w, "conv_out.", &h, (first, c.out_channels, 3))?;
        drop(w);
        b.keep(m, out)
    }

    /// Latents for the UNet from a posterior sample or mean: `(z - shift) * scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Tensor {
        let (s, shift) = (self.config.scaling_factor, self.config.shift_factor);
        let mut out = z.clone();
        out.data_mut().iter_mut().for_each(|v| {
            if let Some(sh) = shift {
                *v -= sh;
            }
            *v *= s;
        });
        out
    }

    /// Decoder input from UNet latents, as the diffusers pipelines compute it:
    /// `latents / scaling_factor (+ shift_factor)`.
    pub fn unscale_latents(&self, latents: &Tensor) -> Tensor {
        let (s, shift) = (self.config.scaling_factor, self.config.shift_factor);
        let mut out = latents.clone();
        out.data_mut().iter_mut().for_each(|v| {
            *v /= s;
            if let Some(sh) = shift {
                *v += sh;
            }
        });
        out
    }

    fn mid_on<B: Backend, S: WeightSource<B>>(
        &self,
        b: &B,
        src: &S,
        part: &str,
        m: &MidBlock,
        x: &B::Tensor,
    ) -> Result<B::Tensor> {
        let comp = self.component.as_str();
        let mark = b.mark();
        let mut x = {
            let w = src.group(comp, &format!("{part}.mid_block.resnets.0"))?;
            m.resnets[0].forward_on(b, &w, "", x, None)?
        };
        if let Some(a) = &m.attention {
            let w = src.group(comp, &format!("{part}.mid_block.attentions.0"))?;
            x = b.keep(mark, a.forward_on(b, &w, "", &x, None)?)?;
        }
        let w = src.group(comp, &format!("{part}.mid_block.resnets.1"))?;
        let out = m.resnets[1].forward_on(b, &w, "", &x, None)?;
        drop(w);
        b.keep(mark, out)
    }
}

fn mid_groups(part: &str, m: &MidBlock) -> Vec<String> {
    let mut g = vec![format!("{part}.mid_block.resnets.0")];
    if m.attention.is_some() {
        g.push(format!("{part}.mid_block.attentions.0"));
    }
    g.push(format!("{part}.mid_block.resnets.1"));
    g
}

fn mid_shapes(v: &mut Vec<WeightShape>, part: &str, m: &MidBlock) {
    for (j, r) in m.resnets.iter().enumerate() {
        v.extend(
            r.weight_shapes()
                .into_iter()
                .map(|(k, s)| (format!("{part}.mid_block.resnets.{j}.{k}"), s)),
        );
    }
    if let Some(a) = &m.attention {
        v.extend(
            a.weight_shapes()
                .into_iter()
                .map(|(k, s)| (format!("{part}.mid_block.attentions.0.{k}"), s)),
        );
    }
}

fn check_input(op: &str, shape: &[usize], channels: usize) -> Result<()> {
    if shape.len() == 4 && shape[1] == channels && shape[2] > 0 && shape[3] > 0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "VAE {op}: expected input [n, {channels}, h, w], found {shape:?}"
        )))
    }
}

/// k×k convolution ("same" padding) `{prefix}weight [out, in, k, k]` + `{prefix}bias` from `w`.
fn conv_on<B: Backend, W: WeightGroup<B>>(
    b: &B,
    w: &W,
    prefix: &str,
    x: &B::Tensor,
    (cin, cout, k): (usize, usize, usize),
) -> Result<B::Tensor> {
    let weight = w.get_shaped(&format!("{prefix}weight"), &[cout, cin, k, k])?;
    let bias = w.get_shaped(&format!("{prefix}bias"), &[cout])?;
    b.conv2d(x, weight, Some(bias), Conv2dParams::new(1, k / 2))
}

/// The pipelines' image from a decoder output: `(x / 2 + 0.5).clamp(0, 1)`.
pub fn postprocess(x: &Tensor) -> Tensor {
    let mut out = x.clone();
    out.data_mut()
        .iter_mut()
        .for_each(|v| *v = (*v / 2.0 + 0.5).clamp(0.0, 1.0));
    out
}

/// Encoder input from an image in [0, 1]: `2x - 1` (diffusers' `VaeImageProcessor.normalize`).
pub fn preprocess(image01: &Tensor) -> Tensor {
    let mut out = image01.clone();
    out.data_mut().iter_mut().for_each(|v| *v = 2.0 * *v - 1.0);
    out
}
