//! Residency: weight groups (the tensors of one layer or block), pin counts, eviction policies and
//! the [`Pager`] that moves groups between the pinned host tier and the device arena.
//!
//! The host never waits. Every hazard is ordered on the device with events:
//! - a load waits (on its copy stream) for the *fences* of whatever used its memory before: the
//!   ready event of the previous occupant's copy (write-after-write) and the release events of every
//!   compute stream that read it (write-after-read);
//! - a compute stream that acquires a group waits on the group's ready event (read-after-write).
//!
//! Events come from a pool: each resident group owns one ready event and one release event per
//! compute stream that released it (re-recorded on each release), and an evicted group's events move
//! with its memory into a "retired" list until a later load that covers that memory has waited on
//! them; then they return to the pool. In steady state no events are created.

use crate::arena::{align_up, Arena, Extent, ALIGN};
use crate::device::{Device, DevicePtr, DeviceRange, EventId, HostPtr, StreamId};
use crate::error::{Error, Result};
use crate::host::{HostStore, TensorId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Identifies a group defined in a [`Pager`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u32);

/// Which unpinned group to evict when room is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Least recently acquired, released or loaded.
    Lru,
    /// Furthest next use in the order given to [`Pager::set_order`] (Belady's rule); groups not in
    /// the order go first, ties go to the least recently used.
    NextUse,
}

/// Counters and gauges of a [`Pager`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagerStats {
    /// Arena size in bytes.
    pub budget: u64,
    /// Bytes of resident groups (extents, alignment included).
    pub resident_bytes: u64,
    /// Bytes of pinned (acquired) groups.
    pub pinned_bytes: u64,
    /// The most arena bytes ever in use at once.
    pub peak_arena_bytes: u64,
    /// Largest free extent now.
    pub largest_free: u64,
    /// Acquires that found the group resident.
    pub hits: u64,
    /// Acquires that had to load the group.
    pub misses: u64,
    /// Loads started by [`Pager::prefetch`].
    pub prefetches: u64,
    /// Groups evicted (by policy or explicitly).
    pub evictions: u64,
    /// Bytes enqueued for host→device copies.
    pub bytes_copied: u64,
    /// Host→device copy operations enqueued.
    pub copies: u64,
    /// Device events created (stays flat in steady state).
    pub events_created: u64,
}

/// One contiguous host range copied as one transfer, with the same layout on the device.
#[derive(Clone, Copy, Debug)]
struct Run {
    host: HostPtr,
    host_off: u64,
    dev_off: u64,
    len: u64,
}

/// Where each tensor of a group sits inside the group's extent, and how to fill it.
#[derive(Debug)]
struct Layout {
    tensors: Vec<TensorId>,
    /// (offset in extent, length) per tensor, in definition order.
    places: Vec<(u64, u64)>,
    runs: Vec<Run>,
    size: u64,
}

/// Device ranges of an acquired (or prefetched) group's tensors. Valid until the group is
/// released; after that the memory may be reused by work ordered after the release.
#[derive(Clone, Debug)]
pub struct GroupView {
    group: GroupId,
    base: DevicePtr,
    layout: Arc<Layout>,
}

impl GroupView {
    /// The group.
    pub fn group(&self) -> GroupId {
        self.group
    }
    /// The whole extent holding the group.
    pub fn extent(&self) -> DeviceRange {
        DeviceRange::new(self.base, self.layout.size)
    }
    /// The tensors in the order given to [`Pager::define_group`].
    pub fn tensors(&self) -> &[TensorId] {
        &self.layout.tensors
    }
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.layout.tensors.len()
    }
    /// Whether the group has no tensors (never true for a defined group).
    pub fn is_empty(&self) -> bool {
        self.layout.tensors.is_empty()
    }
    /// The device range of the `i`-th tensor (definition order).
    pub fn range(&self, i: usize) -> Option<DeviceRange> {
        let &(off, len) = self.layout.places.get(i)?;
        Some(DeviceRange::new(self.base.offset(off), len))
    }
    /// The device range of tensor `id`, if it belongs to the group.
    pub fn get(&self, id: TensorId) -> Option<DeviceRange> {
        let i = self.layout.tensors.iter().position(|&t| t == id)?;
        self.range(i)
    }
    /// All ranges in definition order.
    pub fn ranges(&self) -> Vec<DeviceRange> {
        (0..self.len()).filter_map(|i| self.range(i)).collect()
    }
}

/// One compute stream's use of a resident group.
#[derive(Debug)]
struct StreamUse {
    stream: StreamId,
    /// Acquires on this stream not yet released.
    pins: u32,
    /// Recorded at the stream's latest release (re-recorded each time: later subsumes earlier).
    release: Option<EventId>,
}

#[derive(Debug)]
struct Resident {
    extent: Extent,
    ready: EventId,
    /// Compute streams that acquired the group since it was loaded. Each already waits on
    /// `ready` (stream order keeps its later work behind it), so later acquires skip the wait.
    users: Vec<StreamUse>,
}

#[derive(Debug)]
struct Group {
    name: String,
    layout: Arc<Layout>,
    res: Option<Resident>,
    pins: u32,
    sticky: bool,
    last_use: u64,
    /// Positions of this group in the order (sorted).
    positions: Vec<usize>,
}

/// Memory an evicted group occupied, with the events any new occupant must wait for.
#[derive(Debug)]
struct Retired {
    extent: Extent,
    events: Vec<EventId>,
}

/// Above this many retired entries, completed ones are dropped on the next load.
const RETIRED_GC: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Acquire,
    Prefetch,
}

#[derive(Debug)]
struct Inner {
    arena: Arena,
    groups: Vec<Group>,
    by_name: HashMap<String, GroupId>,
    policy: Policy,
    order_len: usize,
    cursor: usize,
    tick: u64,
    pool: Vec<EventId>,
    retired: Vec<Retired>,
    stats: PagerStats,
    /// Every event created, destroyed when the pager is dropped.
    created: Vec<EventId>,
}

/// Moves weight groups between the pinned host tier and a fixed device budget. `Send + Sync`;
/// several pipelines may share one.
#[derive(Debug)]
pub struct Pager {
    dev: Arc<dyn Device>,
    host: Arc<HostStore>,
    inner: Mutex<Inner>,
}

impl Pager {
    /// A pager with an arena of `budget` bytes on `dev` (its only device allocation), loading from
    /// `host` (whose pinned memory must belong to `dev`).
    pub fn new(
        dev: Arc<dyn Device>,
        host: Arc<HostStore>,
        budget: u64,
        policy: Policy,
    ) -> Result<Pager> {
        let arena = Arena::new(dev.clone(), budget)?;
        let stats = PagerStats {
            budget: arena.extents().capacity(),
            largest_free: arena.extents().largest_free(),
            ..PagerStats::default()
        };
        Ok(Pager {
            dev,
            host,
            inner: Mutex::new(Inner {
                arena,
                groups: Vec::new(),
                by_name: HashMap::new(),
                policy,
                order_len: 0,
                cursor: 0,
                tick: 0,
                pool: Vec::new(),
                retired: Vec::new(),
                stats,
                created: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation leaves `Inner` consistent before any call that can fail.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The host store this pager loads from.
    pub fn host(&self) -> &Arc<HostStore> {
        &self.host
    }

    /// Defines a group of tensors that are loaded, pinned and evicted together.
    pub fn define_group(&self, name: &str, tensors: &[TensorId]) -> Result<GroupId> {
        if tensors.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "group '{name}' has no tensors"
            )));
        }
        let mut infos = Vec::with_capacity(tensors.len());
        for (i, &t) in tensors.iter().enumerate() {
            if tensors[..i].contains(&t) {
                return Err(Error::InvalidArgument(format!(
                    "group '{name}' lists tensor {} twice",
                    t.0
                )));
            }
            infos.push(self.host.tensor(t)?);
        }
        // Copy runs: tensors adjacent in pinned memory are copied together, keeping the layout.
        // A tensor joins the run only if it lands aligned on the device (its distance from the
        // run's start is a multiple of ALIGN) with less than ALIGN bytes of padding before it;
        // in chunks (aligned offsets) that is "starts at the aligned end of the run", while in
        // a file registered in place (unaligned offsets) runs break where alignment would.
        let mut order: Vec<usize> = (0..infos.len()).collect();
        order.sort_by_key(|&i| (infos[i].host, infos[i].offset));
        let mut runs: Vec<Run> = Vec::new();
        let mut places = vec![(0u64, 0u64); infos.len()];
        let mut cursor = 0u64;
        for i in order {
            let t = &infos[i];
            let extend = runs.last().is_some_and(|r| {
                let end = r.host_off + r.len;
                r.host == t.host
                    && t.offset >= end
                    && t.offset - end < ALIGN
                    && align_up(t.offset - r.host_off) == t.offset - r.host_off
            });
            if !extend {
                let dev_off = align_up(cursor);
                runs.push(Run {
                    host: t.host,
                    host_off: t.offset,
                    dev_off,
                    len: 0,
                });
            }
            if let Some(r) = runs.last_mut() {
                r.len = r.len.max(t.offset + t.len - r.host_off);
                places[i] = (r.dev_off + (t.offset - r.host_off), t.len);
                cursor = r.dev_off + r.len;
            }
        }
        runs.retain(|r| r.len > 0);
        let layout = Arc::new(Layout {
            tensors: tensors.to_vec(),
            places,
            runs,
            size: align_up(cursor.max(1)),
        });
        let mut inner = self.lock();
        if inner.by_name.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "group '{name}' is already defined"
            )));
        }
        let id = GroupId(inner.groups.len() as u32);
        inner.groups.push(Group {
            name: name.to_string(),
            layout,
            res: None,
            pins: 0,
            sticky: false,
            last_use: 0,
            positions: Vec::new(),
        });
        inner.by_name.insert(name.to_string(), id);
        Ok(id)
    }

    /// Pins `group` for use on `compute_stream`, loading it on `copy_stream` if it is not
    /// resident (evicting unpinned, non-sticky groups by policy). Later work on `compute_stream`
    /// sees the group's bytes; the host does not wait.
    ///
    /// If the group cannot fit even after evicting every evictable group, returns
    /// [`Error::OutOfMemory`] with the bytes asked and the free / largest-free bytes there would be
    /// after that eviction, and evicts nothing.
    pub fn acquire(
        &self,
        group: GroupId,
        compute_stream: StreamId,
        copy_stream: StreamId,
    ) -> Result<GroupView> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.check(group)?;
        inner.advance_cursor(group);
        let gi = group.0 as usize;
        if inner.groups[gi].res.is_some() {
            inner.stats.hits += 1;
        } else {
            inner.stats.misses += 1;
            self.load(inner, group, copy_stream, Mode::Acquire)?;
        }
        inner.tick += 1;
        let tick = inner.tick;
        let g = &mut inner.groups[gi];
        let res = g.res.as_mut().ok_or_else(|| {
            Error::InvalidHandle(format!("group '{}' lost its residency", g.name))
        })?;
        let user = match res.users.iter().position(|u| u.stream == compute_stream) {
            Some(i) => i,
            None => {
                self.dev.wait_event(compute_stream, res.ready)?;
                res.users.push(StreamUse {
                    stream: compute_stream,
                    pins: 0,
                    release: None,
                });
                res.users.len() - 1
            }
        };
        res.users[user].pins += 1;
        g.pins += 1;
        g.last_use = tick;
        if g.pins == 1 {
            inner.stats.pinned_bytes += g.layout.size;
        }
        Ok(GroupView {
            group,
            base: inner.arena.range(res.extent).ptr,
            layout: g.layout.clone(),
        })
    }

    /// Starts loading `group` on `copy_stream` without pinning it. Returns `Ok(true)` if it is (or
    /// is now being made) resident, `Ok(false)` if it cannot fit without evicting a pinned or
    /// sticky group (or, under [`Policy::NextUse`], a group needed sooner than this one).
    pub fn prefetch(&self, group: GroupId, copy_stream: StreamId) -> Result<bool> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.check(group)?;
        if inner.groups[group.0 as usize].res.is_some() {
            return Ok(true);
        }
        let loaded = self.load(inner, group, copy_stream, Mode::Prefetch)?;
        if loaded {
            inner.stats.prefetches += 1;
            inner.tick += 1;
            inner.groups[group.0 as usize].last_use = inner.tick;
        }
        Ok(loaded)
    }

    /// Unpins `group` after the work enqueued so far on `compute_stream`: its memory may be reused
    /// only by work ordered after this point.
    pub fn release(&self, group: GroupId, compute_stream: StreamId) -> Result<()> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.check(group)?;
        let gi = group.0 as usize;
        let g = &inner.groups[gi];
        let user = g.res.as_ref().and_then(|r| {
            r.users
                .iter()
                .position(|u| u.stream == compute_stream && u.pins > 0)
        });
        let Some(user) = user else {
            return Err(Error::InvalidArgument(format!(
                "release of group '{}' on stream {}, where it is not acquired",
                g.name, compute_stream.0
            )));
        };
        let existing = g.res.as_ref().and_then(|r| r.users[user].release);
        let ev = match existing {
            Some(e) => e,
            None => inner.event(&*self.dev)?,
        };
        if let Err(e) = self.dev.record_event(ev, compute_stream) {
            if existing.is_none() {
                inner.pool.push(ev);
            }
            // The use ends anyway (a caller releasing from a destructor cannot retry): wait for
            // the work that read the group, so that its memory can be reused without a fence.
            // Should even that fail, the device is broken and every later call fails too.
            let _ = self.dev.sync_stream(compute_stream);
            let g = &mut inner.groups[gi];
            if let Some(r) = g.res.as_mut() {
                r.users[user].pins -= 1;
            }
            g.pins -= 1;
            if g.pins == 0 {
                inner.stats.pinned_bytes -= g.layout.size;
            }
            return Err(e);
        }
        inner.tick += 1;
        let tick = inner.tick;
        let g = &mut inner.groups[gi];
        if let Some(r) = g.res.as_mut() {
            r.users[user].release = Some(ev);
            r.users[user].pins -= 1;
        }
        g.pins -= 1;
        g.last_use = tick;
        if g.pins == 0 {
            inner.stats.pinned_bytes -= g.layout.size;
        }
        Ok(())
    }

    /// Evicts `group` now (free: weights are read-only). Returns whether it was resident.
    /// Fails with [`Error::Busy`] if it is pinned. Works on sticky groups too.
    pub fn evict(&self, group: GroupId) -> Result<bool> {
        let mut inner = self.lock();
        inner.check(group)?;
        let g = &inner.groups[group.0 as usize];
        if g.pins > 0 {
            return Err(Error::Busy(format!(
                "group '{}' is acquired {} time(s) and cannot be evicted",
                g.name, g.pins
            )));
        }
        if g.res.is_none() {
            return Ok(false);
        }
        inner.evict_now(group)?;
        Ok(true)
    }

    /// Marks `group` as sticky (never chosen for eviction by policy) or not.
    pub fn set_sticky(&self, group: GroupId, sticky: bool) -> Result<()> {
        let mut inner = self.lock();
        inner.check(group)?;
        inner.groups[group.0 as usize].sticky = sticky;
        Ok(())
    }

    /// Sets the repeating order in which groups will be acquired (for [`Policy::NextUse`]) and
    /// resets the cursor to its start. Each acquire advances the cursor past the group's next
    /// occurrence.
    pub fn set_order(&self, order: &[GroupId]) -> Result<()> {
        let mut inner = self.lock();
        for &g in order {
            inner.check(g)?;
        }
        for g in &mut inner.groups {
            g.positions.clear();
        }
        for (i, &g) in order.iter().enumerate() {
            inner.groups[g.0 as usize].positions.push(i);
        }
        inner.order_len = order.len();
        inner.cursor = 0;
        Ok(())
    }

    /// Changes the eviction policy.
    pub fn set_policy(&self, policy: Policy) {
        self.lock().policy = policy;
    }

    /// The group called `name`.
    pub fn group_id(&self, name: &str) -> Option<GroupId> {
        self.lock().by_name.get(name).copied()
    }

    /// Bytes `group` occupies on the device when resident.
    pub fn group_bytes(&self, group: GroupId) -> Result<u64> {
        let inner = self.lock();
        inner.check(group)?;
        Ok(inner.groups[group.0 as usize].layout.size)
    }

    /// Whether `group` is resident (its copy may still be in flight).
    pub fn is_resident(&self, group: GroupId) -> Result<bool> {
        let inner = self.lock();
        inner.check(group)?;
        Ok(inner.groups[group.0 as usize].res.is_some())
    }

    /// How many times `group` is currently acquired.
    pub fn pin_count(&self, group: GroupId) -> Result<u32> {
        let inner = self.lock();
        inner.check(group)?;
        Ok(inner.groups[group.0 as usize].pins)
    }

    /// Resident groups with their device extents, in group order.
    pub fn resident(&self) -> Vec<(GroupId, DeviceRange)> {
        let inner = self.lock();
        inner
            .groups
            .iter()
            .enumerate()
            .filter_map(|(i, g)| {
                g.res
                    .as_ref()
                    .map(|r| (GroupId(i as u32), inner.arena.range(r.extent)))
            })
            .collect()
    }

    /// Counters and gauges.
    pub fn stats(&self) -> PagerStats {
        let inner = self.lock();
        let mut s = inner.stats;
        s.peak_arena_bytes = inner.arena.extents().peak();
        s.largest_free = inner.arena.extents().largest_free();
        s
    }

    /// Makes `group` resident in a fresh extent and enqueues its copies. `Ok(false)` only in
    /// prefetch mode when it cannot fit.
    fn load(&self, inner: &mut Inner, group: GroupId, copy: StreamId, mode: Mode) -> Result<bool> {
        let gi = group.0 as usize;
        let layout = inner.groups[gi].layout.clone();
        let size = layout.size;
        let extent = match inner.arena.alloc(size) {
            Ok(e) => e,
            Err(_) => {
                let target_dist = inner.next_use_distance(group);
                let candidates: Vec<GroupId> = (0..inner.groups.len())
                    .map(|i| GroupId(i as u32))
                    .filter(|&v| inner.evictable(v, group, mode, target_dist))
                    .collect();
                let extra: Vec<Extent> = candidates
                    .iter()
                    .filter_map(|v| inner.groups[v.0 as usize].res.as_ref().map(|r| r.extent))
                    .collect();
                let ext = inner.arena.extents();
                if ext.largest_free_with(&extra) < size {
                    if mode == Mode::Prefetch {
                        return Ok(false);
                    }
                    return Err(Error::OutOfMemory {
                        asked: size,
                        free: ext.free() + extra.iter().map(|e| e.len).sum::<u64>(),
                        largest_free: ext.largest_free_with(&extra),
                    });
                }
                loop {
                    let victim = inner
                        .pick_victim(&candidates)
                        .ok_or_else(|| inner.arena.extents().oom(size))?;
                    inner.evict_now(victim)?;
                    if let Ok(e) = inner.arena.alloc(size) {
                        break e;
                    }
                }
            }
        };
        // Fences of previous occupants of this memory.
        let mut waits: Vec<EventId> = Vec::new();
        let mut covered: Vec<usize> = Vec::new();
        for (i, r) in inner.retired.iter().enumerate() {
            if r.extent.overlaps(&extent) {
                for &e in &r.events {
                    if !waits.contains(&e) {
                        waits.push(e);
                    }
                }
                if extent.offset <= r.extent.offset && r.extent.end() <= extent.end() {
                    covered.push(i);
                }
            }
        }
        let base = inner.arena.range(extent).ptr;
        let mut ready = None;
        let enqueued = (|| -> Result<()> {
            for &e in &waits {
                self.dev.wait_event(copy, e)?;
            }
            for r in &layout.runs {
                self.dev
                    .copy_h2d(copy, base.offset(r.dev_off), r.host, r.host_off, r.len)?;
            }
            let ev = inner.event(&*self.dev)?;
            ready = Some(ev);
            self.dev.record_event(ev, copy)
        })();
        if let Err(e) = enqueued {
            // Copies may already be enqueued, and the ready event may not have been recorded:
            // wait for the copy stream so that nothing is left writing into the extent. If even
            // that fails, keep the ready event as a fence (the older entries we waited on stay
            // in the list and keep fencing the memory too).
            if self.dev.sync_stream(copy).is_ok() {
                inner.pool.extend(ready);
            } else {
                inner.retired.push(Retired {
                    extent,
                    events: ready.into_iter().collect(),
                });
            }
            let _ = inner.arena.free(extent);
            return Err(e);
        }
        // The new ready event is ordered after every fence of fully covered entries, so those
        // entries are subsumed; their events go back to the pool.
        for &i in covered.iter().rev() {
            let r = inner.retired.swap_remove(i);
            inner.pool.extend(r.events);
        }
        if inner.retired.len() > RETIRED_GC {
            self.collect_retired(inner);
        }
        let layout_bytes = layout.runs.iter().map(|r| r.len).sum::<u64>();
        inner.stats.bytes_copied += layout_bytes;
        inner.stats.copies += layout.runs.len() as u64;
        inner.stats.resident_bytes += extent.len;
        inner.groups[gi].res = Some(Resident {
            extent,
            ready: ready.ok_or_else(|| Error::InvalidArgument("no ready event".into()))?,
            users: Vec::new(),
        });
        Ok(true)
    }

    /// Drops retired entries whose events have all completed.
    fn collect_retired(&self, inner: &mut Inner) {
        let mut i = 0;
        while i < inner.retired.len() {
            let done = inner.retired[i]
                .events
                .iter()
                .all(|&e| self.dev.event_done(e).unwrap_or(false));
            if done {
                let r = inner.retired.swap_remove(i);
                inner.pool.extend(r.events);
            } else {
                i += 1;
            }
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        // The arena (dropped after this) waits for pending work before freeing its memory;
        // destroying events does not wait and does not disturb work that waits on them.
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        for e in inner.created.drain(..) {
            let _ = self.dev.destroy_event(e);
        }
    }
}

impl Inner {
    fn check(&self, g: GroupId) -> Result<()> {
        if (g.0 as usize) < self.groups.len() {
            Ok(())
        } else {
            Err(Error::InvalidHandle(format!(
                "group id {} is not defined ({} groups)",
                g.0,
                self.groups.len()
            )))
        }
    }

    fn event(&mut self, dev: &dyn Device) -> Result<EventId> {
        if let Some(e) = self.pool.pop() {
            return Ok(e);
        }
        let e = dev.create_event()?;
        self.stats.events_created += 1;
        self.created.push(e);
        Ok(e)
    }

    fn advance_cursor(&mut self, g: GroupId) {
        let pos = &self.groups[g.0 as usize].positions;
        if pos.is_empty() || self.order_len == 0 {
            return;
        }
        let i = pos.partition_point(|&p| p < self.cursor);
        let p = pos.get(i).copied().unwrap_or(pos[0]);
        self.cursor = (p + 1) % self.order_len;
    }

    /// Acquires until `g` is next needed (`u64::MAX` if it is not in the order).
    fn next_use_distance(&self, g: GroupId) -> u64 {
        let pos = &self.groups[g.0 as usize].positions;
        if pos.is_empty() {
            return u64::MAX;
        }
        let i = pos.partition_point(|&p| p < self.cursor);
        match pos.get(i) {
            Some(&p) => (p - self.cursor) as u64,
            None => (pos[0] + self.order_len - self.cursor) as u64,
        }
    }

    fn evictable(&self, v: GroupId, target: GroupId, mode: Mode, target_dist: u64) -> bool {
        let g = &self.groups[v.0 as usize];
        if v == target || g.res.is_none() || g.pins > 0 || g.sticky {
            return false;
        }
        // A prefetch must not evict what will be needed before the prefetched group.
        !(mode == Mode::Prefetch
            && self.policy == Policy::NextUse
            && self.next_use_distance(v) <= target_dist
            && target_dist != u64::MAX)
    }

    fn pick_victim(&self, candidates: &[GroupId]) -> Option<GroupId> {
        let live = candidates
            .iter()
            .copied()
            .filter(|v| self.groups[v.0 as usize].res.is_some());
        match self.policy {
            Policy::Lru => live.min_by_key(|v| self.groups[v.0 as usize].last_use),
            Policy::NextUse => live.max_by_key(|&v| {
                (
                    self.next_use_distance(v),
                    std::cmp::Reverse(self.groups[v.0 as usize].last_use),
                )
            }),
        }
    }

    fn evict_now(&mut self, g: GroupId) -> Result<()> {
        let Some(res) = self.groups[g.0 as usize].res.take() else {
            return Ok(());
        };
        self.arena.free(res.extent)?;
        let mut events = vec![res.ready];
        events.extend(res.users.iter().filter_map(|u| u.release));
        self.retired.push(Retired {
            extent: res.extent,
            events,
        });
        self.stats.resident_bytes -= res.extent.len;
        self.stats.evictions += 1;
        Ok(())
    }
}
