//! Diffusers folders: `model_index.json`, per-component configs, safetensors weights (plain,
//! variant, sharded), with the name normalisations real folders of different ages need.

use super::{
    err, normalize_text_config, parse_object, Backing, Component, Layout, LoadError, ModelFamily,
    ModelSource, Result, SourceFormat, TensorRef,
};
use ferry_pager::WeightsFile;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug)]
pub(super) struct Folder {
    dir: PathBuf,
    variant: Option<String>,
}

/// A `model_index.json` entry: (component name, library, class).
pub(super) type Entry = (String, String, String);

/// Whether a component class is a tokenizer (no weights; config `tokenizer_config.json`).
pub(super) fn is_tokenizer(class: &str) -> bool {
    class.contains("Tokenizer")
}

/// Whether a component class is a scheduler.
pub(super) fn is_scheduler(class: &str) -> bool {
    class.contains("Scheduler")
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        what: "cannot read",
        source,
    })
}

/// Reads `model_index.json` of `dir`: its text and its non-null (name, library, class) entries.
pub(super) fn read_index(dir: &Path) -> Result<(String, Vec<Entry>)> {
    let index_path = dir.join("model_index.json");
    if !index_path.is_file() {
        return Err(err(
            dir,
            "not a diffusers folder: model_index.json is missing (expected a folder written by \
             save_pretrained, or a single .safetensors file)",
        ));
    }
    let text = read_text(&index_path)?;
    let obj = parse_object(&index_path, &text)?;
    let mut entries = Vec::new();
    for (name, v) in &obj {
        if name.starts_with('_') {
            continue;
        }
        let Some(arr) = v.as_array() else { continue };
        if arr.len() != 2 || arr.iter().any(|x| x.is_null()) {
            continue;
        }
        match (arr[0].as_str(), arr[1].as_str()) {
            (Some(lib), Some(class)) => {
                entries.push((name.clone(), lib.to_string(), class.to_string()))
            }
            _ => {
                return Err(err(
                    &index_path,
                    format!("component '{name}' must be [library, class] strings, found {v}"),
                ))
            }
        }
    }
    if entries.is_empty() {
        return Err(err(&index_path, "lists no components"));
    }
    Ok((text, entries))
}

/// Reads a component's configuration text (`config.json`, `scheduler_config.json` or
/// `tokenizer_config.json`), normalised where needed.
pub(super) fn read_config(dir: &Path, name: &str, class: &str) -> Result<String> {
    let file = if is_tokenizer(class) {
        "tokenizer_config.json"
    } else if is_scheduler(class) {
        "scheduler_config.json"
    } else {
        "config.json"
    };
    let path = dir.join(name).join(file);
    let text = read_text(&path)?;
    if class.starts_with("CLIPText") {
        normalize_text_config(&path, &text)
    } else {
        parse_object(&path, &text)?;
        Ok(text)
    }
}

pub(super) fn open(dir: &Path, variant: Option<&str>) -> Result<ModelSource> {
    let (index_text, entries) = read_index(dir)?;
    let index = parse_object(&dir.join("model_index.json"), &index_text)?;
    let class = index
        .get("_class_name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let family = if class.contains("XL") || entries.iter().any(|e| e.0 == "text_encoder_2") {
        ModelFamily::Sdxl
    } else {
        // SD 2.x UNets use linear projections in their transformers; SD 1.x ones 1×1 convs.
        let linear = read_text(&dir.join("unet").join("config.json"))
            .ok()
            .and_then(|t| crate::json::parse(&t).ok())
            .and_then(|v| v.get("use_linear_projection").and_then(|b| b.as_bool()))
            .unwrap_or(false);
        if linear {
            ModelFamily::Sd2
        } else {
            ModelFamily::Sd1
        }
    };
    Ok(ModelSource {
        path: dir.to_path_buf(),
        format: SourceFormat::Diffusers,
        family,
        model_index_json: index_text,
        entries,
        backing: Backing::Folder(Folder {
            dir: dir.to_path_buf(),
            variant: variant.map(str::to_string),
        }),
        warnings: Vec::new(),
    })
}

/// The weight files of a component: one file, or the shards listed by an index.
enum WeightSet {
    Single(PathBuf),
    Sharded(PathBuf),
}

fn find_weights(cdir: &Path, stem: &str, variant: Option<&str>) -> Result<WeightSet> {
    let single = |v: Option<&str>| match v {
        Some(v) => cdir.join(format!("{stem}.{v}.safetensors")),
        None => cdir.join(format!("{stem}.safetensors")),
    };
    let index = |v: Option<&str>| match v {
        Some(v) => vec![
            cdir.join(format!("{stem}.safetensors.index.{v}.json")),
            cdir.join(format!("{stem}.{v}.safetensors.index.json")),
        ],
        None => vec![cdir.join(format!("{stem}.safetensors.index.json"))],
    };
    let try_variant = |v: Option<&str>| -> Option<WeightSet> {
        let s = single(v);
        if s.is_file() {
            return Some(WeightSet::Single(s));
        }
        index(v)
            .into_iter()
            .find(|p| p.is_file())
            .map(WeightSet::Sharded)
    };
    if let Some(v) = variant {
        if let Some(w) = try_variant(Some(v)) {
            return Ok(w);
        }
    }
    if let Some(w) = try_variant(None) {
        return Ok(w);
    }
    // Only variant files present (some repos ship just fp16): take one, fp16 first.
    let mut listing: Vec<String> = std::fs::read_dir(cdir)
        .map_err(|source| LoadError::Io {
            path: cdir.to_path_buf(),
            what: "cannot list component folder",
            source,
        })?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    listing.sort();
    let mut variants: Vec<&str> = listing
        .iter()
        .filter_map(|n| n.strip_prefix(&format!("{stem}.")))
        .filter_map(|n| n.strip_suffix(".safetensors"))
        .filter(|v| !v.contains('.') && !v.contains('-'))
        .collect();
    variants.sort_by_key(|v| (*v != "fp16", v.to_string()));
    if let Some(v) = variants.first() {
        return Ok(WeightSet::Single(single(Some(v))));
    }
    let others: Vec<&String> = listing
        .iter()
        .filter(|n| n.ends_with(".bin") || n.ends_with(".ckpt") || n.ends_with(".safetensors"))
        .collect();
    Err(err(
        cdir,
        format!(
            "no weights: expected {stem}.safetensors{} (or a sharded {stem}.safetensors.index.json); found {}",
            variant.map(|v| format!(" or {stem}.{v}.safetensors")).unwrap_or_default(),
            if others.is_empty() {
                "no weight files".to_string()
            } else {
                format!(
                    "{} (only .safetensors is supported)",
                    others.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                )
            }
        ),
    ))
}

fn open_set(set: &WeightSet) -> Result<Vec<Arc<WeightsFile>>> {
    match set {
        WeightSet::Single(p) => Ok(vec![Arc::new(WeightsFile::open(p)?)]),
        WeightSet::Sharded(index) => {
            let text = read_text(index)?;
            let obj = parse_object(index, &text)?;
            let map = obj
                .get("weight_map")
                .and_then(|v| v.as_object())
                .ok_or_else(|| err(index, "missing object 'weight_map'"))?;
            let mut shards: BTreeMap<String, ()> = BTreeMap::new();
            for (k, v) in map {
                let f = v.as_str().ok_or_else(|| {
                    err(index, format!("weight_map entry '{k}' must be a file name"))
                })?;
                if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                    return Err(err(
                        index,
                        format!("weight_map names an odd shard path '{f}'"),
                    ));
                }
                shards.insert(f.to_string(), ());
            }
            let dir = index.parent().unwrap_or(Path::new("."));
            shards
                .keys()
                .map(|f| Ok(Arc::new(WeightsFile::open(dir.join(f))?)))
                .collect()
        }
    }
}

/// Current diffusers name of a VAE attention parameter written by older diffusers.
fn vae_name(name: &str) -> String {
    const OLD: [(&str, &str); 4] = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    if name.contains(".attentions.") {
        for (old, new) in OLD {
            if name.contains(old) {
                return name.replacen(old, new, 1);
            }
        }
    }
    name.to_string()
}

/// Maps a stored name of a component of class `class` to its diffusers name; `None` drops it.
pub(super) fn normalize_name(class: &str, name: &str) -> Option<String> {
    if class.starts_with("CLIPText") {
        if name.ends_with("position_ids") {
            return None;
        }
        return Some(name.strip_prefix("text_model.").unwrap_or(name).to_string());
    }
    if class == "AutoencoderKL" {
        return Some(vae_name(name));
    }
    Some(name.to_string())
}

impl Folder {
    pub(super) fn component(&self, name: &str, library: &str, class: &str) -> Result<Component> {
        let cdir = self.dir.join(name);
        if !cdir.is_dir() {
            return Err(err(
                &cdir,
                format!("component folder '{name}' listed in model_index.json is missing"),
            ));
        }
        let config_json = read_config(&self.dir, name, class)?;
        let mut comp = Component {
            name: name.to_string(),
            library: library.to_string(),
            class_name: class.to_string(),
            config_json,
            dir: Some(cdir.clone()),
            tensors: Vec::new(),
        };
        if is_tokenizer(class) || is_scheduler(class) {
            return Ok(comp);
        }
        let stem = if library == "transformers" {
            "model"
        } else {
            "diffusion_pytorch_model"
        };
        let set = find_weights(&cdir, stem, self.variant.as_deref())?;
        let files = open_set(&set)?;
        let mut seen: HashMap<String, String> = HashMap::new();
        for file in &files {
            for info in file.tensors() {
                let Some(new) = normalize_name(class, &info.name) else {
                    continue;
                };
                if let Some(prev) = seen.insert(new.clone(), info.name.clone()) {
                    return Err(err(
                        file.path(),
                        format!("tensors '{prev}' and '{}' both map to '{new}'", info.name),
                    ));
                }
                let mut shape = info.shape.clone();
                // Old VAE attention weights may be stored as 1×1 convolutions.
                if class == "AutoencoderKL"
                    && new.contains(".attentions.")
                    && new.ends_with(".weight")
                    && shape.len() > 2
                    && shape[2..].iter().all(|&d| d == 1)
                {
                    shape.truncate(2);
                }
                comp.tensors.push(TensorRef {
                    name: new,
                    dtype: info.dtype,
                    shape,
                    file: Arc::clone(file),
                    stored: info.clone(),
                    layout: Layout::Range {
                        start: 0,
                        len: info.len,
                    },
                });
            }
        }
        Ok(comp)
    }
}
