//! Shared by the full-size CPU benches (`sd_unet`, `sd_vae`): random fp16 weights written both into
//! a `HostStore` and a diffusers folder, peak-RSS readings, and the PyTorch side
//! (`scripts/cpu-bench/torch_step.py`) run in a child process on the same folder.

use ferry_pager::host::HostStore;
use ferry_pager::weights::DType;
use ferry_sd::tensor::Tensor;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A small deterministic generator (splitmix64) for weights and inputs.
pub struct Rng(pub u64);

impl Rng {
    /// Uniform in [-1, 1).
    pub fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// A tensor of `shape` with uniform values in [-1, 1).
pub fn tensor(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    Tensor::new(shape, (0..n).map(|_| rng.next()).collect()).expect("shape matches data")
}

/// Timed steps per run: `FERRY_BENCH_STEPS`, else `default`.
pub fn steps(default: usize) -> usize {
    std::env::var("FERRY_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The thread count both sides use: `MATMUL_NUM_THREADS` when set (Ferry's GEMM reads it), else
/// the available parallelism (Ferry's default).
pub fn threads() -> usize {
    std::env::var("MATMUL_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Registers every weight of `shapes` as fp16 under `component.name` in `store` and, when `dir` is
/// given, writes the same bytes as `dir/diffusion_pytorch_model.safetensors` (streamed, so the
/// weights are never held twice). Norm weights near 1, other weights uniform with std
/// ~1/sqrt(fan_in) (PyTorch-like init keeps activations finite), biases small. Returns the bytes.
pub fn register_weights(
    store: &HostStore,
    component: &str,
    shapes: &[(String, Vec<usize>)],
    seed: u64,
    dir: Option<&Path>,
) -> u64 {
    let mut file =
        dir.map(|d| safetensors_header(&d.join("diffusion_pytorch_model.safetensors"), shapes));
    let mut rng = Rng(seed);
    let mut bytes = 0u64;
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let is_norm = name.contains("norm") && shape.len() == 1;
        let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
        let scale = if shape.len() == 1 {
            0.05
        } else {
            (3.0 / fan_in as f32).sqrt()
        };
        let mut data = Vec::with_capacity(n * 2);
        for _ in 0..n {
            let v = rng.next() * scale
                + if is_norm && name.ends_with("weight") {
                    1.0
                } else {
                    0.0
                };
            data.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
        store
            .register_bytes(&format!("{component}.{name}"), DType::F16, shape, &data)
            .expect("register weight");
        if let Some(f) = &mut file {
            f.write_all(&data).expect("write safetensors");
        }
        bytes += data.len() as u64;
    }
    if let Some(f) = file {
        f.into_inner().expect("flush safetensors");
    }
    bytes
}

/// Creates a safetensors file for fp16 tensors of `shapes` (in that order) and writes its header;
/// the caller appends the data.
fn safetensors_header(path: &Path, shapes: &[(String, Vec<usize>)]) -> BufWriter<File> {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape) in shapes {
        let len = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [off, off + len]}),
        );
        off += len;
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut h = serde_json::to_string(&header).expect("json");
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    let mut f = BufWriter::with_capacity(1 << 20, File::create(path).expect("create safetensors"));
    f.write_all(&(h.len() as u64).to_le_bytes()).expect("write");
    f.write_all(h.as_bytes()).expect("write");
    f
}

/// A `/proc/self/status` field in bytes (`VmRSS`, `VmHWM`), if readable.
pub fn proc_status_bytes(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s
        .lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?;
    let kb: u64 = line[key.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Resets the process's peak RSS (`VmHWM`) to the current RSS (Linux >= 4.0); false if it could not.
/// Minor page faults of this process so far (`/proc/self/stat` field 10), if readable.
pub fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name, which may itself contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(7)?.parse().ok()
}

pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak-RSS bookkeeping for the timed part of a run.
pub struct RssWindow {
    base: Option<u64>,
    reset: bool,
}

impl RssWindow {
    /// Starts a window: resets the peak and remembers the current RSS.
    pub fn start() -> RssWindow {
        let reset = reset_peak_rss();
        RssWindow {
            base: proc_status_bytes("VmRSS"),
            reset,
        }
    }

    /// One line describing the window: the process peak, the growth over the window, and the
    /// comparable figure `growth + weight_bytes` (what a process that starts with only the fp16
    /// weights in memory would peak at; the bench's generated weights and the simulated device's
    /// copy of them are otherwise counted).
    pub fn report(&self, weight_bytes: u64) -> (Option<u64>, String) {
        let hwm = proc_status_bytes("VmHWM");
        match (hwm, self.base, self.reset) {
            (Some(h), Some(b), true) => {
                let comparable = h.saturating_sub(b) + weight_bytes;
                (
                    Some(comparable),
                    format!(
                        "Ferry peak RSS {:.2} GB comparable (= peak growth during the steps {:.2} GB \
                         + fp16 weights {:.2} GB; process VmHWM {:.2} GB incl. generated weights and \
                         the simulated device's copy)",
                        gb(comparable),
                        gb(h.saturating_sub(b)),
                        gb(weight_bytes),
                        gb(h)
                    ),
                )
            }
            (Some(h), _, _) => (
                None,
                format!(
                    "Ferry peak RSS: process VmHWM {:.2} GB (could not reset the peak; includes \
                     weight generation)",
                    gb(h)
                ),
            ),
            _ => (None, "Ferry peak RSS: unavailable (no /proc)".into()),
        }
    }
}

/// Bytes as GB (10^9).
pub fn gb(b: u64) -> f64 {
    b as f64 / 1e9
}

/// What the PyTorch child reported.
pub struct TorchResult {
    /// torch version.
    pub version: String,
    /// Model load time (from_pretrained, f16 -> f32).
    pub load_s: f64,
    /// Each step's wall time; the first is cold.
    pub steps_s: Vec<f64>,
    /// `ru_maxrss` of the child.
    pub peak_rss: u64,
    /// Its last output.
    pub out: Tensor,
}

/// A temporary directory for the diffusers folder: `FERRY_BENCH_TMP` or the system temp dir.
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    let mut b = tempfile::Builder::new();
    b.prefix(tag);
    match std::env::var_os("FERRY_BENCH_TMP") {
        Some(p) => b.tempdir_in(p),
        None => b.tempdir(),
    }
    .expect("temp dir")
}

/// Runs `scripts/cpu-bench/torch_step.py MODEL DIR` with the same thread count and steps.
/// `Err` carries the reason PyTorch was skipped or failed.
pub fn run_torch(
    model: &str,
    dir: &Path,
    threads: usize,
    steps: usize,
) -> Result<TorchResult, String> {
    let python = std::env::var("FERRY_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cpu-bench/torch_step.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(model)
        .arg(dir)
        .args([
            "--threads",
            &threads.to_string(),
            "--steps",
            &steps.to_string(),
        ])
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(l) = stdout.lines().find_map(|l| l.strip_prefix("SKIP ")) {
        return Err(l.to_string());
    }
    let Some(json) = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: String = err.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
        return Err(format!(
            "{python} failed ({}): {} {tail}",
            out.status,
            stdout.trim()
        ));
    };
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("bad RESULT: {e}"))?;
    let outp = ferry_sd::npy::read_f32(&dir.join("torch_out.npy")).map_err(|e| e.to_string())?;
    Ok(TorchResult {
        version: v["torch"].as_str().unwrap_or("?").to_string(),
        load_s: v["load_s"].as_f64().unwrap_or(f64::NAN),
        steps_s: v["steps_s"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default(),
        peak_rss: v["peak_rss_bytes"].as_u64().unwrap_or(0),
        out: outp,
    })
}

/// Best (warm) time: the minimum over the steps after the first, or the only step.
pub fn warm(steps: &[f64]) -> f64 {
    if steps.len() > 1 {
        steps[1..].iter().copied().fold(f64::INFINITY, f64::min)
    } else {
        steps.first().copied().unwrap_or(f64::NAN)
    }
}

/// Prints the side-by-side summary.
pub fn print_summary(
    what: &str,
    ferry_steps: &[f64],
    ferry_rss: Option<u64>,
    ferry_out: &Tensor,
    torch: &Result<TorchResult, String>,
) {
    let fw = warm(ferry_steps);
    println!("== {what} ==");
    println!(
        "Ferry:   cold {:.2} s, warm {fw:.2} s{}",
        ferry_steps.first().copied().unwrap_or(f64::NAN),
        ferry_rss.map_or(String::new(), |r| format!(
            ", peak RSS {:.2} GB (comparable)",
            gb(r)
        ))
    );
    match torch {
        Err(why) => println!("PyTorch: skipped ({why})"),
        Ok(t) => {
            let tw = warm(&t.steps_s);
            println!(
                "PyTorch: cold {:.2} s, warm {tw:.2} s, peak RSS {:.2} GB (ru_maxrss; torch {}, load {:.1} s)",
                t.steps_s.first().copied().unwrap_or(f64::NAN),
                gb(t.peak_rss),
                t.version,
                t.load_s
            );
            println!(
                "ratio Ferry/PyTorch: warm {:.2}x, cold {:.2}x{}",
                fw / tw,
                ferry_steps.first().copied().unwrap_or(f64::NAN)
                    / t.steps_s.first().copied().unwrap_or(f64::NAN),
                ferry_rss.map_or(String::new(), |r| format!(
                    ", peak RSS {:.2}x",
                    r as f64 / t.peak_rss as f64
                ))
            );
            match ferry_out.max_abs_diff(&t.out) {
                Ok(d) => println!(
                    "cross-check: max |Ferry - PyTorch| = {d:.3e} (output max |x| {:.3})",
                    t.out.max_abs()
                ),
                Err(e) => println!("cross-check: FAILED: {e}"),
            }
        }
    }
}
