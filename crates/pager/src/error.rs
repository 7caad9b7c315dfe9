//! The pager's error type.

use std::path::PathBuf;

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the device layer and the allocator can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CUDA driver library could not be loaded on this machine.
    #[error("no CUDA driver: the CUDA driver library (libcuda) is not installed on this machine")]
    NoDriver,
    /// The driver is present but reports no usable GPU.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A CUDA driver call failed.
    #[error("CUDA call {call} failed: {message}")]
    Cuda {
        /// The driver call.
        call: &'static str,
        /// The driver's error text.
        message: String,
    },
    /// A device (or arena) allocation did not fit.
    #[error(
        "out of device memory: asked for {asked} bytes, {free} bytes free, largest free extent {largest_free} bytes"
    )]
    OutOfMemory {
        /// Bytes requested.
        asked: u64,
        /// Bytes free in total.
        free: u64,
        /// Largest contiguous free extent.
        largest_free: u64,
    },
    /// A handle (pointer, stream, event, group) that the backend does not know.
    #[error("invalid handle: {0}")]
    InvalidHandle(String),
    /// An access outside an allocation.
    #[error("out of bounds: {0}")]
    OutOfBounds(String),
    /// The simulator's race checker found unordered conflicting accesses.
    #[error("data race: {0}")]
    Race(String),
    /// A group is pinned (in use) and cannot be evicted or freed.
    #[error("busy: {0}")]
    Busy(String),
    /// A weights file that is malformed or unsupported.
    #[error("{path}: {message}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What was expected and what was found.
        message: String,
    },
    /// An I/O error on a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A read from a file failed (the disk tier).
    #[error("{path}: read of {len} bytes at offset {offset} failed: {source}")]
    DiskRead {
        /// The file.
        path: PathBuf,
        /// Offset of the failed read.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A failure injected by the simulated device's fault plan
    /// ([`crate::device::sim::FaultPlan`]); the call had no effect.
    #[error("injected fault: {op} call #{index} failed on the simulated device")]
    Injected {
        /// The kind of call ([`crate::device::sim::FaultOp::name`]).
        op: &'static str,
        /// Its 0-based index among calls of that kind since the plan was set.
        index: u64,
    },
    /// A simulated kernel's body returned an error.
    #[error("kernel '{name}' failed")]
    Kernel {
        /// The kernel's name.
        name: String,
        /// What it reported.
        #[source]
        source: Box<Error>,
    },
    /// An asynchronous operation failed earlier; reported by the next synchronising call.
    #[error("an earlier asynchronous operation failed")]
    Deferred(#[source] Box<Error>),
    /// An argument that does not make sense (zero-sized budget, unknown tensor name, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}
