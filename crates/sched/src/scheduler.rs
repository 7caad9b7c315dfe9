//! The executor: runs the shared scheduling logic on a real (or simulated) device with one compute
//! stream and one copy stream, ordering everything with events so the host never waits in steady
//! state (beyond the run-ahead bound).

use crate::core::{CopyOp, Core, Timeline};
use crate::error::{Error, Result};
use crate::metrics::{CopyRecord, PassRecord, RunMetrics, UseRecord};
use crate::plan::{plan, CostModel, GroupDesc, GroupId, Layout, Mode, PlanSummary, Problem};
use ferry_pager::disk::{DiskRead, DiskTier};
use ferry_pager::{Device, DevicePtr, DeviceRange, EventId, StreamId};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How to run.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Offload mode.
    pub mode: Mode,
    /// Hard device memory budget in bytes (weights + engine reserve).
    pub budget: u64,
    /// Bytes of the budget the engine needs for activations and workspace.
    pub reserve: u64,
    /// How many group uses the host may run ahead of the device.
    pub run_ahead: usize,
    /// Record per-use events for metrics and traces.
    pub metrics: bool,
    /// The transfer cost model used for planning.
    pub cost: CostModel,
}

/// Device ranges of an acquired group's tensors, in the group's tensor order.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupView {
    /// The group.
    pub group: GroupId,
    /// One range per tensor.
    pub tensors: Vec<DeviceRange>,
}

/// The device resources of a scheduler: its arena, its two streams and every event it created.
/// All are given back on drop, after the device has finished the work issued on them.
struct DeviceTimeline {
    dev: Arc<dyn Device>,
    arena: DevicePtr,
    compute: StreamId,
    copy: StreamId,
    pool: Vec<EventId>,
    /// Every event created, to destroy on drop (the pool holds only the free ones).
    created: Vec<EventId>,
    metrics: bool,
    copies: Vec<CopyRecord>,
    /// Where copies from a disk tier's handle go (three-tier runs only; one tier per file).
    disks: Vec<Arc<DiskTier>>,
    /// Each disk tier's clock when the metrics origin was recorded (places disk reads on the
    /// trace timeline).
    disk_origin: Vec<std::time::Duration>,
}

impl DeviceTimeline {
    /// An event for ordering only (recycled through the pool; never timed).
    fn event(&mut self) -> Result<EventId> {
        match self.pool.pop() {
            Some(e) => Ok(e),
            None => {
                let e = self.dev.create_sync_event()?;
                self.created.push(e);
                Ok(e)
            }
        }
    }

    fn mark(&mut self, stream: StreamId) -> Result<EventId> {
        let e = self.event()?;
        self.dev.record_event(e, stream)?;
        Ok(e)
    }

    /// A new timed event recorded on `stream`, kept for metrics (never recycled).
    fn timed_mark(&mut self, stream: StreamId) -> Result<EventId> {
        let e = self.dev.create_event()?;
        self.created.push(e);
        self.dev.record_event(e, stream)?;
        Ok(e)
    }

    /// [`DeviceTimeline::timed_mark`] on the compute stream.
    fn metrics_mark(&mut self) -> Result<EventId> {
        self.timed_mark(self.compute)
    }
}

impl Timeline for DeviceTimeline {
    type Token = EventId;

    fn copy(
        &mut self,
        group: Option<GroupId>,
        ops: &[CopyOp],
        base: u64,
        wait_for: &[EventId],
        synchronous: bool,
    ) -> Result<EventId> {
        let stream = if synchronous { self.compute } else { self.copy };
        for &t in wait_for {
            self.dev.wait_event(stream, t)?;
        }
        let start = if self.metrics {
            Some(self.timed_mark(stream)?)
        } else {
            None
        };
        let mut reads: Vec<Vec<DiskRead>> = vec![Vec::new(); self.disks.len()];
        for op in ops {
            let dst = self.arena.offset(base + op.dev_offset);
            match self.disks.iter().position(|d| d.host_handle() == op.host) {
                Some(i) => reads[i].push(DiskRead {
                    file_offset: op.host_offset,
                    len: op.len,
                    dst,
                }),
                None => self
                    .dev
                    .copy_h2d(stream, dst, op.host, op.host_offset, op.len)?,
            }
        }
        for (disk, r) in self.disks.iter().zip(&reads) {
            if !r.is_empty() {
                disk.load(stream, r)?;
            }
        }
        let ready = self.mark(stream)?;
        if let Some(start) = start {
            let end = self.timed_mark(stream)?;
            self.copies.push(CopyRecord {
                bytes: ops.iter().map(|o| o.len).sum(),
                start,
                end,
                group,
            });
        }
        Ok(ready)
    }

    fn compute_wait(&mut self, t: &EventId) -> Result<()> {
        Ok(self.dev.wait_event(self.compute, *t)?)
    }

    fn compute_mark(&mut self) -> Result<EventId> {
        self.mark(self.compute)
    }

    fn host_wait(&mut self, t: &EventId) -> Result<()> {
        Ok(self.dev.sync_event(*t)?)
    }

    fn recycle(&mut self, t: EventId) {
        self.pool.push(t);
    }
}

struct Inner {
    problem: Problem,
    budget: u64,
    layout: Layout,
    summary: PlanSummary,
    core: Core<EventId>,
    tl: DeviceTimeline,
    uses: Vec<UseRecord>,
    passes: Vec<PassRecord>,
    /// `Some` inside a pass; the inner event (metrics only) marks its start.
    pass_start: Option<Option<EventId>>,
    pass_first_use: usize,
    pass_bytes_at_start: u64,
    origin: EventId,
    mode: Mode,
    /// The order being recorded while the first pass runs without a declared order.
    trace: Option<Vec<GroupId>>,
    /// A device call failed part-way: the staging ring may name copies that never ran. The next
    /// call waits for the device and starts the plan afresh ([`Inner::recover`]).
    poisoned: bool,
    /// The error of a [`Scheduler::release_deferred`], reported by the next acquire, pass mark or
    /// synchronize.
    deferred: Option<Error>,
}

/// What changes when re-planning.
#[derive(Clone, Debug, Default)]
pub struct Replan {
    /// A new order of uses per pass.
    pub order: Option<Vec<GroupId>>,
    /// New compute time per group (e.g. measured, or scaled for a new resolution).
    pub compute: Option<Vec<Duration>>,
    /// A new engine reserve (activations grow with resolution and batch).
    pub reserve: Option<u64>,
}

impl Inner {
    /// Runs `f`, first recovering from an earlier device failure; a device failure inside `f`
    /// poisons the scheduler until the next call recovers.
    fn guarded<R>(&mut self, f: impl FnOnce(&mut Inner) -> Result<R>) -> Result<R> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        if self.poisoned {
            self.recover()?;
        }
        let r = f(self);
        if let Err(Error::Device(_)) = &r {
            self.poisoned = true;
        }
        r
    }

    /// Releases `g` whatever else fails: an earlier deferred error is returned after the release,
    /// and if recovering from an earlier failure fails, the pin is dropped from the bookkeeping
    /// (nothing reuses the memory before a recovery has waited for the device).
    fn release_always(&mut self, g: GroupId) -> Result<()> {
        let deferred = self.deferred.take();
        if self.poisoned {
            if let Err(e) = self.recover() {
                self.core.unpin(g);
                return Err(deferred.unwrap_or(e));
            }
        }
        let r = self.release(g);
        if let Err(Error::Device(_)) = &r {
            self.poisoned = true;
        }
        match deferred {
            Some(d) => Err(d),
            None => r,
        }
    }

    /// After a failed device call: waits for all work, then restarts the current plan with an
    /// empty staging ring and the resident set copied again. Groups acquired before the failure
    /// must not be read any more; their releases are accepted and do nothing.
    fn recover(&mut self) -> Result<()> {
        self.tl.dev.sync_stream(self.tl.compute)?;
        self.tl.dev.sync_stream(self.tl.copy)?;
        let mut core = Core::new(
            &self.problem.groups,
            self.problem.order.clone(),
            self.layout.clone(),
            self.problem.reserve,
            self.problem.run_ahead,
        )?;
        core.bytes_copied = self.core.bytes_copied;
        core.unit_copies = self.core.unit_copies;
        core.inherit_pins(&self.core);
        core.load_residents(&self.problem.groups, &mut self.tl)?;
        let old = std::mem::replace(&mut self.core, core);
        // Every event of the old core has completed: they can be reused.
        for t in old.into_tokens() {
            self.tl.recycle(t);
        }
        self.poisoned = false;
        Ok(())
    }

    fn end_pass(&mut self) -> Result<()> {
        let g = self;
        let start = g.pass_start.take().ok_or_else(|| {
            Error::InvalidArgument("end_pass without a matching begin_pass".into())
        })?;
        if let Some(start) = start {
            let end = g.tl.metrics_mark()?;
            let bytes = g.core.bytes_copied;
            let (first_use, end_use) = (g.pass_first_use, g.uses.len());
            let bytes_at_start = g.pass_bytes_at_start;
            g.passes.push(PassRecord {
                start,
                end,
                bytes_at_start,
                bytes_at_end: bytes,
                first_use,
                end_use,
            });
        }
        if let Some(order) = g.trace.take() {
            if order.is_empty() {
                return Err(Error::InvalidArgument(
                    "the traced pass acquired no group".into(),
                ));
            }
            let mut problem = g.problem.clone();
            problem.order = order;
            g.rebuild(problem)?;
        }
        Ok(())
    }

    fn replan(&mut self, change: Replan) -> Result<PlanSummary> {
        let g = self;
        let mut problem = g.problem.clone();
        if let Some(order) = change.order {
            problem.order = order;
        }
        if let Some(compute) = change.compute {
            if compute.len() != problem.groups.len() {
                return Err(Error::InvalidArgument(format!(
                    "replan: {} compute times given for {} groups",
                    compute.len(),
                    problem.groups.len()
                )));
            }
            for (desc, c) in problem.groups.iter_mut().zip(compute) {
                desc.compute = c;
            }
        }
        if let Some(r) = change.reserve {
            problem.reserve = r;
        }
        g.rebuild(problem)?;
        Ok(g.summary.clone())
    }

    fn acquire(&mut self, g: GroupId) -> Result<GroupView> {
        let inner = self;
        let before = if inner.tl.metrics {
            Some(inner.tl.metrics_mark()?)
        } else {
            None
        };
        let placed = inner.core.acquire(g, &mut inner.tl)?;
        if let Some(t) = &mut inner.trace {
            t.push(g);
        }
        if let Some(before) = before {
            let after = match inner.tl.metrics_mark() {
                Ok(a) => a,
                Err(e) => {
                    inner.core.unpin(g);
                    return Err(e);
                }
            };
            inner.uses.push(UseRecord {
                group: g,
                before,
                after,
                end: None,
            });
        }
        let desc = &inner.problem.groups[g.0];
        let tensors = placed
            .offsets
            .iter()
            .zip(&desc.tensors)
            .map(|(&o, t)| DeviceRange::new(inner.tl.arena.offset(o), t.bytes))
            .collect();
        Ok(GroupView { group: g, tensors })
    }

    fn release(&mut self, g: GroupId) -> Result<()> {
        let inner = self;
        if inner.tl.metrics {
            let end = match inner.tl.metrics_mark() {
                Ok(e) => e,
                Err(e) => {
                    // The use ends either way; the next call syncs before reusing the memory.
                    inner.core.unpin(g);
                    return Err(e);
                }
            };
            if let Some(u) = inner
                .uses
                .iter_mut()
                .rev()
                .find(|u| u.group == g && u.end.is_none())
            {
                u.end = Some(end);
            }
        }
        inner.core.release(g, &mut inner.tl)
    }

    /// Waits for the device, then plans `problem` afresh inside the same arena and reloads the
    /// resident set. On error the previous plan stays in force.
    fn rebuild(&mut self, problem: Problem) -> Result<()> {
        self.tl.dev.sync_stream(self.tl.compute)?;
        self.tl.dev.sync_stream(self.tl.copy)?;
        let (layout, summary) = plan(&problem, self.mode, self.budget)?;
        let mut core = Core::new(
            &problem.groups,
            problem.order.clone(),
            layout.clone(),
            problem.reserve,
            problem.run_ahead,
        )?;
        core.bytes_copied = self.core.bytes_copied;
        core.unit_copies = self.core.unit_copies;
        core.inherit_pins(&self.core);
        core.load_residents(&problem.groups, &mut self.tl)?;
        let old = std::mem::replace(&mut self.core, core);
        for t in old.into_tokens() {
            self.tl.recycle(t);
        }
        self.layout = layout;
        self.summary = summary;
        self.problem = problem;
        Ok(())
    }
}

/// The layout of a tracing pass: everything streamed on demand, no prefetch.
fn trace_layout(p: &Problem, budget: u64) -> Result<(Layout, PlanSummary)> {
    let max_group = p.groups.iter().map(|g| g.device_bytes()).max().unwrap_or(0);
    let minimum = crate::plan::align(p.reserve) + max_group;
    if budget < minimum {
        return Err(Error::BudgetTooSmall {
            budget,
            minimum,
            mode: "trace".into(),
            detail: "engine reserve + the largest weight group".into(),
        });
    }
    let layout = Layout {
        mode: Mode::Group { depth: 0 },
        resident: vec![false; p.groups.len()],
        resident_bytes: 0,
        staging_bytes: budget - crate::plan::align(p.reserve),
        depth: 0,
        by_component: false,
        synchronous: false,
    };
    let summary = crate::plan::summarize(p, &layout, budget, minimum);
    Ok((layout, summary))
}

/// The prefetching transfer scheduler. `Send + Sync`; calls are serialised internally.
pub struct Scheduler {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").finish_non_exhaustive()
    }
}

impl Scheduler {
    /// Plans `groups` used in `order` each pass, allocates the budget once, and starts copying the
    /// resident set.
    pub fn new(
        dev: Arc<dyn Device>,
        groups: Vec<GroupDesc>,
        order: Vec<GroupId>,
        cfg: SchedulerConfig,
    ) -> Result<Scheduler> {
        Self::build(dev, groups, order, cfg, Vec::new())
    }

    /// Like [`Scheduler::new`], with some tensors left on disk: a tensor whose source is
    /// `disk.host_handle()` at offset *o* is read from byte *o* of the disk tier's file through
    /// its staging ring (see `ferry_pager::disk`), then copied like a pinned one. Which groups
    /// to leave on disk is chosen by [`crate::tiers::plan_tiers`].
    pub fn with_disk(
        dev: Arc<dyn Device>,
        groups: Vec<GroupDesc>,
        order: Vec<GroupId>,
        cfg: SchedulerConfig,
        disk: Arc<DiskTier>,
    ) -> Result<Scheduler> {
        Self::build(dev, groups, order, cfg, vec![disk])
    }

    /// Like [`Scheduler::with_disk`] with several files (a model split into components), each
    /// behind its own tier and handle.
    pub fn with_disks(
        dev: Arc<dyn Device>,
        groups: Vec<GroupDesc>,
        order: Vec<GroupId>,
        cfg: SchedulerConfig,
        disks: Vec<Arc<DiskTier>>,
    ) -> Result<Scheduler> {
        Self::build(dev, groups, order, cfg, disks)
    }

    fn build(
        dev: Arc<dyn Device>,
        groups: Vec<GroupDesc>,
        order: Vec<GroupId>,
        cfg: SchedulerConfig,
        disks: Vec<Arc<DiskTier>>,
    ) -> Result<Scheduler> {
        let problem = Problem {
            groups,
            order,
            reserve: cfg.reserve,
            cost: cfg.cost,
            run_ahead: cfg.run_ahead,
        };
        let tracing = problem.order.is_empty();
        let (layout, summary) = if tracing {
            trace_layout(&problem, cfg.budget)?
        } else {
            plan(&problem, cfg.mode, cfg.budget)?
        };
        let core = Core::new(
            &problem.groups,
            problem.order.clone(),
            layout.clone(),
            problem.reserve,
            problem.run_ahead,
        )?;
        let arena = dev.alloc_device(cfg.budget)?;
        let compute = match dev.create_stream() {
            Ok(s) => s,
            Err(e) => {
                let _ = dev.free_device(arena);
                return Err(e.into());
            }
        };
        let copy = match dev.create_stream() {
            Ok(s) => s,
            Err(e) => {
                let _ = dev.destroy_stream(compute);
                let _ = dev.free_device(arena);
                return Err(e.into());
            }
        };
        // From here on, dropping `tl` gives everything back.
        let mut tl = DeviceTimeline {
            dev: dev.clone(),
            arena,
            compute,
            copy,
            pool: Vec::new(),
            created: Vec::new(),
            metrics: cfg.metrics,
            copies: Vec::new(),
            disks,
            disk_origin: Vec::new(),
        };
        // The time origin of the metrics. The copy stream waits for it, so that no event of
        // either stream can complete before it (events on two streams are otherwise unordered,
        // and a negative interval is an error).
        let origin = if cfg.metrics {
            tl.timed_mark(compute)?
        } else {
            tl.mark(compute)?
        };
        dev.wait_event(copy, origin)?;
        tl.disk_origin = tl.disks.iter().map(|d| d.clock()).collect();
        let mut inner = Inner {
            problem,
            budget: cfg.budget,
            layout,
            summary,
            core,
            tl,
            uses: Vec::new(),
            passes: Vec::new(),
            pass_start: None,
            pass_first_use: 0,
            pass_bytes_at_start: 0,
            origin,
            mode: cfg.mode,
            trace: tracing.then(Vec::new),
            poisoned: false,
            deferred: None,
        };
        // On failure `inner` drops here and gives the arena, streams and events back.
        let Inner {
            core, tl, problem, ..
        } = &mut inner;
        core.load_residents(&problem.groups, tl)?;
        Ok(Scheduler {
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The plan being run.
    pub fn plan(&self) -> PlanSummary {
        self.lock().summary.clone()
    }

    /// The layout being run.
    pub fn layout(&self) -> Layout {
        self.lock().layout.clone()
    }

    /// The stream the engine must issue its compute on.
    pub fn compute_stream(&self) -> StreamId {
        self.lock().tl.compute
    }

    /// The stream copies are issued on.
    pub fn copy_stream(&self) -> StreamId {
        self.lock().tl.copy
    }

    /// The engine's activations and workspace region (the reserve, at the start of the arena).
    pub fn workspace(&self) -> DeviceRange {
        let g = self.lock();
        DeviceRange::new(g.tl.arena, g.problem.reserve)
    }

    /// The whole device arena (exactly the budget).
    pub fn arena(&self) -> DeviceRange {
        let g = self.lock();
        DeviceRange::new(g.tl.arena, g.budget)
    }

    /// Marks the start of a pass (for metrics).
    pub fn begin_pass(&self) -> Result<()> {
        self.lock().guarded(|g| {
            // Pass records (two events each) are kept only for metrics, so that a long run
            // without metrics holds a fixed number of events.
            g.pass_start = if g.tl.metrics {
                Some(Some(g.tl.metrics_mark()?))
            } else {
                Some(None)
            };
            g.pass_first_use = g.uses.len();
            g.pass_bytes_at_start = g.core.bytes_copied;
            Ok(())
        })
    }

    /// Marks the end of a pass (for metrics).
    pub fn end_pass(&self) -> Result<()> {
        self.lock().guarded(Inner::end_pass)
    }

    /// Whether the scheduler is still recording the order of uses (first pass, no declared order).
    pub fn tracing(&self) -> bool {
        self.lock().trace.is_some()
    }

    /// The order of uses per pass being planned for (empty while tracing).
    pub fn order(&self) -> Vec<GroupId> {
        self.lock().problem.order.clone()
    }

    /// Plans again for new compute times, order or reserve (a new resolution or batch size),
    /// inside the same arena. Waits for the device first.
    pub fn replan(&self, change: Replan) -> Result<PlanSummary> {
        self.lock().guarded(|g| g.replan(change))
    }

    /// Makes group `g` available to work issued next on the compute stream; returns where its
    /// tensors are. The compute stream waits for the copy; the host does not.
    ///
    /// After an error from a device call, the next call waits for the device and restarts the
    /// plan: groups acquired before the error must not be read again (releasing them is fine).
    pub fn acquire(&self, g: GroupId) -> Result<GroupView> {
        self.lock().guarded(|inner| inner.acquire(g))
    }

    /// Ends the use of group `g` by the work issued so far on the compute stream; its memory is
    /// reused only by copies ordered after that work.
    ///
    /// The use ends even when an error is returned (the caller need not, and cannot usefully,
    /// release again).
    pub fn release(&self, g: GroupId) -> Result<()> {
        self.lock().release_always(g)
    }

    /// [`Scheduler::release`] for destructors, which cannot return an error: a failure is
    /// reported by the next [`Scheduler::acquire`], [`Scheduler::begin_pass`],
    /// [`Scheduler::end_pass`] or [`Scheduler::synchronize`] instead.
    pub fn release_deferred(&self, g: GroupId) {
        let mut inner = self.lock();
        if let Err(e) = inner.release_always(g) {
            inner.deferred = Some(e);
        }
    }
    /// Waits for all work, then returns the metrics recorded so far (empty unless enabled).
    pub fn metrics(&self) -> Result<RunMetrics> {
        let g = self.lock();
        let dev = &g.tl.dev;
        dev.sync_stream(g.tl.compute)?;
        dev.sync_stream(g.tl.copy)?;
        let mut m = crate::metrics::collect(
            dev.as_ref(),
            g.origin,
            &g.problem.groups,
            &g.uses,
            &g.tl.copies,
            &g.passes,
            g.budget,
        )?;
        if g.tl.metrics {
            for (disk, &zero) in g.tl.disks.iter().zip(&g.tl.disk_origin) {
                let name = disk.file().path().file_name().map_or_else(
                    || "disk".to_string(),
                    |n| format!("read {}", n.to_string_lossy()),
                );
                m.add_disk_reads(&name, &disk.read_timings(), zero);
            }
        }
        Ok(m)
    }

    /// Checks internal invariants (a test hook).
    pub fn check(&self) -> Result<()> {
        self.lock().core.check().map_err(Error::InvalidArgument)
    }

    /// Total bytes copied host→device so far.
    pub fn bytes_copied(&self) -> u64 {
        self.lock().core.bytes_copied
    }

    /// Waits for all work issued so far.
    pub fn synchronize(&self) -> Result<()> {
        let mut g = self.lock();
        if let Some(e) = g.deferred.take() {
            return Err(e);
        }
        g.tl.dev.sync_stream(g.tl.compute)?;
        g.tl.dev.sync_stream(g.tl.copy)?;
        Ok(())
    }
}

impl Drop for DeviceTimeline {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; the arena is freed after pending work either way
        // (`free_device` waits for it too), then the events and streams are destroyed.
        let _ = self.dev.sync_stream(self.compute);
        let _ = self.dev.sync_stream(self.copy);
        let _ = self.dev.free_device(self.arena);
        for e in self.created.drain(..) {
            let _ = self.dev.destroy_event(e);
        }
        let _ = self.dev.destroy_stream(self.copy);
        let _ = self.dev.destroy_stream(self.compute);
    }
}

/// The time `d` as used in the cost model.
pub fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}
