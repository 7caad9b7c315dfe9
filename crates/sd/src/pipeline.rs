//! Text-to-image as diffusers' `StableDiffusionPipeline` / `StableDiffusionXLPipeline` does it:
//! prompt encoding, classifier-free guidance in one batched UNet pass per step, the scheduler loop,
//! and VAE decoding — with every layer's weights paged through Ferry.

use crate::backend::{Backend, CpuBackend};
use crate::error::{Error, Result};
use crate::exec::{ComponentGroups, ExecConfig, Executor};
use crate::gpu_exec::{
    plan_reserve, EncoderRun, GpuExecutor, GpuGroups, ReservePlan, ReserveRequest,
};
use crate::loader::{ModelFamily, ModelSource};
use crate::models::clip::{ClipOptions, ClipTextModel};
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::{Vae, VaeConfig};
use crate::rng::TorchGenerator;
use crate::schedulers;
use crate::tensor::{DType, Tensor};
use crate::tokenizer::{ClipTokenizer, SpecialTokens};
use crate::weights::WeightSource;
use ferry_pager::device::cuda::CudaDevice;
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::host::HostStore;
use ferry_pager::Device;
use ferry_sched::{Mode, PlanSummary, RunMetrics, Scheduler};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

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
    engine: Engine,
    /// What loading decided that the user should know (e.g. a default host budget).
    notes: Vec<String>,
}

/// Where the layers run.
// One per pipeline: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Engine {
    /// CPU reference ops, weights paged through the simulated device.
    Sim {
        exec: Executor,
        device: Arc<SimDevice>,
    },
    /// The GPU executor on a CUDA GPU or on the simulated GPU (behind a lock: a generation may
    /// grow the activation reserve).
    Gpu(Mutex<GpuEngine>),
}

/// The GPU executor, its device and the precisions it runs in.
struct GpuEngine {
    /// `None` only when growing the reserve failed and restoring the old executor did too.
    exec: Option<GpuExecutor>,
    dev: Arc<dyn Device>,
    /// The same device when it is the simulated GPU (for its race reports).
    sim: Option<Arc<SimDevice>>,
    /// What was asked for ([`DeviceChoice::Cuda`] or [`DeviceChoice::Sim`]).
    choice: DeviceChoice,
    /// The last plan built (shown while `exec` is `None`).
    plan: Box<PlanSummary>,
    /// Text encoders and UNet.
    dtype: DType,
    /// The VAE (f32 where diffusers' `force_upcast` applies to f16).
    vae_dtype: DType,
    cfg: LoadConfig,
    mode: Mode,
}

/// Where a pipeline computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The f32 CPU reference ops, weights paged through the simulated device.
    #[default]
    Cpu,
    /// CUDA GPU number `n`.
    Cuda(usize),
    /// The GPU path — GPU executor, planned activation reserve, weights paged by the scheduler,
    /// the CUDA kernels — on the simulated GPU, which runs the kernels' PTX on its interpreter.
    /// Its output is emulated: it shows what the kernels compute, not what a GPU does.
    Sim,
}

impl DeviceChoice {
    /// Whether the GPU executor runs (CUDA or the simulated GPU), not the CPU reference ops.
    pub fn is_gpu(self) -> bool {
        !matches!(self, DeviceChoice::Cpu)
    }
}

/// Device memory of the simulated GPU when no budget is given: the simulator's default card.
pub const SIM_DEFAULT_CAPACITY: u64 = 8 << 30;

/// The simulated GPU's capacity for a budget: the budget itself (so it is enforced by the device
/// as a GPU's size would be), with room for the scheduler's 1 MiB transfer probe at tiny budgets.
pub fn sim_capacity(budget: Option<u64>) -> u64 {
    budget.map_or(SIM_DEFAULT_CAPACITY, |b| b.max(4 << 20))
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
    /// Where to compute.
    pub device: DeviceChoice,
    /// Compute dtype on the GPU path, CUDA or simulated (f16, bf16 or f32; weights are converted
    /// to it at load, the VAE to f32 instead of f16 when its config asks for `force_upcast`).
    /// The CPU computes in f32.
    pub dtype: DType,
    /// Host memory for the weights (pinned copies plus the disk tier's staging), in bytes;
    /// groups that do not fit stay in their files and are streamed (`docs/disk-tier.md`).
    /// `None`: every weight pinned. CPU path only.
    pub host_budget: Option<u64>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            mode: None,
            budget: None,
            reserve: 64 << 20,
            metrics: false,
            device: DeviceChoice::Cpu,
            dtype: DType::F16,
            host_budget: None,
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
    let c = source.component(name)?;
    let tok = match &c.dir {
        Some(dir) => ClipTokenizer::from_folder(dir),
        None => {
            // A single-file checkpoint has no tokenizer: use the embedded CLIP vocabulary with the
            // pad token the loader derived for this family.
            let cfg = crate::json::parse(&c.config_json).map_err(|source| Error::Json {
                what: format!("{name} tokenizer config"),
                source,
            })?;
            let pad = match &cfg["pad_token"] {
                serde_json::Value::String(s) => s.clone(),
                v => v["content"].as_str().unwrap_or("<|endoftext|>").to_string(),
            };
            ClipTokenizer::embedded(&SpecialTokens::with_pad(&pad))
        }
    };
    tok.map_err(|e| Error::in_component(name, e))
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
    let source = ModelSource::open(model)?;
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

/// The weight dtype the loader converts to.
fn pager_dtype(d: DType) -> ferry_pager::weights::DType {
    match d {
        DType::F32 => ferry_pager::weights::DType::F32,
        DType::F16 => ferry_pager::weights::DType::F16,
        DType::BF16 => ferry_pager::weights::DType::BF16,
    }
}

/// The VAE's compute dtype for a pipeline computing in `dtype`: f32 instead of f16 when the
/// config asks for `force_upcast` (SDXL's VAE overflows in f16), as diffusers does.
pub fn vae_dtype(vae: &Vae, dtype: DType) -> DType {
    if dtype == DType::F16 && vae.force_upcast() {
        DType::F32
    } else {
        dtype
    }
}

/// The compute dtype of every component: the VAE's own, `dtype` for the rest.
fn component_dtypes(
    groups: &[ComponentGroups],
    dtype: DType,
    vae_dtype: DType,
) -> Vec<(String, DType)> {
    groups
        .iter()
        .map(|g| {
            let d = if g.component == "vae" {
                vae_dtype
            } else {
                dtype
            };
            (g.component.clone(), d)
        })
        .collect()
}

/// The padded prompt length (the same for every tokenizer of a model).
fn token_len(encoders: &[TextEncoder]) -> usize {
    encoders
        .first()
        .map_or(77, |e| e.tokenizer.encode("").ids.len())
}

/// The hidden states the pipeline asks a text encoder for.
fn clip_options(family: ModelFamily) -> ClipOptions {
    if family == ModelFamily::Sdxl {
        ClipOptions {
            hidden_states: vec![-2],
            normed_hidden_states: false,
        }
    } else {
        ClipOptions::default()
    }
}

/// [`plan_reserve`] for a pipeline's models.
fn plan_with(
    family: ModelFamily,
    encoders: &[TextEncoder],
    unet: &UNet2DConditionModel,
    vae: &Vae,
    groups: &GpuGroups,
    req: &ReserveRequest,
) -> Result<ReservePlan> {
    let opts = clip_options(family);
    let runs: Vec<EncoderRun<'_>> = encoders
        .iter()
        .map(|e| EncoderRun {
            model: &e.model,
            options: &opts,
        })
        .collect();
    plan_reserve(groups, &runs, unet, vae, req)
}

/// The GPU executor's configuration.
fn gpu_exec_config(cfg: &LoadConfig, mode: Mode, reserve: u64) -> ExecConfig {
    ExecConfig {
        mode,
        budget: cfg.budget,
        reserve,
        metrics: cfg.metrics,
        ..ExecConfig::default()
    }
}

/// The host budget for a CPU run the user gave none for, and a note saying why, when the
/// weights do not fit comfortably in the available memory ([`crate::host_memory`]).
fn default_host_budget(source: &ModelSource) -> Result<Option<(u64, String)>> {
    let Some(available) = crate::host_memory::available() else {
        return Ok(None);
    };
    let mut weights = 0u64;
    for name in ["text_encoder", "text_encoder_2", "unet", "vae"] {
        if source.has_component(name) {
            weights += source.component(name)?.stored_bytes();
        }
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Ok(
        crate::host_memory::default_host_budget(weights, available).map(|budget| {
            let note = format!(
                "the weights ({:.2} GiB) do not fit in the available memory ({:.2} GiB, less a \
                 {:.2} GiB margin): host budget {:.2} GiB, the rest streams from disk \
                 (--host-budget overrides)",
                gib(weights),
                gib(available),
                gib(crate::host_memory::margin(available)),
                gib(budget)
            );
            (budget, note)
        }),
    )
}

impl Pipeline {
    /// Loads a diffusers folder or single-file checkpoint and plans paging it.
    pub fn load(model: &Path, cfg: LoadConfig) -> Result<Pipeline> {
        Self::load_with(model, cfg, None)
    }

    /// Like [`Pipeline::load`] on the CPU path, paging through the given simulated device (for
    /// fault injection and leak checks); `cfg.device` must be [`DeviceChoice::Cpu`].
    pub fn load_on_sim(model: &Path, cfg: LoadConfig, device: Arc<SimDevice>) -> Result<Pipeline> {
        if cfg.device != DeviceChoice::Cpu {
            return Err(Error::InvalidArgument(
                "load_on_sim needs the CPU device choice".into(),
            ));
        }
        Self::load_with(model, cfg, Some(device))
    }

    fn load_with(
        model: &Path,
        mut cfg: LoadConfig,
        sim: Option<Arc<SimDevice>>,
    ) -> Result<Pipeline> {
        let source = ModelSource::open(model)?;
        let mut notes = Vec::new();
        if cfg.host_budget.is_none() && cfg.device == DeviceChoice::Cpu {
            if let Some((budget, note)) = default_host_budget(&source)? {
                cfg.host_budget = Some(budget);
                notes.push(note);
            }
        }
        let family = source.family();
        let component = |name: &str| source.component(name);
        let index =
            crate::json::parse(source.model_index_json()).map_err(|source| Error::Json {
                what: "model_index.json".into(),
                source,
            })?;
        if cfg.host_budget.is_some() && cfg.device != DeviceChoice::Cpu {
            return Err(Error::InvalidArgument(
                "--host-budget is not yet supported on this device (the GPU path: cuda or sim); \
                 use --device cpu"
                    .into(),
            ));
        }
        let mut deferred: Vec<(crate::loader::Component, String)> = Vec::new();
        let force_zeros_for_empty_prompt = index["force_zeros_for_empty_prompt"]
            .as_bool()
            .unwrap_or(family == ModelFamily::Sdxl);

        // On the GPU path weights are converted to the compute dtype at load (the kernels read
        // them as stored); the CPU ops read any float dtype.
        let (store, sim, gpu) = match cfg.device {
            DeviceChoice::Cpu => {
                let capacity = cfg.budget.unwrap_or(u64::MAX / 4).max(1 << 20);
                let device = sim.unwrap_or_else(|| {
                    SimDevice::new(SimConfig {
                        capacity,
                        ..SimConfig::default()
                    })
                });
                let store = HostStore::new(device.clone() as Arc<dyn Device>);
                (store, Some(device), None)
            }
            DeviceChoice::Cuda(n) => {
                let dev =
                    CudaDevice::new(n).map_err(|source| Error::Device { ordinal: n, source })?;
                let dev = dev as Arc<dyn Device>;
                let store = HostStore::new(dev.clone());
                (store, None, Some((dev, None)))
            }
            DeviceChoice::Sim => {
                let device = SimDevice::new(SimConfig {
                    capacity: sim_capacity(cfg.budget),
                    ..SimConfig::default()
                });
                let dev = device.clone() as Arc<dyn Device>;
                let store = HostStore::new(dev.clone());
                (store, None, Some((dev, Some(device))))
            }
        };
        let convert = gpu.as_ref().map(|_| pager_dtype(cfg.dtype));
        // With a host budget, weights are registered once their tiers are planned.
        let mut register = |c: &crate::loader::Component, name: &str, convert| -> Result<()> {
            if cfg.host_budget.is_some() {
                deferred.push((c.clone(), format!("{name}.")));
                Ok(())
            } else {
                c.register_into(&store, &format!("{name}."), convert)
                    .map(drop)
                    .map_err(|e| Error::in_component(name, e))
            }
        };
        let mut groups = Vec::new();
        let mut encoders = Vec::new();
        let enc_names: &[&str] = match family {
            ModelFamily::Sdxl => &["text_encoder", "text_encoder_2"],
            _ => &["text_encoder"],
        };
        for (&enc, &tok) in enc_names.iter().zip(tokenizer_names(family)) {
            let c = component(enc)?;
            let model = ClipTextModel::from_config_json(&c.config_json, enc)?;
            register(&c, enc, convert)?;
            groups.push(model.groups());
            encoders.push(TextEncoder {
                tokenizer: load_tokenizer(&source, tok)?,
                model,
            });
        }
        let c = component("unet")?;
        let unet_json = c.config()?;
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
        register(&c, "unet", convert)?;
        groups.push(unet.groups());
        let c = component("vae")?;
        let vae = Vae::new(VaeConfig::from_json(&c.config_json)?)?;
        vae.check_weights(
            c.tensors
                .iter()
                .map(|t| (t.name.as_str(), t.shape.as_slice())),
        )?;
        let vae_dtype = vae_dtype(&vae, cfg.dtype);
        let vae_convert = gpu.as_ref().map(|_| pager_dtype(vae_dtype));
        register(&c, "vae", vae_convert)?;
        groups.push(vae.groups());
        let scheduler_config = component("scheduler")?.config_json;

        let all: u64 =
            store.weight_bytes() + deferred.iter().map(|(c, _)| c.stored_bytes()).sum::<u64>();
        let mode = match cfg.mode {
            Some(m) => m,
            None => match cfg.budget {
                Some(b) if b < all + cfg.reserve => Mode::Auto,
                _ => Mode::None,
            },
        };
        let engine = match (sim, gpu) {
            (Some(device), _) => {
                let ecfg = ExecConfig {
                    mode,
                    budget: cfg.budget,
                    reserve: cfg.reserve,
                    metrics: cfg.metrics,
                    ..ExecConfig::default()
                };
                let exec = match cfg.host_budget {
                    Some(hb) => Executor::with_host_budget(
                        device.clone(),
                        &store,
                        &deferred,
                        &groups,
                        &["unet"],
                        ecfg,
                        hb,
                    )?,
                    None => Executor::with_pass(device.clone(), &store, &groups, &["unet"], ecfg)?,
                };
                Engine::Sim { exec, device }
            }
            (None, Some((dev, sim))) => {
                let dtypes = component_dtypes(&groups, cfg.dtype, vae_dtype);
                let dt: Vec<(&str, DType)> = dtypes.iter().map(|(c, d)| (c.as_str(), *d)).collect();
                // Plan the activation reserve for the default image (one, with CFG); a larger
                // request grows it when it comes.
                let planning = GpuGroups::new(&store, &groups, &dt, 0.0)?;
                let req = ReserveRequest {
                    images: 1,
                    cfg: true,
                    latent: sample_size,
                    tokens: token_len(&encoders),
                };
                let planned = plan_with(family, &encoders, &unet, &vae, &planning, &req)?;
                let reserve = cfg.reserve.max(planned.reserve());
                let mode = match (cfg.mode, cfg.budget) {
                    (Some(m), _) => m,
                    (None, Some(b)) if b < all + reserve => Mode::Auto,
                    (None, _) => Mode::None,
                };
                let exec = GpuExecutor::with_pass(
                    dev.clone(),
                    &store,
                    &groups,
                    &dt,
                    &["unet"],
                    gpu_exec_config(&cfg, mode, reserve),
                )?;
                Engine::Gpu(Mutex::new(GpuEngine {
                    plan: Box::new(exec.plan()),
                    exec: Some(exec),
                    dev,
                    sim,
                    choice: cfg.device,
                    dtype: cfg.dtype,
                    vae_dtype,
                    cfg,
                    mode,
                }))
            }
            (None, None) => {
                return Err(Error::InvalidArgument(
                    "no device was opened for the pipeline".into(),
                ))
            }
        };
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
            engine,
            notes,
        })
    }

    /// What loading decided on the user's behalf (e.g. a default host budget because the
    /// weights do not fit in the available memory), for the caller to show.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The smallest device budget `mode` can run this model in, with `reserve` for activations.
    pub fn minimum_budget(&self, mode: Mode, reserve: u64) -> Result<u64> {
        Executor::minimum_budget(&self.store, &self.groups, mode, reserve)
    }

    /// Which model family was loaded.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// The CPU path's executor (`None` on the GPU path).
    pub fn executor(&self) -> Option<&Executor> {
        match &self.engine {
            Engine::Sim { exec, .. } => Some(exec),
            Engine::Gpu(_) => None,
        }
    }

    /// Where the pipeline computes.
    pub fn device(&self) -> DeviceChoice {
        match &self.engine {
            Engine::Sim { .. } => DeviceChoice::Cpu,
            Engine::Gpu(e) => lock(e).choice,
        }
    }

    /// The simulated device the pipeline pages through: the CPU path's, or the simulated GPU
    /// of [`DeviceChoice::Sim`] (`None` on CUDA). For timelines, leak and race checks.
    pub fn sim_device(&self) -> Option<Arc<SimDevice>> {
        match &self.engine {
            Engine::Sim { device, .. } => Some(device.clone()),
            Engine::Gpu(e) => lock(e).sim.clone(),
        }
    }

    /// The compute dtypes `(text encoders and UNet, VAE)`: f32 on the CPU.
    pub fn dtypes(&self) -> (DType, DType) {
        match &self.engine {
            Engine::Sim { .. } => (DType::F32, DType::F32),
            Engine::Gpu(e) => {
                let e = lock(e);
                (e.dtype, e.vae_dtype)
            }
        }
    }

    /// The paging plan being run.
    pub fn plan(&self) -> PlanSummary {
        match &self.engine {
            Engine::Sim { exec, .. } => exec.plan(),
            Engine::Gpu(e) => {
                let e = lock(e);
                e.exec
                    .as_ref()
                    .map_or_else(|| (*e.plan).clone(), GpuExecutor::plan)
            }
        }
    }

    /// Paging metrics so far (empty unless loaded with `metrics`).
    pub fn metrics(&self) -> Result<RunMetrics> {
        match &self.engine {
            Engine::Sim { exec, .. } => exec.metrics(),
            Engine::Gpu(e) => lock(e).exec()?.metrics(),
        }
    }

    /// Bytes of the budget kept for activations (on the CPU path, what was configured; on the
    /// GPU path, CUDA or simulated, the planned reserve, grown by generations that need more).
    pub fn reserve(&self) -> u64 {
        match &self.engine {
            Engine::Sim { exec, .. } => exec.scheduler().workspace().len,
            Engine::Gpu(e) => lock(e).exec.as_ref().map_or(0, |x| x.workspace().len),
        }
    }

    /// The activation arena peaks a generation with `p` would reach on the GPU path computing in
    /// `dtype` (the VAE as [`vae_dtype`] says), measured by running the models in recording
    /// mode: needs no GPU, works on a CPU pipeline too.
    pub fn reserve_plan(&self, dtype: DType, p: &GenerateParams) -> Result<ReservePlan> {
        let dtypes = component_dtypes(&self.groups, dtype, vae_dtype(&self.vae, dtype));
        let dt: Vec<(&str, DType)> = dtypes.iter().map(|(c, d)| (c.as_str(), *d)).collect();
        let groups = GpuGroups::for_planning(&self.store, &self.groups, &dt)?;
        plan_with(
            self.family,
            &self.encoders,
            &self.unet,
            &self.vae,
            &groups,
            &self.reserve_request(p)?,
        )
    }

    /// The shape of a generation, for reserve planning.
    fn reserve_request(&self, p: &GenerateParams) -> Result<ReserveRequest> {
        let (w, h) = self.image_size(p)?;
        let f = self.vae.scale_factor();
        Ok(ReserveRequest {
            images: p.batch.max(1),
            cfg: p.guidance > 1.0,
            latent: (h / f, w / f),
            tokens: token_len(&self.encoders),
        })
    }

    /// The image size `p` asks for, checked.
    fn image_size(&self, p: &GenerateParams) -> Result<(usize, usize)> {
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
        Ok((w, h))
    }

    /// Pinned host bytes holding the weights.
    pub fn pinned_host_bytes(&self) -> u64 {
        self.store.pinned_bytes()
    }

    /// Race reports of the simulated device, CPU path or simulated GPU (empty when paging and
    /// kernel ordering are correct; always empty on CUDA, which has no race checker).
    pub fn races(&self) -> Vec<String> {
        self.sim_device().map_or_else(Vec::new, |d| d.races())
    }

    /// [`Error::Races`] when the simulated device (CPU path or simulated GPU) has reported data
    /// races (results computed since cannot be trusted); `Ok` when it has none, and always on
    /// CUDA. [`Pipeline::generate`] checks this before it returns.
    pub fn check_races(&self) -> Result<()> {
        races_error(self.races())
    }

    /// The scheduler a run with `--scheduler name` uses (`None`: the model's own).
    pub fn scheduler_kind(&self, name: Option<&str>) -> Result<schedulers::SchedulerKind> {
        Ok(schedulers::build(name, false, &self.scheduler_config)?.kind())
    }

    /// The default image size: the UNet's sample size times the VAE's scale factor.
    pub fn default_size(&self) -> (usize, usize) {
        let f = self.vae.scale_factor();
        (self.sample_size.1 * f, self.sample_size.0 * f)
    }

    /// Encodes one batch of texts with every text encoder on `b`: (prompt embeds `[n, 77, C]`,
    /// pooled `[n, P]` for SDXL), on the host.
    fn encode_on<B: Backend, S: WeightSource<B>>(
        &self,
        b: &B,
        src: &S,
        texts: &[&str],
        warnings: &mut Vec<String>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut states = Vec::new();
        let mut pooled = None;
        let opts = clip_options(self.family);
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
            let m = b.mark();
            let out = e.model.forward_on(b, src, &ids, &opts)?;
            if self.family == ModelFamily::Sdxl {
                if let Some(p) = &out.text_embeds {
                    pooled = Some(b.download(p)?);
                }
                for h in &out.hidden_states {
                    states.push(b.download(h)?);
                }
            } else {
                states.push(b.download(&out.last_hidden_state)?);
            }
            drop(out);
            b.release(m)?;
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
        progress: impl FnMut(usize, usize),
    ) -> Result<Generated> {
        match &self.engine {
            Engine::Sim { exec, .. } => {
                let b = CpuBackend::new();
                let on = Stages {
                    text: &b,
                    unet: &b,
                    vae: &b,
                    src: exec,
                    sched: exec.scheduler(),
                };
                let out = self.run(on, p, progress);
                // A race makes any result (or error) of the run suspect: it comes first.
                self.check_races()?;
                out
            }
            Engine::Gpu(engine) => {
                let out = self.run_gpu(engine, p, progress);
                // On the simulated GPU a race makes any result suspect, as on the CPU path (the
                // engine is unlocked by now: reading the races locks it).
                self.check_races()?;
                out
            }
        }
    }

    /// [`Pipeline::generate`] on the GPU executor.
    fn run_gpu(
        &self,
        engine: &Mutex<GpuEngine>,
        p: &GenerateParams,
        progress: impl FnMut(usize, usize),
    ) -> Result<Generated> {
        let mut guard = lock(engine);
        self.fit_reserve(&mut guard, p)?;
        let e = &*guard;
        let exec = e.exec()?;
        let text = exec.backend(e.dtype)?;
        let unet = exec.backend(e.dtype)?;
        let vae = exec.backend(e.vae_dtype)?;
        let on = Stages {
            text: &text,
            unet: &unet,
            vae: &vae,
            src: exec,
            sched: exec.scheduler(),
        };
        self.run(on, p, progress)
    }

    /// Makes the GPU executor's activation reserve large enough for `p`: re-planned inside the
    /// budget when one was given (an error if it no longer fits), else the executor is rebuilt
    /// with a budget of the weights plus the larger reserve.
    fn fit_reserve(&self, e: &mut GpuEngine, p: &GenerateParams) -> Result<()> {
        let need = self.reserve_plan(e.dtype, p)?.reserve();
        let have = e.exec()?.workspace().len;
        if need <= have {
            return Ok(());
        }
        if e.cfg.budget.is_some() {
            *e.plan = e.exec()?.set_reserve(need)?;
            return Ok(());
        }
        let dtypes = component_dtypes(&self.groups, e.dtype, e.vae_dtype);
        let dt: Vec<(&str, DType)> = dtypes.iter().map(|(c, d)| (c.as_str(), *d)).collect();
        let build = |reserve: u64| {
            let cfg = gpu_exec_config(&e.cfg, e.mode, reserve);
            GpuExecutor::with_pass(
                e.dev.clone(),
                &self.store,
                &self.groups,
                &dt,
                &["unet"],
                cfg,
            )
        };
        let mut slot = e.exec.take();
        let r = rebuild_dropping_first(&mut slot, || build(need), || build(have));
        if let Some(x) = &slot {
            *e.plan = x.plan();
        }
        e.exec = slot;
        r
    }

    /// The pipeline on the given backends: prompts encoded on `text`, the denoising loop on
    /// `unet` (latents uploaded, the noise prediction downloaded; guidance and the scheduler
    /// step on the host, where the latents are small), decoding on `vae`.
    fn run<B: Backend, S: WeightSource<B>>(
        &self,
        on: Stages<'_, B, S>,
        p: &GenerateParams,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Generated> {
        let (w, h) = self.image_size(p)?;
        let f = self.vae.scale_factor();
        if p.batch == 0 || p.steps == 0 {
            return Err(Error::InvalidArgument(
                "--batch and --steps must be at least 1".into(),
            ));
        }
        let n = p.batch;
        let cfg = p.guidance > 1.0;
        let mut scheduler =
            schedulers::build(p.scheduler.as_deref(), p.karras, &self.scheduler_config)?;
        scheduler.set_timesteps(p.steps)?;

        // Prompt embeddings: [negative; positive], each repeated per image.
        let mut warnings = Vec::new();
        let (pos, pos_pooled) = self.encode_on(on.text, on.src, &[&p.prompt], &mut warnings)?;
        check_finite("the text encoder", None, 0, pos.data())?;
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
            let neg = [p.negative_prompt.as_deref().unwrap_or("")];
            let (e, pl) = self.encode_on(on.text, on.src, &neg, &mut warnings)?;
            check_finite("the text encoder", None, 0, e.data())?;
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
                if let Some((i, v)) = t.first_non_finite() {
                    return Err(Error::InvalidArgument(format!(
                        "--init-latents: element {i} is {v}; initial latents must be finite"
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
        check_finite(
            "scaling the initial latents by init_noise_sigma",
            None,
            0,
            latents.data(),
        )?;

        // The text context stays on the backend for the whole loop, below each step's mark.
        let ub = on.unet;
        let loop_mark = ub.mark();
        let context_on = ub.upload(&context)?;
        let added_on = match &added {
            Some((pooled, time_ids)) => Some((ub.upload(pooled)?, time_ids)),
            None => None,
        };
        let timesteps = scheduler.timesteps().to_vec();
        let steps = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let mut input = if cfg {
                Tensor::concat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            scheduler.scale_model_input(input.data_mut(), i)?;
            check_finite("scaling the latents", Some(i + 1), steps, input.data())?;
            let step_mark = ub.mark();
            let x = ub.upload(&input)?;
            let cond = added_on.as_ref().map(|(p, t)| (p, *t));
            on.sched.begin_pass()?;
            let out = self
                .unet
                .forward_on(ub, on.src, &x, &[t], &context_on, cond)?;
            on.sched.end_pass()?;
            let out = ub.download(&out)?;
            ub.release(step_mark)?;
            check_finite("the UNet", Some(i + 1), steps, out.data())?;
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
            check_finite("classifier-free guidance", Some(i + 1), steps, &guided)?;
            let next = scheduler.step(&guided, i, latents.data(), &mut generator)?;
            check_finite("the scheduler step", Some(i + 1), steps, &next)?;
            latents = Tensor::new(lat_shape.clone(), next)?;
            progress(i + 1, timesteps.len());
        }
        drop(added_on);
        drop(context_on);
        ub.release(loop_mark)?;

        let vb = on.vae;
        let m = vb.mark();
        let z = vb.upload(&self.vae.unscale_latents(&latents))?;
        let decoded = self.vae.decode_on(vb, on.src, &z)?;
        let images = vb.download(&decoded)?;
        drop(decoded);
        vb.release(m)?;
        // Reports a weight release that failed in a destructor.
        on.sched.synchronize()?;
        check_finite("the VAE decoder", None, steps, images.data())?;
        Ok(Generated {
            latents,
            images,
            size: (w, h),
            warnings,
        })
    }
}

/// [`Error::Races`] for a non-empty list of race reports.
fn races_error(races: Vec<String>) -> Result<()> {
    let count = races.len();
    match races.into_iter().next() {
        None => Ok(()),
        Some(first) => Err(Error::Races { count, first }),
    }
}

/// [`Error::NonFinite`] naming `stage` (and `step` of `steps`) when `data` holds a NaN or an
/// infinity.
fn check_finite(
    stage: &'static str,
    step: Option<usize>,
    steps: usize,
    data: &[f32],
) -> Result<()> {
    let Some(&value) = data.iter().find(|v| !v.is_finite()) else {
        return Ok(());
    };
    Err(Error::NonFinite {
        stage,
        step,
        steps,
        value,
        count: data.iter().filter(|v| !v.is_finite()).count(),
        total: data.len(),
    })
}

/// The backends each stage runs on, the weights' source and its scheduler.
struct Stages<'x, B, S> {
    text: &'x B,
    unet: &'x B,
    vae: &'x B,
    src: &'x S,
    sched: &'x Scheduler,
}

impl GpuEngine {
    /// The GPU executor, or an error if it was lost to a failed rebuild.
    fn exec(&self) -> Result<&GpuExecutor> {
        self.exec.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "the GPU executor is gone: growing its activation reserve failed and so did \
                 restoring the previous one; load the pipeline again"
                    .into(),
            )
        })
    }
}

/// Replaces the value in `slot` by `build()`, dropping the old value first so that the two
/// never hold device memory at once (the GPU executor's arena holds the weights and the reserve:
/// both at once would need twice the memory). When `build` fails its error is returned and
/// `restore()` refills the slot (with the old configuration); the slot stays empty only when
/// both fail.
fn rebuild_dropping_first<T>(
    slot: &mut Option<T>,
    build: impl FnOnce() -> Result<T>,
    restore: impl FnOnce() -> Result<T>,
) -> Result<()> {
    drop(slot.take());
    match build() {
        Ok(v) => {
            *slot = Some(v);
            Ok(())
        }
        Err(e) => {
            *slot = restore().ok();
            Err(e)
        }
    }
}

/// Locks the GPU engine (a panic while it was held leaves nothing half-updated that matters:
/// the executor is replaced whole).
fn lock(e: &Mutex<GpuEngine>) -> MutexGuard<'_, GpuEngine> {
    e.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_pager::DevicePtr;

    /// Device memory held until dropped, like the GPU executor's arena.
    struct Arena {
        dev: Arc<SimDevice>,
        ptr: DevicePtr,
    }

    impl Arena {
        fn new(dev: &Arc<SimDevice>, bytes: u64) -> Result<Arena> {
            let ptr = dev.alloc_device(bytes).map_err(|e| {
                Error::InvalidArgument(format!("alloc of {bytes} bytes failed: {e}"))
            })?;
            Ok(Arena {
                dev: dev.clone(),
                ptr,
            })
        }
    }

    impl Drop for Arena {
        fn drop(&mut self) {
            self.dev.free_device(self.ptr).unwrap();
        }
    }

    #[test]
    fn rebuilding_the_executor_never_holds_old_and_new_at_once() {
        let mib = 1u64 << 20;
        // Room for the larger arena alone, not for both: the old order (build, then drop)
        // needed 10 + 12 MiB here and failed.
        let dev = SimDevice::new(SimConfig {
            capacity: 16 * mib,
            ..SimConfig::default()
        });
        let mut slot = Some(Arena::new(&dev, 10 * mib).unwrap());
        rebuild_dropping_first(
            &mut slot,
            || Arena::new(&dev, 12 * mib),
            || Arena::new(&dev, 10 * mib),
        )
        .unwrap();
        assert_eq!(dev.device_bytes_allocated(), 12 * mib);
        assert_eq!(dev.device_bytes_peak(), 12 * mib, "old and new overlapped");

        // A rebuild that cannot fit restores the old size and reports the failure.
        let err = rebuild_dropping_first(
            &mut slot,
            || Arena::new(&dev, 20 * mib),
            || Arena::new(&dev, 12 * mib),
        )
        .unwrap_err();
        assert!(err.to_string().contains("alloc of"), "{err}");
        assert_eq!(dev.device_bytes_allocated(), 12 * mib);
        assert!(slot.is_some());

        // Both failing leaves the slot empty (and the memory free), never half-built.
        let fail = || Arena::new(&dev, 20 * mib);
        assert!(rebuild_dropping_first(&mut slot, fail, fail).is_err());
        assert!(slot.is_none());
        assert_eq!(dev.device_bytes_allocated(), 0);
        assert_eq!(dev.device_bytes_peak(), 12 * mib);
    }

    #[test]
    fn races_become_one_error_naming_the_first() {
        assert!(races_error(Vec::new()).is_ok());
        let e = races_error(vec!["a raced b".into(), "c raced d".into()]).unwrap_err();
        assert!(matches!(&e, Error::Races { count: 2, first } if first == "a raced b"));
        let line = e.to_string();
        assert!(
            line.contains("2 data race") && line.contains("a raced b"),
            "{line}"
        );
        assert!(
            !line.contains("invalid argument") && !line.contains('\n'),
            "{line}"
        );
    }

    #[test]
    fn non_finite_values_name_the_stage_and_step() {
        assert!(check_finite("the UNet", Some(1), 4, &[0.0, -1.0, 3.5]).is_ok());
        for (bad, shown) in [
            (f32::NAN, "NaN"),
            (f32::INFINITY, "inf"),
            (f32::NEG_INFINITY, "-inf"),
        ] {
            let e = check_finite("the UNet", Some(3), 30, &[1.0, bad, 2.0, bad]).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("the UNet produced {shown} at step 3 of 30 (2 of 4 values are not finite)")
            );
        }
        let e = check_finite("the VAE decoder", None, 30, &[f32::NAN]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the VAE decoder produced NaN (1 of 1 values are not finite)"
        );
    }
}
