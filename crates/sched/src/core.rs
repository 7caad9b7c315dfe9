//! The scheduling logic shared by the executor and the predictor: which copies to issue at each
//! acquire and release, where units land, and what each copy and each use must wait for. The
//! [`Timeline`] it drives is either the real device (events) or the cost model (virtual times).

use crate::error::{Error, Result};
use crate::plan::{align, components, GroupDesc, GroupId, Layout};
use crate::ring::{EntryState, Ring};
use ferry_pager::HostPtr;

/// One host→device copy of a unit: a run of tensors contiguous in host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyOp {
    /// Source allocation.
    pub host: HostPtr,
    /// Offset in it.
    pub host_offset: u64,
    /// Offset from the unit's start in device memory.
    pub dev_offset: u64,
    /// Bytes.
    pub len: u64,
}

/// What the shared logic asks of the device (or of the cost model).
pub(crate) trait Timeline {
    /// A completion marker: a device event, or a virtual time.
    type Token: Clone;
    /// Enqueues the copies of a unit (a group, or a component when `group` is `None`) to device
    /// offset `base` (from the arena start) after the
    /// `wait_for` tokens; on the compute stream with the host waiting if `synchronous`.
    #[allow(clippy::too_many_arguments)]
    fn copy(
        &mut self,
        group: Option<GroupId>,
        ops: &[CopyOp],
        base: u64,
        wait_for: &[Self::Token],
        synchronous: bool,
    ) -> Result<Self::Token>;
    /// Makes the compute stream wait for `t`.
    fn compute_wait(&mut self, t: &Self::Token) -> Result<()>;
    /// A token at the current end of the compute stream's work.
    fn compute_mark(&mut self) -> Result<Self::Token>;
    /// Blocks the host until `t`.
    fn host_wait(&mut self, t: &Self::Token) -> Result<()>;
    /// A token can be reused (its event returned to the pool).
    fn recycle(&mut self, t: Self::Token);
}

/// Where a group's tensors are in device memory, as offsets from the arena start.
#[derive(Clone, Debug, PartialEq)]
pub struct Placed {
    /// Offset of each tensor.
    pub offsets: Vec<u64>,
}

struct Unit {
    bytes: u64,
    ops: Vec<CopyOp>,
    group: Option<GroupId>,
}

/// The scheduling state for one layout.
pub(crate) struct Core<T> {
    pub layout: Layout,
    units: Vec<Unit>,
    group_unit: Vec<usize>,
    /// Offset of each group inside its unit (0 unless units are components).
    group_offset: Vec<u64>,
    /// Offsets of each tensor inside its group.
    tensor_offsets: Vec<Vec<u64>>,
    /// Offset of each resident group from the arena start.
    resident_offset: Vec<Option<u64>>,
    resident_base: u64,
    staging_base: u64,
    order: Vec<GroupId>,
    cursor: usize,
    ring: Ring<T>,
    resident_ready: Option<T>,
    run_ahead: std::collections::VecDeque<T>,
    run_ahead_limit: usize,
    /// Bytes copied so far.
    pub bytes_copied: u64,
    /// Copies issued so far (units).
    pub unit_copies: u64,
    /// Per unit: acquires made before the core was rebuilt after an error and not yet released
    /// (their releases are accepted and do nothing).
    stale_pins: Vec<u32>,
}

/// Copy ops for a list of tensors placed back to back (aligned) from `dev_start`, merging runs
/// that are contiguous both in host and device memory.
fn copy_ops(groups: &[&GroupDesc], mut dev: u64, ops: &mut Vec<CopyOp>) -> u64 {
    for g in groups {
        for t in &g.tensors {
            // Merge with the previous copy when both sides keep the same relative layout (the
            // host tier pads like the device does), so a group is usually one copy.
            match ops.last_mut() {
                Some(last)
                    if last.host == t.host
                        && t.offset >= last.host_offset + last.len
                        && t.offset - last.host_offset == dev - last.dev_offset =>
                {
                    last.len = t.offset + t.bytes - last.host_offset
                }
                _ => ops.push(CopyOp {
                    host: t.host,
                    host_offset: t.offset,
                    dev_offset: dev,
                    len: t.bytes,
                }),
            }
            dev += align(t.bytes);
        }
    }
    dev
}

impl<T: Clone> Core<T> {
    /// Lays out `groups` per `layout` in an arena whose first `reserve` bytes belong to the engine.
    pub fn new(
        groups: &[GroupDesc],
        order: Vec<GroupId>,
        layout: Layout,
        reserve: u64,
        run_ahead: usize,
    ) -> Result<Self> {
        let n = groups.len();
        let tensor_offsets = groups
            .iter()
            .map(|g| {
                let mut off = 0;
                g.tensors
                    .iter()
                    .map(|t| {
                        let o = off;
                        off += align(t.bytes);
                        o
                    })
                    .collect()
            })
            .collect();
        let resident_base = align(reserve);
        let mut resident_offset = vec![None; n];
        let mut off = resident_base;
        for (g, desc) in groups.iter().enumerate() {
            if layout.resident[g] {
                resident_offset[g] = Some(off);
                off += desc.device_bytes();
            }
        }
        let staging_base = off;
        let mut units = Vec::new();
        let mut group_unit = vec![usize::MAX; n];
        let mut group_offset = vec![0; n];
        if layout.by_component {
            let (names, comp) = components(groups);
            for c in 0..names.len() {
                let members: Vec<usize> = (0..n)
                    .filter(|&g| comp[g] == c && !layout.resident[g])
                    .collect();
                let mut ops = Vec::new();
                let mut dev = 0;
                for &g in &members {
                    group_offset[g] = dev;
                    group_unit[g] = units.len();
                    dev = copy_ops(&[&groups[g]], dev, &mut ops);
                }
                units.push(Unit {
                    bytes: dev,
                    ops,
                    group: None,
                });
            }
        } else {
            for (g, desc) in groups.iter().enumerate() {
                if !layout.resident[g] {
                    let mut ops = Vec::new();
                    let bytes = copy_ops(&[desc], 0, &mut ops);
                    group_unit[g] = units.len();
                    units.push(Unit {
                        bytes,
                        ops,
                        group: Some(GroupId(g)),
                    });
                }
            }
        }
        if let Some(u) = units.iter().find(|u| u.bytes > layout.staging_bytes) {
            return Err(Error::InvalidArgument(format!(
                "a streamed unit of {} bytes does not fit the staging ring of {} bytes",
                u.bytes, layout.staging_bytes
            )));
        }
        Ok(Core {
            ring: Ring::new(layout.staging_bytes),
            layout,
            units,
            group_unit,
            group_offset,
            tensor_offsets,
            resident_offset,
            resident_base,
            staging_base,
            order,
            cursor: 0,
            resident_ready: None,
            run_ahead: Default::default(),
            run_ahead_limit: run_ahead.max(1),
            bytes_copied: 0,
            unit_copies: 0,
            stale_pins: Vec::new(),
        })
    }

    /// Takes over the acquisitions still outstanding in `old` (the core this one replaces after a
    /// failure) as stale pins, so that their releases are accepted.
    pub fn inherit_pins(&mut self, old: &Core<T>) {
        let mut stale = old.stale_pins.clone();
        stale.resize(self.units.len().max(stale.len()), 0);
        for e in old.ring.entries() {
            if let (EntryState::Pinned(k), Some(s)) = (e.state, stale.get_mut(e.unit)) {
                *s += k;
            }
        }
        self.stale_pins = stale;
    }

    /// Every token the core still holds (ring entries, run-ahead marks, the residents' copy),
    /// for recycling once the device has finished all work.
    pub fn into_tokens(self) -> Vec<T> {
        let mut out: Vec<T> = self.run_ahead.into_iter().collect();
        out.extend(self.resident_ready);
        for e in self.ring.entries() {
            out.extend(e.ready.clone());
            out.extend(e.released.clone());
        }
        out
    }

    /// Copies every resident group (once, at the start).
    pub fn load_residents(
        &mut self,
        groups: &[GroupDesc],
        tl: &mut impl Timeline<Token = T>,
    ) -> Result<()> {
        let mut ops = Vec::new();
        let mut dev = 0;
        let mut any = false;
        for (g, desc) in groups.iter().enumerate() {
            if self.layout.resident[g] {
                dev = copy_ops(&[desc], dev, &mut ops);
                any = true;
            }
        }
        if any {
            let t = tl.copy(None, &ops, self.resident_base, &[], false)?;
            self.bytes_copied += ops.iter().map(|o| o.len).sum::<u64>();
            self.resident_ready = Some(t);
        }
        Ok(())
    }

    fn place(&self, g: usize, unit_base: u64) -> Placed {
        Placed {
            offsets: self.tensor_offsets[g]
                .iter()
                .map(|o| unit_base + self.group_offset[g] + o)
                .collect(),
        }
    }

    /// Places `unit` in the ring and enqueues its copy; `None` if it does not fit now.
    fn issue(
        &mut self,
        unit: usize,
        force: bool,
        tl: &mut impl Timeline<Token = T>,
    ) -> Result<Option<usize>> {
        let bytes = self.units[unit].bytes;
        let Some(placement) = self.ring.alloc(unit, bytes, force) else {
            return Ok(None);
        };
        let base = self.staging_base + placement.offset;
        let ready = tl.copy(
            self.units[unit].group,
            &self.units[unit].ops,
            base,
            &placement.wait_for,
            self.layout.synchronous,
        )?;
        for t in placement
            .wait_for
            .into_iter()
            .chain(placement.evicted_ready)
        {
            tl.recycle(t);
        }
        self.bytes_copied += bytes;
        self.unit_copies += 1;
        let idx = self.ring.find(unit).ok_or_else(|| {
            Error::InvalidArgument(format!("unit {unit} vanished from the staging ring"))
        })?;
        if let Some(e) = self.ring.get_mut(idx) {
            e.ready = Some(ready);
        }
        Ok(Some(idx))
    }

    /// Copies ahead along the known order, as far as the depth and the free ring space allow.
    fn prefetch(&mut self, tl: &mut impl Timeline<Token = T>) -> Result<()> {
        if self.layout.depth == 0 || self.layout.synchronous {
            return Ok(());
        }
        let n = self.order.len();
        let mut streamed = 0usize;
        for step in 0..n {
            let g = self.order[(self.cursor + step) % n].0;
            let unit = self.group_unit[g];
            if unit == usize::MAX {
                continue;
            }
            streamed += 1;
            if streamed > self.layout.depth {
                break;
            }
            if self.ring.find(unit).is_some() {
                continue;
            }
            if self.issue(unit, false, tl)?.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// Makes group `g`'s weights available to work issued next on the compute stream.
    pub fn acquire(&mut self, g: GroupId, tl: &mut impl Timeline<Token = T>) -> Result<Placed> {
        let gi = g.0;
        if gi >= self.group_unit.len() {
            return Err(Error::InvalidArgument(format!(
                "group {gi} does not exist ({} groups)",
                self.group_unit.len()
            )));
        }
        // Follow the plan; an out-of-order use re-synchronises the cursor with its next occurrence.
        let n = self.order.len();
        if let Some(step) = (0..n).find(|s| self.order[(self.cursor + s) % n] == g) {
            self.cursor = (self.cursor + step + 1) % n;
        }
        let placed = if let Some(off) = self.resident_offset[gi] {
            if let Some(t) = &self.resident_ready {
                tl.compute_wait(t)?;
            }
            self.place(gi, off - self.group_offset[gi])
        } else {
            let unit = self.group_unit[gi];
            let idx = match self.ring.find(unit) {
                Some(i) => i,
                None => self.issue(unit, true, tl)?.ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "group {gi} ({} bytes) cannot be placed: the staging ring of {} bytes is held by groups still in use",
                        self.units[unit].bytes,
                        self.ring.capacity()
                    ))
                })?,
            };
            let entry = self
                .ring
                .get_mut(idx)
                .ok_or_else(|| Error::InvalidArgument("ring entry vanished".into()))?;
            entry.state = match entry.state {
                EntryState::Pinned(k) => EntryState::Pinned(k + 1),
                _ => EntryState::Pinned(1),
            };
            let offset = entry.offset;
            if let Some(t) = entry.ready.clone() {
                let waited = tl.compute_wait(&t).and_then(|()| {
                    if self.layout.synchronous {
                        tl.host_wait(&t)
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = waited {
                    // A failed acquire holds nothing: the caller will not release it.
                    self.unpin(g);
                    return Err(e);
                }
            }
            self.place(gi, self.staging_base + offset)
        };
        if let Err(e) = self.prefetch(tl) {
            self.unpin(g);
            return Err(e);
        }
        Ok(placed)
    }

    /// Undoes one pin of `g` (a stale one first) without recording a release token: only for a
    /// use that failed, after which the scheduler waits for the device before reusing memory.
    pub fn unpin(&mut self, g: GroupId) {
        let Some(&unit) = self.group_unit.get(g.0) else {
            return;
        };
        if self.resident_offset[g.0].is_some() {
            return;
        }
        if let Some(s) = self.stale_pins.get_mut(unit).filter(|s| **s > 0) {
            *s -= 1;
            return;
        }
        if let Some(e) = self.ring.find(unit).and_then(|i| self.ring.get_mut(i)) {
            e.state = match e.state {
                EntryState::Pinned(k) if k > 1 => EntryState::Pinned(k - 1),
                EntryState::Pinned(_) => EntryState::Released,
                s => s,
            };
        }
    }

    /// Ends the use of group `g` by the work issued so far on the compute stream.
    pub fn release(&mut self, g: GroupId, tl: &mut impl Timeline<Token = T>) -> Result<()> {
        let gi = g.0;
        if gi >= self.group_unit.len() {
            return Err(Error::InvalidArgument(format!("group {gi} does not exist")));
        }
        if self.resident_offset[gi].is_none() {
            let unit = self.group_unit[gi];
            if let Some(s) = self.stale_pins.get_mut(unit).filter(|s| **s > 0) {
                // Acquired before a failure reset the ring: nothing of it is left to release.
                *s -= 1;
                return Ok(());
            }
            let mark = match tl.compute_mark() {
                Ok(m) => m,
                Err(e) => {
                    // The use ends either way; the scheduler syncs before reusing the memory.
                    self.unpin(g);
                    return Err(e);
                }
            };
            let idx = self.ring.find(unit).ok_or_else(|| {
                Error::InvalidArgument(format!("group {gi} released but it is not loaded"))
            })?;
            let entry = self
                .ring
                .get_mut(idx)
                .ok_or_else(|| Error::InvalidArgument("ring entry vanished".into()))?;
            let stale = match entry.state {
                EntryState::Pinned(1) => {
                    entry.state = EntryState::Released;
                    entry.released.replace(mark.clone())
                }
                EntryState::Pinned(k) => {
                    entry.state = EntryState::Pinned(k - 1);
                    entry.released.replace(mark.clone())
                }
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "group {gi} released more often than acquired"
                    )))
                }
            };
            if let Some(t) = stale {
                tl.recycle(t);
            }
        }
        // Bound how far the host runs ahead of the device.
        let mark = tl.compute_mark()?;
        self.run_ahead.push_back(mark);
        if self.run_ahead.len() > self.run_ahead_limit {
            if let Some(old) = self.run_ahead.pop_front() {
                tl.host_wait(&old)?;
                tl.recycle(old);
            }
        }
        self.prefetch(tl)
    }

    /// Checks the ring's invariants (a test hook).
    pub fn check(&self) -> Result<(), String> {
        self.ring.check()
    }
}
