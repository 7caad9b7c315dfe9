//! The activation arena: a stack allocator over a device range the caller owns (the scheduler's
//! `workspace()`, carved out of the same budget as the weights).
//!
//! Why a stack: a forward pass allocates in a nested, last-in-first-out pattern — a layer's
//! temporaries die when the layer ends, and the UNet's skip connections are pushed by the down
//! blocks and consumed in reverse order by the up blocks. A bump pointer with marks serves that
//! with O(1) allocation, no fragmentation and no driver calls; a peak is simply the highest top.
//! The one case a plain stack cannot serve — a layer's output allocated *after* its temporaries
//! — is handled by [`super::CudaBackend`]'s `keep`, which moves the output down to the mark.
//!
//! Reuse is safe without events because every kernel and copy that touches the arena is issued
//! on the backend's one stream: work that writes a reused range is stream-ordered after the
//! work that read its old contents.

use ferry_pager::{DevicePtr, DeviceRange};
use std::cell::Cell;

/// Alignment of every arena allocation, in bytes (the arena's and the tensor-core kernels'
/// 16-byte needs are both covered; matches the pager's extent alignment).
pub const ARENA_ALIGN: u64 = 256;

/// What the activation arena can report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArenaError {
    /// The reserve is too small for this allocation.
    #[error(
        "activation arena out of memory: asked for {asked} bytes, {free} of {capacity} bytes \
         free (peak use so far {peak}); raise the engine reserve (ExecConfig::reserve)"
    )]
    OutOfMemory {
        /// Bytes requested (after rounding up to [`ARENA_ALIGN`]).
        asked: u64,
        /// Bytes free above the current top.
        free: u64,
        /// Usable bytes of the arena.
        capacity: u64,
        /// Highest top reached so far.
        peak: u64,
    },
    /// A mark or range that does not belong to the arena's live part.
    #[error("activation arena: {0}")]
    Invalid(String),
}

/// A saved top of the arena's stack ([`ActivationArena::mark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArenaMark(u64);

impl ArenaMark {
    /// Bytes used when the mark was taken.
    pub fn offset(self) -> u64 {
        self.0
    }
}

/// A stack allocator over a caller-owned device range; never calls the driver.
#[derive(Debug)]
pub struct ActivationArena {
    /// First usable byte (the range start rounded up to [`ARENA_ALIGN`]).
    base: u64,
    capacity: u64,
    top: Cell<u64>,
    peak: Cell<u64>,
}

fn align_up(v: u64) -> Option<u64> {
    v.checked_add(ARENA_ALIGN - 1)
        .map(|x| x & !(ARENA_ALIGN - 1))
}

impl ActivationArena {
    /// An empty arena over `range`; an unaligned start is rounded up (losing < 256 bytes).
    pub fn new(range: DeviceRange) -> Result<Self, ArenaError> {
        let base = align_up(range.ptr.0)
            .filter(|_| range.ptr.0.checked_add(range.len).is_some())
            .ok_or_else(|| {
                ArenaError::Invalid(format!(
                    "range of {} bytes at {} overflows the address space",
                    range.len, range.ptr
                ))
            })?;
        let capacity = range.end().saturating_sub(base);
        Ok(ActivationArena {
            base,
            capacity,
            top: Cell::new(0),
            peak: Cell::new(0),
        })
    }

    /// Allocates `bytes` (rounded up to [`ARENA_ALIGN`]) at the top of the stack; zero bytes
    /// gives an empty range at the top.
    pub fn alloc(&self, bytes: u64) -> Result<DeviceRange, ArenaError> {
        let top = self.top.get();
        let free = self.capacity - top;
        let asked = align_up(bytes).unwrap_or(u64::MAX);
        if asked > free {
            return Err(ArenaError::OutOfMemory {
                asked,
                free,
                capacity: self.capacity,
                peak: self.peak.get(),
            });
        }
        self.top.set(top + asked);
        self.peak.set(self.peak.get().max(top + asked));
        Ok(DeviceRange::new(DevicePtr(self.base + top), bytes))
    }

    /// The current top, to return to with [`ActivationArena::release`].
    pub fn mark(&self) -> ArenaMark {
        ArenaMark(self.top.get())
    }

    /// Frees everything allocated since `mark`. A mark above the top (its space was already
    /// released) is an error: releases must nest.
    pub fn release(&self, mark: ArenaMark) -> Result<(), ArenaError> {
        let top = self.top.get();
        if mark.0 > top {
            return Err(ArenaError::Invalid(format!(
                "release to mark {} above the top {top} (marks must be released innermost first)",
                mark.0
            )));
        }
        self.top.set(mark.0);
        Ok(())
    }

    /// Frees everything (between passes); the peak is kept.
    pub fn reset(&self) {
        self.top.set(0);
    }

    /// Forgets the peak (to measure the next pass alone).
    pub fn reset_peak(&self) {
        self.peak.set(self.top.get());
    }

    /// Bytes in use (including alignment padding).
    pub fn used(&self) -> u64 {
        self.top.get()
    }

    /// Bytes free above the top.
    pub fn free(&self) -> u64 {
        self.capacity - self.top.get()
    }

    /// Usable bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The highest [`ActivationArena::used`] reached.
    pub fn peak(&self) -> u64 {
        self.peak.get()
    }

    /// The device address of a mark (where the next allocation would start).
    pub fn addr(&self, mark: ArenaMark) -> DevicePtr {
        DevicePtr(self.base + mark.0)
    }

    /// Whether `range` lies in the allocated (live) part of the arena.
    pub fn is_live(&self, range: DeviceRange) -> bool {
        range.ptr.0 >= self.base && range.end() <= self.base + self.top.get()
    }

    /// One past the arena's last usable byte.
    pub fn end(&self) -> DevicePtr {
        DevicePtr(self.base + self.capacity)
    }

    /// Whether `ptr` lies anywhere in the arena (live or not).
    pub fn contains(&self, ptr: DevicePtr) -> bool {
        ptr.0 >= self.base && ptr.0 < self.base + self.capacity
    }
}
