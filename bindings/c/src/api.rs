//! The `ferry_` entry points.

use crate::error::{
    check_out, guard, invalid, last_error_ptr, opt_str_arg, slice_arg, str_arg, write_out,
    write_text, FerryStatus, FfiError, FfiResult,
};
use crate::handles::{self, Kind};
use ferry_pager::device::cuda::{CudaDevice, HostRegistration};
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::{DType, Device, DeviceKind, DevicePtr, EventId, HostMemKind, HostStore};
use ferry_pager::{LoadOptions, TensorId};
use ferry_sched::{CostModel, GroupDesc, GroupId, Mode, Scheduler, SchedulerConfig, TensorSource};
use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Flag for `ferry_model_add_file` / `ferry_model_add_buffer`: use the bytes in place
/// (page-locked where they are) instead of copying them into Ferry's pinned host tier. Files:
/// where the device can register them (the simulated device; GPUs with read-only host
/// registration), the file must not change while the model's schedulers live. Buffers: CUDA
/// only; the bytes must stay alive and unchanged until every scheduler of the model is freed.
pub const FERRY_IN_PLACE: u32 = 1;

/// A device: a CUDA GPU or the simulated device. Opaque.
pub struct FerryDevice {
    _private: [u8; 0],
}

/// Weights (registered tensors), groups and their order. Opaque.
pub struct FerryModel {
    _private: [u8; 0],
}

/// A scheduler running one plan on one device. Opaque.
pub struct FerryScheduler {
    _private: [u8; 0],
}

/// How weights are paged (passed as `uint32_t`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FerryMode {
    /// Everything resident.
    None = 0,
    /// Whole components swapped in and out on demand.
    Model = 1,
    /// Every group copied on demand, the host waiting for each (the slow baseline).
    Sequential = 2,
    /// Every group streamed with a fixed prefetch depth.
    Group = 3,
    /// Resident set chosen from the cost model, the rest streamed with deep prefetch.
    Auto = 4,
}

/// Element type of a tensor given as a host buffer (passed as `uint32_t`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FerryDtype {
    /// 32-bit float.
    F32 = 0,
    /// 16-bit float.
    F16 = 1,
    /// bfloat16.
    Bf16 = 2,
    /// 32-bit signed integer.
    I32 = 3,
    /// 64-bit signed integer.
    I64 = 4,
}

/// How to build a scheduler; start from `ferry_scheduler_config_default`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FerrySchedulerConfig {
    /// Paging mode: a `FerryMode` value (others are refused).
    pub mode: u32,
    /// Hard device memory budget in bytes (weights + reserve).
    pub budget: u64,
    /// Bytes of the budget kept for the engine's activations (see `ferry_scheduler_workspace`).
    pub reserve: u64,
    /// Prefetch depth of `FERRY_MODE_GROUP` (0: the default, 2).
    pub group_depth: u32,
    /// How many group uses the host may run ahead of the device (0: the default, 64).
    pub run_ahead: u32,
    /// Record per-use events for metrics and traces.
    pub metrics: bool,
}

/// A device range of one tensor of an acquired group.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FerryTensor {
    /// Device address (a `CUdeviceptr` on CUDA, a virtual address on the simulated device).
    pub ptr: u64,
    /// Length in bytes.
    pub bytes: u64,
}

/// The plan as numbers (`ferry_scheduler_plan` gives it as text).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FerryPlanSummary {
    /// Budget in bytes.
    pub budget: u64,
    /// Engine reserve in bytes.
    pub reserve: u64,
    /// Weight bytes kept resident.
    pub resident_bytes: u64,
    /// Groups kept resident.
    pub resident_groups: u64,
    /// Staging ring bytes.
    pub staging_bytes: u64,
    /// Bytes copied per steady-state pass.
    pub streamed_bytes_per_pass: u64,
    /// Smallest budget this mode works with.
    pub minimum_budget: u64,
    /// Predicted steady-state pass time, ns.
    pub predicted_pass_ns: u64,
    /// Predicted compute-stream stall per pass, ns.
    pub predicted_stall_ns: u64,
    /// Pass time if everything were resident, ns.
    pub compute_per_pass_ns: u64,
}

struct DeviceObj {
    dev: Arc<dyn Device>,
    sim: Option<Arc<SimDevice>>,
    cuda: Option<Arc<CudaDevice>>,
    cost: OnceLock<CostModel>,
}

impl DeviceObj {
    fn cost(&self) -> FfiResult<CostModel> {
        if let Some(c) = self.cost.get() {
            return Ok(*c);
        }
        let c = match &self.sim {
            Some(sim) => CostModel::of_sim(sim.config()),
            None => CostModel::measure(self.dev.as_ref(), Duration::from_micros(5))?,
        };
        Ok(*self.cost.get_or_init(|| c))
    }
}

struct ModelState {
    store: Arc<HostStore>,
    in_place: Vec<Arc<HostRegistration>>,
    tensors: HashMap<String, TensorSource>,
    groups: Vec<GroupDesc>,
    group_index: HashMap<String, usize>,
    order: Vec<GroupId>,
}

struct ModelObj {
    dev: Arc<DeviceObj>,
    state: Mutex<ModelState>,
}

impl ModelObj {
    fn lock(&self) -> MutexGuard<'_, ModelState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The caller's compute stream, and the two events that tie it to Ferry's.
#[derive(Default)]
struct Bridge {
    stream: Option<usize>,
    /// Recorded on Ferry's compute stream after an acquire, waited on by the caller's stream.
    ready: Option<EventId>,
    /// Recorded on the caller's stream before a release, waited on by Ferry's compute stream.
    done: Option<EventId>,
}

struct SchedObj {
    // Dropped first: waits for the device, then frees the arena, streams and events.
    sched: Scheduler,
    dev: Arc<DeviceObj>,
    groups: Vec<(String, usize)>,
    bridge: Mutex<Bridge>,
    _store: Arc<HostStore>,
    _in_place: Vec<Arc<HostRegistration>>,
}

impl SchedObj {
    fn bridge(&self) -> MutexGuard<'_, Bridge> {
        self.bridge.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn group(&self, g: u32) -> FfiResult<usize> {
        let i = g as usize;
        if i < self.groups.len() {
            Ok(i)
        } else {
            Err(invalid(format!(
                "group {g} does not exist (the model has {} groups)",
                self.groups.len()
            )))
        }
    }

    /// Makes Ferry's compute stream wait for the work issued so far on the caller's stream.
    fn wait_for_caller(&self, b: &mut Bridge) -> FfiResult<()> {
        let (Some(stream), Some(cuda)) = (b.stream, &self.dev.cuda) else {
            return Ok(());
        };
        let done = match b.done {
            Some(e) => e,
            None => *b.done.insert(self.dev.dev.create_event()?),
        };
        // SAFETY: `stream` was given by the caller of `ferry_scheduler_set_stream` as a live
        // stream of this device's primary context, which it keeps alive while attached.
        unsafe { cuda.record_event_on_raw(done, stream as *mut c_void) }?;
        self.dev.dev.wait_event(self.sched.compute_stream(), done)?;
        Ok(())
    }

    /// Makes the caller's stream wait for the work issued so far on Ferry's compute stream.
    fn caller_waits(&self, b: &mut Bridge) -> FfiResult<()> {
        let (Some(stream), Some(cuda)) = (b.stream, &self.dev.cuda) else {
            return Ok(());
        };
        let ready = match b.ready {
            Some(e) => e,
            None => *b.ready.insert(self.dev.dev.create_event()?),
        };
        self.dev
            .dev
            .record_event(ready, self.sched.compute_stream())?;
        // SAFETY: as in `wait_for_caller`.
        unsafe { cuda.wait_event_on_raw(stream as *mut c_void, ready) }?;
        Ok(())
    }
}

impl Drop for SchedObj {
    fn drop(&mut self) {
        let b = self.bridge.get_mut().unwrap_or_else(|e| e.into_inner());
        for e in [b.ready.take(), b.done.take()].into_iter().flatten() {
            let _ = self.dev.dev.destroy_event(e);
        }
    }
}

fn token<T>(p: *const T) -> u64 {
    p as usize as u64
}

fn handle<T>(t: u64) -> *mut T {
    t as usize as *mut T
}

fn device(p: *const FerryDevice) -> FfiResult<Arc<DeviceObj>> {
    handles::get(Kind::Device, token(p))
}

fn model_obj(p: *const FerryModel) -> FfiResult<Arc<ModelObj>> {
    handles::get(Kind::Model, token(p))
}

fn scheduler(p: *const FerryScheduler) -> FfiResult<Arc<SchedObj>> {
    handles::get(Kind::Scheduler, token(p))
}

fn to_dtype(d: u32) -> FfiResult<DType> {
    Ok(match d {
        d if d == FerryDtype::F32 as u32 => DType::F32,
        d if d == FerryDtype::F16 as u32 => DType::F16,
        d if d == FerryDtype::Bf16 as u32 => DType::BF16,
        d if d == FerryDtype::I32 as u32 => DType::I32,
        d if d == FerryDtype::I64 as u32 => DType::I64,
        d => return Err(invalid(format!("dtype {d} is not a FerryDtype (0 to 4)"))),
    })
}

/// The message of the last failed call on this thread ("" if none). Valid until the next
/// failing call on this thread.
#[no_mangle]
pub extern "C" fn ferry_last_error() -> *const c_char {
    last_error_ptr()
}

/// A static name for a status code, e.g. "FERRY_STATUS_INVALID_HANDLE" ("unknown status" for a
/// value that is not a `FerryStatus`).
#[no_mangle]
pub extern "C" fn ferry_status_name(status: i32) -> *const c_char {
    const ALL: [FerryStatus; 13] = [
        FerryStatus::Ok,
        FerryStatus::NullPointer,
        FerryStatus::InvalidUtf8,
        FerryStatus::InvalidHandle,
        FerryStatus::InvalidArgument,
        FerryStatus::BufferTooSmall,
        FerryStatus::NoDevice,
        FerryStatus::BudgetTooSmall,
        FerryStatus::OutOfMemory,
        FerryStatus::Device,
        FerryStatus::Io,
        FerryStatus::Unsupported,
        FerryStatus::Panic,
    ];
    let Some(&status) = ALL.iter().find(|&&s| s as i32 == status) else {
        return c"unknown status".as_ptr();
    };
    let s: &'static std::ffi::CStr = match status {
        FerryStatus::Ok => c"FERRY_STATUS_OK",
        FerryStatus::NullPointer => c"FERRY_STATUS_NULL_POINTER",
        FerryStatus::InvalidUtf8 => c"FERRY_STATUS_INVALID_UTF8",
        FerryStatus::InvalidHandle => c"FERRY_STATUS_INVALID_HANDLE",
        FerryStatus::InvalidArgument => c"FERRY_STATUS_INVALID_ARGUMENT",
        FerryStatus::BufferTooSmall => c"FERRY_STATUS_BUFFER_TOO_SMALL",
        FerryStatus::NoDevice => c"FERRY_STATUS_NO_DEVICE",
        FerryStatus::BudgetTooSmall => c"FERRY_STATUS_BUDGET_TOO_SMALL",
        FerryStatus::OutOfMemory => c"FERRY_STATUS_OUT_OF_MEMORY",
        FerryStatus::Device => c"FERRY_STATUS_DEVICE",
        FerryStatus::Io => c"FERRY_STATUS_IO",
        FerryStatus::Unsupported => c"FERRY_STATUS_UNSUPPORTED",
        FerryStatus::Panic => c"FERRY_STATUS_PANIC",
    };
    s.as_ptr()
}

/// Opens the simulated device with `capacity` bytes of device memory (0: 8 GiB). Its device
/// memory is host memory; `ferry_scheduler_read` reads it back.
#[no_mangle]
pub unsafe extern "C" fn ferry_device_open_sim(
    capacity: u64,
    out: *mut *mut FerryDevice,
) -> FerryStatus {
    guard(|| {
        check_out(out, "out")?;
        let mut cfg = SimConfig::default();
        if capacity > 0 {
            cfg.capacity = capacity;
        }
        let sim = SimDevice::new(cfg);
        let obj = Arc::new(DeviceObj {
            dev: sim.clone(),
            sim: Some(sim),
            cuda: None,
            cost: OnceLock::new(),
        });
        let t = handles::insert(Kind::Device, obj);
        // SAFETY: `out` is non-null and writable by the caller's contract.
        unsafe { write_out(out, handle(t), "out") }
    })
}

/// Opens CUDA GPU `ordinal`. Without a CUDA driver or GPU: `FERRY_STATUS_NO_DEVICE`.
#[no_mangle]
pub unsafe extern "C" fn ferry_device_open_cuda(
    ordinal: u32,
    out: *mut *mut FerryDevice,
) -> FerryStatus {
    guard(|| {
        check_out(out, "out")?;
        let cuda = CudaDevice::new(ordinal as usize)?;
        let obj = Arc::new(DeviceObj {
            dev: cuda.clone(),
            sim: None,
            cuda: Some(cuda),
            cost: OnceLock::new(),
        });
        let t = handles::insert(Kind::Device, obj);
        // SAFETY: as in `ferry_device_open_sim`.
        unsafe { write_out(out, handle(t), "out") }
    })
}

/// Frees a device handle. Models and schedulers using it keep the device open until freed.
#[no_mangle]
pub extern "C" fn ferry_device_free(dev: *mut FerryDevice) -> FerryStatus {
    guard(|| handles::remove(Kind::Device, token(dev)).map(drop))
}

/// Whether `dev` is the simulated device.
#[no_mangle]
pub unsafe extern "C" fn ferry_device_is_simulated(
    dev: *const FerryDevice,
    out: *mut bool,
) -> FerryStatus {
    guard(|| {
        let d = device(dev)?;
        // SAFETY: `out` is null (refused) or writable by the caller's contract.
        unsafe { write_out(out, d.dev.kind() == DeviceKind::Sim, "out") }
    })
}

/// The device's name, copied into `buf` (see the text output rule).
#[no_mangle]
pub unsafe extern "C" fn ferry_device_name(
    dev: *const FerryDevice,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> FerryStatus {
    guard(|| {
        let d = device(dev)?;
        // SAFETY: `buf`/`len` valid for `cap` / one write by the caller's contract.
        unsafe { write_text(&d.dev.name(), buf, cap, len) }
    })
}

/// Creates an empty model (no tensors, no groups) on `dev`.
#[no_mangle]
pub unsafe extern "C" fn ferry_model_new(
    dev: *const FerryDevice,
    out: *mut *mut FerryModel,
) -> FerryStatus {
    guard(|| {
        check_out(out, "out")?;
        let d = device(dev)?;
        let store = Arc::new(HostStore::new(d.dev.clone()));
        let obj = Arc::new(ModelObj {
            dev: d,
            state: Mutex::new(ModelState {
                store,
                in_place: Vec::new(),
                tensors: HashMap::new(),
                groups: Vec::new(),
                group_index: HashMap::new(),
                order: Vec::new(),
            }),
        });
        let t = handles::insert(Kind::Model, obj);
        // SAFETY: `out` is non-null and writable by the caller's contract.
        unsafe { write_out(out, handle(t), "out") }
    })
}

/// Frees a model handle. Schedulers built from it keep its host memory until freed.
#[no_mangle]
pub extern "C" fn ferry_model_free(model: *mut FerryModel) -> FerryStatus {
    guard(|| handles::remove(Kind::Model, token(model)).map(drop))
}

fn add_store_tensors(st: &mut ModelState, ids: &[TensorId]) -> FfiResult<()> {
    for &id in ids {
        let t = st.store.tensor(id)?;
        st.tensors.insert(
            t.name.clone(),
            TensorSource {
                name: t.name,
                host: t.host,
                offset: t.offset,
                bytes: t.len,
            },
        );
    }
    Ok(())
}

/// Registers every tensor of a safetensors file, named `prefix` + its key (`prefix` may be
/// NULL). Copied once into pinned host memory, or with `FERRY_IN_PLACE` page-locked in place.
/// Writes the number of tensors to `count` unless it is NULL.
#[no_mangle]
pub unsafe extern "C" fn ferry_model_add_file(
    model: *const FerryModel,
    path: *const c_char,
    prefix: *const c_char,
    flags: u32,
    count: *mut usize,
) -> FerryStatus {
    guard(|| {
        let m = model_obj(model)?;
        // SAFETY: NUL-terminated strings by the caller's contract.
        let path = unsafe { str_arg(path, "path") }?;
        // SAFETY: as above.
        let prefix = unsafe { opt_str_arg(prefix, "prefix") }?.unwrap_or("");
        if flags & !FERRY_IN_PLACE != 0 {
            return Err(invalid(format!("unknown flags {flags:#x}")));
        }
        let opts = LoadOptions {
            prefix: prefix.to_string(),
            ..LoadOptions::default()
        };
        let mut st = m.lock();
        let ids = if flags & FERRY_IN_PLACE != 0 {
            st.store.load_file_in_place(path, &opts)?
        } else {
            st.store.load_file(path, &opts)?
        };
        add_store_tensors(&mut st, &ids)?;
        if !count.is_null() {
            // SAFETY: non-null and writable by the caller's contract.
            unsafe { write_out(count, ids.len(), "count") }?;
        }
        Ok(())
    })
}

/// Registers one tensor from a caller-owned host buffer (`len` bytes of `dtype` elements of
/// shape `shape[0..ndim]`). By default the bytes are copied into pinned host memory and the
/// buffer may be reused at once; with `FERRY_IN_PLACE` (CUDA only) the buffer is page-locked and
/// used where it is.
#[no_mangle]
pub unsafe extern "C" fn ferry_model_add_buffer(
    model: *const FerryModel,
    name: *const c_char,
    dtype: u32,
    shape: *const u64,
    ndim: usize,
    data: *const c_void,
    len: usize,
    flags: u32,
) -> FerryStatus {
    guard(|| {
        let m = model_obj(model)?;
        // SAFETY: NUL-terminated string by the caller's contract.
        let name = unsafe { str_arg(name, "name") }?;
        // SAFETY: `shape` valid for `ndim` reads by the caller's contract.
        let shape = unsafe { slice_arg(shape, ndim, "shape") }?;
        let shape: Vec<usize> = shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| invalid(format!("dimension {d} too large"))))
            .collect::<FfiResult<_>>()?;
        if data.is_null() {
            return Err(FfiError::new(
                FerryStatus::NullPointer,
                "data is a null pointer",
            ));
        }
        if flags & !FERRY_IN_PLACE != 0 {
            return Err(invalid(format!("unknown flags {flags:#x}")));
        }
        let dt = to_dtype(dtype)?;
        let expected = ferry_pager::weights::byte_len(dt, &shape);
        if expected != Some(len) {
            return Err(invalid(format!(
                "tensor '{name}': {len} bytes given, shape {shape:?} of {} needs {}",
                dt.name(),
                expected.map_or("more than usize".into(), |e| e.to_string())
            )));
        }
        let mut st = m.lock();
        if st.tensors.contains_key(name) {
            return Err(invalid(format!("tensor '{name}' is already registered")));
        }
        if flags & FERRY_IN_PLACE != 0 {
            let cuda = m.dev.cuda.as_ref().ok_or_else(|| {
                FfiError::new(
                    FerryStatus::Unsupported,
                    "FERRY_IN_PLACE buffers need a CUDA device; the simulated device copies (pass flags 0)",
                )
            })?;
            let read_only = cuda.supports_read_only_register();
            // SAFETY: `data` is valid for `len` reads and stays alive and unchanged while any
            // scheduler of this model lives, by the caller's contract for FERRY_IN_PLACE.
            let reg = unsafe { cuda.register_host(data.cast::<u8>(), len, read_only) }?;
            st.tensors.insert(
                name.to_string(),
                TensorSource {
                    name: name.to_string(),
                    host: reg.host_ptr(),
                    offset: 0,
                    bytes: len as u64,
                },
            );
            st.in_place.push(Arc::new(reg));
        } else {
            // SAFETY: non-null and valid for `len` reads by the caller's contract.
            let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
            let id = st.store.register_bytes(name, dt, &shape, bytes)?;
            add_store_tensors(&mut st, &[id])?;
        }
        Ok(())
    })
}

/// Declares a group: the named tensors (registered before) paged as one unit, in the given
/// order. `component` (NULL: "model") is the unit of `FERRY_MODE_MODEL`; `compute_ns` is the
/// expected compute time per use, for planning. Writes the group's index to `index` unless NULL.
#[no_mangle]
pub unsafe extern "C" fn ferry_model_add_group(
    model: *const FerryModel,
    name: *const c_char,
    component: *const c_char,
    tensors: *const *const c_char,
    n_tensors: usize,
    compute_ns: u64,
    index: *mut u32,
) -> FerryStatus {
    guard(|| {
        let m = model_obj(model)?;
        // SAFETY: NUL-terminated strings by the caller's contract.
        let name = unsafe { str_arg(name, "name") }?;
        // SAFETY: as above.
        let component = unsafe { opt_str_arg(component, "component") }?.unwrap_or("model");
        // SAFETY: `tensors` valid for `n_tensors` reads by the caller's contract.
        let names = unsafe { slice_arg(tensors, n_tensors, "tensors") }?;
        if names.is_empty() {
            return Err(invalid(format!("group '{name}' has no tensors")));
        }
        let mut st = m.lock();
        if st.group_index.contains_key(name) {
            return Err(invalid(format!("group '{name}' is already declared")));
        }
        let mut sources = Vec::with_capacity(names.len());
        for (i, &p) in names.iter().enumerate() {
            // SAFETY: each entry is a NUL-terminated string by the caller's contract.
            let t = unsafe { str_arg(p, &format!("tensors[{i}]")) }?;
            let src = st.tensors.get(t).ok_or_else(|| {
                invalid(format!(
                    "group '{name}': tensor '{t}' is not registered ({} tensors are)",
                    st.tensors.len()
                ))
            })?;
            sources.push(src.clone());
        }
        let i = st.groups.len();
        let i32_ = u32::try_from(i).map_err(|_| invalid("too many groups"))?;
        st.groups.push(GroupDesc {
            name: name.to_string(),
            component: component.to_string(),
            tensors: sources,
            compute: Duration::from_nanos(compute_ns),
        });
        st.group_index.insert(name.to_string(), i);
        if !index.is_null() {
            // SAFETY: non-null and writable by the caller's contract.
            unsafe { write_out(index, i32_, "index") }?;
        }
        Ok(())
    })
}

/// Sets the order of group uses in one pass (a group may appear several times). An empty
/// order (`n == 0`) means: record it on the first pass, then plan.
#[no_mangle]
pub unsafe extern "C" fn ferry_model_set_order(
    model: *const FerryModel,
    order: *const u32,
    n: usize,
) -> FerryStatus {
    guard(|| {
        let m = model_obj(model)?;
        // SAFETY: `order` valid for `n` reads by the caller's contract.
        let order = unsafe { slice_arg(order, n, "order") }?;
        let mut st = m.lock();
        let groups = st.groups.len();
        if let Some(bad) = order.iter().find(|&&g| g as usize >= groups) {
            return Err(invalid(format!(
                "order names group {bad}; the model has {groups} groups"
            )));
        }
        st.order = order.iter().map(|&g| GroupId(g as usize)).collect();
        Ok(())
    })
}

/// A configuration with the defaults: metrics on, no reserve, default depth and run-ahead.
#[no_mangle]
pub extern "C" fn ferry_scheduler_config_default(mode: u32, budget: u64) -> FerrySchedulerConfig {
    FerrySchedulerConfig {
        mode,
        budget,
        reserve: 0,
        group_depth: 0,
        run_ahead: 0,
        metrics: true,
    }
}

/// Plans the model's groups under `config` and builds a scheduler: allocates the budget on the
/// device once and starts copying the resident set. The model may change afterwards without
/// affecting the scheduler.
#[no_mangle]
pub unsafe extern "C" fn ferry_scheduler_new(
    model: *const FerryModel,
    config: *const FerrySchedulerConfig,
    out: *mut *mut FerryScheduler,
) -> FerryStatus {
    guard(|| {
        check_out(out, "out")?;
        let m = model_obj(model)?;
        if config.is_null() {
            return Err(FfiError::new(
                FerryStatus::NullPointer,
                "config is a null pointer",
            ));
        }
        // SAFETY: non-null and readable by the caller's contract; plain data.
        let c = unsafe { config.read() };
        let mode = match c.mode {
            m if m == FerryMode::None as u32 => Mode::None,
            m if m == FerryMode::Model as u32 => Mode::Model,
            m if m == FerryMode::Sequential as u32 => Mode::Sequential,
            m if m == FerryMode::Group as u32 => Mode::Group {
                depth: if c.group_depth == 0 {
                    2
                } else {
                    c.group_depth as usize
                },
            },
            m if m == FerryMode::Auto as u32 => Mode::Auto,
            m => return Err(invalid(format!("mode {m} is not a FerryMode (0 to 4)"))),
        };
        let (groups, order, store, in_place) = {
            let st = m.lock();
            (
                st.groups.clone(),
                st.order.clone(),
                st.store.clone(),
                st.in_place.clone(),
            )
        };
        if groups.is_empty() {
            return Err(invalid("the model declares no groups"));
        }
        let cfg = SchedulerConfig {
            mode,
            budget: c.budget,
            reserve: c.reserve,
            run_ahead: if c.run_ahead == 0 {
                64
            } else {
                c.run_ahead as usize
            },
            metrics: c.metrics,
            cost: m.dev.cost()?,
        };
        let names = groups
            .iter()
            .map(|g| (g.name.clone(), g.tensors.len()))
            .collect();
        let sched = Scheduler::new(m.dev.dev.clone(), groups, order, cfg)?;
        let obj = Arc::new(SchedObj {
            sched,
            dev: m.dev.clone(),
            groups: names,
            bridge: Mutex::new(Bridge::default()),
            _store: store,
            _in_place: in_place,
        });
        let t = handles::insert(Kind::Scheduler, obj);
        // SAFETY: `out` is non-null and writable by the caller's contract.
        unsafe { write_out(out, handle(t), "out") }
    })
}

/// Frees a scheduler: waits for its device work, then gives back its device memory.
#[no_mangle]
pub extern "C" fn ferry_scheduler_free(sched: *mut FerryScheduler) -> FerryStatus {
    guard(|| handles::remove(Kind::Scheduler, token(sched)).map(drop))
}

/// The plan as text (resident and streamed bytes, predicted pass time and stall).
#[no_mangle]
pub unsafe extern "C" fn ferry_scheduler_plan(
    sched: *const FerryScheduler,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        let text = s.sched.plan().to_string();
        // SAFETY: `buf`/`len` valid for `cap` / one write by the caller's contract.
        unsafe { write_text(&text, buf, cap, len) }
    })
}

/// The plan as numbers.
#[no_mangle]
pub unsafe extern "C" fn ferry_scheduler_plan_summary(
    sched: *const FerryScheduler,
    out: *mut FerryPlanSummary,
) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        let p = s.sched.plan();
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let v = FerryPlanSummary {
            budget: p.budget,
            reserve: p.reserve,
            resident_bytes: p.resident_bytes,
            resident_groups: p.resident_groups as u64,
            staging_bytes: p.staging_bytes,
            streamed_bytes_per_pass: p.streamed_bytes_per_pass,
            minimum_budget: p.minimum_budget,
            predicted_pass_ns: ns(p.predicted_pass),
            predicted_stall_ns: ns(p.predicted_stall),
            compute_per_pass_ns: ns(p.compute_per_pass),
        };
        // SAFETY: `out` is null (refused) or writable by the caller's contract.
        unsafe { write_out(out, v, "out") }
    })
}

/// The index of the group called `name`.
#[no_mangle]
pub unsafe extern "C" fn ferry_scheduler_group(
    sched: *const FerryScheduler,
    name: *const c_char,
    index: *mut u32,
) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        // SAFETY: NUL-terminated string by the caller's contract.
        let name = unsafe { str_arg(name, "name") }?;
        let i = s
            .groups
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| invalid(format!("no group is called '{name}'")))?;
        // SAFETY: `index` is null (refused) or writable by the caller's contract.
        unsafe { write_out(index, i as u32, "index") }
    })
}

/// The number of tensors of group `group` (the size `ferry_acquire` needs).
#[no_mangle]
pub unsafe extern "C" fn ferry_scheduler_group_tensors(
    sched: *const FerryScheduler,
    group: u32,
    count: *mut usize,
) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        let g = s.group(group)?;
        // SAFETY: `count` is null (refused) or writable by the caller's contract.
        unsafe { write_out(count, s.groups[g].1, "count") }
    })
}

/// Attaches the caller's compute stream (a `CUstream`, NULL for the legacy default stream;
/// CUDA only): after each `ferry_acquire` that stream waits for the group's copy, and each
/// `ferry_release` ends the use after the work queued on it so far. The host does not wait.
/// The stream must outlive the scheduler or be detached with `ferry_scheduler_detach_stream`.
#[no_mangle]
pub unsafe extern "C" fn ferry_scheduler_set_stream(
    sched: *const FerryScheduler,
    cu_stream: *mut c_void,
) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        if s.dev.cuda.is_none() {
            return Err(FfiError::new(
                FerryStatus::Unsupported,
                "the simulated device has no CUDA streams: issue work on the scheduler's own compute stream (ferry_scheduler_busy, ferry_scheduler_read)",
            ));
        }
        let mut b = s.bridge();
        // Work already queued on the previous caller stream stays ordered before later copies.
        s.wait_for_caller(&mut b)?;
        b.stream = Some(cu_stream as usize);
        Ok(())
    })
}

/// Detaches the caller's stream (Ferry's compute stream first waits for its queued work).
#[no_mangle]
pub extern "C" fn ferry_scheduler_detach_stream(sched: *const FerryScheduler) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        let mut b = s.bridge();
        s.wait_for_caller(&mut b)?;
        b.stream = None;
        Ok(())
    })
}

/// Marks the start of a pass.
#[no_mangle]
pub extern "C" fn ferry_begin_pass(sched: *const FerryScheduler) -> FerryStatus {
    guard(|| Ok(scheduler(sched)?.sched.begin_pass()?))
}

/// Marks the end of a pass. After a first pass without a declared order, plans from the order
/// recorded.
#[no_mangle]
pub extern "C" fn ferry_end_pass(sched: *const FerryScheduler) -> FerryStatus {
    guard(|| Ok(scheduler(sched)?.sched.end_pass()?))
}

/// Makes group `group` available to work issued next on the compute stream (the caller's, if
/// attached) and writes its tensors' device ranges to `out[0..count]`, in the group's tensor
/// order. `capacity` is the size of `out`; if it is too small nothing is acquired,
/// `FERRY_STATUS_BUFFER_TOO_SMALL` is returned and `count` says how many are needed.
#[no_mangle]
pub unsafe extern "C" fn ferry_acquire(
    sched: *const FerryScheduler,
    group: u32,
    out: *mut FerryTensor,
    capacity: usize,
    count: *mut usize,
) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        let g = s.group(group)?;
        let n = s.groups[g].1;
        // SAFETY: `count` is null (refused) or writable by the caller's contract.
        unsafe { write_out(count, n, "count") }?;
        if capacity < n {
            return Err(FfiError::new(
                FerryStatus::BufferTooSmall,
                format!("group {group} has {n} tensors; out holds {capacity}"),
            ));
        }
        check_out(out, "out")?;
        let mut b = s.bridge();
        let view = s.sched.acquire(GroupId(g))?;
        if let Err(e) = s.caller_waits(&mut b) {
            s.sched.release(GroupId(g)).ok();
            return Err(e);
        }
        for (i, r) in view.tensors.iter().enumerate() {
            let t = FerryTensor {
                ptr: r.ptr.0,
                bytes: r.len,
            };
            // SAFETY: `out` is valid for `capacity >= n` writes by the caller's contract.
            unsafe { out.add(i).write(t) };
        }
        Ok(())
    })
}

/// Ends the use of group `group` by the work issued so far on the compute stream (the caller's,
/// if attached); its memory is reused only after that work. The use ends even when an error is
/// returned.
#[no_mangle]
pub extern "C" fn ferry_release(sched: *const FerryScheduler, group: u32) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        let g = s.group(group)?;
        let mut b = s.bridge();
        let bridged = s.wait_for_caller(&mut b);
        s.sched.release(GroupId(g))?;
        bridged
    })
}

/// Copies `len` bytes of device memory at `device_ptr` into `dst`, after all work issued so far
/// on the compute stream (the caller's, if attached). Blocks the host until done. This is how an
/// engine computing on the host reads acquired weights from the simulated device.
#[no_mangle]
pub unsafe extern "C" fn ferry_scheduler_read(
    sched: *const FerryScheduler,
    device_ptr: u64,
    dst: *mut c_void,
    len: usize,
) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        if len == 0 {
            return Ok(());
        }
        if dst.is_null() {
            return Err(FfiError::new(
                FerryStatus::NullPointer,
                "dst is a null pointer",
            ));
        }
        let dev = &s.dev.dev;
        let compute = s.sched.compute_stream();
        {
            let mut b = s.bridge();
            s.wait_for_caller(&mut b)?;
        }
        let host = dev.alloc_host(len as u64, HostMemKind::Readable)?;
        let r = (|| -> FfiResult<()> {
            dev.copy_d2h(compute, host, 0, DevicePtr(device_ptr), len as u64)?;
            dev.sync_stream(compute)?;
            // SAFETY: `dst` is non-null and valid for `len` writes by the caller's contract.
            let out = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), len) };
            dev.host_read(host, 0, out)?;
            Ok(())
        })();
        let freed = dev.free_host(host);
        r?;
        Ok(freed?)
    })
}

/// Occupies the scheduler's compute stream for `nanos` (a spin kernel on CUDA, virtual time on
/// the simulated device): the stand-in for compute in examples and benchmarks.
#[no_mangle]
pub extern "C" fn ferry_scheduler_busy(sched: *const FerryScheduler, nanos: u64) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        Ok(s.dev
            .dev
            .busy(s.sched.compute_stream(), Duration::from_nanos(nanos))?)
    })
}

/// Waits for all work issued so far by the scheduler.
#[no_mangle]
pub extern "C" fn ferry_scheduler_synchronize(sched: *const FerryScheduler) -> FerryStatus {
    guard(|| Ok(scheduler(sched)?.sched.synchronize()?))
}

/// Whether the scheduler is still recording the order (first pass without a declared order).
#[no_mangle]
pub unsafe extern "C" fn ferry_scheduler_tracing(
    sched: *const FerryScheduler,
    out: *mut bool,
) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        // SAFETY: `out` is null (refused) or writable by the caller's contract.
        unsafe { write_out(out, s.sched.tracing(), "out") }
    })
}

/// Total bytes copied host to device so far.
#[no_mangle]
pub unsafe extern "C" fn ferry_scheduler_bytes_copied(
    sched: *const FerryScheduler,
    out: *mut u64,
) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        // SAFETY: `out` is null (refused) or writable by the caller's contract.
        unsafe { write_out(out, s.sched.bytes_copied(), "out") }
    })
}

/// The engine's workspace (the reserve, at the start of the device arena): address and bytes.
#[no_mangle]
pub unsafe extern "C" fn ferry_scheduler_workspace(
    sched: *const FerryScheduler,
    out: *mut FerryTensor,
) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        let w = s.sched.workspace();
        let t = FerryTensor {
            ptr: w.ptr.0,
            bytes: w.len,
        };
        // SAFETY: `out` is null (refused) or writable by the caller's contract.
        unsafe { write_out(out, t, "out") }
    })
}

fn metrics_text(s: &SchedObj, trace: bool) -> FfiResult<String> {
    let m = s.sched.metrics()?;
    Ok(if trace { m.chrome_trace() } else { m.table() })
}

/// The metrics table (per pass: time, bytes, GB/s, stall, overlap). Waits for the device.
#[no_mangle]
pub unsafe extern "C" fn ferry_scheduler_metrics(
    sched: *const FerryScheduler,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        let text = metrics_text(&s, false)?;
        // SAFETY: `buf`/`len` valid for `cap` / one write by the caller's contract.
        unsafe { write_text(&text, buf, cap, len) }
    })
}

/// The Chrome / Perfetto trace (JSON). Waits for the device.
#[no_mangle]
pub unsafe extern "C" fn ferry_scheduler_trace(
    sched: *const FerryScheduler,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        let text = metrics_text(&s, true)?;
        // SAFETY: `buf`/`len` valid for `cap` / one write by the caller's contract.
        unsafe { write_text(&text, buf, cap, len) }
    })
}

fn write_file(path: &str, text: &str) -> FfiResult<()> {
    std::fs::write(path, text)
        .map_err(|e| FfiError::new(FerryStatus::Io, format!("cannot write {path}: {e}")))
}

/// Writes the metrics table to the file `path`. Waits for the device.
#[no_mangle]
pub unsafe extern "C" fn ferry_scheduler_write_metrics(
    sched: *const FerryScheduler,
    path: *const c_char,
) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        // SAFETY: NUL-terminated string by the caller's contract.
        let path = unsafe { str_arg(path, "path") }?;
        write_file(path, &metrics_text(&s, false)?)
    })
}

/// Writes the Chrome / Perfetto trace (JSON) to the file `path`. Waits for the device.
#[no_mangle]
pub unsafe extern "C" fn ferry_scheduler_write_trace(
    sched: *const FerryScheduler,
    path: *const c_char,
) -> FerryStatus {
    guard(|| {
        let s = scheduler(sched)?;
        // SAFETY: NUL-terminated string by the caller's contract.
        let path = unsafe { str_arg(path, "path") }?;
        write_file(path, &metrics_text(&s, true)?)
    })
}
