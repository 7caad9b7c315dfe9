//! The device layer: one abstraction over device memory, pinned host memory, streams, events and
//! asynchronous copies, with two implementations — [`sim::SimDevice`] (deterministic, virtual time)
//! and [`cuda::CudaDevice`] (the real GPU through cudarc).
//!
//! Everything is addressed by small copyable handles ([`DevicePtr`], [`HostPtr`], [`StreamId`],
//! [`EventId`]) so the trait is object safe and `Send + Sync`; the backend owns the memory.

pub mod cuda;
pub mod null;
pub mod sim;

pub use self::cuda::{KernelArg, LaunchDims};
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// An address in a device's memory (a raw `CUdeviceptr` on CUDA, a virtual address on the simulator).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevicePtr(pub u64);

impl DevicePtr {
    /// The address `bytes` further on.
    pub fn offset(self, bytes: u64) -> DevicePtr {
        DevicePtr(self.0 + bytes)
    }
}

impl fmt::Display for DevicePtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:x}", self.0)
    }
}

/// A byte range of device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceRange {
    /// First byte.
    pub ptr: DevicePtr,
    /// Length in bytes.
    pub len: u64,
}

impl DeviceRange {
    /// A range of `len` bytes starting at `ptr`.
    pub fn new(ptr: DevicePtr, len: u64) -> Self {
        DeviceRange { ptr, len }
    }
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.ptr.0 + self.len
    }
    /// Whether the two ranges share at least one byte.
    pub fn overlaps(&self, other: &DeviceRange) -> bool {
        self.ptr.0 < other.end() && other.ptr.0 < self.end()
    }
}

impl fmt::Display for DeviceRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[0x{:x}, 0x{:x})", self.ptr.0, self.end())
    }
}

/// A handle to a host allocation owned by a device backend (pinned on CUDA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPtr(pub u64);

/// A stream: operations on one stream run in order; different streams are ordered only by events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u32);

/// An event: a point in a stream's work that other streams and the host can wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(pub u32);

/// How a host allocation will be used; it decides the flags on CUDA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostMemKind {
    /// Source of host→device copies only; write-combined on CUDA (fast H2D, very slow host reads).
    Upload,
    /// Read back by the host (device→host results, staging); ordinary cached pinned memory.
    Readable,
}

/// Free and total device memory as the driver (or simulator) reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemInfo {
    /// Bytes free.
    pub free: u64,
    /// Bytes in total.
    pub total: u64,
}

/// Which kind of device a [`Device`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// The deterministic simulator.
    Sim,
    /// A CUDA GPU.
    Cuda,
}

/// The device abstraction that the allocator and the scheduler are written against.
///
/// All copies and kernels are asynchronous with respect to the host: they are ordered only by
/// their stream and by event waits. Host access to host memory ([`Device::host_write`],
/// [`Device::host_read`]) is immediate, so the host must wait on an event or stream before reading
/// what a device→host copy wrote, or before overwriting what a host→device copy reads.
pub trait Device: Send + Sync + fmt::Debug {
    /// Simulator or CUDA.
    fn kind(&self) -> DeviceKind;
    /// A human-readable name (GPU model, or the simulator's configuration).
    fn name(&self) -> String;
    /// Free and total device memory.
    fn mem_info(&self) -> Result<MemInfo>;

    /// Allocates `bytes` of device memory (uninitialised). Meant to be called once per arena.
    fn alloc_device(&self, bytes: u64) -> Result<DevicePtr>;
    /// Frees an allocation made by [`Device::alloc_device`]. Waits for pending work first.
    fn free_device(&self, ptr: DevicePtr) -> Result<()>;

    /// Allocates `bytes` of page-locked host memory, zeroed.
    fn alloc_host(&self, bytes: u64, kind: HostMemKind) -> Result<HostPtr>;
    /// Frees a host allocation. Waits for pending work first.
    fn free_host(&self, ptr: HostPtr) -> Result<()>;
    /// Copies `src` into the host allocation at `offset` (a host-side memcpy).
    fn host_write(&self, dst: HostPtr, offset: u64, src: &[u8]) -> Result<()>;
    /// Copies out of the host allocation at `offset` into `dst` (a host-side memcpy).
    fn host_read(&self, src: HostPtr, offset: u64, dst: &mut [u8]) -> Result<()>;

    /// Whether [`Device::register_host_file`] can work on this device.
    fn can_register_host_files(&self) -> bool {
        false
    }
    /// Page-locks a whole memory-mapped file in place, read-only, and returns a handle to it
    /// (offset 0 = the file's first byte) usable as the source of [`Device::copy_h2d`] and
    /// [`Device::host_read`]; [`Device::host_write`] and [`Device::copy_d2h`] into it are
    /// refused. The device keeps `map` alive until [`Device::unregister_host`].
    ///
    /// Devices that cannot (the default; a GPU without read-only registration) return an error,
    /// and the caller copies into [`Device::alloc_host`] memory instead.
    fn register_host_file(&self, map: Arc<Mmap>) -> Result<HostPtr> {
        Err(Error::InvalidArgument(format!(
            "{} cannot register host memory in place ({} bytes asked); copy into pinned memory instead",
            self.name(),
            map.len()
        )))
    }
    /// Unregisters a handle from [`Device::register_host_file`]. Waits for pending work first.
    fn unregister_host(&self, ptr: HostPtr) -> Result<()> {
        Err(Error::InvalidHandle(format!(
            "host pointer {} is not a registration of {} (it registers nothing)",
            ptr.0,
            self.name()
        )))
    }

    /// Creates a stream.
    fn create_stream(&self) -> Result<StreamId>;
    /// Creates an event (with timing enabled).
    fn create_event(&self) -> Result<EventId>;
    /// Creates an event only for ordering and host waits, which [`Device::event_elapsed`] may
    /// refuse (on CUDA: `CU_EVENT_DISABLE_TIMING`, cheaper to record and wait on). The default
    /// is [`Device::create_event`].
    fn create_sync_event(&self) -> Result<EventId> {
        self.create_event()
    }
    /// Destroys a stream once its pending work has completed (the host does not wait). The
    /// default does nothing, for backends whose streams live as long as the device.
    fn destroy_stream(&self, stream: StreamId) -> Result<()> {
        let _ = stream;
        Ok(())
    }
    /// Destroys an event; streams already waiting on it are unaffected. The default does
    /// nothing, for backends whose events live as long as the device.
    fn destroy_event(&self, event: EventId) -> Result<()> {
        let _ = event;
        Ok(())
    }
    /// Records `event` at the current end of `stream`'s work.
    fn record_event(&self, event: EventId, stream: StreamId) -> Result<()>;
    /// Makes later work on `stream` wait until `event` has completed (the host does not wait).
    fn wait_event(&self, stream: StreamId, event: EventId) -> Result<()>;
    /// Whether `event` has completed (never blocks).
    fn event_done(&self, event: EventId) -> Result<bool>;
    /// Blocks the host until `event` has completed.
    fn sync_event(&self, event: EventId) -> Result<()>;
    /// Time between two completed events.
    fn event_elapsed(&self, start: EventId, end: EventId) -> Result<Duration>;
    /// Blocks the host until all work on `stream` has completed.
    fn sync_stream(&self, stream: StreamId) -> Result<()>;

    /// Enqueues a copy of `len` bytes from pinned host memory to device memory.
    fn copy_h2d(
        &self,
        stream: StreamId,
        dst: DevicePtr,
        src: HostPtr,
        src_offset: u64,
        len: u64,
    ) -> Result<()>;
    /// Copies from ordinary (pageable) host memory; returns once the source may be reused,
    /// which on CUDA means after the copy has completed (the pageable baseline).
    fn copy_h2d_pageable(&self, stream: StreamId, dst: DevicePtr, src: &[u8]) -> Result<()>;
    /// Enqueues a copy of `len` bytes from device memory to pinned host memory.
    fn copy_d2h(
        &self,
        stream: StreamId,
        dst: HostPtr,
        dst_offset: u64,
        src: DevicePtr,
        len: u64,
    ) -> Result<()>;
    /// Enqueues a kernel that occupies `stream` for `duration` and touches no memory (a spin kernel
    /// on CUDA): the stand-in for compute in benchmarks and scheduler tests.
    fn busy(&self, stream: StreamId, duration: Duration) -> Result<()>;

    /// Whether [`Device::launch_ptx`] runs kernels on this device.
    fn can_launch_ptx(&self) -> bool {
        false
    }

    /// Enqueues kernel `func` of the PTX module `module` (text `ptx`, cached by `module`) on
    /// `stream`: on CUDA a real launch, on the simulator an interpreted one.
    ///
    /// The arguments are checked against the kernel's PTX parameter list and every
    /// [`KernelArg::Buf`] range against the live device allocations before anything runs.
    ///
    /// # Safety
    /// The kernel must access only the [`KernelArg::Buf`] ranges it is given, and the values must
    /// mean what the kernel expects; buffers it writes must not be used by other streams until
    /// an event recorded after this launch completes. (The simulator checks all of this and
    /// reports a violation as an error, but a real GPU does not.)
    unsafe fn launch_ptx(
        &self,
        stream: StreamId,
        module: &'static str,
        ptx: &'static str,
        func: &'static str,
        dims: LaunchDims,
        args: &[KernelArg],
    ) -> Result<()> {
        let _ = (stream, ptx, dims, args);
        Err(Error::InvalidArgument(format!(
            "{} cannot launch kernel '{func}' of module '{module}': it does not execute PTX",
            self.name()
        )))
    }
}
