//! Text-to-image as diffusers' `StableDiffusionPipeline` / `StableDiffusionXLPipeline` does it:
//! prompt encoding, classifier-free guidance in one batched UNet pass per step, the scheduler loop,
//! and VAE decoding — with every layer's weights paged through Ferry.

use crate::error::{Error, Result};
use crate::exec::{ComponentGroups, ExecConfig, Executor};
use crate::loader::{ModelFamily, ModelSource};
use crate::models::clip::{ClipOptions, ClipTextModel};
use crate::models::unet::{AddedCond, UNet2DConditionModel};
use crate::models::vae::{Vae, VaeConfig};
use crate::rng::TorchGenerator;
use crate::schedulers;
use crate::tensor::Tensor;
use crate::tokenizer::{ClipTokenizer, SpecialTokens};
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::host::HostStore;
use ferry_pager::Device;
use ferry_sched::Mode;
use std::path::Path;
use std::sync::Arc;

/// One text encoder with its tokenizer.
struct TextEncoder {
    tokenizer: ClipTokenizer,
    model: ClipTextModel,
}

/// A loaded model, ready to generate.
pub struct Pipeline {
    family: ModelFamily,
    encoders: Vec<TextEncoder>,
    unet: UNet2DConditionModel,
    /// The UNet's `sample_size` (latent height, width).
    sample_size: (usize, usize),
    vae: Vae,
    scheduler_config: String,
    force_zeros_for_empty_prompt: bool,
    store: HostStore,
    groups: Vec<ComponentGroups>,
    exec: Executor,
    device: Arc<SimDevice>,
}

/// How to load and page a model.
#[derive(Clone, Copy, Debug)]
pub struct LoadConfig {
    /// Offload mode; `None` = everything resident when the budget allows, else `auto`.
    pub mode: Option<Mode>,
    /// Device budget in bytes (`None`: everything resident).
    pub budget: Option<u64>,
    /// Bytes of the budget for activations (planned by the engine).
    pub reserve: u64,
    /// Record metrics for `--stats` / `--trace`.
    pub metrics: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            mode: None,
            budget: None,
            reserve: 64 << 20,
            metrics: false,
        }
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// The prompt.
    pub prompt: String,
    /// `None` behaves as diffusers' `negative_prompt=None`.
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale (CFG when > 1).
    pub guidance: f32,
    /// Scheduler name (`None`: the model's own).
    pub scheduler: Option<String>,
    /// Karras sigmas.
    pub karras: bool,
    /// Seed of the CPU generator for the initial latents (and Euler-ancestral noise).
    pub seed: u64,
    /// Width in pixels (`None`: the model's sample size).
    pub width: Option<usize>,
    /// Height in pixels.
    pub height: Option<usize>,
    /// Images per prompt.
    pub batch: usize,
    /// Initial latents `[batch, 4, H/8, W/8]` (diffusers' `latents=`), instead of seeded noise.
    pub init_latents: Option<Tensor>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            prompt: String::new(),
            negative_prompt: None,
            steps: 30,
            guidance: 7.5,
            scheduler: None,
            karras: false,
            seed: 0,
            width: None,
            height: None,
            batch: 1,
            init_latents: None,
        }
    }
}

/// What a generation returns.
#[derive(Clone, Debug)]
pub struct Generated {
    /// Final denoised latents (before VAE scaling), `[batch, 4, h, w]`.
    pub latents: Tensor,
    /// Decoded images in [-1, 1], `[batch, 3, H, W]`.
    pub images: Tensor,
    /// Width and height used.
    pub size: (usize, usize),
    /// Things the caller should tell the user (e.g. a prompt truncated to 77 tokens).
    pub warnings: Vec<String>,
}

/// Padded token ids of one tokenizer for the prompt and negative prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenIds {
    /// Component name (`tokenizer`, `tokenizer_2`).
    pub component: String,
    /// The prompt's ids.
    pub prompt: Vec<u32>,
    /// The negative prompt's ids, if one was given.
    pub negative_prompt: Option<Vec<u32>>,
}

fn load_tokenizer(source: &ModelSource, name: &str) -> Result<ClipTokenizer> {
    let c = source
        .component(name)
        .map_err(|e| Error::Config(format!("{name}: {e}")))?;
    let tok = match &c.dir {
        Some(dir) => ClipTokenizer::from_folder(dir),
        None => {
            // A single-file checkpoint has no tokenizer: use the embedded CLIP vocabulary with the
            // pad token the loader derived for this family.
            let cfg: serde_json::Value = serde_json::from_str(&c.config_json)
                .map_err(|e| Error::Config(format!("{name}: tokenizer config: {e}")))?;
            let pad = match &cfg["pad_token"] {
                serde_json::Value::String(s) => s.clone(),
                v => v["content"].as_str().unwrap_or("<|endoftext|>").to_string(),
            };
            ClipTokenizer::embedded(&SpecialTokens::with_pad(&pad))
        }
    };
    tok.map_err(|e| Error::Config(format!("{name}: {e}")))
}

/// The tokenizer components of a model, in pipeline order.
fn tokenizer_names(family: ModelFamily) -> &'static [&'static str] {
    match family {
        ModelFamily::Sdxl => &["tokenizer", "tokenizer_2"],
        _ => &["tokenizer"],
    }
}

/// Padded token ids for `prompt` / `negative` with every tokenizer of the model; reads only
/// `model_index.json` and the tokenizer folders.
pub fn token_ids(model: &Path, prompt: &str, negative: Option<&str>) -> Result<Vec<TokenIds>> {
    let source = ModelSource::open(model).map_err(|e| Error::Config(e.to_string()))?;
    tokenizer_names(source.family())
        .iter()
        .map(|&name| {
            let tok = load_tokenizer(&source, name)?;
            Ok(TokenIds {
                component: name.to_string(),
                prompt: tok.encode(prompt).ids,
                negative_prompt: negative.map(|n| tok.encode(n).ids),
            })
        })
        .collect()
}

impl Pipeline {
    /// Loads a diffusers folder or single-file checkpoint and plans paging it.
    pub fn load(model: &Path, cfg: LoadConfig) -> Result<Pipeline> {
        let source = ModelSource::open(model).map_err(|e| Error::Config(e.to_string()))?;
        let family = source.family();
        let component = |name: &str| {
            source
                .component(name)
                .map_err(|e| Error::Config(format!("{name}: {e}")))
        };
        let index: serde_json::Value = serde_json::from_str(source.model_index_json())
            .map_err(|e| Error::Config(format!("model_index.json: {e}")))?;
        let force_zeros_for_empty_prompt = index["force_zeros_for_empty_prompt"]
            .as_bool()
            .unwrap_or(family == ModelFamily::Sdxl);

        let capacity = cfg.budget.unwrap_or(u64::MAX / 4).max(1 << 20);
        let device = SimDevice::new(SimConfig {
            capacity,
            ..SimConfig::default()
        });
        let store = HostStore::new(device.clone() as Arc<dyn Device>);
        let mut groups = Vec::new();
        let mut encoders = Vec::new();
        let enc_names: &[&str] = match family {
            ModelFamily::Sdxl => &["text_encoder", "text_encoder_2"],
            _ => &["text_encoder"],
        };
        for (&enc, &tok) in enc_names.iter().zip(tokenizer_names(family)) {
            let c = component(enc)?;
            let model = ClipTextModel::from_config_json(&c.config_json, enc)?;
            c.register_into(&store, &format!("{enc}."), None)
                .map_err(|e| Error::Config(format!("{enc}: {e}")))?;
            groups.push(model.groups());
            encoders.push(TextEncoder {
                tokenizer: load_tokenizer(&source, tok)?,
                model,
            });
        }
        let c = component("unet")?;
        let unet_json = c
            .config()
            .map_err(|e| Error::Config(format!("unet: {e}")))?;
        let sample_size = match &unet_json["sample_size"] {
            serde_json::Value::Array(v) if v.len() == 2 => (
                v[0].as_u64().unwrap_or(64) as usize,
                v[1].as_u64().unwrap_or(64) as usize,
            ),
            v => {
                let s = v.as_u64().unwrap_or(64) as usize;
                (s, s)
            }
        };
        let unet =
            UNet2DConditionModel::new(crate::models::unet::UNetConfig::from_json(&c.config_json)?)?;
        unet.check_weights(
            c.tensors
                .iter()
                .map(|t| (t.name.as_str(), t.shape.as_slice())),
        )?;
        c.register_into(&store, "unet.", None)
            .map_err(|e| Error::Config(format!("unet: {e}")))?;
        groups.push(unet.groups());
        let c = component("vae")?;
        let vae = Vae::new(VaeConfig::from_json(&c.config_json)?)?;
        vae.check_weights(
            c.tensors
                .iter()
                .map(|t| (t.name.as_str(), t.shape.as_slice())),
        )?;
        c.register_into(&store, "vae.", None)
            .map_err(|e| Error::Config(format!("vae: {e}")))?;
        groups.push(vae.groups());
        let scheduler_config = component("scheduler")?.config_json;

        let all: u64 = store.weight_bytes();
        let mode = match cfg.mode {
            Some(m) => m,
            None => match cfg.budget {
                Some(b) if b < all + cfg.reserve => Mode::Auto,
                _ => Mode::None,
            },
        };
        let exec = Executor::with_pass(
            device.clone(),
            &store,
            &groups,
            &["unet"],
            ExecConfig {
                mode,
                budget: cfg.budget,
                reserve: cfg.reserve,
                metrics: cfg.metrics,
                ..ExecConfig::default()
            },
        )?;
        Ok(Pipeline {
            family,
            encoders,
            unet,
            sample_size,
            vae,
            scheduler_config,
            force_zeros_for_empty_prompt,
            store,
            groups,
            exec,
            device,
        })
    }

    /// The smallest device budget `mode` can run this model in, with `reserve` for activations.
    pub fn minimum_budget(&self, mode: Mode, reserve: u64) -> Result<u64> {
        Executor::minimum_budget(&self.store, &self.groups, mode, reserve)
    }

    /// Which model family was loaded.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// The executor (plan, metrics, trace).
    pub fn executor(&self) -> &Executor {
        &self.exec
    }

    /// Pinned host bytes holding the weights.
    pub fn pinned_host_bytes(&self) -> u64 {
        self.store.pinned_bytes()
    }

    /// Race reports of the simulated device (empty when paging is correct).
    pub fn races(&self) -> Vec<String> {
        self.device.races()
    }

    /// The default image size: the UNet's sample size times the VAE's scale factor.
    pub fn default_size(&self) -> (usize, usize) {
        let f = self.vae.scale_factor();
        (self.sample_size.1 * f, self.sample_size.0 * f)
    }

    /// Encodes one batch of texts with every text encoder: (prompt embeds `[n, 77, C]`, pooled
    /// `[n, P]` for SDXL).
    fn encode(
        &self,
        texts: &[&str],
        warnings: &mut Vec<String>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut states = Vec::new();
        let mut pooled = None;
        for e in &self.encoders {
            let mut ids = Vec::with_capacity(texts.len());
            for t in texts {
                let enc = e.tokenizer.encode(t);
                if enc.truncated {
                    let w = format!(
                        "the prompt has {} tokens; it was truncated to {} as CLIP allows",
                        enc.untruncated_len,
                        enc.ids.len()
                    );
                    if !warnings.contains(&w) {
                        warnings.push(w);
                    }
                }
                ids.push(enc.ids);
            }
            if self.family == ModelFamily::Sdxl {
                let out = e.model.forward(
                    &self.exec,
                    &ids,
                    &ClipOptions {
                        hidden_states: vec![-2],
                        normed_hidden_states: false,
                    },
                )?;
                if let Some(p) = out.text_embeds {
                    pooled = Some(p);
                }
                states.extend(out.hidden_states);
            } else {
                let out = e.model.forward(&self.exec, &ids, &ClipOptions::default())?;
                states.push(out.last_hidden_state);
            }
        }
        let refs: Vec<&Tensor> = states.iter().collect();
        let embeds = if refs.len() == 1 {
            states.remove(0)
        } else {
            Tensor::concat(&refs, 2)?
        };
        Ok((embeds, pooled))
    }

    /// Runs the whole pipeline. `progress(step, total)` is called after each step.
    pub fn generate(
        &self,
        p: &GenerateParams,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Generated> {
        let (dw, dh) = self.default_size();
        let (w, h) = (p.width.unwrap_or(dw), p.height.unwrap_or(dh));
        let f = self.vae.scale_factor();
        for (name, v) in [("width", w), ("height", h)] {
            if v == 0 || !v.is_multiple_of(8) || !v.is_multiple_of(f) {
                return Err(Error::InvalidArgument(format!(
                    "--{name} must be a positive multiple of {}, got {v}",
                    f.max(8)
                )));
            }
        }
        if p.batch == 0 || p.steps == 0 {
            return Err(Error::InvalidArgument(
                "--batch and --steps must be at least 1".into(),
            ));
        }
        let n = p.batch;
        let cfg = p.guidance > 1.0;
        let mut scheduler =
            schedulers::build(p.scheduler.as_deref(), p.karras, &self.scheduler_config)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        scheduler
            .set_timesteps(p.steps)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;

        // Prompt embeddings: [negative; positive], each repeated per image.
        let mut warnings = Vec::new();
        let (pos, pos_pooled) = self.encode(&[&p.prompt], &mut warnings)?;
        let zero_negative = p.negative_prompt.is_none()
            && self.family == ModelFamily::Sdxl
            && self.force_zeros_for_empty_prompt;
        let (neg, neg_pooled) = if !cfg {
            (None, None)
        } else if zero_negative {
            let z = Tensor::zeros(pos.shape().to_vec())?;
            let zp = match &pos_pooled {
                Some(t) => Some(Tensor::zeros(t.shape().to_vec())?),
                None => None,
            };
            (Some(z), zp)
        } else {
            let (e, pl) =
                self.encode(&[p.negative_prompt.as_deref().unwrap_or("")], &mut warnings)?;
            (Some(e), pl)
        };
        let repeat = |t: &Tensor| -> Result<Tensor> {
            let refs: Vec<&Tensor> = (0..n).map(|_| t).collect();
            Ok(Tensor::concat(&refs, 0)?)
        };
        let mut ctx_parts = Vec::new();
        let mut pooled_parts = Vec::new();
        if let Some(neg) = &neg {
            ctx_parts.push(repeat(neg)?);
            if let Some(np) = &neg_pooled {
                pooled_parts.push(repeat(np)?);
            }
        }
        ctx_parts.push(repeat(&pos)?);
        if let Some(pp) = &pos_pooled {
            pooled_parts.push(repeat(pp)?);
        }
        let context = Tensor::concat(&ctx_parts.iter().collect::<Vec<_>>(), 0)?;
        let rows = ctx_parts.len() * n;
        let added = if self.unet.needs_added_cond() {
            let pooled = Tensor::concat(&pooled_parts.iter().collect::<Vec<_>>(), 0)?;
            let ids = [h as f32, w as f32, 0.0, 0.0, h as f32, w as f32];
            let time_ids = Tensor::new(vec![rows, 6], ids.repeat(rows))?;
            Some((pooled, time_ids))
        } else {
            None
        };

        // Initial latents, as diffusers' prepare_latents with a CPU generator.
        let lat_shape = vec![n, self.unet.config().in_channels, h / f, w / f];
        let mut generator = TorchGenerator::manual_seed(p.seed);
        let mut latents = match &p.init_latents {
            Some(t) => {
                if t.shape() != lat_shape.as_slice() {
                    return Err(Error::InvalidArgument(format!(
                        "--init-latents: expected shape {lat_shape:?}, found {:?}",
                        t.shape()
                    )));
                }
                t.clone()
            }
            None => {
                let count = lat_shape.iter().product();
                Tensor::new(lat_shape.clone(), generator.randn(count))?
            }
        };
        let sigma = scheduler.init_noise_sigma();
        latents.data_mut().iter_mut().for_each(|x| *x *= sigma);

        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let mut input = if cfg {
                Tensor::concat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            scheduler
                .scale_model_input(input.data_mut(), i)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            let cond = added.as_ref().map(|(p, t)| AddedCond {
                text_embeds: p,
                time_ids: t,
            });
            self.exec.scheduler().begin_pass()?;
            let out = self
                .unet
                .forward(&self.exec, &input, &[t], &context, cond)?;
            self.exec.scheduler().end_pass()?;
            let guided = if cfg {
                let half = out.numel() / 2;
                let (u, c) = out.data().split_at(half);
                u.iter()
                    .zip(c)
                    .map(|(u, c)| u + p.guidance * (c - u))
                    .collect::<Vec<f32>>()
            } else {
                out.into_data()
            };
            let next = scheduler
                .step(&guided, i, latents.data(), &mut generator)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            latents = Tensor::new(lat_shape.clone(), next)?;
            progress(i + 1, timesteps.len());
        }

        let images = self
            .vae
            .decode(&self.exec, &self.vae.unscale_latents(&latents))?;
        Ok(Generated {
            latents,
            images,
            size: (w, h),
            warnings,
        })
    }
}
