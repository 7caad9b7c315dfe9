//! Checkpoint loaders: diffusers folders and original single-file (LDM / sgm) `.safetensors`
//! checkpoints of SD 1.x, SD 2.x and SDXL, presented the same way.
//!
//! Opening a model reads only small JSON files and safetensors headers; tensor bytes stay in the
//! memory-mapped files until they are read ([`TensorRef::read_as`]) or registered into a
//! [`HostStore`] ([`Component::register_into`]). Every tensor carries its **diffusers name**
//! (text encoders: transformers' names without the `text_model.` prefix, e.g.
//! `encoder.layers.0.self_attn.q_proj.weight`, `text_projection.weight`), whatever layout the
//! checkpoint used.

mod config;
mod folder;
mod single;

use ferry_pager::weights::{byte_len, convert, DType, TensorInfo, WeightsFile};
use ferry_pager::{HostStore, RawTensor, TensorId};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use config::default_attention_head_dim;

/// Errors from opening or reading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The model path, folder layout, a config or the checkpoint's keys are not what a loader
    /// accepts.
    #[error("{path}: {message}")]
    Model {
        /// The file or folder concerned.
        path: PathBuf,
        /// What was expected and what was found.
        message: String,
    },
    /// A weights file is malformed, unreadable, or a registration failed.
    #[error(transparent)]
    Weights(#[from] ferry_pager::Error),
    /// A file or folder of the model could not be read.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was being done (`cannot read`, `cannot open model ...`).
        what: &'static str,
        /// What the operating system reported.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file of the model (`model_index.json`, a config) does not parse.
    #[error("{}: not valid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Where (line, column) and why.
        #[source]
        source: crate::json::JsonError,
    },
}

/// Result with [`LoadError`].
pub type Result<T, E = LoadError> = std::result::Result<T, E>;

pub(crate) fn err(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Model {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Which checkpoint layout a [`ModelSource`] was opened from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    /// A diffusers folder with `model_index.json`.
    Diffusers,
    /// One original-layout (LDM / sgm) `.safetensors` file.
    SingleFile,
}

/// Model family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFamily {
    /// Stable Diffusion 1.x (CLIP ViT-L text encoder).
    Sd1,
    /// Stable Diffusion 2.x (OpenCLIP ViT-H text encoder).
    Sd2,
    /// Stable Diffusion XL base (CLIP ViT-L + OpenCLIP bigG).
    Sdxl,
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelFamily::Sd1 => "SD 1.x",
            ModelFamily::Sd2 => "SD 2.x",
            ModelFamily::Sdxl => "SDXL",
        })
    }
}

/// How to open a model.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Prefer weight files of this variant (`"fp16"` selects `*.fp16.safetensors`); falls back to
    /// the plain files, with a warning, when the variant is absent. Diffusers folders only.
    pub variant: Option<String>,
    /// Single files only: take every component's configuration (and the tokenizer folders and
    /// scheduler config) from this diffusers folder instead of deriving them, like diffusers'
    /// `from_single_file(..., config=FOLDER)`. Its weights, if any, are not read. The shapes in
    /// the file must agree with the folder's configs.
    pub config_from: Option<PathBuf>,
}

/// What a tensor's diffusers-layout bytes are, relative to the stored tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// A contiguous byte range of the stored tensor, reinterpreted with the new shape (the whole
    /// tensor, a 1×1 convolution squeezed to a matrix, or one of fused q/k/v rows).
    Range {
        /// First byte within the stored tensor.
        start: usize,
        /// Length in bytes.
        len: usize,
    },
    /// The transpose of a stored 2-D tensor of `rows × cols` (needs a copy).
    Transpose {
        /// Rows of the stored tensor.
        rows: usize,
        /// Columns of the stored tensor.
        cols: usize,
    },
}

/// One tensor of a component, under its diffusers name, and where its bytes are.
#[derive(Clone, Debug)]
pub struct TensorRef {
    /// Diffusers name (no component prefix).
    pub name: String,
    /// Element type as stored.
    pub dtype: DType,
    /// Shape in diffusers layout.
    pub shape: Vec<usize>,
    /// The file holding the bytes.
    pub file: Arc<WeightsFile>,
    /// The stored tensor (name as in the file, dtype, shape, offset in the data area).
    pub stored: TensorInfo,
    /// How the diffusers tensor is derived from the stored one.
    pub layout: Layout,
}

impl TensorRef {
    /// The tensor's bytes in the stored dtype, borrowed from the mapped file, when no copy is
    /// needed (`None` for [`Layout::Transpose`]).
    pub fn stored_bytes(&self) -> Option<&[u8]> {
        match self.layout {
            Layout::Range { start, len } => {
                Some(&self.file.bytes_of(&self.stored)[start..start + len])
            }
            Layout::Transpose { .. } => None,
        }
    }

    /// Number of elements.
    pub fn num_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// The tensor in diffusers layout, converted to `to` (a copy).
    pub fn read_as(&self, to: DType) -> Result<Vec<u8>> {
        let what = |e: ferry_pager::Error| {
            err(
                self.file.path(),
                format!(
                    "tensor '{}' (diffusers '{}'): {e}",
                    self.stored.name, self.name
                ),
            )
        };
        match self.layout {
            Layout::Range { .. } => {
                let bytes = self.stored_bytes().unwrap_or(&[]);
                convert(bytes, self.dtype, to).map_err(what)
            }
            Layout::Transpose { rows, cols } => {
                let src = self.file.bytes_of(&self.stored);
                let es = self.dtype.size();
                let mut t = vec![0u8; src.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        let (s, d) = ((r * cols + c) * es, (c * rows + r) * es);
                        t[d..d + es].copy_from_slice(&src[s..s + es]);
                    }
                }
                convert(&t, self.dtype, to).map_err(what)
            }
        }
    }

    /// The tensor in diffusers layout as `f32` values.
    pub fn read_f32(&self) -> Result<Vec<f32>> {
        let bytes = self.read_as(DType::F32)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// One pipeline component: its configuration and (for models) its tensors.
#[derive(Clone, Debug)]
pub struct Component {
    /// Component name in the pipeline (`"unet"`, `"text_encoder_2"`, `"tokenizer"`, ...).
    pub name: String,
    /// Library that defines the class (`"diffusers"` or `"transformers"`).
    pub library: String,
    /// Class name (`"UNet2DConditionModel"`, `"CLIPTextModelWithProjection"`, ...).
    pub class_name: String,
    /// The component's configuration: `config.json` for models, `scheduler_config.json` for the
    /// scheduler, `tokenizer_config.json` for tokenizers (derived for single files). Text-encoder
    /// configs always carry `dtype` (copied from transformers 4's `torch_dtype` when needed).
    pub config_json: String,
    /// The component's folder (tokenizers: `vocab.json` + `merges.txt`, or `tokenizer.json`);
    /// `None` for components of a single file, whose tokenizers use CLIP's built-in vocabulary.
    pub dir: Option<PathBuf>,
    /// Tensors under diffusers names, in the order of their bytes in the files (empty for
    /// tokenizers and schedulers).
    pub tensors: Vec<TensorRef>,
}

/// Upper bound on converted bytes held in memory at once by [`Component::register_into`].
const REGISTER_BATCH_BYTES: usize = 256 << 20;

impl Component {
    /// The configuration parsed as JSON.
    pub fn config(&self) -> Result<serde_json::Value> {
        crate::json::parse(&self.config_json).map_err(|e| {
            err(
                self.dir.as_deref().unwrap_or(Path::new(&self.name)),
                format!("config of '{}' is not valid JSON: {e}", self.name),
            )
        })
    }

    /// The tensor called `name` (diffusers name), if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorRef> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Total bytes of the tensors as stored.
    pub fn stored_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| (t.num_elements() * t.dtype.size()) as u64)
            .sum()
    }

    /// Registers every tensor into `store` as `prefix + name`, converting float tensors to
    /// `convert_to` if given. Tensors needing no conversion are copied straight from the mapped
    /// file into pinned memory; converted ones go through bounded batches. Returns the ids in the
    /// order of [`Component::tensors`].
    pub fn register_into(
        &self,
        store: &HostStore,
        prefix: &str,
        convert_to: Option<DType>,
    ) -> Result<Vec<TensorId>> {
        let target = |t: &TensorRef| match convert_to {
            Some(to) if t.dtype.is_float() && to.is_float() => to,
            _ => t.dtype,
        };
        let mut ids = Vec::with_capacity(self.tensors.len());
        let mut start = 0;
        while start < self.tensors.len() {
            // One batch: owned (converted) bytes up to the bound; borrowed bytes are free.
            let mut end = start;
            let mut owned_bytes = 0usize;
            while end < self.tensors.len() {
                let t = &self.tensors[end];
                let needs_copy = target(t) != t.dtype || t.stored_bytes().is_none();
                if needs_copy {
                    let n = byte_len(target(t), &t.shape).unwrap_or(usize::MAX);
                    if owned_bytes > 0 && owned_bytes.saturating_add(n) > REGISTER_BATCH_BYTES {
                        break;
                    }
                    owned_bytes = owned_bytes.saturating_add(n);
                }
                end += 1;
            }
            let batch = &self.tensors[start..end];
            let mut owned: Vec<Option<Vec<u8>>> = Vec::with_capacity(batch.len());
            for t in batch {
                let to = target(t);
                owned.push(if to != t.dtype || t.stored_bytes().is_none() {
                    Some(t.read_as(to)?)
                } else {
                    None
                });
            }
            let names: Vec<String> = batch
                .iter()
                .map(|t| format!("{prefix}{}", t.name))
                .collect();
            let mut raws = Vec::with_capacity(batch.len());
            for ((t, o), name) in batch.iter().zip(&owned).zip(&names) {
                let data = match o {
                    Some(v) => v.as_slice(),
                    None => t.stored_bytes().unwrap_or(&[]),
                };
                raws.push(RawTensor {
                    name,
                    dtype: target(t),
                    shape: &t.shape,
                    data,
                });
            }
            ids.extend(store.register_batch(&raws)?);
            start = end;
        }
        Ok(ids)
    }
}

/// Where the components of an opened model come from.
#[derive(Debug)]
enum Backing {
    Folder(folder::Folder),
    Single(Box<single::Single>),
}

/// An opened checkpoint: a diffusers folder or a single original-layout file.
#[derive(Debug)]
pub struct ModelSource {
    path: PathBuf,
    format: SourceFormat,
    family: ModelFamily,
    model_index_json: String,
    /// (name, library, class) sorted by name, non-null entries only.
    entries: Vec<(String, String, String)>,
    backing: Backing,
    warnings: Vec<String>,
}

impl ModelSource {
    /// Opens a diffusers folder or a single `.safetensors` checkpoint with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<ModelSource> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// Opens a diffusers folder or a single `.safetensors` checkpoint.
    pub fn open_with(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<ModelSource> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            what: "cannot open model (expected a diffusers folder or a .safetensors file)",
            source,
        })?;
        if meta.is_dir() {
            if opts.config_from.is_some() {
                return Err(err(
                    path,
                    "config_from applies to single-file checkpoints, but this is a folder",
                ));
            }
            folder::open(path, opts.variant.as_deref())
        } else {
            single::open(path, opts.config_from.as_deref())
        }
    }

    /// The path the model was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checkpoint layout.
    pub fn format(&self) -> SourceFormat {
        self.format
    }

    /// The model family (from the keys for single files; from the pipeline class and the UNet
    /// config for folders).
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// `model_index.json` (synthesised for single files).
    pub fn model_index_json(&self) -> &str {
        &self.model_index_json
    }

    /// Component names, sorted (components set to null in `model_index.json` are left out).
    pub fn components(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.0.as_str()).collect()
    }

    /// Whether the pipeline has a component called `name`.
    pub fn has_component(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.0 == name)
    }

    /// Loads one component: its config and (for models) its tensor list. For folders this opens
    /// the component's weight files (header only); nothing else is read.
    pub fn component(&self, name: &str) -> Result<Component> {
        let (_, library, class) = self.entries.iter().find(|e| e.0 == name).ok_or_else(|| {
            err(
                &self.path,
                format!(
                    "no component '{name}' (components: {})",
                    self.components().join(", ")
                ),
            )
        })?;
        match &self.backing {
            Backing::Folder(f) => f.component(name, library, class),
            Backing::Single(s) => s.component(name),
        }
    }

    /// Notes about guesses and fallbacks made while opening (e.g. a derived head count, a
    /// missing variant, ignored checkpoint keys).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// Parses `text` as a JSON object, naming `path` on failure.
pub(crate) fn parse_object(
    path: &Path,
    text: &str,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let v = crate::json::parse(text).map_err(|source| LoadError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    match v {
        serde_json::Value::Object(m) => Ok(m),
        other => Err(err(
            path,
            format!(
                "expected a JSON object, found {}",
                crate::json::kind(&other)
            ),
        )),
    }
}

/// Text-encoder config normalisation: transformers 4 wrote `torch_dtype`, 5 writes `dtype`.
pub(crate) fn normalize_text_config(path: &Path, text: &str) -> Result<String> {
    let mut m = parse_object(path, text)?;
    if !m.contains_key("dtype") {
        if let Some(d) = m.get("torch_dtype").cloned() {
            m.insert("dtype".into(), d);
        }
    }
    Ok(serde_json::to_string_pretty(&serde_json::Value::Object(m)).unwrap_or_default())
}

/// Index of tensors by name, used while building components.
pub(crate) type ShapeMap<'a> = HashMap<&'a str, &'a [usize]>;
