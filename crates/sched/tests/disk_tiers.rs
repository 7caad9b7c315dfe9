//! Three-tier placement: the host budget is never exceeded, groups used more often stay in RAM,
//! and the predictor overlaps disk, PCIe and compute.

use ferry_pager::disk::{DiskConfig, SimDiskConfig};
use ferry_pager::HostPtr;
use ferry_sched::plan::plan;
use ferry_sched::tiers::{plan_tiers, DiskCost, Tier};
use ferry_sched::{CostModel, GroupDesc, GroupId, Mode, Problem, TensorSource};
use proptest::prelude::*;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn problem(sizes: &[u64], compute: &[Duration], order: Vec<usize>) -> Problem {
    let groups = sizes
        .iter()
        .zip(compute)
        .enumerate()
        .map(|(i, (&b, &c))| GroupDesc {
            name: format!("g{i}"),
            component: "unet".into(),
            tensors: vec![TensorSource {
                name: format!("g{i}.w"),
                host: HostPtr(1),
                offset: 0,
                bytes: b,
            }],
            compute: c,
        })
        .collect();
    Problem {
        groups,
        order: order.into_iter().map(GroupId).collect(),
        reserve: 0,
        cost: CostModel {
            h2d_bandwidth: 25e9,
            copy_latency: Duration::from_micros(5),
            launch_latency: Duration::from_micros(3),
        },
        run_ahead: 4,
    }
}

fn disk(bw: f64) -> DiskCost {
    DiskCost::of_sim(
        SimDiskConfig {
            bandwidth: bw,
            latency: Duration::from_micros(80),
            queue_depth: 4,
        },
        DiskConfig {
            chunks: 4,
            chunk_bytes: 4 * MIB,
            request_bytes: MIB,
            readers: 2,
            ..DiskConfig::default()
        },
    )
}

#[test]
fn everything_fits_everything_pinned_no_disk_tier() {
    let p = problem(
        &[8 * MIB; 6],
        &[Duration::from_millis(1); 6],
        (0..6).collect(),
    );
    let (layout, _) = plan(&p, Mode::Auto, 24 * MIB).unwrap();
    let t = plan_tiers(&p, &layout, 64 * MIB, &disk(2e9)).unwrap();
    assert_eq!(t.count(Tier::Disk), 0);
    assert_eq!(t.staging_bytes, 0);
    assert_eq!(t.disk_bytes_per_pass, 0);
    assert_eq!(t.predicted_pass, t.in_ram_pass);
    assert!(t.host_bytes() <= 64 * MIB);
}

#[test]
fn a_budget_below_the_staging_ring_is_a_clear_error() {
    let p = problem(
        &[8 * MIB; 6],
        &[Duration::from_millis(1); 6],
        (0..6).collect(),
    );
    let (layout, _) = plan(&p, Mode::Auto, 24 * MIB).unwrap();
    let err = plan_tiers(&p, &layout, 10 * MIB, &disk(2e9))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("smaller than the disk tier's staging ring"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
}

#[test]
fn groups_used_every_pass_stay_in_ram_before_groups_used_once() {
    // Groups 0..4 run every pass; 4 and 5 (a text encoder, a VAE) are outside the pass.
    let p = problem(
        &[12 * MIB; 6],
        &[Duration::from_millis(1); 6],
        (0..4).collect(),
    );
    let (layout, _) = plan(&p, Mode::Group { depth: 2 }, 36 * MIB).unwrap();
    let staging = disk(2e9).staging.host_bytes();
    let t = plan_tiers(&p, &layout, staging + 48 * MIB, &disk(2e9)).unwrap();
    assert_eq!(&t.tiers[..4], &[Tier::Pinned; 4], "{}", t.table());
    assert_eq!(&t.tiers[4..], &[Tier::Disk; 2], "{}", t.table());
    assert_eq!(t.disk_bytes_per_pass, 0);
    assert!(t.host_bytes() <= staging + 48 * MIB);
}

#[test]
fn disk_bound_pass_runs_at_disk_speed_and_compute_hides_it_when_it_can() {
    let sizes = [16 * MIB; 8];
    // 16 MiB at 1 GB/s = 16.8 ms per group.
    let read = Duration::from_nanos(16 * MIB);
    let budget_dev = 48 * MIB;
    let host = disk(1e9).staging.host_bytes();
    for (compute, disk_bound) in [(Duration::from_micros(100), true), (read * 2, false)] {
        let p = problem(&sizes, &[compute; 8], (0..8).collect());
        let (layout, _) = plan(&p, Mode::Group { depth: 2 }, budget_dev).unwrap();
        let t = plan_tiers(&p, &layout, host, &disk(1e9)).unwrap();
        assert_eq!(t.count(Tier::Disk), 8, "{}", t.table());
        assert_eq!(t.disk_bytes_per_pass, 8 * 16 * MIB);
        let pass = t.predicted_pass.as_secs_f64();
        let disk_time = (8 * 16 * MIB) as f64 / 1e9;
        let compute_time = compute.as_secs_f64() * 8.0;
        if disk_bound {
            assert!(pass >= disk_time, "{pass} < {disk_time}");
            assert!(pass < disk_time * 1.15, "{pass} vs disk {disk_time}\n{t}");
        } else {
            // Reads overlap compute: the pass is compute plus at most about one group's read.
            assert!(pass >= compute_time);
            assert!(pass < compute_time + 2.0 * read.as_secs_f64(), "{t}");
            assert!(t.predicted_stall < read * 3, "{t}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn host_and_device_budgets_are_never_exceeded(
        sizes in prop::collection::vec(1u64..(12 * MIB), 2..10),
        compute_us in prop::collection::vec(0u64..20_000, 10),
        dev_extra in 0u64..(64 * MIB),
        host_frac in 0.0f64..1.5,
    ) {
        let n = sizes.len();
        let compute: Vec<Duration> =
            compute_us[..n].iter().map(|&c| Duration::from_micros(c)).collect();
        let p = problem(&sizes, &compute, (0..n).collect());
        let max = sizes.iter().map(|b| b.div_ceil(256) * 256).max().unwrap();
        let dev_budget = max + dev_extra;
        let (layout, _) = plan(&p, Mode::Auto, dev_budget).unwrap();
        prop_assert!(layout.resident_bytes + layout.staging_bytes <= dev_budget);
        let d = disk(2e9);
        let total: u64 = sizes.iter().map(|b| b.div_ceil(256) * 256).sum();
        let host_budget = (total as f64 * host_frac) as u64 + d.staging.host_bytes() / 2;
        match plan_tiers(&p, &layout, host_budget, &d) {
            Ok(t) => {
                prop_assert!(t.host_bytes() <= host_budget, "{} > {host_budget}", t.host_bytes());
                for (g, tier) in t.tiers.iter().enumerate() {
                    prop_assert_eq!(*tier == Tier::Vram, layout.resident[g]);
                }
                let pinned: u64 = (0..n)
                    .filter(|&g| t.tiers[g] == Tier::Pinned)
                    .map(|g| p.groups[g].device_bytes())
                    .sum();
                if t.count(Tier::Disk) > 0 {
                    prop_assert_eq!(pinned, t.pinned_bytes);
                }
                let compute_sum: Duration = compute.iter().sum();
                prop_assert!(t.predicted_pass >= compute_sum);
            }
            Err(e) => {
                prop_assert!(total > host_budget);
                prop_assert!(d.staging.host_bytes() > host_budget, "{e}");
            }
        }
    }
}

#[test]
fn calibration_reads_the_file_and_reports_how() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.bin");
    let data: Vec<u8> = (0..(8 * MIB) as u32).map(|i| (i * 31) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let d = DiskCost::calibrate(&path, DiskConfig::default(), 8 * MIB).unwrap();
    assert!(
        d.disk.bandwidth.is_finite() && d.disk.bandwidth > 1e6,
        "{d:?}"
    );
    assert!(
        d.read_mode.starts_with("O_DIRECT") || d.read_mode.starts_with("buffered"),
        "{}",
        d.read_mode
    );
    assert_eq!(d.disk.queue_depth, DiskConfig::default().readers);
    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let err = DiskCost::calibrate(&empty, DiskConfig::default(), MIB)
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty file"), "{err}");
}
