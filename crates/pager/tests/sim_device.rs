//! The simulated device: virtual-time ordering, deferred effects, determinism and the race checker.

use ferry_pager::device::sim::{KernelSpec, OpKind, SimConfig, SimDevice};
use ferry_pager::{Device, DeviceRange, Error, HostMemKind};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn cfg() -> SimConfig {
    SimConfig {
        capacity: 1 << 20,
        h2d_bandwidth: 1e9, // 1 byte per ns
        pageable_bandwidth: 0.5e9,
        d2h_bandwidth: 1e9,
        copy_latency: Duration::from_nanos(100),
        launch_latency: Duration::ZERO,
        host_capacity: 1 << 20,
        ..SimConfig::default()
    }
}

/// Uploads `data` to host memory, returns a kernel that captures what it read from `range`.
fn reader(
    dev: &SimDevice,
    stream: ferry_pager::StreamId,
    range: DeviceRange,
    duration: Duration,
) -> Arc<Mutex<Vec<u8>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    dev.launch(
        stream,
        KernelSpec::new("reader", duration).reads(range),
        move |mem| {
            *out.lock().unwrap() = mem.read(range)?;
            Ok(())
        },
    )
    .unwrap();
    seen
}

#[test]
fn waited_copy_is_seen_by_the_kernel_and_no_race_is_reported() {
    let dev = SimDevice::new(cfg());
    let (copy, compute) = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
    let host = dev.alloc_host(1000, HostMemKind::Upload).unwrap();
    let data: Vec<u8> = (0..1000).map(|i| (i % 251) as u8).collect();
    dev.host_write(host, 0, &data).unwrap();
    let buf = dev.alloc_device(1000).unwrap();
    let range = DeviceRange::new(buf, 1000);

    dev.copy_h2d(copy, buf, host, 0, 1000).unwrap();
    let ready = dev.create_event().unwrap();
    dev.record_event(ready, copy).unwrap();
    dev.wait_event(compute, ready).unwrap();
    let seen = reader(&dev, compute, range, Duration::from_nanos(500));
    dev.sync_stream(compute).unwrap();

    assert_eq!(*seen.lock().unwrap(), data);
    assert!(dev.races().is_empty(), "{:?}", dev.races());
    // The copy costs latency + bytes / bandwidth: 100 + 1000 ns; the kernel then 500 ns.
    assert_eq!(dev.now(), Duration::from_nanos(1600));
}

#[test]
fn planted_missing_wait_gives_stale_data_and_a_race_report_naming_both_ops() {
    let dev = SimDevice::new(cfg());
    let (copy, compute) = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
    let host = dev.alloc_host(1000, HostMemKind::Upload).unwrap();
    dev.host_write(host, 0, &[7u8; 1000]).unwrap();
    let buf = dev.alloc_device(1000).unwrap();
    let range = DeviceRange::new(buf, 1000);

    dev.copy_h2d(copy, buf, host, 0, 1000).unwrap();
    // BUG planted: no wait_event(compute, ready) here.
    let seen = reader(&dev, compute, range, Duration::from_nanos(500));
    dev.sync_stream(compute).unwrap();
    dev.sync_stream(copy).unwrap();

    // Exactly as on a GPU, the kernel ran before the copy landed and saw the old (zero) bytes.
    assert_eq!(*seen.lock().unwrap(), vec![0u8; 1000]);
    let reports = dev.race_reports();
    assert_eq!(reports.len(), 1, "{:?}", dev.races());
    let r = &reports[0];
    assert_eq!(r.access, "read");
    assert_eq!(r.other_access, "write");
    assert_eq!(r.op.name, "reader");
    assert_eq!(r.op.stream, compute);
    assert_eq!(r.other.name, "h2d");
    assert_eq!(r.other.stream, copy);
    assert_eq!(r.range, range);
    let text = dev.races()[0].clone();
    assert!(text.contains("reader") && text.contains("h2d"), "{text}");
    assert!(matches!(dev.check_races(), Err(Error::Race(_))));
}

#[test]
fn overwriting_memory_a_kernel_still_reads_is_a_race() {
    let dev = SimDevice::new(cfg());
    let (copy, compute) = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
    let host = dev.alloc_host(256, HostMemKind::Upload).unwrap();
    let buf = dev.alloc_device(256).unwrap();
    let range = DeviceRange::new(buf, 256);
    dev.copy_h2d(copy, buf, host, 0, 256).unwrap();
    let ev = dev.create_event().unwrap();
    dev.record_event(ev, copy).unwrap();
    dev.wait_event(compute, ev).unwrap();
    reader(&dev, compute, range, Duration::from_micros(10));
    // BUG planted: the next upload into the same bytes does not wait for the reader's release.
    dev.copy_h2d(copy, buf, host, 0, 256).unwrap();
    dev.sync_stream(copy).unwrap();
    let reports = dev.race_reports();
    assert_eq!(reports.len(), 1, "{:?}", dev.races());
    assert_eq!(reports[0].access, "write");
    assert_eq!(reports[0].other_access, "read");

    // The correct version: wait on an event recorded after the reader.
    let dev = SimDevice::new(cfg());
    let (copy, compute) = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
    let host = dev.alloc_host(256, HostMemKind::Upload).unwrap();
    let buf = dev.alloc_device(256).unwrap();
    dev.copy_h2d(copy, buf, host, 0, 256).unwrap();
    let ev = dev.create_event().unwrap();
    dev.record_event(ev, copy).unwrap();
    dev.wait_event(compute, ev).unwrap();
    reader(&dev, compute, range_of(buf), Duration::from_micros(10));
    let released = dev.create_event().unwrap();
    dev.record_event(released, compute).unwrap();
    dev.wait_event(copy, released).unwrap();
    dev.copy_h2d(copy, buf, host, 0, 256).unwrap();
    dev.sync_stream(copy).unwrap();
    assert!(dev.races().is_empty(), "{:?}", dev.races());
    dev.check_races().unwrap();
}

fn range_of(p: ferry_pager::DevicePtr) -> DeviceRange {
    DeviceRange::new(p, 256)
}

#[test]
fn copies_overlap_compute_on_another_stream_and_serialise_on_the_copy_engine() {
    let dev = SimDevice::new(cfg());
    let (c1, c2, compute) = (
        dev.create_stream().unwrap(),
        dev.create_stream().unwrap(),
        dev.create_stream().unwrap(),
    );
    let host = dev.alloc_host(4000, HostMemKind::Upload).unwrap();
    let buf = dev.alloc_device(4000).unwrap();
    dev.busy(compute, Duration::from_nanos(5000)).unwrap();
    dev.copy_h2d(c1, buf, host, 0, 2000).unwrap();
    dev.copy_h2d(c2, buf.offset(2000), host, 2000, 2000)
        .unwrap();
    let t = dev.timeline();
    assert_eq!(t.len(), 3);
    assert_eq!(t[0].kind, OpKind::Kernel);
    // Both copies run during the kernel, one after the other on the single H2D engine.
    assert_eq!(t[1].start, Duration::ZERO);
    assert_eq!(t[1].end, Duration::from_nanos(2100));
    assert_eq!(t[2].start, Duration::from_nanos(2100));
    assert_eq!(t[2].end, Duration::from_nanos(4200));
    dev.sync_stream(compute).unwrap();
    assert_eq!(dev.now(), Duration::from_nanos(5000));
    assert!(!dev.event_done_after_sync_check());
}

trait Probe {
    fn event_done_after_sync_check(&self) -> bool;
}

impl Probe for SimDevice {
    /// An event recorded after work that ends in the future is not done yet.
    fn event_done_after_sync_check(&self) -> bool {
        let s = self.create_stream().unwrap();
        self.busy(s, Duration::from_micros(1)).unwrap();
        let e = self.create_event().unwrap();
        self.record_event(e, s).unwrap();
        self.event_done(e).unwrap()
    }
}

#[test]
fn device_to_host_round_trip_and_event_timing() {
    let dev = SimDevice::new(cfg());
    let s = dev.create_stream().unwrap();
    let up = dev.alloc_host(64, HostMemKind::Upload).unwrap();
    let down = dev.alloc_host(64, HostMemKind::Readable).unwrap();
    let data: Vec<u8> = (0..64).collect();
    dev.host_write(up, 0, &data).unwrap();
    let buf = dev.alloc_device(64).unwrap();
    let (a, b) = (dev.create_event().unwrap(), dev.create_event().unwrap());
    dev.record_event(a, s).unwrap();
    dev.copy_h2d(s, buf, up, 0, 64).unwrap();
    dev.copy_d2h(s, down, 0, buf, 64).unwrap();
    dev.record_event(b, s).unwrap();
    assert!(dev.event_elapsed(a, b).is_err(), "not completed yet");
    dev.sync_event(b).unwrap();
    let mut back = vec![0u8; 64];
    dev.host_read(down, 0, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(dev.event_elapsed(a, b).unwrap(), Duration::from_nanos(328));
    assert!(dev.races().is_empty());
}

#[test]
fn pageable_copy_blocks_the_host_and_is_slower() {
    let dev = SimDevice::new(cfg());
    let s = dev.create_stream().unwrap();
    let buf = dev.alloc_device(1000).unwrap();
    dev.copy_h2d_pageable(s, buf, &[3u8; 1000]).unwrap();
    // 100 ns latency + 1000 B at 0.5 B/ns; the host waited for it.
    assert_eq!(dev.now(), Duration::from_nanos(2100));
    assert_eq!(
        dev.peek(DeviceRange::new(buf, 1000)).unwrap(),
        vec![3u8; 1000]
    );
}

#[test]
fn over_capacity_allocation_reports_asked_and_free() {
    let dev = SimDevice::new(cfg());
    let _a = dev.alloc_device(600 << 10).unwrap();
    match dev.alloc_device(600 << 10) {
        Err(Error::OutOfMemory { asked, free, .. }) => {
            assert_eq!(asked, 600 << 10);
            assert_eq!(free, (1 << 20) - (600 << 10));
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    let msg = dev.alloc_device(600 << 10).unwrap_err().to_string();
    assert!(msg.contains("asked for 614400 bytes"), "{msg}");
}

#[test]
fn out_of_bounds_and_bad_handles_are_errors() {
    let dev = SimDevice::new(cfg());
    let s = dev.create_stream().unwrap();
    let host = dev.alloc_host(16, HostMemKind::Upload).unwrap();
    let buf = dev.alloc_device(16).unwrap();
    assert!(matches!(
        dev.copy_h2d(s, buf, host, 0, 32),
        Err(Error::OutOfBounds(_))
    ));
    assert!(matches!(
        dev.copy_h2d(s, buf.offset(8), host, 0, 16),
        Err(Error::OutOfBounds(_))
    ));
    assert!(matches!(
        dev.copy_h2d(ferry_pager::StreamId(99), buf, host, 0, 16),
        Err(Error::InvalidHandle(_))
    ));
    dev.free_device(buf).unwrap();
    assert!(dev.free_device(buf).is_err());
    dev.free_host(host).unwrap();
    assert_eq!(dev.live_allocations(), (0, 0));
}

#[test]
fn a_kernel_error_is_reported_by_the_next_sync() {
    let dev = SimDevice::new(cfg());
    let s = dev.create_stream().unwrap();
    let buf = dev.alloc_device(16).unwrap();
    dev.launch(
        s,
        KernelSpec::new("undeclared", Duration::from_nanos(10)),
        move |mem| mem.read(DeviceRange::new(buf, 16)).map(|_| ()),
    )
    .unwrap();
    let e = dev.sync_stream(s).unwrap_err();
    // The error chain: deferred → kernel 'undeclared' → what the kernel body reported.
    let mut chain = e.to_string();
    let mut cur = std::error::Error::source(&e);
    while let Some(c) = cur {
        chain.push_str(": ");
        chain.push_str(&c.to_string());
        cur = c.source();
    }
    assert!(
        chain.contains("kernel 'undeclared' failed") && chain.contains("did not declare"),
        "{chain}"
    );
}

fn scenario() -> (Vec<ferry_pager::device::sim::OpRecord>, Vec<u8>) {
    let dev = SimDevice::new(cfg());
    let streams: Vec<_> = (0..3).map(|_| dev.create_stream().unwrap()).collect();
    let host = dev.alloc_host(4096, HostMemKind::Upload).unwrap();
    dev.host_write(
        host,
        0,
        &(0..4096).map(|i| (i * 7) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    let buf = dev.alloc_device(4096).unwrap();
    let ev = dev.create_event().unwrap();
    for i in 0..16u64 {
        let s = streams[(i % 3) as usize];
        dev.copy_h2d(s, buf.offset(i * 256), host, (15 - i) * 256, 256)
            .unwrap();
        dev.record_event(ev, s).unwrap();
        dev.wait_event(streams[2], ev).unwrap();
        dev.busy(streams[2], Duration::from_nanos(37 * i)).unwrap();
    }
    let bytes = dev.peek(DeviceRange::new(buf, 4096)).unwrap();
    (dev.timeline(), bytes)
}

#[test]
fn runs_are_deterministic() {
    assert_eq!(scenario(), scenario());
}

/// A copy reads its host source at its start: a host write after the start (while the copy runs)
/// does not reach the device, one before the start does.
#[test]
fn copy_sees_the_host_bytes_of_its_start() {
    let dev = SimDevice::new(cfg());
    let (copy, other) = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
    let old: Vec<u8> = (0..1000).map(|i| (i % 251) as u8).collect();
    let new = vec![7u8; 1000];
    let idle = |s, ns| {
        dev.launch(s, KernelSpec::new("idle", Duration::from_nanos(ns)), |_| {
            Ok(())
        })
        .unwrap();
    };

    // Written while the copy runs (it starts at 0 and ends at 1100 ns; the host is at 500 ns).
    let host = dev.alloc_host(1000, HostMemKind::Upload).unwrap();
    dev.host_write(host, 0, &old).unwrap();
    let buf = dev.alloc_device(1000).unwrap();
    dev.copy_h2d(copy, buf, host, 0, 1000).unwrap();
    idle(other, 500);
    dev.sync_stream(other).unwrap();
    dev.host_write(host, 0, &new).unwrap();
    let seen = reader(
        &dev,
        copy,
        DeviceRange::new(buf, 1000),
        Duration::from_nanos(10),
    );
    dev.sync_stream(copy).unwrap();
    assert_eq!(*seen.lock().unwrap(), old);

    // Written before the copy starts (it waits for 2000 ns of other work on its stream).
    let host2 = dev.alloc_host(1000, HostMemKind::Upload).unwrap();
    dev.host_write(host2, 0, &old).unwrap();
    let buf2 = dev.alloc_device(1000).unwrap();
    idle(copy, 2000);
    dev.copy_h2d(copy, buf2, host2, 0, 1000).unwrap();
    dev.host_write(host2, 0, &new).unwrap();
    let seen = reader(
        &dev,
        copy,
        DeviceRange::new(buf2, 1000),
        Duration::from_nanos(10),
    );
    dev.sync_stream(copy).unwrap();
    assert_eq!(*seen.lock().unwrap(), new);
}
