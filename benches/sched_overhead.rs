//! Host-side cost of the scheduler's hot path: `Scheduler::acquire` + `Scheduler::release` of the
//! next group in the plan's order, for a resident hit (`Mode::None`) and for a streamed group
//! (`Mode::Group { depth: 2 }`, every use copied through the staging ring and prefetched ahead).
//! The device work is asynchronous and not included.
//!
//! Each case runs on the simulated device and on a do-nothing device, which isolates the
//! scheduler's own bookkeeping from the device calls. Target: ≤ 2 µs median per acquire + release.
//! `cargo bench -p ferry-sched --bench sched_overhead`.

use criterion::{criterion_group, criterion_main, Criterion};
use ferry_pager::device::null::NullDevice;
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::{Device, HostMemKind};
use ferry_sched::{CostModel, GroupDesc, GroupId, Mode, Scheduler, SchedulerConfig, TensorSource};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const GROUPS: usize = 48;
/// Small layer-like groups (a 16 KiB weight, a 1 KiB bias, a norm pair): the simulator's byte
/// copying stays negligible next to the bookkeeping being measured.
const TENSORS: [u64; 4] = [16 << 10, 1 << 10, 512, 512];

/// `GROUPS` groups in one pinned allocation, used in index order each pass.
fn model(dev: &dyn Device) -> (Vec<GroupDesc>, Vec<GroupId>, u64) {
    let per_group: u64 = TENSORS.iter().sum();
    let host = dev
        .alloc_host(per_group * GROUPS as u64, HostMemKind::Upload)
        .expect("pinned host memory for the bench model");
    let mut off = 0;
    let groups = (0..GROUPS)
        .map(|i| {
            let tensors = TENSORS
                .iter()
                .enumerate()
                .map(|(j, &bytes)| {
                    let t = TensorSource {
                        name: format!("block{i}.t{j}"),
                        host,
                        offset: off,
                        bytes,
                    };
                    off += bytes;
                    t
                })
                .collect();
            GroupDesc {
                name: format!("block{i}"),
                component: "unet".into(),
                tensors,
                compute: Duration::from_micros(20),
            }
        })
        .collect();
    (groups, (0..GROUPS).map(GroupId).collect(), per_group)
}

fn scheduler(dev: Arc<dyn Device>, mode: Mode, budget_groups: u64) -> (Scheduler, Vec<GroupId>) {
    let (groups, order, per_group) = model(dev.as_ref());
    let reserve = 64 << 10;
    let cfg = SchedulerConfig {
        mode,
        budget: reserve + budget_groups * per_group + 4096,
        reserve,
        run_ahead: 16,
        metrics: false,
        cost: CostModel::of_sim(&SimConfig::default()),
    };
    let s = Scheduler::new(dev, groups, order.clone(), cfg).expect("bench scheduler");
    (s, order)
}

/// A device to bench on: name, the device, and the simulator behind it if it is one.
type Case = (&'static str, Arc<dyn Device>, Option<Arc<SimDevice>>);

fn devices() -> [Case; 2] {
    let sim = SimDevice::new(SimConfig::default());
    [
        ("sim", sim.clone(), Some(sim)),
        ("null", Arc::new(NullDevice::default()), None),
    ]
}

/// Times `iters` acquire + release pairs along the order; untimed every 512 pairs, drains the
/// simulator's queue and trace so they do not grow.
fn run_pairs(
    s: &Scheduler,
    order: &[GroupId],
    cursor: &mut usize,
    sim: Option<&SimDevice>,
    iters: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let batch = (iters - done).min(512);
        let t = Instant::now();
        for _ in 0..batch {
            let g = order[*cursor % order.len()];
            *cursor += 1;
            let v = s.acquire(black_box(g)).expect("acquire");
            black_box(&v.tensors);
            s.release(g).expect("release");
        }
        total += t.elapsed();
        done += batch;
        s.synchronize().expect("synchronize");
        if let Some(sim) = sim {
            sim.take_timeline();
        }
    }
    total
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("sched");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let cases = [
        ("resident", Mode::None, GROUPS as u64),
        ("streamed", Mode::Group { depth: 2 }, GROUPS as u64 / 4),
    ];
    for (case, mode, budget_groups) in cases {
        for (name, dev, sim) in devices() {
            let (s, order) = scheduler(dev, mode, budget_groups);
            let mut cursor = 0;
            g.bench_function(format!("acquire_release_{case}/{name}"), |b| {
                b.iter_custom(|iters| run_pairs(&s, &order, &mut cursor, sim.as_deref(), iters))
            });
            if case == "streamed" {
                // Every use went through the ring: a pass of uses copied at least a pass of groups.
                assert!(s.bytes_copied() > 0, "{case}/{name} copied nothing");
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
