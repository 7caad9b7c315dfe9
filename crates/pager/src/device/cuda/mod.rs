//! The CUDA backend: [`CudaDevice`] implements [`Device`] on a real GPU through cudarc's driver API.
//!
//! Layers, after cudarc's own: `result` turns driver status codes into [`Error::Cuda`] values that
//! name the call; `memory` owns allocations (freed or unregistered on drop); this module maps our
//! small handles to cudarc objects and raw pointers and does the argument checks.
//!
//! The driver is loaded dynamically. [`CudaDevice::new`] checks that the library is present before
//! any driver call (cudarc panics on every call without it), so a machine without CUDA gets
//! [`Error::NoDriver`] and one with a driver but no GPU [`Error::NoDevice`], never a panic.
//!
//! Memory: device memory comes from `cuMemAlloc` (one call per arena); pinned host memory from
//! `cuMemHostAlloc`, write-combined for [`HostMemKind::Upload`] and ordinary (portable) for
//! [`HostMemKind::Readable`]. An existing mapping (an mmapped weights file) can be page-locked in
//! place, read-only where the GPU supports it: through the trait with
//! [`Device::register_host_file`] / [`Device::unregister_host`], or owned by a
//! [`HostRegistration`] with [`CudaDevice::register_mmap`].
//!
//! Choices the trait leaves open: zero-byte allocations are [`Error::InvalidArgument`]; unknown
//! handles and device ranges outside every allocation are [`Error::InvalidHandle`] /
//! [`Error::OutOfBounds`]; [`Device::event_elapsed`] never blocks and fails (naming
//! `cuEventElapsedTime`) if an event has not completed; a free racing with a copy being enqueued
//! on another thread is deferred to the last holder, whose drop waits for pending work.
//! [`Device::busy`] launches one thread, so it occupies its stream but leaves the other SMs and
//! the copy engines free.

mod kernels;
mod launch;
mod memory;
mod result;

use self::kernels::{LazyKernel, BUSY_KERNEL, BUSY_PTX};
use self::launch::{check_args, ModuleCache};
pub use self::launch::{
    check_launch_args, needs_shared_opt_in, ptx_entry_params, KernelArg, LaunchDims, ParamKind,
    DEFAULT_SHARED_LIMIT, MAX_BLOCK_THREADS, MAX_GRID,
};
use self::memory::{DeviceAlloc, HostAlloc, HostOrigin};
use self::result::{check, driver_error, Call};
use super::{Device, DeviceKind, DevicePtr, EventId, HostMemKind, HostPtr, MemInfo, StreamId};
use crate::error::{Error, Result};
use cudarc::driver::{
    result as cu, sys, CudaContext, CudaEvent, CudaStream, LaunchConfig, PushKernelArg,
};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

/// Oldest driver API version Ferry accepts: 12.4 (R550), the first to load PTX ISA 8.4.
pub const MIN_DRIVER_VERSION: i32 = 12040;

/// A CUDA GPU behind the [`Device`] trait.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    ordinal: usize,
    name: String,
    /// Driver API version, e.g. 12040 for 12.4.
    driver_version: i32,
    /// Whether `CU_MEMHOSTREGISTER_READ_ONLY` is supported (needed to register read-only mmaps).
    read_only_register: bool,
    next_id: AtomicU32,
    next_host: AtomicU64,
    streams: RwLock<HashMap<StreamId, Arc<CudaStream>>>,
    events: RwLock<HashMap<EventId, Arc<CudaEvent>>>,
    /// Device allocations by base address (ordered, to find the one an address falls in).
    device_allocs: RwLock<BTreeMap<u64, Arc<DeviceAlloc>>>,
    host_allocs: RwLock<HashMap<HostPtr, Arc<HostAlloc>>>,
    busy_kernel: LazyKernel,
    /// PTX modules of other crates, loaded by [`CudaDevice::launch`].
    modules: ModuleCache,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // No code panics while holding these locks; recovering keeps a poisoned map usable anyway.
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Opens the primary context of GPU `ordinal` once the driver library is known to be present.
fn open(ordinal: usize) -> Result<(Arc<CudaContext>, i32)> {
    match cu::init() {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.0,
                sys::CUresult::CUDA_ERROR_NO_DEVICE | sys::CUresult::CUDA_ERROR_INVALID_DEVICE
            ) =>
        {
            return Err(Error::NoDevice(format!(
                "the CUDA driver is installed but cuInit reports {:?}",
                e.0
            )))
        }
        Err(e) => return Err(driver_error("cuInit", e)),
    }
    let mut version = 0;
    // SAFETY: `version` is a valid out-pointer; the driver is initialised.
    check(
        unsafe { sys::cuDriverGetVersion(&mut version) },
        "cuDriverGetVersion",
    )?;
    if version < MIN_DRIVER_VERSION {
        return Err(Error::NoDevice(format!(
            "the CUDA driver supports CUDA {}.{}; Ferry needs {}.{} (driver R550) or newer",
            version / 1000,
            version % 1000 / 10,
            MIN_DRIVER_VERSION / 1000,
            MIN_DRIVER_VERSION % 1000 / 10
        )));
    }
    let count = cu::device::get_count().call("cuDeviceGetCount")?;
    let count = usize::try_from(count).unwrap_or(0);
    if ordinal >= count {
        return Err(Error::NoDevice(format!(
            "asked for GPU {ordinal}, the driver reports {count} GPU(s)"
        )));
    }
    let ctx = CudaContext::new(ordinal).call("cuDevicePrimaryCtxRetain")?;
    Ok((ctx, version))
}

impl CudaDevice {
    /// Opens GPU `ordinal`: [`Error::NoDriver`] without a CUDA driver library, [`Error::NoDevice`]
    /// when the driver has no such GPU (or is older than 12.4).
    pub fn new(ordinal: usize) -> Result<Arc<CudaDevice>> {
        // SAFETY: only tries to dlopen the driver library; no CUDA state is touched.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoDriver);
        }
        // cudarc panics when a driver symbol is missing (a broken or stub libcuda); turn that into
        // an error rather than taking the caller down.
        let (ctx, driver_version) = std::panic::catch_unwind(|| open(ordinal)).map_err(|p| {
            let why = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Error::Cuda {
                call: "cuInit",
                message: format!("the CUDA driver library is present but unusable: {why}"),
            }
        })??;
        // SAFETY: we create no `CudaSlice`; every cross-stream order is expressed by the caller's
        // events, which is exactly the `Device` contract, so cudarc's tracking would only add
        // events and synchronisation.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().call("cuDeviceGetName")?;
        let read_only_register = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED,
            )
            .call("cuDeviceGetAttribute")?
            != 0;
        Ok(Arc::new(CudaDevice {
            ctx,
            ordinal,
            name,
            driver_version,
            read_only_register,
            next_id: AtomicU32::new(1),
            next_host: AtomicU64::new(1),
            streams: RwLock::default(),
            events: RwLock::default(),
            device_allocs: RwLock::default(),
            host_allocs: RwLock::default(),
            busy_kernel: LazyKernel::new(BUSY_PTX, BUSY_KERNEL),
            modules: ModuleCache::default(),
        }))
    }

    /// The device ordinal this was opened with.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The driver's CUDA API version (e.g. 12040 for 12.4).
    pub fn driver_version(&self) -> i32 {
        self.driver_version
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        self.ctx.compute_capability().call("cuDeviceGetAttribute")
    }

    /// Whether [`CudaDevice::register_mmap`] can pin read-only mappings on this GPU.
    pub fn supports_read_only_register(&self) -> bool {
        self.read_only_register
    }

    /// Page-locks a whole memory-mapped file in place, read-only, so it can be the source of
    /// [`Device::copy_h2d`] without a second copy in pinned memory. The returned registration
    /// owns a reference to the mapping, and unregisters it (after pending work) when dropped.
    ///
    /// Needs `CU_MEMHOSTREGISTER_READ_ONLY` ([`CudaDevice::supports_read_only_register`]), since
    /// a read-only mapping cannot be registered writable; [`Device::host_write`] to it is refused.
    pub fn register_mmap(self: &Arc<Self>, map: Arc<Mmap>) -> Result<HostRegistration> {
        let handle = self.register_file(map)?;
        Ok(HostRegistration {
            device: self.clone(),
            handle,
        })
    }

    /// Registers `map` read-only and returns its handle (see [`Device::register_host_file`]).
    fn register_file(&self, map: Arc<Mmap>) -> Result<HostPtr> {
        if !self.read_only_register {
            return Err(Error::InvalidArgument(format!(
                "GPU {} ({}) does not support read-only host registration \
                 (CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED is 0); \
                 copy the weights into pinned memory instead",
                self.ordinal, self.name
            )));
        }
        let (ptr, len) = (map.as_ptr(), map.len());
        // SAFETY: the registration keeps `map` alive until it is unregistered, so the range stays
        // mapped; READ_ONLY means the range is never written.
        unsafe { self.insert_registration(ptr, len, true, Some(map)) }
    }

    /// Page-locks `len` bytes at `ptr` in place, read-only (`CU_MEMHOSTREGISTER_READ_ONLY`)
    /// when `read_only`. Prefer [`CudaDevice::register_mmap`], which keeps the mapping alive.
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay mapped (and, if not `read_only`, writable and not accessed
    /// through Rust references while a copy writes it) until the registration is dropped.
    pub unsafe fn register_host(
        self: &Arc<Self>,
        ptr: *const u8,
        len: usize,
        read_only: bool,
    ) -> Result<HostRegistration> {
        if read_only && !self.read_only_register {
            return Err(Error::InvalidArgument(format!(
                "GPU {} ({}) does not support read-only host registration",
                self.ordinal, self.name
            )));
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.register_raw(ptr, len, read_only, None) }
    }

    /// # Safety
    /// As [`CudaDevice::register_host`].
    unsafe fn register_raw(
        self: &Arc<Self>,
        ptr: *const u8,
        len: usize,
        read_only: bool,
        keep: Option<Arc<Mmap>>,
    ) -> Result<HostRegistration> {
        // SAFETY: forwarded from the caller.
        let handle = unsafe { self.insert_registration(ptr, len, read_only, keep) }?;
        Ok(HostRegistration {
            device: self.clone(),
            handle,
        })
    }

    /// # Safety
    /// As [`CudaDevice::register_host`].
    unsafe fn insert_registration(
        &self,
        ptr: *const u8,
        len: usize,
        read_only: bool,
        keep: Option<Arc<Mmap>>,
    ) -> Result<HostPtr> {
        if len == 0 || ptr.is_null() {
            return Err(Error::InvalidArgument(format!(
                "cannot register an empty or null host range ({len} bytes at {ptr:?})"
            )));
        }
        // SAFETY: forwarded from the caller.
        let alloc = unsafe { HostAlloc::register(&self.ctx, ptr, len, read_only, keep) }?;
        let handle = HostPtr(self.next_host.fetch_add(1, Ordering::Relaxed));
        write(&self.host_allocs).insert(handle, Arc::new(alloc));
        Ok(handle)
    }

    /// Removes registration `ptr` and unregisters it (after pending work).
    fn remove_registration(&self, ptr: HostPtr) -> Result<()> {
        let mut allocs = write(&self.host_allocs);
        match allocs.get(&ptr).map(|a| &a.origin) {
            None => {
                return Err(Error::InvalidHandle(format!(
                    "host pointer {} is not a live registration",
                    ptr.0
                )))
            }
            Some(HostOrigin::Pinned) => {
                return Err(Error::InvalidArgument(format!(
                    "host pointer {} is a pinned allocation, not a registration; free_host it",
                    ptr.0
                )))
            }
            Some(HostOrigin::Registered { .. }) => {}
        }
        let removed = allocs.remove(&ptr);
        drop(allocs);
        match removed.map(Arc::try_unwrap) {
            Some(Ok(mut alloc)) => alloc.release(),
            // A copy being enqueued holds it; the last holder's drop waits and unregisters.
            Some(Err(_)) | None => Ok(()),
        }
    }

    /// Launches kernel `func` of the PTX module `module` (text `ptx`, loaded into this context on
    /// first use and cached by `module`) on `stream`, asynchronously.
    ///
    /// The arguments are checked against the kernel's PTX parameter list (count and type class),
    /// and every [`KernelArg::Buf`] range against the live device allocations, so a wrong
    /// argument list or a stale pointer is an error, not a launch.
    ///
    /// # Safety
    /// The kernel must access only the [`KernelArg::Buf`] ranges it is given (the caller checks
    /// the kernel's index arithmetic against the buffer sizes), and the values must mean what the
    /// kernel expects (e.g. a count matching a buffer's length). Buffers it writes must not be
    /// read or written by other streams until an event recorded after this launch completes.
    pub unsafe fn launch(
        &self,
        stream: StreamId,
        module: &'static str,
        ptx: &'static str,
        func: &'static str,
        dims: LaunchDims,
        args: &[KernelArg],
    ) -> Result<()> {
        let s = self.stream(stream)?;
        let (f, params) = self.modules.function(&self.ctx, module, ptx, func)?;
        check_args(func, &params, args)?;
        for arg in args {
            if let KernelArg::Buf { ptr, bytes } = *arg {
                self.device_range(ptr, bytes)?;
            }
        }
        dims.check(func)?;
        let (g, b) = (dims.grid, dims.block);
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        let static_smem = if dims.shared_mem > 0 {
            f.get_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                .call("cuFuncGetAttribute")?
        } else {
            0
        };
        if needs_shared_opt_in(
            u32::try_from(static_smem).unwrap_or(u32::MAX),
            dims.shared_mem,
        ) {
            // Past 48 KiB of static plus dynamic shared memory a kernel must opt in.
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dims.shared_mem as i32,
            )
            .call("cuFuncSetAttribute")?;
        }
        // One 8-byte slot per parameter; the driver reads each parameter's size from the slot's
        // start (little endian), so 4-byte values sit in the low bytes.
        let mut slots: Vec<u64> = args.iter().map(KernelArg::slot).collect();
        let mut ptrs: Vec<*mut std::ffi::c_void> = slots
            .iter_mut()
            .map(|v| (v as *mut u64).cast::<std::ffi::c_void>())
            .collect();
        // SAFETY: `f` is a live function of this context (held by the cache); `ptrs` has exactly
        // one pointer per kernel parameter (checked above), each to an 8-byte slot that outlives
        // the call (the driver copies the values before returning); buffer ranges are live
        // allocations; what the kernel does within them is the caller's contract.
        check(
            unsafe {
                sys::cuLaunchKernel(
                    f.cu_function(),
                    g.0,
                    g.1,
                    g.2,
                    b.0,
                    b.1,
                    b.2,
                    dims.shared_mem,
                    s.cu_stream(),
                    ptrs.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            "cuLaunchKernel",
        )
    }

    fn stream(&self, id: StreamId) -> Result<Arc<CudaStream>> {
        read(&self.streams).get(&id).cloned().ok_or_else(|| {
            Error::InvalidHandle(format!("stream {} is not a stream of {}", id.0, self.name))
        })
    }

    fn event(&self, id: EventId) -> Result<Arc<CudaEvent>> {
        read(&self.events).get(&id).cloned().ok_or_else(|| {
            Error::InvalidHandle(format!("event {} is not an event of {}", id.0, self.name))
        })
    }

    fn host(&self, ptr: HostPtr) -> Result<Arc<HostAlloc>> {
        read(&self.host_allocs).get(&ptr).cloned().ok_or_else(|| {
            Error::InvalidHandle(format!(
                "host pointer {} is not a live host allocation",
                ptr.0
            ))
        })
    }

    /// Checks that `offset..offset + len` lies in `alloc`; returns the start as a `usize`.
    fn host_range(alloc: &HostAlloc, ptr: HostPtr, offset: u64, len: u64) -> Result<usize> {
        let end = offset.checked_add(len);
        match end {
            Some(end) if end <= alloc.len as u64 => Ok(offset as usize),
            _ => Err(Error::OutOfBounds(format!(
                "host range [{offset}, {offset}+{len}) of host allocation {} ({} bytes)",
                ptr.0, alloc.len
            ))),
        }
    }

    /// The device allocation that holds all of `ptr..ptr + len`.
    fn device_range(&self, ptr: DevicePtr, len: u64) -> Result<Arc<DeviceAlloc>> {
        let allocs = read(&self.device_allocs);
        let found = allocs.range(..=ptr.0).next_back().map(|(_, a)| a);
        match (found, ptr.0.checked_add(len)) {
            (Some(a), Some(end)) if end <= a.ptr() + a.len => Ok(a.clone()),
            (Some(a), _) if ptr.0 < a.ptr() + a.len => Err(Error::OutOfBounds(format!(
                "device range [{ptr}, {ptr}+{len}) runs past the allocation [0x{:x}, 0x{:x})",
                a.ptr(),
                a.ptr() + a.len
            ))),
            _ => Err(Error::InvalidHandle(format!(
                "device address {ptr} is not in any allocation of {}",
                self.name
            ))),
        }
    }

    fn new_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Records `event` on a stream this device did not create (a raw `CUstream`, e.g. an
    /// engine's own compute stream), so Ferry's streams can wait for that stream's work.
    ///
    /// # Safety
    /// `stream` must be null (the legacy default stream) or a live stream of this device's
    /// primary context.
    pub unsafe fn record_event_on_raw(
        &self,
        event: EventId,
        stream: *mut std::ffi::c_void,
    ) -> Result<()> {
        let e = self.event(event)?;
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: `e` is a live event of this context; `stream` is valid by the caller's contract.
        check(
            unsafe { sys::cuEventRecord(e.cu_event(), stream as sys::CUstream) },
            "cuEventRecord",
        )
    }

    /// Makes a stream this device did not create (a raw `CUstream`) wait for `event`; the host
    /// does not wait.
    ///
    /// # Safety
    /// As for [`CudaDevice::record_event_on_raw`].
    pub unsafe fn wait_event_on_raw(
        &self,
        stream: *mut std::ffi::c_void,
        event: EventId,
    ) -> Result<()> {
        let e = self.event(event)?;
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: as in `record_event_on_raw`; flags 0 is the only defined value.
        check(
            unsafe { sys::cuStreamWaitEvent(stream as sys::CUstream, e.cu_event(), 0) },
            "cuStreamWaitEvent",
        )
    }
}

/// A host range page-locked in place by [`CudaDevice::register_mmap`] or
/// [`CudaDevice::register_host`]; usable as a [`HostPtr`] until dropped, when it is unregistered.
pub struct HostRegistration {
    device: Arc<CudaDevice>,
    handle: HostPtr,
}

impl HostRegistration {
    /// The handle to pass to [`Device::copy_h2d`] and [`Device::host_read`].
    pub fn host_ptr(&self) -> HostPtr {
        self.handle
    }

    /// Unregisters now (after pending work), reporting a driver error that drop would swallow.
    pub fn unregister(self) -> Result<()> {
        self.take()
    }

    fn take(&self) -> Result<()> {
        match self.device.remove_registration(self.handle) {
            // Already unregistered (after `unregister`, or by `Device::unregister_host`).
            Err(Error::InvalidHandle(_)) => Ok(()),
            r => r,
        }
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        // Unregistering twice (after `unregister`) finds nothing and does nothing.
        let _ = self.take();
    }
}

impl fmt::Debug for HostRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostRegistration")
            .field("handle", &self.handle)
            .finish()
    }
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .field("driver_version", &self.driver_version)
            .field("streams", &read(&self.streams).len())
            .field("events", &read(&self.events).len())
            .field("device_allocs", &read(&self.device_allocs).len())
            .field("host_allocs", &read(&self.host_allocs).len())
            .field("busy_kernel", &self.busy_kernel)
            .field("modules", &self.modules.loaded())
            .finish()
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // Wait once for everything, then free: host and device memory first, then events and
        // streams; the context itself is released when the last cudarc object lets go of it.
        let _ = self.ctx.bind_to_thread();
        let _ = self.ctx.synchronize();
        write(&self.host_allocs).clear();
        write(&self.device_allocs).clear();
        write(&self.events).clear();
        write(&self.streams).clear();
    }
}

impl Device for CudaDevice {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Cuda
    }

    fn can_launch_ptx(&self) -> bool {
        true
    }

    unsafe fn launch_ptx(
        &self,
        stream: StreamId,
        module: &'static str,
        ptx: &'static str,
        func: &'static str,
        dims: LaunchDims,
        args: &[KernelArg],
    ) -> Result<()> {
        // SAFETY: the caller upholds `launch`'s contract, which is this method's.
        unsafe { self.launch(stream, module, ptx, func, dims, args) }
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn mem_info(&self) -> Result<MemInfo> {
        let (free, total) = self.ctx.mem_get_info().call("cuMemGetInfo")?;
        Ok(MemInfo {
            free: free as u64,
            total: total as u64,
        })
    }

    fn alloc_device(&self, bytes: u64) -> Result<DevicePtr> {
        if bytes == 0 {
            return Err(Error::InvalidArgument(
                "device allocation of 0 bytes (expected at least 1)".into(),
            ));
        }
        let alloc = DeviceAlloc::new(&self.ctx, bytes)?;
        let ptr = DevicePtr(alloc.ptr());
        write(&self.device_allocs).insert(ptr.0, Arc::new(alloc));
        Ok(ptr)
    }

    fn free_device(&self, ptr: DevicePtr) -> Result<()> {
        let removed = write(&self.device_allocs).remove(&ptr.0).ok_or_else(|| {
            Error::InvalidHandle(format!(
                "device address {ptr} is not the start of an allocation of {}",
                self.name
            ))
        })?;
        match Arc::try_unwrap(removed) {
            Ok(mut alloc) => alloc.release(),
            // A copy being enqueued holds it; the last holder's drop waits and frees.
            Err(_) => Ok(()),
        }
    }

    fn alloc_host(&self, bytes: u64, kind: HostMemKind) -> Result<HostPtr> {
        let len = usize::try_from(bytes)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "host allocation of {bytes} bytes (expected 1..=usize::MAX)"
                ))
            })?;
        let alloc = HostAlloc::pinned(&self.ctx, len, kind)?;
        let handle = HostPtr(self.next_host.fetch_add(1, Ordering::Relaxed));
        write(&self.host_allocs).insert(handle, Arc::new(alloc));
        Ok(handle)
    }

    fn free_host(&self, ptr: HostPtr) -> Result<()> {
        let mut allocs = write(&self.host_allocs);
        match allocs.get(&ptr).map(|a| &a.origin) {
            None => {
                return Err(Error::InvalidHandle(format!(
                    "host pointer {} is not a live host allocation",
                    ptr.0
                )))
            }
            Some(HostOrigin::Registered { .. }) => {
                return Err(Error::InvalidArgument(format!(
                    "host pointer {} is a registration; drop its HostRegistration instead",
                    ptr.0
                )))
            }
            Some(HostOrigin::Pinned) => {}
        }
        let removed = allocs.remove(&ptr);
        drop(allocs);
        match removed.map(Arc::try_unwrap) {
            Some(Ok(mut alloc)) => alloc.release(),
            // A host copy in progress holds it; the last holder's drop waits and frees.
            Some(Err(_)) | None => Ok(()),
        }
    }

    fn host_write(&self, dst: HostPtr, offset: u64, src: &[u8]) -> Result<()> {
        let alloc = self.host(dst)?;
        if !alloc.writable() {
            return Err(Error::InvalidArgument(format!(
                "host pointer {} is registered read-only",
                dst.0
            )));
        }
        let start = Self::host_range(&alloc, dst, offset, src.len() as u64)?;
        // SAFETY: `start + src.len()` is within the allocation (checked above), which `alloc`
        // keeps alive; `src` is a distinct Rust slice, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), alloc.ptr().add(start), src.len()) };
        Ok(())
    }

    fn host_read(&self, src: HostPtr, offset: u64, dst: &mut [u8]) -> Result<()> {
        let alloc = self.host(src)?;
        let start = Self::host_range(&alloc, src, offset, dst.len() as u64)?;
        // SAFETY: as in `host_write`, with the roles swapped.
        unsafe {
            std::ptr::copy_nonoverlapping(alloc.ptr().add(start), dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    fn can_register_host_files(&self) -> bool {
        self.read_only_register
    }

    fn register_host_file(&self, map: Arc<Mmap>) -> Result<HostPtr> {
        self.register_file(map)
    }

    fn unregister_host(&self, ptr: HostPtr) -> Result<()> {
        self.remove_registration(ptr)
    }

    fn create_stream(&self) -> Result<StreamId> {
        let stream = self.ctx.new_stream().call("cuStreamCreate")?;
        let id = StreamId(self.new_id());
        write(&self.streams).insert(id, stream);
        Ok(id)
    }

    fn create_event(&self) -> Result<EventId> {
        let event = self
            .ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .call("cuEventCreate")?;
        let id = EventId(self.new_id());
        write(&self.events).insert(id, Arc::new(event));
        Ok(id)
    }

    fn create_sync_event(&self) -> Result<EventId> {
        let event = self
            .ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .call("cuEventCreate")?;
        let id = EventId(self.new_id());
        write(&self.events).insert(id, Arc::new(event));
        Ok(id)
    }

    fn destroy_stream(&self, stream: StreamId) -> Result<()> {
        // cuStreamDestroy returns at once; the driver frees the stream when its work is done.
        write(&self.streams)
            .remove(&stream)
            .map(drop)
            .ok_or_else(|| Error::InvalidHandle(format!("stream {} does not exist", stream.0)))
    }

    fn destroy_event(&self, event: EventId) -> Result<()> {
        write(&self.events)
            .remove(&event)
            .map(drop)
            .ok_or_else(|| Error::InvalidHandle(format!("event {} does not exist", event.0)))
    }

    fn record_event(&self, event: EventId, stream: StreamId) -> Result<()> {
        let (e, s) = (self.event(event)?, self.stream(stream)?);
        e.record(&s).call("cuEventRecord")
    }

    fn wait_event(&self, stream: StreamId, event: EventId) -> Result<()> {
        let (s, e) = (self.stream(stream)?, self.event(event)?);
        s.wait(&e).call("cuStreamWaitEvent")
    }

    fn event_done(&self, event: EventId) -> Result<bool> {
        let e = self.event(event)?;
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        e.try_is_complete().call("cuEventQuery")
    }

    fn sync_event(&self, event: EventId) -> Result<()> {
        self.event(event)?.synchronize().call("cuEventSynchronize")
    }

    fn event_elapsed(&self, start: EventId, end: EventId) -> Result<Duration> {
        let (s, e) = (self.event(start)?, self.event(end)?);
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: both events were created by `create_event` in this context, with timing, and
        // are alive (held by `s` and `e`).
        let ms = unsafe { cu::event::elapsed(s.cu_event(), e.cu_event()) }.map_err(|err| {
            let mut error = driver_error("cuEventElapsedTime", err);
            if err.0 == sys::CUresult::CUDA_ERROR_NOT_READY {
                if let Error::Cuda { message, .. } = &mut error {
                    message.push_str(" (both events must have completed: sync_event first)");
                }
            }
            error
        })?;
        if !(ms >= 0.0 && ms.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "event {} completed {ms} ms after event {}: expected end at or after start",
                end.0, start.0
            )));
        }
        Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
    }

    fn sync_stream(&self, stream: StreamId) -> Result<()> {
        self.stream(stream)?
            .synchronize()
            .call("cuStreamSynchronize")
    }

    fn copy_h2d(
        &self,
        stream: StreamId,
        dst: DevicePtr,
        src: HostPtr,
        src_offset: u64,
        len: u64,
    ) -> Result<()> {
        let s = self.stream(stream)?;
        let host = self.host(src)?;
        let start = Self::host_range(&host, src, src_offset, len)?;
        let _dev = self.device_range(dst, len)?;
        if len == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: source and destination ranges were checked against live allocations above;
        // the host memory is page-locked and stays allocated until the copy completes (freeing
        // it waits for the context's pending work).
        check(
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    dst.0,
                    host.ptr().add(start).cast(),
                    len as usize,
                    s.cu_stream(),
                )
            },
            "cuMemcpyHtoDAsync",
        )
    }

    fn copy_h2d_pageable(&self, stream: StreamId, dst: DevicePtr, src: &[u8]) -> Result<()> {
        let s = self.stream(stream)?;
        let _dev = self.device_range(dst, src.len() as u64)?;
        if src.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: the destination range was checked above; `src` is pageable, so the driver
        // stages it, and we wait for the stream before returning so `src` outlives the copy.
        check(
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(dst.0, src.as_ptr().cast(), src.len(), s.cu_stream())
            },
            "cuMemcpyHtoDAsync",
        )?;
        s.synchronize().call("cuStreamSynchronize")
    }

    fn copy_d2h(
        &self,
        stream: StreamId,
        dst: HostPtr,
        dst_offset: u64,
        src: DevicePtr,
        len: u64,
    ) -> Result<()> {
        let s = self.stream(stream)?;
        let host = self.host(dst)?;
        if !host.writable() {
            return Err(Error::InvalidArgument(format!(
                "host pointer {} is registered read-only; it cannot receive a copy",
                dst.0
            )));
        }
        let start = Self::host_range(&host, dst, dst_offset, len)?;
        let _dev = self.device_range(src, len)?;
        if len == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: ranges checked above; the page-locked destination stays allocated until the
        // copy completes (freeing it waits for pending work). The host must not read it before
        // an event after this copy completes, as the `Device` trait documents.
        check(
            unsafe {
                sys::cuMemcpyDtoHAsync_v2(
                    host.ptr().add(start).cast(),
                    src.0,
                    len as usize,
                    s.cu_stream(),
                )
            },
            "cuMemcpyDtoHAsync",
        )
    }

    fn busy(&self, stream: StreamId, duration: Duration) -> Result<()> {
        let s = self.stream(stream)?;
        let f = self.busy_kernel.get(&self.ctx)?;
        let ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = s.launch_builder(&f);
        launch.arg(&ns);
        // SAFETY: `ferry_busy(unsigned long long)` takes exactly one u64 and touches no memory.
        unsafe { launch.launch(cfg) }
            .map(|_| ())
            .call("cuLaunchKernel")
    }
}
