//! Launching kernels of other crates: PTX modules loaded by name on first use and cached per
//! context, and raw argument lists checked against the kernel's PTX parameter list.

use super::result::Call;
use crate::device::DevicePtr;
use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, PoisonError};

/// One argument of [`CudaDevice::launch`](super::CudaDevice::launch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelArg {
    /// A device buffer `ptr..ptr + bytes`, passed as a 64-bit pointer; the range must lie in one
    /// live allocation of the device (checked before launching).
    Buf {
        /// First byte.
        ptr: DevicePtr,
        /// Bytes the kernel may touch from `ptr`.
        bytes: u64,
    },
    /// A null pointer (an absent optional operand).
    Null,
    /// A 32-bit unsigned integer.
    U32(u32),
    /// A 32-bit signed integer.
    I32(i32),
    /// A 64-bit unsigned integer.
    U64(u64),
    /// A 32-bit float.
    F32(f32),
}

impl KernelArg {
    /// Whether this argument fits a PTX parameter of `kind`.
    fn fits(&self, kind: &ParamKind) -> bool {
        matches!(
            (self, kind),
            (
                KernelArg::Buf { .. } | KernelArg::Null | KernelArg::U64(_),
                ParamKind::B64
            ) | (KernelArg::U32(_) | KernelArg::I32(_), ParamKind::B32)
                | (KernelArg::F32(_), ParamKind::F32)
        )
    }

    /// The value as the little-endian bytes of an 8-byte slot (what `cuLaunchKernel` reads).
    pub(super) fn slot(&self) -> u64 {
        match *self {
            KernelArg::Buf { ptr, .. } => ptr.0,
            KernelArg::Null => 0,
            KernelArg::U32(v) => u64::from(v),
            KernelArg::I32(v) => u64::from(v as u32),
            KernelArg::U64(v) => v,
            KernelArg::F32(v) => u64::from(v.to_bits()),
        }
    }
}

/// Grid, block and dynamic shared memory of a kernel launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDims {
    /// Blocks in x, y, z.
    pub grid: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, in bytes.
    pub shared_mem: u32,
}

/// Shared memory (static plus dynamic) every kernel may use per block without opting in.
pub const DEFAULT_SHARED_LIMIT: u32 = 48 * 1024;

/// Whether a launch with `dynamic` bytes of dynamic shared memory, of a kernel with
/// `static_bytes` of static shared memory, must first raise the kernel's
/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`: when the two together exceed
/// [`DEFAULT_SHARED_LIMIT`] (the default dynamic limit is 48 KiB minus the static size).
pub fn needs_shared_opt_in(static_bytes: u32, dynamic: u32) -> bool {
    dynamic > 0 && u64::from(static_bytes) + u64::from(dynamic) > u64::from(DEFAULT_SHARED_LIMIT)
}

/// Largest grid the driver accepts in x, y and z (compute capability 3.0 and newer).
pub const MAX_GRID: (u32, u32, u32) = (i32::MAX as u32, 65535, 65535);
/// Most threads per block on every GPU Ferry supports (sm_80+).
pub const MAX_BLOCK_THREADS: u32 = 1024;

impl LaunchDims {
    /// A 1-d launch of `blocks` blocks of `threads` threads, no dynamic shared memory.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        LaunchDims {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_mem: 0,
        }
    }

    /// Checks the launch against the hardware limits `cuLaunchKernel` enforces: no empty grid or
    /// block, grid within [`MAX_GRID`], at most [`MAX_BLOCK_THREADS`] threads per block.
    pub fn check(&self, func: &str) -> Result<()> {
        let (g, b) = (self.grid, self.block);
        if g.0 == 0 || g.1 == 0 || g.2 == 0 || b.0 == 0 || b.1 == 0 || b.2 == 0 {
            return Err(Error::InvalidArgument(format!(
                "kernel {func}: empty launch (grid {g:?}, block {b:?})"
            )));
        }
        if g.0 > MAX_GRID.0 || g.1 > MAX_GRID.1 || g.2 > MAX_GRID.2 {
            return Err(Error::InvalidArgument(format!(
                "kernel {func}: grid {g:?} exceeds the limit {MAX_GRID:?}"
            )));
        }
        let threads = u64::from(b.0) * u64::from(b.1) * u64::from(b.2);
        if threads > u64::from(MAX_BLOCK_THREADS) {
            return Err(Error::InvalidArgument(format!(
                "kernel {func}: block {b:?} has {threads} threads, more than {MAX_BLOCK_THREADS}"
            )));
        }
        Ok(())
    }
}

/// The type class of a kernel parameter, as declared in PTX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamKind {
    /// `.u64`, `.s64` or `.b64` (pointers and 64-bit integers).
    B64,
    /// `.u32`, `.s32` or `.b32`.
    B32,
    /// `.f32`.
    F32,
    /// Anything else (by-value structs, 8/16-bit types): not launchable through [`KernelArg`].
    Other(String),
}

/// The parameter list of the `.entry name(...)` in `ptx`, or `None` if there is no such entry.
pub fn ptx_entry_params(ptx: &str, name: &str) -> Option<Vec<ParamKind>> {
    let head = format!(".entry {name}(");
    let start = ptx.find(&head)? + head.len();
    let end = start + ptx[start..].find(')')?;
    let list = ptx[start..end].trim();
    if list.is_empty() {
        return Some(Vec::new());
    }
    Some(
        list.split(',')
            .map(|p| {
                let ty = p
                    .split_whitespace()
                    .find(|w| w.starts_with('.') && *w != ".param")
                    .unwrap_or("");
                match ty {
                    ".u64" | ".s64" | ".b64" => ParamKind::B64,
                    ".u32" | ".s32" | ".b32" => ParamKind::B32,
                    ".f32" => ParamKind::F32,
                    other => ParamKind::Other(other.to_string()),
                }
            })
            .collect(),
    )
}

/// Checks `args` against the PTX parameter list of kernel `func` in `ptx` (count and type
/// class), as [`CudaDevice::launch`](super::CudaDevice::launch) does before launching.
pub fn check_launch_args(ptx: &str, func: &str, args: &[KernelArg]) -> Result<()> {
    let params = ptx_entry_params(ptx, func)
        .ok_or_else(|| Error::InvalidArgument(format!("the PTX has no kernel named {func}")))?;
    check_args(func, &params, args)
}

/// Checks `args` against the parameters of kernel `func`.
pub(super) fn check_args(func: &str, params: &[ParamKind], args: &[KernelArg]) -> Result<()> {
    if params.len() != args.len() {
        return Err(Error::InvalidArgument(format!(
            "kernel {func} takes {} parameters ({params:?}), given {} arguments",
            params.len(),
            args.len()
        )));
    }
    for (i, (p, a)) in params.iter().zip(args).enumerate() {
        if !a.fits(p) {
            return Err(Error::InvalidArgument(format!(
                "kernel {func} parameter {i} is {p:?}, given {a:?}"
            )));
        }
    }
    Ok(())
}

/// A loaded kernel and its PTX parameter list.
type Loaded = (CudaFunction, Arc<[ParamKind]>);

/// Modules loaded by name and their functions, kept for the context's lifetime.
#[derive(Default)]
pub(super) struct ModuleCache {
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), Loaded>>,
}

impl ModuleCache {
    /// Function `func` of module `module` (PTX text `ptx`), loading the module the first time.
    pub(super) fn function(
        &self,
        ctx: &Arc<CudaContext>,
        module: &'static str,
        ptx: &'static str,
        func: &'static str,
    ) -> Result<Loaded> {
        // cuModuleGetFunction uses the calling thread's context, which a module loaded by
        // another thread has not bound here.
        ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        let mut functions = self
            .functions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = functions.get(&(module, func)) {
            return Ok(found.clone());
        }
        let params: Arc<[ParamKind]> = ptx_entry_params(ptx, func)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("module {module} has no kernel named {func}"))
            })?
            .into();
        let m = {
            let mut modules = self.modules.lock().unwrap_or_else(PoisonError::into_inner);
            match modules.get(module) {
                Some(m) => m.clone(),
                None => {
                    let m = ctx.load_module(Ptx::from_src(ptx)).map_err(|e| {
                        let why = jit_error_log(ptx);
                        match super::result::driver_error("cuModuleLoadData", e) {
                            Error::Cuda { call, message } => Error::Cuda {
                                call,
                                message: format!(
                                    "{message} (loading PTX module {module}){}",
                                    why.map(|w| format!(": {w}")).unwrap_or_default()
                                ),
                            },
                            other => other,
                        }
                    })?;
                    modules.insert(module, m.clone());
                    m
                }
            }
        };
        let f = m.load_function(func).call("cuModuleGetFunction")?;
        functions.insert((module, func), (f.clone(), params.clone()));
        Ok((f, params))
    }

    /// Number of modules loaded.
    pub(super) fn loaded(&self) -> usize {
        self.modules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// The JIT compiler's error log for `ptx`, from loading it again with an error-log buffer
/// (after a failed `cuModuleLoadData`, which says only that the PTX was invalid); `None` if the
/// log is empty or the load now succeeds. The calling thread must have the context bound.
pub(super) fn jit_error_log(ptx: &str) -> Option<String> {
    const LOG: usize = 8192;
    let src = std::ffi::CString::new(ptx).ok()?;
    let mut log = vec![0u8; LOG];
    let mut options = [
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
    ];
    // The size option's value is passed in the pointer slot itself, as the driver API defines.
    let mut values = [log.as_mut_ptr().cast::<c_void>(), LOG as *mut c_void];
    let mut module: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: `src` is a NUL-terminated PTX image; `options` and `values` have two entries each,
    // the log buffer has the declared size and outlives the call.
    let status = unsafe {
        sys::cuModuleLoadDataEx(
            &mut module,
            src.as_ptr().cast(),
            options.len() as u32,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    if status == sys::CUresult::CUDA_SUCCESS {
        // SAFETY: the module was just loaded and nothing else holds it.
        let _ = unsafe { sys::cuModuleUnload(module) };
        return None;
    }
    jit_log_text(&log)
}

/// The text of a NUL-terminated JIT log buffer, lines joined with "; " (errors are one line).
fn jit_log_text(buf: &[u8]) -> Option<String> {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let text = String::from_utf8_lossy(&buf[..end]);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    (!lines.is_empty()).then(|| lines.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTX: &str = "
.visible .entry k_none()
{ ret; }
.visible .entry k_mix(
\t.param .u64 k_mix_param_0,
\t.param .u32 k_mix_param_1,
\t.param .f32 k_mix_param_2,
\t.param .align 4 .b8 k_mix_param_3[12]
)
{ ret; }
";

    #[test]
    fn entry_params_are_parsed_by_type_class() {
        assert_eq!(ptx_entry_params(PTX, "k_none"), Some(vec![]));
        assert_eq!(
            ptx_entry_params(PTX, "k_mix"),
            Some(vec![
                ParamKind::B64,
                ParamKind::B32,
                ParamKind::F32,
                ParamKind::Other(".align".into())
            ])
        );
        assert_eq!(ptx_entry_params(PTX, "k_mi"), None);
        assert_eq!(ptx_entry_params(PTX, "missing"), None);
    }

    #[test]
    fn args_are_checked_in_count_and_type() {
        let params = [ParamKind::B64, ParamKind::B32, ParamKind::F32];
        let ok = [KernelArg::Null, KernelArg::U32(3), KernelArg::F32(1.0)];
        assert!(check_args("k", &params, &ok).is_ok());
        let err = check_args("k", &params, &ok[..2]).unwrap_err().to_string();
        assert!(err.contains("takes 3 parameters"), "{err}");
        let swapped = [KernelArg::Null, KernelArg::F32(1.0), KernelArg::U32(3)];
        let err = check_args("k", &params, &swapped).unwrap_err().to_string();
        assert!(err.contains("parameter 1"), "{err}");
        assert_eq!(KernelArg::F32(1.0).slot(), 0x3f80_0000);
        assert_eq!(KernelArg::I32(-1).slot(), 0xffff_ffff);
    }

    #[test]
    fn dynamic_shared_memory_opts_in_when_static_plus_dynamic_exceeds_48_kib() {
        // linear_big has 40 KiB static: 8 KiB of dynamic fit, 9 KiB do not.
        assert!(!needs_shared_opt_in(40 * 1024, 8 * 1024));
        assert!(needs_shared_opt_in(40 * 1024, 9 * 1024));
        assert!(!needs_shared_opt_in(0, 48 * 1024));
        assert!(needs_shared_opt_in(0, 48 * 1024 + 1));
        assert!(
            needs_shared_opt_in(44544, 8192),
            "attention d160 has 43.5 KiB static"
        );
        assert!(!needs_shared_opt_in(64 * 1024, 0), "nothing to opt in");
        assert!(needs_shared_opt_in(u32::MAX, u32::MAX));
    }

    #[test]
    fn jit_logs_become_one_line() {
        let log = b"ptxas application ptx input, line 9; error   : Unknown symbol 'x'\nptxas fatal   : Ptx assembly aborted due to errors\n\0garbage";
        assert_eq!(
            jit_log_text(log).as_deref(),
            Some("ptxas application ptx input, line 9; error   : Unknown symbol 'x'; ptxas fatal   : Ptx assembly aborted due to errors")
        );
        assert_eq!(jit_log_text(&[0u8; 16]), None);
    }

    #[test]
    fn launch_dims_are_checked_against_hardware_limits() {
        let ok = |grid, block| LaunchDims {
            grid,
            block,
            shared_mem: 0,
        };
        assert!(ok((i32::MAX as u32, 65535, 65535), (1024, 1, 1))
            .check("k")
            .is_ok());
        for (grid, block) in [
            ((0, 1, 1), (1, 1, 1)),
            ((1, 1, 1), (1, 0, 1)),
            ((1 << 31, 1, 1), (1, 1, 1)),
            ((1, 65536, 1), (1, 1, 1)),
            ((1, 1, 65536), (1, 1, 1)),
            ((1, 1, 1), (32, 33, 1)),
        ] {
            assert!(ok(grid, block).check("k").is_err(), "{grid:?} {block:?}");
        }
    }
}
