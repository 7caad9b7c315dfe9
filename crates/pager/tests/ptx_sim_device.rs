//! Interpreted PTX launches as ordinary simulated-device kernel operations
//! ([`Device::launch_ptx`] on [`SimDevice`]): data flow through copies and events, races from
//! the kernel's real footprint, deferred interpreter errors, launch-time refusals, the cost
//! model and the module cache. Everything here runs on the interpreter (emulated, not a GPU).

use ferry_pager::device::null::NullDevice;
use ferry_pager::device::sim::{FaultOp, FaultPlan, OpKind, SimConfig, SimDevice};
use ferry_pager::device::{KernelArg, LaunchDims};
use ferry_pager::{Device, DevicePtr, DeviceRange, Error, HostMemKind, HostPtr, StreamId};
use std::sync::Arc;
use std::time::Duration;

/// Hand-written kernels: `twice` (out[i] = 2·in[i] for i < n), `stuck` (a shuffle whose member
/// mask names a lane that does not exist: a deadlock), `spin` (loops forever), `atomic` (an
/// unimplemented instruction).
const HAND: &str = "
.version 8.4
.target sm_80
.address_size 64

.visible .entry twice(
	.param .u64 twice_in,
	.param .u64 twice_out,
	.param .u64 twice_n
)
{
	.reg .pred %p<2>;
	.reg .f32 %f<3>;
	.reg .b32 %r<4>;
	.reg .b64 %rd<10>;
	ld.param.u64 %rd1, [twice_in];
	ld.param.u64 %rd2, [twice_out];
	ld.param.u64 %rd3, [twice_n];
	mov.u32 %r1, %ctaid.x;
	mov.u32 %r2, %ntid.x;
	mov.u32 %r3, %tid.x;
	mul.wide.u32 %rd4, %r1, %r2;
	cvt.u64.u32 %rd5, %r3;
	add.s64 %rd4, %rd4, %rd5;
	setp.ge.u64 %p1, %rd4, %rd3;
	@%p1 bra $L_done;
	shl.b64 %rd6, %rd4, 2;
	add.s64 %rd7, %rd1, %rd6;
	ld.global.f32 %f1, [%rd7];
	add.f32 %f2, %f1, %f1;
	add.s64 %rd8, %rd2, %rd6;
	st.global.f32 [%rd8], %f2;
$L_done:
	ret;
}

.visible .entry stuck()
{
	.reg .b32 %r<3>;
	mov.u32 %r1, %tid.x;
	shfl.sync.idx.b32 %r2, %r1, 0, 31, 3;
	ret;
}

.visible .entry spin()
{
$L_top:
	bra $L_top;
}

.visible .entry atomic(
	.param .u64 atomic_p
)
{
	.reg .b32 %r<2>;
	.reg .b64 %rd<2>;
	ld.param.u64 %rd1, [atomic_p];
	atom.global.add.u32 %r1, [%rd1], 1;
	ret;
}
";

/// The committed elementwise kernels, exactly what the CUDA path loads.
const ELEMENTWISE: &str = include_str!("../../../kernels/ptx/elementwise.ptx");

/// 1 byte per ns for copies and device memory, 1 thread per ns, 1 µs per kernel.
fn cfg() -> SimConfig {
    SimConfig {
        capacity: 1 << 20,
        h2d_bandwidth: 1e9,
        d2h_bandwidth: 1e9,
        copy_latency: Duration::from_nanos(100),
        launch_latency: Duration::ZERO,
        host_capacity: 1 << 20,
        kernel_overhead: Duration::from_nanos(1000),
        device_bandwidth: 1e9,
        thread_rate: 1e9,
        ..SimConfig::default()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn buf(ptr: DevicePtr, bytes: u64) -> KernelArg {
    KernelArg::Buf { ptr, bytes }
}

/// A host allocation holding `data`.
fn host_with(dev: &SimDevice, data: &[u8]) -> HostPtr {
    let h = dev
        .alloc_host(data.len() as u64, HostMemKind::Upload)
        .unwrap();
    dev.host_write(h, 0, data).unwrap();
    h
}

/// Launches `twice` over `n` elements of `input` into `output` on `s`.
fn twice(
    dev: &SimDevice,
    s: StreamId,
    input: KernelArg,
    output: KernelArg,
    n: u64,
    dims: LaunchDims,
) -> ferry_pager::Result<()> {
    // SAFETY: the simulator checks every access of the interpreted kernel.
    unsafe {
        dev.launch_ptx(
            s,
            "hand",
            HAND,
            "twice",
            dims,
            &[input, output, KernelArg::U64(n)],
        )
    }
}

/// Equal bits, or both NaN (the interpreter's NaN is canonical, the host's need not be).
fn same(got: f32, want: f32) -> bool {
    (got.is_nan() && want.is_nan()) || got.to_bits() == want.to_bits()
}

/// H2D on the copy stream → event → kernel on the compute stream → event → D2H on the copy
/// stream; returns the output.
fn pipeline(
    dev: &Arc<SimDevice>,
    inputs: &[&[f32]],
    out_len: usize,
    launch: impl FnOnce(StreamId, &[DevicePtr], DevicePtr),
) -> Vec<f32> {
    let (copy, compute) = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
    let mut ptrs = Vec::new();
    for x in inputs {
        let bytes = f32_bytes(x);
        let d = dev.alloc_device(bytes.len() as u64).unwrap();
        let h = host_with(dev, &bytes);
        dev.copy_h2d(copy, d, h, 0, bytes.len() as u64).unwrap();
        ptrs.push(d);
    }
    let out = dev.alloc_device(4 * out_len as u64).unwrap();
    let uploaded = dev.create_event().unwrap();
    dev.record_event(uploaded, copy).unwrap();
    dev.wait_event(compute, uploaded).unwrap();
    launch(compute, &ptrs, out);
    let done = dev.create_event().unwrap();
    dev.record_event(done, compute).unwrap();
    dev.wait_event(copy, done).unwrap();
    let h = dev
        .alloc_host(4 * out_len as u64, HostMemKind::Readable)
        .unwrap();
    dev.copy_d2h(copy, h, 0, out, 4 * out_len as u64).unwrap();
    dev.sync_stream(copy).unwrap();
    let mut bytes = vec![0u8; 4 * out_len];
    dev.host_read(h, 0, &mut bytes).unwrap();
    f32s(&bytes)
}

#[test]
fn a_hand_written_kernel_between_ordered_copies_gives_the_right_numbers() {
    let dev = SimDevice::new(cfg());
    let x: Vec<f32> = (0..300).map(|i| i as f32 * 0.75 - 40.0).collect();
    let got = pipeline(&dev, &[&x], 300, |s, ins, out| {
        twice(
            &dev,
            s,
            buf(ins[0], 1200),
            buf(out, 1200),
            300,
            LaunchDims::linear(3, 128),
        )
        .unwrap();
    });
    let want: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
    assert_eq!(got, want);
    assert!(dev.races().is_empty(), "{:?}", dev.races());
    let k = dev
        .timeline()
        .into_iter()
        .find(|r| r.name == "twice")
        .unwrap();
    assert_eq!(k.kind, OpKind::Kernel);
}

/// Inputs with the awkward values: NaN, ±inf, −0, subnormals, large magnitudes.
fn awkward(n: usize, seed: u32) -> Vec<f32> {
    let special = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        1e-40,
        -3e38,
        3e38,
    ];
    let mut s = seed;
    (0..n)
        .map(|i| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            if i % 97 < special.len() && i >= 97 {
                special[i % 97]
            } else {
                (s >> 8) as f32 / (1u32 << 24) as f32 * 200.0 - 100.0
            }
        })
        .collect()
}

#[test]
fn the_committed_add_and_scale_kernels_give_the_cpu_results() {
    let n = 1000;
    let (a, b) = (awkward(n, 1), awkward(n, 2));
    let dev = SimDevice::new(cfg());
    // A grid smaller than n exercises the kernels' grid-stride loop.
    let sum = pipeline(&dev, &[&a, &b], n, |s, ins, out| unsafe {
        // SAFETY: checked by the simulator.
        dev.launch_ptx(
            s,
            "elementwise",
            ELEMENTWISE,
            "ferry_add_f32",
            LaunchDims::linear(2, 64),
            &[
                buf(ins[0], 4 * n as u64),
                buf(ins[1], 4 * n as u64),
                buf(out, 4 * n as u64),
                KernelArg::U64(n as u64),
            ],
        )
        .unwrap();
    });
    for i in 0..n {
        assert!(
            same(sum[i], a[i] + b[i]),
            "add {i}: {} + {} gave {}",
            a[i],
            b[i],
            sum[i]
        );
    }
    assert!(sum.iter().any(|v| v.is_nan()) && sum.iter().any(|v| v.is_infinite()));
    let scaled = pipeline(&dev, &[&a], n, |s, ins, out| unsafe {
        // SAFETY: checked by the simulator.
        dev.launch_ptx(
            s,
            "elementwise",
            ELEMENTWISE,
            "ferry_scale_f32",
            LaunchDims::linear(4, 128),
            &[
                buf(ins[0], 4 * n as u64),
                buf(out, 4 * n as u64),
                KernelArg::F32(-1.5),
                KernelArg::U64(n as u64),
            ],
        )
        .unwrap();
    });
    for i in 0..n {
        assert!(
            same(scaled[i], a[i] * -1.5),
            "scale {i}: {} gave {}",
            a[i],
            scaled[i]
        );
    }
    assert!(dev.races().is_empty(), "{:?}", dev.races());
    assert_eq!(dev.ptx_modules_parsed(), 1, "one module, parsed once");
}

#[test]
fn a_missing_wait_reads_stale_data_and_is_a_race_naming_the_kernel() {
    let dev = SimDevice::new(cfg());
    let (copy, compute) = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
    let input = dev.alloc_device(1024).unwrap();
    let out = dev.alloc_device(1024).unwrap();
    let h = host_with(&dev, &f32_bytes(&[1.0; 256]));
    dev.copy_h2d(copy, input, h, 0, 1024).unwrap();
    // No wait on the copy: the kernel starts at once and reads the zeros there before it.
    twice(
        &dev,
        compute,
        buf(input, 1024),
        buf(out, 1024),
        256,
        LaunchDims::linear(2, 128),
    )
    .unwrap();
    let got = f32s(&dev.peek(DeviceRange::new(out, 1024)).unwrap());
    assert!(got.iter().all(|&v| v == 0.0), "stale input expected");
    let reports = dev.race_reports();
    assert!(!reports.is_empty());
    let r = &reports[0];
    assert_eq!((r.op.name.as_str(), r.access), ("twice", "read"));
    assert_eq!((r.other.name.as_str(), r.other_access), ("h2d", "write"));
    assert_eq!(r.range, DeviceRange::new(input, 1024));
    let e = dev.check_races().unwrap_err().to_string();
    assert!(e.contains("'twice'") && e.contains("'h2d'"), "{e}");
}

/// Launches `twice` over the first half of a 2 KiB buffer pair (both buffer arguments are the
/// whole 2 KiB), then on another stream, unordered, uploads 512 bytes at `offset` of the input.
fn copy_during_kernel(offset: u64) -> Arc<SimDevice> {
    let dev = SimDevice::new(cfg());
    let (copy, compute) = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
    let input = dev.alloc_device(2048).unwrap();
    let out = dev.alloc_device(2048).unwrap();
    twice(
        &dev,
        compute,
        buf(input, 2048),
        buf(out, 2048),
        256,
        LaunchDims::linear(2, 128),
    )
    .unwrap();
    let h = host_with(&dev, &[7u8; 512]);
    dev.copy_h2d(copy, input.offset(offset), h, 0, 512).unwrap();
    let (k, c) = {
        let t = dev.timeline();
        (t[0].clone(), t[1].clone())
    };
    assert!(c.start < k.end, "the copy must overlap the kernel in time");
    dev.sync_stream(compute).unwrap();
    dev.sync_stream(copy).unwrap();
    dev
}

#[test]
fn a_copy_into_bytes_the_kernel_never_touches_is_not_a_race() {
    // The kernel reads bytes [0, 1024) of its 2 KiB input argument only.
    let dev = copy_during_kernel(1024);
    assert!(dev.races().is_empty(), "{:?}", dev.races());
}

#[test]
fn a_copy_into_bytes_the_kernel_reads_is_a_race_naming_both() {
    let dev = copy_during_kernel(768);
    let reports = dev.race_reports();
    assert_eq!(reports.len(), 1, "{:?}", dev.races());
    let r = &reports[0];
    assert_eq!((r.op.name.as_str(), r.access), ("h2d", "write"));
    assert_eq!((r.other.name.as_str(), r.other_access), ("twice", "read"));
    // Only the overlap with what the kernel read: [768, 1024) of the input.
    assert_eq!(r.range.len, 256);
}

#[test]
fn a_copy_issued_after_the_kernel_has_run_is_checked_against_its_footprint() {
    let dev = SimDevice::new(cfg());
    let (copy, compute) = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
    let input = dev.alloc_device(2048).unwrap();
    let out = dev.alloc_device(2048).unwrap();
    twice(
        &dev,
        compute,
        buf(input, 2048),
        buf(out, 2048),
        256,
        LaunchDims::linear(2, 128),
    )
    .unwrap();
    // Let the host reach the kernel's start (it runs then) but not its end.
    dev.advance_host(Duration::from_nanos(10));
    let h = dev.alloc_host(2048, HostMemKind::Readable).unwrap();
    // Reads the untouched second half of the output: fine; then the written first half: a race.
    dev.copy_d2h(copy, h, 0, out.offset(1024), 1024).unwrap();
    assert!(dev.races().is_empty(), "{:?}", dev.races());
    dev.copy_d2h(copy, h, 0, out, 1024).unwrap();
    let reports = dev.race_reports();
    assert_eq!(reports.len(), 1, "{:?}", dev.races());
    assert_eq!(reports[0].op.name, "d2h");
    assert_eq!(
        (reports[0].other.name.as_str(), reports[0].other_access),
        ("twice", "write")
    );
    dev.sync_stream(copy).unwrap();
}

/// The deferred error of `dev`'s next sync of `s`, unwrapped to (kernel name, inner error).
fn kernel_error(dev: &SimDevice, s: StreamId) -> (String, Error) {
    let e = dev.sync_stream(s).unwrap_err();
    let Error::Deferred(k) = e else {
        panic!("expected a deferred error, got {e:?}");
    };
    let Error::Kernel { name, source } = *k else {
        panic!("expected a kernel error, got {k:?}");
    };
    (name, *source)
}

#[test]
fn an_out_of_bounds_read_surfaces_at_sync_naming_kernel_block_thread_and_line() {
    let dev = SimDevice::new(cfg());
    let s = dev.create_stream().unwrap();
    let input = dev.alloc_device(1024).unwrap();
    let out = dev.alloc_device(2048).unwrap();
    // n = 512 elements, but the input argument is 256 elements: thread 256 reads past it.
    twice(
        &dev,
        s,
        buf(input, 1024),
        buf(out, 2048),
        512,
        LaunchDims::linear(4, 128),
    )
    .unwrap();
    let (name, inner) = kernel_error(&dev, s);
    assert_eq!(name, "twice");
    let Error::OutOfBounds(msg) = inner else {
        panic!("expected out of bounds, got {inner:?}");
    };
    for part in [
        "kernel twice",
        "block (2,0,0)",
        "thread (0,0,0)",
        "PTX line 29",
        "outside",
    ] {
        assert!(msg.contains(part), "{part:?} missing in {msg}");
    }
    // A failed kernel's writes are dropped; the error is reported once.
    assert!(dev
        .peek(DeviceRange::new(out, 2048))
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    dev.sync_stream(s).unwrap();
}

#[test]
fn a_deadlock_and_a_runaway_kernel_surface_at_sync() {
    let dev = SimDevice::new(SimConfig {
        ptx_limits: ferry_pager::device::sim::ptx::Limits {
            instruction_budget: 10_000,
            ..Default::default()
        },
        ..cfg()
    });
    let s = dev.create_stream().unwrap();
    let launch = |func| unsafe {
        // SAFETY: checked by the simulator.
        dev.launch_ptx(s, "hand", HAND, func, LaunchDims::linear(1, 1), &[])
    };
    launch("stuck").unwrap();
    let ev = dev.create_event().unwrap();
    dev.record_event(ev, s).unwrap();
    assert!(!dev.event_done(ev).unwrap(), "nothing has run yet");
    let (name, inner) = kernel_error(&dev, s);
    assert_eq!(name, "stuck");
    let msg = inner.to_string();
    assert!(
        msg.contains("deadlock") && msg.contains("shfl.sync") && msg.contains("PTX line"),
        "{msg}"
    );
    launch("spin").unwrap();
    let (name, inner) = kernel_error(&dev, s);
    assert_eq!(name, "spin");
    assert!(
        inner.to_string().contains("instruction budget of 10000"),
        "{inner}"
    );
}

#[test]
fn bad_launches_are_refused_at_launch_and_enqueue_nothing() {
    let dev = SimDevice::new(cfg());
    let s = dev.create_stream().unwrap();
    let a = dev.alloc_device(1024).unwrap();
    let b = dev.alloc_device(1024).unwrap();
    let dims = LaunchDims::linear(1, 32);
    let go = |module: &'static str,
              ptx: &'static str,
              func: &'static str,
              d,
              args: &[KernelArg]| unsafe {
        // SAFETY: refused before running.
        dev.launch_ptx(s, module, ptx, func, d, args)
            .unwrap_err()
            .to_string()
    };
    let ok = [buf(a, 1024), buf(b, 1024), KernelArg::U64(256)];
    let e = go("hand", HAND, "twice", dims, &ok[..2]);
    assert!(e.contains("takes 3 parameters"), "{e}");
    let e = go(
        "hand",
        HAND,
        "twice",
        dims,
        &[ok[0], ok[1], KernelArg::F32(1.0)],
    );
    assert!(e.contains("parameter 2"), "{e}");
    let e = go("hand", HAND, "twice", dims, &[ok[0], buf(b, 1025), ok[2]]);
    assert!(e.contains("runs past the device allocation"), "{e}");
    let e = go("hand", HAND, "twice", LaunchDims::linear(0, 32), &ok);
    assert!(e.contains("empty launch"), "{e}");
    let e = go("hand", HAND, "twice", LaunchDims::linear(1, 2048), &ok);
    assert!(e.contains("more than 1024"), "{e}");
    let e = go("hand", HAND, "nope", dims, &ok);
    assert!(e.contains("no kernel `nope`"), "{e}");
    let e = go("hand", HAND, "atomic", dims, &[buf(a, 4)]);
    assert!(e.contains("unimplemented") && e.contains("atom"), "{e}");
    assert!(!e.contains('\n'), "one line: {e}");
    let e = go(
        "broken",
        ".version 8.4\n.target sm_80\n.address_size 64\n.visible .entry k( {",
        "k",
        dims,
        &[],
    );
    assert!(e.contains("PTX module broken") && !e.contains('\n'), "{e}");
    dev.free_device(b).unwrap();
    let e = go("hand", HAND, "twice", dims, &ok);
    assert!(e.contains("buffer argument"), "dead buffer: {e}");
    assert!(dev.timeline().is_empty(), "nothing enqueued");
    assert_eq!(dev.resources().pending_ops, 0);
}

#[test]
fn virtual_time_follows_the_cost_model() {
    let dev = SimDevice::new(cfg());
    let s = dev.create_stream().unwrap();
    let a = dev.alloc_device(1024).unwrap();
    let b = dev.alloc_device(1024).unwrap();
    // Memory bound: 2048 argument bytes at 1 B/ns beat 256 threads at 1 thread/ns.
    twice(
        &dev,
        s,
        buf(a, 1024),
        buf(b, 1024),
        256,
        LaunchDims::linear(2, 128),
    )
    .unwrap();
    // Thread bound: 64 × 128 = 8192 threads (most exit at once) beat 2048 bytes.
    twice(
        &dev,
        s,
        buf(a, 1024),
        buf(b, 1024),
        256,
        LaunchDims::linear(64, 128),
    )
    .unwrap();
    let t = dev.timeline();
    assert_eq!(t.len(), 2);
    assert_eq!(t[0].end - t[0].start, Duration::from_nanos(1000 + 2048));
    assert_eq!(t[1].start, t[0].end, "stream order");
    assert_eq!(t[1].end - t[1].start, Duration::from_nanos(1000 + 8192));
    assert_eq!(dev.stream_tail(s).unwrap(), t[1].end);
    dev.sync_stream(s).unwrap();
    assert_eq!(dev.now(), t[1].end);
}

#[test]
fn a_module_is_parsed_once_per_name() {
    let dev = SimDevice::new(cfg());
    let s = dev.create_stream().unwrap();
    let a = dev.alloc_device(1024).unwrap();
    assert_eq!(dev.ptx_modules_parsed(), 0);
    for _ in 0..3 {
        twice(
            &dev,
            s,
            buf(a, 1024),
            buf(a, 1024),
            256,
            LaunchDims::linear(2, 128),
        )
        .unwrap();
    }
    assert_eq!(dev.ptx_modules_parsed(), 1);
    unsafe {
        // SAFETY: checked by the simulator.
        dev.launch_ptx(s, "hand", HAND, "stuck", LaunchDims::linear(1, 32), &[])
            .unwrap();
        dev.launch_ptx(
            s,
            "hand-again",
            HAND,
            "twice",
            LaunchDims::linear(1, 1),
            &[buf(a, 1024), buf(a, 1024), KernelArg::U64(0)],
        )
        .unwrap();
    }
    assert_eq!(dev.ptx_modules_parsed(), 2);
    // In place (in == out): 2^3 after three doublings of zeros is still zero; no error but stuck's.
    let e = dev.sync_stream(s).unwrap_err();
    assert!(format!("{:?}", e).contains("stuck"), "{e:?}");
}

#[test]
fn an_injected_launch_fault_enqueues_nothing() {
    let dev = SimDevice::new(cfg());
    let s = dev.create_stream().unwrap();
    let a = dev.alloc_device(1024).unwrap();
    dev.set_fault_plan(FaultPlan::nth(FaultOp::Launch, 0));
    let e = twice(
        &dev,
        s,
        buf(a, 1024),
        buf(a, 1024),
        256,
        LaunchDims::linear(2, 128),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Injected {
                op: "launch",
                index: 0
            }
        ),
        "{e:?}"
    );
    assert!(dev.timeline().is_empty());
    twice(
        &dev,
        s,
        buf(a, 1024),
        buf(a, 1024),
        256,
        LaunchDims::linear(2, 128),
    )
    .unwrap();
    assert_eq!(dev.fault_counts().get(FaultOp::Launch), 2);
    dev.sync_stream(s).unwrap();
}

#[test]
fn the_null_device_still_refuses_ptx_launches() {
    let dev = NullDevice::default();
    assert!(!dev.can_launch_ptx());
    assert!(SimDevice::new(cfg()).can_launch_ptx());
    let s = dev.create_stream().unwrap();
    // SAFETY: refused before anything runs.
    let e = unsafe { dev.launch_ptx(s, "hand", HAND, "stuck", LaunchDims::linear(1, 1), &[]) }
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not execute PTX"), "{e}");
}
