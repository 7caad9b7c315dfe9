//! Owned device and host allocations: each frees (or unregisters) itself on drop, after waiting for
//! the context's pending work so that no in-flight copy touches freed memory.

use super::result::{check, Call};
use crate::device::HostMemKind;
use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaContext};
use memmap2::Mmap;
use std::ffi::c_void;
use std::sync::Arc;

/// One `cuMemAlloc` allocation.
pub(super) struct DeviceAlloc {
    ctx: Arc<CudaContext>,
    /// The `CUdeviceptr`; 0 once released.
    ptr: sys::CUdeviceptr,
    /// Length in bytes.
    pub(super) len: u64,
}

impl DeviceAlloc {
    /// Allocates `len` (non-zero) bytes of device memory.
    pub(super) fn new(ctx: &Arc<CudaContext>, len: u64) -> Result<Self> {
        let bytes = usize::try_from(len).map_err(|_| {
            Error::InvalidArgument(format!("device allocation of {len} bytes exceeds usize"))
        })?;
        ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out-pointer; the context is current on this thread.
        let status = unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) };
        if status == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            let free = ctx.mem_get_info().map(|(free, _)| free as u64).unwrap_or(0);
            return Err(Error::OutOfMemory {
                asked: len,
                free,
                // The driver does not report fragmentation; free is the best bound it gives.
                largest_free: free,
            });
        }
        check(status, "cuMemAlloc")?;
        Ok(DeviceAlloc {
            ctx: ctx.clone(),
            ptr,
            len,
        })
    }

    /// The device address.
    pub(super) fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Waits for pending work, then frees; idempotent.
    pub(super) fn release(&mut self) -> Result<()> {
        if self.ptr == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        self.ctx.synchronize().call("cuCtxSynchronize")?;
        let ptr = std::mem::replace(&mut self.ptr, 0);
        // SAFETY: `ptr` came from cuMemAlloc in this context and is freed exactly once (it was
        // swapped to 0 above); all work that could use it has completed.
        check(unsafe { sys::cuMemFree_v2(ptr) }, "cuMemFree")
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        // An error here cannot be reported; `free_device` calls `release` itself to report it.
        let _ = self.release();
    }
}

/// Where a host range came from, which decides how it is released.
pub(super) enum HostOrigin {
    /// `cuMemHostAlloc` memory; released with `cuMemFreeHost`.
    Pinned,
    /// Caller memory pinned in place with `cuMemHostRegister`; released with
    /// `cuMemHostUnregister`. `keep` holds the mapping alive when we own a reference to it.
    Registered {
        /// Registered with `CU_MEMHOSTREGISTER_READ_ONLY`: the host must not write it either.
        read_only: bool,
        /// The mapping the range lies in, when the registration owns it.
        _keep: Option<Arc<Mmap>>,
    },
}

/// A page-locked host range known to the driver.
pub(super) struct HostAlloc {
    ctx: Arc<CudaContext>,
    /// First byte; null once released.
    ptr: *mut u8,
    /// Length in bytes.
    pub(super) len: usize,
    pub(super) origin: HostOrigin,
}

// SAFETY: the pointer is owned by this value (or, for registrations, kept valid by the owner's
// contract) and never aliased as a Rust reference; host accesses go through raw copies whose
// ordering against each other and against device copies is the caller's job, as the `Device`
// trait documents. Plain bytes have no invalid values, so a racing access cannot create one.
unsafe impl Send for HostAlloc {}
// SAFETY: see `Send` above.
unsafe impl Sync for HostAlloc {}

impl HostAlloc {
    /// Allocates `len` (non-zero) bytes of zeroed pinned host memory with the flags for `kind`.
    pub(super) fn pinned(ctx: &Arc<CudaContext>, len: usize, kind: HostMemKind) -> Result<Self> {
        let flags = match kind {
            // Write-combined: fastest for the DMA engine to read, very slow for the CPU to read.
            HostMemKind::Upload => {
                sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_WRITECOMBINED
            }
            HostMemKind::Readable => sys::CU_MEMHOSTALLOC_PORTABLE,
        };
        ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        let mut raw: *mut c_void = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; the context is current on this thread.
        check(
            unsafe { sys::cuMemHostAlloc(&mut raw, len, flags) },
            "cuMemHostAlloc",
        )?;
        let ptr = raw.cast::<u8>();
        // SAFETY: the driver just returned `len` writable bytes at `ptr`.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(HostAlloc {
            ctx: ctx.clone(),
            ptr,
            len,
            origin: HostOrigin::Pinned,
        })
    }

    /// Page-locks `len` bytes at `ptr` in place.
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay mapped until the returned value is released or dropped, and if
    /// `read_only` is false it must be writable.
    pub(super) unsafe fn register(
        ctx: &Arc<CudaContext>,
        ptr: *const u8,
        len: usize,
        read_only: bool,
        keep: Option<Arc<Mmap>>,
    ) -> Result<Self> {
        let mut flags = sys::CU_MEMHOSTREGISTER_PORTABLE;
        if read_only {
            flags |= sys::CU_MEMHOSTREGISTER_READ_ONLY;
        }
        ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: the caller guarantees the range is mapped; with READ_ONLY the driver only maps
        // it for device reads, so the `*const` to `*mut` cast is never written through.
        check(
            unsafe { sys::cuMemHostRegister_v2(ptr.cast_mut().cast(), len, flags) },
            "cuMemHostRegister",
        )?;
        Ok(HostAlloc {
            ctx: ctx.clone(),
            ptr: ptr.cast_mut(),
            len,
            origin: HostOrigin::Registered {
                read_only,
                _keep: keep,
            },
        })
    }

    /// Whether host writes are allowed.
    pub(super) fn writable(&self) -> bool {
        !matches!(
            self.origin,
            HostOrigin::Registered {
                read_only: true,
                ..
            }
        )
    }

    /// The first byte.
    pub(super) fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Waits for pending work, then frees or unregisters; idempotent.
    pub(super) fn release(&mut self) -> Result<()> {
        if self.ptr.is_null() {
            return Ok(());
        }
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        self.ctx.synchronize().call("cuCtxSynchronize")?;
        let ptr = std::mem::replace(&mut self.ptr, std::ptr::null_mut()).cast::<c_void>();
        match self.origin {
            // SAFETY: `ptr` came from cuMemHostAlloc and is freed once (nulled above); all
            // copies that could read or write it have completed.
            HostOrigin::Pinned => check(unsafe { sys::cuMemFreeHost(ptr) }, "cuMemFreeHost"),
            // SAFETY: `ptr` was registered by `register` and is unregistered once; all copies
            // that could read it have completed.
            HostOrigin::Registered { .. } => check(
                unsafe { sys::cuMemHostUnregister(ptr) },
                "cuMemHostUnregister",
            ),
        }
    }
}

impl Drop for HostAlloc {
    fn drop(&mut self) {
        // An error here cannot be reported; `free_host` calls `release` itself to report it.
        let _ = self.release();
    }
}
