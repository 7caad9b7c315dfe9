//! The ABI's error and ownership rules, called through the exported functions.

use ferry_c::*;
use std::ffi::{c_char, CStr};
use std::ptr;
use std::sync::Mutex;

/// The handle registry is process-wide; tests that count live handles run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn last_error() -> String {
    // SAFETY: `ferry_last_error` returns a NUL-terminated thread-local string.
    unsafe { CStr::from_ptr(ferry_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn ok(s: FerryStatus) {
    assert_eq!(s, FerryStatus::Ok, "{}", last_error());
}

fn sim() -> *mut FerryDevice {
    let mut dev = ptr::null_mut();
    // SAFETY: `dev` is a valid out-pointer.
    ok(unsafe { ferry_device_open_sim(0, &mut dev) });
    dev
}

/// A model with `groups` groups of two f32 tensors of `n` elements each, in order.
fn model(dev: *mut FerryDevice, groups: usize, n: usize) -> *mut FerryModel {
    let mut m = ptr::null_mut();
    // SAFETY: valid handle and out-pointer.
    ok(unsafe { ferry_model_new(dev, &mut m) });
    let mut order = Vec::new();
    for g in 0..groups {
        let names: Vec<std::ffi::CString> = (0..2)
            .map(|k| std::ffi::CString::new(format!("g{g}.t{k}")).unwrap())
            .collect();
        for (k, name) in names.iter().enumerate() {
            let data: Vec<f32> = (0..n).map(|i| (g * 1000 + k * 100 + i) as f32).collect();
            let shape = [n as u64];
            // SAFETY: all pointers valid for the lengths given.
            ok(unsafe {
                ferry_model_add_buffer(
                    m,
                    name.as_ptr(),
                    FerryDtype::F32 as u32,
                    shape.as_ptr(),
                    1,
                    data.as_ptr().cast(),
                    n * 4,
                    0,
                )
            });
        }
        let ptrs: Vec<*const c_char> = names.iter().map(|c| c.as_ptr()).collect();
        let gname = std::ffi::CString::new(format!("g{g}")).unwrap();
        let mut idx = u32::MAX;
        // SAFETY: as above.
        ok(unsafe {
            ferry_model_add_group(
                m,
                gname.as_ptr(),
                ptr::null(),
                ptrs.as_ptr(),
                2,
                1000,
                &mut idx,
            )
        });
        assert_eq!(idx as usize, g);
        order.push(idx);
    }
    // SAFETY: `order` valid for its length.
    ok(unsafe { ferry_model_set_order(m, order.as_ptr(), order.len()) });
    m
}

fn scheduler(m: *mut FerryModel, mode: FerryMode, budget: u64) -> *mut FerryScheduler {
    let cfg = ferry_scheduler_config_default(mode as u32, budget);
    let mut s = ptr::null_mut();
    // SAFETY: valid handle, config and out-pointer.
    ok(unsafe { ferry_scheduler_new(m, &cfg, &mut s) });
    s
}

#[test]
fn double_free_and_use_after_free_are_refused() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = live_handles();
    let dev = sim();
    let m = model(dev, 3, 256);
    let s = scheduler(m, FerryMode::Auto, 4096);
    // Free in any order: the scheduler keeps what it needs.
    ok(ferry_device_free(dev));
    ok(ferry_model_free(m));
    ok(ferry_begin_pass(s));
    let mut views = [FerryTensor::default(); 2];
    let mut n = 0;
    // SAFETY: `views` holds 2, `n` is valid.
    ok(unsafe { ferry_acquire(s, 1, views.as_mut_ptr(), 2, &mut n) });
    let mut back = vec![0f32; 256];
    // SAFETY: `back` holds `views[1].bytes` bytes.
    ok(unsafe { ferry_scheduler_read(s, views[1].ptr, back.as_mut_ptr().cast(), 1024) });
    assert_eq!(back[3], (1000 + 100 + 3) as f32);
    ok(ferry_release(s, 1));
    ok(ferry_end_pass(s));
    ok(ferry_scheduler_free(s));

    assert_eq!(ferry_scheduler_free(s), FerryStatus::InvalidHandle);
    assert!(last_error().contains("already freed"), "{}", last_error());
    assert_eq!(ferry_model_free(m), FerryStatus::InvalidHandle);
    assert_eq!(ferry_device_free(dev), FerryStatus::InvalidHandle);
    assert_eq!(ferry_begin_pass(s), FerryStatus::InvalidHandle);
    assert_eq!(ferry_release(s, 0), FerryStatus::InvalidHandle);
    let mut m2 = ptr::null_mut();
    // SAFETY: `m2` is a valid out-pointer; `dev` is a stale token, never dereferenced.
    assert_eq!(
        unsafe { ferry_model_new(dev, &mut m2) },
        FerryStatus::InvalidHandle
    );
    assert!(m2.is_null());
    assert_eq!(live_handles(), before, "every handle was freed once");
}

#[test]
fn wrong_kind_null_and_forged_handles_are_refused() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dev = sim();
    // A device handle passed as a model.
    assert_eq!(ferry_model_free(dev.cast()), FerryStatus::InvalidHandle);
    assert!(
        last_error().contains("is a FerryDevice, not a FerryModel"),
        "{}",
        last_error()
    );
    assert_eq!(ferry_model_free(ptr::null_mut()), FerryStatus::NullPointer);
    let forged = 0xdead_beef_usize as *mut FerryScheduler;
    assert_eq!(ferry_scheduler_free(forged), FerryStatus::InvalidHandle);
    assert!(last_error().contains("never returned"), "{}", last_error());
    ok(ferry_device_free(dev));
}

#[test]
fn bad_arguments_are_status_codes() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dev = sim();
    let m = model(dev, 2, 64);
    let bad_utf8 = [0x66u8, 0xff, 0xfe, 0];
    // SAFETY: NUL-terminated byte strings; null prefix allowed.
    unsafe {
        assert_eq!(
            ferry_model_add_file(m, bad_utf8.as_ptr().cast(), ptr::null(), 0, ptr::null_mut()),
            FerryStatus::InvalidUtf8
        );
        assert_eq!(
            ferry_model_add_file(m, ptr::null(), ptr::null(), 0, ptr::null_mut()),
            FerryStatus::NullPointer
        );
        assert_eq!(
            ferry_model_add_file(
                m,
                c"/nonexistent/x.safetensors".as_ptr(),
                ptr::null(),
                0,
                ptr::null_mut()
            ),
            FerryStatus::Io
        );
        // In-place buffers need CUDA.
        let data = [0f32; 4];
        let shape = [4u64];
        assert_eq!(
            ferry_model_add_buffer(
                m,
                c"x".as_ptr(),
                FerryDtype::F32 as u32,
                shape.as_ptr(),
                1,
                data.as_ptr().cast(),
                16,
                FERRY_IN_PLACE
            ),
            FerryStatus::Unsupported
        );
        // Size that does not match the shape.
        assert_eq!(
            ferry_model_add_buffer(
                m,
                c"y".as_ptr(),
                FerryDtype::F32 as u32,
                shape.as_ptr(),
                1,
                data.as_ptr().cast(),
                12,
                0
            ),
            FerryStatus::InvalidArgument
        );
        let order = [0u32, 5];
        assert_eq!(
            ferry_model_set_order(m, order.as_ptr(), 2),
            FerryStatus::InvalidArgument
        );
    }
    // Model mode needs the whole component resident.
    let cfg = ferry_scheduler_config_default(FerryMode::Model as u32, 300);
    let mut s = ptr::null_mut();
    let bad_mode = ferry_scheduler_config_default(9, 1 << 20);
    // SAFETY: valid pointers.
    assert_eq!(
        unsafe { ferry_scheduler_new(m, &bad_mode, &mut s) },
        FerryStatus::InvalidArgument
    );
    assert!(last_error().contains("not a FerryMode"), "{}", last_error());
    // SAFETY: the name of any integer is a static string.
    assert_eq!(
        unsafe { CStr::from_ptr(ferry_status_name(77)) }.to_bytes(),
        b"unknown status"
    );
    let mut s = ptr::null_mut();
    // SAFETY: valid pointers.
    assert_eq!(
        unsafe { ferry_scheduler_new(m, &cfg, &mut s) },
        FerryStatus::BudgetTooSmall
    );
    assert!(
        last_error().contains("minimum workable budget"),
        "{}",
        last_error()
    );

    let s = scheduler(m, FerryMode::Group, 2048);
    // SAFETY: null stream pointer is a value, not dereferenced.
    assert_eq!(
        unsafe { ferry_scheduler_set_stream(s, ptr::null_mut()) },
        FerryStatus::Unsupported
    );
    // Out buffer too small: nothing acquired, the count is reported.
    let mut one = [FerryTensor::default(); 1];
    let mut n = 0;
    ok(ferry_begin_pass(s));
    // SAFETY: `one` holds 1 element, `capacity` says so.
    assert_eq!(
        unsafe { ferry_acquire(s, 0, one.as_mut_ptr(), 1, &mut n) },
        FerryStatus::BufferTooSmall
    );
    assert_eq!(n, 2);
    // SAFETY: unknown group, valid pointers.
    assert_eq!(
        unsafe { ferry_acquire(s, 9, one.as_mut_ptr(), 1, &mut n) },
        FerryStatus::InvalidArgument
    );
    let mut two = [FerryTensor::default(); 2];
    // SAFETY: `two` holds 2.
    ok(unsafe { ferry_acquire(s, 0, two.as_mut_ptr(), 2, &mut n) });
    assert!(two.iter().all(|t| t.bytes == 256 && t.ptr != 0));
    let mut dst = [0u8; 8];
    // SAFETY: `dst` holds 8 bytes; the device address is bogus and must be refused.
    assert_ne!(
        unsafe { ferry_scheduler_read(s, 8, dst.as_mut_ptr().cast(), 8) },
        FerryStatus::Ok
    );
    ok(ferry_release(s, 0));
    ok(ferry_end_pass(s));
    assert_eq!(
        ferry_end_pass(s),
        FerryStatus::InvalidArgument,
        "end_pass without begin_pass"
    );

    // Text output: length query, truncation, full copy.
    let mut len = 0usize;
    // SAFETY: null buffer with capacity 0 asks for the length.
    ok(unsafe { ferry_scheduler_plan(s, ptr::null_mut(), 0, &mut len) });
    assert!(len > 20);
    let mut small = [0x55 as c_char; 8];
    // SAFETY: `small` holds 8.
    assert_eq!(
        unsafe { ferry_scheduler_plan(s, small.as_mut_ptr(), 8, &mut len) },
        FerryStatus::BufferTooSmall
    );
    // SAFETY: the truncated text is NUL-terminated within `small`.
    assert_eq!(
        unsafe { CStr::from_ptr(small.as_ptr()) }.to_bytes(),
        b"plan: m"
    );
    let mut full = vec![0 as c_char; len + 1];
    // SAFETY: `full` holds len + 1.
    ok(unsafe { ferry_scheduler_plan(s, full.as_mut_ptr(), len + 1, &mut len) });
    // SAFETY: NUL-terminated.
    let text = unsafe { CStr::from_ptr(full.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    assert!(text.starts_with("plan: mode group"), "{text}");
    let mut copied = 0u64;
    // SAFETY: valid out-pointer.
    ok(unsafe { ferry_scheduler_bytes_copied(s, &mut copied) });
    assert!(copied >= 512);
    ok(ferry_scheduler_free(s));
    ok(ferry_model_free(m));
    ok(ferry_device_free(dev));
}

#[test]
fn cuda_without_a_gpu_is_a_clean_error() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut dev = ptr::null_mut();
    // SAFETY: valid out-pointer.
    match unsafe { ferry_device_open_cuda(0, &mut dev) } {
        FerryStatus::Ok => {
            // A GPU: the same pass through the caller-stream bridge (the legacy default stream).
            let m = model(dev, 3, 1024);
            let s = scheduler(m, FerryMode::Group, 12 << 10);
            // SAFETY: null is the legacy default stream, valid in the primary context.
            ok(unsafe { ferry_scheduler_set_stream(s, ptr::null_mut()) });
            for _ in 0..3 {
                ok(ferry_begin_pass(s));
                for g in 0..3u32 {
                    let mut v = [FerryTensor::default(); 2];
                    let mut n = 0;
                    let mut back = vec![0f32; 1024];
                    // SAFETY: `v` holds 2; `back` holds 4096 bytes.
                    unsafe {
                        ok(ferry_acquire(s, g, v.as_mut_ptr(), 2, &mut n));
                        ok(ferry_scheduler_read(
                            s,
                            v[1].ptr,
                            back.as_mut_ptr().cast(),
                            4096,
                        ));
                    }
                    assert_eq!(back[7], (g as usize * 1000 + 100 + 7) as f32);
                    ok(ferry_release(s, g));
                }
                ok(ferry_end_pass(s));
            }
            ok(ferry_scheduler_detach_stream(s));
            ok(ferry_scheduler_free(s));
            ok(ferry_model_free(m));
            ok(ferry_device_free(dev));
        }
        s => {
            assert_eq!(s, FerryStatus::NoDevice, "{}", last_error());
            assert!(dev.is_null());
            assert!(last_error().contains("CUDA"), "{}", last_error());
        }
    }
}

#[test]
fn traced_order_is_planned_after_the_first_pass() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dev = sim();
    let m = model(dev, 4, 64);
    // SAFETY: an empty order: null with length 0.
    ok(unsafe { ferry_model_set_order(m, ptr::null(), 0) });
    let s = scheduler(m, FerryMode::Auto, 1024);
    let mut tracing = false;
    // SAFETY: valid out-pointer.
    ok(unsafe { ferry_scheduler_tracing(s, &mut tracing) });
    assert!(tracing);
    for _ in 0..2 {
        ok(ferry_begin_pass(s));
        for g in [3u32, 1, 0, 2] {
            let mut v = [FerryTensor::default(); 2];
            let mut n = 0;
            // SAFETY: `v` holds 2.
            ok(unsafe { ferry_acquire(s, g, v.as_mut_ptr(), 2, &mut n) });
            ok(ferry_scheduler_busy(s, 500));
            ok(ferry_release(s, g));
        }
        ok(ferry_end_pass(s));
    }
    // SAFETY: valid out-pointer.
    ok(unsafe { ferry_scheduler_tracing(s, &mut tracing) });
    assert!(!tracing);
    let mut len = 0;
    // SAFETY: length query.
    ok(unsafe { ferry_scheduler_trace(s, ptr::null_mut(), 0, &mut len) });
    assert!(len > 100);
    ok(ferry_scheduler_free(s));
    ok(ferry_model_free(m));
    ok(ferry_device_free(dev));
}

#[test]
fn concurrent_frees_succeed_exactly_once() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = live_handles();
    let dev = sim();
    let m = model(dev, 2, 64);
    let s = scheduler(m, FerryMode::Auto, 1024) as usize;
    let results: Vec<FerryStatus> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                // Some threads use the scheduler while others free it.
                let _ = ferry_begin_pass(s as *const FerryScheduler);
                ferry_scheduler_free(s as *mut FerryScheduler)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().expect("no panic crosses the boundary"))
        .collect();
    let freed = results.iter().filter(|&&r| r == FerryStatus::Ok).count();
    assert_eq!(freed, 1, "{results:?}");
    assert!(results
        .iter()
        .all(|&r| r == FerryStatus::Ok || r == FerryStatus::InvalidHandle));
    ok(ferry_model_free(m));
    ok(ferry_device_free(dev));
    assert_eq!(live_handles(), before);
}
