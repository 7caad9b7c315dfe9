//! Component configs derived from a single file's tensor shapes, with the real SD 1.x / 2.x /
//! SDXL values for what shapes cannot tell (head counts, norm groups, VAE scaling, schedulers).

use super::{err, ModelFamily, Result, ShapeMap};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;

/// Looks up a shape, erroring with the key's name when it is missing.
pub(super) fn shape<'a>(
    path: &Path,
    shapes: &ShapeMap<'a>,
    what: &str,
    key: &str,
) -> Result<&'a [usize]> {
    shapes.get(key).copied().ok_or_else(|| {
        err(
            path,
            format!("{what}: expected tensor '{key}', which is missing"),
        )
    })
}

fn dim(path: &Path, s: &[usize], i: usize, key: &str) -> Result<usize> {
    s.get(i).copied().ok_or_else(|| {
        err(
            path,
            format!(
                "tensor '{key}': expected at least {} dimensions, found shape {s:?}",
                i + 1
            ),
        )
    })
}

/// Distinct values of the numeric path component right after `prefix` among `keys`.
pub(super) fn indices<'a>(keys: impl Iterator<Item = &'a str>, prefix: &str) -> BTreeSet<usize> {
    keys.filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The attention head setting diffusers uses for real checkpoints of `family` with these block
/// widths: SD 1.x has 8 heads everywhere (an int); SD 2.x and SDXL have 64-wide heads (a per-block
/// list of head counts). Widths not divisible by 64 get one head per block.
pub fn default_attention_head_dim(family: ModelFamily, block_out_channels: &[usize]) -> Value {
    match family {
        ModelFamily::Sd1 => json!(8),
        _ => Value::Array(
            block_out_channels
                .iter()
                .map(|&c| json!(if c % 64 == 0 { c / 64 } else { 1 }))
                .collect(),
        ),
    }
}

/// The largest of 32, 16, ..., 1 dividing every width (32 for every real SD model).
fn norm_groups(widths: &[usize]) -> usize {
    [32usize, 16, 8, 4, 2, 1]
        .into_iter()
        .find(|g| widths.iter().all(|w| w % g == 0))
        .unwrap_or(1)
}

/// Structure of an LDM UNet read from its keys (prefix `model.diffusion_model.` removed).
#[derive(Debug)]
pub(super) struct UnetLayout {
    pub layers_per_block: usize,
    pub config: Value,
}

/// Derives the diffusers `UNet2DConditionModel` config of an LDM UNet. `pooled_dim` is the width
/// of the pooled text embedding (SDXL: text encoder 2's projection) used to split
/// `label_emb`'s input into time ids and pooled text.
pub(super) fn unet_config(
    path: &Path,
    family: ModelFamily,
    shapes: &ShapeMap<'_>,
    pooled_dim: Option<usize>,
    warnings: &mut Vec<String>,
) -> Result<UnetLayout> {
    const W: &str = "UNet";
    let keys = || shapes.keys().copied();
    let conv_in = shape(path, shapes, W, "input_blocks.0.0.weight")?;
    let in_channels = dim(path, conv_in, 1, "input_blocks.0.0.weight")?;
    let inputs = indices(keys(), "input_blocks.");
    let n_inputs = inputs.iter().next_back().map_or(0, |m| m + 1);
    if n_inputs < 2 || inputs.len() != n_inputs {
        return Err(err(
            path,
            format!("UNet: expected input_blocks 0..N without gaps, found indices {inputs:?}"),
        ));
    }
    let ops: Vec<usize> = (1..n_inputs)
        .filter(|i| shapes.contains_key(format!("input_blocks.{i}.0.op.weight").as_str()))
        .collect();
    let layers_per_block = ops.first().map_or(n_inputs - 1, |&first| first - 1);
    let levels = ops.len() + 1;
    if layers_per_block == 0 || levels * (layers_per_block + 1) != n_inputs {
        return Err(err(
            path,
            format!(
                "UNet: {n_inputs} input blocks with downsamplers at {ops:?} do not form levels of \
                 equal depth"
            ),
        ));
    }
    let has = |prefix: &str| keys().any(|k| k.starts_with(prefix));
    let mut block_out_channels = Vec::new();
    let mut down_types = Vec::new();
    let mut depth = Vec::new();
    for b in 0..levels {
        let i = b * (layers_per_block + 1) + 1;
        let key = format!("input_blocks.{i}.0.out_layers.3.weight");
        block_out_channels.push(dim(path, shape(path, shapes, W, &key)?, 0, &key)?);
        let attn = format!("input_blocks.{i}.1.");
        if has(&attn) {
            down_types.push("CrossAttnDownBlock2D");
            let d = indices(keys(), &format!("{attn}transformer_blocks.")).len();
            depth.push(d.max(1));
        } else {
            down_types.push("DownBlock2D");
            depth.push(1);
        }
    }
    let n_outputs = indices(keys(), "output_blocks.").len();
    if n_outputs != n_inputs {
        return Err(err(
            path,
            format!("UNet: {n_inputs} input blocks but {n_outputs} output blocks"),
        ));
    }
    let mut up_types = Vec::new();
    for u in 0..levels {
        let i = u * (layers_per_block + 1);
        let attn = format!("output_blocks.{i}.1.transformer_blocks.");
        up_types.push(if has(&attn) {
            "CrossAttnUpBlock2D"
        } else {
            "UpBlock2D"
        });
    }
    let mid_type = if has("middle_block.1.transformer_blocks.") {
        "UNetMidBlock2DCrossAttn"
    } else {
        return Err(err(
            path,
            "UNet: expected a cross-attention middle block (middle_block.1.transformer_blocks.*)",
        ));
    };
    let mut cross = None;
    let mut linear = None;
    for (k, s) in shapes.iter() {
        if cross.is_none() && k.ends_with(".attn2.to_k.weight") {
            cross = Some(dim(path, s, 1, k)?);
        }
        if linear.is_none() && k.ends_with(".proj_in.weight") {
            linear = Some(s.len() == 2);
        }
    }
    let cross =
        cross.ok_or_else(|| err(path, "UNet: no cross-attention (attn2.to_k) weights found"))?;
    let out_key = "out.2.weight";
    let out_channels = dim(path, shape(path, shapes, W, out_key)?, 0, out_key)?;
    let transformer_layers: Value = if depth.iter().all(|&d| d == depth[0]) {
        json!(depth[0])
    } else {
        json!(depth)
    };
    let (mut add_type, mut add_time_dim, mut proj_dim, mut class_type) =
        (Value::Null, Value::Null, Value::Null, Value::Null);
    if let Some(s) = shapes.get("label_emb.0.0.weight") {
        let adm_in = dim(path, s, 1, "label_emb.0.0.weight")?;
        proj_dim = json!(adm_in);
        if family == ModelFamily::Sdxl {
            add_type = json!("text_time");
            // adm_in = 6 time ids × time-embed width + pooled text width.
            let pooled = pooled_dim.unwrap_or(1280);
            let time_part = adm_in.saturating_sub(pooled);
            let rem = time_part % 6;
            if adm_in <= pooled || rem != 0 {
                return Err(err(
                    path,
                    format!(
                        "UNet: label_emb takes {adm_in} inputs, not 6 time embeddings plus a pooled \
                         text embedding of {pooled}"
                    ),
                ));
            }
            add_time_dim = json!(time_part / 6);
        } else {
            class_type = json!("projection");
        }
    }
    let groups = norm_groups(&block_out_channels);
    if groups != 32 {
        warnings.push(format!(
            "UNet: widths {block_out_channels:?} are not multiples of 32; norm_num_groups set to \
             {groups} (pass a config folder for the real value)"
        ));
    }
    let head_dim = default_attention_head_dim(family, &block_out_channels);
    if family != ModelFamily::Sd1 && block_out_channels.iter().any(|c| c % 64 != 0) {
        warnings.push(
            "UNet: widths are not multiples of 64; attention head counts guessed as 1 (pass a \
             config folder for the real values)"
                .to_string(),
        );
    }
    let sample_size = match family {
        ModelFamily::Sd1 => 64,
        ModelFamily::Sd2 => 96,
        ModelFamily::Sdxl => 128,
    };
    let mut config = json!({
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": add_type,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": add_time_dim,
        "attention_head_dim": head_dim,
        "attention_type": "default",
        "block_out_channels": block_out_channels,
        "center_input_sample": false,
        "class_embed_type": class_type,
        "class_embeddings_concat": false,
        "conv_in_kernel": conv_in.get(2).copied().unwrap_or(3),
        "conv_out_kernel": 3,
        "cross_attention_dim": cross,
        "cross_attention_norm": null,
        "down_block_types": down_types,
        "downsample_padding": 1,
        "dropout": 0.0,
        "dual_cross_attention": false,
        "encoder_hid_dim": null,
        "encoder_hid_dim_type": null,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": in_channels,
        "layers_per_block": layers_per_block,
    });
    // Two literals: one would exceed `json!`'s macro recursion limit.
    let rest = json!({
        "mid_block_only_cross_attention": null,
        "mid_block_scale_factor": 1,
        "mid_block_type": mid_type,
        "norm_eps": 1e-05,
        "norm_num_groups": groups,
        "num_attention_heads": null,
        "num_class_embeds": null,
        "only_cross_attention": false,
        "out_channels": out_channels,
        "projection_class_embeddings_input_dim": proj_dim,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": false,
        "resnet_time_scale_shift": "default",
        "reverse_transformer_layers_per_block": null,
        "sample_size": sample_size,
        "time_cond_proj_dim": null,
        "time_embedding_act_fn": null,
        "time_embedding_dim": null,
        "time_embedding_type": "positional",
        "timestep_post_act": null,
        "transformer_layers_per_block": transformer_layers,
        "up_block_types": up_types,
        // diffusers' default for SD 2.x single files is SD 2.1 (768-v), which upcasts.
        "upcast_attention": family == ModelFamily::Sd2,
        "use_linear_projection": linear.unwrap_or(false),
    });
    if let (Some(c), Value::Object(r)) = (config.as_object_mut(), rest) {
        c.extend(r);
    }
    Ok(UnetLayout {
        layers_per_block,
        config,
    })
}

/// Derives the diffusers `AutoencoderKL` config of an LDM VAE (prefix removed), and returns the
/// number of up levels (to reverse `decoder.up.I`).
pub(super) fn vae_config(
    path: &Path,
    family: ModelFamily,
    shapes: &ShapeMap<'_>,
    warnings: &mut Vec<String>,
) -> Result<(Value, usize)> {
    const W: &str = "VAE";
    let keys = || shapes.keys().copied();
    let conv_in = shape(path, shapes, W, "encoder.conv_in.weight")?;
    let in_channels = dim(path, conv_in, 1, "encoder.conv_in.weight")?;
    let levels = indices(keys(), "encoder.down.").len();
    let up_levels = indices(keys(), "decoder.up.").len();
    if levels == 0 || levels != up_levels {
        return Err(err(
            path,
            format!("VAE: {levels} encoder levels but {up_levels} decoder levels"),
        ));
    }
    let layers = indices(keys(), "encoder.down.0.block.").len();
    let mut channels = Vec::new();
    for i in 0..levels {
        let key = format!("encoder.down.{i}.block.0.conv1.weight");
        channels.push(dim(path, shape(path, shapes, W, &key)?, 0, &key)?);
    }
    let latent_key = "decoder.conv_in.weight";
    let latent = dim(path, shape(path, shapes, W, latent_key)?, 1, latent_key)?;
    let out_key = "decoder.conv_out.weight";
    let out_channels = dim(path, shape(path, shapes, W, out_key)?, 0, out_key)?;
    let groups = norm_groups(&channels);
    if groups != 32 {
        warnings.push(format!(
            "VAE: widths {channels:?} are not multiples of 32; norm_num_groups set to {groups} \
             (pass a config folder for the real value)"
        ));
    }
    let sdxl = family == ModelFamily::Sdxl;
    let config = json!({
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "force_upcast": sdxl,
        "in_channels": in_channels,
        "latent_channels": latent,
        "latents_mean": null,
        "latents_std": null,
        "layers_per_block": layers,
        "mid_block_add_attention": shapes.contains_key("encoder.mid.attn_1.q.weight"),
        "norm_num_groups": groups,
        "out_channels": out_channels,
        "sample_size": match family { ModelFamily::Sd1 => 512, ModelFamily::Sd2 => 768, ModelFamily::Sdxl => 1024 },
        "scaling_factor": if sdxl { 0.13025 } else { 0.18215 },
        "shift_factor": null,
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "use_post_quant_conv": shapes.contains_key("post_quant_conv.weight"),
        "use_quant_conv": shapes.contains_key("quant_conv.weight"),
    });
    Ok((config, levels))
}

/// Derives a transformers CLIP text config from the converted (diffusers-named) shapes.
/// `openclip` selects OpenCLIP's `gelu` (SD 2.x, SDXL encoder 2) over CLIP's `quick_gelu`.
pub(super) fn text_config(
    path: &Path,
    what: &str,
    shapes: &ShapeMap<'_>,
    openclip: bool,
    dtype: &str,
    warnings: &mut Vec<String>,
) -> Result<Value> {
    let tok_key = "embeddings.token_embedding.weight";
    let tok = shape(path, shapes, what, tok_key)?;
    let (vocab, width) = (dim(path, tok, 0, tok_key)?, dim(path, tok, 1, tok_key)?);
    let pos_key = "embeddings.position_embedding.weight";
    let positions = dim(path, shape(path, shapes, what, pos_key)?, 0, pos_key)?;
    let layers = indices(shapes.keys().copied(), "encoder.layers.").len();
    if layers == 0 {
        return Err(err(path, format!("{what}: no encoder layers found")));
    }
    let fc1 = "encoder.layers.0.mlp.fc1.weight";
    let intermediate = dim(path, shape(path, shapes, what, fc1)?, 0, fc1)?;
    let heads = if width % 64 == 0 {
        width / 64
    } else {
        warnings.push(format!(
            "{what}: width {width} is not a multiple of 64; num_attention_heads guessed as 1 (pass \
             a config folder for the real value)"
        ));
        1
    };
    let projection = match shapes.get("text_projection.weight") {
        Some(s) => Some(dim(path, s, 0, "text_projection.weight")?),
        None => None,
    };
    Ok(json!({
        "architectures": [if projection.is_some() { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
        "attention_dropout": 0.0,
        "bos_token_id": 49406,
        "dtype": dtype,
        "eos_token_id": 49407,
        "hidden_act": if openclip { "gelu" } else { "quick_gelu" },
        "hidden_size": width,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": positions,
        "model_type": "clip_text_model",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": projection.unwrap_or(width),
        "vocab_size": vocab,
    }))
}

/// The scheduler config diffusers uses for single files of `family`: SD 1.5's PNDM, SD 2.1's
/// v-prediction DDIM, SDXL base's Euler.
pub(super) fn scheduler_config(family: ModelFamily) -> Value {
    // Exactly the keys of the real repos' files: a key that is absent behaves differently from a
    // default-valued one when another scheduler is built from the config (diffusers'
    // `_use_default_values`), e.g. Euler from SD 1.5's PNDM config uses "linspace" spacing.
    let mut base = json!({
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null,
    });
    let extra = match family {
        ModelFamily::Sd1 => json!({"_class_name": "PNDMScheduler"}),
        ModelFamily::Sd2 => json!({
            "_class_name": "DDIMScheduler",
            "prediction_type": "v_prediction",
        }),
        ModelFamily::Sdxl => json!({
            "_class_name": "EulerDiscreteScheduler",
            "interpolation_type": "linear",
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "timestep_spacing": "leading",
            "use_karras_sigmas": false,
        }),
    };
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}

/// A CLIP `tokenizer_config.json` padding with `pad` (`<|endoftext|>` or `!`).
pub(super) fn tokenizer_config(pad: &str) -> Value {
    json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "model_max_length": 77,
        "pad_token": pad,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    })
}
