//! `ferry._ferry`: the Rust half of Ferry's Python package, a thin layer over `ferry-pager` and
//! `ferry-sched`. The pure-Python package `ferry` (in `python/ferry`) builds on it; users call
//! `ferry.torch.offload`, not this module.
//!
//! One [`Engine`] holds one device, one pinned host store (the single host copy of the weights),
//! the declared groups, and at most one scheduler. No panic crosses into Python: every error is a
//! `ferry.FerryError` subclass (PyO3 turns a panic into `PanicException`, which the Python layer
//! never expects; nothing here unwraps).

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

use ferry_pager::device::sim::{KernelSpec, SimConfig, SimDevice};
use ferry_pager::{DType, Device, DeviceRange, EventId, HostStore, RawTensor, TensorId};
use ferry_sched::plan::plan as plan_layout;
use ferry_sched::{
    CostModel, GroupDesc, GroupId, Mode, PlanSummary, Problem, Replan, Scheduler, SchedulerConfig,
    TensorSource,
};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

create_exception!(
    _ferry,
    FerryError,
    PyException,
    "Base class of every error Ferry raises."
);
create_exception!(
    _ferry,
    BudgetTooSmallError,
    FerryError,
    "The budget cannot hold what the mode needs (e.g. below the largest group)."
);
create_exception!(
    _ferry,
    DeviceError,
    FerryError,
    "The device (simulated or CUDA) failed or ran out of memory."
);
create_exception!(
    _ferry,
    UnsupportedDtypeError,
    FerryError,
    "A tensor's dtype is not one Ferry pages (float32, float16, bfloat16, int32, int64)."
);
create_exception!(
    _ferry,
    UseAfterRemoveError,
    FerryError,
    "A call on offload state that was removed (ferry.torch.remove) or closed."
);
create_exception!(
    _ferry,
    InvalidArgumentError,
    FerryError,
    "An argument that does not fit Ferry's state or inputs."
);

fn sched_err(e: ferry_sched::Error) -> PyErr {
    match e {
        ferry_sched::Error::BudgetTooSmall { .. } => BudgetTooSmallError::new_err(e.to_string()),
        ferry_sched::Error::Device(d) => pager_err(d),
        ferry_sched::Error::InvalidArgument(_) => InvalidArgumentError::new_err(e.to_string()),
    }
}

fn pager_err(e: ferry_pager::Error) -> PyErr {
    match e {
        ferry_pager::Error::InvalidArgument(_) => InvalidArgumentError::new_err(e.to_string()),
        _ => DeviceError::new_err(e.to_string()),
    }
}

fn invalid(msg: impl Into<String>) -> PyErr {
    InvalidArgumentError::new_err(msg.into())
}

fn dtype(name: &str) -> PyResult<DType> {
    match name {
        "float32" => Ok(DType::F32),
        "float16" => Ok(DType::F16),
        "bfloat16" => Ok(DType::BF16),
        "int32" => Ok(DType::I32),
        "int64" => Ok(DType::I64),
        other => Err(UnsupportedDtypeError::new_err(format!(
            "dtype {other} is not supported: expected one of float32, float16, bfloat16, int32, int64"
        ))),
    }
}

fn parse_mode(mode: &str, depth: usize) -> PyResult<Mode> {
    Ok(match mode {
        "none" => Mode::None,
        "model" => Mode::Model,
        "sequential" => Mode::Sequential,
        "group" => Mode::Group {
            depth: if depth == 0 { 2 } else { depth },
        },
        "auto" => Mode::Auto,
        other => {
            return Err(invalid(format!(
                "mode '{other}' is not one of 'auto', 'group', 'sequential', 'model', 'none'"
            )))
        }
    })
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn summary_dict<'py>(py: Python<'py>, p: &PlanSummary) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("mode", p.mode.to_string())?;
    d.set_item("budget", p.budget)?;
    d.set_item("reserve", p.reserve)?;
    d.set_item("resident_bytes", p.resident_bytes)?;
    d.set_item("resident_groups", p.resident_groups)?;
    d.set_item("staging_bytes", p.staging_bytes)?;
    d.set_item("streamed_bytes_per_pass", p.streamed_bytes_per_pass)?;
    d.set_item("minimum_budget", p.minimum_budget)?;
    d.set_item("predicted_pass_ns", nanos(p.predicted_pass))?;
    d.set_item("predicted_first_pass_ns", nanos(p.predicted_first_pass))?;
    d.set_item("predicted_stall_ns", nanos(p.predicted_stall))?;
    d.set_item("compute_per_pass_ns", nanos(p.compute_per_pass))?;
    d.set_item("text", p.to_string())?;
    Ok(d)
}

/// Indices of the groups a layout keeps resident.
fn resident(layout: &ferry_sched::Layout) -> Vec<usize> {
    (0..layout.resident.len())
        .filter(|&g| layout.resident[g])
        .collect()
}

/// A running scheduler and the objects its device memory depends on. Shared with [`Arena`], so
/// the device memory outlives every Python view of it.
struct Running {
    // Dropped first: waits for the device, then frees the arena, streams and events.
    sched: Scheduler,
    sim: Arc<SimDevice>,
    /// Recorded on the compute stream after each acquire; the host waits on it before Python
    /// reads the group (the simulated device applies copies lazily).
    ready: EventId,
    groups: Vec<GroupDesc>,
    /// Per group: the device ranges of its current use (between acquire and release).
    held: Mutex<Vec<Option<Vec<DeviceRange>>>>,
    _store: Arc<HostStore>,
}

impl Running {
    fn held(&self) -> MutexGuard<'_, Vec<Option<Vec<DeviceRange>>>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.sched.synchronize();
        let _ = self.sim.destroy_event(self.ready);
    }
}

/// The device arena of a scheduler (exactly the budget), kept alive while this object lives.
#[pyclass(module = "ferry._ferry", frozen)]
struct Arena {
    _running: Arc<Running>,
    address: usize,
    nbytes: usize,
}

#[pymethods]
impl Arena {
    /// Host address of the arena's first byte (simulated device: its memory is host memory).
    #[getter]
    fn address(&self) -> usize {
        self.address
    }

    /// Bytes in the arena.
    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }
}

struct State {
    store: Option<Arc<HostStore>>,
    tensors: Vec<(TensorId, TensorSource)>,
    groups: Vec<GroupDesc>,
    running: Option<Arc<Running>>,
    /// Some tensors were declared by size only ([`Engine::declare`]): plan, never build.
    declared_only: bool,
}

/// A device, the pinned host copy of the weights, the groups, and at most one scheduler.
#[pyclass(module = "ferry._ferry", frozen)]
struct Engine {
    sim: Arc<SimDevice>,
    state: Mutex<State>,
}

impl Engine {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn store(st: &State) -> PyResult<Arc<HostStore>> {
        st.store.clone().ok_or_else(|| {
            UseAfterRemoveError::new_err(
                "this Ferry engine was closed (ferry.torch.remove): expected live offload state, found a closed engine",
            )
        })
    }

    fn running(st: &State) -> PyResult<Arc<Running>> {
        Self::store(st)?;
        st.running.clone().ok_or_else(|| {
            invalid("no scheduler: expected Engine.build to have been called, found none")
        })
    }

    fn cost(&self) -> CostModel {
        CostModel::of_sim(self.sim.config())
    }

    fn group(run: &Running, g: usize) -> PyResult<GroupId> {
        if g < run.groups.len() {
            Ok(GroupId(g))
        } else {
            Err(invalid(format!(
                "group {g} does not exist: expected an index below {}",
                run.groups.len()
            )))
        }
    }

    fn order(st: &State, order: Vec<usize>) -> PyResult<Vec<GroupId>> {
        let n = st.groups.len();
        if let Some(bad) = order.iter().find(|&&g| g >= n) {
            return Err(invalid(format!(
                "order names group {bad}: expected indices below {n}"
            )));
        }
        Ok(order.into_iter().map(GroupId).collect())
    }
}

#[pymethods]
impl Engine {
    /// Opens the simulated device (`capacity` bytes of device memory, 0: 64 GiB) with the
    /// default PCIe-4-like cost model. Its device memory is host memory.
    #[staticmethod]
    #[pyo3(signature = (capacity = 0))]
    fn sim(capacity: u64) -> Engine {
        let mut cfg = SimConfig::default();
        cfg.capacity = if capacity == 0 { 64 << 30 } else { capacity };
        cfg.host_capacity = cfg.host_capacity.max(256 << 30);
        let sim = SimDevice::new(cfg);
        let store = Arc::new(HostStore::new(sim.clone()));
        Engine {
            sim,
            state: Mutex::new(State {
                store: Some(store),
                tensors: Vec::new(),
                groups: Vec::new(),
                running: None,
                declared_only: false,
            }),
        }
    }

    /// The device's name.
    fn device_name(&self) -> String {
        self.sim.name()
    }

    /// Copies tensors into the pinned host store (packed together) and returns their indices.
    /// Each item is `(name, dtype, shape, address, nbytes)`: `address` is the host address of
    /// `nbytes` contiguous bytes, which must stay alive and unchanged during the call.
    fn register(
        &self,
        py: Python<'_>,
        items: Vec<(String, String, Vec<usize>, usize, usize)>,
    ) -> PyResult<Vec<usize>> {
        let mut parsed = Vec::with_capacity(items.len());
        for (name, dt, shape, addr, nbytes) in &items {
            let dt = dtype(dt).map_err(|e| {
                UnsupportedDtypeError::new_err(format!("tensor '{name}': {}", e.value(py)))
            })?;
            let expected = ferry_pager::weights::byte_len(dt, shape);
            if expected != Some(*nbytes) {
                return Err(invalid(format!(
                    "tensor '{name}': expected {expected:?} bytes for shape {shape:?} of {}, found {nbytes}",
                    dt.name()
                )));
            }
            if *addr == 0 && *nbytes > 0 {
                return Err(invalid(format!(
                    "tensor '{name}': expected a host address, found null"
                )));
            }
            parsed.push(dt);
        }
        let raws: Vec<RawTensor<'_>> = items
            .iter()
            .zip(&parsed)
            .map(|((name, _, shape, addr, nbytes), &dt)| {
                let data: &[u8] = if *nbytes == 0 {
                    &[]
                } else {
                    // SAFETY: the caller (ferry.torch) passes the data pointer of a live,
                    // contiguous CPU tensor of exactly `nbytes` bytes and keeps it alive and
                    // unmodified for the duration of this call.
                    unsafe { std::slice::from_raw_parts(*addr as *const u8, *nbytes) }
                };
                RawTensor {
                    name,
                    dtype: dt,
                    shape,
                    data,
                }
            })
            .collect();
        let mut st = self.lock();
        let store = Self::store(&st)?;
        let ids = store.register_batch(&raws).map_err(pager_err)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let t = store.tensor(id).map_err(pager_err)?;
            out.push(st.tensors.len());
            st.tensors.push((
                id,
                TensorSource {
                    name: t.name,
                    host: t.host,
                    offset: t.offset,
                    bytes: t.len,
                },
            ));
        }
        Ok(out)
    }

    /// Declares a tensor by its size only, without its bytes, and returns its index: an engine
    /// with declared tensors can plan (`Engine.plan`) but not build a scheduler.
    fn declare(&self, name: String, nbytes: u64) -> PyResult<usize> {
        let mut st = self.lock();
        Self::store(&st)?;
        st.declared_only = true;
        st.tensors.push((
            TensorId(u32::MAX),
            TensorSource {
                name,
                host: ferry_pager::HostPtr(0),
                offset: 0,
                bytes: nbytes,
            },
        ));
        Ok(st.tensors.len() - 1)
    }

    /// Copies registered tensor `index` back into `nbytes` bytes at host address `address`
    /// (used by `ferry.torch.remove` to give the module its own copy again).
    fn read_into(&self, index: usize, address: usize, nbytes: usize) -> PyResult<()> {
        let st = self.lock();
        let store = Self::store(&st)?;
        let (id, src) = st.tensors.get(index).ok_or_else(|| {
            invalid(format!(
                "tensor {index} does not exist: expected an index below {}",
                st.tensors.len()
            ))
        })?;
        if src.bytes != nbytes as u64 {
            return Err(invalid(format!(
                "tensor '{}': expected a destination of {} bytes, found {nbytes}",
                src.name, src.bytes
            )));
        }
        if nbytes == 0 {
            return Ok(());
        }
        if address == 0 {
            return Err(invalid("expected a destination address, found null"));
        }
        let t = store.tensor(*id).map_err(pager_err)?;
        // SAFETY: the caller passes the data pointer of a live, contiguous, writable CPU tensor
        // of exactly `nbytes` bytes that nothing else uses during the call.
        let dst = unsafe { std::slice::from_raw_parts_mut(address as *mut u8, nbytes) };
        self.sim.host_read(t.host, t.offset, dst).map_err(pager_err)
    }

    /// Declares a group (tensors by index, paged as one unit) and returns its index.
    /// `component` is the unit of mode "model"; `compute_ns` the expected compute per use.
    fn add_group(
        &self,
        name: String,
        component: String,
        tensors: Vec<usize>,
        compute_ns: u64,
    ) -> PyResult<usize> {
        let mut st = self.lock();
        Self::store(&st)?;
        if tensors.is_empty() {
            return Err(invalid(format!(
                "group '{name}': expected at least one tensor, found none"
            )));
        }
        let mut sources = Vec::with_capacity(tensors.len());
        for &t in &tensors {
            let (_, src) = st.tensors.get(t).ok_or_else(|| {
                invalid(format!(
                    "group '{name}': tensor {t} does not exist (expected an index below {})",
                    st.tensors.len()
                ))
            })?;
            sources.push(src.clone());
        }
        st.groups.push(GroupDesc {
            name,
            component,
            tensors: sources,
            compute: Duration::from_nanos(compute_ns.max(1)),
        });
        Ok(st.groups.len() - 1)
    }

    /// Device bytes of each group (each tensor aligned to 256 bytes).
    fn group_device_bytes(&self) -> Vec<u64> {
        self.lock()
            .groups
            .iter()
            .map(|g| g.device_bytes())
            .collect()
    }

    /// Plans without allocating anything: the plan for `order` under `budget` as a dict.
    #[pyo3(signature = (mode, budget, order, reserve = 0, depth = 0, run_ahead = 64))]
    #[allow(clippy::too_many_arguments)]
    fn plan<'py>(
        &self,
        py: Python<'py>,
        mode: &str,
        budget: u64,
        order: Vec<usize>,
        reserve: u64,
        depth: usize,
        run_ahead: usize,
    ) -> PyResult<Bound<'py, PyDict>> {
        let st = self.lock();
        Self::store(&st)?;
        let problem = Problem {
            groups: st.groups.clone(),
            order: Self::order(&st, order)?,
            reserve,
            cost: self.cost(),
            run_ahead: run_ahead.max(1),
        };
        let (layout, summary) =
            plan_layout(&problem, parse_mode(mode, depth)?, budget).map_err(sched_err)?;
        let d = summary_dict(py, &summary)?;
        d.set_item("resident", resident(&layout))?;
        Ok(d)
    }

    /// Builds the scheduler (replacing any previous one): allocates `budget` bytes of device
    /// memory once and starts copying the resident set. Returns the arena.
    #[pyo3(signature = (mode, budget, order, reserve = 0, depth = 0, run_ahead = 64, metrics = true))]
    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        mode: &str,
        budget: u64,
        order: Vec<usize>,
        reserve: u64,
        depth: usize,
        run_ahead: usize,
        metrics: bool,
    ) -> PyResult<Arena> {
        let mut st = self.lock();
        let store = Self::store(&st)?;
        if st.groups.is_empty() {
            return Err(invalid("expected at least one group, found none"));
        }
        if st.declared_only {
            return Err(invalid(
                "this engine holds tensors declared by size only: expected registered bytes to build a scheduler",
            ));
        }
        // The previous scheduler goes first, so that its arena does not count twice.
        st.running = None;
        let order = Self::order(&st, order)?;
        let cfg = SchedulerConfig {
            mode: parse_mode(mode, depth)?,
            budget,
            reserve,
            run_ahead: run_ahead.max(1),
            metrics,
            cost: self.cost(),
        };
        let dev: Arc<dyn Device> = self.sim.clone();
        let sched = Scheduler::new(dev, st.groups.clone(), order, cfg).map_err(sched_err)?;
        let ready = self.sim.create_sync_event().map_err(pager_err)?;
        let running = Arc::new(Running {
            sched,
            sim: self.sim.clone(),
            ready,
            groups: st.groups.clone(),
            held: Mutex::new(vec![None; st.groups.len()]),
            _store: store,
        });
        let arena = running.sched.arena();
        let address = self.sim.export_range(arena).map_err(pager_err)? as usize;
        let nbytes = usize::try_from(arena.len).map_err(|_| invalid("arena too large"))?;
        st.running = Some(running.clone());
        Ok(Arena {
            _running: running,
            address,
            nbytes,
        })
    }

    /// The running plan as a dict.
    fn running_plan<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let run = Self::running(&self.lock())?;
        let p = run.sched.plan();
        let d = summary_dict(py, &p)?;
        d.set_item("resident", resident(&run.sched.layout()))?;
        Ok(d)
    }

    /// Plans again for a new order and/or compute times (inside the same arena).
    #[pyo3(signature = (order = None, compute_ns = None))]
    fn replan<'py>(
        &self,
        py: Python<'py>,
        order: Option<Vec<usize>>,
        compute_ns: Option<Vec<u64>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let st = self.lock();
        let run = Self::running(&st)?;
        let order = order.map(|o| Self::order(&st, o)).transpose()?;
        drop(st);
        let change = Replan {
            order,
            compute: compute_ns.map(|c| {
                c.into_iter()
                    .map(|n| Duration::from_nanos(n.max(1)))
                    .collect()
            }),
            reserve: None,
        };
        let p = run.sched.replan(change).map_err(sched_err)?;
        let d = summary_dict(py, &p)?;
        d.set_item("resident", resident(&run.sched.layout()))?;
        Ok(d)
    }

    /// Acquires group `g` and returns each tensor's offset from the arena start, once its bytes
    /// are in place (the host waits for the group's copy on the simulated device).
    fn acquire(&self, py: Python<'_>, g: usize) -> PyResult<Vec<u64>> {
        let run = Self::running(&self.lock())?;
        let gid = Self::group(&run, g)?;
        py.allow_threads(|| {
            let view = run.sched.acquire(gid).map_err(sched_err)?;
            let base = run.sched.arena().ptr.0;
            let synced = run
                .sim
                .record_event(run.ready, run.sched.compute_stream())
                .and_then(|()| run.sim.sync_event(run.ready));
            if let Err(e) = synced {
                run.sched.release_deferred(gid);
                return Err(pager_err(e));
            }
            let offsets = view.tensors.iter().map(|r| r.ptr.0 - base).collect();
            let ranges = view.tensors.into_iter().filter(|r| r.len > 0).collect();
            if let Some(slot) = run.held().get_mut(g) {
                *slot = Some(ranges);
            }
            Ok(offsets)
        })
    }

    /// Releases group `g` after the host finished reading it. On the simulated device the use
    /// is recorded as a kernel reading the group's bytes for `compute_ns` of virtual time, so
    /// the race checker sees it and the metrics show compute.
    #[pyo3(signature = (g, compute_ns = 0))]
    fn release(&self, py: Python<'_>, g: usize, compute_ns: u64) -> PyResult<()> {
        let run = Self::running(&self.lock())?;
        let gid = Self::group(&run, g)?;
        py.allow_threads(|| {
            let ranges = run.held().get_mut(g).and_then(Option::take);
            let launched = match ranges {
                Some(ranges) if !ranges.is_empty() => {
                    let mut spec = KernelSpec::new(
                        format!("torch:{}", run.groups[g].name),
                        Duration::from_nanos(compute_ns.max(1)),
                    );
                    for r in ranges {
                        spec = spec.reads(r);
                    }
                    run.sim
                        .launch(run.sched.compute_stream(), spec, |_| Ok(()))
                        .map_err(pager_err)
                }
                _ => Ok(()),
            };
            // The use ends even if recording it failed.
            let released = run.sched.release(gid).map_err(sched_err);
            launched.and(released)
        })
    }

    /// Marks the start of a pass (for metrics).
    fn begin_pass(&self) -> PyResult<()> {
        Self::running(&self.lock())?
            .sched
            .begin_pass()
            .map_err(sched_err)
    }

    /// Marks the end of a pass (for metrics).
    fn end_pass(&self) -> PyResult<()> {
        Self::running(&self.lock())?
            .sched
            .end_pass()
            .map_err(sched_err)
    }

    /// Waits for all device work.
    fn synchronize(&self) -> PyResult<()> {
        Self::running(&self.lock())?
            .sched
            .synchronize()
            .map_err(sched_err)
    }

    /// The metrics table (per pass: time, bytes, GB/s, stall, overlap), in virtual time.
    fn metrics_table(&self) -> PyResult<String> {
        let run = Self::running(&self.lock())?;
        Ok(run.sched.metrics().map_err(sched_err)?.table())
    }

    /// The Chrome / Perfetto trace (JSON).
    fn trace_json(&self) -> PyResult<String> {
        let run = Self::running(&self.lock())?;
        Ok(run.sched.metrics().map_err(sched_err)?.chrome_trace())
    }

    /// Counters: bytes copied host→device, weight and pinned host bytes, device bytes, races.
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = self.lock();
        let store = Self::store(&st)?;
        let d = PyDict::new(py);
        d.set_item(
            "bytes_copied",
            st.running.as_ref().map_or(0, |r| r.sched.bytes_copied()),
        )?;
        d.set_item("weight_bytes", store.weight_bytes())?;
        d.set_item("pinned_bytes", store.pinned_bytes())?;
        d.set_item("device_bytes", self.sim.device_bytes_allocated())?;
        d.set_item("device_peak_bytes", self.sim.device_bytes_peak())?;
        d.set_item("host_bytes", self.sim.host_bytes_allocated())?;
        d.set_item("races", self.sim.races())?;
        Ok(d)
    }

    /// Live device resources (allocations, events, streams), for leak checks.
    fn resources<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.sim.resources();
        let d = PyDict::new(py);
        d.set_item("device_allocs", r.device_allocs)?;
        d.set_item("device_bytes", r.device_bytes)?;
        d.set_item("host_allocs", r.host_allocs)?;
        d.set_item("host_bytes", r.host_bytes)?;
        d.set_item("events", r.events)?;
        d.set_item("streams", r.streams)?;
        Ok(d)
    }

    /// Frees the scheduler and the host store. Device memory still viewed by a live `Arena`
    /// is freed when that goes. Later calls raise `UseAfterRemoveError`.
    fn close(&self) {
        let mut st = self.lock();
        st.running = None;
        st.store = None;
        st.groups.clear();
        st.tensors.clear();
    }

    /// Whether `close` was called.
    fn closed(&self) -> bool {
        self.lock().store.is_none()
    }
}

/// The `ferry._ferry` extension module.
#[pymodule]
fn _ferry(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Engine>()?;
    m.add_class::<Arena>()?;
    m.add("FerryError", py.get_type::<FerryError>())?;
    m.add("BudgetTooSmallError", py.get_type::<BudgetTooSmallError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    m.add(
        "UnsupportedDtypeError",
        py.get_type::<UnsupportedDtypeError>(),
    )?;
    m.add("UseAfterRemoveError", py.get_type::<UseAfterRemoveError>())?;
    m.add(
        "InvalidArgumentError",
        py.get_type::<InvalidArgumentError>(),
    )?;
    Ok(())
}
