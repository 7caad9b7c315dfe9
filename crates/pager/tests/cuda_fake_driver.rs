//! `CudaDevice::new` against fake CUDA driver libraries (tiny C stubs built with the system C
//! compiler that every Rust toolchain on Linux links with), so that the "driver present but no
//! usable GPU" paths are checked on machines without CUDA too.
//!
//! The test re-runs its own binary with `LD_LIBRARY_PATH` pointing at a stub `libcuda.so`; in that
//! child, `FERRY_FAKE_CUDA` selects the stub's behaviour and the same test function only opens the
//! device and prints the outcome.

#![cfg(target_os = "linux")]

use ferry_pager::device::cuda::CudaDevice;
use ferry_pager::Error;
use std::path::Path;
use std::process::Command;

const STUB: &str = r#"
#include <stdlib.h>
#include <string.h>
static const char *mode(void) { const char *m = getenv("FERRY_FAKE_CUDA"); return m ? m : ""; }
int cuInit(unsigned flags) { (void)flags; return strcmp(mode(), "no_device") == 0 ? 100 : 0; }
int cuDriverGetVersion(int *v) { *v = strcmp(mode(), "old_driver") == 0 ? 11080 : 12040; return 0; }
#ifndef NO_COUNT
int cuDeviceGetCount(int *n) { *n = strcmp(mode(), "zero_devices") == 0 ? 0 : 1; return 0; }
#endif
int cuGetErrorString(int e, const char **s) { (void)e; *s = "fake driver error"; return 0; }
int cuGetErrorName(int e, const char **s) { (void)e; *s = "CUDA_ERROR_FAKE"; return 0; }
"#;

const CHILD_ENV: &str = "FERRY_FAKE_CUDA_CHILD";
const TEST_NAME: &str = "new_maps_fake_driver_failures_to_errors";

fn build_stub(dir: &Path, name: &str, defines: &[&str]) -> bool {
    let lib_dir = dir.join(name);
    std::fs::create_dir_all(&lib_dir).unwrap();
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, STUB).unwrap();
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(lib_dir.join("libcuda.so"))
        .args(defines)
        .arg(&src)
        .status();
    matches!(status, Ok(s) if s.success())
}

fn run_child(lib_dir: &Path, mode: &str, ordinal: usize) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env("LD_LIBRARY_PATH", lib_dir)
        .env("FERRY_FAKE_CUDA", mode)
        .env(CHILD_ENV, ordinal.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("OUTCOME ").map(|(_, o)| o))
        .unwrap_or_else(|| {
            panic!(
                "child ({mode}) printed no outcome; status {:?}\nstdout:\n{stdout}\nstderr:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(out.status.success(), "child ({mode}) failed: {line}");
    line.to_string()
}

#[test]
fn new_maps_fake_driver_failures_to_errors() {
    if let Ok(ordinal) = std::env::var(CHILD_ENV) {
        let ordinal: usize = ordinal.parse().unwrap();
        let outcome = match CudaDevice::new(ordinal) {
            Ok(_) => "Ok".to_string(),
            Err(Error::NoDriver) => "NoDriver".to_string(),
            Err(Error::NoDevice(m)) => format!("NoDevice {m}"),
            Err(Error::Cuda { call, message }) => format!("Cuda {call} {message}"),
            Err(other) => format!("Other {other}"),
        };
        println!("OUTCOME {outcome}");
        return;
    }

    let dir = tempfile::tempdir().unwrap();
    assert!(
        build_stub(dir.path(), "full", &[]) && build_stub(dir.path(), "no_count", &["-DNO_COUNT"]),
        "could not build the stub driver with `cc`"
    );
    let full = dir.path().join("full");

    let o = run_child(&full, "no_device", 0);
    assert!(
        o.starts_with("NoDevice") && o.contains("CUDA_ERROR_NO_DEVICE"),
        "{o}"
    );

    let o = run_child(&full, "old_driver", 0);
    assert!(
        o.starts_with("NoDevice") && o.contains("11.8") && o.contains("12.4"),
        "{o}"
    );

    let o = run_child(&full, "zero_devices", 0);
    assert!(o.starts_with("NoDevice") && o.contains("0 GPU"), "{o}");

    let o = run_child(&full, "one_device", 3);
    assert!(
        o.starts_with("NoDevice") && o.contains("GPU 3") && o.contains("1 GPU"),
        "{o}"
    );

    // A driver library that lacks a symbol: cudarc panics inside; we must return an error.
    let o = run_child(&dir.path().join("no_count"), "one_device", 0);
    assert!(
        o.starts_with("Cuda cuInit") && o.contains("cuDeviceGetCount"),
        "{o}"
    );
}
