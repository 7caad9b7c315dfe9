//! Builds `examples/mlp.c` with the system C compiler against the static library and runs it on
//! the simulated device: streamed runs must be bit-identical to the resident run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The C compiler: `$CC`, else `cc`, else `gcc`; `None` when none runs.
fn c_compiler() -> Option<String> {
    let candidates: Vec<String> = std::env::var("CC")
        .ok()
        .into_iter()
        .chain(["cc".to_string(), "gcc".to_string()])
        .collect();
    candidates.into_iter().find(|cc| {
        Command::new(cc)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// The static library cargo built for this test run (beside the test binary).
fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir");
    for dir in [deps, deps.parent().unwrap_or(deps)] {
        let lib = dir.join("libferry_c.a");
        if lib.exists() {
            return lib;
        }
    }
    panic!("libferry_c.a not found beside {}", exe.display());
}

#[test]
fn mlp_example_streams_bit_identically() {
    let Some(cc) = c_compiler() else {
        eprintln!("SKIPPED: no C compiler found ($CC, cc, gcc); the C example was not built");
        return;
    };
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let exe = tmp.path().join("mlp");
    let out = Command::new(&cc)
        .args(["-std=c99", "-O1", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(crate_dir.join("include"))
        .arg(crate_dir.join("examples/mlp.c"))
        .arg(static_lib())
        .args(["-lpthread", "-ldl", "-lm", "-lrt", "-o"])
        .arg(&exe)
        .output()
        .expect("run the C compiler");
    assert!(
        out.status.success(),
        "compiling examples/mlp.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe)
        .arg(tmp.path())
        .output()
        .expect("run mlp");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "mlp failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("bit-identical to the resident run: OK"),
        "{stdout}"
    );
    assert!(stdout.contains("double free: "), "{stdout}");
    let trace = std::fs::read_to_string(tmp.path().join("trace.json")).expect("trace written");
    assert!(trace.trim_start().starts_with('{') || trace.trim_start().starts_with('['));
    assert!(trace.contains("blocks.3"), "trace names the groups");
    let metrics = std::fs::read_to_string(tmp.path().join("metrics.txt")).expect("metrics");
    assert!(!metrics.trim().is_empty());
}
