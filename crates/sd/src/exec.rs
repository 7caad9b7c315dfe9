//! The executor: model layers ask it for their weight group just before they run and give it back
//! right after. Weights are paged through Ferry's scheduler onto the (simulated) device; on the
//! CPU path the ops read the group's bytes back out of the simulated device's memory, so the real
//! models exercise the real paging code, and any paging bug shows up as a wrong output.

use crate::error::{Error, Result};
use crate::tensor::{DType as TensorDType, Tensor};
use ferry_pager::device::sim::{KernelSpec, SimDevice};
use ferry_pager::device::HostPtr;
use ferry_pager::disk::{DiskConfig, DiskTier, SimDiskConfig};
use ferry_pager::host::{HostStore, HostTensor, TensorId};
use ferry_pager::weights::DType;
use ferry_pager::Device;
use ferry_sched::{
    plan_tiers, CostModel, DiskCost, GroupDesc, GroupId, Mode, PlanSummary, Problem, RunMetrics,
    Scheduler, SchedulerConfig, TensorSource, Tier, TierPlan,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How to page a model.
#[derive(Clone, Copy, Debug)]
pub struct ExecConfig {
    /// Offload mode.
    pub mode: Mode,
    /// Device budget in bytes; `None` = everything resident plus the reserve.
    pub budget: Option<u64>,
    /// Bytes of the budget kept for activations and workspace.
    pub reserve: u64,
    /// Record per-use metrics.
    pub metrics: bool,
    /// Modelled compute cost per weight byte, for planning on the simulated device.
    pub compute_ns_per_byte: f64,
}

impl Default for ExecConfig {
    fn default() -> Self {
        ExecConfig {
            mode: Mode::None,
            budget: None,
            reserve: 1 << 20,
            metrics: false,
            compute_ns_per_byte: 0.05,
        }
    }
}

/// One component's groups: `component` (e.g. `"unet"`) and the module prefixes of its weight groups
/// in forward order (e.g. `"conv_in"`, `"down_blocks.0.resnets.0"`, ...). Every weight of the
/// component registered as `"{component}.{key}"` must fall under exactly one prefix (the longest
/// that matches).
#[derive(Clone, Debug)]
pub struct ComponentGroups {
    /// Component name; the registered weight names start with it and a dot.
    pub component: String,
    /// Group prefixes, in the order the forward pass uses them.
    pub groups: Vec<String>,
}

pub(crate) struct GroupInfo {
    /// Component the group belongs to.
    pub(crate) component: String,
    /// Modelled compute time of one use.
    pub(crate) compute: Duration,
    /// Full group name (`component.prefix`).
    pub(crate) name: String,
    /// Keys relative to the group prefix, with their host tensors, in group order.
    pub(crate) tensors: Vec<(String, HostTensor)>,
}

pub(crate) type Built = (Vec<GroupInfo>, Vec<GroupDesc>, HashMap<String, GroupId>);

/// Assigns every weight of the listed components to its group (longest matching prefix).
pub(crate) fn build_groups(
    store: &HostStore,
    components: &[ComponentGroups],
    compute_ns_per_byte: f64,
) -> Result<Built> {
    let mut all = Vec::with_capacity(store.len());
    for i in 0..store.len() {
        all.push(store.tensor(TensorId(i as u32))?);
    }
    build_groups_from(all, components, compute_ns_per_byte)
}

/// [`build_groups`] over a list of tensors (registered in a store, or left in their files by
/// the disk tier).
pub(crate) fn build_groups_from(
    all: Vec<HostTensor>,
    components: &[ComponentGroups],
    compute_ns_per_byte: f64,
) -> Result<Built> {
    let mut groups: Vec<GroupInfo> = Vec::new();
    let mut by_name = HashMap::new();
    let mut prefixes: Vec<(String, usize)> = Vec::new();
    for c in components {
        for p in &c.groups {
            let name = format!("{}.{}", c.component, p);
            if by_name.contains_key(&name) {
                return Err(Error::InvalidArgument(format!(
                    "group '{name}' listed twice"
                )));
            }
            by_name.insert(name.clone(), GroupId(groups.len()));
            prefixes.push((format!("{name}."), groups.len()));
            groups.push(GroupInfo {
                component: c.component.clone(),
                compute: Duration::ZERO,
                name,
                tensors: Vec::new(),
            });
        }
    }
    prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    let comps: Vec<String> = components
        .iter()
        .map(|c| format!("{}.", c.component))
        .collect();
    for t in all {
        if !comps.iter().any(|c| t.name.starts_with(c.as_str())) {
            continue;
        }
        let (p, g) = prefixes
            .iter()
            .find(|(p, _)| t.name.starts_with(p.as_str()))
            .ok_or_else(|| {
                Error::Config(format!(
                    "weight '{}' belongs to no module this model uses (unknown key)",
                    t.name
                ))
            })?;
        let key = t.name[p.len()..].to_string();
        groups[*g].tensors.push((key, t));
    }
    if let Some(g) = groups.iter().find(|g| g.tensors.is_empty()) {
        return Err(Error::MissingWeight(format!("{}.*", g.name)));
    }
    for g in &mut groups {
        let bytes: u64 = g.tensors.iter().map(|(_, t)| t.len).sum();
        g.compute = Duration::from_nanos((bytes as f64 * compute_ns_per_byte) as u64);
    }
    let descs = groups
        .iter()
        .map(|g| GroupDesc {
            name: g.name.clone(),
            component: g.component.clone(),
            tensors: g
                .tensors
                .iter()
                .map(|(_, t)| TensorSource {
                    name: t.name.clone(),
                    host: t.host,
                    offset: t.offset,
                    bytes: t.len,
                })
                .collect(),
            compute: g.compute,
        })
        .collect();
    Ok((groups, descs, by_name))
}

/// Runs model layers with their weights paged through Ferry on the simulated device.
pub struct Executor {
    dev: Arc<SimDevice>,
    sched: Scheduler,
    groups: Vec<GroupInfo>,
    by_name: HashMap<String, GroupId>,
    /// The host-budget placement and the disk tiers (with a host budget only).
    tiers: Option<TierState>,
    /// f32 buffers of released weight groups, reused for the next groups' weights.
    pool: BufferPool,
}

/// Weights smaller than this are not pooled: the allocator already reuses small blocks, while
/// large ones come fresh from the OS and page-fault on every write.
const MIN_POOLED_BYTES: usize = 256 << 10;

/// Spare f32 buffers from released weight groups. Without it every layer's weights are decoded
/// into fresh memory on every step (page faults and kernel page clearing for ~3.4 GB per SD 1.5
/// UNet step); with it the next group reuses warm buffers. Holds at most `cap` bytes (the
/// largest group's f32 size), so it adds at most that to the peak.
#[derive(Debug, Default)]
struct BufferPool {
    bufs: Mutex<Vec<Vec<f32>>>,
    cap: usize,
}

impl BufferPool {
    /// A buffer of at least `n` initialised values: the smallest pooled one (and not more than
    /// twice too large), else an empty one.
    fn take(&self, n: usize) -> Vec<f32> {
        if n * 4 < MIN_POOLED_BYTES {
            return Vec::new();
        }
        let Ok(mut bufs) = self.bufs.lock() else {
            return Vec::new();
        };
        let best = bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= n && b.len() <= 2 * n)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        best.map_or_else(Vec::new, |i| bufs.swap_remove(i))
    }

    /// Keeps `buf` for reuse if it is large enough to matter and fits under the cap.
    fn put(&self, buf: Vec<f32>) {
        let bytes = buf.capacity() * 4;
        if bytes < MIN_POOLED_BYTES {
            return;
        }
        if let Ok(mut bufs) = self.bufs.lock() {
            let held: usize = bufs.iter().map(|b| b.capacity() * 4).sum();
            if held + bytes <= self.cap {
                bufs.push(buf);
            }
        }
    }
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("groups", &self.groups.len())
            .finish_non_exhaustive()
    }
}

pub(crate) fn tensor_dtype(d: DType, name: &str) -> Result<TensorDType> {
    match d {
        DType::F32 => Ok(TensorDType::F32),
        DType::F16 => Ok(TensorDType::F16),
        DType::BF16 => Ok(TensorDType::BF16),
        other => Err(Error::Config(format!(
            "weight '{name}' has dtype {other}; only f32, f16 and bf16 weights are supported"
        ))),
    }
}

impl Executor {
    /// Groups the weights in `store` by the given prefixes and plans paging them within the budget.
    /// The plan order is the concatenation of the components' group lists.
    pub fn new(
        dev: Arc<SimDevice>,
        store: &HostStore,
        components: &[ComponentGroups],
        cfg: ExecConfig,
    ) -> Result<Executor> {
        let all: Vec<&str> = components.iter().map(|c| c.component.as_str()).collect();
        Executor::with_pass(dev, store, components, &all, cfg)
    }

    /// Like [`Executor::new`], but only the groups of `pass` (e.g. `["unet"]`: one denoising step)
    /// form the repeating order the scheduler plans and prefetches for; the other components
    /// (text encoders, VAE: used once per image) are loaded on demand.
    pub fn with_pass(
        dev: Arc<SimDevice>,
        store: &HostStore,
        components: &[ComponentGroups],
        pass: &[&str],
        cfg: ExecConfig,
    ) -> Result<Executor> {
        let mut all = Vec::with_capacity(store.len());
        for i in 0..store.len() {
            all.push(store.tensor(TensorId(i as u32))?);
        }
        Self::build(dev, all, components, pass, cfg, Vec::new(), None)
    }

    fn build(
        dev: Arc<SimDevice>,
        tensors: Vec<HostTensor>,
        components: &[ComponentGroups],
        pass: &[&str],
        cfg: ExecConfig,
        disks: Vec<Arc<DiskTier>>,
        tiers: Option<TierState>,
    ) -> Result<Executor> {
        let (groups, descs, by_name) =
            build_groups_from(tensors, components, cfg.compute_ns_per_byte)?;
        let order: Vec<GroupId> = (0..groups.len())
            .filter(|&g| pass.contains(&groups[g].component.as_str()))
            .map(GroupId)
            .collect();
        if order.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "none of the pass components {pass:?} has weight groups"
            )));
        }
        let all: u64 = descs.iter().map(|d| d.device_bytes()).sum();
        let budget = cfg
            .budget
            .unwrap_or(ferry_sched::plan::align(cfg.reserve) + all);
        let sched = Scheduler::with_disks(
            dev.clone() as Arc<dyn Device>,
            descs,
            order,
            SchedulerConfig {
                mode: cfg.mode,
                budget,
                reserve: cfg.reserve,
                run_ahead: 64,
                metrics: cfg.metrics,
                cost: CostModel::of_sim(dev.config()),
            },
            disks,
        )?;
        let cap = groups
            .iter()
            .map(|g| {
                g.tensors
                    .iter()
                    .map(|(_, t)| t.shape.iter().product::<usize>() * 4)
                    .sum::<usize>()
            })
            .max()
            .unwrap_or(0);
        Ok(Executor {
            dev,
            sched,
            groups,
            by_name,
            tiers,
            pool: BufferPool {
                bufs: Mutex::new(Vec::new()),
                cap,
            },
        })
    }

    /// The smallest budget `mode` can run these components in (with `reserve` for activations).
    pub fn minimum_budget(
        store: &HostStore,
        components: &[ComponentGroups],
        mode: Mode,
        reserve: u64,
    ) -> Result<u64> {
        let (groups, descs, _) = build_groups(store, components, 0.0)?;
        let problem = ferry_sched::Problem {
            groups: descs,
            order: (0..groups.len()).map(GroupId).collect(),
            reserve,
            cost: CostModel {
                h2d_bandwidth: 1.0,
                copy_latency: Duration::ZERO,
                launch_latency: Duration::ZERO,
            },
            run_ahead: 64,
        };
        Ok(ferry_sched::plan::minimum_budget(&problem, mode))
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

    /// The simulated device the weights are paged to.
    pub fn device(&self) -> &Arc<SimDevice> {
        &self.dev
    }

    /// Race reports from the simulated device (empty when paging is correct).
    pub fn races(&self) -> Vec<String> {
        self.dev.races()
    }

    /// Acquires group `component.prefix` and reads its weights out of device memory. The group is
    /// released when the returned [`Weights`] is dropped.
    pub fn group(&self, component: &str, prefix: &str) -> Result<Weights<'_>> {
        let name = format!("{component}.{prefix}");
        let &gid = self.by_name.get(&name).ok_or_else(|| {
            Error::InvalidArgument(format!("no weight group '{name}' was declared"))
        })?;
        let info = &self.groups[gid.0];
        let (_view, read) = crate::backend::profile::timed(
            || "weights: acquire + decode".to_string(),
            || -> Result<_> {
                let view = self.sched.acquire(gid)?;
                let read = self.read_group(gid, &view.tensors);
                Ok((view, read))
            },
        )?;
        let tensors = match read {
            Ok(t) => t,
            Err(e) => {
                let _ = self.sched.release(gid);
                return Err(e);
            }
        };
        Ok(Weights {
            exec: self,
            gid,
            name: info.name.clone(),
            tensors,
        })
    }

    fn read_group(
        &self,
        gid: GroupId,
        ranges: &[ferry_pager::DeviceRange],
    ) -> Result<HashMap<String, Tensor>> {
        let info = &self.groups[gid.0];
        // The kernel stands for the layer's compute: it occupies the stream for the modelled time.
        let mut spec = KernelSpec::new(info.name.clone(), info.compute);
        for r in ranges {
            spec = spec.reads(*r);
        }
        if ranges.len() != info.tensors.len() {
            return Err(Error::InvalidArgument(format!(
                "group '{}': {} device ranges for {} tensors",
                info.name,
                ranges.len(),
                info.tensors.len()
            )));
        }
        // Each weight is decoded straight from device memory into its f32 tensor (one pass, no
        // intermediate byte copy).
        let mut jobs = Vec::with_capacity(ranges.len());
        for (t, r) in info.tensors.iter().map(|(_, t)| t).zip(ranges) {
            let n = t.shape.iter().product::<usize>();
            let buf = self.pool.take(n);
            jobs.push((*r, tensor_dtype(t.dtype, &t.name)?, t.shape.clone(), buf));
        }
        type Decoded = Vec<crate::tensor::OpResult<Tensor>>;
        let out: Arc<Mutex<Decoded>> = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let stream = self.sched.compute_stream();
        self.dev.launch(stream, spec, move |mem| {
            let mut tensors = Vec::with_capacity(jobs.len());
            for (r, dt, shape, buf) in jobs {
                tensors.push(Tensor::from_bytes_in(mem.bytes(r)?, dt, shape, buf));
            }
            if let Ok(mut s) = sink.lock() {
                *s = tensors;
            }
            Ok(())
        })?;
        self.dev.sync_stream(stream)?;
        let tensors = std::mem::take(
            &mut *out
                .lock()
                .map_err(|_| Error::InvalidArgument("weight reader poisoned".into()))?,
        );
        if tensors.len() != info.tensors.len() {
            return Err(Error::InvalidArgument(format!(
                "group '{}': read {} tensors, expected {}",
                info.name,
                tensors.len(),
                info.tensors.len()
            )));
        }
        let mut map = HashMap::with_capacity(tensors.len());
        for ((key, _), t) in info.tensors.iter().zip(tensors) {
            map.insert(key.clone(), t?);
        }
        Ok(map)
    }
}

/// An acquired weight group, released on drop.
pub struct Weights<'a> {
    exec: &'a Executor,
    gid: GroupId,
    name: String,
    tensors: HashMap<String, Tensor>,
}

impl Weights<'_> {
    /// The weight `key` (relative to the group prefix, e.g. `"conv1.weight"`).
    pub fn get(&self, key: &str) -> Result<&Tensor> {
        self.tensors
            .get(key)
            .ok_or_else(|| Error::MissingWeight(format!("{}.{key}", self.name)))
    }

    /// The weight `key`, checked against the shape the config implies.
    pub fn get_shaped(&self, key: &str, shape: &[usize]) -> Result<&Tensor> {
        let t = self.get(key)?;
        if t.shape() != shape {
            return Err(Error::WeightShape {
                name: format!("{}.{key}", self.name),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        Ok(t)
    }

    /// The weight `key` if present (optional biases).
    pub fn opt(&self, key: &str) -> Option<&Tensor> {
        self.tensors.get(key)
    }

    /// Whether the group has `key`.
    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// The group's full name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Weights<'_> {
    fn drop(&mut self) {
        // Release records an event on the compute stream; it fails only on a broken device, which
        // the next acquire reports.
        self.exec.sched.release_deferred(self.gid);
        for (_, t) in self.tensors.drain() {
            self.exec.pool.put(t.into_data());
        }
    }
}

impl crate::weights::WeightGroup<crate::backend::CpuBackend> for Weights<'_> {
    fn get(&self, key: &str) -> Result<&Tensor> {
        Weights::get(self, key)
    }
    fn get_shaped(&self, key: &str, shape: &[usize]) -> Result<&Tensor> {
        Weights::get_shaped(self, key, shape)
    }
    fn opt(&self, key: &str) -> Option<&Tensor> {
        Weights::opt(self, key)
    }
    fn name(&self) -> &str {
        Weights::name(self)
    }
}

impl crate::weights::WeightSource<crate::backend::CpuBackend> for Executor {
    type Group<'a> = Weights<'a>;

    fn group<'a>(&'a self, component: &str, prefix: &str) -> Result<Weights<'a>> {
        Executor::group(self, component, prefix)
    }
}

/// Smallest disk-tier staging chunk chosen for a host budget.
const MIN_STAGING_CHUNK: u64 = 16 << 10;

/// The disk tier's staging for a host budget of `host_budget` bytes shared by `files` weight
/// files (one tier, with its own ring, per file): 4 chunks and 2 readers per file, the chunks
/// sized so that all the tiers together take about a quarter of the budget (16 KiB to 32 MiB
/// per chunk, a multiple of 4 KiB; requests at most 4 MiB).
pub fn disk_staging(host_budget: u64, files: usize) -> DiskConfig {
    let d = DiskConfig::default();
    // Per file: chunks x chunk + readers x (request + alignment) ~ 6 chunks.
    let per_chunk = host_budget / (4 * 6 * files.max(1) as u64);
    let chunk = (per_chunk / 4096 * 4096).clamp(MIN_STAGING_CHUNK, d.chunk_bytes);
    DiskConfig {
        chunk_bytes: chunk,
        request_bytes: chunk.min(d.request_bytes),
        ..d
    }
}

/// The host-budget placement of an [`Executor`] built with [`Executor::with_host_budget`].
pub(crate) struct TierState {
    /// Where each group lives, and the predicted pass.
    plan: TierPlan,
    /// One disk tier per weights file that has groups left on disk.
    disks: Vec<(PathBuf, Arc<DiskTier>)>,
}

/// What a disk tier has read, for `--stats`.
#[derive(Clone, Debug)]
pub struct DiskFileReport {
    /// The weights file.
    pub path: PathBuf,
    /// `O_DIRECT` or buffered.
    pub mode: ferry_pager::disk::ReadMode,
    /// Why `O_DIRECT` was refused, when it was.
    pub fallback_reason: Option<String>,
    /// Reads so far.
    pub stats: ferry_pager::disk::DiskStats,
}

/// A tensor of a deferred component and where its bytes are in its file (`None`: it needs a
/// copy, e.g. a transpose, and must be pinned).
struct Placed {
    tensor: HostTensor,
    file: Option<(PathBuf, u64)>,
}

impl Executor {
    /// Like [`Executor::with_pass`], within a host-memory budget of `host_budget` bytes: the
    /// weights of `deferred` (components not yet registered, with their name prefixes, e.g.
    /// `"unet."`) are placed by [`ferry_sched::plan_tiers`] — pinned in `store` (whose budget is
    /// set so that pinned weights plus the disk staging never exceed `host_budget`) or left in
    /// their safetensors files and streamed through one disk tier per file. Tensors whose
    /// diffusers layout is a transpose of the stored one cannot be read from the file as they are
    /// and are always pinned. An error, before anything is pinned, if the budget cannot hold the
    /// disk staging plus what must be pinned.
    pub fn with_host_budget(
        dev: Arc<SimDevice>,
        store: &HostStore,
        deferred: &[(crate::loader::Component, String)],
        components: &[ComponentGroups],
        pass: &[&str],
        cfg: ExecConfig,
        host_budget: u64,
    ) -> Result<Executor> {
        let mut placed: Vec<Placed> = Vec::new();
        for (c, prefix) in deferred {
            for t in &c.tensors {
                let (len, file) = match t.layout {
                    crate::loader::Layout::Range { start, len } => (
                        len as u64,
                        Some((
                            t.file.path().to_path_buf(),
                            t.file.data_start() + t.stored.offset as u64 + start as u64,
                        )),
                    ),
                    crate::loader::Layout::Transpose { .. } => {
                        ((t.num_elements() * t.dtype.size()) as u64, None)
                    }
                };
                placed.push(Placed {
                    tensor: HostTensor {
                        name: format!("{prefix}{}", t.name),
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        len,
                        host: HostPtr(0),
                        offset: 0,
                    },
                    file,
                });
            }
        }
        let mut files: Vec<PathBuf> = Vec::new();
        for p in &placed {
            if let Some((f, _)) = &p.file {
                if !files.contains(f) {
                    files.push(f.clone());
                }
            }
        }
        let staging = disk_staging(host_budget, files.len());
        // Planned as one tier with every file's chunks and readers: the same host bytes.
        let n = files.len().max(1);
        let planning = DiskConfig {
            chunks: staging.chunks * n,
            readers: staging.readers * n,
            ..staging.clone()
        };
        let cost = DiskCost::of_sim(SimDiskConfig::default(), planning);

        // The placement problem: the scheduler's own (same groups, order, budget and costs).
        let mut all: Vec<HostTensor> = Vec::with_capacity(store.len() + placed.len());
        for i in 0..store.len() {
            all.push(store.tensor(TensorId(i as u32))?);
        }
        let already = all.len();
        all.extend(placed.iter().map(|p| p.tensor.clone()));
        let (ginfo, descs, _) = build_groups_from(all, components, cfg.compute_ns_per_byte)?;
        let order: Vec<GroupId> = (0..ginfo.len())
            .filter(|&g| pass.contains(&ginfo[g].component.as_str()))
            .map(GroupId)
            .collect();
        let total: u64 = descs.iter().map(|d| d.device_bytes()).sum();
        let budget = cfg
            .budget
            .unwrap_or(ferry_sched::plan::align(cfg.reserve) + total);
        let problem = Problem {
            groups: descs,
            order,
            reserve: cfg.reserve,
            cost: CostModel::of_sim(dev.config()),
            run_ahead: 64,
        };
        let (layout, _) = ferry_sched::plan::plan(&problem, cfg.mode, budget)?;
        let by_name: HashMap<&str, usize> = placed
            .iter()
            .enumerate()
            .map(|(i, p)| (p.tensor.name.as_str(), i))
            .collect();
        let must_pin: Vec<bool> = ginfo
            .iter()
            .map(|g| {
                g.tensors.iter().any(|(_, t)| {
                    by_name
                        .get(t.name.as_str())
                        .is_some_and(|&i| placed[i].file.is_none())
                })
            })
            .collect();
        let bytes: Vec<u64> = problem.groups.iter().map(|g| g.device_bytes()).collect();
        let must_pin_bytes: u64 = (0..ginfo.len())
            .filter(|&g| must_pin[g])
            .map(|g| bytes[g])
            .sum();
        let staging_total = cost.staging.host_bytes();
        if total > host_budget && must_pin_bytes + staging_total > host_budget {
            return Err(Error::InvalidArgument(format!(
                "host budget too small: expected at least {} bytes (disk staging {staging_total} \
                 + weights that must be pinned {must_pin_bytes}), found {host_budget}",
                staging_total + must_pin_bytes
            )));
        }
        let mut tp = plan_tiers(&problem, &layout, host_budget, &cost).map_err(|e| {
            Error::InvalidArgument(format!("host budget too small: {e}").replace('\n', " "))
        })?;
        if tp.staging_bytes > 0
            && (0..ginfo.len()).any(|g| must_pin[g] && tp.tiers[g] != Tier::Pinned)
        {
            for g in 0..ginfo.len() {
                if must_pin[g] && tp.tiers[g] != Tier::Pinned {
                    tp.tiers[g] = Tier::Pinned;
                    tp.pinned_bytes += bytes[g];
                }
            }
            // Make room: leave the least used pinned groups on disk instead.
            let mut victims: Vec<usize> = (0..ginfo.len())
                .filter(|&g| tp.tiers[g] == Tier::Pinned && !must_pin[g])
                .collect();
            victims.sort_by(|&a, &b| tp.uses[a].cmp(&tp.uses[b]).then(bytes[b].cmp(&bytes[a])));
            let mut victims = victims.into_iter();
            while tp.pinned_bytes + tp.staging_bytes > host_budget {
                let Some(g) = victims.next() else {
                    return Err(Error::InvalidArgument(format!(
                        "host budget too small: expected at least {} bytes, found {host_budget}",
                        staging_total + must_pin_bytes
                    )));
                };
                tp.tiers[g] = Tier::Disk;
                tp.pinned_bytes -= bytes[g];
            }
            let (pred, db) = ferry_sched::tiers::predict_tiers(&problem, &layout, &tp.tiers, &cost);
            tp.predicted_pass = Duration::from_nanos(pred.pass_ns.max(0.0) as u64);
            tp.predicted_stall = Duration::from_nanos(pred.stall_ns.max(0.0) as u64);
            tp.disk_bytes_per_pass = db;
        }

        // Pin what the plan pins (everything when no disk tier is needed).
        let pinned_weights = host_budget.saturating_sub(tp.staging_bytes);
        store.set_host_budget(Some(pinned_weights));
        let mut pinned_names: std::collections::HashSet<&str> = std::collections::HashSet::new();
        for (g, info) in ginfo.iter().enumerate() {
            if tp.staging_bytes == 0 || tp.tiers[g] == Tier::Pinned {
                pinned_names.extend(info.tensors.iter().map(|(_, t)| t.name.as_str()));
            }
        }
        for (c, prefix) in deferred {
            let sub = crate::loader::Component {
                tensors: c
                    .tensors
                    .iter()
                    .filter(|t| pinned_names.contains(format!("{prefix}{}", t.name).as_str()))
                    .cloned()
                    .collect(),
                ..c.clone()
            };
            if !sub.tensors.is_empty() {
                sub.register_into(store, prefix, None)
                    .map_err(|e| Error::in_component(&c.name, e))?;
            }
        }
        // The rest stays in the files.
        let mut disks: Vec<(PathBuf, Arc<DiskTier>)> = Vec::new();
        let mut tensors: Vec<HostTensor> = Vec::with_capacity(placed.len() + already);
        for i in 0..store.len() {
            tensors.push(store.tensor(TensorId(i as u32))?);
        }
        for p in &placed {
            if pinned_names.contains(p.tensor.name.as_str()) {
                continue;
            }
            let Some((path, off)) = &p.file else {
                return Err(Error::InvalidArgument(format!(
                    "weight '{}' must be pinned but was left on disk",
                    p.tensor.name
                )));
            };
            let tier = match disks.iter().find(|(f, _)| f == path) {
                Some((_, t)) => t.clone(),
                None => {
                    let t = Arc::new(DiskTier::open_sim(
                        dev.clone(),
                        path,
                        staging.clone(),
                        SimDiskConfig::default(),
                    )?);
                    disks.push((path.clone(), t.clone()));
                    t
                }
            };
            tensors.push(HostTensor {
                host: tier.host_handle(),
                offset: *off,
                ..p.tensor.clone()
            });
        }
        if tp.staging_bytes > 0 {
            let modes: Vec<String> = disks
                .iter()
                .map(|(_, t)| t.file().mode().to_string())
                .collect();
            tp.read_mode = format!("simulated disk timing; files read {}", modes.join(", "));
        }
        let tiers = disks.iter().map(|(_, t)| t.clone()).collect();
        Self::build(
            dev,
            tensors,
            components,
            pass,
            cfg,
            tiers,
            Some(TierState { plan: tp, disks }),
        )
    }

    /// The host-budget placement (with a host budget only).
    pub fn tier_plan(&self) -> Option<&TierPlan> {
        self.tiers.as_ref().map(|t| &t.plan)
    }

    /// The disk tiers' files, read modes and reads so far (empty without groups on disk).
    pub fn disk_files(&self) -> Vec<DiskFileReport> {
        self.tiers
            .iter()
            .flat_map(|t| &t.disks)
            .map(|(path, tier)| DiskFileReport {
                path: path.clone(),
                mode: tier.file().mode(),
                fallback_reason: tier.file().fallback_reason().map(str::to_string),
                stats: tier.stats(),
            })
            .collect()
    }

    /// The `--stats` lines of the host-budget placement: the plan (groups and bytes per tier,
    /// disk bytes per step), each file's read mode with the reason `O_DIRECT` was refused, and
    /// the bytes read so far. `None` without a host budget.
    pub fn tier_report(&self) -> Option<String> {
        let t = self.tiers.as_ref()?;
        let mut s = t.plan.to_string();
        let sum = |tier: Tier| -> u64 {
            t.plan
                .tiers
                .iter()
                .zip(&t.plan.bytes)
                .filter(|(&x, _)| x == tier)
                .map(|(_, &b)| b)
                .sum()
        };
        s.push_str(&format!(
            "\nplacement: vram {} groups {} bytes, ram {} groups {} bytes, disk {} groups {} bytes; disk bytes per step {}",
            t.plan.count(Tier::Vram),
            sum(Tier::Vram),
            t.plan.count(Tier::Pinned),
            sum(Tier::Pinned),
            t.plan.count(Tier::Disk),
            sum(Tier::Disk),
            t.plan.disk_bytes_per_pass
        ));
        for f in self.disk_files() {
            let mode = match &f.fallback_reason {
                None => f.mode.to_string(),
                Some(why) => format!("{} (O_DIRECT refused: {why})", f.mode),
            };
            s.push_str(&format!(
                "\ndisk file {}: {mode}; read {} bytes in {} loads",
                f.path.display(),
                f.stats.read_bytes,
                f.stats.loads
            ));
        }
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_pager::device::sim::SimConfig;

    #[test]
    fn reused_weight_buffers_give_the_same_weights() {
        let dev = SimDevice::new(SimConfig::default());
        let store = HostStore::new(dev.clone() as Arc<dyn Device>);
        // Two groups of the same shape (the second reuses the first's buffer), f16 and bf16.
        let n = 300 * 300;
        let mut want = Vec::new();
        for (g, dt) in [("a", DType::F16), ("b", DType::BF16), ("c", DType::F16)] {
            let vals: Vec<f32> = (0..n)
                .map(|i| ((i * 37 + g.len()) % 1001) as f32 - 500.0)
                .collect();
            let bytes: Vec<u8> = match dt {
                DType::F16 => vals
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                _ => vals
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
            store
                .register_bytes(&format!("m.{g}.w"), dt, &[300, 300], &bytes)
                .unwrap();
            let exact: Vec<f32> = match dt {
                DType::F16 => vals
                    .iter()
                    .map(|v| half::f16::from_f32(*v).to_f32())
                    .collect(),
                _ => vals
                    .iter()
                    .map(|v| half::bf16::from_f32(*v).to_f32())
                    .collect(),
            };
            want.push(exact);
        }
        let groups = [ComponentGroups {
            component: "m".into(),
            groups: vec!["a".into(), "b".into(), "c".into()],
        }];
        let exec = Executor::new(dev, &store, &groups, ExecConfig::default()).unwrap();
        assert_eq!(exec.pool.cap, n * 4);
        for round in 0..2 {
            for (g, vals) in ["a", "b", "c"].iter().zip(&want) {
                let w = exec.group("m", g).unwrap();
                // After the first release the pool holds one buffer; each later group takes it.
                assert_eq!(exec.pool.bufs.lock().unwrap().len(), 0, "{g} {round}");
                assert_eq!(
                    w.get("w").unwrap().data(),
                    &vals[..],
                    "group {g}, round {round}"
                );
                drop(w);
                // The released buffer is pooled for the next group.
                assert_eq!(exec.pool.bufs.lock().unwrap().len(), 1);
            }
        }
    }
}
