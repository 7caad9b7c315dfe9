//! The scheduler on the simulated device: overlap bounds, predictor accuracy, budget safety, and
//! bit-identical data across every mode and budget.

use ferry_pager::device::sim::{KernelSpec, SimConfig, SimDevice};
use ferry_pager::{
    Device, DeviceKind, DevicePtr, Error as PagerError, EventId, HostMemKind, HostPtr, MemInfo,
    Result as PagerResult, StreamId,
};
use ferry_sched::plan::{minimum_budget, plan};
use ferry_sched::{
    CostModel, Error, GroupDesc, GroupId, Mode, Problem, Replan, Scheduler, SchedulerConfig,
    TensorSource,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Model {
    dev: Arc<SimDevice>,
    groups: Vec<GroupDesc>,
    order: Vec<GroupId>,
    /// Source bytes of each group's tensors.
    source: Vec<Vec<Vec<u8>>>,
}

/// `sizes[i]` = tensor sizes of group i; compute time per group; two components.
fn model(cfg: SimConfig, sizes: &[Vec<u64>], compute: &[Duration]) -> Model {
    let dev = SimDevice::new(cfg);
    let total: u64 = sizes.iter().flatten().map(|b| b.div_ceil(256) * 256).sum();
    let host = dev.alloc_host(total, HostMemKind::Upload).unwrap();
    let mut off = 0;
    let mut groups = Vec::new();
    let mut source = Vec::new();
    let mut seed = 0x9e3779b97f4a7c15u64;
    for (i, ts) in sizes.iter().enumerate() {
        let mut tensors = Vec::new();
        let mut src = Vec::new();
        for (j, &b) in ts.iter().enumerate() {
            let data: Vec<u8> = (0..b)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            dev.host_write(host, off, &data).unwrap();
            tensors.push(TensorSource {
                name: format!("g{i}.t{j}"),
                host,
                offset: off,
                bytes: b,
            });
            src.push(data);
            off += b.div_ceil(256) * 256;
        }
        groups.push(GroupDesc {
            name: format!("block{i}"),
            component: if i < sizes.len() / 3 {
                "text_encoder"
            } else {
                "unet"
            }
            .into(),
            tensors,
            compute: compute[i],
        });
        source.push(src);
    }
    let order = (0..sizes.len()).map(GroupId).collect();
    Model {
        dev,
        groups,
        order,
        source,
    }
}

fn sched_cfg(dev: &SimDevice, mode: Mode, budget: u64, reserve: u64) -> SchedulerConfig {
    SchedulerConfig {
        mode,
        budget,
        reserve,
        run_ahead: 64,
        metrics: true,
        cost: CostModel::of_sim(dev.config()),
    }
}

/// Runs `passes` passes; every use launches a kernel that reads the group's tensors. Returns what
/// the kernels saw and the scheduler.
fn run(
    m: &Model,
    mode: Mode,
    budget: u64,
    reserve: u64,
    passes: usize,
) -> (Vec<Vec<u8>>, Scheduler) {
    let dev: Arc<dyn Device> = m.dev.clone();
    let s = Scheduler::new(
        dev,
        m.groups.clone(),
        m.order.clone(),
        sched_cfg(&m.dev, mode, budget, reserve),
    )
    .unwrap();
    let seen = run_passes(m, &s, budget, passes);
    (seen, s)
}

/// Runs `passes` passes on an existing scheduler; returns what the kernels saw.
fn run_passes(m: &Model, s: &Scheduler, budget: u64, passes: usize) -> Vec<Vec<u8>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..passes {
        s.begin_pass().unwrap();
        for &g in &m.order {
            let view = s.acquire(g).unwrap();
            let mut spec = KernelSpec::new(m.groups[g.0].name.clone(), m.groups[g.0].compute);
            for r in &view.tensors {
                spec = spec.reads(*r);
            }
            let ranges = view.tensors.clone();
            let out = seen.clone();
            m.dev
                .launch(s.compute_stream(), spec, move |mem| {
                    let mut all = Vec::new();
                    for r in ranges {
                        all.extend(mem.read(r)?);
                    }
                    out.lock().unwrap().push(all);
                    Ok(())
                })
                .unwrap();
            s.release(g).unwrap();
            s.check().unwrap();
            assert!(m.dev.device_bytes_allocated() <= budget);
        }
        s.end_pass().unwrap();
    }
    s.synchronize().unwrap();
    let seen = seen.lock().unwrap().clone();
    seen
}

fn expected(m: &Model, passes: usize) -> Vec<Vec<u8>> {
    (0..passes)
        .flat_map(|_| m.order.iter().map(|g| m.source[g.0].concat()))
        .collect()
}

fn problem(m: &Model, reserve: u64) -> Problem {
    Problem {
        groups: m.groups.clone(),
        order: m.order.clone(),
        reserve,
        cost: CostModel::of_sim(m.dev.config()),
        run_ahead: 64,
    }
}

fn total_bytes(m: &Model) -> u64 {
    m.groups.iter().map(|g| g.device_bytes()).sum()
}

/// 24 groups of mixed sizes (odd tensor sizes), per-group compute set by `compute_ns(bytes)`.
fn mixed(compute_ns: impl Fn(u64) -> u64) -> Model {
    mixed_on(SimConfig::default(), compute_ns)
}

fn mixed_on(cfg: SimConfig, compute_ns: impl Fn(u64) -> u64) -> Model {
    let sizes: Vec<Vec<u64>> = (0..24u64)
        .map(|i| vec![40_000 + 7_919 * (i % 5), 3_001 + 97 * i, 513])
        .collect();
    let compute: Vec<Duration> = sizes
        .iter()
        .map(|t| Duration::from_nanos(compute_ns(t.iter().sum())))
        .collect();
    model(cfg, &sizes, &compute)
}

const RESERVE: u64 = 64 << 10;

#[test]
fn data_is_bit_identical_across_modes_and_budgets_with_no_race_and_within_budget() {
    let m = mixed(|b| b / 20);
    let passes = 2;
    let want = expected(&m, passes);
    let p = problem(&m, RESERVE);
    let all = RESERVE + total_bytes(&m) + 4096;
    let modes = [
        Mode::None,
        Mode::Model,
        Mode::Sequential,
        Mode::Group { depth: 2 },
        Mode::Auto,
    ];
    for mode in modes {
        let min = minimum_budget(&p, mode);
        let budgets = [min, min + (all - min.min(all)) / 3, all.max(min)];
        for budget in budgets {
            let (seen, s) = run(&m, mode, budget, RESERVE, passes);
            assert!(seen == want, "{mode} at budget {budget}: data differs");
            assert_eq!(m.dev.races(), Vec::<String>::new(), "{mode} at {budget}");
            drop(s);
            assert_eq!(m.dev.device_bytes_allocated(), 0, "arena freed");
        }
    }
}

#[test]
fn a_budget_below_the_minimum_is_an_error_naming_the_minimum() {
    let m = mixed(|b| b / 20);
    let p = problem(&m, RESERVE);
    for mode in [
        Mode::None,
        Mode::Model,
        Mode::Group { depth: 1 },
        Mode::Auto,
    ] {
        let min = minimum_budget(&p, mode);
        let dev: Arc<dyn Device> = m.dev.clone();
        let err = Scheduler::new(
            dev,
            m.groups.clone(),
            m.order.clone(),
            sched_cfg(&m.dev, mode, min - 1, RESERVE),
        )
        .unwrap_err();
        match &err {
            Error::BudgetTooSmall {
                minimum, budget, ..
            } => {
                assert_eq!(*minimum, min);
                assert_eq!(*budget, min - 1);
            }
            e => panic!("expected BudgetTooSmall, got {e}"),
        }
        assert!(err.to_string().contains(&min.to_string()), "{err}");
    }
    assert_eq!(m.dev.device_bytes_allocated(), 0);
}

fn pass_time(s: &Scheduler) -> f64 {
    s.metrics().unwrap().passes.last().unwrap().time_ns
}

#[test]
fn compute_bound_streaming_hides_the_copies() {
    // Compute twice the copy time of each group (copy = 5 us latency + bytes at 25 GB/s).
    let m = mixed(|b| 2 * (5_000 + b / 25));
    let cost = CostModel::of_sim(m.dev.config());
    let (_, resident) = run(&m, Mode::None, RESERVE + total_bytes(&m) + 4096, RESERVE, 3);
    let resident_pass = pass_time(&resident);
    drop(resident);
    let first_copy = cost.copy_time(m.groups[0].device_bytes());
    // A quarter of the weights fit.
    let budget = RESERVE + total_bytes(&m) / 4;
    for mode in [Mode::Auto, Mode::Group { depth: 4 }] {
        let (_, s) = run(&m, mode, budget, RESERVE, 3);
        let t = pass_time(&s);
        assert!(
            t <= 1.02 * resident_pass + first_copy,
            "{mode}: streamed pass {t} ns vs resident {resident_pass} ns + first copy {first_copy} ns"
        );
        let last = s.metrics().unwrap().passes.last().unwrap().clone();
        assert!(last.bytes > 0, "{mode} streamed nothing");
    }
}

#[test]
fn copy_bound_streaming_runs_at_bus_speed() {
    // Without per-copy latency the bound is exactly bytes / bandwidth + the last compute; with the
    // default 5 us latency each of the (one per group) copies adds it. (With latency, `auto` may
    // rightly prefer a small ring that cannot double-buffer; its own prediction covers that.)
    for latency in [Duration::ZERO, SimConfig::default().copy_latency] {
        let cfg = SimConfig {
            copy_latency: latency,
            ..SimConfig::default()
        };
        let m = mixed_on(cfg, |_| 1_000);
        let cost = CostModel::of_sim(m.dev.config());
        let budget = RESERVE + total_bytes(&m) / 3;
        let modes: &[Mode] = if latency.is_zero() {
            &[Mode::Auto, Mode::Group { depth: 8 }]
        } else {
            &[Mode::Group { depth: 8 }]
        };
        for &mode in modes {
            let (_, s) = run(&m, mode, budget, RESERVE, 3);
            let metrics = s.metrics().unwrap();
            let last = metrics.passes.last().unwrap();
            let copies: u64 = metrics.groups.iter().map(|g| g.copies).sum::<u64>() / 3;
            let bus = last.bytes as f64 / cost.h2d_bandwidth * 1e9;
            let last_compute = m.groups.last().unwrap().compute.as_nanos() as f64;
            let bound = 1.02 * (bus + copies as f64 * latency.as_nanos() as f64) + last_compute;
            assert!(
                last.time_ns <= bound,
                "{mode}, latency {latency:?}: pass {} ns vs bound {bound} ns",
                last.time_ns
            );
        }
    }
}

#[test]
fn predicted_pass_time_matches_the_simulated_one_within_two_percent() {
    for compute in [|b: u64| b / 12, |b: u64| b / 60, |b: u64| b / 30] {
        let m = mixed(compute);
        let p = problem(&m, RESERVE);
        for mode in [
            Mode::None,
            Mode::Model,
            Mode::Sequential,
            Mode::Group { depth: 3 },
            Mode::Auto,
        ] {
            let all = RESERVE + total_bytes(&m) + 4096;
            let min = minimum_budget(&p, mode);
            for budget in [min, (min + all) / 2] {
                let (_, summary) = plan(&p, mode, budget).unwrap();
                let (_, s) = run(&m, mode, budget, RESERVE, 3);
                let actual = pass_time(&s);
                let predicted = summary.predicted_pass.as_nanos() as f64;
                let err = (predicted - actual).abs() / actual;
                assert!(
                    err <= 0.02,
                    "{mode} at {budget}: predicted {predicted} ns, simulated {actual} ns"
                );
                let streamed = s.metrics().unwrap().passes.last().unwrap().bytes;
                assert_eq!(streamed, summary.streamed_bytes_per_pass, "{mode}");
            }
        }
    }
}

#[test]
fn auto_residency_is_a_knapsack_not_largest_first() {
    // Groups of 60, 50, 50 (KiB) plus small ones; copy-bound. After the staging ring, 100 KiB are
    // left for residents: largest-first keeps 60, the knapsack keeps 50 + 50.
    let k = 1024u64;
    let sizes = vec![
        vec![60 * k],
        vec![50 * k],
        vec![50 * k],
        vec![10 * k],
        vec![10 * k],
    ];
    let compute = vec![Duration::from_micros(1); 5];
    // No per-copy latency, so value is proportional to bytes.
    let cfg = SimConfig {
        copy_latency: Duration::ZERO,
        ..SimConfig::default()
    };
    let m = model(cfg, &sizes, &compute);
    let p = problem(&m, 0);
    let budget = 60 * k + 100 * k;
    let (layout, summary) = plan(&p, Mode::Auto, budget).unwrap();
    let resident: Vec<usize> = (0..5).filter(|&g| layout.resident[g]).collect();
    assert!(
        summary.resident_bytes >= 100 * k,
        "resident {:?} = {} bytes",
        resident,
        summary.resident_bytes
    );
    assert!(
        !layout.resident[0],
        "largest-first would keep group 0: {resident:?}"
    );
}

#[test]
fn metrics_trace_and_table_are_produced() {
    let m = mixed(|b| b / 30);
    let budget = RESERVE + total_bytes(&m) / 2;
    let (_, s) = run(&m, Mode::Auto, budget, RESERVE, 2);
    let metrics = s.metrics().unwrap();
    assert_eq!(metrics.passes.len(), 2);
    assert!(metrics.groups.iter().all(|g| g.uses == 2));
    let streamed: u64 = metrics.groups.iter().map(|g| g.copies).sum();
    assert!(streamed > 0);
    let trace: serde_json::Value = serde_json::from_str(&metrics.chrome_trace()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    assert!(events.iter().any(|e| e["cat"] == "copy"));
    assert!(events.iter().any(|e| e["cat"] == "compute"));
    let table = metrics.table();
    assert!(
        table.contains("overlap") && table.contains("block"),
        "{table}"
    );
    let plan = s.plan().to_string();
    assert!(plan.contains("predicted pass"), "{plan}");
}

#[test]
fn trace_mode_records_the_order_on_the_first_pass_then_plans() {
    let m = mixed(|b| b / 20);
    let budget = RESERVE + total_bytes(&m) / 2;
    let dev: Arc<dyn Device> = m.dev.clone();
    let s = Scheduler::new(
        dev,
        m.groups.clone(),
        Vec::new(),
        sched_cfg(&m.dev, Mode::Auto, budget, RESERVE),
    )
    .unwrap();
    assert!(s.tracing());
    let seen = run_passes(&m, &s, budget, 3);
    assert!(!s.tracing());
    assert_eq!(s.order(), m.order);
    assert!(seen == expected(&m, 3));
    assert!(m.dev.races().is_empty(), "{:?}", m.dev.races());
    // After tracing, passes follow the planned layout: some groups resident.
    assert!(s.plan().resident_groups > 0);
}

#[test]
fn replanning_for_new_shapes_keeps_data_exact_and_moves_the_prediction() {
    let m = mixed(|b| b / 40);
    let budget = RESERVE * 4 + total_bytes(&m) / 2;
    let (_, s) = run(&m, Mode::Auto, budget, RESERVE, 1);
    let before = s.plan();
    // A larger resolution: 4x compute, 3x activations.
    let compute: Vec<Duration> = m.groups.iter().map(|g| g.compute * 4).collect();
    let after = s
        .replan(Replan {
            compute: Some(compute),
            reserve: Some(RESERVE * 3),
            ..Replan::default()
        })
        .unwrap();
    assert!(after.compute_per_pass == before.compute_per_pass * 4);
    assert!(
        after.resident_bytes < before.resident_bytes,
        "less room for residents"
    );
    let seen = run_passes(&m, &s, budget, 2);
    assert!(seen == expected(&m, 2));
    assert!(m.dev.races().is_empty());
    let err = s
        .replan(Replan {
            reserve: Some(budget),
            ..Replan::default()
        })
        .unwrap_err();
    assert!(matches!(err, Error::BudgetTooSmall { .. }), "{err}");
    // The old plan is still in force after a failed replan.
    assert!(run_passes(&m, &s, budget, 1) == expected(&m, 1));
}

#[test]
fn the_cost_model_is_measured_from_the_device() {
    let cfg = SimConfig {
        h2d_bandwidth: 12.5e9,
        copy_latency: Duration::from_micros(7),
        ..SimConfig::default()
    };
    let dev = SimDevice::new(cfg.clone());
    let m = CostModel::measure(dev.as_ref(), Duration::from_micros(3)).unwrap();
    let bw_err = (m.h2d_bandwidth - cfg.h2d_bandwidth).abs() / cfg.h2d_bandwidth;
    assert!(bw_err < 0.01, "measured {} B/s", m.h2d_bandwidth);
    let lat = m.copy_latency.as_nanos() as f64;
    assert!((lat - 7_000.0).abs() < 70.0, "measured latency {lat} ns");
    assert_eq!(m.launch_latency, Duration::from_micros(3));
    assert_eq!(
        dev.live_allocations(),
        (0, 0),
        "measurement frees what it allocated"
    );
}

/// The simulated device with the CUDA driver's event behaviour, which the simulator smooths
/// over: `event_elapsed` fails when `end` completed before `start` (the simulator clamps to 0),
/// is rounded to f32 milliseconds like `cuEventElapsedTime`, and refuses events made by
/// `create_sync_event` (`CU_EVENT_DISABLE_TIMING`). Optionally the first event recorded (the
/// scheduler's origin) is delayed on its stream, as a GPU may start another stream's work
/// first.
#[derive(Debug)]
struct DriverLike {
    sim: Arc<SimDevice>,
    delay_first_record: Mutex<Option<Duration>>,
    sync_events: Mutex<std::collections::HashSet<EventId>>,
    timed_events: std::sync::atomic::AtomicUsize,
}

impl DriverLike {
    fn new(sim: Arc<SimDevice>, delay_first_record: Option<Duration>) -> Arc<DriverLike> {
        Arc::new(DriverLike {
            sim,
            delay_first_record: Mutex::new(delay_first_record),
            sync_events: Mutex::default(),
            timed_events: Default::default(),
        })
    }
}

impl Device for DriverLike {
    fn kind(&self) -> DeviceKind {
        self.sim.kind()
    }
    fn name(&self) -> String {
        self.sim.name()
    }
    fn mem_info(&self) -> PagerResult<MemInfo> {
        self.sim.mem_info()
    }
    fn alloc_device(&self, bytes: u64) -> PagerResult<DevicePtr> {
        self.sim.alloc_device(bytes)
    }
    fn free_device(&self, ptr: DevicePtr) -> PagerResult<()> {
        self.sim.free_device(ptr)
    }
    fn alloc_host(&self, bytes: u64, kind: HostMemKind) -> PagerResult<HostPtr> {
        self.sim.alloc_host(bytes, kind)
    }
    fn free_host(&self, ptr: HostPtr) -> PagerResult<()> {
        self.sim.free_host(ptr)
    }
    fn host_write(&self, dst: HostPtr, offset: u64, src: &[u8]) -> PagerResult<()> {
        self.sim.host_write(dst, offset, src)
    }
    fn host_read(&self, src: HostPtr, offset: u64, dst: &mut [u8]) -> PagerResult<()> {
        self.sim.host_read(src, offset, dst)
    }
    fn create_stream(&self) -> PagerResult<StreamId> {
        self.sim.create_stream()
    }
    fn create_event(&self) -> PagerResult<EventId> {
        self.timed_events
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.sim.create_event()
    }
    fn create_sync_event(&self) -> PagerResult<EventId> {
        let e = self.sim.create_event()?;
        self.sync_events.lock().unwrap().insert(e);
        Ok(e)
    }
    fn destroy_stream(&self, stream: StreamId) -> PagerResult<()> {
        self.sim.destroy_stream(stream)
    }
    fn destroy_event(&self, event: EventId) -> PagerResult<()> {
        self.sync_events.lock().unwrap().remove(&event);
        self.sim.destroy_event(event)
    }
    fn record_event(&self, event: EventId, stream: StreamId) -> PagerResult<()> {
        if let Some(d) = self.delay_first_record.lock().unwrap().take() {
            self.sim.busy(stream, d)?;
        }
        self.sim.record_event(event, stream)
    }
    fn wait_event(&self, stream: StreamId, event: EventId) -> PagerResult<()> {
        self.sim.wait_event(stream, event)
    }
    fn event_done(&self, event: EventId) -> PagerResult<bool> {
        self.sim.event_done(event)
    }
    fn sync_event(&self, event: EventId) -> PagerResult<()> {
        self.sim.sync_event(event)
    }
    fn event_elapsed(&self, start: EventId, end: EventId) -> PagerResult<Duration> {
        let sync = self.sync_events.lock().unwrap();
        if sync.contains(&start) || sync.contains(&end) {
            return Err(PagerError::InvalidHandle(format!(
                "event_elapsed({}, {}): an event created without timing",
                start.0, end.0
            )));
        }
        drop(sync);
        self.sim.event_elapsed(start, end)?;
        let (a, b) = (self.sim.event_time(start)?, self.sim.event_time(end)?);
        let (a, b) = (a.unwrap(), b.unwrap());
        if b < a {
            return Err(PagerError::InvalidArgument(format!(
                "event {} completed {:?} before event {}",
                end.0,
                a - b,
                start.0
            )));
        }
        let ms = ((b - a).as_secs_f64() * 1e3) as f32;
        Ok(Duration::from_secs_f64(f64::from(ms) / 1e3))
    }
    fn sync_stream(&self, stream: StreamId) -> PagerResult<()> {
        self.sim.sync_stream(stream)
    }
    fn copy_h2d(
        &self,
        stream: StreamId,
        dst: DevicePtr,
        src: HostPtr,
        src_offset: u64,
        len: u64,
    ) -> PagerResult<()> {
        self.sim.copy_h2d(stream, dst, src, src_offset, len)
    }
    fn copy_h2d_pageable(&self, stream: StreamId, dst: DevicePtr, src: &[u8]) -> PagerResult<()> {
        self.sim.copy_h2d_pageable(stream, dst, src)
    }
    fn copy_d2h(
        &self,
        stream: StreamId,
        dst: HostPtr,
        dst_offset: u64,
        src: DevicePtr,
        len: u64,
    ) -> PagerResult<()> {
        self.sim.copy_d2h(stream, dst, dst_offset, src, len)
    }
    fn busy(&self, stream: StreamId, duration: Duration) -> PagerResult<()> {
        self.sim.busy(stream, duration)
    }
}

fn driver_like_scheduler(m: &Model, dev: &Arc<DriverLike>, metrics: bool) -> (Scheduler, u64) {
    let budget = RESERVE + total_bytes(m) / 2;
    let cfg = SchedulerConfig {
        metrics,
        ..sched_cfg(&m.dev, Mode::Auto, budget, RESERVE)
    };
    let s = Scheduler::new(dev.clone(), m.groups.clone(), m.order.clone(), cfg).unwrap();
    (s, budget)
}

/// The metrics origin is recorded on the compute stream; when that stream starts late, the
/// copy stream's first copies must still not complete before it (else `cuEventElapsedTime` is
/// negative and `metrics()` fails).
#[test]
fn metrics_work_when_the_compute_stream_starts_late() {
    let m = mixed(|b| b / 30);
    let dev = DriverLike::new(m.dev.clone(), Some(Duration::from_millis(2)));
    let (s, budget) = driver_like_scheduler(&m, &dev, true);
    assert_eq!(run_passes(&m, &s, budget, 2), expected(&m, 2));
    let metrics = s.metrics().unwrap();
    assert_eq!(metrics.passes.len(), 2);
    assert!(metrics.slices.iter().all(|sl| sl.start_ns >= 0.0));
}

/// After a long run (here the compute stream is busy for 3000 s first) an f32 interval from
/// the origin has an ulp of 250 µs; durations timed between adjacent events stay exact.
#[test]
fn metrics_stay_precise_on_long_runs() {
    let m = mixed(|b| b / 2);
    let dev = DriverLike::new(m.dev.clone(), None);
    let (s, budget) = driver_like_scheduler(&m, &dev, true);
    m.dev
        .busy(s.compute_stream(), Duration::from_secs(3000))
        .unwrap();
    run_passes(&m, &s, budget, 1);
    let metrics = s.metrics().unwrap();
    for (g, want) in metrics.groups.iter().zip(&m.groups) {
        let want = want.compute.as_nanos() as f64;
        assert!(
            (g.compute_ns - want).abs() <= want * 1e-3,
            "{}: compute {} ns, ran {want} ns",
            g.name,
            g.compute_ns
        );
    }
    let pass = &metrics.passes[0];
    let total: f64 = m.groups.iter().map(|g| g.compute.as_nanos() as f64).sum();
    assert!(
        pass.time_ns >= total * 0.999 && pass.time_ns < total * 10.0,
        "{pass:?}"
    );
}

/// Events only waited on are created without timing; with metrics off no timed event exists.
#[test]
fn ordering_events_are_created_without_timing() {
    let m = mixed(|b| b / 30);
    let dev = DriverLike::new(m.dev.clone(), None);
    let (s, budget) = driver_like_scheduler(&m, &dev, false);
    run_passes(&m, &s, budget, 2);
    assert_eq!(
        dev.timed_events.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(!dev.sync_events.lock().unwrap().is_empty());
    drop(s);
    assert!(
        dev.sync_events.lock().unwrap().is_empty(),
        "events left behind"
    );
}
