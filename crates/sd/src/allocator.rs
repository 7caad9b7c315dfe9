//! The global allocator of Ferry's binaries and CPU benches: mimalloc, told to keep the memory
//! it frees.
//!
//! Every CPU op returns a fresh activation tensor. With the system allocator, large blocks are
//! returned to the OS when freed and page-faulted back in (and zeroed by the kernel) by the next
//! op: ~800k page faults (3.3 GB) per SD 1.5 UNet step. mimalloc keeps freed segments, and with
//! purging off ([`keep_freed_memory`]) a warm step page-faults almost nothing; the peak resident
//! set stays that of the largest set of live tensors.
//!
//! A library must not choose the process's allocator, so this module only offers it:
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: ferry_sd::allocator::MiMalloc = ferry_sd::allocator::MiMalloc;
//!
//! fn main() {
//!     ferry_sd::allocator::keep_freed_memory();
//! }
//! ```

pub use mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (the same index in its v2 and v3 headers).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Stops mimalloc from returning freed memory to the OS, so the next allocations reuse it
/// without page faults. Call it first thing in `main`; it has no effect under another allocator.
pub fn keep_freed_memory() {
    // SAFETY: `mi_option_set` stores an integer in mimalloc's option table (thread-safe, valid at
    // any time, whichever allocator is installed); -1 is the documented "never purge" value.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn purge_delay_option_is_set() {
        super::keep_freed_memory();
        // SAFETY: reads the integer option just stored.
        let v = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(v, -1);
    }
}
