//! diffusers `UNet2DConditionModel` (SD 1.x, SD 2.x, SDXL), built from its `config.json`, with the
//! checkpoint's module names.
//!
//! Weight groups, in forward order: `time_embedding`, `add_embedding` (SDXL), `conv_in`, then per
//! block each `resnets.j`, the parts of each `attentions.j` (`norm`, `proj_in`, each
//! `transformer_blocks.k`, `proj_out`), `downsamplers.0` / `upsamplers.0`, the mid block likewise,
//! and `conv_norm_out`, `conv_out`.

use crate::backend::{Backend, CpuBackend};
use crate::error::{Error, Result};
use crate::exec::{ComponentGroups, Executor};
use crate::models::attention::Transformer2DConfig;
use crate::models::resnet::{Downsample2D, ResnetBlock2D, Upsample2D, WeightShape};
use crate::ops::{Activation, Conv2dParams};
use crate::tensor::Tensor;
use crate::weights::{WeightGroup, WeightSource};
use serde::Deserialize;
use std::path::Path;

/// A config value given either once for all blocks or once per block.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// One value per down block (tried first: a list of counts is per block, not per layer).
    Each(Vec<T>),
    /// One value for every block.
    One(T),
}

impl<T: Clone> PerBlock<T> {
    /// The per-block values for `n` blocks; `field` names the config field in the error.
    fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::Config(format!(
                "{field}: expected one value or {n} (one per down block), found a list of {}",
                v.len()
            ))),
        }
    }
}

/// One block's `transformer_layers_per_block` entry: one count for every layer, or one per layer.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum LayerCounts {
    /// The same number of transformer blocks in every attention of the block.
    One(usize),
    /// A number per attention (resnet layer) of the block.
    Each(Vec<usize>),
}

impl LayerCounts {
    fn expand(&self, n: usize, field: &str) -> Result<Vec<usize>> {
        match self {
            LayerCounts::One(v) => Ok(vec![*v; n]),
            LayerCounts::Each(v) if v.len() == n => Ok(v.clone()),
            LayerCounts::Each(v) => Err(Error::Config(format!(
                "{field}: expected {n} per-layer counts for a block of {n} layers, found {}",
                v.len()
            ))),
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_in_out() -> usize {
    4
}
fn d_down() -> Vec<String> {
    let mut v = vec!["CrossAttnDownBlock2D".to_string(); 3];
    v.push("DownBlock2D".into());
    v
}
fn d_up() -> Vec<String> {
    let mut v = vec!["UpBlock2D".to_string()];
    v.extend(vec!["CrossAttnUpBlock2D".to_string(); 3]);
    v
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_boc() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_one() -> usize {
    1
}
fn d_one_f() -> f32 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f32 {
    1e-5
}
fn d_cross() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_tlayers() -> PerBlock<LayerCounts> {
    PerBlock::One(LayerCounts::One(1))
}
fn d_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_three() -> usize {
    3
}

/// The fields of a diffusers `UNet2DConditionModel` `config.json` this model uses, with diffusers'
/// defaults (unknown keys are ignored; fields SD does not use must keep their default values).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in.
    #[serde(default = "d_in_out")]
    pub in_channels: usize,
    /// Channels out.
    #[serde(default = "d_in_out")]
    pub out_channels: usize,
    /// `sample = 2 * sample - 1` first.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Timestep embedding puts cos before sin.
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    /// Timestep embedding `downscale_freq_shift`.
    #[serde(default)]
    pub freq_shift: f32,
    /// `CrossAttnDownBlock2D` or `DownBlock2D` per level.
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    /// `UNetMidBlock2DCrossAttn`, or null for none.
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    /// `UpBlock2D` or `CrossAttnUpBlock2D` per level.
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    /// Must be false (no SD model uses cross-attention-only transformer blocks).
    #[serde(default = "d_false_per_block")]
    pub only_cross_attention: PerBlock<bool>,
    /// Channels per level.
    #[serde(default = "d_boc")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the downsampling convolutions.
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets.
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f32,
    /// Activation; only `silu`.
    #[serde(default = "d_silu")]
    pub act_fn: String,
    /// GroupNorm groups of every norm.
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    /// GroupNorm epsilon of the resnets and `conv_norm_out`.
    #[serde(default = "d_eps")]
    pub norm_eps: f32,
    /// Context width (per block or one for all).
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer blocks per attention (per block, optionally per layer).
    #[serde(default = "d_tlayers")]
    pub transformer_layers_per_block: PerBlock<LayerCounts>,
    /// Per up block, when it is not the reverse of `transformer_layers_per_block`.
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<LayerCounts>>,
    /// The head COUNT (diffusers' historical naming) when `num_attention_heads` is null.
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    /// The head count, if given (diffusers itself rejects it; accepted here with its meaning).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Transformer `proj_in`/`proj_out` are linear rather than 1×1 convolutions.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Attention in f32 in diffusers; a no-op here (everything is f32).
    #[serde(default)]
    pub upcast_attention: bool,
    /// Resnet time conditioning; only `default`.
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    /// Output scale of the down/up blocks' resnets.
    #[serde(default = "d_one_f")]
    pub resnet_out_scale_factor: f32,
    /// Must be false.
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    /// Only `positional`.
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    /// Time embedding width; default `4 * block_out_channels[0]`.
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Activation after the (summed) time embedding: null or `silu`.
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    /// Activation at the end of `time_embedding`: null or `silu`.
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// null or `text_time` (SDXL).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each `time_ids` entry's sinusoidal embedding (SDXL).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding` (SDXL: pooled text width + 6 × `addition_time_embed_dim`).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// `conv_in` kernel size.
    #[serde(default = "d_three")]
    pub conv_in_kernel: usize,
    /// `conv_out` kernel size.
    #[serde(default = "d_three")]
    pub conv_out_kernel: usize,
    /// Unsupported if set.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Unsupported if set.
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Unsupported if set.
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// Unsupported if set.
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Unsupported if true.
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// Only `default`.
    #[serde(default = "d_default")]
    pub attention_type: String,
    /// Unsupported if set.
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    /// Unsupported if true.
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    /// Unsupported if true.
    #[serde(default)]
    pub class_embeddings_concat: bool,
}

fn d_false_per_block() -> PerBlock<bool> {
    PerBlock::One(false)
}

impl UNetConfig {
    /// Parses a `config.json` string.
    pub fn from_json(json: &str) -> Result<UNetConfig> {
        crate::json::from_str(json).map_err(|source| Error::Json {
            what: "UNet config.json".into(),
            source,
        })
    }

    /// Reads and parses a `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<UNetConfig> {
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

/// A block's resnets with the attention after each (cross-attention blocks) and its resampler.
#[derive(Clone, Debug)]
struct Block<S> {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DConfig>,
    sampler: Option<S>,
}

/// SDXL's extra conditioning (`added_cond_kwargs`).
#[derive(Clone, Copy, Debug)]
pub struct AddedCond<'a> {
    /// Pooled text embedding `[b, pooled_width]`.
    pub text_embeds: &'a Tensor,
    /// `[b, k]` micro-conditioning (original size, crop, target size: k = 6).
    pub time_ids: &'a Tensor,
}

/// `UNet2DConditionModel` built from its config; weights come from an [`Executor`] (CPU) or any
/// [`WeightSource`] ([`UNet2DConditionModel::forward_on`]).
#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    component: String,
    time_embed_dim: usize,
    /// `(addition_time_embed_dim, projection_class_embeddings_input_dim)` for `text_time`.
    text_time: Option<(usize, usize)>,
    groups: usize,
    down: Vec<Block<Downsample2D>>,
    mid: Option<Block<()>>,
    up: Vec<Block<Upsample2D>>,
}

fn unsupported(field: &str, found: impl std::fmt::Debug, supported: &str) -> Error {
    Error::Config(format!(
        "{field}: expected {supported}, found {found:?} (not supported)"
    ))
}

fn check_act(field: &str, v: &Option<String>) -> Result<()> {
    match v.as_deref() {
        None | Some("silu") | Some("swish") => Ok(()),
        Some(o) => Err(unsupported(field, o, "null or \"silu\"")),
    }
}

/// Most layers (resnets per block, transformer blocks per layer) a config may ask for: far above
/// any real model, low enough that a hostile config cannot make building the model allocate
/// without bound.
pub const MAX_LAYERS: usize = 64;

/// Checks layer counts against [`MAX_LAYERS`].
fn check_depth(field: &str, counts: &[usize]) -> Result<()> {
    match counts.iter().find(|&&d| d > MAX_LAYERS) {
        Some(d) => Err(Error::Config(format!(
            "{field}: {d} layers is more than the {MAX_LAYERS} supported"
        ))),
        None => Ok(()),
    }
}

/// `channels / heads`, or an error naming the block.
fn head_dim(channels: usize, heads: usize, what: &str) -> Result<usize> {
    if heads == 0 || !channels.is_multiple_of(heads) {
        return Err(Error::Config(format!(
            "attention_head_dim / num_attention_heads: {what} has {channels} channels, which \
             {heads} heads do not divide"
        )));
    }
    Ok(channels / heads)
}

impl UNet2DConditionModel {
    /// Builds the model structure from `config` (weights are read at run time, component `"unet"`).
    pub fn new(config: UNetConfig) -> Result<UNet2DConditionModel> {
        let c = &config;
        let n = c.block_out_channels.len();
        if n == 0 {
            return Err(Error::Config(
                "block_out_channels: expected at least one level, found none".into(),
            ));
        }
        if c.down_block_types.len() != n || c.up_block_types.len() != n {
            return Err(Error::Config(format!(
                "down_block_types / up_block_types: expected {n} each (one per block_out_channels \
                 entry), found {} and {}",
                c.down_block_types.len(),
                c.up_block_types.len()
            )));
        }
        if c.act_fn != "silu" && c.act_fn != "swish" {
            return Err(unsupported("act_fn", &c.act_fn, "\"silu\""));
        }
        if c.resnet_time_scale_shift != "default" {
            return Err(unsupported(
                "resnet_time_scale_shift",
                &c.resnet_time_scale_shift,
                "\"default\"",
            ));
        }
        if c.time_embedding_type != "positional" {
            return Err(unsupported(
                "time_embedding_type",
                &c.time_embedding_type,
                "\"positional\"",
            ));
        }
        if c.attention_type != "default" {
            return Err(unsupported(
                "attention_type",
                &c.attention_type,
                "\"default\"",
            ));
        }
        check_act("time_embedding_act_fn", &c.time_embedding_act_fn)?;
        check_act("timestep_post_act", &c.timestep_post_act)?;
        let unset = [
            ("class_embed_type", c.class_embed_type.is_some()),
            ("num_class_embeds", c.num_class_embeds.is_some()),
            ("encoder_hid_dim", c.encoder_hid_dim.is_some()),
            ("time_cond_proj_dim", c.time_cond_proj_dim.is_some()),
            ("cross_attention_norm", c.cross_attention_norm.is_some()),
            ("dual_cross_attention", c.dual_cross_attention),
            ("resnet_skip_time_act", c.resnet_skip_time_act),
            ("class_embeddings_concat", c.class_embeddings_concat),
            (
                "mid_block_only_cross_attention",
                c.mid_block_only_cross_attention == Some(true),
            ),
        ];
        if let Some((field, _)) = unset.iter().find(|(_, set)| *set) {
            return Err(Error::Config(format!(
                "{field}: expected null/false (SD 1.x, 2.x and SDXL leave it unset), found a value \
                 (not supported)"
            )));
        }
        if c.only_cross_attention
            .expand(n, "only_cross_attention")?
            .contains(&true)
        {
            return Err(unsupported(
                "only_cross_attention",
                &c.only_cross_attention,
                "false",
            ));
        }
        if c.conv_in_kernel.is_multiple_of(2) || c.conv_out_kernel.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "conv_in_kernel / conv_out_kernel: expected odd sizes, found {} and {}",
                c.conv_in_kernel, c.conv_out_kernel
            )));
        }
        let groups = c.norm_num_groups.ok_or_else(|| {
            Error::Config(
                "norm_num_groups: expected a group count, found null (not supported)".into(),
            )
        })?;
        let text_time = match c.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let atd = c.addition_time_embed_dim.ok_or_else(|| {
                    Error::Config(
                        "addition_time_embed_dim: required with addition_embed_type \"text_time\", found null".into(),
                    )
                })?;
                let pcid = c.projection_class_embeddings_input_dim.ok_or_else(|| {
                    Error::Config(
                        "projection_class_embeddings_input_dim: required with addition_embed_type \"text_time\", found null".into(),
                    )
                })?;
                Some((atd, pcid))
            }
            Some(o) => {
                return Err(unsupported(
                    "addition_embed_type",
                    o,
                    "null or \"text_time\"",
                ))
            }
        };
        let boc = &c.block_out_channels;
        let time_embed_dim = c.time_embedding_dim.unwrap_or(boc[0] * 4);
        let heads = match &c.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads")?,
            None => c.attention_head_dim.expand(n, "attention_head_dim")?,
        };
        let cross = c.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let layers = c.layers_per_block.expand(n, "layers_per_block")?;
        check_depth("layers_per_block", &layers)?;
        let tlayers = c
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let rev_tlayers: Vec<LayerCounts> = match &c.reverse_transformer_layers_per_block {
            Some(v) if v.len() == n => v.clone(),
            Some(v) => {
                return Err(Error::Config(format!(
                    "reverse_transformer_layers_per_block: expected {n} entries, found {}",
                    v.len()
                )))
            }
            None => tlayers.iter().rev().cloned().collect(),
        };
        let resnet = |i, o, scale| {
            let mut r = ResnetBlock2D::new(i, o, Some(time_embed_dim), groups, c.norm_eps);
            r.output_scale_factor = scale;
            r
        };
        let transformer = |ch: usize, heads: usize, layers: usize, cross: usize, what: &str| {
            Ok::<_, Error>(Transformer2DConfig {
                in_channels: ch,
                heads,
                dim_head: head_dim(ch, heads, what)?,
                num_layers: layers,
                cross_attention_dim: cross,
                norm_num_groups: groups,
                use_linear_projection: c.use_linear_projection,
            })
        };

        let mut down = Vec::with_capacity(n);
        let mut out_ch = boc[0];
        for (i, ty) in c.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = boc[i];
            let has_attn = match ty.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                o => {
                    return Err(unsupported(
                        &format!("down_block_types[{i}]"),
                        o,
                        "\"CrossAttnDownBlock2D\" or \"DownBlock2D\"",
                    ))
                }
            };
            let field = format!("transformer_layers_per_block[{i}]");
            let tl = tlayers[i].expand(layers[i], &field)?;
            check_depth(&field, &tl)?;
            let mut b = Block {
                resnets: Vec::new(),
                attentions: Vec::new(),
                sampler: (i + 1 < n).then_some(Downsample2D {
                    channels: out_ch,
                    out_channels: out_ch,
                    padding: c.downsample_padding,
                }),
            };
            for (j, &t) in tl.iter().enumerate() {
                let r_in = if j == 0 { in_ch } else { out_ch };
                b.resnets
                    .push(resnet(r_in, out_ch, c.resnet_out_scale_factor));
                if has_attn {
                    let what = format!("down_blocks.{i}");
                    b.attentions
                        .push(transformer(out_ch, heads[i], t, cross[i], &what)?);
                }
            }
            down.push(b);
        }

        let top = boc[n - 1];
        let mid = match c.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                // diffusers' mid block reads the first entry of a per-layer list.
                let tl = match &tlayers[n - 1] {
                    LayerCounts::One(v) => *v,
                    LayerCounts::Each(v) => *v.first().ok_or_else(|| {
                        Error::Config(
                            "transformer_layers_per_block: the last block's list is empty".into(),
                        )
                    })?,
                };
                Some(Block {
                    resnets: vec![
                        resnet(top, top, c.mid_block_scale_factor),
                        resnet(top, top, c.mid_block_scale_factor),
                    ],
                    attentions: vec![transformer(
                        top,
                        heads[n - 1],
                        tl,
                        cross[n - 1],
                        "mid_block",
                    )?],
                    sampler: None,
                })
            }
            Some(o) => {
                return Err(unsupported(
                    "mid_block_type",
                    o,
                    "\"UNetMidBlock2DCrossAttn\" or null",
                ))
            }
        };

        let mut up = Vec::with_capacity(n);
        let mut out_ch = boc[n - 1];
        for (i, ty) in c.up_block_types.iter().enumerate() {
            let rev = n - 1 - i;
            let prev_out = out_ch;
            out_ch = boc[rev];
            let in_ch = boc[rev.saturating_sub(1)];
            let has_attn = match ty.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                o => {
                    return Err(unsupported(
                        &format!("up_block_types[{i}]"),
                        o,
                        "\"CrossAttnUpBlock2D\" or \"UpBlock2D\"",
                    ))
                }
            };
            let num = layers[rev] + 1;
            let field = format!("reverse transformer_layers_per_block[{i}]");
            let tl = rev_tlayers[i].expand(num, &field)?;
            check_depth(&field, &tl)?;
            let mut b = Block {
                resnets: Vec::new(),
                attentions: Vec::new(),
                sampler: (i + 1 < n).then_some(Upsample2D {
                    channels: out_ch,
                    out_channels: out_ch,
                }),
            };
            for (j, &t) in tl.iter().enumerate() {
                let skip = if j == num - 1 { in_ch } else { out_ch };
                let r_in = if j == 0 { prev_out } else { out_ch };
                b.resnets
                    .push(resnet(r_in + skip, out_ch, c.resnet_out_scale_factor));
                if has_attn {
                    let what = format!("up_blocks.{i}");
                    b.attentions
                        .push(transformer(out_ch, heads[rev], t, cross[rev], &what)?);
                }
            }
            up.push(b);
        }

        Ok(UNet2DConditionModel {
            config,
            component: "unet".into(),
            time_embed_dim,
            text_time,
            groups,
            down,
            mid,
            up,
        })
    }

    /// Builds the model from a `config.json` file.
    pub fn from_config_file(path: impl AsRef<Path>) -> Result<UNet2DConditionModel> {
        Self::new(UNetConfig::from_file(path)?)
    }

    /// The same model reading its weights from component `name` (default `"unet"`).
    pub fn with_component(mut self, name: impl Into<String>) -> UNet2DConditionModel {
        self.component = name.into();
        self
    }

    /// The executor component the weights are registered under.
    pub fn component(&self) -> &str {
        &self.component
    }

    /// The config.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Whether the model needs [`AddedCond`] (SDXL's `text_time`).
    pub fn needs_added_cond(&self) -> bool {
        self.text_time.is_some()
    }

    /// 2^number of upsamplers: latent sizes that are multiples of it take the plain 2× path.
    pub fn size_multiple(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// The weight group prefixes, in forward order.
    pub fn group_prefixes(&self) -> Vec<String> {
        let mut g = vec!["time_embedding".to_string()];
        if self.text_time.is_some() {
            g.push("add_embedding".into());
        }
        g.push("conv_in".into());
        let block_groups =
            |g: &mut Vec<String>, p: &str, resnets: usize, attns: &[Transformer2DConfig]| {
                for j in 0..resnets {
                    g.push(format!("{p}.resnets.{j}"));
                    if let Some(a) = attns.get(j) {
                        g.extend(a.groups(&format!("{p}.attentions.{j}")));
                    }
                }
            };
        for (i, b) in self.down.iter().enumerate() {
            let p = format!("down_blocks.{i}");
            block_groups(&mut g, &p, b.resnets.len(), &b.attentions);
            if b.sampler.is_some() {
                g.push(format!("{p}.downsamplers.0"));
            }
        }
        if let Some(m) = &self.mid {
            g.push("mid_block.resnets.0".into());
            for (j, a) in m.attentions.iter().enumerate() {
                g.extend(a.groups(&format!("mid_block.attentions.{j}")));
                g.push(format!("mid_block.resnets.{}", j + 1));
            }
        }
        for (i, b) in self.up.iter().enumerate() {
            let p = format!("up_blocks.{i}");
            block_groups(&mut g, &p, b.resnets.len(), &b.attentions);
            if b.sampler.is_some() {
                g.push(format!("{p}.upsamplers.0"));
            }
        }
        g.push("conv_norm_out".into());
        g.push("conv_out".into());
        g
    }

    /// The weight groups for an [`Executor`].
    pub fn groups(&self) -> ComponentGroups {
        ComponentGroups {
            component: self.component.clone(),
            groups: self.group_prefixes(),
        }
    }

    /// Every weight the model reads (diffusers names, without the component prefix) and the shape
    /// the config implies.
    pub fn weight_shapes(&self) -> Vec<WeightShape> {
        let c = &self.config;
        let boc = &c.block_out_channels;
        let ted = self.time_embed_dim;
        let mut v: Vec<WeightShape> = Vec::new();
        let lin = |v: &mut Vec<WeightShape>, name: &str, o: usize, i: usize| {
            v.push((format!("{name}.weight"), vec![o, i]));
            v.push((format!("{name}.bias"), vec![o]));
        };
        let sub = |v: &mut Vec<WeightShape>, prefix: &str, shapes: Vec<WeightShape>| {
            v.extend(
                shapes
                    .into_iter()
                    .map(|(k, s)| (format!("{prefix}.{k}"), s)),
            );
        };
        lin(&mut v, "time_embedding.linear_1", ted, boc[0]);
        lin(&mut v, "time_embedding.linear_2", ted, ted);
        if let Some((_, pcid)) = self.text_time {
            lin(&mut v, "add_embedding.linear_1", ted, pcid);
            lin(&mut v, "add_embedding.linear_2", ted, ted);
        }
        let k = c.conv_in_kernel;
        v.push(("conv_in.weight".into(), vec![boc[0], c.in_channels, k, k]));
        v.push(("conv_in.bias".into(), vec![boc[0]]));
        let block = |v: &mut Vec<WeightShape>,
                     p: &str,
                     rs: &[ResnetBlock2D],
                     at: &[Transformer2DConfig]| {
            for (j, r) in rs.iter().enumerate() {
                sub(v, &format!("{p}.resnets.{j}"), r.weight_shapes());
            }
            for (j, a) in at.iter().enumerate() {
                sub(v, &format!("{p}.attentions.{j}"), a.weight_shapes());
            }
        };
        for (i, b) in self.down.iter().enumerate() {
            let p = format!("down_blocks.{i}");
            block(&mut v, &p, &b.resnets, &b.attentions);
            if let Some(d) = &b.sampler {
                sub(&mut v, &format!("{p}.downsamplers.0"), d.weight_shapes());
            }
        }
        if let Some(m) = &self.mid {
            block(&mut v, "mid_block", &m.resnets, &m.attentions);
        }
        for (i, b) in self.up.iter().enumerate() {
            let p = format!("up_blocks.{i}");
            block(&mut v, &p, &b.resnets, &b.attentions);
            if let Some(u) = &b.sampler {
                sub(&mut v, &format!("{p}.upsamplers.0"), u.weight_shapes());
            }
        }
        v.push(("conv_norm_out.weight".into(), vec![boc[0]]));
        v.push(("conv_norm_out.bias".into(), vec![boc[0]]));
        let k = c.conv_out_kernel;
        v.push(("conv_out.weight".into(), vec![c.out_channels, boc[0], k, k]));
        v.push(("conv_out.bias".into(), vec![c.out_channels]));
        v
    }

    /// Checks a checkpoint's `(name, shape)` list (diffusers names without the component prefix)
    /// against the config: every weight present with its shape, and no unknown key.
    pub fn check_weights<'a>(
        &self,
        tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
    ) -> Result<()> {
        super::check_weight_shapes(&self.component, "UNet", &self.weight_shapes(), tensors)
    }

    /// `linear_1 -> silu -> linear_2` of a `TimestepEmbedding` group.
    fn timestep_embedding_mlp<B: Backend, S: WeightSource<B>>(
        &self,
        b: &B,
        src: &S,
        group: &str,
        x: &B::Tensor,
        in_dim: usize,
        post_act: bool,
    ) -> Result<B::Tensor> {
        let ted = self.time_embed_dim;
        let w = src.group(&self.component, group)?;
        let h = b.linear(
            x,
            w.get_shaped("linear_1.weight", &[ted, in_dim])?,
            Some(w.get_shaped("linear_1.bias", &[ted])?),
        )?;
        let h = b.linear(
            &b.activation(Activation::Silu, &h)?,
            w.get_shaped("linear_2.weight", &[ted, ted])?,
            Some(w.get_shaped("linear_2.bias", &[ted])?),
        )?;
        if post_act {
            b.activation(Activation::Silu, &h)
        } else {
            Ok(h)
        }
    }

    /// The time embedding `emb [b, time_embed_dim]` for timesteps (one per batch item).
    fn time_embedding<B: Backend, S: WeightSource<B>>(
        &self,
        b: &B,
        src: &S,
        timesteps: &[f32],
        added: Option<(&B::Tensor, &Tensor)>,
    ) -> Result<B::Tensor> {
        let c = &self.config;
        let c0 = c.block_out_channels[0];
        let n = timesteps.len();
        let t_emb = b.timestep_embedding(timesteps, c0, c.flip_sin_to_cos, c.freq_shift)?;
        let post = c.timestep_post_act.is_some();
        let mut emb = self.timestep_embedding_mlp(b, src, "time_embedding", &t_emb, c0, post)?;
        if let Some((atd, pcid)) = self.text_time {
            let (te, ti) = added.ok_or_else(|| {
                Error::InvalidArgument(
                    "this UNet has addition_embed_type \"text_time\" and needs added conditioning \
                     (text_embeds and time_ids), none given"
                        .into(),
                )
            })?;
            let tes = b.shape(te);
            if tes.len() != 2 || tes[0] != n || ti.rank() != 2 || ti.shape()[0] != n {
                return Err(Error::InvalidArgument(format!(
                    "added conditioning: expected text_embeds [{n}, p] and time_ids [{n}, k], \
                     found {tes:?} and {:?}",
                    ti.shape()
                )));
            }
            let width = tes[1] + ti.shape()[1] * atd;
            if width != pcid {
                return Err(Error::InvalidArgument(format!(
                    "added conditioning: text_embeds width + time_ids count × {atd} must equal \
                     projection_class_embeddings_input_dim {pcid}, found {} + {} × {atd} = {width}",
                    tes[1],
                    ti.shape()[1]
                )));
            }
            // The time ids are host values: embedded on the host like the timesteps.
            let time_embeds =
                b.timestep_embedding(ti.data(), atd, c.flip_sin_to_cos, c.freq_shift)?;
            let time_embeds = b.reshape(time_embeds, &[n, ti.shape()[1] * atd])?;
            let add = b.cat_channels(te, &time_embeds)?;
            let aug = self.timestep_embedding_mlp(b, src, "add_embedding", &add, pcid, false)?;
            emb = b.add(&emb, &aug)?;
        } else if added.is_some() {
            return Err(Error::InvalidArgument(
                "added conditioning given, but this UNet has no addition_embed_type".into(),
            ));
        }
        if c.time_embedding_act_fn.is_some() {
            emb = b.activation(Activation::Silu, &emb)?;
        }
        Ok(emb)
    }

    fn run_resnet<B: Backend, S: WeightSource<B>>(
        &self,
        b: &B,
        src: &S,
        prefix: &str,
        r: &ResnetBlock2D,
        x: &B::Tensor,
        emb: &B::Tensor,
    ) -> Result<B::Tensor> {
        let w = src.group(&self.component, prefix)?;
        r.forward_on(b, &w, "", x, Some(emb))
    }

    /// `resnet`, then `attention` if any, of one block layer.
    #[allow(clippy::too_many_arguments)]
    fn run_layer<B: Backend, S: WeightSource<B>>(
        &self,
        b: &B,
        src: &S,
        (p, j): (&str, usize),
        r: &ResnetBlock2D,
        a: Option<&Transformer2DConfig>,
        x: &B::Tensor,
        (emb, ehs): (&B::Tensor, &B::Tensor),
    ) -> Result<B::Tensor> {
        let x = self.run_resnet(b, src, &format!("{p}.resnets.{j}"), r, x, emb)?;
        // The caller keeps the result at its own mark: no keep here, which would copy twice.
        match a {
            Some(a) => {
                let comp = self.component.as_str();
                a.forward_on(b, src, comp, &format!("{p}.attentions.{j}"), &x, ehs)
            }
            None => Ok(x),
        }
    }

    /// Predicts the noise (or v) for `sample [b, in_channels, h, w]` at `timesteps` (one value
    /// for the whole batch, or one per item; fractional values allowed) given the text context
    /// `encoder_hidden_states [b, m, cross_attention_dim]` and, for SDXL, `added`.
    pub fn forward(
        &self,
        exec: &Executor,
        sample: &Tensor,
        timesteps: &[f32],
        encoder_hidden_states: &Tensor,
        added: Option<AddedCond<'_>>,
    ) -> Result<Tensor> {
        let added = added.map(|a| (a.text_embeds, a.time_ids));
        let b = CpuBackend::new();
        self.forward_on(&b, exec, sample, timesteps, encoder_hidden_states, added)
    }

    /// [`UNet2DConditionModel::forward`] on backend `b` with weights from `src`. `added` is
    /// SDXL's `(text_embeds [b, p] on the backend, time_ids [b, k] on the host)`: the time ids
    /// are embedded on the host like the timesteps. Activations are released layer by layer;
    /// only the skip connections and the time embedding live across layers, and only the
    /// output survives the call.
    pub fn forward_on<B: Backend, S: WeightSource<B>>(
        &self,
        b: &B,
        src: &S,
        sample: &B::Tensor,
        timesteps: &[f32],
        encoder_hidden_states: &B::Tensor,
        added: Option<(&B::Tensor, &Tensor)>,
    ) -> Result<B::Tensor> {
        let c = &self.config;
        let comp = self.component.as_str();
        let s = b.shape(sample);
        if s.len() != 4 || s[1] != c.in_channels {
            return Err(Error::InvalidArgument(format!(
                "UNet sample: expected [b, {}, h, w], found {s:?}",
                c.in_channels
            )));
        }
        let (n, h, w) = (s[0], s[2], s[3]);
        if h == 0 || w == 0 {
            return Err(Error::InvalidArgument(format!(
                "UNet sample: expected a positive height and width, found {h}×{w}"
            )));
        }
        let ehs = encoder_hidden_states;
        let es = b.shape(ehs);
        if es.len() != 3 || es[0] != n {
            return Err(Error::InvalidArgument(format!(
                "encoder_hidden_states: expected [{n}, tokens, cross_attention_dim], found {es:?}"
            )));
        }
        let ts: Vec<f32> = match timesteps.len() {
            1 => vec![timesteps[0]; n],
            k if k == n => timesteps.to_vec(),
            k => {
                return Err(Error::InvalidArgument(format!(
                    "timesteps: expected 1 or {n} (the batch size) values, found {k}"
                )))
            }
        };
        let start = b.mark();
        let emb = self.time_embedding(b, src, &ts, added)?;
        let emb = b.keep(start, emb)?;
        let c0 = c.block_out_channels[0];

        // Each skip is kept at the mark it was allocated at, so the up path can free it (and
        // everything above it) once the concatenation has consumed it.
        let m = b.mark();
        let mut x = {
            let wg = src.group(comp, "conv_in")?;
            let k = c.conv_in_kernel;
            let centered;
            let input = if c.center_input_sample {
                // 2 * sample - 1, as two exact steps: * 2, then + (-1) per channel.
                let minus_one = Tensor::new([c.in_channels], vec![-1.0; c.in_channels])?;
                let two = b.scale(sample, 2.0)?;
                centered = b.add_channel_bias(&two, &b.upload(&minus_one)?)?;
                &centered
            } else {
                sample
            };
            let y = b.conv2d(
                input,
                wg.get_shaped("weight", &[c0, c.in_channels, k, k])?,
                Some(wg.get_shaped("bias", &[c0])?),
                Conv2dParams::new(1, k / 2),
            )?;
            b.keep(m, y)?
        };
        let mut skips = vec![(m, x.clone())];
        let ctx = (&emb, ehs);
        for (i, blk) in self.down.iter().enumerate() {
            let p = format!("down_blocks.{i}");
            for (j, r) in blk.resnets.iter().enumerate() {
                let m = b.mark();
                let y = self.run_layer(b, src, (&p, j), r, blk.attentions.get(j), &x, ctx)?;
                x = b.keep(m, y)?;
                skips.push((m, x.clone()));
            }
            if let Some(d) = &blk.sampler {
                let m = b.mark();
                let wg = src.group(comp, &format!("{p}.downsamplers.0"))?;
                let y = d.forward_on(b, &wg, "", &x)?;
                x = b.keep(m, y)?;
                skips.push((m, x.clone()));
            }
        }

        if let Some(mid) = &self.mid {
            let m = b.mark();
            let mut y =
                self.run_resnet(b, src, "mid_block.resnets.0", &mid.resnets[0], &x, &emb)?;
            for (j, (a, r)) in mid.attentions.iter().zip(&mid.resnets[1..]).enumerate() {
                let p = format!("mid_block.attentions.{j}");
                let t = a.forward_on(b, src, comp, &p, &y, ehs)?;
                let p = format!("mid_block.resnets.{}", j + 1);
                y = self.run_resnet(b, src, &p, r, &t, &emb)?;
            }
            x = b.keep(m, y)?;
        }

        for (i, blk) in self.up.iter().enumerate() {
            let p = format!("up_blocks.{i}");
            let no_skip = || Error::InvalidArgument(format!("{p}: no skip connection left"));
            // Where the current `x` was kept: the upsampler's output replaces it there.
            let mut x_mark = None;
            for (j, r) in blk.resnets.iter().enumerate() {
                let (m, skip) = skips.pop().ok_or_else(no_skip)?;
                let cat = b.cat_channels(&x, &skip)?;
                let y = self.run_layer(b, src, (&p, j), r, blk.attentions.get(j), &cat, ctx)?;
                // Frees the skip, the previous `x` and the concatenation (all above `m`).
                x = b.keep(m, y)?;
                x_mark = Some(m);
            }
            if let Some(u) = &blk.sampler {
                let wg = src.group(comp, &format!("{p}.upsamplers.0"))?;
                // Upsample to the next skip's size (diffusers' `upsample_size`): 2× unless the
                // sample size is not a multiple of 2^upsamplers.
                let target = skips
                    .last()
                    .map(|(_, t)| (b.shape(t)[2], b.shape(t)[3]))
                    .ok_or_else(no_skip)?;
                let xs = b.shape(&x);
                let size = (target != (2 * xs[2], 2 * xs[3])).then_some(target);
                let m = x_mark.unwrap_or_else(|| b.mark());
                let y = u.forward_on(b, &wg, "", &x, size)?;
                x = b.keep(m, y)?;
            }
        }

        let wg = src.group(comp, "conv_norm_out")?;
        let y = b.group_norm(
            &x,
            self.groups,
            Some(wg.get_shaped("weight", &[c0])?),
            Some(wg.get_shaped("bias", &[c0])?),
            c.norm_eps,
            true,
        )?;
        drop(wg);
        let wg = src.group(comp, "conv_out")?;
        let k = c.conv_out_kernel;
        let out = b.conv2d(
            &y,
            wg.get_shaped("weight", &[c.out_channels, c0, k, k])?,
            Some(wg.get_shaped("bias", &[c.out_channels])?),
            Conv2dParams::new(1, k / 2),
        )?;
        drop(wg);
        // Only the output survives: the time embedding, the last activation and every
        // temporary since the start are freed.
        b.keep(start, out)
    }
}
