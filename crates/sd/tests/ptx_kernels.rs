//! Real kernels of `kernels/ptx` run through the PTX interpreter of the simulated device, on
//! small awkward shapes, against the CPU reference ops.

use ferry_pager::device::sim::ptx::{launch, LaunchConfig, Limits, Module, ParamValue, VecMemory};
use ferry_sd::ops;
use ferry_sd::tensor::Tensor;
use half::{bf16, f16};
use std::sync::OnceLock;

fn module(name: &str) -> &'static Module {
    static MODS: OnceLock<Vec<(String, Module)>> = OnceLock::new();
    let mods = MODS.get_or_init(|| {
        ["layout", "elementwise", "norm"]
            .iter()
            .map(|n| {
                let path = format!("{}/../../kernels/ptx/{n}.ptx", env!("CARGO_MANIFEST_DIR"));
                let src = std::fs::read_to_string(&path).unwrap();
                (n.to_string(), Module::parse(&src).unwrap())
            })
            .collect()
    });
    &mods.iter().find(|(n, _)| n == name).unwrap().1
}

fn run(
    m: &str,
    kernel: &str,
    blocks: u32,
    threads: u32,
    mem: &mut VecMemory,
    params: &[ParamValue],
) {
    let cfg = LaunchConfig {
        grid: [blocks, 1, 1],
        block: [threads, 1, 1],
        dynamic_shared: 0,
    };
    launch(module(m), kernel, cfg, params, mem, Limits::default())
        .unwrap_or_else(|e| panic!("{kernel}: {e}"));
}

fn blocks_for(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 1 << 20) as u32
}

/// Deterministic awkward inputs: mixed signs and magnitudes.
fn inputs(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 8.0
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{what}[{i}]: NaN, want {w}");
        let tol = rel * scale.max(w.abs()).min(scale) + rel * w.abs();
        assert!(
            (g - w).abs() <= tol.max(1e-30),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

fn t(shape: &[usize], data: Vec<f32>) -> Tensor {
    Tensor::new(shape.to_vec(), data).unwrap()
}

#[test]
fn silu_f32_f16_bf16() {
    let n = 300;
    let x = inputs(n, 1);
    let want = ops::silu(&t(&[n], x.clone())).data().to_vec();
    let mut mem = VecMemory::new();
    let xa = mem.alloc_f32(&x);
    let ya = mem.alloc(n * 4);
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::U64(n as u64),
    ];
    run(
        "elementwise",
        "ferry_silu_f32",
        blocks_for(n),
        256,
        &mut mem,
        &p,
    );
    assert_close(&mem.f32s(ya), &want, 1e-5, "silu_f32");

    let xh: Vec<u16> = x.iter().map(|v| f16::from_f32(*v).to_bits()).collect();
    let xa = mem.alloc_u16(&xh);
    let ya = mem.alloc(n * 2);
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::U64(n as u64),
    ];
    run(
        "elementwise",
        "ferry_silu_f16",
        blocks_for(n),
        256,
        &mut mem,
        &p,
    );
    let got: Vec<f32> = mem
        .u16s(ya)
        .iter()
        .map(|b| f16::from_bits(*b).to_f32())
        .collect();
    let xr: Vec<f32> = xh.iter().map(|b| f16::from_bits(*b).to_f32()).collect();
    let want = ops::silu(&t(&[n], xr)).data().to_vec();
    assert_close(&got, &want, 1e-2, "silu_f16");

    let xb: Vec<u16> = x.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
    let xa = mem.alloc_u16(&xb);
    let ya = mem.alloc(n * 2);
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::U64(n as u64),
    ];
    run(
        "elementwise",
        "ferry_silu_bf16",
        blocks_for(n),
        256,
        &mut mem,
        &p,
    );
    let got: Vec<f32> = mem
        .u16s(ya)
        .iter()
        .map(|b| bf16::from_bits(*b).to_f32())
        .collect();
    let xr: Vec<f32> = xb.iter().map(|b| bf16::from_bits(*b).to_f32()).collect();
    let want = ops::silu(&t(&[n], xr)).data().to_vec();
    assert_close(&got, &want, 3e-2, "silu_bf16");
}

#[test]
fn add_f32() {
    let n = 257;
    let (a, b) = (inputs(n, 2), inputs(n, 3));
    let mut mem = VecMemory::new();
    let (aa, ba, ya) = (mem.alloc_f32(&a), mem.alloc_f32(&b), mem.alloc(n * 4));
    let p = [
        ParamValue::Ptr(aa),
        ParamValue::Ptr(ba),
        ParamValue::Ptr(ya),
        ParamValue::U64(n as u64),
    ];
    run(
        "elementwise",
        "ferry_add_f32",
        blocks_for(n),
        256,
        &mut mem,
        &p,
    );
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_eq!(mem.f32s(ya), want);
}

#[test]
fn transpose_f32_odd_shape() {
    let (batch, rows, cols) = (2usize, 33usize, 45usize);
    let n = batch * rows * cols;
    let x = inputs(n, 4);
    let mut mem = VecMemory::new();
    let (xa, ya) = (mem.alloc_f32(&x), mem.alloc(n * 4));
    let tiles = batch * rows.div_ceil(32) * cols.div_ceil(32);
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::U64(batch as u64),
        ParamValue::U32(rows as u32),
        ParamValue::U32(cols as u32),
    ];
    run(
        "layout",
        "ferry_transpose_f32",
        tiles as u32,
        256,
        &mut mem,
        &p,
    );
    let y = mem.f32s(ya);
    for b in 0..batch {
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(
                    y[b * rows * cols + c * rows + r],
                    x[b * rows * cols + r * cols + c]
                );
            }
        }
    }
}

#[test]
fn softmax_f32_rows() {
    let (rows, len) = (3usize, 300usize);
    let x = inputs(rows * len, 5);
    let mut want = x.clone();
    ops::softmax_rows_inplace(&mut want, len).unwrap();
    let mut mem = VecMemory::new();
    let (xa, ya) = (mem.alloc_f32(&x), mem.alloc(rows * len * 4));
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::U64(rows as u64),
        ParamValue::U32(len as u32),
    ];
    run(
        "elementwise",
        "ferry_softmax_f32",
        rows as u32,
        256,
        &mut mem,
        &p,
    );
    assert_close(&mem.f32s(ya), &want, 1e-5, "softmax_f32");
}

#[test]
fn layer_norm_f32_with_affine() {
    let (rows, d) = (3usize, 100usize);
    let x = inputs(rows * d, 6);
    let w = inputs(d, 7);
    let b = inputs(d, 8);
    let want = ops::layer_norm(
        &t(&[rows, d], x.clone()),
        Some(&t(&[d], w.clone())),
        Some(&t(&[d], b.clone())),
        1e-5,
    )
    .unwrap()
    .data()
    .to_vec();
    let mut mem = VecMemory::new();
    let (xa, ya, wa, ba) = (
        mem.alloc_f32(&x),
        mem.alloc(rows * d * 4),
        mem.alloc_f32(&w),
        mem.alloc_f32(&b),
    );
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::Ptr(wa),
        ParamValue::Ptr(ba),
        ParamValue::U64(rows as u64),
        ParamValue::U32(d as u32),
        ParamValue::F32(1e-5),
    ];
    run(
        "norm",
        "ferry_layer_norm_f32",
        rows as u32,
        128,
        &mut mem,
        &p,
    );
    assert_close(&mem.f32s(ya), &want, 1e-5, "layer_norm_f32");
}

#[test]
fn group_norm_f32_silu_without_affine() {
    let (n, c, groups, spatial) = (2usize, 8usize, 4usize, 37usize);
    let x = inputs(n * c * spatial, 9);
    let want = ops::group_norm(
        &t(&[n, c, spatial], x.clone()),
        groups,
        None,
        None,
        1e-5,
        true,
    )
    .unwrap()
    .data()
    .to_vec();
    let mut mem = VecMemory::new();
    let (xa, ya) = (mem.alloc_f32(&x), mem.alloc(x.len() * 4));
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::Ptr(0),
        ParamValue::Ptr(0),
        ParamValue::U32(n as u32),
        ParamValue::U32(c as u32),
        ParamValue::U32(groups as u32),
        ParamValue::U64(spatial as u64),
        ParamValue::F32(1e-5),
        ParamValue::U32(1),
    ];
    run(
        "norm",
        "ferry_group_norm_f32",
        (n * groups) as u32,
        256,
        &mut mem,
        &p,
    );
    assert_close(&mem.f32s(ya), &want, 1e-5, "group_norm_f32");
}

#[test]
fn timestep_embedding_f32() {
    let (count, dim) = (3usize, 64usize);
    let ts = vec![0.0f32, 1.0, 999.0];
    let want = ops::timestep_embedding(&ts, dim, true, 1.0)
        .unwrap()
        .data()
        .to_vec();
    let mut mem = VecMemory::new();
    let (ta, ya) = (mem.alloc_f32(&ts), mem.alloc(count * dim * 4));
    let p = [
        ParamValue::Ptr(ta),
        ParamValue::Ptr(ya),
        ParamValue::U32(count as u32),
        ParamValue::U32(dim as u32),
        ParamValue::U32(1),
        ParamValue::F32(1.0),
    ];
    run(
        "elementwise",
        "ferry_timestep_embedding_f32",
        blocks_for(count * dim),
        256,
        &mut mem,
        &p,
    );
    assert_close(&mem.f32s(ya), &want, 1e-5, "timestep_embedding_f32");
}

/// A 16-bit float type's conversions and the tolerance the issue sets for it.
#[derive(Clone, Copy)]
struct Half {
    suffix: &'static str,
    to: fn(f32) -> u16,
    from: fn(u16) -> f32,
    tol: f32,
}

const F16: Half = Half {
    suffix: "f16",
    to: |v| f16::from_f32(v).to_bits(),
    from: |b| f16::from_bits(b).to_f32(),
    tol: 1e-2,
};
const BF16: Half = Half {
    suffix: "bf16",
    to: |v| bf16::from_f32(v).to_bits(),
    from: |b| bf16::from_bits(b).to_f32(),
    tol: 3e-2,
};

/// Rounds `x` through the 16-bit type (the kernel's input as it sees it).
fn through(h: Half, x: &[f32]) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = x.iter().map(|v| (h.to)(*v)).collect();
    let back = bits.iter().map(|b| (h.from)(*b)).collect();
    (bits, back)
}

#[test]
fn activations_in_every_dtype() {
    let n = 515;
    let x = inputs(n, 11);
    for (name, act) in [
        ("gelu", ops::Activation::Gelu),
        ("gelu_tanh", ops::Activation::GeluTanh),
        ("quick_gelu", ops::Activation::QuickGelu),
    ] {
        let mut mem = VecMemory::new();
        let want = act.forward(&t(&[n], x.clone())).data().to_vec();
        let (xa, ya) = (mem.alloc_f32(&x), mem.alloc(n * 4));
        let p = [
            ParamValue::Ptr(xa),
            ParamValue::Ptr(ya),
            ParamValue::U64(n as u64),
        ];
        run(
            "elementwise",
            &format!("ferry_{name}_f32"),
            blocks_for(n),
            256,
            &mut mem,
            &p,
        );
        assert_close(&mem.f32s(ya), &want, 1e-5, name);
        for h in [F16, BF16] {
            let (bits, xr) = through(h, &x);
            let want = act.forward(&t(&[n], xr)).data().to_vec();
            let (xa, ya) = (mem.alloc_u16(&bits), mem.alloc(n * 2));
            let p = [
                ParamValue::Ptr(xa),
                ParamValue::Ptr(ya),
                ParamValue::U64(n as u64),
            ];
            let k = format!("ferry_{name}_{}", h.suffix);
            run("elementwise", &k, blocks_for(n), 256, &mut mem, &p);
            let got: Vec<f32> = mem.u16s(ya).iter().map(|b| (h.from)(*b)).collect();
            assert_close(&got, &want, h.tol, &k);
        }
    }
}

#[test]
fn softmax_and_layer_norm_in_half_types() {
    let (rows, len) = (2usize, 77usize);
    let x = inputs(rows * len, 12);
    for h in [F16, BF16] {
        let (bits, xr) = through(h, &x);
        let mut want = xr.clone();
        ops::softmax_rows_inplace(&mut want, len).unwrap();
        let mut mem = VecMemory::new();
        let (xa, ya) = (mem.alloc_u16(&bits), mem.alloc(rows * len * 2));
        let p = [
            ParamValue::Ptr(xa),
            ParamValue::Ptr(ya),
            ParamValue::U64(rows as u64),
            ParamValue::U32(len as u32),
        ];
        let k = format!("ferry_softmax_{}", h.suffix);
        run("elementwise", &k, rows as u32, 256, &mut mem, &p);
        let got: Vec<f32> = mem.u16s(ya).iter().map(|b| (h.from)(*b)).collect();
        assert_close(&got, &want, h.tol, &k);

        let want = ops::layer_norm(&t(&[rows, len], xr), None, None, 1e-5)
            .unwrap()
            .data()
            .to_vec();
        let ya = mem.alloc(rows * len * 2);
        let p = [
            ParamValue::Ptr(xa),
            ParamValue::Ptr(ya),
            ParamValue::Ptr(0),
            ParamValue::Ptr(0),
            ParamValue::U64(rows as u64),
            ParamValue::U32(len as u32),
            ParamValue::F32(1e-5),
        ];
        let k = format!("ferry_layer_norm_{}", h.suffix);
        run("norm", &k, rows as u32, 128, &mut mem, &p);
        let got: Vec<f32> = mem.u16s(ya).iter().map(|b| (h.from)(*b)).collect();
        assert_close(&got, &want, h.tol, &k);
    }
}

#[test]
fn group_norm_f16_with_affine() {
    let (n, c, groups, spatial) = (1usize, 6usize, 3usize, 50usize);
    let x = inputs(n * c * spatial, 13);
    let (w, b) = (inputs(c, 14), inputs(c, 15));
    let h = F16;
    let (xb, xr) = through(h, &x);
    let (wb, wr) = through(h, &w);
    let (bb, br) = through(h, &b);
    let want = ops::group_norm(
        &t(&[n, c, spatial], xr),
        groups,
        Some(&t(&[c], wr)),
        Some(&t(&[c], br)),
        1e-6,
        false,
    )
    .unwrap()
    .data()
    .to_vec();
    let mut mem = VecMemory::new();
    let (xa, ya, wa, ba) = (
        mem.alloc_u16(&xb),
        mem.alloc(x.len() * 2),
        mem.alloc_u16(&wb),
        mem.alloc_u16(&bb),
    );
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::Ptr(wa),
        ParamValue::Ptr(ba),
        ParamValue::U32(n as u32),
        ParamValue::U32(c as u32),
        ParamValue::U32(groups as u32),
        ParamValue::U64(spatial as u64),
        ParamValue::F32(1e-6),
        ParamValue::U32(0),
    ];
    run(
        "norm",
        "ferry_group_norm_f16",
        (n * groups) as u32,
        256,
        &mut mem,
        &p,
    );
    let got: Vec<f32> = mem.u16s(ya).iter().map(|b| (h.from)(*b)).collect();
    assert_close(&got, &want, h.tol, "group_norm_f16");
}

#[test]
fn casts_round_to_nearest_even() {
    // Ties, NaN-free awkward values, overflow to infinity in f16.
    let x = vec![
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        -65520.0,
        1e-8,
        3.0,
        -0.0,
    ];
    let n = x.len();
    let mut mem = VecMemory::new();
    let (xa, ya) = (mem.alloc_f32(&x), mem.alloc(n * 2));
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::U64(n as u64),
    ];
    run("elementwise", "ferry_cast_f32_f16", 1, 256, &mut mem, &p);
    assert_eq!(
        mem.u16s(ya),
        vec![0x3C00, 0x3C02, 0xFC00, 0x0000, 0x4200, 0x8000]
    );
    let ya = mem.alloc(n * 2);
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::U64(n as u64),
    ];
    run("elementwise", "ferry_cast_f32_bf16", 1, 256, &mut mem, &p);
    let want: Vec<u16> = x.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
    assert_eq!(mem.u16s(ya), want);
}

#[test]
fn resize_nearest_bf16() {
    let (planes, ih, iw, oh, ow) = (3usize, 5usize, 7usize, 8usize, 3usize);
    let x = inputs(planes * ih * iw, 16);
    let (xb, xr) = through(BF16, &x);
    let want = ops::resize_nearest(&t(&[1, planes, ih, iw], xr), oh, ow)
        .unwrap()
        .data()
        .to_vec();
    let mut mem = VecMemory::new();
    let (xa, ya) = (mem.alloc_u16(&xb), mem.alloc(planes * oh * ow * 2));
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::U64(planes as u64),
        ParamValue::U32(ih as u32),
        ParamValue::U32(iw as u32),
        ParamValue::U32(oh as u32),
        ParamValue::U32(ow as u32),
        ParamValue::F32(ih as f32 / oh as f32),
        ParamValue::F32(iw as f32 / ow as f32),
    ];
    run(
        "layout",
        "ferry_resize_nearest_bf16",
        blocks_for(planes * oh * ow),
        256,
        &mut mem,
        &p,
    );
    let got: Vec<f32> = mem
        .u16s(ya)
        .iter()
        .map(|b| bf16::from_bits(*b).to_f32())
        .collect();
    assert_eq!(got, want);
}

#[test]
fn timestep_embedding_large_arguments_take_the_slow_path() {
    // Arguments of at least 2^31 rad go through `__internal_trig_reduction_slowpathd` (a .func
    // call with .param buffers and a .local depot).
    let (count, dim) = (2usize, 8usize);
    let ts = vec![3.0e9f32, 5.0e10];
    let want = ops::timestep_embedding(&ts, dim, false, 0.0)
        .unwrap()
        .data()
        .to_vec();
    let mut mem = VecMemory::new();
    let (ta, ya) = (mem.alloc_f32(&ts), mem.alloc(count * dim * 4));
    let p = [
        ParamValue::Ptr(ta),
        ParamValue::Ptr(ya),
        ParamValue::U32(count as u32),
        ParamValue::U32(dim as u32),
        ParamValue::U32(0),
        ParamValue::F32(0.0),
    ];
    run(
        "elementwise",
        "ferry_timestep_embedding_f32",
        1,
        256,
        &mut mem,
        &p,
    );
    assert_close(&mem.f32s(ya), &want, 1e-5, "timestep_embedding_slowpath");
}

fn gemm_module() -> &'static Module {
    static M: OnceLock<Module> = OnceLock::new();
    M.get_or_init(|| {
        let path = format!("{}/../../kernels/ptx/gemm.ptx", env!("CARGO_MANIFEST_DIR"));
        Module::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
    })
}

/// Runs a linear kernel `y [m, n] = x [m, k] · w [n, k]ᵀ + b` with 16-bit (or f32) data.
#[allow(clippy::too_many_arguments)]
fn linear_case(
    kernel: &str,
    h: Option<Half>,
    m: usize,
    n: usize,
    k: usize,
    tile: usize,
    threads: u32,
    seed: u32,
) {
    let x = inputs(m * k, seed);
    let w: Vec<f32> = inputs(n * k, seed + 1).iter().map(|v| v * 0.25).collect();
    let b = inputs(n, seed + 2);
    let mut mem = VecMemory::new();
    let (xa, wa, ba, ya, xr, wr, br) = match h {
        Some(h) => {
            let (xb, xr) = through(h, &x);
            let (wb, wr) = through(h, &w);
            let (bb, br) = through(h, &b);
            (
                mem.alloc_u16(&xb),
                mem.alloc_u16(&wb),
                mem.alloc_u16(&bb),
                mem.alloc(m * n * 2),
                xr,
                wr,
                br,
            )
        }
        None => (
            mem.alloc_f32(&x),
            mem.alloc_f32(&w),
            mem.alloc_f32(&b),
            mem.alloc(m * n * 4),
            x,
            w,
            b,
        ),
    };
    let want = ops::linear(&t(&[m, k], xr), &t(&[n, k], wr), Some(&t(&[n], br)))
        .unwrap()
        .data()
        .to_vec();
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(wa),
        ParamValue::Ptr(ba),
        ParamValue::Ptr(ya),
        ParamValue::I32(m as i32),
        ParamValue::I32(n as i32),
        ParamValue::I32(k as i32),
    ];
    let cfg = production_grid(m, n, tile, threads);
    launch(gemm_module(), kernel, cfg, &p, &mut mem, Limits::default())
        .unwrap_or_else(|e| panic!("{kernel}: {e}"));
    let (got, tol) = match h {
        Some(h) => (
            mem.u16s(ya)
                .iter()
                .map(|b| (h.from)(*b))
                .collect::<Vec<f32>>(),
            h.tol,
        ),
        None => (mem.f32s(ya), 1e-5),
    };
    assert_close(&got, &want, tol, kernel);
}

#[test]
fn linear_f32_tile_edges() {
    linear_case("ferry_linear_f32", None, 37, 70, 45, 64, 256, 20);
}

#[test]
fn linear_tensor_core_f16_and_bf16() {
    linear_case("ferry_linear_f16", Some(F16), 37, 70, 40, 64, 128, 21);
    linear_case("ferry_linear_bf16", Some(BF16), 19, 24, 56, 64, 128, 22);
}

#[test]
fn linear_big_pipelined_bf16() {
    linear_case(
        "ferry_linear_big_bf16",
        Some(BF16),
        130,
        136,
        48,
        128,
        256,
        23,
    );
}

fn attention_module() -> &'static Module {
    static M: OnceLock<Module> = OnceLock::new();
    M.get_or_init(|| {
        let path = format!(
            "{}/../../kernels/ptx/attention.ptx",
            env!("CARGO_MANIFEST_DIR")
        );
        Module::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
    })
}

/// Attention over `[batch, n, heads*d]` rows (packed strides), flash (tensor-core) or SIMT.
#[allow(clippy::too_many_arguments)]
fn attention_case(
    kernel: &str,
    h: Option<Half>,
    simt: bool,
    batch: usize,
    heads: usize,
    nq: usize,
    nk: usize,
    d: usize,
) {
    let hd = heads * d;
    let q = inputs(batch * nq * hd, 31);
    let k = inputs(batch * nk * hd, 32);
    let v = inputs(batch * nk * hd, 33);
    let mut mem = VecMemory::new();
    let mut put = |x: &[f32]| match h {
        Some(h) => {
            let (b, r) = through(h, x);
            (mem.alloc_u16(&b), r)
        }
        None => (mem.alloc_f32(x), x.to_vec()),
    };
    let (qa, qr) = put(&q);
    let (ka, kr) = put(&k);
    let (va, vr) = put(&v);
    let esize = if h.is_some() { 2 } else { 4 };
    let oa = mem.alloc(batch * nq * hd * esize);
    let want = ops::scaled_dot_product_attention(
        &t(&[batch, nq, hd], qr),
        &t(&[batch, nk, hd], kr),
        &t(&[batch, nk, hd], vr),
        heads,
    )
    .unwrap()
    .data()
    .to_vec();
    let mut p = vec![
        ParamValue::Ptr(qa),
        ParamValue::Ptr(ka),
        ParamValue::Ptr(va),
        ParamValue::Ptr(oa),
        ParamValue::I32(nq as i32),
        ParamValue::I32(nk as i32),
    ];
    if simt {
        p.push(ParamValue::I32(d as i32));
    }
    p.extend([
        ParamValue::U64(hd as u64),
        ParamValue::U64(hd as u64),
        ParamValue::U64(hd as u64),
        ParamValue::U64(hd as u64),
        ParamValue::F32(1.0 / (d as f32).sqrt()),
        ParamValue::U32(0),
    ]);
    let rows_per_block = if simt { 4 } else { 64 };
    let cfg = LaunchConfig {
        grid: [
            nq.div_ceil(rows_per_block) as u32,
            heads as u32,
            batch as u32,
        ],
        block: [128, 1, 1],
        dynamic_shared: 0,
    };
    launch(
        attention_module(),
        kernel,
        cfg,
        &p,
        &mut mem,
        Limits::default(),
    )
    .unwrap_or_else(|e| panic!("{kernel}: {e}"));
    let (got, tol) = match h {
        Some(h) => (
            mem.u16s(oa)
                .iter()
                .map(|b| (h.from)(*b))
                .collect::<Vec<f32>>(),
            h.tol,
        ),
        None => (mem.f32s(oa), 1e-5),
    };
    assert_close(&got, &want, tol, kernel);
}

#[test]
fn attention_flash_f16_d40_and_bf16_d64() {
    attention_case(
        "ferry_attention_f16_d40",
        Some(F16),
        false,
        2,
        2,
        70,
        33,
        40,
    );
    attention_case(
        "ferry_attention_bf16_d64",
        Some(BF16),
        false,
        1,
        1,
        17,
        80,
        64,
    );
}

#[test]
fn attention_simt_f32() {
    attention_case("ferry_attention_simt_f32", None, true, 2, 3, 9, 21, 24);
}

/// Implicit-GEMM conv2d `x [n, c, h, w]` * `w [o, c, kh, kw]` with asymmetric padding.
#[allow(clippy::too_many_arguments)]
fn conv_case(
    h16: Option<Half>,
    xs: [usize; 4],
    ws: [usize; 4],
    stride: (usize, usize),
    pad: [usize; 4],
    seed: u32,
) {
    let [n, c, hh, ww] = xs;
    let [o, _, kh, kw] = ws;
    let params = ops::Conv2dParams {
        stride,
        padding: pad,
    };
    let ho = (hh + pad[0] + pad[1] - kh) / stride.0 + 1;
    let wo = (ww + pad[2] + pad[3] - kw) / stride.1 + 1;
    let x = inputs(n * c * hh * ww, seed);
    let w: Vec<f32> = inputs(o * c * kh * kw, seed + 1)
        .iter()
        .map(|v| v * 0.1)
        .collect();
    let b = inputs(o, seed + 2);
    let mut mem = VecMemory::new();
    let mut put = |v: &[f32]| match h16 {
        Some(h) => {
            let (bits, r) = through(h, v);
            (mem.alloc_u16(&bits), r)
        }
        None => (mem.alloc_f32(v), v.to_vec()),
    };
    let (xa, xr) = put(&x);
    let (wa, wr) = put(&w);
    let (ba, br) = put(&b);
    let esize = if h16.is_some() { 2 } else { 4 };
    let ya = mem.alloc(n * o * ho * wo * esize);
    let want = ops::conv2d(&t(&xs, xr), &t(&ws, wr), Some(&t(&[o], br)), params)
        .unwrap()
        .data()
        .to_vec();
    let mut p = vec![
        ParamValue::Ptr(xa),
        ParamValue::Ptr(wa),
        ParamValue::Ptr(ba),
        ParamValue::Ptr(ya),
    ];
    for v in [
        n, c, hh, ww, o, kh, kw, stride.0, stride.1, pad[0], pad[2], ho, wo,
    ] {
        p.push(ParamValue::I32(v as i32));
    }
    let m = n * ho * wo;
    let (kernel, threads, tol) = match h16 {
        Some(h) if h.suffix == "f16" => ("ferry_conv2d_f16", 128, h.tol),
        Some(h) => ("ferry_conv2d_bf16", 128, h.tol),
        None => ("ferry_conv2d_f32", 256, 1e-5),
    };
    let cfg = production_grid(m, o, 64, threads);
    launch(gemm_module(), kernel, cfg, &p, &mut mem, Limits::default())
        .unwrap_or_else(|e| panic!("{kernel}: {e}"));
    let got = match h16 {
        Some(h) => mem
            .u16s(ya)
            .iter()
            .map(|b| (h.from)(*b))
            .collect::<Vec<f32>>(),
        None => mem.f32s(ya),
    };
    assert_close(&got, &want, tol, kernel);
}

#[test]
fn conv2d_f32_f16_bf16_with_stride_and_asymmetric_padding() {
    conv_case(None, [2, 3, 9, 7], [5, 3, 3, 3], (1, 1), [1, 1, 1, 1], 40);
    conv_case(
        Some(F16),
        [1, 5, 8, 9],
        [9, 5, 3, 3],
        (2, 2),
        [0, 1, 0, 1],
        41,
    );
    conv_case(
        Some(BF16),
        [2, 4, 6, 5],
        [3, 4, 1, 1],
        (1, 1),
        [0, 0, 0, 0],
        42,
    );
}

#[test]
fn attention_flash_d80_d160_and_simt_half_types() {
    attention_case(
        "ferry_attention_f16_d80",
        Some(F16),
        false,
        1,
        1,
        65,
        16,
        80,
    );
    attention_case(
        "ferry_attention_bf16_d160",
        Some(BF16),
        false,
        1,
        1,
        10,
        70,
        160,
    );
    attention_case("ferry_attention_simt_f16", Some(F16), true, 1, 2, 5, 13, 40);
    attention_case(
        "ferry_attention_simt_bf16",
        Some(BF16),
        true,
        1,
        1,
        7,
        9,
        72,
    );
}

#[test]
fn linear_big_f16_with_k_tail_rows() {
    linear_case(
        "ferry_linear_big_f16",
        Some(F16),
        129,
        130,
        40,
        128,
        256,
        24,
    );
}

#[test]
fn layout_and_elementwise_odds_and_ends_f32() {
    let mut mem = VecMemory::new();
    // add_channel_bias: x [2, 3, 5], bias of c = 3.
    let (n, c, s) = (2usize, 3usize, 5usize);
    let x = inputs(n * c * s, 50);
    let b = inputs(c, 51);
    let want = ops::add_channel_bias(&t(&[n, c, s, 1], x.clone()), &t(&[c], b.clone()))
        .unwrap()
        .data()
        .to_vec();
    let (xa, ba, ya) = (mem.alloc_f32(&x), mem.alloc_f32(&b), mem.alloc(x.len() * 4));
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ba),
        ParamValue::Ptr(ya),
        ParamValue::U64(x.len() as u64),
        ParamValue::U64(s as u64),
        ParamValue::U64(c as u64),
    ];
    run(
        "elementwise",
        "ferry_add_channel_f32",
        blocks_for(x.len()),
        256,
        &mut mem,
        &p,
    );
    assert_eq!(mem.f32s(ya), want);

    // scale.
    let ya = mem.alloc(x.len() * 4);
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::F32(-0.3),
        ParamValue::U64(x.len() as u64),
    ];
    run("elementwise", "ferry_scale_f32", 1, 256, &mut mem, &p);
    assert_eq!(
        mem.f32s(ya),
        ops::scale(&t(&[x.len()], x.clone()), -0.3).data().to_vec()
    );

    // Nearest upsample ×2 of [planes 3, h 5, w 2].
    let (planes, h, w) = (3usize, 5usize, 2usize);
    let xu = inputs(planes * h * w, 52);
    let want = ops::upsample_nearest2x(&t(&[1, planes, h, w], xu.clone()))
        .unwrap()
        .data()
        .to_vec();
    let (xa, ya) = (mem.alloc_f32(&xu), mem.alloc(xu.len() * 16));
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::U64(planes as u64),
        ParamValue::U32(h as u32),
        ParamValue::U32(w as u32),
    ];
    run(
        "elementwise",
        "ferry_upsample2x_f32",
        blocks_for(xu.len() * 4),
        256,
        &mut mem,
        &p,
    );
    assert_eq!(mem.f32s(ya), want);

    // cat along channels: a [2, 3, 4], b [2, 1, 4].
    let (a, b) = (inputs(24, 53), inputs(8, 54));
    let want = ops::cat_channels(&[&t(&[2, 3, 4], a.clone()), &t(&[2, 1, 4], b.clone())])
        .unwrap()
        .data()
        .to_vec();
    let (aa, ba, ya) = (mem.alloc_f32(&a), mem.alloc_f32(&b), mem.alloc(32 * 4));
    let p = [
        ParamValue::Ptr(aa),
        ParamValue::Ptr(ba),
        ParamValue::Ptr(ya),
        ParamValue::U64(2),
        ParamValue::U64(12),
        ParamValue::U64(4),
    ];
    run("elementwise", "ferry_cat2_f32", 1, 256, &mut mem, &p);
    assert_eq!(mem.f32s(ya), want);

    // GEGLU gate: h [3, 2*7] -> [3, 7].
    let hh = inputs(3 * 14, 55);
    let want = ops::geglu_gate(&t(&[3, 14], hh.clone()))
        .unwrap()
        .data()
        .to_vec();
    let (ha, ya) = (mem.alloc_f32(&hh), mem.alloc(21 * 4));
    let p = [
        ParamValue::Ptr(ha),
        ParamValue::Ptr(ya),
        ParamValue::U64(3),
        ParamValue::U32(7),
    ];
    run("elementwise", "ferry_geglu_f32", 1, 256, &mut mem, &p);
    assert_close(&mem.f32s(ya), &want, 1e-5, "geglu_f32");

    // Gather rows 2, 0, 2 of a [3, 5] table.
    let table = inputs(15, 56);
    let ids: Vec<u8> = [2u32, 0, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
    let (ta, ia, ya) = (
        mem.alloc_f32(&table),
        mem.alloc_bytes(&ids),
        mem.alloc(15 * 4),
    );
    let p = [
        ParamValue::Ptr(ta),
        ParamValue::Ptr(ia),
        ParamValue::Ptr(ya),
        ParamValue::U64(3),
        ParamValue::U32(5),
        ParamValue::U32(3),
    ];
    run("layout", "ferry_gather_f32", 1, 256, &mut mem, &p);
    let want: Vec<f32> = [2usize, 0, 2]
        .iter()
        .flat_map(|&r| table[r * 5..r * 5 + 5].to_vec())
        .collect();
    assert_eq!(mem.f32s(ya), want);
}

#[test]
fn half_casts_and_bf16_embedding_and_group_norm() {
    let x = inputs(40, 60);
    let mut mem = VecMemory::new();
    let (xb, xr) = through(F16, &x);
    let (xa, ya) = (mem.alloc_u16(&xb), mem.alloc(80));
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::U64(40),
    ];
    run("elementwise", "ferry_cast_f16_bf16", 1, 256, &mut mem, &p);
    let want: Vec<u16> = xr.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
    assert_eq!(mem.u16s(ya), want);

    let ts = vec![7.0f32, 501.0];
    let want = ops::timestep_embedding(&ts, 32, true, 1.0)
        .unwrap()
        .data()
        .to_vec();
    let (ta, ya) = (mem.alloc_f32(&ts), mem.alloc(64 * 2));
    let p = [
        ParamValue::Ptr(ta),
        ParamValue::Ptr(ya),
        ParamValue::U32(2),
        ParamValue::U32(32),
        ParamValue::U32(1),
        ParamValue::F32(1.0),
    ];
    run(
        "elementwise",
        "ferry_timestep_embedding_bf16",
        1,
        256,
        &mut mem,
        &p,
    );
    let got: Vec<f32> = mem
        .u16s(ya)
        .iter()
        .map(|b| bf16::from_bits(*b).to_f32())
        .collect();
    assert_close(&got, &want, BF16.tol, "timestep_embedding_bf16");

    let (n, c, groups, spatial) = (2usize, 4usize, 2usize, 33usize);
    let x = inputs(n * c * spatial, 61);
    let (xb, xr) = through(BF16, &x);
    let want = ops::group_norm(&t(&[n, c, spatial], xr), groups, None, None, 1e-5, true)
        .unwrap()
        .data()
        .to_vec();
    let (xa, ya) = (mem.alloc_u16(&xb), mem.alloc(x.len() * 2));
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::Ptr(0),
        ParamValue::Ptr(0),
        ParamValue::U32(n as u32),
        ParamValue::U32(c as u32),
        ParamValue::U32(groups as u32),
        ParamValue::U64(spatial as u64),
        ParamValue::F32(1e-5),
        ParamValue::U32(1),
    ];
    run(
        "norm",
        "ferry_group_norm_bf16",
        (n * groups) as u32,
        256,
        &mut mem,
        &p,
    );
    let got: Vec<f32> = mem
        .u16s(ya)
        .iter()
        .map(|b| bf16::from_bits(*b).to_f32())
        .collect();
    assert_close(&got, &want, BF16.tol, "group_norm_bf16");
}

#[test]
fn attention_flash_remaining_head_sizes() {
    attention_case("ferry_attention_f16_d64", Some(F16), false, 1, 2, 9, 64, 64);
    attention_case(
        "ferry_attention_f16_d160",
        Some(F16),
        false,
        1,
        1,
        3,
        5,
        160,
    );
    attention_case(
        "ferry_attention_bf16_d40",
        Some(BF16),
        false,
        2,
        1,
        66,
        7,
        40,
    );
    attention_case(
        "ferry_attention_bf16_d80",
        Some(BF16),
        false,
        1,
        1,
        1,
        129,
        80,
    );
}

#[test]
fn transpose_half_types() {
    let (batch, rows, cols) = (1usize, 40usize, 7usize);
    let n = batch * rows * cols;
    for h in [F16, BF16] {
        let (xb, _) = through(h, &inputs(n, 70));
        let mut mem = VecMemory::new();
        let (xa, ya) = (mem.alloc_u16(&xb), mem.alloc(n * 2));
        let p = [
            ParamValue::Ptr(xa),
            ParamValue::Ptr(ya),
            ParamValue::U64(batch as u64),
            ParamValue::U32(rows as u32),
            ParamValue::U32(cols as u32),
        ];
        let tiles = (batch * rows.div_ceil(32) * cols.div_ceil(32)) as u32;
        run(
            "layout",
            &format!("ferry_transpose_{}", h.suffix),
            tiles,
            256,
            &mut mem,
            &p,
        );
        let y = mem.u16s(ya);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(y[c * rows + r], xb[r * cols + c]);
            }
        }
    }
}

#[test]
fn remaining_half_type_variants() {
    let n = 300;
    let (a, b) = (inputs(n, 80), inputs(n, 81));
    for h in [F16, BF16] {
        let mut mem = VecMemory::new();
        let (ab, ar) = through(h, &a);
        let (bb, br) = through(h, &b);
        let (aa, ba) = (mem.alloc_u16(&ab), mem.alloc_u16(&bb));
        let decode = |mem: &VecMemory, y: u64| {
            mem.u16s(y)
                .iter()
                .map(|v| (h.from)(*v))
                .collect::<Vec<f32>>()
        };
        // add
        let ya = mem.alloc(n * 2);
        let p = [
            ParamValue::Ptr(aa),
            ParamValue::Ptr(ba),
            ParamValue::Ptr(ya),
            ParamValue::U64(n as u64),
        ];
        run(
            "elementwise",
            &format!("ferry_add_{}", h.suffix),
            blocks_for(n),
            256,
            &mut mem,
            &p,
        );
        let want: Vec<f32> = ar.iter().zip(&br).map(|(x, y)| x + y).collect();
        assert_close(&decode(&mem, ya), &want, h.tol, "add");
        // scale
        let ya = mem.alloc(n * 2);
        let p = [
            ParamValue::Ptr(aa),
            ParamValue::Ptr(ya),
            ParamValue::F32(1.5),
            ParamValue::U64(n as u64),
        ];
        run(
            "elementwise",
            &format!("ferry_scale_{}", h.suffix),
            blocks_for(n),
            256,
            &mut mem,
            &p,
        );
        let want: Vec<f32> = ar.iter().map(|x| x * 1.5).collect();
        assert_close(&decode(&mem, ya), &want, h.tol, "scale");
        // cast to f32 is exact
        let ya = mem.alloc(n * 4);
        let p = [
            ParamValue::Ptr(aa),
            ParamValue::Ptr(ya),
            ParamValue::U64(n as u64),
        ];
        run(
            "elementwise",
            &format!("ferry_cast_{}_f32", h.suffix),
            blocks_for(n),
            256,
            &mut mem,
            &p,
        );
        assert_eq!(mem.f32s(ya), ar);
        // gather rows 1, 0 of a [2, 150] table: a bit copy
        let ids: Vec<u8> = [1u32, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let (ia, ya) = (mem.alloc_bytes(&ids), mem.alloc(n * 2));
        let p = [
            ParamValue::Ptr(aa),
            ParamValue::Ptr(ia),
            ParamValue::Ptr(ya),
            ParamValue::U64(2),
            ParamValue::U32(150),
            ParamValue::U32(2),
        ];
        run(
            "layout",
            &format!("ferry_gather_{}", h.suffix),
            blocks_for(n),
            256,
            &mut mem,
            &p,
        );
        let want: Vec<u16> = ab[150..].iter().chain(&ab[..150]).copied().collect();
        assert_eq!(mem.u16s(ya), want);
    }
    // bf16 -> f16 cast, f16 timestep embedding, f32/f16 resize.
    let mut mem = VecMemory::new();
    let (ab, ar) = through(BF16, &a);
    let (aa, ya) = (mem.alloc_u16(&ab), mem.alloc(n * 2));
    let p = [
        ParamValue::Ptr(aa),
        ParamValue::Ptr(ya),
        ParamValue::U64(n as u64),
    ];
    run(
        "elementwise",
        "ferry_cast_bf16_f16",
        blocks_for(n),
        256,
        &mut mem,
        &p,
    );
    let want: Vec<u16> = ar.iter().map(|v| f16::from_f32(*v).to_bits()).collect();
    assert_eq!(mem.u16s(ya), want);

    let ts = vec![3.0f32, 999.0, 0.5];
    let want = ops::timestep_embedding(&ts, 20, false, 0.0)
        .unwrap()
        .data()
        .to_vec();
    let (ta, ya) = (mem.alloc_f32(&ts), mem.alloc(60 * 2));
    let p = [
        ParamValue::Ptr(ta),
        ParamValue::Ptr(ya),
        ParamValue::U32(3),
        ParamValue::U32(20),
        ParamValue::U32(0),
        ParamValue::F32(0.0),
    ];
    run(
        "elementwise",
        "ferry_timestep_embedding_f16",
        1,
        256,
        &mut mem,
        &p,
    );
    let got: Vec<f32> = mem
        .u16s(ya)
        .iter()
        .map(|b| f16::from_bits(*b).to_f32())
        .collect();
    assert_close(&got, &want, F16.tol, "timestep_embedding_f16");

    let (planes, ih, iw, oh, ow) = (2usize, 3usize, 4usize, 7usize, 9usize);
    let x = inputs(planes * ih * iw, 82);
    let want = ops::resize_nearest(&t(&[1, planes, ih, iw], x.clone()), oh, ow)
        .unwrap()
        .data()
        .to_vec();
    let (xa, ya) = (mem.alloc_f32(&x), mem.alloc(planes * oh * ow * 4));
    let p = [
        ParamValue::Ptr(xa),
        ParamValue::Ptr(ya),
        ParamValue::U64(planes as u64),
        ParamValue::U32(ih as u32),
        ParamValue::U32(iw as u32),
        ParamValue::U32(oh as u32),
        ParamValue::U32(ow as u32),
        ParamValue::F32(ih as f32 / oh as f32),
        ParamValue::F32(iw as f32 / ow as f32),
    ];
    run("layout", "ferry_resize_nearest_f32", 1, 256, &mut mem, &p);
    assert_eq!(mem.f32s(ya), want);
}

/// The GEMM / conv launch geometry the CUDA backend uses (`ferry_sd::cuda::gemm_dims`), so the
/// interpreted launches check the kernels as they are really launched.
fn production_grid(m: usize, n: usize, tile: usize, threads: u32) -> LaunchConfig {
    let d = ferry_sd::cuda::gemm_dims(m, n, tile, threads).expect("gemm launch geometry");
    LaunchConfig {
        grid: [d.grid.0, d.grid.1, d.grid.2],
        block: [d.block.0, d.block.1, d.block.2],
        dynamic_shared: d.shared_mem,
    }
}
