//! The executor: model layers ask it for their weight group just before they run and give it back
//! right after. Weights are paged through Ferry's scheduler onto the (simulated) device; on the
//! CPU path the ops read the group's bytes back out of the simulated device's memory, so the real
//! models exercise the real paging code, and any paging bug shows up as a wrong output.

use crate::error::{Error, Result};
use crate::tensor::{DType as TensorDType, Tensor};
use ferry_pager::device::sim::{KernelSpec, SimDevice};
use ferry_pager::host::{HostStore, HostTensor, TensorId};
use ferry_pager::weights::DType;
use ferry_pager::Device;
use ferry_sched::{
    CostModel, GroupDesc, GroupId, Mode, PlanSummary, RunMetrics, Scheduler, SchedulerConfig,
    TensorSource,
};
use std::collections::HashMap;
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
    for i in 0..store.len() {
        let t = store.tensor(TensorId(i as u32))?;
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
        let (groups, descs, by_name) = build_groups(store, components, cfg.compute_ns_per_byte)?;
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
        let sched = Scheduler::new(
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
        )?;
        Ok(Executor {
            dev,
            sched,
            groups,
            by_name,
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
        let view = self.sched.acquire(gid)?;
        let read = self.read_group(gid, &view.tensors);
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
        let out: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let rs = ranges.to_vec();
        let stream = self.sched.compute_stream();
        self.dev.launch(stream, spec, move |mem| {
            let mut bytes = Vec::with_capacity(rs.len());
            for r in rs {
                bytes.push(mem.read(r)?);
            }
            if let Ok(mut s) = sink.lock() {
                *s = bytes;
            }
            Ok(())
        })?;
        self.dev.sync_stream(stream)?;
        let bytes = std::mem::take(
            &mut *out
                .lock()
                .map_err(|_| Error::InvalidArgument("weight reader poisoned".into()))?,
        );
        if bytes.len() != info.tensors.len() {
            return Err(Error::InvalidArgument(format!(
                "group '{}': read {} tensors, expected {}",
                info.name,
                bytes.len(),
                info.tensors.len()
            )));
        }
        let mut map = HashMap::with_capacity(bytes.len());
        for ((key, t), b) in info.tensors.iter().zip(bytes) {
            let dt = tensor_dtype(t.dtype, &t.name)?;
            map.insert(key.clone(), Tensor::from_bytes(&b, dt, t.shape.clone())?);
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
