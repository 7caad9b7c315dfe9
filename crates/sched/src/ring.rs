//! The staging ring: streamed units are placed one after another in a fixed region and reclaimed
//! oldest first, once the engine has released them. Pure bookkeeping, shared by the executor (whose
//! tokens are device events) and the predictor (whose tokens are virtual times), so that both follow
//! exactly the same schedule.

use std::collections::VecDeque;

/// The state of one placed unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    /// Copied (or being copied) and not in use.
    Loaded,
    /// In use by the engine this many times.
    Pinned(u32),
    /// Released by the engine; its space may be reused after the release token.
    Released,
}

/// One unit placed in the ring.
#[derive(Clone, Debug)]
pub struct Entry<T> {
    /// Which unit.
    pub unit: usize,
    /// Offset inside the ring region.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Loaded, pinned or released.
    pub state: EntryState,
    /// Completion token of the copy (set once the copy is issued).
    pub ready: Option<T>,
    /// Token after which the space may be reused (set on release).
    pub released: Option<T>,
}

/// What happened to make room for an allocation.
#[derive(Debug)]
pub struct Placement<T> {
    /// Offset of the new unit inside the ring region.
    pub offset: u64,
    /// Release tokens of the entries whose space the new unit takes: its copy must wait on them.
    pub wait_for: Vec<T>,
    /// Ready tokens of evicted entries (their events can be recycled).
    pub evicted_ready: Vec<T>,
}

/// A FIFO ring allocator over `[0, capacity)`.
#[derive(Clone, Debug)]
pub struct Ring<T> {
    capacity: u64,
    entries: VecDeque<Entry<T>>,
}

impl<T: Clone> Ring<T> {
    /// An empty ring of `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Ring {
            capacity,
            entries: VecDeque::new(),
        }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = &Entry<T>> {
        self.entries.iter()
    }

    /// Index of the newest entry holding `unit`.
    pub fn find(&self, unit: usize) -> Option<usize> {
        self.entries.iter().rposition(|e| e.unit == unit)
    }

    /// The entry at `idx`.
    pub fn get(&self, idx: usize) -> Option<&Entry<T>> {
        self.entries.get(idx)
    }

    /// The entry at `idx`, mutably.
    pub fn get_mut(&mut self, idx: usize) -> Option<&mut Entry<T>> {
        self.entries.get_mut(idx)
    }

    /// Bytes between the oldest entry's start and the newest entry's end (what is in use).
    fn tail(&self) -> u64 {
        self.entries.back().map_or(0, |e| e.offset + e.len)
    }

    /// Where `len` bytes would go once the `skip` oldest entries are gone, if they fit.
    fn free_slot(&self, skip: usize, len: u64) -> Option<u64> {
        let Some(front) = self.entries.get(skip) else {
            return (len <= self.capacity).then_some(0);
        };
        let (head, tail) = (front.offset, self.tail());
        if tail > head {
            // Not wrapped: free space is [tail, capacity) then [0, head).
            if tail + len <= self.capacity {
                return Some(tail);
            }
            (len <= head).then_some(0)
        } else {
            // Wrapped: free space is [tail, head).
            (tail + len <= head).then_some(tail)
        }
    }

    /// How many oldest entries must go, and where `len` bytes then land; `None` if a pinned (or,
    /// without `force`, a loaded but unused) entry is in the way.
    fn plan_alloc(&self, len: u64, force: bool) -> Option<(usize, u64)> {
        if len > self.capacity {
            return None;
        }
        let mut skip = 0;
        loop {
            if let Some(offset) = self.free_slot(skip, len) {
                return Some((skip, offset));
            }
            let evictable = match self.entries.get(skip)?.state {
                EntryState::Released => true,
                EntryState::Loaded => force,
                EntryState::Pinned(_) => false,
            };
            if !evictable {
                return None;
            }
            skip += 1;
        }
    }

    /// Places `len` bytes for `unit`, evicting the oldest released entries as needed (and, with
    /// `force`, loaded-but-unused ones too). `None`, with nothing changed, if a pinned or (without
    /// `force`) not yet used entry is in the way.
    pub fn alloc(&mut self, unit: usize, len: u64, force: bool) -> Option<Placement<T>> {
        let (skip, offset) = self.plan_alloc(len, force)?;
        let mut wait_for = Vec::new();
        let mut evicted_ready = Vec::new();
        for e in self.entries.drain(..skip) {
            wait_for.extend(e.released);
            evicted_ready.extend(e.ready);
        }
        self.entries.push_back(Entry {
            unit,
            offset,
            len,
            state: EntryState::Loaded,
            ready: None,
            released: None,
        });
        Some(Placement {
            offset,
            wait_for,
            evicted_ready,
        })
    }

    /// Whether `len` bytes could be placed by evicting only released entries.
    pub fn can_alloc(&self, len: u64) -> bool {
        self.plan_alloc(len, false).is_some()
    }

    /// Live entries must not overlap and must lie inside the ring (a test hook).
    pub fn check(&self) -> Result<(), String> {
        let mut spans: Vec<(u64, u64)> = self
            .entries
            .iter()
            .map(|e| (e.offset, e.offset + e.len))
            .collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(format!("ring entries overlap: {:?} and {:?}", w[0], w[1]));
            }
        }
        match spans.last() {
            Some(&(_, end)) if end > self.capacity => Err(format!(
                "ring entry ends at {end}, past the capacity {}",
                self.capacity
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_reuse_waits_on_released_entries_and_wraps() {
        let mut r: Ring<u32> = Ring::new(100);
        let a = r.alloc(0, 40, false).unwrap();
        assert_eq!(a.offset, 0);
        let b = r.alloc(1, 40, false).unwrap();
        assert_eq!(b.offset, 40);
        // Third does not fit while the first is only loaded.
        assert!(r.alloc(2, 40, false).is_none());
        let i = r.find(0).unwrap();
        r.get_mut(i).unwrap().state = EntryState::Released;
        r.get_mut(i).unwrap().released = Some(10);
        let c = r.alloc(2, 40, false).unwrap();
        assert_eq!(c.offset, 0, "wraps to the start");
        assert_eq!(c.wait_for, vec![10]);
        r.check().unwrap();
        // Pinned entries are never evicted, even with force.
        let i = r.find(1).unwrap();
        r.get_mut(i).unwrap().state = EntryState::Pinned(1);
        assert!(r.alloc(3, 30, true).is_none());
    }

    #[test]
    fn an_empty_ring_restarts_at_zero() {
        let mut r: Ring<u32> = Ring::new(100);
        r.alloc(0, 70, false).unwrap();
        let i = r.find(0).unwrap();
        r.get_mut(i).unwrap().state = EntryState::Released;
        let p = r.alloc(1, 90, false).unwrap();
        assert_eq!(p.offset, 0);
        assert!(r.alloc(2, 101, true).is_none());
    }
}
