//! Tests of the CUDA backend.
//!
//! Policy for GPU tests: every test that needs a GPU is `#[ignore = "needs a CUDA GPU"]`, so on a
//! machine without one it is reported as *ignored*, never as passed. The GPU suite runs them with
//! `cargo test -p ferry-pager --test cuda_backend -- --ignored`; there they open GPU 0 and *fail*
//! (not skip) if it cannot be opened, so a broken driver cannot pass silently. On a GPU machine
//! without a Rust toolchain, build the binary here with `cargo test -p ferry-pager --test
//! cuda_backend --no-run` and run it there with `--ignored`.
//!
//! The non-ignored tests run everywhere and check the no-driver / no-device paths.

use ferry_pager::device::cuda::CudaDevice;
use ferry_pager::{Device, DevicePtr, Error, EventId, HostMemKind, HostPtr, StreamId};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

#[test]
fn new_reports_no_driver_or_opens_the_gpu_without_panicking() {
    for _ in 0..2 {
        // Twice: a second call must not hit cudarc's "library not loaded" panic either.
        match CudaDevice::new(0) {
            Err(Error::NoDriver) => assert!(!driver_present(), "NoDriver although libcuda loads"),
            Err(Error::NoDevice(msg)) => {
                assert!(driver_present(), "NoDevice without a driver: {msg}")
            }
            Ok(dev) => {
                assert!(driver_present());
                assert!(!dev.name().is_empty(), "GPU name is empty");
            }
            Err(other) => panic!("expected NoDriver, NoDevice or a device, got {other}"),
        }
    }
}

#[test]
fn a_missing_gpu_is_no_driver_without_a_driver_and_no_device_with_one() {
    // Both cases are checked, whichever this machine is: no ordinal here can exist.
    for ordinal in [100_000, usize::MAX] {
        let err = CudaDevice::new(ordinal).expect_err("a GPU that cannot exist opened");
        if driver_present() {
            match &err {
                Error::NoDevice(msg) => assert!(
                    msg.contains(&format!("GPU {ordinal}")) || msg.contains("cuInit"),
                    "ordinal {ordinal}: {msg}"
                ),
                other => panic!("ordinal {ordinal}: a driver is present, got {other}"),
            }
        } else {
            assert!(
                matches!(err, Error::NoDriver),
                "ordinal {ordinal}: got {err}"
            );
            assert!(err.to_string().contains("no CUDA driver"), "message: {err}");
        }
    }
    if !driver_present() {
        // Without a driver even the ordinals a GPU machine would have are refused as such.
        for ordinal in [0, 1] {
            let err = CudaDevice::new(ordinal).expect_err("no driver, yet a device opened");
            assert!(
                matches!(err, Error::NoDriver),
                "ordinal {ordinal}: got {err}"
            );
        }
    }
}

#[test]
fn cuda_device_is_send_sync_and_usable_as_dyn_device() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<CudaDevice>();
    assert_send_sync::<ferry_pager::device::cuda::HostRegistration>();
    fn as_dyn(d: Arc<CudaDevice>) -> Arc<dyn Device> {
        d
    }
    let _ = as_dyn;
}

// ---------------------------------------------------------------------------------------------
// GPU tests (ignored without --ignored; see the header).

fn gpu() -> Arc<CudaDevice> {
    match CudaDevice::new(0) {
        Ok(dev) => dev,
        Err(e) => panic!("this test needs a CUDA GPU (it runs only with --ignored): {e}"),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 ^ seed)
        .collect()
}

fn read_back(dev: &CudaDevice, s: StreamId, src: DevicePtr, len: usize) -> Vec<u8> {
    let host = dev.alloc_host(len as u64, HostMemKind::Readable).unwrap();
    dev.copy_d2h(s, host, 0, src, len as u64).unwrap();
    dev.sync_stream(s).unwrap();
    let mut out = vec![0u8; len];
    dev.host_read(host, 0, &mut out).unwrap();
    dev.free_host(host).unwrap();
    out
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_pinned_copies_round_trip_at_offsets() {
    let dev = gpu();
    let s = dev.create_stream().unwrap();
    let len = (1 << 20) + 13;
    let data = pattern(len, 0x5a);
    let up = dev.alloc_host(len as u64 + 7, HostMemKind::Upload).unwrap();
    let down = dev
        .alloc_host(len as u64 + 3, HostMemKind::Readable)
        .unwrap();

    let mut zeros = vec![1u8; len + 3];
    dev.host_read(down, 0, &mut zeros).unwrap();
    assert!(zeros.iter().all(|&b| b == 0), "alloc_host must zero");

    let d = dev.alloc_device(2 << 20).unwrap();
    dev.host_write(up, 7, &data).unwrap();
    dev.copy_h2d(s, d.offset(4096), up, 7, len as u64).unwrap();
    dev.copy_d2h(s, down, 3, d.offset(4096), len as u64)
        .unwrap();
    let e = dev.create_event().unwrap();
    dev.record_event(e, s).unwrap();
    dev.sync_event(e).unwrap();
    assert!(dev.event_done(e).unwrap());
    let mut out = vec![0u8; len];
    dev.host_read(down, 3, &mut out).unwrap();
    assert!(out == data, "device round trip changed the bytes");
    dev.free_device(d).unwrap();
    dev.free_host(up).unwrap();
    dev.free_host(down).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_pageable_copy_is_complete_on_return() {
    let dev = gpu();
    let s = dev.create_stream().unwrap();
    let data = pattern(3 << 20, 7);
    let d = dev.alloc_device(data.len() as u64).unwrap();
    let mut src = data.clone();
    dev.copy_h2d_pageable(s, d, &src).unwrap();
    src.iter_mut().for_each(|b| *b = 0); // reusing the source must not change the copy
    assert!(read_back(&dev, s, d, data.len()) == data);
    dev.free_device(d).unwrap();
}

fn elapsed_of_busy(dev: &CudaDevice, s: StreamId, busy: Duration) -> (EventId, EventId, Duration) {
    let (e0, e1) = (dev.create_event().unwrap(), dev.create_event().unwrap());
    dev.record_event(e0, s).unwrap();
    dev.busy(s, busy).unwrap();
    dev.record_event(e1, s).unwrap();
    dev.sync_event(e1).unwrap();
    let t = dev.event_elapsed(e0, e1).unwrap();
    (e0, e1, t)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_busy_occupies_the_stream_for_its_duration() {
    let dev = gpu();
    let s = dev.create_stream().unwrap();
    let _ = elapsed_of_busy(&dev, s, Duration::from_millis(1)); // loads the module
    for ms in [5u64, 20, 50] {
        let (_, _, t) = elapsed_of_busy(&dev, s, Duration::from_millis(ms));
        let want = Duration::from_millis(ms);
        assert!(
            t >= want.mul_f64(0.98) && t <= want + Duration::from_millis(5),
            "busy({ms} ms) measured {t:?} between events"
        );
    }
    // Asynchronous: enqueueing returns long before the kernel ends.
    let e = dev.create_event().unwrap();
    let t0 = Instant::now();
    dev.busy(s, Duration::from_millis(200)).unwrap();
    dev.record_event(e, s).unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(50),
        "busy blocked the host"
    );
    assert!(
        !dev.event_done(e).unwrap(),
        "event done while the spin kernel runs"
    );
    dev.sync_stream(s).unwrap();
    assert!(dev.event_done(e).unwrap());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_elapsed_before_completion_is_an_error_not_a_guess() {
    let dev = gpu();
    let s = dev.create_stream().unwrap();
    let (e0, e1) = (dev.create_event().unwrap(), dev.create_event().unwrap());
    dev.busy(s, Duration::from_millis(1)).unwrap();
    dev.sync_stream(s).unwrap();
    dev.record_event(e0, s).unwrap();
    dev.busy(s, Duration::from_millis(100)).unwrap();
    dev.record_event(e1, s).unwrap();
    match dev.event_elapsed(e0, e1) {
        Err(Error::Cuda { call, .. }) => assert_eq!(call, "cuEventElapsedTime"),
        other => panic!("expected a cuEventElapsedTime error, got {other:?}"),
    }
    dev.sync_stream(s).unwrap();
    assert!(dev.event_elapsed(e0, e1).unwrap() >= Duration::from_millis(98));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_event_orders_work_across_streams() {
    let dev = gpu();
    let (a, b) = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
    let len = 8 << 20;
    let data = pattern(len, 0x33);
    let up = dev.alloc_host(len as u64, HostMemKind::Upload).unwrap();
    dev.host_write(up, 0, &data).unwrap();
    let down = dev.alloc_host(len as u64, HostMemKind::Readable).unwrap();
    let d = dev.alloc_device(len as u64).unwrap();
    let ready = dev.create_event().unwrap();
    // The upload is held back 30 ms on stream a; stream b must still see its result.
    dev.busy(a, Duration::from_millis(30)).unwrap();
    dev.copy_h2d(a, d, up, 0, len as u64).unwrap();
    dev.record_event(ready, a).unwrap();
    dev.wait_event(b, ready).unwrap();
    dev.copy_d2h(b, down, 0, d, len as u64).unwrap();
    dev.sync_stream(b).unwrap();
    let mut out = vec![0u8; len];
    dev.host_read(down, 0, &mut out).unwrap();
    assert!(out == data, "stream b read before stream a's upload");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_bad_arguments_are_errors() {
    let dev = gpu();
    let s = dev.create_stream().unwrap();
    let d = dev.alloc_device(4096).unwrap();
    let h = dev.alloc_host(4096, HostMemKind::Upload).unwrap();
    let err = dev.copy_h2d(s, d.offset(4000), h, 0, 200).unwrap_err();
    assert!(matches!(err, Error::OutOfBounds(_)), "{err}");
    let err = dev.copy_h2d(s, d, h, 4000, 200).unwrap_err();
    assert!(matches!(err, Error::OutOfBounds(_)), "{err}");
    let err = dev.copy_h2d(s, d, h, u64::MAX, 2).unwrap_err();
    assert!(matches!(err, Error::OutOfBounds(_)), "{err}");
    let err = dev.copy_h2d(StreamId(999_999), d, h, 0, 1).unwrap_err();
    assert!(matches!(err, Error::InvalidHandle(_)), "{err}");
    let err = dev.host_write(HostPtr(999_999), 0, &[1]).unwrap_err();
    assert!(matches!(err, Error::InvalidHandle(_)), "{err}");
    let err = dev.alloc_device(0).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let total = dev.mem_info().unwrap().total;
    let err = dev.alloc_device(total * 4).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
    dev.free_device(d).unwrap();
    let err = dev.free_device(d).unwrap_err();
    assert!(matches!(err, Error::InvalidHandle(_)), "{err}");
    dev.free_host(h).unwrap();
    let err = dev.free_host(h).unwrap_err();
    assert!(matches!(err, Error::InvalidHandle(_)), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_mem_info_sees_an_allocation() {
    let dev = gpu();
    let before = dev.mem_info().unwrap();
    assert!(
        before.total > 0 && before.free <= before.total,
        "{before:?}"
    );
    let d = dev.alloc_device(512 << 20).unwrap();
    let after = dev.mem_info().unwrap();
    assert!(
        after.free + (500 << 20) <= before.free,
        "free {} -> {} after 512 MiB",
        before.free,
        after.free
    );
    dev.free_device(d).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_registered_mmap_is_a_copy_source() {
    use std::io::Write;
    let dev = gpu();
    let data = pattern(2 << 20, 0x77);
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&data).unwrap();
    // SAFETY: the temporary file is private to this test and not modified while mapped.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
    if !dev.supports_read_only_register() {
        let err = dev.register_mmap(map).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        return;
    }
    let reg = dev.register_mmap(map).unwrap();
    let h = reg.host_ptr();
    let s = dev.create_stream().unwrap();
    let d = dev.alloc_device(data.len() as u64).unwrap();
    dev.copy_h2d(s, d, h, 0, data.len() as u64).unwrap();
    assert!(read_back(&dev, s, d, data.len()) == data);
    let mut head = [0u8; 16];
    dev.host_read(h, 0, &mut head).unwrap();
    assert_eq!(head[..], data[..16]);
    assert!(
        dev.host_write(h, 0, &[0]).is_err(),
        "wrote to a read-only registration"
    );
    assert!(dev.free_host(h).is_err(), "free_host freed a registration");
    drop(reg);
    let err = dev.host_read(h, 0, &mut head).unwrap_err();
    assert!(matches!(err, Error::InvalidHandle(_)), "{err}");
}

/// Not a correctness test: prints H2D bandwidth for pinned (write-combined) and pageable sources.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_report_h2d_bandwidth() {
    let dev = gpu();
    let s = dev.create_stream().unwrap();
    let len: u64 = 256 << 20;
    let d = dev.alloc_device(len).unwrap();
    let h = dev.alloc_host(len, HostMemKind::Upload).unwrap();
    let pageable = vec![1u8; len as usize];
    let (e0, e1) = (dev.create_event().unwrap(), dev.create_event().unwrap());
    for _ in 0..2 {
        dev.copy_h2d(s, d, h, 0, len).unwrap(); // warm-up
    }
    dev.record_event(e0, s).unwrap();
    for _ in 0..4 {
        dev.copy_h2d(s, d, h, 0, len).unwrap();
    }
    dev.record_event(e1, s).unwrap();
    dev.sync_event(e1).unwrap();
    let pinned = 4.0 * len as f64 / dev.event_elapsed(e0, e1).unwrap().as_secs_f64() / 1e9;
    let t = Instant::now();
    for _ in 0..4 {
        dev.copy_h2d_pageable(s, d, &pageable).unwrap();
    }
    let paged = 4.0 * len as f64 / t.elapsed().as_secs_f64() / 1e9;
    println!(
        "{}: H2D pinned {pinned:.1} GB/s, pageable {paged:.1} GB/s",
        dev.name()
    );
    assert!(pinned > 0.0 && paged > 0.0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_store_registered_in_place_copies_the_file_bytes() {
    use ferry_pager::{HostStore, LoadOptions, WeightsFile};
    let dev = gpu();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    // Two F16 tensors; the second starts at an unaligned file offset (after 3 x 2 bytes).
    let (a, b) = (pattern(6, 0x11), pattern(4000, 0x22));
    let header = r#"{"a":{"dtype":"F16","shape":[3],"data_offsets":[0,6]},"b":{"dtype":"F16","shape":[2000],"data_offsets":[6,4006]}}"#;
    let mut buf = (header.len() as u64).to_le_bytes().to_vec();
    buf.extend_from_slice(header.as_bytes());
    buf.extend_from_slice(&a);
    buf.extend_from_slice(&b);
    std::fs::write(&path, buf).unwrap();
    let file = WeightsFile::open(&path).unwrap();
    let as_dyn: Arc<dyn Device> = dev.clone();
    assert_eq!(
        as_dyn.can_register_host_files(),
        dev.supports_read_only_register()
    );
    let store = HostStore::new(as_dyn);
    let result = store.register_file_in_place(&file, &LoadOptions::default());
    if !dev.supports_read_only_register() {
        let err = result.unwrap_err();
        assert!(
            err.to_string().contains("read-only host registration"),
            "{err}"
        );
        return;
    }
    let ids = result.unwrap();
    let t = store.tensor(ids[1]).unwrap();
    assert_ne!(
        t.offset.next_multiple_of(256),
        t.offset,
        "the test wants an unaligned source"
    );
    let s = dev.create_stream().unwrap();
    let d = dev.alloc_device(t.len).unwrap();
    dev.copy_h2d(s, d, t.host, t.offset, t.len).unwrap();
    assert!(read_back(&dev, s, d, b.len()) == b);
    assert!(dev.host_write(t.host, t.offset, &[0]).is_err());
    let h = t.host;
    drop(store);
    let mut one = [0u8; 1];
    let err = dev.host_read(h, 0, &mut one).unwrap_err();
    assert!(
        matches!(err, Error::InvalidHandle(_)),
        "unregistered on drop: {err}"
    );
    dev.free_device(d).unwrap();
}
