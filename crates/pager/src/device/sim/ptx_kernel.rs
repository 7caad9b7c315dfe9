//! Interpreted PTX launches as simulator kernel operations ([`Device::launch_ptx`] on
//! [`SimDevice`](super::SimDevice)): the view of device memory the interpreter gets, the
//! footprint it records, the virtual-time cost model and the mapping of interpreter errors.
//!
//! [`Device::launch_ptx`]: crate::Device::launch_ptx

use super::kernel::locate;
use super::ptx::{self, ErrorKind, GlobalMemory, LaunchConfig, Module, ParamValue, PtxError};
use super::race::{Footprint, RangeSet};
use super::SimConfig;
use crate::device::{DevicePtr, DeviceRange, KernelArg, LaunchDims};
use crate::error::Error;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Granularity of the copy-on-write overlay. Simulated allocations start 256-aligned with at
/// least 256 bytes of gap after them, so one chunk never holds bytes of two allocations.
const CHUNK: u64 = 256;

/// One enqueued interpreted launch, run when the simulator reaches its start.
pub(super) struct PtxLaunch {
    pub(super) module: Arc<Module>,
    pub(super) func: &'static str,
    pub(super) cfg: LaunchConfig,
    pub(super) params: Vec<ParamValue>,
    /// The [`KernelArg::Buf`] ranges: the only device bytes the kernel may touch.
    pub(super) bufs: Vec<DeviceRange>,
    pub(super) limits: ptx::Limits,
    /// Its writes, applied at the kernel's end.
    pub(super) out: Vec<(DeviceRange, Vec<u8>)>,
}

/// What running a [`PtxLaunch`] gave: the writes to apply at its end, its footprint, and the
/// interpreter's verdict (writes are dropped when it failed).
pub(super) struct Ran {
    pub(super) writes: Vec<(DeviceRange, Vec<u8>)>,
    pub(super) footprint: Footprint,
    pub(super) result: std::result::Result<ptx::LaunchReport, PtxError>,
}

impl PtxLaunch {
    /// Runs the interpreter against `allocs` (device memory as of the kernel's start).
    pub(super) fn run(&self, allocs: &BTreeMap<u64, Vec<u8>>) -> Ran {
        let mut view = DeviceView {
            allocs,
            bufs: &self.bufs,
            chunks: HashMap::new(),
            reads: RefCell::new(RangeSet::default()),
            writes: RangeSet::default(),
        };
        let result = ptx::launch(
            &self.module,
            self.func,
            self.cfg,
            &self.params,
            &mut view,
            self.limits,
        );
        let writes_set = std::mem::take(&mut view.writes).ranges();
        let writes = if result.is_ok() {
            writes_set.iter().map(|r| (*r, view.gather(r))).collect()
        } else {
            Vec::new()
        };
        let reads = view.reads.borrow().ranges();
        Ran {
            writes,
            footprint: Footprint {
                reads,
                writes: writes_set,
            },
            result,
        }
    }
}

/// Device memory as an interpreted kernel sees it: reads see memory as of the kernel's start plus
/// its own earlier writes (kept in a copy-on-write overlay, so nothing lands before its end);
/// every access must lie inside one of its buffer arguments; what it touches is recorded.
struct DeviceView<'a> {
    allocs: &'a BTreeMap<u64, Vec<u8>>,
    bufs: &'a [DeviceRange],
    chunks: HashMap<u64, Vec<u8>>,
    // `GlobalMemory::read` takes `&self`.
    reads: RefCell<RangeSet>,
    writes: RangeSet,
}

impl DeviceView<'_> {
    /// Checks that `[addr, addr + len)` lies inside a buffer argument (and so in a live
    /// allocation, as checked at launch and kept by `free_device` draining first).
    fn check(&self, addr: u64, len: usize) -> std::result::Result<DeviceRange, String> {
        let r = DeviceRange::new(DevicePtr(addr), len as u64);
        if !self.bufs.iter().any(|b| super::kernel::contains(b, &r)) {
            return Err(format!(
                "{r} is outside the kernel's buffer arguments {}",
                self.bufs
                    .iter()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        locate(self.allocs, r).map_err(|e| e.to_string())?;
        Ok(r)
    }

    /// The bytes of `r` as the kernel now sees them.
    fn gather(&self, r: &DeviceRange) -> Vec<u8> {
        let mut out = vec![0u8; r.len as usize];
        if let Ok((base, a, b)) = locate(self.allocs, *r) {
            out.copy_from_slice(&self.allocs[&base][a..b]);
        }
        let mut at = r.ptr.0;
        while at < r.end() {
            let c = at - at % CHUNK;
            let e = (c + CHUNK).min(r.end());
            if let Some(chunk) = self.chunks.get(&c) {
                let (o, co) = ((at - r.ptr.0) as usize, (at - c) as usize);
                let n = (e - at) as usize;
                out[o..o + n].copy_from_slice(&chunk[co..co + n]);
            }
            at = e;
        }
        out
    }

    /// The overlay chunk starting at `c`, copied from device memory on first write.
    fn chunk_mut(&mut self, c: u64) -> &mut Vec<u8> {
        let allocs = self.allocs;
        self.chunks.entry(c).or_insert_with(|| {
            let mut bytes = vec![0u8; CHUNK as usize];
            if let Some((&base, mem)) = allocs.range(..c + CHUNK).next_back() {
                // Bytes of the allocation inside the chunk; the rest (a gap) is never read.
                let lo = c.max(base);
                let hi = (c + CHUNK).min(base + mem.len() as u64);
                if lo < hi {
                    bytes[(lo - c) as usize..(hi - c) as usize]
                        .copy_from_slice(&mem[(lo - base) as usize..(hi - base) as usize]);
                }
            }
            bytes
        })
    }
}

impl GlobalMemory for DeviceView<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        let r = self.check(addr, buf.len())?;
        buf.copy_from_slice(&self.gather(&r));
        self.reads.borrow_mut().insert(r.ptr.0, r.end());
        Ok(())
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> std::result::Result<(), String> {
        let r = self.check(addr, data.len())?;
        let mut at = r.ptr.0;
        while at < r.end() {
            let c = at - at % CHUNK;
            let e = (c + CHUNK).min(r.end());
            let (o, co, n) = (
                (at - r.ptr.0) as usize,
                (at - c) as usize,
                (e - at) as usize,
            );
            self.chunk_mut(c)[co..co + n].copy_from_slice(&data[o..o + n]);
            at = e;
        }
        self.writes.insert(r.ptr.0, r.end());
        Ok(())
    }
}

/// The virtual duration of an interpreted launch, in ns (see [`SimConfig::kernel_overhead`]):
/// `kernel_overhead + max(buffer bytes / device_bandwidth, threads / thread_rate)`.
pub(super) fn duration_ns(cfg: &SimConfig, dims: &LaunchDims, bufs: &[DeviceRange]) -> u64 {
    let bytes: u64 = bufs.iter().map(|b| b.len).sum();
    let (g, b) = (dims.grid, dims.block);
    let threads = [g.0, g.1, g.2, b.0, b.1, b.2]
        .iter()
        .fold(1f64, |acc, &x| acc * f64::from(x));
    let memory = bytes as f64 / cfg.device_bandwidth * 1e9;
    let compute = threads / cfg.thread_rate * 1e9;
    let t = super::ns(cfg.kernel_overhead) as f64 + memory.max(compute);
    (t.ceil() as u64).max(1)
}

/// The interpreter's value of each argument (pointers as 64-bit addresses).
pub(super) fn params(args: &[KernelArg]) -> Vec<ParamValue> {
    args.iter()
        .map(|a| match *a {
            KernelArg::Buf { ptr, .. } => ParamValue::Ptr(ptr.0),
            KernelArg::Null => ParamValue::Ptr(0),
            KernelArg::U32(v) => ParamValue::U32(v),
            KernelArg::I32(v) => ParamValue::I32(v),
            KernelArg::U64(v) => ParamValue::U64(v),
            KernelArg::F32(v) => ParamValue::F32(v),
        })
        .collect()
}

/// An interpreter failure as a device error: memory findings (bounds, alignment, shared-memory
/// races, uninitialised reads) are out-of-bounds errors, the rest (deadlock, instruction budget,
/// launch refusals) invalid-argument errors; the one-line message names kernel, block, thread
/// and PTX line either way.
pub(super) fn device_error(e: PtxError) -> Error {
    match e.kind {
        ErrorKind::Memory => Error::OutOfBounds(e.message),
        ErrorKind::Deadlock => Error::InvalidArgument(format!("deadlock: {}", e.message)),
        ErrorKind::Budget => Error::InvalidArgument(format!("runaway kernel: {}", e.message)),
        ErrorKind::Parse | ErrorKind::Unimplemented | ErrorKind::Launch => {
            Error::InvalidArgument(e.message)
        }
    }
}
