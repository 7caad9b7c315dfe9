//! The executor on a GPU: the same weight groups as the CPU [`Executor`](crate::exec::Executor),
//! paged by ferry-sched onto a [`Device`] that launches PTX (a CUDA GPU, or the simulated GPU
//! running the same kernels on its PTX interpreter), handed to the models as [`CudaTensor`]
//! views into the scheduler's arena; and the planning of the activation reserve, so activations come from
//! the same budget as the weights, sized before the run rather than allocated per op.
//!
//! The part that needs no device ([`GpuGroups`]: grouping, dtype checks, fake views;
//! [`plan_reserve`]: recording-mode runs of the models) is usable and tested without a GPU.

use crate::backend::{Backend, CudaBackend, CudaTensor, DownloadStaging, ARENA_ALIGN};
use crate::error::{Error, Result};
use crate::exec::{build_groups, tensor_dtype, ComponentGroups, ExecConfig, GroupInfo};
use crate::models::clip::{ClipOptions, ClipTextModel};
use crate::models::unet::{PerBlock, UNet2DConditionModel};
use crate::models::vae::Vae;
use crate::tensor::{DType, Tensor};
use crate::weights::{ResidentViews, WeightGroup, WeightSource};
use ferry_pager::host::HostStore;
use ferry_pager::{Device, DevicePtr, DeviceRange, StreamId};
use ferry_sched::{
    CostModel, GroupDesc, GroupId, PlanSummary, Replan, RunMetrics, Scheduler, SchedulerConfig,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The compute dtype of each component (`("unet", F16)`, `("vae", F32)`, ...).
pub type ComponentDTypes<'a> = &'a [(&'a str, DType)];

/// Weight groups for the GPU, built without a device: every weight of the listed components in
/// its group (the CPU executor's grouping), each checked to be stored in its component's
/// compute dtype (the CUDA kernels read weights as they are stored; convert at load).
pub struct GpuGroups {
    groups: Vec<GroupInfo>,
    descs: Vec<GroupDesc>,
    by_name: HashMap<String, GroupId>,
    /// Per group: the weights' dtype (all equal to the component's compute dtype).
    dtypes: Vec<DType>,
}

impl std::fmt::Debug for GpuGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuGroups")
            .field("groups", &self.groups.len())
            .finish_non_exhaustive()
    }
}

impl GpuGroups {
    /// Groups the weights of `components` in `store` and checks their dtypes against `dtypes`
    /// (every component needs an entry).
    pub fn new(
        store: &HostStore,
        components: &[ComponentGroups],
        dtypes: ComponentDTypes<'_>,
        compute_ns_per_byte: f64,
    ) -> Result<GpuGroups> {
        GpuGroups::build(store, components, dtypes, compute_ns_per_byte, true)
    }

    /// Like [`GpuGroups::new`] but without the dtype check: for planning (recording-mode runs
    /// read only names and shapes), e.g. from a store loaded for the CPU.
    pub fn for_planning(
        store: &HostStore,
        components: &[ComponentGroups],
        dtypes: ComponentDTypes<'_>,
    ) -> Result<GpuGroups> {
        GpuGroups::build(store, components, dtypes, 0.0, false)
    }

    fn build(
        store: &HostStore,
        components: &[ComponentGroups],
        dtypes: ComponentDTypes<'_>,
        compute_ns_per_byte: f64,
        check: bool,
    ) -> Result<GpuGroups> {
        let (groups, descs, by_name) = build_groups(store, components, compute_ns_per_byte)?;
        let mut per_group = Vec::with_capacity(groups.len());
        for g in &groups {
            let want = dtypes
                .iter()
                .find(|(c, _)| *c == g.component)
                .map(|&(_, d)| d)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "no compute dtype given for component '{}'",
                        g.component
                    ))
                })?;
            for (_, t) in g.tensors.iter().filter(|_| check) {
                let stored = tensor_dtype(t.dtype, &t.name)?;
                if stored != want {
                    return Err(Error::Config(format!(
                        "weight '{}' is stored as {stored:?}, but {} runs in {want:?} on CUDA \
                         (the kernels read weights as stored: register them converted to the \
                         compute dtype at load)",
                        t.name, g.component
                    )));
                }
            }
            per_group.push(want);
        }
        Ok(GpuGroups {
            groups,
            descs,
            by_name,
            dtypes: per_group,
        })
    }

    /// Number of groups.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Whether there are no groups.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Full group names (`component.prefix`), in plan order.
    pub fn names(&self) -> Vec<&str> {
        self.groups.iter().map(|g| g.name.as_str()).collect()
    }

    /// The id of group `component.prefix`.
    pub fn id(&self, component: &str, prefix: &str) -> Result<GroupId> {
        let name = format!("{component}.{prefix}");
        self.by_name
            .get(&name)
            .copied()
            .ok_or_else(|| Error::InvalidArgument(format!("no weight group '{name}' was declared")))
    }

    /// The group's `(key, shape)` tensors, in the order the scheduler places them.
    pub fn tensors(&self, g: GroupId) -> Vec<(&str, &[usize])> {
        self.groups.get(g.0).map_or_else(Vec::new, |info| {
            info.tensors
                .iter()
                .map(|(k, t)| (k.as_str(), t.shape.as_slice()))
                .collect()
        })
    }

    /// The dtype of the group's weights.
    pub fn dtype(&self, g: GroupId) -> Option<DType> {
        self.dtypes.get(g.0).copied()
    }

    /// Device bytes of all groups (as the scheduler lays them out).
    pub fn device_bytes(&self) -> u64 {
        self.descs.iter().map(|d| d.device_bytes()).sum()
    }

    /// Views of group `g`'s tensors at the device `ranges` the scheduler placed them at.
    pub fn views(&self, g: GroupId, ranges: &[DeviceRange]) -> Result<Vec<(String, CudaTensor)>> {
        let info = self
            .groups
            .get(g.0)
            .ok_or_else(|| Error::InvalidArgument(format!("group id {} is out of range", g.0)))?;
        if ranges.len() != info.tensors.len() {
            return Err(Error::InvalidArgument(format!(
                "group '{}': {} device ranges for {} tensors",
                info.name,
                ranges.len(),
                info.tensors.len()
            )));
        }
        let dtype = self.dtypes[g.0];
        info.tensors
            .iter()
            .zip(ranges)
            .map(|((k, t), r)| Ok((k.clone(), CudaTensor::weight(*r, dtype, t.shape.clone())?)))
            .collect()
    }

    /// Resident views of every group at fake, non-overlapping, aligned addresses from `base`
    /// on (for recording-mode runs); returns them with the range they span.
    pub fn fake_views(&self, base: u64) -> Result<(ResidentViews, DeviceRange)> {
        let mut views = ResidentViews::new();
        let mut at = base;
        for (gi, info) in self.groups.iter().enumerate() {
            let size = self.dtypes[gi].size() as u64;
            let ranges: Vec<DeviceRange> = info
                .tensors
                .iter()
                .map(|(_, t)| {
                    let bytes = t.shape.iter().map(|&d| d as u64).product::<u64>() * size;
                    let r = DeviceRange::new(DevicePtr(at), bytes);
                    at = (at + bytes).next_multiple_of(ARENA_ALIGN);
                    r
                })
                .collect();
            let tensors = self.views(GroupId(gi), &ranges)?;
            let prefix = &info.name[info.component.len() + 1..];
            views.insert(&info.component, prefix, tensors);
        }
        Ok((views, DeviceRange::new(DevicePtr(base), at - base)))
    }
}

/// Runs model layers on a GPU (CUDA or simulated) with their weights paged through Ferry's
/// scheduler.
pub struct GpuExecutor {
    dev: Arc<dyn Device>,
    sched: Scheduler,
    groups: GpuGroups,
    /// The pinned buffer every backend of this executor downloads through.
    staging: DownloadStaging,
}

impl Drop for GpuExecutor {
    fn drop(&mut self) {
        // Nothing to report to from drop; the device frees it when it goes otherwise.
        let _ = self.staging.free(self.dev.as_ref());
    }
}

impl std::fmt::Debug for GpuExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuExecutor")
            .field("groups", &self.groups.len())
            .finish_non_exhaustive()
    }
}

/// Launch latency assumed for planning (the transfer costs are measured on the device).
const LAUNCH_LATENCY: Duration = Duration::from_micros(5);

impl GpuExecutor {
    /// Groups the weights in `store` (registered on `dev`), checks their dtypes against
    /// `dtypes`, and plans paging them within `cfg.budget` (`None`: everything resident plus
    /// `cfg.reserve`). Only the groups of the `pass` components form the repeating order the
    /// scheduler prefetches for; the others are loaded on demand.
    pub fn with_pass(
        dev: Arc<dyn Device>,
        store: &HostStore,
        components: &[ComponentGroups],
        dtypes: ComponentDTypes<'_>,
        pass: &[&str],
        cfg: ExecConfig,
    ) -> Result<GpuExecutor> {
        if !dev.can_launch_ptx() {
            return Err(Error::InvalidArgument(format!(
                "the GPU executor needs a device that runs kernels; {} does not",
                dev.name()
            )));
        }
        let groups = GpuGroups::new(store, components, dtypes, cfg.compute_ns_per_byte)?;
        let order: Vec<GroupId> = (0..groups.len())
            .filter(|&g| pass.contains(&groups.groups[g].component.as_str()))
            .map(GroupId)
            .collect();
        if order.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "none of the pass components {pass:?} has weight groups"
            )));
        }
        let budget = cfg
            .budget
            .unwrap_or(ferry_sched::plan::align(cfg.reserve) + groups.device_bytes());
        let cost = CostModel::measure(dev.as_ref(), LAUNCH_LATENCY)?;
        let sched = Scheduler::new(
            dev.clone(),
            groups.descs.clone(),
            order,
            SchedulerConfig {
                mode: cfg.mode,
                budget,
                reserve: cfg.reserve,
                run_ahead: 64,
                metrics: cfg.metrics,
                cost,
            },
        )?;
        Ok(GpuExecutor {
            dev,
            sched,
            groups,
            staging: DownloadStaging::default(),
        })
    }

    /// A backend computing in `dtype` on the scheduler's compute stream, its activations on
    /// the scheduler's workspace (the reserve carved out of the budget).
    pub fn backend(&self, dtype: DType) -> Result<CudaBackend<'_>> {
        CudaBackend::with_staging(
            self.dev.as_ref(),
            self.sched.compute_stream(),
            self.workspace(),
            dtype,
            &self.staging,
        )
    }

    /// The activation workspace (the scheduler's reserve).
    pub fn workspace(&self) -> DeviceRange {
        self.sched.workspace()
    }

    /// The stream compute is issued on.
    pub fn compute_stream(&self) -> StreamId {
        self.sched.compute_stream()
    }

    /// Plans again with a new activation reserve inside the same budget (waits for the device).
    pub fn set_reserve(&self, reserve: u64) -> Result<PlanSummary> {
        Ok(self.sched.replan(Replan {
            reserve: Some(reserve),
            ..Replan::default()
        })?)
    }

    /// The groups.
    pub fn groups(&self) -> &GpuGroups {
        &self.groups
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.dev
    }

    /// The plan the scheduler runs.
    pub fn plan(&self) -> PlanSummary {
        self.sched.plan()
    }

    /// The scheduler (for passes, metrics and traces).
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    /// Metrics so far (if enabled).
    pub fn metrics(&self) -> Result<RunMetrics> {
        Ok(self.sched.metrics()?)
    }

    /// Acquires group `component.prefix`: the compute stream waits for its copy, the host does
    /// not. Released when the returned group is dropped (after the work issued with it).
    pub fn group(&self, component: &str, prefix: &str) -> Result<GpuWeights<'_>> {
        let gid = self.groups.id(component, prefix)?;
        let view = self.sched.acquire(gid)?;
        match self.groups.views(gid, &view.tensors) {
            Ok(tensors) => Ok(GpuWeights {
                exec: self,
                gid,
                name: &self.groups.groups[gid.0].name,
                tensors,
            }),
            Err(e) => {
                let _ = self.sched.release(gid);
                Err(e)
            }
        }
    }
}

/// An acquired weight group on the GPU, released on drop.
#[derive(Debug)]
pub struct GpuWeights<'a> {
    exec: &'a GpuExecutor,
    gid: GroupId,
    name: &'a str,
    tensors: Vec<(String, CudaTensor)>,
}

impl GpuWeights<'_> {
    fn find(&self, key: &str) -> Option<&CudaTensor> {
        self.tensors.iter().find(|(k, _)| k == key).map(|(_, t)| t)
    }
}

impl Drop for GpuWeights<'_> {
    fn drop(&mut self) {
        // Release records an event on the compute stream after the work that read the group;
        // it fails only on a broken device, which the next acquire reports.
        self.exec.sched.release_deferred(self.gid);
    }
}

impl<'b> WeightGroup<CudaBackend<'b>> for GpuWeights<'_> {
    fn get(&self, key: &str) -> Result<&CudaTensor> {
        self.find(key)
            .ok_or_else(|| Error::MissingWeight(format!("{}.{key}", self.name)))
    }

    fn get_shaped(&self, key: &str, shape: &[usize]) -> Result<&CudaTensor> {
        let t = WeightGroup::<CudaBackend<'b>>::get(self, key)?;
        if t.shape() != shape {
            return Err(Error::WeightShape {
                name: format!("{}.{key}", self.name),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        Ok(t)
    }

    fn opt(&self, key: &str) -> Option<&CudaTensor> {
        self.find(key)
    }

    fn name(&self) -> &str {
        self.name
    }
}

impl<'b> WeightSource<CudaBackend<'b>> for GpuExecutor {
    type Group<'a>
        = GpuWeights<'a>
    where
        Self: 'a;

    fn group<'a>(&'a self, component: &str, prefix: &str) -> Result<GpuWeights<'a>> {
        GpuExecutor::group(self, component, prefix)
    }
}

/// One generation's shape, as the activation reserve depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReserveRequest {
    /// Images per prompt.
    pub images: usize,
    /// Classifier-free guidance (the UNet runs on twice the images).
    pub cfg: bool,
    /// Latent height and width.
    pub latent: (usize, usize),
    /// Tokens per prompt (the tokenizer's padded length, 77 for CLIP).
    pub tokens: usize,
}

/// The text encoders of a model as the pipeline runs them (one prompt at a time).
#[derive(Clone, Copy, Debug)]
pub struct EncoderRun<'a> {
    /// The encoder.
    pub model: &'a ClipTextModel,
    /// The hidden states it is asked for.
    pub options: &'a ClipOptions,
}

/// Activation-arena peaks of one generation, per stage, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReservePlan {
    /// The largest text-encoder pass (batch 1).
    pub text_encoders: u64,
    /// One UNet step with its inputs (latents, text context, pooled embedding).
    pub unet: u64,
    /// The VAE decoder with its input latents.
    pub vae_decoder: u64,
}

impl ReservePlan {
    /// The reserve that covers every stage (they run one after another on the same arena),
    /// with room for an unaligned workspace start.
    pub fn reserve(&self) -> u64 {
        self.text_encoders.max(self.unet).max(self.vae_decoder) + ARENA_ALIGN
    }
}

/// Where recording runs put the workspace and the fake weights (address space only).
const REC_WS: u64 = 1 << 40;
const REC_WS_BYTES: u64 = 1 << 42;
const REC_WEIGHTS: u64 = 1 << 44;

/// Measures the activation arena peak of each stage of a generation by running the models in
/// recording mode (no GPU: launches are validated, nothing runs) with fake views of `groups`'
/// weights, each model in its component's dtype. The UNet runs on `2 × images` with CFG.
pub fn plan_reserve(
    groups: &GpuGroups,
    encoders: &[EncoderRun<'_>],
    unet: &UNet2DConditionModel,
    vae: &Vae,
    req: &ReserveRequest,
) -> Result<ReservePlan> {
    let (h, w) = req.latent;
    if req.images == 0 || req.tokens == 0 || h == 0 || w == 0 {
        return Err(Error::InvalidArgument(format!(
            "reserve planning: expected positive images, tokens and latent size, found {req:?}"
        )));
    }
    let (views, _) = groups.fake_views(REC_WEIGHTS)?;
    let dtype_of = |component: &str| -> Result<DType> {
        let g = groups
            .groups
            .iter()
            .position(|g| g.component == component)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("component '{component}' has no weight groups"))
            })?;
        Ok(groups.dtypes[g])
    };
    let ws = DeviceRange::new(DevicePtr(REC_WS), REC_WS_BYTES);
    let mut plan = ReservePlan::default();

    for e in encoders {
        let log = RefCell::new(Vec::new());
        let be = CudaBackend::recording(&log, ws, dtype_of(e.model.component())?)?;
        let ids = vec![vec![0u32; req.tokens]];
        let out = e.model.forward_on(&be, &views, &ids, e.options)?;
        drop(out);
        plan.text_encoders = plan.text_encoders.max(be.arena().peak());
    }

    {
        let c = unet.config();
        let rows = req.images * if req.cfg { 2 } else { 1 };
        let log = RefCell::new(Vec::new());
        let be = CudaBackend::recording(&log, ws, dtype_of(unet.component())?)?;
        let ctx_dim = match &c.cross_attention_dim {
            PerBlock::One(d) => *d,
            PerBlock::Each(v) => v.first().copied().unwrap_or(0),
        };
        let ctx = be.upload(&Tensor::zeros([rows, req.tokens, ctx_dim])?)?;
        let pooled;
        let time_ids = Tensor::zeros([rows, 6])?;
        let added = if unet.needs_added_cond() {
            let (atd, proj) = c
                .addition_time_embed_dim
                .zip(c.projection_class_embeddings_input_dim)
                .ok_or_else(|| {
                    Error::Config(
                        "an SDXL UNet needs addition_time_embed_dim and \
                         projection_class_embeddings_input_dim"
                            .into(),
                    )
                })?;
            let width = proj.checked_sub(6 * atd).ok_or_else(|| {
                Error::Config(format!(
                    "projection_class_embeddings_input_dim {proj} is smaller than 6 × \
                     addition_time_embed_dim {atd}"
                ))
            })?;
            pooled = be.upload(&Tensor::zeros([rows, width])?)?;
            Some((&pooled, &time_ids))
        } else {
            None
        };
        let sample = be.upload(&Tensor::zeros([rows, c.in_channels, h, w])?)?;
        let out = unet.forward_on(&be, &views, &sample, &[999.0], &ctx, added)?;
        drop(out);
        plan.unet = be.arena().peak();
    }

    {
        let log = RefCell::new(Vec::new());
        let be = CudaBackend::recording(&log, ws, dtype_of(vae.component())?)?;
        let lat = vae.config().latent_channels;
        let z = be.upload(&Tensor::zeros([req.images, lat, h, w])?)?;
        let out = vae.decode_on(&be, &views, &z)?;
        drop(out);
        plan.vae_decoder = be.arena().peak();
    }
    Ok(plan)
}
