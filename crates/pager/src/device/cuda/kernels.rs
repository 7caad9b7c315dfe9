//! The device layer's own kernels: PTX generated from `kernels/*.cu` (see `kernels/README.md`),
//! embedded in the binary and loaded into the context on first use.

use super::result::Call;
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;
use std::sync::{Arc, Mutex, PoisonError};

/// PTX of `kernels/busy.cu` (NVRTC 12.4, compute_80).
pub(super) const BUSY_PTX: &str = include_str!("../../../../../kernels/ptx/busy.ptx");
/// The spin kernel's entry point in [`BUSY_PTX`].
pub(super) const BUSY_KERNEL: &str = "ferry_busy";

/// A kernel loaded on first use and kept for the context's lifetime.
pub(super) struct LazyKernel {
    ptx: &'static str,
    name: &'static str,
    loaded: Mutex<Option<CudaFunction>>,
}

impl LazyKernel {
    /// A kernel `name` from the PTX text `ptx`, not yet loaded.
    pub(super) const fn new(ptx: &'static str, name: &'static str) -> Self {
        LazyKernel {
            ptx,
            name,
            loaded: Mutex::new(None),
        }
    }

    /// The loaded function, loading the module into `ctx` the first time.
    pub(super) fn get(&self, ctx: &Arc<CudaContext>) -> Result<CudaFunction> {
        let mut slot = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = slot.as_ref() {
            return Ok(f.clone());
        }
        // cuModuleGetFunction below uses the calling thread's context.
        ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        let module = ctx.load_module(Ptx::from_src(self.ptx)).map_err(|e| {
            let why = super::launch::jit_error_log(self.ptx)
                .map(|w| format!("; JIT log: {w}"))
                .unwrap_or_default();
            let cc = ctx
                .compute_capability()
                .map(|(major, minor)| format!("sm_{major}{minor}"))
                .unwrap_or_else(|_| "unknown".into());
            match super::result::driver_error("cuModuleLoadData", e) {
                Error::Cuda { call, message } => Error::Cuda {
                    call,
                    message: format!(
                        "{message} (loading the PTX of kernel {}: PTX 8.4 for compute_80 needs \
                         driver R550+ and a GPU of sm_80 or newer; this GPU is {cc}{why})",
                        self.name
                    ),
                },
                other => other,
            }
        })?;
        let f = module
            .load_function(self.name)
            .call("cuModuleGetFunction")?;
        *slot = Some(f.clone());
        Ok(f)
    }
}

impl std::fmt::Debug for LazyKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loaded = self.loaded.lock().map(|s| s.is_some()).unwrap_or_default();
        f.debug_struct("LazyKernel")
            .field("name", &self.name)
            .field("loaded", &loaded)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_ptx_is_embedded_and_names_the_kernel() {
        assert!(BUSY_PTX.contains(".version 8.4"), "expected PTX ISA 8.4");
        assert!(BUSY_PTX.contains(".target sm_80"), "expected target sm_80");
        assert!(
            BUSY_PTX.contains(&format!(".visible .entry {BUSY_KERNEL}(")),
            "entry {BUSY_KERNEL} missing from busy.ptx"
        );
        assert!(
            BUSY_PTX.contains("%globaltimer"),
            "spin loop must read %globaltimer"
        );
        assert!(
            !BUSY_PTX.contains('\0'),
            "PTX must not contain NUL (CString)"
        );
    }
}
