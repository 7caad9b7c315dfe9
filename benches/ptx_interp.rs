//! Speed of the PTX interpreter on real kernels of `kernels/ptx`, in instructions per second
//! (all threads' instructions, as counted by `LaunchReport::instructions`).
//!
//! `cargo bench -p ferry-sd --bench ptx_interp`. Each case is launched repeatedly for at least
//! `PTX_BENCH_SECS` seconds (default 2); the best and median launch times are printed. Then one
//! tiny SD 1.5 UNet step (the `tests/fixtures/models/sd15` fixture, 64×32, CFG, f32 and bf16)
//! runs through the whole GPU path on the emulated device (`PTX_BENCH_UNET=0` skips it).

use ferry_pager::device::sim::ptx::{launch, LaunchConfig, Limits, Module, ParamValue, VecMemory};
use ferry_sd::pipeline::{DeviceChoice, GenerateParams, LoadConfig, Pipeline};
use ferry_sd::tensor::DType;
use half::bf16;
use std::time::{Duration, Instant};

fn module(name: &str) -> Module {
    let path = format!(
        "{}/../../kernels/ptx/{name}.ptx",
        env!("CARGO_MANIFEST_DIR")
    );
    let src = std::fs::read_to_string(&path).expect("kernel PTX present");
    Module::parse(&src).expect("kernel PTX parses")
}

fn filled(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| bf16::from_f32(*x).to_bits()).collect()
}

fn gemm_cfg(m: usize, n: usize, tile: usize, threads: u32) -> LaunchConfig {
    let d = ferry_sd::cuda::gemm_dims(m, n, tile, threads).expect("gemm launch geometry");
    LaunchConfig {
        grid: [d.grid.0, d.grid.1, d.grid.2],
        block: [d.block.0, d.block.1, d.block.2],
        dynamic_shared: d.shared_mem,
    }
}

/// Launches `kernel` repeatedly and prints its instruction rate.
fn bench(
    what: &str,
    m: &Module,
    kernel: &str,
    cfg: LaunchConfig,
    params: &[ParamValue],
    mem: &mut VecMemory,
) {
    let secs: f64 = std::env::var("PTX_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let mut times = Vec::new();
    let mut instructions = 0;
    let start = Instant::now();
    while times.len() < 3 || start.elapsed() < Duration::from_secs_f64(secs) {
        let t = Instant::now();
        let r = launch(m, kernel, cfg, params, mem, Limits::default())
            .unwrap_or_else(|e| panic!("{kernel}: {e}"));
        times.push(t.elapsed().as_secs_f64());
        instructions = r.instructions;
    }
    times.sort_by(f64::total_cmp);
    let (best, median) = (times[0], times[times.len() / 2]);
    println!(
        "{what:<44} {instructions:>11} instr  best {:>8.2} ms  median {:>8.2} ms  {:>7.2} M instr/s (median)  {:>7.2} M instr/s (best)  [{} launches]",
        best * 1e3,
        median * 1e3,
        instructions as f64 / median / 1e6,
        instructions as f64 / best / 1e6,
        times.len()
    );
}

fn main() {
    let (elementwise, norm, gemm) = (module("elementwise"), module("norm"), module("gemm"));
    let mut mem = VecMemory::new();

    // Elementwise add, 64 Ki elements.
    let n = 1 << 16;
    let (a, b, y) = (
        mem.alloc_f32(&filled(n, 1)),
        mem.alloc_f32(&filled(n, 2)),
        mem.alloc(n * 4),
    );
    bench(
        "add_f32 n=65536",
        &elementwise,
        "ferry_add_f32",
        LaunchConfig {
            grid: [(n / 256) as u32, 1, 1],
            block: [256, 1, 1],
            dynamic_shared: 0,
        },
        &[
            ParamValue::Ptr(a),
            ParamValue::Ptr(b),
            ParamValue::Ptr(y),
            ParamValue::U64(n as u64),
        ],
        &mut mem,
    );

    // Layer norm over 77 rows of 768 (a CLIP text-encoder layer).
    let (rows, d) = (77usize, 768usize);
    let (x, y, w, bb) = (
        mem.alloc_f32(&filled(rows * d, 3)),
        mem.alloc(rows * d * 4),
        mem.alloc_f32(&filled(d, 4)),
        mem.alloc_f32(&filled(d, 5)),
    );
    bench(
        "layer_norm_f32 77x768",
        &norm,
        "ferry_layer_norm_f32",
        LaunchConfig {
            grid: [rows as u32, 1, 1],
            block: [128, 1, 1],
            dynamic_shared: 0,
        },
        &[
            ParamValue::Ptr(x),
            ParamValue::Ptr(y),
            ParamValue::Ptr(w),
            ParamValue::Ptr(bb),
            ParamValue::U64(rows as u64),
            ParamValue::U32(d as u32),
            ParamValue::F32(1e-5),
        ],
        &mut mem,
    );

    // Small GEMMs y [m, n] = x [m, k] · w [n, k]ᵀ + b: SIMT f32 and tensor-core bf16.
    let (m, n, k) = (128usize, 128usize, 128usize);
    let gemm_params = |x: u64, w: u64, b: u64, y: u64| {
        [
            ParamValue::Ptr(x),
            ParamValue::Ptr(w),
            ParamValue::Ptr(b),
            ParamValue::Ptr(y),
            ParamValue::I32(m as i32),
            ParamValue::I32(n as i32),
            ParamValue::I32(k as i32),
        ]
    };
    let (xa, wa, ba, ya) = (
        mem.alloc_f32(&filled(m * k, 6)),
        mem.alloc_f32(&filled(n * k, 7)),
        mem.alloc_f32(&filled(n, 8)),
        mem.alloc(m * n * 4),
    );
    bench(
        "linear_f32 128x128x128 (SIMT)",
        &gemm,
        "ferry_linear_f32",
        gemm_cfg(m, n, 64, 256),
        &gemm_params(xa, wa, ba, ya),
        &mut mem,
    );
    let (xa, wa, ba, ya) = (
        mem.alloc_u16(&bits(&filled(m * k, 6))),
        mem.alloc_u16(&bits(&filled(n * k, 7))),
        mem.alloc_u16(&bits(&filled(n, 8))),
        mem.alloc(m * n * 2),
    );
    bench(
        "linear_bf16 128x128x128 (mma.sync)",
        &gemm,
        "ferry_linear_bf16",
        gemm_cfg(m, n, 64, 128),
        &gemm_params(xa, wa, ba, ya),
        &mut mem,
    );

    if std::env::var("PTX_BENCH_UNET").is_ok_and(|v| v == "0") {
        return;
    }
    for dtype in [DType::F32, DType::BF16] {
        unet_steps(dtype);
    }
}

/// Seconds per UNet step (with CFG: batch 2) of the tiny SD 1.5 fixture on the emulated GPU:
/// the time between the first and the third step callback of a 3-step run, halved.
fn unet_steps(dtype: DType) {
    let dir = format!(
        "{}/../../tests/fixtures/models/sd15",
        env!("CARGO_MANIFEST_DIR")
    );
    let cfg = LoadConfig {
        device: DeviceChoice::Sim,
        dtype,
        ..LoadConfig::default()
    };
    let pipe = Pipeline::load(std::path::Path::new(&dir), cfg).expect("sd15 fixture loads");
    let params = GenerateParams {
        prompt: "a lighthouse at dusk".into(),
        steps: 3,
        guidance: 7.5,
        scheduler: Some("euler".into()),
        seed: 1,
        width: Some(64),
        height: Some(32),
        ..GenerateParams::default()
    };
    let t0 = Instant::now();
    let mut at = Vec::new();
    let out = pipe
        .generate(&params, |_, _| at.push(t0.elapsed()))
        .expect("emulated generation");
    let total = t0.elapsed();
    assert!(out.latents.data().iter().all(|v| v.is_finite()));
    assert!(pipe.races().is_empty(), "race checker: {:?}", pipe.races());
    let per_step = (at[2] - at[0]).as_secs_f64() / 2.0;
    println!(
        "tiny sd15 UNet step {dtype:?} (64x32, CFG), emulated: {per_step:.2} s per step \
         ({:.1} s for 3 steps with CLIP and VAE)",
        total.as_secs_f64()
    );
}
