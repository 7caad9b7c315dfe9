//! The `ferry-ptx` binary: real kernels of `kernels/ptx` with `.npy` inputs and outputs, the
//! sanitizer's findings, and one-line errors for bad arguments.

use ferry_sd::npy;
use ferry_sd::tensor::Tensor;
use half::bf16;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kernels(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../kernels/ptx/{name}.ptx"))
}

fn ferry_ptx(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry-ptx"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("ferry-ptx runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Inputs with mixed signs and magnitudes, a NaN and infinities.
fn inputs(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    let mut v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 8.0
        })
        .collect();
    v[1] = f32::NAN;
    v[2] = f32::INFINITY;
    v[3] = f32::NEG_INFINITY;
    v
}

fn write_input(dir: &Path, name: &str, data: &[f32]) {
    let t = Tensor::new(vec![data.len()], data.to_vec()).unwrap();
    npy::write_f32(&dir.join(name), &t).unwrap();
}

/// The header and data bytes of a `.npy` file.
fn read_npy(path: &Path) -> (String, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = String::from_utf8_lossy(&bytes[10..10 + len]).into_owned();
    (header, bytes[10 + len..].to_vec())
}

fn same_f32(got: f32, want: f32) -> bool {
    (got.is_nan() && want.is_nan()) || got.to_bits() == want.to_bits()
}

#[test]
fn add_f32_with_npy_inputs_matches_host_sums() {
    let dir = tempfile::tempdir().unwrap();
    let n = 300;
    let (a, b) = (inputs(n, 1), inputs(n, 2));
    write_input(dir.path(), "a.npy", &a);
    write_input(dir.path(), "b.npy", &b);
    let ptx = kernels("elementwise");
    let out = ferry_ptx(
        dir.path(),
        &[
            "--ptx",
            ptx.to_str().unwrap(),
            "--kernel",
            "ferry_add_f32",
            "--grid",
            "2",
            "--block",
            "256",
            "--out",
            "res",
            "in:a.npy",
            "in:b.npy",
            "out:y:f32:300",
            "u64:300",
        ],
    );
    // The output directory does not exist yet: refused before launching.
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    std::fs::create_dir(dir.path().join("res")).unwrap();
    let out = ferry_ptx(
        dir.path(),
        &[
            "--ptx",
            ptx.to_str().unwrap(),
            "--kernel",
            "ferry_add_f32",
            "--grid",
            "2",
            "--block",
            "256",
            "--out",
            "res",
            "in:a.npy",
            "in:b.npy",
            "out:y:f32:300",
            "u64:300",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let got = npy::read_f32(&dir.path().join("res/y.npy")).unwrap();
    assert_eq!(got.shape(), &[n]);
    for (i, g) in got.data().iter().enumerate() {
        let want = a[i] + b[i];
        assert!(same_f32(*g, want), "y[{i}]: got {g}, want {want}");
    }
    assert!(got.data()[1].is_nan());
}

#[test]
fn partial_launch_leaves_the_poison_visible() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (inputs(300, 3), inputs(300, 4));
    write_input(dir.path(), "a.npy", &a);
    write_input(dir.path(), "b.npy", &b);
    let ptx = kernels("elementwise");
    // n = 10: elements from 10 on are never written and keep the 0xFF poison (a NaN).
    let out = ferry_ptx(
        dir.path(),
        &[
            "--ptx",
            ptx.to_str().unwrap(),
            "--kernel",
            "ferry_add_f32",
            "--grid",
            "1",
            "--block",
            "32",
            "in:a.npy",
            "in:b.npy",
            "out:y:f32:12",
            "u64:10",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, data) = read_npy(&dir.path().join("y.npy"));
    assert_eq!(data.len(), 48);
    assert_eq!(&data[40..], &[0xFF; 8]);
    assert_eq!(
        f32::from_le_bytes(data[0..4].try_into().unwrap()),
        a[0] + b[0]
    );
}

#[test]
fn bf16_output_comes_back_as_u2_bits() {
    let dir = tempfile::tempdir().unwrap();
    let n = 70;
    let x = inputs(n, 5);
    write_input(dir.path(), "x.npy", &x);
    let ptx = kernels("elementwise");
    let out = ferry_ptx(
        dir.path(),
        &[
            "--ptx",
            ptx.to_str().unwrap(),
            "--kernel",
            "ferry_cast_f32_bf16",
            "--grid",
            "1",
            "--block",
            "128",
            "in:x.npy",
            "out:y:bf16:70",
            "u64:70",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (header, data) = read_npy(&dir.path().join("y.npy"));
    assert!(header.contains("'descr': '<u2'"), "{header}");
    assert!(header.contains("'shape': (70,)"), "{header}");
    assert_eq!(data.len(), n * 2);
    for (i, c) in data.chunks(2).enumerate() {
        let got = bf16::from_bits(u16::from_le_bytes([c[0], c[1]]));
        // Round to nearest even, as half does.
        let want = bf16::from_f32(x[i]);
        assert!(
            (got.is_nan() && want.is_nan()) || got.to_bits() == want.to_bits(),
            "y[{i}]: got {got}, want {want} (x = {})",
            x[i]
        );
    }
}

const OOB: &str = "\
.version 8.0
.target sm_80
.address_size 64

.visible .entry oob_store(
	.param .u64 oob_store_param_0
)
{
	.reg .b32 	%r<3>;
	.reg .b64 	%rd<5>;

	ld.param.u64 	%rd1, [oob_store_param_0];
	cvta.to.global.u64 	%rd2, %rd1;
	mov.u32 	%r1, %tid.x;
	mul.wide.u32 	%rd3, %r1, 4;
	add.s64 	%rd4, %rd2, %rd3;
	st.global.u32 	[%rd4], %r1;
	ret;
}
";

#[test]
fn out_of_bounds_store_fails_with_a_report() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("oob.ptx"), OOB).unwrap();
    let args = |block: &'static str| {
        [
            "--ptx",
            "oob.ptx",
            "--kernel",
            "oob_store",
            "--grid",
            "1",
            "--block",
            block,
            "out:y:u32:16",
        ]
    };
    // In bounds: every thread writes its index.
    let ok = ferry_ptx(dir.path(), &args("16"));
    assert!(ok.status.success(), "{}", stderr(&ok));
    let (header, data) = read_npy(&dir.path().join("y.npy"));
    assert!(header.contains("'<u4'"), "{header}");
    let got: Vec<u32> = data
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got, (0..16).collect::<Vec<u32>>());
    std::fs::remove_file(dir.path().join("y.npy")).unwrap();

    // 32 threads on 16 elements: thread 16 stores past the end.
    let bad = ferry_ptx(dir.path(), &args("32"));
    assert!(!bad.status.success());
    let err = stderr(&bad);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("ferry-ptx: error: "), "{err}");
    assert!(
        err.contains("oob_store") && err.contains("thread (16,0,0)") && err.contains("store"),
        "{err}"
    );
    assert!(err.contains("PTX line 17"), "{err}");
    // Nothing written after a failed launch.
    assert!(!dir.path().join("y.npy").exists());
}

fn one_line_error(dir: &Path, args: &[&str], needle: &str) {
    let o = ferry_ptx(dir, args);
    assert!(!o.status.success(), "{args:?} succeeded");
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    assert!(err.starts_with("ferry-ptx: error: "), "{err}");
    assert!(err.contains(needle), "{args:?}: {err} lacks {needle}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("oob.ptx"), OOB).unwrap();
    std::fs::write(d.join("bad.ptx"), "this is not ptx\n").unwrap();
    let base = |rest: &[&'static str]| {
        let mut v = vec![
            "--ptx",
            "oob.ptx",
            "--kernel",
            "oob_store",
            "--grid",
            "1",
            "--block",
            "16",
        ];
        v.extend_from_slice(rest);
        v
    };
    // Wrong argument count.
    one_line_error(d, &base(&[]), "takes 1 parameters, 0 given");
    one_line_error(d, &base(&["u64:1", "u64:2"]), "takes 1 parameters, 2 given");
    // Wrong size: a u32 for a pointer parameter, named.
    one_line_error(d, &base(&["u32:7"]), "oob_store_param_0");
    // Malformed ARGs.
    one_line_error(d, &base(&["u32"]), "bad argument `u32`");
    one_line_error(d, &base(&["u32:-1"]), "not a valid u32");
    one_line_error(d, &base(&["out:y:f8:4"]), "DTYPE");
    one_line_error(d, &base(&["in:missing.npy"]), "missing.npy");
    // Unknown kernel, malformed PTX, missing file.
    one_line_error(
        d,
        &[
            "--ptx", "oob.ptx", "--kernel", "nope", "--grid", "1", "--block", "1", "u64:0",
        ],
        "no kernel `nope`",
    );
    one_line_error(
        d,
        &[
            "--ptx", "bad.ptx", "--kernel", "k", "--grid", "1", "--block", "1",
        ],
        "bad.ptx",
    );
    one_line_error(
        d,
        &[
            "--ptx", "none.ptx", "--kernel", "k", "--grid", "1", "--block", "1",
        ],
        "none.ptx",
    );
    // Geometry beyond the limits, and malformed geometry.
    one_line_error(
        d,
        &[
            "--ptx",
            "oob.ptx",
            "--kernel",
            "oob_store",
            "--grid",
            "1",
            "--block",
            "2048",
            "out:y:u32:4",
        ],
        "exceeds the limits",
    );
    one_line_error(
        d,
        &[
            "--ptx",
            "oob.ptx",
            "--kernel",
            "oob_store",
            "--grid",
            "1,x",
            "--block",
            "1",
            "out:y:u32:4",
        ],
        "--grid",
    );
    // A missing flag (clap's own error, folded to one line).
    one_line_error(
        d,
        &["--ptx", "oob.ptx", "--grid", "1", "--block", "1"],
        "--kernel",
    );
    assert!(!d.join("y.npy").exists());
}
