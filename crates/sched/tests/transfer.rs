//! `ferry_sched::transfer` on the simulated device, whose bandwidths are known.

use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_sched::transfer::{overlap_fraction, table_sizes, TransferRig};
use ferry_sched::Error;
use std::time::Duration;

const MIB: u64 = 1 << 20;

#[test]
fn sim_bandwidth_and_overlap_match_its_model_and_free_everything() {
    let cfg = SimConfig::default();
    let sim = SimDevice::new(cfg.clone());
    let rig = TransferRig::new(sim.clone(), 64 * MIB).unwrap();
    assert_eq!(sim.live_allocations(), (1, 1));

    let bw = rig.bandwidth().unwrap();
    let sizes: Vec<u64> = bw.rows.iter().map(|r| r.bytes).collect();
    assert_eq!(sizes, table_sizes(64 * MIB));
    assert_eq!(*sizes.last().unwrap(), 64 * MIB);
    let want = cfg.h2d_bandwidth / 1e9;
    let big = bw.rows.last().unwrap();
    assert!(
        (big.pinned_gbps / want - 1.0).abs() < 0.02,
        "pinned {} GB/s at 64 MiB, sim configured {want} GB/s",
        big.pinned_gbps
    );
    assert!((bw.reference_gbps / want - 1.0).abs() < 0.02);
    for r in &bw.rows {
        assert!(
            r.pageable_gbps < r.pinned_gbps,
            "{} bytes: pageable {} GB/s not below pinned {} GB/s",
            r.bytes,
            r.pageable_gbps,
            r.pinned_gbps
        );
    }
    // Small copies pay the per-copy latency; the table must see it.
    assert!(bw.rows[0].pinned_gbps < 0.5 * big.pinned_gbps);
    let fixed = bw.per_copy_fixed.as_nanos() as f64;
    let lat = cfg.copy_latency.as_nanos() as f64;
    assert!(
        (fixed / lat - 1.0).abs() < 0.1,
        "fixed {fixed} ns vs {lat} ns"
    );

    let rows = rig.overlap(16 * MIB, &[2.0]).unwrap();
    let r = &rows[0];
    assert!(r.kernel_alone > r.copy_alone);
    assert!(r.overlap >= 0.99, "overlap {} ({r:?})", r.overlap);
    // Running them together takes the longer one, not the sum.
    assert!(r.together < r.kernel_alone + r.copy_alone / 2);

    drop(rig);
    assert_eq!(sim.live_allocations(), (0, 0));
}

#[test]
fn bad_sizes_are_errors_and_nothing_leaks() {
    let sim = SimDevice::new(SimConfig::default());
    assert!(matches!(
        TransferRig::new(sim.clone(), 0),
        Err(Error::InvalidArgument(_))
    ));
    let rig = TransferRig::new(sim.clone(), MIB).unwrap();
    for size in [0, MIB + 1] {
        assert!(matches!(
            rig.pinned(size, 1),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            rig.pageable(size, 1),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            rig.concurrent(size, Duration::ZERO),
            Err(Error::InvalidArgument(_))
        ));
    }
    assert!(rig.overlap(MIB, &[f64::NAN]).is_err());
    drop(rig);
    // A device buffer larger than the device: the host buffer allocated first is freed again.
    let small = SimDevice::new(SimConfig {
        capacity: MIB,
        ..SimConfig::default()
    });
    assert!(TransferRig::new(small.clone(), 2 * MIB).is_err());
    assert_eq!(small.live_allocations(), (0, 0));
    assert_eq!(sim.live_allocations(), (0, 0));
}

#[test]
fn overlap_fraction_is_hidden_share_of_the_shorter() {
    let ms = Duration::from_millis;
    assert_eq!(overlap_fraction(ms(2), ms(4), ms(4)), 1.0);
    assert_eq!(overlap_fraction(ms(2), ms(4), ms(6)), 0.0);
    assert_eq!(overlap_fraction(ms(4), ms(2), ms(5)), 0.5);
}
