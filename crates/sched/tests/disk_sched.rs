//! The scheduler with a disk tier on the simulated device: what kernels see is bit-identical to
//! the all-in-RAM run, budgets hold, chunk reuse is fenced (race checkers clean), and the
//! three-tier predictor matches the simulated pass.

use ferry_pager::device::sim::{KernelSpec, SimConfig, SimDevice};
use ferry_pager::disk::{DiskConfig, DiskTier, SimDiskConfig};
use ferry_pager::{Device, HostMemKind};
use ferry_sched::plan::plan;
use ferry_sched::tiers::{plan_tiers, predict_tiers, DiskCost, Tier};
use ferry_sched::{
    CostModel, GroupDesc, GroupId, Mode, Problem, Scheduler, SchedulerConfig, TensorSource,
};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KIB: u64 = 1 << 10;
/// Bytes before the first tensor: odd, so no tensor offset is aligned.
const PREFIX: u64 = 101;

struct Model {
    /// Tensor sizes per group.
    sizes: Vec<Vec<u64>>,
    /// Tensor bytes per group.
    data: Vec<Vec<Vec<u8>>>,
    /// File offset of each tensor.
    offsets: Vec<Vec<u64>>,
    compute: Vec<Duration>,
}

fn bytes(seed: u64, n: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn write_model(path: &Path, groups: usize, compute: Duration) -> Model {
    let mut blob = bytes(999, PREFIX);
    let (mut sizes, mut data, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
    for g in 0..groups as u64 {
        let s = vec![300 * KIB + 13 * g, 7 * KIB + 1, 900 * KIB + 3 * g];
        let mut d = Vec::new();
        let mut o = Vec::new();
        for (t, &b) in s.iter().enumerate() {
            o.push(blob.len() as u64);
            let v = bytes(g * 10 + t as u64, b);
            blob.extend_from_slice(&v);
            d.push(v);
        }
        sizes.push(s);
        data.push(d);
        offsets.push(o);
    }
    std::fs::write(path, &blob).unwrap();
    Model {
        sizes,
        data,
        offsets,
        compute: vec![compute; groups],
    }
}

fn sim() -> Arc<SimDevice> {
    SimDevice::new(SimConfig {
        capacity: 256 << 20,
        ..SimConfig::default()
    })
}

fn disk_cfg() -> (DiskConfig, SimDiskConfig) {
    (
        DiskConfig {
            chunks: 4,
            chunk_bytes: 1 << 20,
            request_bytes: 256 * KIB,
            readers: 2,
            ..DiskConfig::default()
        },
        SimDiskConfig {
            bandwidth: 2e9,
            latency: Duration::from_micros(80),
            queue_depth: 4,
        },
    )
}

/// Groups whose tensors are pinned on `dev` (tier `Pinned`, or every group when `tiers` is
/// `None`) or left in the file behind `handle`.
fn groups(
    m: &Model,
    dev: &SimDevice,
    tiers: Option<&[Tier]>,
    handle: ferry_pager::HostPtr,
) -> Vec<GroupDesc> {
    (0..m.sizes.len())
        .map(|g| {
            let pinned = tiers.is_none_or(|t| t[g] == Tier::Pinned);
            let tensors = m.sizes[g]
                .iter()
                .enumerate()
                .map(|(t, &b)| {
                    let (host, offset) = if pinned {
                        let h = dev.alloc_host(b, HostMemKind::Upload).unwrap();
                        dev.host_write(h, 0, &m.data[g][t]).unwrap();
                        (h, 0)
                    } else {
                        (handle, m.offsets[g][t])
                    };
                    TensorSource {
                        name: format!("g{g}.t{t}"),
                        host,
                        offset,
                        bytes: b,
                    }
                })
                .collect();
            GroupDesc {
                name: format!("block{g}"),
                component: "unet".into(),
                tensors,
                compute: m.compute[g],
            }
        })
        .collect()
}

fn cfg(dev: &SimDevice, budget: u64) -> SchedulerConfig {
    SchedulerConfig {
        mode: Mode::Auto,
        budget,
        reserve: 0,
        run_ahead: 64,
        metrics: true,
        cost: CostModel::of_sim(dev.config()),
    }
}

/// Runs `passes` passes, each use a kernel reading the group; returns what kernels saw and the
/// last pass time (virtual ns).
fn run(
    dev: &Arc<SimDevice>,
    s: &Scheduler,
    n: usize,
    budget: u64,
    passes: usize,
) -> (Vec<Vec<u8>>, f64) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..passes {
        s.begin_pass().unwrap();
        for g in 0..n {
            let view = s.acquire(GroupId(g)).unwrap();
            let mut spec = KernelSpec::new(format!("block{g}"), Duration::from_micros(400));
            for r in &view.tensors {
                spec = spec.reads(*r);
            }
            let ranges = view.tensors.clone();
            let out = seen.clone();
            dev.launch(s.compute_stream(), spec, move |mem| {
                let mut all = Vec::new();
                for r in ranges {
                    all.extend(mem.read(r)?);
                }
                out.lock().unwrap().push(all);
                Ok(())
            })
            .unwrap();
            s.release(GroupId(g)).unwrap();
            assert!(dev.device_bytes_allocated() <= budget);
        }
        s.end_pass().unwrap();
    }
    s.synchronize().unwrap();
    let t = s.metrics().unwrap().passes.last().unwrap().time_ns;
    let v = seen.lock().unwrap().clone();
    (v, t)
}

#[test]
fn disk_tier_run_is_bit_identical_within_budgets_and_matches_the_prediction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.bin");
    let n = 8;
    let m = write_model(&path, n, Duration::from_micros(400));
    let total: u64 = m
        .sizes
        .iter()
        .flatten()
        .map(|b| b.div_ceil(256) * 256)
        .sum();
    let budget = total / 3;

    // All in RAM.
    let dev_a = sim();
    let ga = groups(&m, &dev_a, None, ferry_pager::HostPtr(0));
    let order: Vec<GroupId> = (0..n).map(GroupId).collect();
    let sa = Scheduler::new(dev_a.clone(), ga, order.clone(), cfg(&dev_a, budget)).unwrap();
    let (seen_a, _) = run(&dev_a, &sa, n, budget, 3);
    dev_a.check_races().unwrap();

    let (dcfg, sdisk) = disk_cfg();
    let cost = DiskCost::of_sim(sdisk, dcfg.clone());
    for host_budget in [dcfg.host_bytes() + total / 2, dcfg.host_bytes()] {
        let dev = sim();
        let tier = Arc::new(DiskTier::open_sim(dev.clone(), &path, dcfg.clone(), sdisk).unwrap());
        // Plan on the problem as the scheduler will see it (sources do not change costs).
        let probe = groups(&m, &dev, Some(&[Tier::Disk; 8]), tier.host_handle());
        let p = Problem {
            groups: probe,
            order: order.clone(),
            reserve: 0,
            cost: CostModel::of_sim(dev.config()),
            run_ahead: 64,
        };
        let (layout, _) = plan(&p, Mode::Auto, budget).unwrap();
        let tp = plan_tiers(&p, &layout, host_budget, &cost).unwrap();
        assert!(tp.host_bytes() <= host_budget, "{tp}");
        assert!(tp.count(Tier::Disk) > 0, "{tp}");
        let gb = groups(&m, &dev, Some(&tp.tiers), tier.host_handle());
        let host_pinned = dev.host_bytes_allocated();
        let ring_pinned = dcfg.ring_bytes();
        assert!(host_pinned <= tp.pinned_bytes + ring_pinned + 256 * 24);
        let sb = Scheduler::with_disk(
            dev.clone(),
            gb,
            order.clone(),
            cfg(&dev, budget),
            tier.clone(),
        )
        .unwrap();
        let (seen_b, actual) = run(&dev, &sb, n, budget, 3);
        assert_eq!(
            seen_a, seen_b,
            "disk-tier run saw different bytes ({host_budget})"
        );
        dev.check_races().unwrap();
        assert!(tier.reuse_races().is_empty());
        assert!(dev.device_bytes_peak() <= budget);
        let (pred, disk_bytes) = predict_tiers(&p, &layout, &tp.tiers, &cost);
        let err = (pred.pass_ns - actual).abs() / actual;
        eprintln!(
            "host budget {host_budget}: {} disk groups, simulated pass {actual} ns, predicted {} ns ({:.1} %), disk {disk_bytes} B/pass\n{tp}",
            tp.count(Tier::Disk),
            pred.pass_ns,
            err * 100.0
        );
        assert!(
            err <= 0.05,
            "predicted {} ns vs simulated {actual} ns",
            pred.pass_ns
        );
        drop(sb);
        drop(tier);
        assert_eq!(dev.resources().events, 0);
    }
}

#[test]
fn groups_from_two_files_each_behind_its_own_tier_are_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("unet.bin");
    let n = 6;
    let m = write_model(&a, n, Duration::from_micros(200));
    let b = dir.path().join("copy.bin");
    std::fs::copy(&a, &b).unwrap();
    let total: u64 = m
        .sizes
        .iter()
        .flatten()
        .map(|b| b.div_ceil(256) * 256)
        .sum();
    let budget = total / 2;
    let order: Vec<GroupId> = (0..n).map(GroupId).collect();

    let dev_a = sim();
    let ga = groups(&m, &dev_a, None, ferry_pager::HostPtr(0));
    let sa = Scheduler::new(dev_a.clone(), ga, order.clone(), cfg(&dev_a, budget)).unwrap();
    let (seen_a, _) = run(&dev_a, &sa, n, budget, 2);

    let dev = sim();
    let (dcfg, sdisk) = disk_cfg();
    let ta = Arc::new(DiskTier::open_sim(dev.clone(), &a, dcfg.clone(), sdisk).unwrap());
    let tb = Arc::new(DiskTier::open_sim(dev.clone(), &b, dcfg, sdisk).unwrap());
    let mut gs = groups(&m, &dev, Some(&[Tier::Disk; 6]), ta.host_handle());
    for g in &mut gs[n / 2..] {
        for t in &mut g.tensors {
            t.host = tb.host_handle();
        }
    }
    let s = Scheduler::with_disks(
        dev.clone(),
        gs,
        order,
        cfg(&dev, budget),
        vec![ta.clone(), tb.clone()],
    )
    .unwrap();
    let (seen_b, _) = run(&dev, &s, n, budget, 2);
    assert_eq!(seen_a, seen_b);
    assert!(ta.stats().loads > 0 && tb.stats().loads > 0);
    dev.check_races().unwrap();
    assert!(ta.reuse_races().is_empty() && tb.reuse_races().is_empty());
}

/// Writes a safetensors file of F32 tensors `l{g}.w{t}` with the given element counts.
fn write_safetensors(path: &Path, counts: &[Vec<u64>]) -> Vec<Vec<Vec<u8>>> {
    let mut parts = Vec::new();
    let mut blob = Vec::new();
    let mut data = Vec::new();
    for (g, ts) in counts.iter().enumerate() {
        let mut d = Vec::new();
        for (t, &c) in ts.iter().enumerate() {
            let v = bytes((g * 7 + t) as u64, c * 4);
            parts.push(format!(
                "\"l{g}.w{t}\":{{\"dtype\":\"F32\",\"shape\":[{c}],\"data_offsets\":[{},{}]}}",
                blob.len(),
                blob.len() + v.len()
            ));
            blob.extend_from_slice(&v);
            d.push(v);
        }
        data.push(d);
    }
    let header = format!("{{{}}}", parts.join(","));
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&blob);
    std::fs::write(path, out).unwrap();
    data
}

#[test]
fn host_store_tensors_left_on_disk_stream_through_the_scheduler() {
    use ferry_pager::{HostStore, LoadOptions, WeightsFile};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let counts: Vec<Vec<u64>> = (0..6u64)
        .map(|g| vec![75_001 + g, 33, 160_000 + 5 * g])
        .collect();
    let data = write_safetensors(&path, &counts);
    let dev = sim();
    let (dcfg, sdisk) = disk_cfg();
    let tier = Arc::new(DiskTier::open_sim(dev.clone(), &path, dcfg, sdisk).unwrap());
    let file = WeightsFile::open(&path).unwrap();
    let store = HostStore::new(dev.clone());
    // Groups 0, 2, 4 pinned (used every pass), the rest left on disk.
    let names = |gs: &[usize]| -> Vec<String> {
        gs.iter()
            .flat_map(|&g| (0..3).map(move |t| format!("l{g}.w{t}")))
            .collect()
    };
    let pinned = LoadOptions {
        names: Some(names(&[0, 2, 4])),
        ..LoadOptions::default()
    };
    let on_disk = LoadOptions {
        names: Some(names(&[1, 3, 5])),
        ..LoadOptions::default()
    };
    store.load_weights(&file, &pinned).unwrap();
    store.register_on_disk(&file, &on_disk, &tier).unwrap();
    // Only the pinned half takes host memory.
    let half: u64 = [0, 2, 4]
        .iter()
        .flat_map(|&g| &counts[g])
        .map(|c| c * 4)
        .sum();
    assert!(store.pinned_bytes() >= half && store.pinned_bytes() < half + 256 * 9);
    assert_eq!(
        dev.host_bytes_allocated(),
        store.pinned_bytes() + 4 * (1 << 20)
    );
    let descs: Vec<GroupDesc> = (0..6)
        .map(|g| GroupDesc {
            name: format!("l{g}"),
            component: "unet".into(),
            tensors: (0..3)
                .map(|t| {
                    let id = store.id(&format!("l{g}.w{t}")).unwrap();
                    let h = store.tensor(id).unwrap();
                    TensorSource {
                        name: h.name,
                        host: h.host,
                        offset: h.offset,
                        bytes: h.len,
                    }
                })
                .collect(),
            compute: Duration::from_micros(300),
        })
        .collect();
    let on_disk_groups = descs
        .iter()
        .filter(|d| d.tensors[0].host == tier.host_handle())
        .count();
    assert_eq!(on_disk_groups, 3);
    let total: u64 = descs.iter().map(|d| d.device_bytes()).sum();
    let budget = total / 2;
    let s = Scheduler::with_disk(
        dev.clone(),
        descs,
        (0..6).map(GroupId).collect(),
        cfg(&dev, budget),
        tier.clone(),
    )
    .unwrap();
    let (seen, _) = run(&dev, &s, 6, budget, 2);
    let want: Vec<Vec<u8>> = (0..2)
        .flat_map(|_| data.iter().map(|d| d.concat()))
        .collect();
    assert_eq!(seen, want);
    dev.check_races().unwrap();
    assert!(tier.stats().loads > 0);
    // A second file is not the tier's: refused.
    let other = dir.path().join("other.safetensors");
    write_safetensors(&other, &counts);
    let f2 = WeightsFile::open(&other).unwrap();
    let err = store
        .register_on_disk(&f2, &LoadOptions::default(), &tier)
        .unwrap_err()
        .to_string();
    assert!(err.contains("the disk tier reads"), "{err}");
}

/// Predicted vs simulated pass over compute times, disk speeds and host budgets.
#[test]
fn three_tier_prediction_is_within_five_percent_across_costs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.bin");
    let n = 8;
    let mut worst: f64 = 0.0;
    for compute_us in [100u64, 400, 2000] {
        let m = write_model(&path, n, Duration::from_micros(compute_us));
        let total: u64 = m
            .sizes
            .iter()
            .flatten()
            .map(|b| b.div_ceil(256) * 256)
            .sum();
        let budget = total / 3;
        let order: Vec<GroupId> = (0..n).map(GroupId).collect();
        for disk_gbps in [0.5, 2.0, 8.0] {
            let (dcfg, mut sdisk) = disk_cfg();
            sdisk.bandwidth = disk_gbps * 1e9;
            let cost = DiskCost::of_sim(sdisk, dcfg.clone());
            for host_budget in [dcfg.host_bytes(), dcfg.host_bytes() + total / 2] {
                let dev = sim();
                let tier =
                    Arc::new(DiskTier::open_sim(dev.clone(), &path, dcfg.clone(), sdisk).unwrap());
                let probe = groups(&m, &dev, Some(&[Tier::Disk; 8]), tier.host_handle());
                let p = Problem {
                    groups: probe,
                    order: order.clone(),
                    reserve: 0,
                    cost: CostModel::of_sim(dev.config()),
                    run_ahead: 64,
                };
                let (layout, _) = plan(&p, Mode::Auto, budget).unwrap();
                let tp = plan_tiers(&p, &layout, host_budget, &cost).unwrap();
                let gb = groups(&m, &dev, Some(&tp.tiers), tier.host_handle());
                let s = Scheduler::with_disk(
                    dev.clone(),
                    gb,
                    order.clone(),
                    cfg(&dev, budget),
                    tier.clone(),
                )
                .unwrap();
                let (_, actual) = run_with_compute(&dev, &s, n, budget, 3, compute_us);
                let predicted = tp.predicted_pass.as_nanos() as f64;
                let err = (predicted - actual).abs() / actual;
                eprintln!(
                    "compute {compute_us} us, disk {disk_gbps} GB/s, host {host_budget}: \
                     {} on disk, simulated {actual:.0} ns, predicted {predicted:.0} ns ({:.2} %)",
                    tp.count(Tier::Disk),
                    err * 100.0
                );
                worst = worst.max(err);
            }
        }
    }
    assert!(
        worst <= 0.05,
        "worst prediction error {:.2} %",
        worst * 100.0
    );
}

fn run_with_compute(
    dev: &Arc<SimDevice>,
    s: &Scheduler,
    n: usize,
    budget: u64,
    passes: usize,
    compute_us: u64,
) -> (Vec<Vec<u8>>, f64) {
    for _ in 0..passes {
        s.begin_pass().unwrap();
        for g in 0..n {
            let view = s.acquire(GroupId(g)).unwrap();
            let mut spec = KernelSpec::new(format!("block{g}"), Duration::from_micros(compute_us));
            for r in &view.tensors {
                spec = spec.reads(*r);
            }
            dev.launch(s.compute_stream(), spec, |_| Ok(())).unwrap();
            s.release(GroupId(g)).unwrap();
            assert!(dev.device_bytes_allocated() <= budget);
        }
        s.end_pass().unwrap();
    }
    s.synchronize().unwrap();
    let t = s.metrics().unwrap().passes.last().unwrap().time_ns;
    (Vec::new(), t)
}

#[test]
fn trace_shows_disk_reads_on_their_own_track_before_their_copies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.bin");
    let n = 6;
    let m = write_model(&path, n, Duration::from_micros(400));
    let (dcfg, sdisk) = disk_cfg();
    let dev = sim();
    let tier = Arc::new(DiskTier::open_sim(dev.clone(), &path, dcfg, sdisk).unwrap());
    let g = groups(&m, &dev, Some(&[Tier::Disk; 6]), tier.host_handle());
    let order: Vec<GroupId> = (0..n).map(GroupId).collect();
    let budget = 4 << 20;
    let s = Scheduler::with_disk(dev.clone(), g, order, cfg(&dev, budget), tier.clone()).unwrap();
    run(&dev, &s, n, budget, 2);
    let metrics = s.metrics().unwrap();
    let disk: Vec<_> = metrics.slices.iter().filter(|x| x.lane == "disk").collect();
    let stats = tier.stats();
    assert_eq!(disk.len() as u64, stats.spans, "one slice per staged span");
    assert_eq!(disk.iter().map(|x| x.bytes).sum::<u64>(), stats.read_bytes);
    assert!(disk.iter().all(|x| x.start_ns < x.end_ns), "{disk:?}");
    // Each read of a group ends before that group's copy (out of the staging chunk) ends.
    let copies: Vec<_> = metrics.slices.iter().filter(|x| x.lane == "copy").collect();
    let first_copy = copies
        .iter()
        .map(|c| c.end_ns)
        .fold(f64::INFINITY, f64::min);
    let first_read = disk.iter().map(|d| d.end_ns).fold(f64::INFINITY, f64::min);
    assert!(
        first_read <= first_copy,
        "read {first_read} vs copy {first_copy}"
    );
    let trace: serde_json::Value = serde_json::from_str(&metrics.chrome_trace()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    assert!(events
        .iter()
        .any(|e| e["tid"] == 3 && e["args"]["name"] == "disk reads"));
    let on_track = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["tid"] == 3 && e["cat"] == "disk")
        .count();
    assert_eq!(on_track, disk.len());
}
