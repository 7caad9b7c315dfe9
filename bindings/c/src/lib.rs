//! Ferry's C ABI: an engine written in C or C++ hands Ferry its weights (safetensors files or its
//! own host buffers), its weight groups and their order, and a device memory budget, and gets
//! planned, overlapped, budgeted paging: `ferry_acquire` before a layer, `ferry_release` after.
//!
//! Rules for callers (the header repeats them):
//! - Every call returns a [`FerryStatus`]; on failure `ferry_last_error()` gives a message for
//!   this thread. No panic crosses the boundary.
//! - Handles are opaque tokens, not addresses. Each is freed exactly once with its `_free`
//!   function; a freed or unknown handle is refused with `FERRY_STATUS_INVALID_HANDLE`.
//!   Handles may be freed in any order: a scheduler keeps its model's host memory and its
//!   device alive until it is freed itself.
//! - Pointer arguments must be valid for the lengths given; strings are NUL-terminated UTF-8;
//!   a null required pointer is `FERRY_STATUS_NULL_POINTER`, invalid UTF-8 is
//!   `FERRY_STATUS_INVALID_UTF8`.
//! - Text outputs are copied into caller buffers (`buf`, `cap`, `len`): the length without the
//!   NUL is always written to `len`; `buf == NULL, cap == 0` asks for the length only.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
// The entry points' safety contract is the crate-level one above, repeated in the header.
#![allow(clippy::missing_safety_doc)]

mod api;
mod error;
mod handles;

pub use api::*;
pub use error::FerryStatus;

/// Live handles of each kind (devices, models, schedulers); a test hook for leak checks.
pub fn live_handles() -> [usize; 3] {
    handles::live_counts()
}
