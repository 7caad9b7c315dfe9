//! Single-file original-layout checkpoints (CompVis LDM for SD 1.x / 2.x, Stability's sgm for
//! SDXL): family detection from the keys, and the renaming diffusers' `single_file_utils` does
//! (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
//! `convert_open_clip_checkpoint`), as views on the mapped file.

use super::config;
use super::folder::{read_config, read_index};
use super::{
    err, Backing, Component, Layout, ModelFamily, ModelSource, Result, ShapeMap, SourceFormat,
    TensorRef,
};
use ferry_pager::{DType, TensorInfo, WeightsFile};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

const UNET: &str = "model.diffusion_model.";
const VAE_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];
const SD1_CLIP: &str = "cond_stage_model.transformer.";
const SD2_OPENCLIP: &str = "cond_stage_model.model.";
const XL_CLIP: &str = "conditioner.embedders.0.transformer.";
const XL_OPENCLIP: &str = "conditioner.embedders.1.model.";
const XL_REFINER: &str = "conditioner.embedders.0.model.";

#[derive(Debug)]
pub(super) struct Single {
    components: Vec<Component>,
}

impl Single {
    pub(super) fn component(&self, name: &str) -> Result<Component> {
        // `ModelSource::component` checked the name against the entries built from this list.
        self.components
            .iter()
            .find(|c| c.name == name)
            .cloned()
            .ok_or_else(|| err(Path::new(name), "component not built"))
    }
}

/// A diffusers tensor as a view of a stored one.
struct Mapped {
    name: String,
    src: String,
    shape: Vec<usize>,
    layout: Option<Layout>,
}

impl Mapped {
    fn same(name: String, src: &str, shape: &[usize]) -> Mapped {
        Mapped {
            name,
            src: src.to_string(),
            shape: shape.to_vec(),
            layout: None,
        }
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Detects the model family from the checkpoint's keys.
fn detect(path: &Path, keys: &BTreeSet<&str>, shapes: &ShapeMap<'_>) -> Result<ModelFamily> {
    let any = |p: &str| keys.iter().any(|k| k.starts_with(p));
    if !any(UNET) {
        let mut tops: Vec<&str> = keys
            .iter()
            .map(|k| k.split('.').next().unwrap_or(k))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .take(8)
            .collect();
        tops.dedup();
        return Err(err(
            path,
            format!(
                "unknown checkpoint layout: expected an original SD 1.x / 2.x / SDXL single file \
                 with the UNet under '{UNET}' (or a diffusers folder); found {} tensors with top-level \
                 names {tops:?}",
                keys.len()
            ),
        ));
    }
    if any(XL_REFINER) && !any(XL_OPENCLIP) {
        return Err(err(
            path,
            "SDXL refiner checkpoints are not supported (only SD 1.x, SD 2.x and SDXL base)",
        ));
    }
    if any(XL_OPENCLIP) {
        return Ok(ModelFamily::Sdxl);
    }
    if any(SD2_OPENCLIP) {
        return Ok(ModelFamily::Sd2);
    }
    if any(SD1_CLIP) {
        return Ok(ModelFamily::Sd1);
    }
    // No text encoder: fall back to the UNet's context width, as diffusers does.
    let ctx = shapes
        .iter()
        .find(|(k, _)| k.starts_with(UNET) && k.ends_with(".attn2.to_k.weight"))
        .and_then(|(_, s)| s.get(1).copied());
    match ctx {
        Some(2048) => Ok(ModelFamily::Sdxl),
        Some(1024) => Ok(ModelFamily::Sd2),
        Some(768) => Ok(ModelFamily::Sd1),
        other => Err(err(
            path,
            format!(
                "cannot tell SD 1.x / 2.x / SDXL apart: no text encoder keys and a UNet context \
                 width of {other:?} (expected 768, 1024 or 2048)"
            ),
        )),
    }
}

fn resnet_rename(rest: &str) -> String {
    const MAP: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ];
    for (old, new) in MAP {
        if let Some(r) = rest.strip_prefix(old) {
            return format!("{new}{r}");
        }
    }
    rest.to_string()
}

/// Splits `"N.rest"` into `(N, "rest")`.
fn num_rest(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

fn unet_name(k: &str, lpb: usize, sdxl: bool) -> Option<String> {
    const TOP: [(&str, &str); 5] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    for (old, new) in TOP {
        if let Some(r) = k.strip_prefix(old) {
            return Some(format!("{new}{r}"));
        }
    }
    if let Some(r) = k.strip_prefix("label_emb.0.") {
        let emb = if sdxl {
            "add_embedding"
        } else {
            "class_embedding"
        };
        let (n, rest) = num_rest(r)?;
        let lin = match n {
            0 => "linear_1",
            2 => "linear_2",
            _ => return None,
        };
        return Some(format!("{emb}.{lin}.{rest}"));
    }
    if let Some(r) = k.strip_prefix("input_blocks.") {
        let (i, r) = num_rest(r)?;
        let (j, rest) = num_rest(r)?;
        if i == 0 {
            return None;
        }
        let (b, l) = ((i - 1) / (lpb + 1), (i - 1) % (lpb + 1));
        return match j {
            0 => Some(match rest.strip_prefix("op.") {
                Some(p) => format!("down_blocks.{b}.downsamplers.0.conv.{p}"),
                None => format!("down_blocks.{b}.resnets.{l}.{}", resnet_rename(rest)),
            }),
            1 => Some(format!("down_blocks.{b}.attentions.{l}.{rest}")),
            _ => None,
        };
    }
    if let Some(r) = k.strip_prefix("middle_block.") {
        let (j, rest) = num_rest(r)?;
        return match j {
            0 | 2 => Some(format!(
                "mid_block.resnets.{}.{}",
                j / 2,
                resnet_rename(rest)
            )),
            1 => Some(format!("mid_block.attentions.0.{rest}")),
            _ => None,
        };
    }
    if let Some(r) = k.strip_prefix("output_blocks.") {
        let (i, r) = num_rest(r)?;
        let (j, rest) = num_rest(r)?;
        let (b, l) = (i / (lpb + 1), i % (lpb + 1));
        return match (j, rest.strip_prefix("conv.")) {
            (0, _) => Some(format!("up_blocks.{b}.resnets.{l}.{}", resnet_rename(rest))),
            (1 | 2, Some(p)) => Some(format!("up_blocks.{b}.upsamplers.0.conv.{p}")),
            (1, None) => Some(format!("up_blocks.{b}.attentions.{l}.{rest}")),
            _ => None,
        };
    }
    None
}

fn vae_resnet(rest: &str) -> String {
    rest.replacen("nin_shortcut.", "conv_shortcut.", 1)
}

/// Diffusers name of an LDM VAE key (prefix removed), and whether it is an attention weight
/// stored as a convolution (to squeeze).
fn vae_name(k: &str, levels: usize) -> Option<(String, bool)> {
    let (side, r) = k.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return match k {
            _ if k.starts_with("quant_conv.") || k.starts_with("post_quant_conv.") => {
                Some((k.to_string(), false))
            }
            _ => None,
        };
    }
    let plain = |s: String| Some((format!("{side}.{s}"), false));
    for top in ["conv_in.", "conv_out."] {
        if r.starts_with(top) {
            return plain(r.to_string());
        }
    }
    if let Some(p) = r.strip_prefix("norm_out.") {
        return plain(format!("conv_norm_out.{p}"));
    }
    if let Some(r2) = r.strip_prefix("down.") {
        let (i, rest) = num_rest(r2)?;
        if let Some(p) = rest.strip_prefix("downsample.conv.") {
            return plain(format!("down_blocks.{i}.downsamplers.0.conv.{p}"));
        }
        let (j, p) = num_rest(rest.strip_prefix("block.")?)?;
        return plain(format!("down_blocks.{i}.resnets.{j}.{}", vae_resnet(p)));
    }
    if let Some(r2) = r.strip_prefix("up.") {
        let (i, rest) = num_rest(r2)?;
        let b = levels.checked_sub(1 + i)?;
        if let Some(p) = rest.strip_prefix("upsample.conv.") {
            return plain(format!("up_blocks.{b}.upsamplers.0.conv.{p}"));
        }
        let (j, p) = num_rest(rest.strip_prefix("block.")?)?;
        return plain(format!("up_blocks.{b}.resnets.{j}.{}", vae_resnet(p)));
    }
    if let Some(r2) = r.strip_prefix("mid.block_") {
        let (n, p) = num_rest(r2)?;
        return plain(format!(
            "mid_block.resnets.{}.{}",
            n.checked_sub(1)?,
            vae_resnet(p)
        ));
    }
    if let Some(p) = r.strip_prefix("mid.attn_1.") {
        let (param, leaf) = p.rsplit_once('.')?;
        let new = match param {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        return Some((
            format!("{side}.mid_block.attentions.0.{new}.{leaf}"),
            leaf == "weight" && param != "norm",
        ));
    }
    None
}

/// OpenCLIP (`open_clip` text tower) names to transformers' CLIP names, splitting fused q/k/v.
fn openclip_map(
    path: &Path,
    prefix: &str,
    keys: &BTreeSet<&str>,
    shapes: &ShapeMap<'_>,
    with_projection: bool,
    drop_layer_23: bool,
    ignored: &mut Vec<String>,
) -> Result<Vec<Mapped>> {
    let mut out = Vec::new();
    for &key in keys.iter().filter(|k| k.starts_with(prefix)) {
        let k = &key[prefix.len()..];
        let s = shapes[key];
        let simple = match k {
            "positional_embedding" => Some("embeddings.position_embedding.weight".to_string()),
            "token_embedding.weight" => Some("embeddings.token_embedding.weight".to_string()),
            _ => k
                .strip_prefix("ln_final.")
                .map(|p| format!("final_layer_norm.{p}")),
        };
        if let Some(name) = simple {
            out.push(Mapped::same(name, key, s));
            continue;
        }
        if k == "text_projection" {
            if !with_projection {
                ignored.push(key.to_string());
                continue;
            }
            if s.len() != 2 {
                return Err(err(
                    path,
                    format!("tensor '{key}': expected a 2-D projection, found shape {s:?}"),
                ));
            }
            out.push(Mapped {
                name: "text_projection.weight".into(),
                src: key.to_string(),
                shape: vec![s[1], s[0]],
                layout: Some(Layout::Transpose {
                    rows: s[0],
                    cols: s[1],
                }),
            });
            continue;
        }
        let Some((layer, rest)) = k.strip_prefix("transformer.resblocks.").and_then(num_rest)
        else {
            ignored.push(key.to_string());
            continue;
        };
        // diffusers drops SD 2's 24th block (the pipeline uses the penultimate layer's output).
        if drop_layer_23 && layer == 23 {
            ignored.push(key.to_string());
            continue;
        }
        let base = format!("encoder.layers.{layer}");
        if let Some(leaf) = rest.strip_prefix("attn.in_proj_") {
            let leaf = match leaf {
                "weight" | "bias" => leaf,
                _ => {
                    ignored.push(key.to_string());
                    continue;
                }
            };
            let rows = s.first().copied().unwrap_or(0);
            if rows == 0 || rows % 3 != 0 {
                return Err(err(
                    path,
                    format!("tensor '{key}': expected 3×width fused q/k/v rows, found shape {s:?}"),
                ));
            }
            let w = rows / 3;
            let row_elems: usize = s[1..].iter().product();
            for (p, qkv) in ["q_proj", "k_proj", "v_proj"].into_iter().enumerate() {
                let mut shape = s.to_vec();
                shape[0] = w;
                out.push(Mapped {
                    name: format!("{base}.self_attn.{qkv}.{leaf}"),
                    src: key.to_string(),
                    shape,
                    // Element offsets; converted to bytes once the dtype is known.
                    layout: Some(Layout::Range {
                        start: p * w * row_elems,
                        len: w * row_elems,
                    }),
                });
            }
            continue;
        }
        const MAP: [(&str, &str); 5] = [
            ("ln_1.", "layer_norm1."),
            ("ln_2.", "layer_norm2."),
            ("mlp.c_fc.", "mlp.fc1."),
            ("mlp.c_proj.", "mlp.fc2."),
            ("attn.out_proj.", "self_attn.out_proj."),
        ];
        match MAP
            .iter()
            .find_map(|(o, n)| rest.strip_prefix(o).map(|p| format!("{n}{p}")))
        {
            Some(r) => out.push(Mapped::same(format!("{base}.{r}"), key, s)),
            None => ignored.push(key.to_string()),
        }
    }
    Ok(out)
}

/// Builds a component's tensors from mapped names.
fn tensors(file: &Arc<WeightsFile>, mapped: Vec<Mapped>) -> Result<Vec<TensorRef>> {
    let mut seen = HashMap::new();
    let mut out = Vec::with_capacity(mapped.len());
    for m in mapped {
        let info: &TensorInfo = file.info(&m.src).ok_or_else(|| {
            err(
                file.path(),
                format!("tensor '{}' vanished from the index", m.src),
            )
        })?;
        if let Some(prev) = seen.insert(m.name.clone(), m.src.clone()) {
            return Err(err(
                file.path(),
                format!("tensors '{prev}' and '{}' both map to '{}'", m.src, m.name),
            ));
        }
        let es = info.dtype.size();
        let layout = match m.layout {
            None => Layout::Range {
                start: 0,
                len: info.len,
            },
            // Range offsets from the mappers are in elements.
            Some(Layout::Range { start, len }) => Layout::Range {
                start: start * es,
                len: len * es,
            },
            Some(t) => t,
        };
        out.push(TensorRef {
            name: m.name,
            dtype: info.dtype,
            shape: m.shape,
            file: Arc::clone(file),
            stored: info.clone(),
            layout,
        });
    }
    out.sort_by_key(|t| {
        let start = match t.layout {
            Layout::Range { start, .. } => start,
            Layout::Transpose { .. } => 0,
        };
        (t.stored.offset, start)
    });
    Ok(out)
}

/// Strips `prefix` from the keys under it.
fn sub_shapes<'a>(shapes: &ShapeMap<'a>, prefix: &str) -> ShapeMap<'a> {
    shapes
        .iter()
        .filter_map(|(k, s)| k.strip_prefix(prefix).map(|r| (r, *s)))
        .collect()
}

fn component(
    name: &str,
    library: &str,
    class: &str,
    config: &Value,
    tensors: Vec<TensorRef>,
) -> Component {
    Component {
        name: name.to_string(),
        library: library.to_string(),
        class_name: class.to_string(),
        config_json: serde_json::to_string_pretty(config).unwrap_or_default(),
        dir: None,
        tensors,
    }
}

pub(super) fn open(path: &Path, config_from: Option<&Path>) -> Result<ModelSource> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") {
        return Err(err(
            path,
            format!(
                "'.{ext}' checkpoints are pickled PyTorch files, which are not supported: convert \
                 it to .safetensors (or use a diffusers folder)"
            ),
        ));
    }
    let file = Arc::new(WeightsFile::open(path)?);
    let shapes: ShapeMap<'_> = file
        .tensors()
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    let keys: BTreeSet<&str> = shapes.keys().copied().collect();
    let family = detect(path, &keys, &shapes)?;
    let sdxl = family == ModelFamily::Sdxl;
    let mut warnings = Vec::new();
    let mut ignored: Vec<String> = Vec::new();
    let mut comps: Vec<Component> = Vec::new();
    let mut used: BTreeSet<String> = BTreeSet::new();

    // Text encoders first: SDXL's UNet config needs encoder 2's projection width.
    let mut pooled_dim = None;
    let clip_prefix = if sdxl { XL_CLIP } else { SD1_CLIP };
    let mut text = Vec::new();
    if family != ModelFamily::Sd2 && keys.iter().any(|k| k.starts_with(clip_prefix)) {
        let mut mapped = Vec::new();
        for &key in keys.iter().filter(|k| k.starts_with(clip_prefix)) {
            let rest = &key[clip_prefix.len()..];
            let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
            if rest.ends_with("position_ids") {
                ignored.push(key.to_string());
                continue;
            }
            mapped.push(Mapped::same(rest.to_string(), key, shapes[key]));
        }
        text.push(("text_encoder", "CLIPTextModel", false, mapped));
    }
    let open_prefix = if sdxl { XL_OPENCLIP } else { SD2_OPENCLIP };
    if family != ModelFamily::Sd1 && keys.iter().any(|k| k.starts_with(open_prefix)) {
        let mapped = openclip_map(
            path,
            open_prefix,
            &keys,
            &shapes,
            sdxl,
            family == ModelFamily::Sd2,
            &mut ignored,
        )?;
        let (name, class) = if sdxl {
            ("text_encoder_2", "CLIPTextModelWithProjection")
        } else {
            ("text_encoder", "CLIPTextModel")
        };
        text.push((name, class, true, mapped));
    }
    for (name, class, openclip, mapped) in text {
        used.extend(mapped.iter().map(|m| m.src.clone()));
        let ts = tensors(&file, mapped)?;
        let tshapes: ShapeMap<'_> = ts
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        let dtype = ts
            .iter()
            .find(|t| t.name == "embeddings.token_embedding.weight")
            .map_or(DType::F32, |t| t.dtype);
        let cfg = config::text_config(
            path,
            name,
            &tshapes,
            openclip,
            dtype_name(dtype),
            &mut warnings,
        )?;
        if let Some(p) = cfg.get("projection_dim").and_then(|v| v.as_u64()) {
            if class == "CLIPTextModelWithProjection" {
                pooled_dim = Some(p as usize);
            }
        }
        comps.push(component(name, "transformers", class, &cfg, ts));
    }

    // UNet.
    let ushapes = sub_shapes(&shapes, UNET);
    let layout = config::unet_config(path, family, &ushapes, pooled_dim, &mut warnings)?;
    let mut mapped = Vec::new();
    for (&k, &s) in &ushapes {
        let key = format!("{UNET}{k}");
        match unet_name(k, layout.layers_per_block, sdxl) {
            Some(n) => mapped.push(Mapped::same(n, &key, s)),
            None => ignored.push(key),
        }
    }
    used.extend(mapped.iter().map(|m| m.src.clone()));
    comps.push(component(
        "unet",
        "diffusers",
        "UNet2DConditionModel",
        &layout.config,
        tensors(&file, mapped)?,
    ));

    // VAE.
    if let Some(prefix) = VAE_PREFIXES
        .iter()
        .find(|p| keys.iter().any(|k| k.starts_with(*p)))
    {
        let vshapes = sub_shapes(&shapes, prefix);
        let (cfg, levels) = config::vae_config(path, family, &vshapes, &mut warnings)?;
        let mut mapped = Vec::new();
        for (&k, &s) in &vshapes {
            let key = format!("{prefix}{k}");
            match vae_name(k, levels) {
                Some((n, squeeze)) => {
                    let mut shape = s.to_vec();
                    if squeeze && shape.len() > 2 {
                        if shape[2..].iter().any(|&d| d != 1) {
                            return Err(err(
                                path,
                                format!(
                                    "tensor '{key}': expected a 1×1 convolution, found shape {s:?}"
                                ),
                            ));
                        }
                        shape.truncate(2);
                    }
                    mapped.push(Mapped {
                        name: n,
                        src: key,
                        shape,
                        layout: None,
                    });
                }
                None => ignored.push(key),
            }
        }
        used.extend(mapped.iter().map(|m| m.src.clone()));
        comps.push(component(
            "vae",
            "diffusers",
            "AutoencoderKL",
            &cfg,
            tensors(&file, mapped)?,
        ));
    }

    // Tokenizers and scheduler.
    let tok_pad: Vec<(&str, &str)> = match family {
        ModelFamily::Sd1 => vec![("tokenizer", "<|endoftext|>")],
        ModelFamily::Sd2 => vec![("tokenizer", "!")],
        ModelFamily::Sdxl => vec![("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")],
    };
    for (name, pad) in tok_pad {
        let enc = if name == "tokenizer" {
            "text_encoder"
        } else {
            "text_encoder_2"
        };
        if comps.iter().any(|c| c.name == enc) {
            comps.push(component(
                name,
                "transformers",
                "CLIPTokenizer",
                &config::tokenizer_config(pad),
                Vec::new(),
            ));
        }
    }
    let sched = config::scheduler_config(family);
    let sched_class = sched
        .get("_class_name")
        .and_then(|v| v.as_str())
        .unwrap_or("PNDMScheduler")
        .to_string();
    comps.push(component(
        "scheduler",
        "diffusers",
        &sched_class,
        &sched,
        Vec::new(),
    ));

    for k in keys.iter().filter(|k| !used.contains(**k)) {
        if !ignored.iter().any(|i| i == k) {
            ignored.push(k.to_string());
        }
    }
    // Buffers and training state that diffusers drops too; anything else is worth a note.
    let expected_unused = |k: &str| {
        k.starts_with("model_ema.")
            || k.ends_with("position_ids")
            || k.ends_with("logit_scale")
            || k.ends_with("text_projection")
            || (!k.contains('.'))
            || (family == ModelFamily::Sd2 && k.contains(".resblocks.23."))
    };
    let surprising: Vec<&String> = ignored.iter().filter(|k| !expected_unused(k)).collect();
    if !surprising.is_empty() {
        warnings.push(format!(
            "{} checkpoint tensors are not used: {}",
            surprising.len(),
            surprising
                .iter()
                .take(10)
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    sort_components(&mut comps);
    let mut index = serde_json::Map::new();
    index.insert(
        "_class_name".into(),
        json!(if sdxl {
            "StableDiffusionXLPipeline"
        } else {
            "StableDiffusionPipeline"
        }),
    );
    if sdxl {
        index.insert("force_zeros_for_empty_prompt".into(), json!(true));
    } else {
        index.insert("requires_safety_checker".into(), json!(false));
    }
    for c in &comps {
        index.insert(c.name.clone(), json!([c.library, c.class_name]));
    }
    let mut index_json = serde_json::to_string_pretty(&Value::Object(index)).unwrap_or_default();

    if let Some(dir) = config_from {
        index_json = apply_config_folder(path, dir, &mut comps)?;
    }
    let entries = comps
        .iter()
        .map(|c| (c.name.clone(), c.library.clone(), c.class_name.clone()))
        .collect();
    Ok(ModelSource {
        path: path.to_path_buf(),
        format: SourceFormat::SingleFile,
        family,
        model_index_json: index_json,
        entries,
        backing: Backing::Single(Box::new(Single { components: comps })),
        warnings,
    })
}

fn sort_components(comps: &mut [Component]) {
    comps.sort_by(|a, b| a.name.cmp(&b.name));
}

/// Fields of each config that the tensor shapes determine; a config folder must agree on them.
fn shape_fields(class: &str) -> &'static [&'static str] {
    match class {
        "UNet2DConditionModel" => &[
            "block_out_channels",
            "layers_per_block",
            "cross_attention_dim",
            "in_channels",
            "out_channels",
            "down_block_types",
            "up_block_types",
            "use_linear_projection",
            "transformer_layers_per_block",
            "projection_class_embeddings_input_dim",
            "addition_time_embed_dim",
        ],
        "AutoencoderKL" => &[
            "block_out_channels",
            "layers_per_block",
            "latent_channels",
            "in_channels",
            "out_channels",
        ],
        c if c.starts_with("CLIPText") => &[
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
        ],
        _ => &[],
    }
}

/// An int `transformer_layers_per_block` means the same value for every level.
fn normalize_field(field: &str, v: &Value, levels: usize) -> Value {
    match (field, v) {
        ("transformer_layers_per_block", Value::Number(_)) => Value::Array(vec![v.clone(); levels]),
        _ => v.clone(),
    }
}

/// Replaces derived configs with a diffusers folder's (checking they fit the file's shapes) and
/// returns the folder's `model_index.json`.
fn apply_config_folder(path: &Path, dir: &Path, comps: &mut [Component]) -> Result<String> {
    let (index_text, entries) = read_index(dir)?;
    for c in comps.iter_mut() {
        let Some((_, lib, class)) = entries.iter().find(|e| e.0 == c.name) else {
            continue;
        };
        let text = read_config(dir, &c.name, class)?;
        let theirs = crate::json::parse(&text)
            .map_err(|e| err(&dir.join(&c.name), format!("config is not valid JSON: {e}")))?;
        let ours = c.config()?;
        let levels = ours
            .get("block_out_channels")
            .and_then(|v| v.as_array())
            .map_or(1, |a| a.len());
        let mut fields: Vec<&str> = shape_fields(&c.class_name).to_vec();
        if class == "CLIPTextModelWithProjection" && c.class_name == class.as_str() {
            fields.push("projection_dim");
        }
        for f in fields {
            let (a, b) = (ours.get(f), theirs.get(f));
            let a = a.map(|v| normalize_field(f, v, levels));
            let b = b.map(|v| normalize_field(f, v, levels));
            if a != b {
                return Err(err(
                    path,
                    format!(
                        "{}: the checkpoint's shapes give {f} = {}, but {} says {}",
                        c.name,
                        a.map_or("nothing".to_string(), |v| v.to_string()),
                        dir.join(&c.name).display(),
                        b.map_or("nothing".to_string(), |v| v.to_string()),
                    ),
                ));
            }
        }
        c.config_json = text;
        c.library = lib.clone();
        c.class_name = class.clone();
        if super::folder::is_tokenizer(class) {
            c.dir = Some(dir.join(&c.name));
        }
    }
    Ok(index_text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_names_follow_diffusers() {
        let n = |k| unet_name(k, 2, false);
        assert_eq!(
            n("input_blocks.0.0.weight").as_deref(),
            Some("conv_in.weight")
        );
        assert_eq!(
            n("input_blocks.4.0.in_layers.2.weight").as_deref(),
            Some("down_blocks.1.resnets.0.conv1.weight")
        );
        assert_eq!(
            n("input_blocks.3.0.op.bias").as_deref(),
            Some("down_blocks.0.downsamplers.0.conv.bias")
        );
        assert_eq!(
            n("input_blocks.2.1.proj_in.weight").as_deref(),
            Some("down_blocks.0.attentions.1.proj_in.weight")
        );
        assert_eq!(
            n("middle_block.2.skip_connection.weight").as_deref(),
            Some("mid_block.resnets.1.conv_shortcut.weight")
        );
        assert_eq!(
            n("output_blocks.2.1.conv.weight").as_deref(),
            Some("up_blocks.0.upsamplers.0.conv.weight")
        );
        assert_eq!(
            n("output_blocks.5.2.conv.bias").as_deref(),
            Some("up_blocks.1.upsamplers.0.conv.bias")
        );
        assert_eq!(
            n("output_blocks.4.1.transformer_blocks.0.attn1.to_q.weight").as_deref(),
            Some("up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q.weight")
        );
        assert_eq!(
            unet_name("label_emb.0.2.bias", 2, true).as_deref(),
            Some("add_embedding.linear_2.bias")
        );
        assert_eq!(n("betas"), None);
    }

    #[test]
    fn vae_names_follow_diffusers() {
        assert_eq!(
            vae_name("decoder.up.0.block.1.nin_shortcut.weight", 4),
            Some((
                "decoder.up_blocks.3.resnets.1.conv_shortcut.weight".into(),
                false
            ))
        );
        assert_eq!(
            vae_name("encoder.mid.attn_1.proj_out.weight", 4),
            Some((
                "encoder.mid_block.attentions.0.to_out.0.weight".into(),
                true
            ))
        );
        assert_eq!(
            vae_name("decoder.mid.attn_1.norm.bias", 4),
            Some((
                "decoder.mid_block.attentions.0.group_norm.bias".into(),
                false
            ))
        );
        assert_eq!(vae_name("decoder.up.9.block.0.conv1.weight", 4), None);
    }

    #[test]
    fn indices_parse_numbers() {
        let keys = ["a.0.x", "a.2.y", "a.10.z", "b.1"];
        let got: Vec<usize> = config::indices(keys.iter().copied(), "a.")
            .into_iter()
            .collect();
        assert_eq!(got, vec![0, 2, 10]);
    }
}
