//! The device tier: one device allocation per budget, made once, sub-allocated into aligned
//! contiguous extents with best-fit and coalescing of free neighbours.

use crate::device::{Device, DevicePtr, DeviceRange};
use crate::error::{Error, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Alignment of every extent (and of every tensor inside a group), in bytes.
pub const ALIGN: u64 = 256;

/// Rounds `x` up to a multiple of [`ALIGN`].
pub fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// A sub-allocation: `len` bytes at `offset` from the arena's base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Extent {
    /// Offset from the arena base (a multiple of [`ALIGN`]).
    pub offset: u64,
    /// Length in bytes (a multiple of [`ALIGN`]).
    pub len: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
    /// Whether the two extents share a byte.
    pub fn overlaps(&self, other: &Extent) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }
}

/// Best-fit allocator of aligned extents in `[0, capacity)`; pure bookkeeping, no device calls.
///
/// Free space is kept twice — by offset (to coalesce neighbours on free) and by (length, offset)
/// (to find the smallest hole that fits in O(log n)).
#[derive(Clone, Debug)]
pub struct ExtentAllocator {
    capacity: u64,
    free_by_offset: BTreeMap<u64, u64>,
    free_by_size: BTreeSet<(u64, u64)>,
    live: BTreeMap<u64, u64>,
    used: u64,
    peak: u64,
}

impl ExtentAllocator {
    /// An allocator over `capacity` bytes (rounded down to [`ALIGN`]), all free.
    pub fn new(capacity: u64) -> Self {
        let capacity = capacity / ALIGN * ALIGN;
        let mut a = ExtentAllocator {
            capacity,
            free_by_offset: BTreeMap::new(),
            free_by_size: BTreeSet::new(),
            live: BTreeMap::new(),
            used: 0,
            peak: 0,
        };
        if capacity > 0 {
            a.insert_free(0, capacity);
        }
        a
    }

    /// Usable bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
    /// Bytes in live extents.
    pub fn used(&self) -> u64 {
        self.used
    }
    /// Bytes not in live extents.
    pub fn free(&self) -> u64 {
        self.capacity - self.used
    }
    /// The most bytes ever live at once.
    pub fn peak(&self) -> u64 {
        self.peak
    }
    /// Length of the largest free extent.
    pub fn largest_free(&self) -> u64 {
        self.free_by_size.last().map_or(0, |&(len, _)| len)
    }
    /// Number of free holes (a fragmentation measure).
    pub fn free_holes(&self) -> usize {
        self.free_by_offset.len()
    }
    /// Live extents in offset order.
    pub fn live(&self) -> impl Iterator<Item = Extent> + '_ {
        self.live
            .iter()
            .map(|(&offset, &len)| Extent { offset, len })
    }
    /// Free holes in offset order.
    pub fn holes(&self) -> impl Iterator<Item = Extent> + '_ {
        self.free_by_offset
            .iter()
            .map(|(&offset, &len)| Extent { offset, len })
    }

    fn insert_free(&mut self, offset: u64, len: u64) {
        self.free_by_offset.insert(offset, len);
        self.free_by_size.insert((len, offset));
    }

    fn remove_free(&mut self, offset: u64, len: u64) {
        self.free_by_offset.remove(&offset);
        self.free_by_size.remove(&(len, offset));
    }

    /// The out-of-memory error for a request of `bytes`, with the current numbers.
    pub fn oom(&self, bytes: u64) -> Error {
        Error::OutOfMemory {
            asked: bytes,
            free: self.free(),
            largest_free: self.largest_free(),
        }
    }

    /// Allocates `bytes` (rounded up to [`ALIGN`]; zero counts as one unit) from the smallest
    /// free hole that fits.
    pub fn alloc(&mut self, bytes: u64) -> Result<Extent> {
        let len = align_up(bytes.max(1));
        let Some(&(hole_len, offset)) = self.free_by_size.range((len, 0)..).next() else {
            return Err(self.oom(len));
        };
        self.remove_free(offset, hole_len);
        if hole_len > len {
            self.insert_free(offset + len, hole_len - len);
        }
        self.live.insert(offset, len);
        self.used += len;
        self.peak = self.peak.max(self.used);
        Ok(Extent { offset, len })
    }

    /// Returns a live extent, merging it with free neighbours.
    pub fn free_extent(&mut self, e: Extent) -> Result<()> {
        match self.live.get(&e.offset) {
            Some(&len) if len == e.len => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "free of [{}, {}): not a live extent",
                    e.offset,
                    e.end()
                )))
            }
        }
        self.live.remove(&e.offset);
        self.used -= e.len;
        let (mut start, mut len) = (e.offset, e.len);
        if let Some((&p, &plen)) = self.free_by_offset.range(..start).next_back() {
            if p + plen == start {
                self.remove_free(p, plen);
                start = p;
                len += plen;
            }
        }
        if let Some(&nlen) = self.free_by_offset.get(&(e.end())) {
            self.remove_free(e.end(), nlen);
            len += nlen;
        }
        self.insert_free(start, len);
        Ok(())
    }

    /// The largest hole there would be if the live extents in `extra` were freed too
    /// (used to decide whether evicting can ever make room, without evicting).
    pub fn largest_free_with(&self, extra: &[Extent]) -> u64 {
        let mut spans: Vec<(u64, u64)> = self
            .free_by_offset
            .iter()
            .map(|(&o, &l)| (o, o + l))
            .chain(extra.iter().map(|e| (e.offset, e.end())))
            .collect();
        spans.sort_unstable();
        let mut best = 0;
        let mut cur: Option<(u64, u64)> = None;
        for (s, e) in spans {
            cur = match cur {
                Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
                Some((cs, ce)) => {
                    best = best.max(ce - cs);
                    Some((s, e))
                }
                None => Some((s, e)),
            };
        }
        if let Some((cs, ce)) = cur {
            best = best.max(ce - cs);
        }
        best
    }
}

/// A device memory budget: one `alloc_device` at creation, freed on drop, carved into extents.
#[derive(Debug)]
pub struct Arena {
    dev: Arc<dyn Device>,
    alloc_ptr: DevicePtr,
    base: DevicePtr,
    extents: ExtentAllocator,
}

impl Arena {
    /// Allocates `budget` bytes of device memory, the arena's only device allocation.
    pub fn new(dev: Arc<dyn Device>, budget: u64) -> Result<Arena> {
        if budget < ALIGN {
            return Err(Error::InvalidArgument(format!(
                "arena budget must be at least {ALIGN} bytes, got {budget}"
            )));
        }
        let alloc_ptr = dev.alloc_device(budget)?;
        // Align the usable base in case a backend hands out less-aligned memory.
        let pad = align_up(alloc_ptr.0) - alloc_ptr.0;
        Ok(Arena {
            dev,
            alloc_ptr,
            base: alloc_ptr.offset(pad),
            extents: ExtentAllocator::new(budget - pad),
        })
    }

    /// The device address of offset 0.
    pub fn base(&self) -> DevicePtr {
        self.base
    }
    /// Device range of an extent.
    pub fn range(&self, e: Extent) -> DeviceRange {
        DeviceRange::new(self.base.offset(e.offset), e.len)
    }
    /// The bookkeeping (free bytes, largest hole, peak).
    pub fn extents(&self) -> &ExtentAllocator {
        &self.extents
    }
    /// Allocates an extent of at least `bytes`; no device call.
    pub fn alloc(&mut self, bytes: u64) -> Result<Extent> {
        self.extents.alloc(bytes)
    }
    /// Frees an extent; no device call. The caller orders reuse with events.
    pub fn free(&mut self, e: Extent) -> Result<()> {
        self.extents.free_extent(e)
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // Errors cannot be returned from drop; the backend waits for pending work first.
        let _ = self.dev.free_device(self.alloc_ptr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_and_coalescing() {
        let mut a = ExtentAllocator::new(10 * ALIGN);
        let x = a.alloc(1).unwrap();
        let y = a.alloc(3 * ALIGN).unwrap();
        let z = a.alloc(2 * ALIGN).unwrap();
        assert_eq!((x.offset, y.offset, z.offset), (0, ALIGN, 4 * ALIGN));
        assert_eq!(a.free(), 4 * ALIGN);
        a.free_extent(x).unwrap();
        // Holes: [0,1) and [6,10); a 1-unit request takes the small hole (best fit).
        let w = a.alloc(ALIGN).unwrap();
        assert_eq!(w.offset, 0);
        a.free_extent(w).unwrap();
        a.free_extent(z).unwrap();
        assert_eq!(a.largest_free(), 6 * ALIGN);
        a.free_extent(y).unwrap();
        assert_eq!(a.free_holes(), 1);
        assert_eq!(a.largest_free(), 10 * ALIGN);
        assert_eq!(a.peak(), 6 * ALIGN);
    }

    #[test]
    fn oom_reports_numbers_and_double_free_is_an_error() {
        let mut a = ExtentAllocator::new(4 * ALIGN);
        let x = a.alloc(ALIGN).unwrap();
        let _y = a.alloc(ALIGN).unwrap();
        a.free_extent(x).unwrap();
        match a.alloc(3 * ALIGN) {
            Err(Error::OutOfMemory {
                asked,
                free,
                largest_free,
            }) => assert_eq!(
                (asked, free, largest_free),
                (3 * ALIGN, 3 * ALIGN, 2 * ALIGN)
            ),
            other => panic!("expected OutOfMemory, got {other:?}"),
        }
        assert!(a.free_extent(x).is_err());
        assert_eq!(
            a.largest_free_with(&[Extent {
                offset: ALIGN,
                len: ALIGN
            }]),
            4 * ALIGN
        );
    }
}
