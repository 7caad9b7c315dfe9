//! The simulated device: host memory stands in for device memory, with a hard capacity, and streams
//! run in deterministic **virtual time**.
//!
//! Every copy and kernel is given a start and end time when it is enqueued: it starts when its stream
//! is free, every event its stream waits on has completed, its engine (one H2D copy engine, one D2H
//! copy engine, one compute engine) is free, and the host has issued it. Its effects are deferred:
//! each operation reads its inputs at its start time and writes its outputs at its end time, and the
//! simulator applies them in virtual-time order when the host synchronises. Only stream order and
//! event waits order work, so a missing wait gives wrong data here exactly as on a GPU.
//!
//! The **race checker** compares every new operation with earlier-issued ones touching the same
//! device bytes: a read that starts before the last write has completed, or a write that starts
//! while an earlier read or write is still running, is recorded as a [`RaceReport`] naming both.
//!
//! Host memory: [`Device::alloc_host`] allocations are owned buffers; a file registered in place
//! ([`Device::register_host_file`]) keeps its `Arc<Mmap>` as the allocation's bytes, so copies
//! read the mapping itself and it is never written. Registration touches one byte per page, as
//! pinning faults every page in on a GPU; like `alloc_host` it costs no virtual time (host-side
//! load work is measured in real time, `benches/pager_load.rs`). Both count against
//! [`SimConfig::host_capacity`], and are reported apart ([`SimDevice::host_bytes_allocated`],
//! [`SimDevice::host_bytes_registered`]).
//!
//! **Interpreted PTX** ([`Device::launch_ptx`]): a launch is an ordinary kernel operation whose
//! body is the PTX interpreter ([`ptx`]), run at the kernel's start against memory as of then;
//! its race checks use the bytes it really touched, once it has run (see `race::PtxWatch`), and
//! its duration comes from the cost model in [`SimConfig::kernel_overhead`].
//!
//! **Fault injection** ([`faults`]): a [`FaultPlan`] set with [`SimDevice::set_fault_plan`] makes
//! the k-th allocation, copy, event call, sync or launch fail with [`Error::Injected`], and
//! [`SimDevice::resources`] reports what is live (allocations, events, streams) for leak checks.

mod export;
pub mod faults;
mod kernel;
pub mod ptx;
mod ptx_kernel;
mod race;

pub use faults::{FaultCounts, FaultOp, FaultPlan, SimResources};
use kernel::{locate, slice};
pub use kernel::{KernelSpec, SimMemory};
use race::PtxWatch;
use race::{Access, Segment};
pub use race::{AccessInfo, RaceReport};

use super::cuda::check_launch_args;
use super::{
    Device, DeviceKind, DevicePtr, DeviceRange, EventId, HostMemKind, HostPtr, KernelArg,
    LaunchDims, MemInfo, StreamId,
};
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// The simulator's cost model and limits.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Device memory capacity in bytes.
    pub capacity: u64,
    /// Pinned host→device bandwidth, bytes per second.
    pub h2d_bandwidth: f64,
    /// Pageable host→device bandwidth, bytes per second (the copy also blocks the host).
    pub pageable_bandwidth: f64,
    /// Device→host bandwidth, bytes per second.
    pub d2h_bandwidth: f64,
    /// Fixed cost added to every copy.
    pub copy_latency: Duration,
    /// Delay between the host issuing work and the device being able to start it.
    pub launch_latency: Duration,
    /// Pinned host memory limit in bytes.
    pub host_capacity: u64,
    /// Fixed cost of an interpreted kernel ([`Device::launch_ptx`]), on top of `launch_latency`.
    ///
    /// An interpreted launch lasts `kernel_overhead + max(B / device_bandwidth, T / thread_rate)`,
    /// B the bytes of its buffer arguments, T its threads (grid × block). The duration must be
    /// known when the launch is enqueued (later work and events are timed from it), before the
    /// interpreter has run, so it uses the launch's arguments, not the bytes or instructions the
    /// kernel turns out to touch: exact for a kernel that streams each buffer once, an upper
    /// bound for one that touches part of them.
    pub kernel_overhead: Duration,
    /// Device memory bandwidth for the interpreted-kernel cost model, bytes per second.
    pub device_bandwidth: f64,
    /// Threads per second an interpreted kernel runs at when not memory bound.
    pub thread_rate: f64,
    /// The interpreter's limits per launch (instruction budget, local memory per thread).
    pub ptx_limits: ptx::Limits,
}

impl Default for SimConfig {
    /// A PCIe 4.0 x16-like card with 8 GiB.
    fn default() -> Self {
        SimConfig {
            capacity: 8 << 30,
            h2d_bandwidth: 25e9,
            pageable_bandwidth: 10e9,
            d2h_bandwidth: 25e9,
            copy_latency: Duration::from_micros(5),
            launch_latency: Duration::from_micros(3),
            host_capacity: 64 << 30,
            kernel_overhead: Duration::from_micros(2),
            device_bandwidth: 450e9,
            thread_rate: 5e11,
            ptx_limits: ptx::Limits::default(),
        }
    }
}

/// One operation as it ran in virtual time (for traces and metrics).
#[derive(Clone, Debug, PartialEq)]
pub struct OpRecord {
    /// Sequence number, in the order the host issued the operations.
    pub seq: u64,
    /// The stream it ran on.
    pub stream: StreamId,
    /// Kernel name, or "h2d" / "h2d-pageable" / "d2h".
    pub name: String,
    /// What kind of operation.
    pub kind: OpKind,
    /// Start, in virtual time since the device was created.
    pub start: Duration,
    /// End, in virtual time.
    pub end: Duration,
    /// Bytes moved (copies) or 0.
    pub bytes: u64,
}

/// The kind of an [`OpRecord`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Pinned host→device copy.
    CopyH2D,
    /// Pageable host→device copy.
    CopyH2DPageable,
    /// Device→host copy.
    CopyD2H,
    /// A kernel (including [`Device::busy`]).
    Kernel,
}

/// The simulated GPU. Create with [`SimDevice::new`]; use through [`Device`] plus the inherent
/// methods for kernels, inspection and the race checker.
pub struct SimDevice {
    cfg: SimConfig,
    state: Mutex<State>,
    /// Parsed PTX modules by name, for [`Device::launch_ptx`].
    modules: Mutex<HashMap<&'static str, Arc<ptx::Module>>>,
    /// How many times a PTX module was parsed.
    parses: AtomicU64,
}

impl fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimDevice").field("cfg", &self.cfg).finish()
    }
}

type KernelFn = Box<dyn FnOnce(&mut SimMemory<'_>) -> Result<()> + Send>;

enum Work {
    /// A copy reads its source at its start: the bytes are taken then only if the host writes
    /// into the source before the copy ends (`State::snapshot_in_flight`); otherwise they are
    /// copied straight from host memory at the end (one copy instead of two).
    H2D {
        dst: DevicePtr,
        src: HostPtr,
        src_offset: u64,
        len: u64,
        started: bool,
        data: Option<Vec<u8>>,
    },
    H2DBytes {
        dst: DevicePtr,
        data: Vec<u8>,
    },
    D2H {
        dst: HostPtr,
        dst_offset: u64,
        src: DevicePtr,
        len: u64,
        data: Option<Vec<u8>>,
    },
    Kernel {
        spec: KernelSpec,
        f: Option<KernelFn>,
        out: Vec<(DeviceRange, Vec<u8>)>,
    },
    Ptx(Box<ptx_kernel::PtxLaunch>),
}

struct StreamState {
    tail: u64,
    live: bool,
}

#[derive(Clone, Copy)]
struct EventState {
    time: Option<u64>,
    live: bool,
}

/// A host allocation: owned pinned memory, or a file registered read-only in place.
enum HostAlloc {
    Pinned(Vec<u8>),
    Registered(Arc<Mmap>),
}

impl HostAlloc {
    fn bytes(&self) -> &[u8] {
        match self {
            HostAlloc::Pinned(v) => v,
            HostAlloc::Registered(m) => m,
        }
    }

    fn len(&self) -> u64 {
        self.bytes().len() as u64
    }

    /// The bytes for a host-side or device→host write; a registration is read-only.
    fn bytes_mut(&mut self, h: HostPtr) -> Result<&mut [u8]> {
        match self {
            HostAlloc::Pinned(v) => Ok(v),
            HostAlloc::Registered(_) => Err(read_only(h)),
        }
    }
}

fn read_only(h: HostPtr) -> Error {
    Error::InvalidArgument(format!(
        "host pointer {} is a file registered read-only in place; it cannot be written",
        h.0
    ))
}

/// Page size assumed when faulting a registered mapping in.
const PAGE: usize = 4096;

#[derive(Default)]
struct State {
    device: BTreeMap<u64, Vec<u8>>,
    next_device_addr: u64,
    device_allocated: u64,
    device_peak: u64,
    host: HashMap<u64, HostAlloc>,
    next_host: u64,
    host_allocated: u64,
    host_registered: u64,
    streams: Vec<StreamState>,
    events: Vec<EventState>,
    h2d_free: u64,
    d2h_free: u64,
    compute_free: u64,
    host_time: u64,
    seq: u64,
    ops: HashMap<u64, Work>,
    // (time, phase, seq): phase 0 = end (writes land), 1 = start (reads happen).
    queue: BinaryHeap<Reverse<(u64, u8, u64)>>,
    segments: BTreeMap<u64, Segment>,
    ptx_watches: BTreeMap<u64, PtxWatch>,
    races: Vec<RaceReport>,
    timeline: Vec<OpRecord>,
    error: Option<Error>,
    faults: faults::Faults,
}

const DEVICE_BASE: u64 = 0x7f00_0000_0000;
// The interpreter's module-variable, shared and local windows must not shadow device memory.
const _: () = {
    use ptx::ir::{GLOBALS_BASE, LOCAL_WINDOW, SHARED_WINDOW, WINDOW_SIZE};
    assert!(GLOBALS_BASE + WINDOW_SIZE <= DEVICE_BASE);
    assert!(SHARED_WINDOW + WINDOW_SIZE <= DEVICE_BASE);
    assert!(LOCAL_WINDOW + WINDOW_SIZE <= DEVICE_BASE);
};
const ALIGN: u64 = 256;

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

fn dur(t: u64) -> Duration {
    Duration::from_nanos(t)
}

fn bytes_time(bytes: u64, bandwidth: f64, latency: Duration) -> u64 {
    let t = ns(latency) as f64 + bytes as f64 / bandwidth * 1e9;
    (t.ceil() as u64).max(1)
}

impl SimDevice {
    /// A new simulated device with the given cost model.
    pub fn new(cfg: SimConfig) -> Arc<SimDevice> {
        Arc::new(SimDevice {
            cfg,
            state: Mutex::new(State {
                next_device_addr: DEVICE_BASE,
                next_host: 1,
                ..State::default()
            }),
            modules: Mutex::new(HashMap::new()),
            parses: AtomicU64::new(0),
        })
    }

    /// The cost model this device runs with.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic inside a kernel closure poisons the lock; the state itself stays consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enqueues a kernel on `stream`. `f` runs when the kernel starts in virtual time, reading device
    /// memory as it is then; its writes land when the kernel ends. `f` must not call back into the
    /// device. An error returned by `f` is reported by the next synchronising call.
    pub fn launch(
        &self,
        stream: StreamId,
        spec: KernelSpec,
        f: impl FnOnce(&mut SimMemory<'_>) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        self.enqueue_kernel(stream, spec, Some(Box::new(f)))
    }

    fn enqueue_kernel(
        &self,
        stream: StreamId,
        spec: KernelSpec,
        f: Option<KernelFn>,
    ) -> Result<()> {
        let mut st = self.lock();
        st.faults.check(FaultOp::Launch)?;
        for r in spec.reads.iter().chain(&spec.writes) {
            locate(&st.device, *r)?;
        }
        let d = ns(spec.duration).max(1);
        let reads = spec.reads.clone();
        let writes = spec.writes.clone();
        let name = spec.name.clone();
        st.enqueue(
            &self.cfg,
            stream,
            Engine::Compute,
            d,
            OpKind::Kernel,
            name,
            0,
            &reads,
            &writes,
            Work::Kernel {
                spec,
                f,
                out: Vec::new(),
            },
        )
        .map(|_| ())
    }

    /// The parsed module `name` (text `src`), parsed on first use and cached by name.
    fn ptx_module(&self, name: &'static str, src: &str) -> Result<Arc<ptx::Module>> {
        let mut modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = modules.get(name) {
            return Ok(m.clone());
        }
        self.parses.fetch_add(1, Ordering::Relaxed);
        let m = Arc::new(
            ptx::Module::parse(src)
                .map_err(|e| Error::InvalidArgument(format!("PTX module {name}: {e}")))?,
        );
        modules.insert(name, m.clone());
        Ok(m)
    }

    /// How many times a PTX module has been parsed for [`Device::launch_ptx`] (once per module
    /// name that parsed, plus each failed attempt).
    pub fn ptx_modules_parsed(&self) -> u64 {
        self.parses.load(Ordering::Relaxed)
    }

    /// The host's current virtual time.
    pub fn now(&self) -> Duration {
        dur(self.lock().host_time)
    }

    /// Advances the host's virtual time (models host work between API calls).
    pub fn advance_host(&self, by: Duration) {
        let mut st = self.lock();
        st.host_time += ns(by);
        let t = st.host_time;
        st.run_until(t);
    }

    /// The virtual time at which all work issued so far on `stream` completes.
    pub fn stream_tail(&self, stream: StreamId) -> Result<Duration> {
        let st = self.lock();
        st.stream(stream).map(|s| dur(s.tail))
    }

    /// Waits for all work on every stream and returns the bytes of `range` (a test helper).
    pub fn peek(&self, range: DeviceRange) -> Result<Vec<u8>> {
        let mut st = self.lock();
        st.sync_all()?;
        Ok(slice(&st.device, range)?.to_vec())
    }

    /// Race reports found so far.
    pub fn race_reports(&self) -> Vec<RaceReport> {
        self.lock().races.clone()
    }

    /// Race reports found so far, as text.
    pub fn races(&self) -> Vec<String> {
        self.lock().races.iter().map(|r| r.to_string()).collect()
    }

    /// `Err(Error::Race)` describing the first race (and how many there were), if any.
    pub fn check_races(&self) -> Result<()> {
        let st = self.lock();
        match st.races.first() {
            None => Ok(()),
            Some(r) => Err(Error::Race(format!(
                "{r} ({} race(s) in total)",
                st.races.len()
            ))),
        }
    }

    /// Bytes of device memory currently allocated.
    pub fn device_bytes_allocated(&self) -> u64 {
        self.lock().device_allocated
    }

    /// The most device memory ever allocated at once.
    pub fn device_bytes_peak(&self) -> u64 {
        self.lock().device_peak
    }

    /// Bytes of pinned host memory currently allocated (not counting registered files).
    pub fn host_bytes_allocated(&self) -> u64 {
        self.lock().host_allocated
    }

    /// Bytes of files currently registered in place ([`Device::register_host_file`]).
    pub fn host_bytes_registered(&self) -> u64 {
        self.lock().host_registered
    }

    /// Number of live in-place registrations.
    pub fn live_registrations(&self) -> usize {
        let st = self.lock();
        st.host
            .values()
            .filter(|a| matches!(a, HostAlloc::Registered(_)))
            .count()
    }

    /// Number of live device and host allocations, registrations included (for leak checks).
    pub fn live_allocations(&self) -> (usize, usize) {
        let st = self.lock();
        (st.device.len(), st.host.len())
    }

    /// Replaces the fault plan and restarts the call counters ([`SimDevice::fault_counts`]).
    pub fn set_fault_plan(&self, plan: FaultPlan) {
        self.lock().faults.set(plan);
    }

    /// Calls of each kind since the fault plan was last set, and how many were made to fail.
    pub fn fault_counts(&self) -> FaultCounts {
        self.lock().faults.counts()
    }

    /// What the device holds right now: allocations, registrations, events, streams.
    pub fn resources(&self) -> SimResources {
        let st = self.lock();
        let mut r = SimResources {
            device_allocs: st.device.len(),
            device_bytes: st.device_allocated,
            host_bytes: st.host_allocated,
            registered_bytes: st.host_registered,
            events: st.events.iter().filter(|e| e.live).count(),
            streams: st.streams.iter().filter(|s| s.live).count(),
            pending_ops: st.ops.len(),
            ..SimResources::default()
        };
        for a in st.host.values() {
            match a {
                HostAlloc::Pinned(_) => r.host_allocs += 1,
                HostAlloc::Registered(_) => r.registrations += 1,
            }
        }
        r
    }

    /// Every operation issued so far, with its virtual start and end.
    pub fn timeline(&self) -> Vec<OpRecord> {
        self.lock().timeline.clone()
    }

    /// Returns the timeline and clears it.
    pub fn take_timeline(&self) -> Vec<OpRecord> {
        std::mem::take(&mut self.lock().timeline)
    }

    /// The completion time of a recorded event.
    pub fn event_time(&self, event: EventId) -> Result<Option<Duration>> {
        let st = self.lock();
        Ok(st.event(event)?.time.map(dur))
    }
}

#[derive(Clone, Copy)]
enum Engine {
    H2D,
    D2H,
    Compute,
}

impl State {
    fn stream(&self, s: StreamId) -> Result<&StreamState> {
        self.streams
            .get(s.0 as usize)
            .filter(|st| st.live)
            .ok_or_else(|| Error::InvalidHandle(format!("stream {} does not exist", s.0)))
    }

    fn event(&self, e: EventId) -> Result<&EventState> {
        self.events
            .get(e.0 as usize)
            .filter(|ev| ev.live)
            .ok_or_else(|| Error::InvalidHandle(format!("event {} does not exist", e.0)))
    }

    fn host_alloc(&self, h: HostPtr, offset: u64, len: u64) -> Result<&HostAlloc> {
        let a = self.host.get(&h.0).ok_or_else(|| {
            Error::InvalidHandle(format!("host allocation {} does not exist", h.0))
        })?;
        if offset.checked_add(len).is_none_or(|end| end > a.len()) {
            return Err(Error::OutOfBounds(format!(
                "host range [{offset}, {offset}+{len}) runs past host allocation {} of {} bytes",
                h.0,
                a.len()
            )));
        }
        Ok(a)
    }

    /// Whether `bytes` more of pinned or registered host memory fit the simulated limit.
    fn check_host_room(&self, cfg: &SimConfig, bytes: u64, what: &str) -> Result<()> {
        let used = self.host_allocated + self.host_registered;
        if used.saturating_add(bytes) > cfg.host_capacity {
            return Err(Error::InvalidArgument(format!(
                "{what} of {bytes} bytes exceeds the simulated host limit ({used} of {} bytes in use)",
                cfg.host_capacity
            )));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &mut self,
        cfg: &SimConfig,
        stream: StreamId,
        engine: Engine,
        duration: u64,
        kind: OpKind,
        name: String,
        bytes: u64,
        reads: &[DeviceRange],
        writes: &[DeviceRange],
        work: Work,
    ) -> Result<Access> {
        let tail = self.stream(stream)?.tail;
        let engine_free = match engine {
            Engine::H2D => self.h2d_free,
            Engine::D2H => self.d2h_free,
            Engine::Compute => self.compute_free,
        };
        let start = tail
            .max(engine_free)
            .max(self.host_time + ns(cfg.launch_latency));
        let end = start + duration;
        self.streams[stream.0 as usize].tail = end;
        match engine {
            Engine::H2D => self.h2d_free = end,
            Engine::D2H => self.d2h_free = end,
            Engine::Compute => self.compute_free = end,
        }
        let seq = self.seq;
        self.seq += 1;
        let info = AccessInfo {
            seq,
            name: name.clone(),
            stream,
            start: dur(start),
            end: dur(end),
        };
        let access = Access { info, start, end };
        for r in reads {
            self.check_access(r, &access, false);
        }
        for r in writes {
            self.check_access(r, &access, true);
        }
        self.check_ptx_watches(reads, writes, &access);
        self.ops.insert(seq, work);
        self.queue.push(Reverse((start, 1, seq)));
        self.queue.push(Reverse((end, 0, seq)));
        self.timeline.push(OpRecord {
            seq,
            stream,
            name,
            kind,
            start: dur(start),
            end: dur(end),
            bytes,
        });
        Ok(access)
    }

    /// Applies, in virtual-time order, every effect scheduled at or before `t`.
    fn run_until(&mut self, t: u64) {
        while let Some(&Reverse((time, phase, seq))) = self.queue.peek() {
            if time > t {
                break;
            }
            self.queue.pop();
            if let Err(e) = self.run_phase(phase, seq) {
                if self.error.is_none() {
                    self.error = Some(e);
                }
            }
        }
        self.prune_segments();
    }

    fn run_phase(&mut self, phase: u8, seq: u64) -> Result<()> {
        let Some(mut work) = self.ops.remove(&seq) else {
            return Ok(());
        };
        match &mut work {
            Work::H2D {
                dst,
                src,
                src_offset,
                len,
                started,
                data,
            } => {
                if phase == 1 {
                    self.host_alloc(*src, *src_offset, *len)?;
                    *started = true;
                } else if let Some(d) = data.take() {
                    self.write_device(DeviceRange::new(*dst, *len), &d)?;
                } else if *started {
                    // No host write since the start: the source still holds the start's bytes.
                    let a = self.host.get(&src.0).ok_or_else(|| {
                        Error::InvalidHandle(format!("host allocation {} does not exist", src.0))
                    })?;
                    let o = *src_offset as usize;
                    let bytes = a.bytes().get(o..o + *len as usize).ok_or_else(|| {
                        Error::OutOfBounds(format!("host range of copy into {}", dst.0))
                    })?;
                    let (base, lo, hi) = locate(&self.device, DeviceRange::new(*dst, *len))?;
                    if let Some(mem) = self.device.get_mut(&base) {
                        mem[lo..hi].copy_from_slice(bytes);
                    }
                }
            }
            Work::H2DBytes { dst, data } => {
                if phase == 0 {
                    let d = std::mem::take(data);
                    self.write_device(DeviceRange::new(*dst, d.len() as u64), &d)?;
                }
            }
            Work::D2H {
                dst,
                dst_offset,
                src,
                len,
                data,
            } => {
                if phase == 1 {
                    *data = Some(slice(&self.device, DeviceRange::new(*src, *len))?.to_vec());
                } else if let Some(d) = data.take() {
                    self.host_alloc(*dst, *dst_offset, *len)?;
                    self.snapshot_in_flight(*dst, *dst_offset, *len);
                    if let Some(a) = self.host.get_mut(&dst.0) {
                        let o = *dst_offset as usize;
                        a.bytes_mut(*dst)?[o..o + d.len()].copy_from_slice(&d);
                    }
                }
            }
            Work::Kernel { spec, f, out } => {
                if phase == 1 {
                    if let Some(f) = f.take() {
                        let mut mem = SimMemory {
                            allocs: &self.device,
                            spec,
                            writes: Vec::new(),
                        };
                        let r = f(&mut mem);
                        *out = mem.writes;
                        r.map_err(|e| Error::Kernel {
                            name: spec.name.clone(),
                            source: Box::new(e),
                        })?;
                    }
                } else {
                    for (r, d) in std::mem::take(out) {
                        self.write_device(r, &d)?;
                    }
                }
            }
            Work::Ptx(l) => {
                if phase == 1 {
                    let ran = l.run(&self.device);
                    l.out = ran.writes;
                    // Races are checked from what the kernel really touched, even if it failed.
                    self.ptx_ran(seq, ran.footprint);
                    ran.result.map_err(|e| Error::Kernel {
                        name: l.func.to_string(),
                        source: Box::new(ptx_kernel::device_error(e)),
                    })?;
                } else {
                    for (r, d) in std::mem::take(&mut l.out) {
                        self.write_device(r, &d)?;
                    }
                }
            }
        }
        if phase == 1 {
            // Keep the op for its end phase.
            self.ops.insert(seq, work);
        }
        Ok(())
    }

    /// Before the host range `[offset, offset + len)` of `h` is overwritten: every started,
    /// unfinished copy reading from it takes its bytes now, as they were at its start.
    fn snapshot_in_flight(&mut self, h: HostPtr, offset: u64, len: u64) {
        let Some(a) = self.host.get(&h.0) else {
            return;
        };
        for work in self.ops.values_mut() {
            if let Work::H2D {
                src,
                src_offset,
                len: n,
                started: true,
                data: data @ None,
                ..
            } = work
            {
                let overlaps = *src_offset < offset + len && offset < *src_offset + *n;
                if src.0 == h.0 && overlaps {
                    let o = *src_offset as usize;
                    *data = a.bytes().get(o..o + *n as usize).map(<[u8]>::to_vec);
                }
            }
        }
    }

    fn write_device(&mut self, r: DeviceRange, data: &[u8]) -> Result<()> {
        let (base, a, b) = locate(&self.device, r)?;
        if let Some(mem) = self.device.get_mut(&base) {
            mem[a..b].copy_from_slice(data);
        }
        Ok(())
    }

    fn take_error(&mut self) -> Result<()> {
        match self.error.take() {
            Some(e) => Err(Error::Deferred(Box::new(e))),
            None => Ok(()),
        }
    }

    fn sync_to(&mut self, t: u64) -> Result<()> {
        self.host_time = self.host_time.max(t);
        let h = self.host_time;
        self.run_until(h);
        self.take_error()
    }

    fn sync_all(&mut self) -> Result<()> {
        self.drain();
        self.take_error()
    }

    /// Applies every pending effect (the host waits for all streams), leaving any asynchronous
    /// error for the next synchronising call to report.
    fn drain(&mut self) {
        let t = self.streams.iter().map(|s| s.tail).max().unwrap_or(0);
        self.host_time = self.host_time.max(t);
        let h = self.host_time;
        self.run_until(h);
    }
}

impl Device for SimDevice {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Sim
    }

    fn name(&self) -> String {
        format!(
            "simulated device ({} MiB, H2D {:.1} GB/s)",
            self.cfg.capacity >> 20,
            self.cfg.h2d_bandwidth / 1e9
        )
    }

    fn mem_info(&self) -> Result<MemInfo> {
        let st = self.lock();
        Ok(MemInfo {
            free: self.cfg.capacity - st.device_allocated,
            total: self.cfg.capacity,
        })
    }

    fn alloc_device(&self, bytes: u64) -> Result<DevicePtr> {
        let mut st = self.lock();
        st.faults.check(FaultOp::AllocDevice)?;
        let free = self.cfg.capacity - st.device_allocated;
        if bytes == 0 || bytes > free {
            return Err(Error::OutOfMemory {
                asked: bytes,
                free,
                largest_free: free,
            });
        }
        let ptr = st.next_device_addr;
        st.next_device_addr += bytes.div_ceil(ALIGN) * ALIGN + ALIGN;
        st.device.insert(ptr, vec![0u8; bytes as usize]);
        st.device_allocated += bytes;
        st.device_peak = st.device_peak.max(st.device_allocated);
        Ok(DevicePtr(ptr))
    }

    fn free_device(&self, ptr: DevicePtr) -> Result<()> {
        let mut st = self.lock();
        // Frees always happen; an asynchronous error stays for the next sync to report.
        st.drain();
        let mem = st.device.remove(&ptr.0).ok_or_else(|| {
            Error::InvalidHandle(format!("{ptr} is not a live device allocation"))
        })?;
        st.device_allocated -= mem.len() as u64;
        let end = ptr.0 + mem.len() as u64;
        st.segments.retain(|&k, _| k < ptr.0 || k >= end);
        Ok(())
    }

    fn alloc_host(&self, bytes: u64, _kind: HostMemKind) -> Result<HostPtr> {
        let mut st = self.lock();
        st.faults.check(FaultOp::AllocHost)?;
        st.check_host_room(&self.cfg, bytes, "pinned host allocation")?;
        let id = st.next_host;
        st.next_host += 1;
        st.host
            .insert(id, HostAlloc::Pinned(vec![0u8; bytes as usize]));
        st.host_allocated += bytes;
        Ok(HostPtr(id))
    }

    fn free_host(&self, ptr: HostPtr) -> Result<()> {
        let mut st = self.lock();
        match st.host.get(&ptr.0) {
            None => {
                return Err(Error::InvalidHandle(format!(
                    "host allocation {} does not exist",
                    ptr.0
                )))
            }
            Some(HostAlloc::Registered(_)) => {
                return Err(Error::InvalidArgument(format!(
                    "host pointer {} is a registration; unregister_host it instead",
                    ptr.0
                )))
            }
            Some(HostAlloc::Pinned(_)) => {}
        }
        st.drain();
        if let Some(a) = st.host.remove(&ptr.0) {
            st.host_allocated -= a.len();
        }
        Ok(())
    }

    fn host_write(&self, dst: HostPtr, offset: u64, src: &[u8]) -> Result<()> {
        let mut st = self.lock();
        st.host_alloc(dst, offset, src.len() as u64)?;
        st.snapshot_in_flight(dst, offset, src.len() as u64);
        if let Some(a) = st.host.get_mut(&dst.0) {
            let o = offset as usize;
            a.bytes_mut(dst)?[o..o + src.len()].copy_from_slice(src);
        }
        Ok(())
    }

    fn host_read(&self, src: HostPtr, offset: u64, dst: &mut [u8]) -> Result<()> {
        let st = self.lock();
        let a = st.host_alloc(src, offset, dst.len() as u64)?;
        let o = offset as usize;
        dst.copy_from_slice(&a.bytes()[o..o + dst.len()]);
        Ok(())
    }

    fn can_register_host_files(&self) -> bool {
        true
    }

    fn register_host_file(&self, map: Arc<Mmap>) -> Result<HostPtr> {
        let len = map.len() as u64;
        if len == 0 {
            return Err(Error::InvalidArgument(
                "cannot register an empty mapping (expected at least 1 byte)".into(),
            ));
        }
        {
            let mut st = self.lock();
            st.faults.check(FaultOp::AllocHost)?;
            st.check_host_room(&self.cfg, len, "in-place registration")?;
        }
        // Fault every page in, outside the lock, as pinning does on a GPU.
        let touched = map.iter().step_by(PAGE).fold(0u8, |a, &b| a ^ b);
        std::hint::black_box(touched);
        let mut st = self.lock();
        st.check_host_room(&self.cfg, len, "in-place registration")?;
        let id = st.next_host;
        st.next_host += 1;
        st.host.insert(id, HostAlloc::Registered(map));
        st.host_registered += len;
        Ok(HostPtr(id))
    }

    fn unregister_host(&self, ptr: HostPtr) -> Result<()> {
        let mut st = self.lock();
        match st.host.get(&ptr.0) {
            Some(HostAlloc::Registered(_)) => {}
            Some(HostAlloc::Pinned(_)) => {
                return Err(Error::InvalidArgument(format!(
                    "host pointer {} is a pinned allocation, not a registration; free_host it",
                    ptr.0
                )))
            }
            None => {
                return Err(Error::InvalidHandle(format!(
                    "host pointer {} is not a live registration",
                    ptr.0
                )))
            }
        }
        // Copies still reading the mapping finish first.
        st.drain();
        if let Some(a) = st.host.remove(&ptr.0) {
            st.host_registered -= a.len();
        }
        Ok(())
    }

    fn create_stream(&self) -> Result<StreamId> {
        let mut st = self.lock();
        st.faults.check(FaultOp::CreateStream)?;
        let id = StreamId(st.streams.len() as u32);
        let tail = st.host_time;
        st.streams.push(StreamState { tail, live: true });
        Ok(id)
    }

    fn create_event(&self) -> Result<EventId> {
        let mut st = self.lock();
        st.faults.check(FaultOp::CreateEvent)?;
        let id = EventId(st.events.len() as u32);
        st.events.push(EventState {
            time: None,
            live: true,
        });
        Ok(id)
    }

    fn destroy_stream(&self, stream: StreamId) -> Result<()> {
        let mut st = self.lock();
        st.stream(stream)?;
        // Its work stays queued and completes in virtual time; only the handle goes.
        st.streams[stream.0 as usize].live = false;
        Ok(())
    }

    fn destroy_event(&self, event: EventId) -> Result<()> {
        let mut st = self.lock();
        st.event(event)?;
        st.events[event.0 as usize].live = false;
        Ok(())
    }

    fn record_event(&self, event: EventId, stream: StreamId) -> Result<()> {
        let mut st = self.lock();
        st.faults.check(FaultOp::RecordEvent)?;
        st.event(event)?;
        let t = st.stream(stream)?.tail.max(st.host_time);
        st.events[event.0 as usize].time = Some(t);
        Ok(())
    }

    fn wait_event(&self, stream: StreamId, event: EventId) -> Result<()> {
        let mut st = self.lock();
        st.faults.check(FaultOp::WaitEvent)?;
        st.stream(stream)?;
        // Waiting on a never-recorded event is a no-op, as in CUDA.
        if let Some(t) = st.event(event)?.time {
            let s = &mut st.streams[stream.0 as usize];
            s.tail = s.tail.max(t);
        }
        Ok(())
    }

    fn event_done(&self, event: EventId) -> Result<bool> {
        let st = self.lock();
        Ok(st.event(event)?.time.is_none_or(|t| t <= st.host_time))
    }

    fn sync_event(&self, event: EventId) -> Result<()> {
        let mut st = self.lock();
        st.faults.check(FaultOp::Sync)?;
        let t = st.event(event)?.time.unwrap_or(0);
        st.sync_to(t)
    }

    fn event_elapsed(&self, start: EventId, end: EventId) -> Result<Duration> {
        let st = self.lock();
        let (a, b) = (st.event(start)?.time, st.event(end)?.time);
        match (a, b) {
            (Some(a), Some(b)) if a <= st.host_time && b <= st.host_time => {
                Ok(dur(b.saturating_sub(a)))
            }
            _ => Err(Error::InvalidArgument(format!(
                "event_elapsed({}, {}): both events must be recorded and completed",
                start.0, end.0
            ))),
        }
    }

    fn sync_stream(&self, stream: StreamId) -> Result<()> {
        let mut st = self.lock();
        st.faults.check(FaultOp::Sync)?;
        let t = st.stream(stream)?.tail;
        st.sync_to(t)
    }

    fn copy_h2d(
        &self,
        stream: StreamId,
        dst: DevicePtr,
        src: HostPtr,
        src_offset: u64,
        len: u64,
    ) -> Result<()> {
        let mut st = self.lock();
        st.faults.check(FaultOp::Copy)?;
        let r = DeviceRange::new(dst, len);
        locate(&st.device, r)?;
        st.host_alloc(src, src_offset, len)?;
        let d = bytes_time(len, self.cfg.h2d_bandwidth, self.cfg.copy_latency);
        st.enqueue(
            &self.cfg,
            stream,
            Engine::H2D,
            d,
            OpKind::CopyH2D,
            "h2d".into(),
            len,
            &[],
            &[r],
            Work::H2D {
                dst,
                src,
                src_offset,
                len,
                started: false,
                data: None,
            },
        )
        .map(|_| ())
    }

    fn copy_h2d_pageable(&self, stream: StreamId, dst: DevicePtr, src: &[u8]) -> Result<()> {
        let mut st = self.lock();
        st.faults.check(FaultOp::Copy)?;
        let r = DeviceRange::new(dst, src.len() as u64);
        locate(&st.device, r)?;
        let d = bytes_time(
            src.len() as u64,
            self.cfg.pageable_bandwidth,
            self.cfg.copy_latency,
        );
        st.enqueue(
            &self.cfg,
            stream,
            Engine::H2D,
            d,
            OpKind::CopyH2DPageable,
            "h2d-pageable".into(),
            src.len() as u64,
            &[],
            &[r],
            Work::H2DBytes {
                dst,
                data: src.to_vec(),
            },
        )?;
        // A pageable copy returns to the host only once it has completed.
        let t = st.streams[stream.0 as usize].tail;
        st.sync_to(t)
    }

    fn copy_d2h(
        &self,
        stream: StreamId,
        dst: HostPtr,
        dst_offset: u64,
        src: DevicePtr,
        len: u64,
    ) -> Result<()> {
        let mut st = self.lock();
        st.faults.check(FaultOp::Copy)?;
        let r = DeviceRange::new(src, len);
        locate(&st.device, r)?;
        if let HostAlloc::Registered(_) = st.host_alloc(dst, dst_offset, len)? {
            return Err(read_only(dst));
        }
        let d = bytes_time(len, self.cfg.d2h_bandwidth, self.cfg.copy_latency);
        st.enqueue(
            &self.cfg,
            stream,
            Engine::D2H,
            d,
            OpKind::CopyD2H,
            "d2h".into(),
            len,
            &[r],
            &[],
            Work::D2H {
                dst,
                dst_offset,
                src,
                len,
                data: None,
            },
        )
        .map(|_| ())
    }

    fn busy(&self, stream: StreamId, duration: Duration) -> Result<()> {
        self.enqueue_kernel(stream, KernelSpec::new("busy", duration), None)
    }

    fn can_launch_ptx(&self) -> bool {
        true
    }

    /// Enqueues an interpreted launch as an ordinary kernel operation in virtual time.
    ///
    /// Refused here, before anything is enqueued: a module that does not parse, a kernel that
    /// does not exist or reaches an unimplemented instruction, arguments that do not match its
    /// PTX parameters, dims past the hardware limits (the CUDA path's own checks) and a
    /// [`KernelArg::Buf`] range outside the live allocations. The interpreter runs when the
    /// simulator reaches the kernel's start, against device memory as of then; its writes land
    /// at its end; its findings are reported by the next synchronising call as an
    /// [`Error::Kernel`], like any other kernel failure. Its races are checked from the bytes it
    /// really touched (see `race::PtxWatch`), once it has run.
    unsafe fn launch_ptx(
        &self,
        stream: StreamId,
        module: &'static str,
        ptx_text: &'static str,
        func: &'static str,
        dims: LaunchDims,
        args: &[KernelArg],
    ) -> Result<()> {
        // Counted first, as every other launch; the checks below have no effect either.
        self.lock().faults.check(FaultOp::Launch)?;
        let m = self.ptx_module(module, ptx_text)?;
        ptx::check_kernel(&m, func)
            .map_err(|e| Error::InvalidArgument(format!("PTX module {module}: {e}")))?;
        check_launch_args(ptx_text, func, args)?;
        dims.check(func)?;
        let mut st = self.lock();
        let mut bufs = Vec::new();
        for arg in args {
            if let KernelArg::Buf { ptr, bytes } = *arg {
                let r = DeviceRange::new(ptr, bytes);
                locate(&st.device, r).map_err(|e| {
                    Error::InvalidArgument(format!("kernel {func}: buffer argument {r}: {e}"))
                })?;
                bufs.push(r);
            }
        }
        let d = ptx_kernel::duration_ns(&self.cfg, &dims, &bufs);
        let launch = ptx_kernel::PtxLaunch {
            module: m,
            func,
            cfg: ptx::LaunchConfig {
                grid: [dims.grid.0, dims.grid.1, dims.grid.2],
                block: [dims.block.0, dims.block.1, dims.block.2],
                dynamic_shared: dims.shared_mem,
            },
            params: ptx_kernel::params(args),
            bufs: bufs.clone(),
            limits: self.cfg.ptx_limits,
            out: Vec::new(),
        };
        // Declares no ranges: the race checker follows its real footprint instead.
        let access = st.enqueue(
            &self.cfg,
            stream,
            Engine::Compute,
            d,
            OpKind::Kernel,
            func.to_string(),
            0,
            &[],
            &[],
            Work::Ptx(Box::new(launch)),
        )?;
        st.watch_ptx(access, bufs);
        Ok(())
    }
}
