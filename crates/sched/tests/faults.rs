//! Fault injection: every device call the scheduler makes in a short run is made to fail in turn
//! (the k-th allocation, stream, event call, sync, copy or launch). Each failure must come back as
//! an `Err` naming the injected fault (never a panic, never wrong data), leave nothing allocated
//! on the device, and leave a device that the next run uses to produce the clean run's bytes.
//! A scheduler that saw a failure mid-pass must also recover and give the right bytes after it.
//!
//! A soak test runs many passes and checks that device memory, events and streams stay flat;
//! `FERRY_SOAK=1` makes it much longer.

use ferry_pager::device::sim::{FaultOp, FaultPlan, KernelSpec, SimConfig, SimDevice};
use ferry_pager::{Device, HostMemKind};
use ferry_sched::{CostModel, GroupDesc, GroupId, Mode, Scheduler, SchedulerConfig, TensorSource};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Model {
    dev: Arc<SimDevice>,
    groups: Vec<GroupDesc>,
    order: Vec<GroupId>,
    /// What a kernel reading each group must see.
    want: Vec<Vec<u8>>,
}

/// Eight groups of two or three tensors with odd sizes, in one pinned allocation.
fn model() -> Model {
    let dev = SimDevice::new(SimConfig::default());
    let sizes: Vec<Vec<u64>> = (0..8u64)
        .map(|i| {
            let mut v = vec![3_000 + 517 * i, 777 + 31 * i];
            if i % 3 == 0 {
                v.push(129);
            }
            v
        })
        .collect();
    let total: u64 = sizes.iter().flatten().map(|b| b.div_ceil(256) * 256).sum();
    let host = dev.alloc_host(total, HostMemKind::Upload).unwrap();
    let (mut off, mut seed) = (0u64, 0x2545_f491_4f6c_dd1du64);
    let mut groups = Vec::new();
    let mut want = Vec::new();
    for (i, ts) in sizes.iter().enumerate() {
        let mut tensors = Vec::new();
        let mut all = Vec::new();
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
            all.extend(data);
            off += b.div_ceil(256) * 256;
        }
        groups.push(GroupDesc {
            name: format!("block{i}"),
            component: if i < 2 { "text_encoder" } else { "unet" }.into(),
            tensors,
            compute: Duration::from_micros(20 + 3 * i as u64),
        });
        want.push(all);
    }
    Model {
        dev,
        order: (0..groups.len()).map(GroupId).collect(),
        groups,
        want,
    }
}

const RESERVE: u64 = 16 << 10;

/// A run configuration: mode, whether the order is declared (else traced in the first pass), and
/// whether metrics events are recorded.
#[derive(Clone, Copy, Debug)]
struct Setup {
    mode: Mode,
    declared: bool,
    metrics: bool,
}

fn setups(m: &Model) -> Vec<(Setup, u64)> {
    let problem = ferry_sched::Problem {
        groups: m.groups.clone(),
        order: m.order.clone(),
        reserve: RESERVE,
        cost: CostModel::of_sim(m.dev.config()),
        run_ahead: 4,
    };
    let all: u64 = RESERVE + m.groups.iter().map(|g| g.device_bytes()).sum::<u64>();
    let mut v = Vec::new();
    for (mode, declared, metrics) in [
        (Mode::Group { depth: 2 }, true, false),
        (Mode::Sequential, true, true),
        (Mode::Auto, false, false),
        (Mode::None, true, false),
    ] {
        let min = ferry_sched::plan::minimum_budget(&problem, mode);
        let budget = if mode == Mode::None { all } else { min };
        v.push((
            Setup {
                mode,
                declared,
                metrics,
            },
            budget,
        ));
    }
    v
}

fn scheduler(m: &Model, s: Setup, budget: u64) -> ferry_sched::Result<Scheduler> {
    Scheduler::new(
        m.dev.clone() as Arc<dyn Device>,
        m.groups.clone(),
        if s.declared {
            m.order.clone()
        } else {
            Vec::new()
        },
        SchedulerConfig {
            mode: s.mode,
            budget,
            reserve: RESERVE,
            run_ahead: 4,
            metrics: s.metrics,
            cost: CostModel::of_sim(m.dev.config()),
        },
    )
}

/// One pass: every group acquired, read by a kernel, released. Appends what the kernels saw.
fn pass(m: &Model, s: &Scheduler, seen: &Arc<Mutex<Vec<Vec<u8>>>>) -> ferry_sched::Result<()> {
    s.begin_pass()?;
    for &g in &m.order {
        let view = s.acquire(g)?;
        let mut spec = KernelSpec::new(m.groups[g.0].name.clone(), m.groups[g.0].compute);
        for r in &view.tensors {
            spec = spec.reads(*r);
        }
        let ranges = view.tensors.clone();
        let out = seen.clone();
        let launched = m.dev.launch(s.compute_stream(), spec, move |mem| {
            let mut all = Vec::new();
            for r in ranges {
                all.extend(mem.read(r)?);
            }
            out.lock()
                .map_err(|_| ferry_pager::Error::Busy("poisoned".into()))?
                .push(all);
            Ok(())
        });
        // Released whatever happened, as an RAII guard would.
        let released = s.release(g);
        launched?;
        released?;
    }
    s.end_pass()?;
    Ok(())
}

/// A whole run: a scheduler, `passes` passes, a final sync; what the kernels saw.
fn attempt(
    m: &Model,
    setup: Setup,
    budget: u64,
    passes: usize,
) -> ferry_sched::Result<Vec<Vec<u8>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = scheduler(m, setup, budget)?;
    for _ in 0..passes {
        pass(m, &s, &seen)?;
    }
    s.synchronize()?;
    drop(s);
    let v = seen.lock().unwrap().clone();
    Ok(v)
}

fn expected(m: &Model, passes: usize) -> Vec<Vec<u8>> {
    (0..passes).flat_map(|_| m.want.clone()).collect()
}

/// Every fault kind, every index the clean run reaches.
fn each_fault(m: &Model, run: impl Fn() -> (FaultCounts, ())) -> Vec<(FaultOp, u64)> {
    let _ = m;
    let (counts, ()) = run();
    FaultOp::ALL
        .iter()
        .flat_map(|&op| (0..counts.get(op)).map(move |k| (op, k)))
        .collect()
}

use ferry_pager::device::sim::FaultCounts;

#[test]
fn every_injected_fault_is_an_error_without_leaks_and_the_device_stays_usable() {
    let m = model();
    let passes = 3;
    let want = expected(&m, passes);
    let base = m.dev.resources().held();
    let mut tried = 0;
    let mut errors = 0;
    for (setup, budget) in setups(&m) {
        let faults = each_fault(&m, || {
            m.dev.set_fault_plan(FaultPlan::none());
            let seen = attempt(&m, setup, budget, passes).unwrap();
            assert!(seen == want, "{setup:?}: clean run differs");
            (m.dev.fault_counts(), ())
        });
        assert!(faults.len() > 20, "{setup:?}: only {} calls", faults.len());
        for (op, k) in faults {
            m.dev.set_fault_plan(FaultPlan::nth(op, k));
            let r = attempt(&m, setup, budget, passes);
            let injected = m.dev.fault_counts().injected;
            m.dev.set_fault_plan(FaultPlan::none());
            assert_eq!(
                injected, 1,
                "{setup:?} {op} #{k}: the fault was not reached"
            );
            tried += 1;
            match r {
                Err(e) => {
                    errors += 1;
                    assert!(
                        e.to_string().contains("injected fault"),
                        "{setup:?} {op} #{k}: unclear error: {e}"
                    );
                }
                // Only a failure in cleanup (a sync before freeing) may go unreported, and then
                // the data must still be right.
                Ok(seen) => assert!(seen == want, "{setup:?} {op} #{k}: wrong data, no error"),
            }
            assert_eq!(
                m.dev.resources().held(),
                base,
                "{setup:?} {op} #{k}: resources leaked"
            );
            // The same device, without faults, gives the clean bytes again.
            let again = attempt(&m, setup, budget, 1).unwrap();
            assert!(
                again == expected(&m, 1),
                "{setup:?} after {op} #{k}: data differs"
            );
            assert_eq!(m.dev.resources().held(), base);
        }
    }
    assert!(m.dev.races().is_empty(), "{:?}", m.dev.races());
    assert!(
        errors * 10 >= tried * 9,
        "only {errors} of {tried} faults surfaced"
    );
    eprintln!("{tried} faults injected, {errors} surfaced as errors");
}

#[test]
fn a_scheduler_recovers_after_a_failure_mid_pass() {
    let m = model();
    for (setup, budget) in setups(&m) {
        let faults = each_fault(&m, || {
            let s = scheduler(&m, setup, budget).unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            m.dev.set_fault_plan(FaultPlan::none());
            for _ in 0..2 {
                pass(&m, &s, &seen).unwrap();
            }
            let counts = m.dev.fault_counts();
            drop(s);
            (counts, ())
        });
        for (op, k) in faults {
            let s = scheduler(&m, setup, budget).unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            m.dev.set_fault_plan(FaultPlan::nth(op, k));
            let mut failed = false;
            for _ in 0..2 {
                if let Err(e) = pass(&m, &s, &seen) {
                    assert!(e.to_string().contains("injected fault"), "{e}");
                    failed = true;
                    break;
                }
            }
            m.dev.set_fault_plan(FaultPlan::none());
            if !failed {
                continue;
            }
            // A pass may have been left open; the next one starts afresh.
            let after = Arc::new(Mutex::new(Vec::new()));
            for _ in 0..2 {
                pass(&m, &s, &after).unwrap_or_else(|e| panic!("{setup:?} after {op} #{k}: {e}"));
            }
            s.synchronize().unwrap();
            s.check().unwrap();
            let got = after.lock().unwrap().clone();
            assert!(
                got == expected(&m, 2),
                "{setup:?} after {op} #{k}: wrong data after recovery"
            );
        }
    }
    assert!(m.dev.races().is_empty(), "{:?}", m.dev.races());
}

#[test]
fn a_device_that_stays_broken_gives_errors_not_hangs_or_panics() {
    let m = model();
    let base = m.dev.resources().held();
    for (setup, budget) in setups(&m) {
        for op in FaultOp::ALL {
            for k in [0, 1, 5, 20] {
                m.dev.set_fault_plan(FaultPlan::from_nth(op, k));
                let r = attempt(&m, setup, budget, 2);
                let injected = m.dev.fault_counts().injected;
                m.dev.set_fault_plan(FaultPlan::none());
                if injected > 0 && r.is_ok() {
                    // Only cleanup syncs were hit.
                    assert_eq!(op, FaultOp::Sync, "{setup:?} {op} from #{k}");
                }
                assert_eq!(m.dev.resources().held(), base, "{setup:?} {op} from #{k}");
            }
        }
    }
    let again = attempt(&m, setups(&m)[0].0, setups(&m)[0].1, 2).unwrap();
    assert!(again == expected(&m, 2));
}

/// Device memory, events and streams stay flat over many passes.
#[test]
fn soak_many_passes_keep_memory_events_and_streams_flat() {
    let passes: usize = if std::env::var_os("FERRY_SOAK").is_some() {
        20_000
    } else {
        1_000
    };
    let m = model();
    let (setup, budget) = setups(&m)[0];
    let base = m.dev.resources().held();
    let s = scheduler(&m, setup, budget).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut after_warmup = None;
    for i in 0..passes {
        pass(&m, &s, &seen).unwrap();
        if i % 50 == 0 {
            s.synchronize().unwrap();
            let got = std::mem::take(&mut *seen.lock().unwrap());
            assert!(!got.is_empty() && got.len() % m.want.len() == 0);
            for chunk in got.chunks(m.want.len()) {
                assert!(chunk == m.want, "pass {i}: data differs");
            }
        }
        if i == 10 {
            s.synchronize().unwrap();
            after_warmup = Some(m.dev.resources().held());
        }
    }
    s.synchronize().unwrap();
    let end = m.dev.resources();
    assert_eq!(Some(end.held()), after_warmup, "grew over {passes} passes");
    assert_eq!(end.pending_ops, 0);
    assert!(m.dev.races().is_empty());
    drop(s);
    assert_eq!(m.dev.resources().held(), base);
}

/// A device that fails every call of a kind for a while, then heals: the same scheduler must
/// give the right bytes again (no pin left behind by a release that failed, even while
/// recovering failed too).
#[test]
fn a_scheduler_recovers_after_the_device_heals() {
    let m = model();
    for (setup, budget) in setups(&m) {
        for op in FaultOp::ALL {
            for k in [0, 3, 11] {
                let s = scheduler(&m, setup, budget).unwrap();
                let seen = Arc::new(Mutex::new(Vec::new()));
                m.dev.set_fault_plan(FaultPlan::from_nth(op, k));
                for _ in 0..3 {
                    let _ = pass(&m, &s, &seen);
                }
                m.dev.set_fault_plan(FaultPlan::none());
                // Deferred or pending errors may be reported once more.
                let _ = s.synchronize();
                let after = Arc::new(Mutex::new(Vec::new()));
                for _ in 0..2 {
                    pass(&m, &s, &after)
                        .unwrap_or_else(|e| panic!("{setup:?} after {op} from #{k}: {e}"));
                }
                s.synchronize().unwrap();
                let got = after.lock().unwrap().clone();
                assert!(got == expected(&m, 2), "{setup:?} after {op} from #{k}");
            }
        }
    }
    assert!(m.dev.races().is_empty(), "{:?}", m.dev.races());
}
