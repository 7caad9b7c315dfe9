//! transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`, built from their `config.json`,
//! run on any [`Backend`] with weights from a [`WeightSource`] (on the CPU, paged through the
//! [`Executor`]).
//!
//! Weight names are transformers' without the `text_model.` prefix (as transformers 5 saves them,
//! e.g. `encoder.layers.0.self_attn.q_proj.weight`); [`weight_name`] maps older names.
//! Weight groups, in forward order: `embeddings`, `encoder.layers.{i}`, `final_layer_norm`, and
//! `text_projection` for the projection variant.

use crate::backend::{Backend, CpuBackend};
use crate::error::{Error, Result};
use crate::exec::{ComponentGroups, Executor};
use crate::ops::Activation;
use crate::tensor::Tensor;
use crate::weights::{WeightGroup, WeightSource};
use ferry_pager::{HostStore, RawTensor, TensorId, WeightsFile};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// A CLIP text encoder's `config.json` (transformers `CLIPTextConfig`); unknown keys are ignored
/// and missing (or null) ones take transformers' defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    /// Rows of the token embedding.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Output width of `text_projection` (projection variant only).
    pub projection_dim: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Rows of the position embedding (the longest sequence).
    pub max_position_embeddings: usize,
    /// MLP activation name (`quick_gelu`, `gelu`, `gelu_new`, ...); see [`ClipTextConfig::activation`].
    pub hidden_act: String,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// End-of-text id used for pooling; 2 selects transformers' legacy argmax pooling.
    pub eos_token_id: Option<i64>,
    /// transformers class names; `CLIPTextModelWithProjection` implies a `text_projection`.
    pub architectures: Vec<String>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: Some(49407),
            architectures: Vec::new(),
        }
    }
}

impl ClipTextConfig {
    /// Parses a `config.json` text and checks that its fields are usable.
    pub fn from_json(text: &str) -> Result<ClipTextConfig> {
        let v = crate::json::parse(text).map_err(|source| Error::Json {
            what: "CLIP text config".into(),
            source,
        })?;
        let Value::Object(m) = v else {
            return Err(Error::Config(
                "CLIP text config: expected a JSON object".into(),
            ));
        };
        let d = ClipTextConfig::default();
        let cfg = ClipTextConfig {
            vocab_size: field(&m, "vocab_size")?.unwrap_or(d.vocab_size),
            hidden_size: field(&m, "hidden_size")?.unwrap_or(d.hidden_size),
            intermediate_size: field(&m, "intermediate_size")?.unwrap_or(d.intermediate_size),
            projection_dim: field(&m, "projection_dim")?.unwrap_or(d.projection_dim),
            num_hidden_layers: field(&m, "num_hidden_layers")?.unwrap_or(d.num_hidden_layers),
            num_attention_heads: field(&m, "num_attention_heads")?.unwrap_or(d.num_attention_heads),
            max_position_embeddings: field(&m, "max_position_embeddings")?
                .unwrap_or(d.max_position_embeddings),
            hidden_act: field(&m, "hidden_act")?.unwrap_or(d.hidden_act),
            layer_norm_eps: field(&m, "layer_norm_eps")?.unwrap_or(d.layer_norm_eps),
            eos_token_id: match m.get("eos_token_id") {
                // An explicit null disables pooling (transformers cannot pool then either).
                Some(Value::Null) => None,
                _ => field(&m, "eos_token_id")?.or(d.eos_token_id),
            },
            architectures: field(&m, "architectures")?.unwrap_or(d.architectures),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the fields that the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::Config(format!(
                "CLIP text config: hidden_size ({}) must be a positive multiple of \
                 num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            )));
        }
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(Error::Config(format!(
                    "CLIP text config: {field} must be positive, found 0"
                )));
            }
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps >= 0.0) {
            return Err(Error::Config(format!(
                "CLIP text config: layer_norm_eps must be a finite non-negative number, found {}",
                self.layer_norm_eps
            )));
        }
        if self.num_hidden_layers > crate::models::unet::MAX_LAYERS {
            return Err(Error::Config(format!(
                "CLIP text config: num_hidden_layers ({}) is more than the {} supported",
                self.num_hidden_layers,
                crate::models::unet::MAX_LAYERS
            )));
        }
        self.activation()?;
        Ok(())
    }

    /// The MLP activation named by `hidden_act` (transformers' `ACT2FN` names).
    pub fn activation(&self) -> Result<Activation> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" | "gelu_python" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "silu" | "swish" => Ok(Activation::Silu),
            "sigmoid" => Ok(Activation::Sigmoid),
            other => Err(Error::Config(format!(
                "CLIP text config: hidden_act '{other}' is not supported (expected one of \
                 quick_gelu, gelu, gelu_python, gelu_new, gelu_pytorch_tanh, gelu_fast, silu, \
                 swish, sigmoid)"
            ))),
        }
    }

    /// Whether `architectures` names `CLIPTextModelWithProjection`.
    pub fn has_projection(&self) -> bool {
        self.architectures
            .iter()
            .any(|a| a == "CLIPTextModelWithProjection")
    }
}

/// Field `key` of a config object as `T`; `None` when absent or null, an error naming the field
/// when it has the wrong type.
fn field<T: DeserializeOwned>(m: &Map<String, Value>, key: &str) -> Result<Option<T>> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => T::deserialize(v).map(Some).map_err(|e| {
            let found = match crate::json::number(v) {
                Some(x) if !x.is_finite() => crate::json::kind(v),
                _ => v.to_string(),
            };
            Error::Config(format!(
                "CLIP text config: field '{key}': {e} (found {found})"
            ))
        }),
    }
}

/// Maps a stored text-encoder weight name to the name the model uses: strips transformers 4's
/// `text_model.` prefix; `None` for the non-weight `position_ids` buffer some files carry.
pub fn weight_name(stored: &str) -> Option<&str> {
    let name = stored.strip_prefix("text_model.").unwrap_or(stored);
    (!name.ends_with("position_ids")).then_some(name)
}

/// Registers the weights of a text encoder's safetensors file into `store` as
/// `"{component}.{name}"`, names mapped by [`weight_name`], dtypes kept as stored.
pub fn register_weights(
    store: &HostStore,
    file: &WeightsFile,
    component: &str,
) -> Result<Vec<TensorId>> {
    let kept: Vec<(String, &ferry_pager::TensorInfo)> = file
        .tensors()
        .iter()
        .filter_map(|t| weight_name(&t.name).map(|n| (format!("{component}.{n}"), t)))
        .collect();
    let raws: Vec<RawTensor<'_>> = kept
        .iter()
        .map(|(name, t)| RawTensor {
            name,
            dtype: t.dtype,
            shape: &t.shape,
            data: file.bytes_of(t),
        })
        .collect();
    Ok(store.register_batch(&raws)?)
}

/// What a forward pass returns besides the last hidden state and the pooled output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClipOptions {
    /// Indices into transformers' `hidden_states` (length `num_hidden_layers + 1`: 0 = the
    /// embeddings, `i` = the output of layer `i - 1`); negative counts from the end, so -2 is the
    /// penultimate layer ("clip skip", SDXL's text states).
    pub hidden_states: Vec<i64>,
    /// Pass the requested hidden states through `final_layer_norm` (what diffusers'
    /// `clip_skip` does for SD 1.x / 2.x pipelines; SDXL uses them un-normed).
    pub normed_hidden_states: bool,
}

/// Outputs of [`ClipTextModel::forward`] (host tensors) and [`ClipTextModel::forward_on`]
/// (the backend's tensors), all `[batch, ...]`.
#[derive(Clone, Debug)]
pub struct ClipOutput<T = Tensor> {
    /// `[batch, seq, hidden]`, after `final_layer_norm`.
    pub last_hidden_state: T,
    /// The hidden states requested in [`ClipOptions::hidden_states`], in that order.
    pub hidden_states: Vec<T>,
    /// `[batch, hidden]`: `last_hidden_state` at the pooling position (`pooler_output`).
    pub pooled: T,
    /// `[batch, projection_dim]`: `text_projection(pooled)` (projection variant only).
    pub text_embeds: Option<T>,
}

/// A CLIP text encoder whose weights live in an [`Executor`] under one component name.
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    cfg: ClipTextConfig,
    act: Activation,
    component: String,
    projection: bool,
}

impl ClipTextModel {
    /// A model for `component` (e.g. `"text_encoder_2"`); `projection` selects
    /// `CLIPTextModelWithProjection`.
    pub fn new(cfg: ClipTextConfig, component: &str, projection: bool) -> Result<ClipTextModel> {
        cfg.validate()?;
        let act = cfg.activation()?;
        Ok(ClipTextModel {
            cfg,
            act,
            component: component.to_string(),
            projection,
        })
    }

    /// A model for `component` from its `config.json` text; the projection variant is chosen
    /// from `architectures`.
    pub fn from_config_json(text: &str, component: &str) -> Result<ClipTextModel> {
        let cfg = ClipTextConfig::from_json(text)?;
        let projection = cfg.has_projection();
        ClipTextModel::new(cfg, component, projection)
    }

    /// The parsed config.
    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// The component name the weights are registered under.
    pub fn component(&self) -> &str {
        &self.component
    }

    /// Whether this is the projection variant.
    pub fn has_projection(&self) -> bool {
        self.projection
    }

    /// The weight groups, in forward order, for building an [`Executor`].
    pub fn groups(&self) -> ComponentGroups {
        let mut groups = vec!["embeddings".to_string()];
        groups.extend((0..self.cfg.num_hidden_layers).map(|i| format!("encoder.layers.{i}")));
        groups.push("final_layer_norm".into());
        if self.projection {
            groups.push("text_projection".into());
        }
        ComponentGroups {
            component: self.component.clone(),
            groups,
        }
    }

    /// Runs the encoder on the CPU on `input_ids` (one row of token ids per batch item, all the
    /// same length, at most `max_position_embeddings`).
    pub fn forward<I: AsRef<[u32]>>(
        &self,
        exec: &Executor,
        input_ids: &[I],
        opts: &ClipOptions,
    ) -> Result<ClipOutput> {
        self.forward_on(&CpuBackend::new(), exec, input_ids, opts)
    }

    /// Runs the encoder on backend `b` with weights from `src` (see [`ClipTextModel::forward`]
    /// for `input_ids`). Requested hidden states stay allocated until the caller drops the output;
    /// everything else a layer allocates is released at its end.
    pub fn forward_on<B: Backend, S: WeightSource<B>, I: AsRef<[u32]>>(
        &self,
        b: &B,
        src: &S,
        input_ids: &[I],
        opts: &ClipOptions,
    ) -> Result<ClipOutput<B::Tensor>> {
        let cfg = &self.cfg;
        let (batch, seq) = self.check_ids(input_ids)?;
        let n_states = cfg.num_hidden_layers + 1;
        let wanted = opts
            .hidden_states
            .iter()
            .map(|&i| resolve_index(i, n_states))
            .collect::<Result<Vec<usize>>>()?;
        let mut kept: Vec<Option<B::Tensor>> = vec![None; wanted.len()];

        // `base` is where the next state's output is kept: below the current state (freeing it)
        // unless that state was requested, in which case it stays and `base` moves above it.
        let mut base = b.mark();
        let mut x = self.embeddings_on(b, src, input_ids, batch, seq)?;
        for i in 0..=cfg.num_hidden_layers {
            if wanted.contains(&i) {
                for (slot, _) in kept.iter_mut().zip(&wanted).filter(|(_, &w)| w == i) {
                    *slot = Some(x.clone());
                }
                base = b.mark();
            }
            if i == cfg.num_hidden_layers {
                break;
            }
            let out = self.layer_on(b, src, i, &x)?;
            x = b.keep(base, out)?;
        }

        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps as f32;
        let w = src.group(&self.component, "final_layer_norm")?;
        let (lw, lb) = (w.get_shaped("weight", &[h])?, w.get_shaped("bias", &[h])?);
        let last = b.layer_norm(&x, Some(lw), Some(lb), eps)?;
        let mut hidden_states = Vec::with_capacity(kept.len());
        for t in kept {
            let t = t.ok_or_else(|| {
                Error::InvalidArgument("a requested hidden state was not produced".into())
            })?;
            hidden_states.push(if opts.normed_hidden_states {
                b.layer_norm(&t, Some(lw), Some(lb), eps)?
            } else {
                t
            });
        }
        drop(w);

        let pooled = b.gather_rows(&last, &self.pool_positions(input_ids)?)?;
        let text_embeds = if self.projection {
            let w = src.group(&self.component, "text_projection")?;
            let p = w.get_shaped("weight", &[cfg.projection_dim, h])?;
            Some(b.linear(&pooled, p, None)?)
        } else {
            None
        };
        Ok(ClipOutput {
            last_hidden_state: last,
            hidden_states,
            pooled,
            text_embeds,
        })
    }

    /// Checks the id rows: non-empty, rectangular, within the position table and the vocabulary.
    fn check_ids<I: AsRef<[u32]>>(&self, input_ids: &[I]) -> Result<(usize, usize)> {
        let batch = input_ids.len();
        let seq = input_ids.first().map_or(0, |r| r.as_ref().len());
        if batch == 0 || seq == 0 {
            return Err(Error::InvalidArgument(format!(
                "CLIP input_ids: expected at least one non-empty row, found {batch} rows of {seq}"
            )));
        }
        if seq > self.cfg.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "CLIP input_ids: sequence length {seq} exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        for (b, row) in input_ids.iter().enumerate() {
            let row = row.as_ref();
            if row.len() != seq {
                return Err(Error::InvalidArgument(format!(
                    "CLIP input_ids: every row must have {seq} ids (row 0), row {b} has {}",
                    row.len()
                )));
            }
            if let Some(&id) = row.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                return Err(Error::InvalidArgument(format!(
                    "CLIP input_ids: token id {id} in row {b} is outside the vocabulary of {}",
                    self.cfg.vocab_size
                )));
            }
        }
        Ok((batch, seq))
    }

    /// Token plus position embeddings, `[batch, seq, hidden]` (transformers' `hidden_states[0]`).
    fn embeddings_on<B: Backend, S: WeightSource<B>, I: AsRef<[u32]>>(
        &self,
        b: &B,
        src: &S,
        input_ids: &[I],
        batch: usize,
        seq: usize,
    ) -> Result<B::Tensor> {
        let h = self.cfg.hidden_size;
        let w = src.group(&self.component, "embeddings")?;
        let tok = w.get_shaped("token_embedding.weight", &[self.cfg.vocab_size, h])?;
        let pos = w.get_shaped(
            "position_embedding.weight",
            &[self.cfg.max_position_embeddings, h],
        )?;
        let ids: Vec<Vec<u32>> = input_ids.iter().map(|r| r.as_ref().to_vec()).collect();
        let seq_u32 = u32::try_from(seq).map_err(|_| {
            Error::InvalidArgument(format!("CLIP input_ids: sequence length {seq} is too long"))
        })?;
        let positions = vec![(0..seq_u32).collect::<Vec<u32>>(); batch];
        let m = b.mark();
        let t = b.embedding(tok, &ids)?;
        let p = b.embedding(pos, &positions)?;
        // token + position, the f32 sum transformers computes.
        let x = b.add(&t, &p)?;
        b.keep(m, x)
    }

    /// One pre-LN encoder layer: causal self-attention and the MLP, each with a residual. The
    /// attention's temporaries are released before the MLP; the MLP's stay for the caller's
    /// `keep`.
    fn layer_on<B: Backend, S: WeightSource<B>>(
        &self,
        b: &B,
        src: &S,
        i: usize,
        x: &B::Tensor,
    ) -> Result<B::Tensor> {
        let cfg = &self.cfg;
        let (h, m) = (cfg.hidden_size, cfg.intermediate_size);
        let eps = cfg.layer_norm_eps as f32;
        let w = src.group(&self.component, &format!("encoder.layers.{i}"))?;
        let norm = |x: &B::Tensor, name: &str| -> Result<B::Tensor> {
            let g = w.get_shaped(&format!("{name}.weight"), &[h])?;
            let bias = w.get_shaped(&format!("{name}.bias"), &[h])?;
            b.layer_norm(x, Some(g), Some(bias), eps)
        };
        let lin = |x: &B::Tensor, name: &str, out: usize, inp: usize| -> Result<B::Tensor> {
            let wt = w.get_shaped(&format!("{name}.weight"), &[out, inp])?;
            let bias = w.get_shaped(&format!("{name}.bias"), &[out])?;
            b.linear(x, wt, Some(bias))
        };

        let mark = b.mark();
        let y = norm(x, "layer_norm1")?;
        let q = lin(&y, "self_attn.q_proj", h, h)?;
        let k = lin(&y, "self_attn.k_proj", h, h)?;
        let v = lin(&y, "self_attn.v_proj", h, h)?;
        let a = b.attention(&q, &k, &v, cfg.num_attention_heads, true)?;
        let a = lin(&a, "self_attn.out_proj", h, h)?;
        let x = b.add(x, &a)?;
        let x = b.keep(mark, x)?;

        let y = norm(&x, "layer_norm2")?;
        let y = lin(&y, "mlp.fc1", m, h)?;
        let y = b.activation(self.act, &y)?;
        let y = lin(&y, "mlp.fc2", h, m)?;
        b.add(&x, &y)
    }

    /// Each row's pooling position, as transformers picks it: the first `eos_token_id`, or the
    /// largest id when `eos_token_id` is 2 (configs from before transformers PR #24773). A row
    /// without the eos id pools position 0, as `argmax` does.
    fn pool_positions<I: AsRef<[u32]>>(&self, input_ids: &[I]) -> Result<Vec<usize>> {
        let eos = self.cfg.eos_token_id.ok_or_else(|| {
            Error::Config("CLIP text config: eos_token_id is null; pooling needs it".into())
        })?;
        Ok(input_ids
            .iter()
            .map(|row| {
                let row = row.as_ref();
                if eos == 2 {
                    // First index of the maximum, like torch.argmax.
                    row.iter()
                        .enumerate()
                        .fold(
                            (0, 0u32),
                            |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
                        )
                        .0
                } else {
                    row.iter().position(|&id| i64::from(id) == eos).unwrap_or(0)
                }
            })
            .collect())
    }
}

/// Resolves a Python-style index into a list of `len` hidden states.
fn resolve_index(i: i64, len: usize) -> Result<usize> {
    let n = len as i64;
    let r = if i < 0 { i + n } else { i };
    if (0..n).contains(&r) {
        Ok(r as usize)
    } else {
        Err(Error::InvalidArgument(format!(
            "hidden state index {i} is out of range for {len} hidden states \
             (embeddings + {} layers)",
            len - 1
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_keys_follow_transformers() {
        let c = ClipTextConfig::from_json(
            r#"{"hidden_size": 768, "num_attention_heads": 12, "torch_dtype": "float32",
                "layer_norm_eps": null, "future_key": [1, 2]}"#,
        )
        .unwrap();
        assert_eq!((c.hidden_size, c.num_attention_heads), (768, 12));
        assert_eq!((c.vocab_size, c.max_position_embeddings), (49408, 77));
        assert_eq!((c.layer_norm_eps, c.eos_token_id), (1e-5, Some(49407)));
        assert_eq!(c.activation().unwrap(), Activation::QuickGelu);
        assert!(!c.has_projection());
        let c = ClipTextConfig::from_json(
            r#"{"eos_token_id": 2, "hidden_act": "gelu_new",
                "architectures": ["CLIPTextModelWithProjection"]}"#,
        )
        .unwrap();
        assert_eq!(c.eos_token_id, Some(2));
        assert_eq!(c.activation().unwrap(), Activation::GeluTanh);
        assert!(c.has_projection());
        let err = ClipTextConfig::from_json(r#"{"eos_token_id": [49407]}"#).unwrap_err();
        assert!(err.to_string().contains("'eos_token_id'"), "{err}");
    }

    #[test]
    fn hidden_state_indices_resolve_like_python() {
        assert_eq!(resolve_index(0, 3).unwrap(), 0);
        assert_eq!(resolve_index(-1, 3).unwrap(), 2);
        assert_eq!(resolve_index(-2, 3).unwrap(), 1);
        assert!(resolve_index(3, 3).is_err());
        assert!(resolve_index(-4, 3).is_err());
    }

    #[test]
    fn weight_names_accept_both_transformers_layouts() {
        assert_eq!(
            weight_name("text_model.encoder.layers.0.mlp.fc1.weight"),
            Some("encoder.layers.0.mlp.fc1.weight")
        );
        assert_eq!(
            weight_name("final_layer_norm.bias"),
            Some("final_layer_norm.bias")
        );
        assert_eq!(
            weight_name("text_projection.weight"),
            Some("text_projection.weight")
        );
        assert_eq!(weight_name("text_model.embeddings.position_ids"), None);
    }

    #[test]
    fn causal_attention_ignores_later_positions() {
        // Changing k/v at the last position must not change any earlier output row.
        let mk = |seed: usize| {
            let data = (0..2 * 5 * 4)
                .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            Tensor::new([2, 5, 4], data).unwrap()
        };
        let (q, k, v) = (mk(1), mk(2), mk(3));
        let be = CpuBackend::new();
        let a = be.attention(&q, &k, &v, 2, true).unwrap();
        let (mut k2, mut v2) = (k.clone(), v.clone());
        for bi in 0..2 {
            for ch in 0..4 {
                k2.data_mut()[(bi * 5 + 4) * 4 + ch] += 3.0;
                v2.data_mut()[(bi * 5 + 4) * 4 + ch] -= 2.0;
            }
        }
        let b = be.attention(&q, &k2, &v2, 2, true).unwrap();
        for bi in 0..2 {
            let rows = (bi * 5 * 4)..((bi * 5 + 4) * 4);
            assert_eq!(a.data()[rows.clone()], b.data()[rows]);
            let last = ((bi * 5 + 4) * 4)..((bi * 5 + 5) * 4);
            assert_ne!(a.data()[last.clone()], b.data()[last]);
        }
        // Query 0 sees only key 0: its output is v[0] exactly.
        assert_eq!(a.data()[..4], v.data()[..4]);
    }
}
