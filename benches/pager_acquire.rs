//! Host-side cost of the pager's hot calls: acquire + release of a resident group (the steady
//! state of a model that fits), and acquire + release of a group that misses (evicts the previous
//! occupant, waits on its fences, enqueues the copy, records the ready event).
//!
//! Each case runs on the simulated device and on a do-nothing device, which isolates the pager's
//! own bookkeeping from the device calls. `cargo bench -p ferry-pager --bench pager_acquire`.

use criterion::{criterion_group, criterion_main, Criterion};
use ferry_pager::device::null::NullDevice;
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::{DType, Device, GroupId, HostStore, Pager, Policy, RawTensor, StreamId};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Layer-like groups (a 1 MiB weight, a 4 KiB bias, a norm pair), `n` of them, with a budget of
/// `fit` groups; 50 other groups are defined too, so lookups are not trivially small.
fn setup(dev: Arc<dyn Device>, n: usize, fit: u64) -> (Pager, Vec<GroupId>, StreamId, StreamId) {
    let store = Arc::new(HostStore::new(dev.clone()));
    let w = vec![1u8; 1 << 20];
    let b = vec![2u8; 4096];
    let names: Vec<[String; 4]> = (0..n)
        .map(|i| {
            [
                format!("l{i}.weight"),
                format!("l{i}.bias"),
                format!("l{i}.norm.weight"),
                format!("l{i}.norm.bias"),
            ]
        })
        .collect();
    let mut raw = Vec::new();
    for nm in &names {
        raw.push(RawTensor {
            name: &nm[0],
            dtype: DType::F16,
            shape: &[1 << 19],
            data: &w,
        });
        for x in &nm[1..] {
            raw.push(RawTensor {
                name: x,
                dtype: DType::F16,
                shape: &[2048],
                data: &b,
            });
        }
    }
    let ids = store.register_batch(&raw).unwrap();
    let group_bytes = (1 << 20) + 3 * 4096;
    let pager = Pager::new(dev.clone(), store, fit * group_bytes, Policy::Lru).unwrap();
    let groups: Vec<GroupId> = ids
        .chunks(4)
        .enumerate()
        .map(|(i, t)| pager.define_group(&format!("layer{i}"), t).unwrap())
        .collect();
    let c = dev.create_stream().unwrap();
    let k = dev.create_stream().unwrap();
    (pager, groups, c, k)
}

fn resident(c: &mut Criterion) {
    let mut g = c.benchmark_group("pager");
    g.sample_size(50).measurement_time(Duration::from_secs(3));
    let sim = SimDevice::new(SimConfig::default());
    let devices: [(&str, Arc<dyn Device>); 2] = [
        ("sim", sim.clone()),
        ("null", Arc::new(NullDevice::default())),
    ];
    for (name, dev) in devices {
        let (pager, groups, cs, ks) = setup(dev, 50, 50);
        let grp = groups[7];
        pager.acquire(grp, cs, ks).unwrap();
        pager.release(grp, cs).unwrap();
        g.bench_function(format!("acquire_release_resident/{name}"), |b| {
            b.iter(|| {
                let v = pager.acquire(black_box(grp), cs, ks).unwrap();
                black_box(v.range(0));
                pager.release(grp, cs).unwrap();
            })
        });
    }
    g.finish();
}

fn miss(c: &mut Criterion) {
    let mut g = c.benchmark_group("pager");
    g.sample_size(30).measurement_time(Duration::from_secs(3));
    let sim = SimDevice::new(SimConfig::default());
    let devices: [(&str, Arc<dyn Device>); 2] = [
        ("sim", sim.clone()),
        ("null", Arc::new(NullDevice::default())),
    ];
    for (name, dev) in devices {
        // Budget of one group: every acquire evicts the other and schedules a copy.
        let (pager, groups, cs, ks) = setup(dev.clone(), 50, 1);
        let mut i = 0usize;
        g.bench_function(format!("acquire_release_miss/{name}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let batch = (iters - done).min(512);
                    let t = Instant::now();
                    for _ in 0..batch {
                        let grp = groups[i % 2];
                        i += 1;
                        let v = pager.acquire(grp, cs, ks).unwrap();
                        black_box(v.range(0));
                        pager.release(grp, cs).unwrap();
                    }
                    total += t.elapsed();
                    done += batch;
                    // Untimed: let the simulator retire its queued work so it does not grow.
                    dev.sync_stream(cs).unwrap();
                    dev.sync_stream(ks).unwrap();
                    if name == "sim" {
                        sim.take_timeline();
                    }
                }
                total
            })
        });
        assert!(pager.stats().misses > 0 && pager.stats().hits == 0);
    }
    g.finish();
}

criterion_group!(benches, resident, miss);
criterion_main!(benches);
