//! The CUDA kernels against the f32 CPU reference ops.
//!
//! GPU tests are `#[ignore = "needs a CUDA GPU"]` (reported as ignored, never passed, without a
//! GPU); run them with `cargo test -p ferry-sd --test cuda_kernels -- --ignored`, where they fail
//! if GPU 0 cannot be opened. Each runs a kernel on random inputs of realistic and awkward shapes
//! (odd sizes, non-multiples of the 64-wide tiles) into an output poisoned with NaN, and compares
//! with the CPU op evaluated on the same (storage-rounded) inputs: max |gpu - cpu| must be within
//! 1e-4 (f32), 1e-2 (f16) or 3e-2 (bf16, 8-bit mantissa) of max |cpu|.
//!
//! The non-ignored tests check, without a GPU, every kernel name and every wrapper's argument
//! list and block size against the embedded PTX.

use ferry_pager::device::cuda::{check_launch_args, ptx_entry_params, CudaDevice, ParamKind};
use ferry_pager::{Device, DevicePtr, HostMemKind, StreamId};
use ferry_sd::cuda::{all_kernels, Attention, AttentionKernel, DevBuf, GemmKernel, Gpu, IdBuf};
use ferry_sd::ops::{self, Activation, Conv2dParams};
use ferry_sd::rng::TorchGenerator;
use ferry_sd::tensor::{DType, Tensor};
use half::{bf16, f16};
use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::Arc;

#[test]
fn every_launched_kernel_is_in_its_ptx() {
    let kernels = all_kernels();
    assert!(kernels.len() >= 60, "only {} kernels listed", kernels.len());
    for (ptx, name) in &kernels {
        assert!(ptx.contains(".version 8.4") && ptx.contains(".target sm_80"));
        let params = ptx_entry_params(ptx, name)
            .unwrap_or_else(|| panic!("kernel {name} is launched but has no .entry in its PTX"));
        assert!(
            params.iter().all(|p| !matches!(p, ParamKind::Other(_))),
            "kernel {name} has a parameter KernelArg cannot pass: {params:?}"
        );
    }
}

/// The `.maxntid` (from `__launch_bounds__`) of kernel `func`, if it declares one.
fn max_threads(ptx: &str, func: &str) -> Option<u32> {
    let start = ptx.find(&format!(".entry {func}("))?;
    let body = &ptx[start..];
    let head = &body[..body.find('{')?];
    let line = head
        .lines()
        .find(|l| l.trim_start().starts_with(".maxntid"))?;
    let dims: Vec<u32> = line
        .trim_start()
        .trim_start_matches(".maxntid")
        .split(',')
        .map(|v| v.trim().parse().ok())
        .collect::<Option<_>>()?;
    Some(dims.iter().product())
}

/// Calls every wrapper (every dtype, every kernel variant) on a recording `Gpu` and checks each
/// launch against its PTX: the argument list (count and type class, exactly what
/// `CudaDevice::launch` checks), the block size against `__launch_bounds__`, and that every
/// kernel of `all_kernels` is reached.
#[test]
fn every_wrapper_launch_matches_its_ptx_signature() {
    let log = RefCell::new(Vec::new());
    let g = Gpu::recording(&log);
    let mut next = 0x1_0000_0000u64;
    let mut buf = |t: DType| {
        next += 1 << 32;
        DevBuf::new(DevicePtr(next), t, 1 << 28)
    };
    for t in TYPES {
        let (x, y, z, w) = (buf(t), buf(t), buf(t), buf(t));
        for act in [
            Activation::Silu,
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::QuickGelu,
        ] {
            g.activation(act, &x, &y).unwrap();
        }
        assert!(g.activation(Activation::Sigmoid, &x, &y).is_err());
        g.add(&x, &y, &z).unwrap();
        g.scale(&x, 0.5, &y).unwrap();
        g.add_channel_bias(&DevBuf { len: 60, ..x }, &DevBuf { len: 3, ..w }, 10, &y)
            .unwrap();
        g.geglu_gate(&x, 7, 5, &y).unwrap();
        g.upsample_nearest2x(&x, 6, 5, 7, &y).unwrap();
        g.cat_channels(&x, &y, 2, 35, 70, &z).unwrap();
        g.softmax(&x, 7, 77, &y).unwrap();
        g.transpose(&x, 2, 40, 65, &y).unwrap();
        let ids = IdBuf::new(buf(DType::F32).ptr, 77);
        g.gather(&x, 49408, 768, &ids, &y).unwrap();
        g.resize_nearest(&x, 6, (7, 5), (13, 9), &y).unwrap();
        assert!(g.resize_nearest(&x, 6, (0, 5), (13, 9), &y).is_err());
        assert!(g
            .transpose(&DevBuf { len: 10, ..x }, 2, 40, 65, &y)
            .is_err());
        assert!(g
            .gather(&DevBuf { len: 10, ..x }, 49408, 768, &ids, &y)
            .is_err());
        g.timestep_embedding(&buf(DType::F32), 2, 320, true, 0.0, &y)
            .unwrap();
        g.group_norm(&x, 2, 64, 99, 32, Some(&w), Some(&z), 1e-6, true, &y)
            .unwrap();
        g.group_norm(&x, 2, 64, 99, 32, None, None, 1e-6, false, &y)
            .unwrap();
        g.layer_norm(&x, 77, 768, Some(&w), None, 1e-5, &y).unwrap();
        g.linear(&x, 77, 768, &w, 320, Some(&z), &y).unwrap();
        for kernel in [GemmKernel::Auto, GemmKernel::Tile64, GemmKernel::Tile128] {
            let r = g.linear_with(&x, 1000, 768, &w, 320, None, &y, kernel);
            assert_eq!(
                r.is_ok(),
                t != DType::F32 || kernel != GemmKernel::Tile128,
                "{kernel:?}"
            );
        }
        if t != DType::F32 {
            // k == 0 (y = bias): never the cp.async kernel, which would have nothing to wait for.
            g.linear(&x, 1000, 0, &w, 320, Some(&z), &y).unwrap();
            let last = log.borrow().last().map(|l| l.func);
            assert!(!last.unwrap().starts_with("ferry_linear_big"));
            let r = g.linear_with(&x, 1000, 0, &w, 320, None, &y, GemmKernel::Tile128);
            assert!(r.is_err());
        }
        let (ho, wo) = g
            .conv2d(
                &x,
                [2, 4, 9, 13],
                &w,
                [5, 4, 3, 3],
                None,
                Conv2dParams::new(2, 1),
                &y,
            )
            .unwrap();
        assert_eq!((ho, wo), (5, 7));
        for other in TYPES {
            if other != t {
                g.cast(&x, &buf(other)).unwrap();
            }
        }
        for d in [40usize, 64, 80, 160, 512] {
            for kernel in [AttentionKernel::Auto, AttentionKernel::Simt] {
                let attn = Attention {
                    kernel,
                    causal: d == 64,
                    ..Attention::new(2, 77, 77, 2, d)
                };
                g.attention(&x, &y, &z, &attn, &w).unwrap();
            }
        }
        assert!(g
            .add(
                &x,
                &buf(if t == DType::F32 {
                    DType::F16
                } else {
                    DType::F32
                }),
                &z
            )
            .is_err());
        assert!(g
            .linear(&DevBuf { len: 10, ..x }, 77, 768, &w, 320, None, &y)
            .is_err());
    }
    let log = log.into_inner();
    for launch in &log {
        check_launch_args(launch.ptx, launch.func, &launch.args)
            .unwrap_or_else(|e| panic!("{}: {e}", launch.func));
        let (b, gr) = (launch.dims.block, launch.dims.grid);
        let threads = b.0 * b.1 * b.2;
        assert!(
            threads > 0 && gr.0 > 0 && gr.1 > 0 && gr.2 > 0,
            "{}: empty launch",
            launch.func
        );
        if let Some(max) = max_threads(launch.ptx, launch.func) {
            assert!(
                threads <= max,
                "{}: {threads} threads, launch bounds {max}",
                launch.func
            );
        }
    }
    let launched: HashSet<&str> = log.iter().map(|l| l.func).collect();
    for (_, name) in all_kernels() {
        assert!(
            launched.contains(name),
            "no wrapper call reached kernel {name}"
        );
    }
}

/// The SDXL VAE decoder's last convolutions at 1024² with batch 4 (4·1024·1024 output pixels,
/// 65536 64-row tiles) and a linear with 65536 128-row tiles: accepted, within the driver's
/// grid limits, and every output tile has a block (M tiles on x, N tiles on y, as gemm.cu reads
/// them).
#[test]
fn huge_gemm_launches_fit_the_grid_limits_and_cover_every_tile() {
    use ferry_pager::device::cuda::MAX_GRID;
    let log = RefCell::new(Vec::new());
    let g = Gpu::recording(&log);
    let buf = |i: u64, t: DType, len: usize| DevBuf::new(DevicePtr(i << 40), t, len);
    let covers = |dims: ferry_pager::device::cuda::LaunchDims, m: usize, n: usize, tile: usize| {
        let (gx, gy, gz) = dims.grid;
        assert!(gx <= MAX_GRID.0 && gy <= MAX_GRID.1 && gz == 1, "{dims:?}");
        assert_eq!(gx as usize, m.div_ceil(tile), "M tiles on x: {dims:?}");
        assert_eq!(gy as usize, n.div_ceil(tile), "N tiles on y: {dims:?}");
    };
    for t in TYPES {
        // conv_in of the last up block (128 -> 128) and conv_out (128 -> 3), 1024x1024, batch 4.
        for o in [128usize, 3] {
            let (n, c, h, w) = (4usize, 128usize, 1024usize, 1024usize);
            let x = buf(1, t, n * c * h * w);
            let wt = buf(2, t, o * c * 9);
            let y = buf(3, t, n * o * h * w);
            log.borrow_mut().clear();
            let (ho, wo) = g
                .conv2d(
                    &x,
                    [n, c, h, w],
                    &wt,
                    [o, c, 3, 3],
                    None,
                    Conv2dParams::new(1, 1),
                    &y,
                )
                .unwrap_or_else(|e| panic!("{t:?} conv to {o} channels refused: {e}"));
            assert_eq!((ho, wo), (h, w));
            let launch = log.borrow()[0].clone();
            covers(launch.dims, n * h * w, o, 64);
        }
        // The 128-tile linear with 65536 row tiles.
        if t != DType::F32 {
            let (m, k, n) = (65536 * 128, 8, 256);
            log.borrow_mut().clear();
            g.linear_with(
                &buf(1, t, m * k),
                m,
                k,
                &buf(2, t, n * k),
                n,
                None,
                &buf(3, t, m * n),
                GemmKernel::Tile128,
            )
            .unwrap_or_else(|e| panic!("{t:?} linear refused: {e}"));
            let launch = log.borrow()[0].clone();
            assert!(launch.func.starts_with("ferry_linear_big"));
            covers(launch.dims, m, n, 128);
        }
    }
    // Past the kernels' i32 row index the wrapper refuses instead of launching.
    assert!(ferry_sd::cuda::gemm_dims(i32::MAX as usize, 64, 64, 128).is_err());
    assert!(ferry_sd::cuda::gemm_dims(64, 65536 * 64 + 1, 64, 128).is_err());
}

/// The attention kernels' online softmax over one row of `scores`, step for step: tiles of
/// `tile` keys, a running max `m` and sum `l`, each tile rescaling the previous sum by
/// `exp(m_old - m_new)` and subtracting 0 instead of the max while the max is still -inf (the
/// guard in `kernels/attention.cu`); a row with no finite score gives zeros.
fn online_softmax(scores: &[f32], tile: usize) -> Vec<f32> {
    let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
    let mut maxes = Vec::new();
    for chunk in scores.chunks(tile) {
        let n = chunk.iter().fold(m, |a, &b| a.max(b));
        let u = if n == f32::NEG_INFINITY { 0.0 } else { n };
        l = l * (m - u).exp() + chunk.iter().map(|&s| (s - u).exp()).sum::<f32>();
        m = n;
        maxes.push(u);
    }
    let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
    // Each tile's weights were scaled by exp(u_tile - u_final) by the later rescales.
    let u_final = maxes.last().copied().unwrap_or(0.0);
    scores
        .chunks(tile)
        .zip(&maxes)
        .flat_map(|(chunk, &u)| {
            let carry = (u - u_final).exp();
            chunk.iter().map(move |&s| (s - u).exp() * carry * inv)
        })
        .collect()
}

/// A row whose first key tile is fully masked must not poison the rest (before the guard,
/// `-inf - -inf` made the running sum NaN); a row masked throughout gives zeros, not NaN. Both
/// checked on the kernels' algorithm against the CPU softmax, and in the PTX that the guard is
/// compiled into every attention kernel.
#[test]
fn online_softmax_survives_fully_masked_tiles_and_rows() {
    let mut scores = vec![f32::NEG_INFINITY; 64];
    scores.extend((0..77).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3));
    scores.extend([f32::NEG_INFINITY; 5]);
    let got = online_softmax(&scores, 64);
    let mut want = scores.clone();
    ops::softmax_rows_inplace(&mut want, scores.len()).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-6, "key {i}: {g} vs {w}");
    }
    let masked = online_softmax(&[f32::NEG_INFINITY; 130], 64);
    assert!(masked.iter().all(|&p| p == 0.0), "{masked:?}");

    let ptx = all_kernels()
        .into_iter()
        .find(|(_, name)| name.starts_with("ferry_attention"))
        .map(|(ptx, _)| ptx)
        .unwrap();
    let entries: Vec<&str> = ptx.split(".entry ").skip(1).collect();
    assert_eq!(entries.len(), 11);
    for body in entries {
        let name = &body[..body.find('(').unwrap()];
        let guards = body
            .lines()
            .filter(|l| l.contains("setp.eq.f32") && l.contains("0fFF800000"))
            .count();
        let want = if name.contains("simt") { 1 } else { 2 };
        assert!(guards >= want, "{name}: {guards} max == -inf guards");
    }
}

// ---------------------------------------------------------------------------------------------
// GPU tests.

const TYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// GPU 0, opened once per test binary: every test gets the same device, so each PTX module is
/// JIT-compiled once, not once per test.
fn shared_gpu() -> Arc<CudaDevice> {
    static DEV: std::sync::OnceLock<Result<Arc<CudaDevice>, String>> = std::sync::OnceLock::new();
    match DEV.get_or_init(|| CudaDevice::new(0).map_err(|e| e.to_string())) {
        Ok(dev) => dev.clone(),
        Err(e) => panic!("this test needs a CUDA GPU (it runs only with --ignored): {e}"),
    }
}

struct Ctx {
    dev: Arc<CudaDevice>,
    stream: StreamId,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // The device is shared by the tests of this binary: give the stream back.
        let _ = self.dev.sync_stream(self.stream);
        let _ = self.dev.destroy_stream(self.stream);
    }
}

impl Ctx {
    fn new() -> Ctx {
        let dev = shared_gpu();
        let stream = dev.create_stream().unwrap();
        Ctx { dev, stream }
    }

    fn gpu(&self) -> Gpu<'_> {
        Gpu::new(self.dev.as_ref(), self.stream)
    }

    fn upload(&self, data: &[f32], t: DType) -> DevBuf {
        let bytes: Vec<u8> = match t {
            DType::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => data
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            DType::BF16 => data
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
        };
        let ptr = self.dev.alloc_device(bytes.len().max(1) as u64).unwrap();
        self.dev
            .copy_h2d_pageable(self.stream, ptr, &bytes)
            .unwrap();
        DevBuf::new(ptr, t, data.len())
    }

    /// A buffer of `len` elements, all bits set (NaN in f32, f16 and bf16).
    fn poisoned(&self, len: usize, t: DType) -> DevBuf {
        let bytes = vec![0xffu8; (len * t.size()).max(1)];
        let ptr = self.dev.alloc_device(bytes.len() as u64).unwrap();
        self.dev
            .copy_h2d_pageable(self.stream, ptr, &bytes)
            .unwrap();
        DevBuf::new(ptr, t, len)
    }

    fn download(&self, buf: &DevBuf) -> Vec<f32> {
        let len = buf.bytes() as usize;
        let host = self
            .dev
            .alloc_host(len as u64, HostMemKind::Readable)
            .unwrap();
        self.dev
            .copy_d2h(self.stream, host, 0, buf.ptr, len as u64)
            .unwrap();
        self.dev.sync_stream(self.stream).unwrap();
        let mut bytes = vec![0u8; len];
        self.dev.host_read(host, 0, &mut bytes).unwrap();
        self.dev.free_host(host).unwrap();
        Tensor::from_bytes(&bytes, buf.dtype, [buf.len])
            .unwrap()
            .into_data()
    }

    fn free(&self, bufs: &[&DevBuf]) {
        for b in bufs {
            self.dev.free_device(b.ptr).unwrap();
        }
    }
}

/// `data` rounded to `t` and back (what the kernel sees).
fn rounded(data: &[f32], t: DType) -> Vec<f32> {
    match t {
        DType::F32 => data.to_vec(),
        DType::F16 => data.iter().map(|v| f16::from_f32(*v).to_f32()).collect(),
        DType::BF16 => data.iter().map(|v| bf16::from_f32(*v).to_f32()).collect(),
    }
}

/// `n` standard normal values times `scale`, rounded to `t`.
fn randn(n: usize, seed: u64, scale: f32, t: DType) -> Vec<f32> {
    let v: Vec<f32> = TorchGenerator::manual_seed(seed)
        .randn(n)
        .into_iter()
        .map(|x| x * scale)
        .collect();
    rounded(&v, t)
}

fn tensor(shape: &[usize], data: Vec<f32>) -> Tensor {
    Tensor::new(shape.to_vec(), data).unwrap()
}

fn tol(t: DType) -> f32 {
    match t {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        DType::BF16 => 3e-2,
    }
}

fn assert_close(what: &str, t: DType, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what} ({t:?}): length");
    if let Some(i) = want.iter().position(|v| !v.is_finite()) {
        panic!(
            "{what} ({t:?}): the CPU reference is not finite at {i} ({})",
            want[i]
        );
    }
    let max_ref = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    let mut worst = (0.0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // NaN (an element the kernel never wrote, or produced) counts as infinitely far.
        let d = (g - w).abs();
        let d = if d.is_nan() { f32::INFINITY } else { d };
        if d > worst.0 {
            worst = (d, i);
        }
    }
    let rel = worst.0 / max_ref;
    assert!(
        rel <= tol(t),
        "{what} ({t:?}): max |gpu - cpu| = {} at {} (gpu {}, cpu {}), {rel:e} of max |cpu| {max_ref} \
         (tolerance {})",
        worst.0,
        worst.1,
        got[worst.1],
        want[worst.1],
        tol(t)
    );
}

#[test]
fn assert_close_rejects_nan_and_inf_on_either_side() {
    let want = [0.5f32, -1.0, 2.0, 0.25];
    assert_close("same", DType::F32, &want, &want);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for at in 0..want.len() {
            let mut planted = want;
            planted[at] = bad;
            for (g, w) in [(&planted, &want), (&want, &planted), (&planted, &planted)] {
                let r = std::panic::catch_unwind(|| assert_close("planted", DType::F16, g, w));
                assert!(r.is_err(), "{bad} at {at} accepted");
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_activations_match_cpu() {
    let c = Ctx::new();
    for t in TYPES {
        for (i, n) in [1usize, 1000, 65_537].into_iter().enumerate() {
            let x = randn(n, 10 + i as u64, 3.0, t);
            let xb = c.upload(&x, t);
            for act in [
                Activation::Silu,
                Activation::Gelu,
                Activation::GeluTanh,
                Activation::QuickGelu,
            ] {
                let y = c.poisoned(n, t);
                c.gpu().activation(act, &xb, &y).unwrap();
                let want = act.forward(&tensor(&[n], x.clone()));
                assert_close(&format!("{act:?} n={n}"), t, &c.download(&y), want.data());
                c.free(&[&y]);
            }
            c.free(&[&xb]);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_add_scale_and_channel_bias_match_cpu() {
    let c = Ctx::new();
    for t in TYPES {
        let shape = [2usize, 5, 7, 9];
        let n: usize = shape.iter().product();
        let (a, b) = (randn(n, 1, 1.0, t), randn(n, 2, 1.0, t));
        let (ab, bb) = (c.upload(&a, t), c.upload(&b, t));
        let y = c.poisoned(n, t);
        c.gpu().add(&ab, &bb, &y).unwrap();
        let want = ops::add(&tensor(&shape, a.clone()), &tensor(&shape, b.clone())).unwrap();
        assert_close("add", t, &c.download(&y), want.data());
        c.gpu().scale(&ab, -0.37, &y).unwrap();
        assert_close(
            "scale",
            t,
            &c.download(&y),
            ops::scale(&tensor(&shape, a.clone()), -0.37).data(),
        );
        for bias_shape in [vec![5usize], vec![2, 5]] {
            let bn: usize = bias_shape.iter().product();
            let bias = randn(bn, 3, 1.0, t);
            let biasb = c.upload(&bias, t);
            let y2 = c.poisoned(n, t);
            c.gpu().add_channel_bias(&ab, &biasb, 63, &y2).unwrap();
            let want =
                ops::add_channel_bias(&tensor(&shape, a.clone()), &tensor(&bias_shape, bias))
                    .unwrap();
            assert_close(
                &format!("add_channel_bias {bias_shape:?}"),
                t,
                &c.download(&y2),
                want.data(),
            );
            c.free(&[&biasb, &y2]);
        }
        c.free(&[&ab, &bb, &y]);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_geglu_upsample_concat_match_cpu() {
    let c = Ctx::new();
    for t in TYPES {
        for (rows, f) in [(77usize, 1280usize), (3, 33)] {
            let h = randn(rows * 2 * f, 4, 2.0, t);
            let hb = c.upload(&h, t);
            let y = c.poisoned(rows * f, t);
            c.gpu().geglu_gate(&hb, rows, f, &y).unwrap();
            let want = ops::geglu_gate(&tensor(&[rows, 2 * f], h)).unwrap();
            assert_close(
                &format!("geglu {rows}x{f}"),
                t,
                &c.download(&y),
                want.data(),
            );
            c.free(&[&hb, &y]);
        }
        let shape = [2usize, 3, 5, 7];
        let x = randn(210, 5, 1.0, t);
        let xb = c.upload(&x, t);
        let y = c.poisoned(840, t);
        c.gpu().upsample_nearest2x(&xb, 6, 5, 7, &y).unwrap();
        let want = ops::upsample_nearest2x(&tensor(&shape, x.clone())).unwrap();
        assert_close("upsample2x", t, &c.download(&y), want.data());
        let b = randn(2 * 4 * 35, 6, 1.0, t);
        let bb = c.upload(&b, t);
        let cat = c.poisoned(2 * 7 * 35, t);
        c.gpu()
            .cat_channels(&xb, &bb, 2, 3 * 35, 4 * 35, &cat)
            .unwrap();
        let want = ops::cat_channels(&[&tensor(&shape, x), &tensor(&[2, 4, 5, 7], b)]).unwrap();
        assert_close("cat_channels", t, &c.download(&cat), want.data());
        c.free(&[&xb, &y, &bb, &cat]);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_casts_round_like_half() {
    let c = Ctx::new();
    let x = randn(10_001, 7, 100.0, DType::F32);
    let xb = c.upload(&x, DType::F32);
    for t in [DType::F16, DType::BF16] {
        let h = c.poisoned(x.len(), t);
        c.gpu().cast(&xb, &h).unwrap();
        let back = c.poisoned(x.len(), DType::F32);
        c.gpu().cast(&h, &back).unwrap();
        assert_eq!(c.download(&back), rounded(&x, t), "f32 -> {t:?} -> f32");
        c.free(&[&h, &back]);
    }
    let h = c.upload(&x, DType::F16);
    let b = c.poisoned(x.len(), DType::BF16);
    c.gpu().cast(&h, &b).unwrap();
    assert_eq!(
        c.download(&b),
        rounded(&rounded(&x, DType::F16), DType::BF16)
    );
    c.free(&[&xb, &h, &b]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_softmax_matches_cpu() {
    let c = Ctx::new();
    for t in TYPES {
        for (rows, len) in [(7usize, 77usize), (3, 4099), (1, 1)] {
            let x = randn(rows * len, 8, 4.0, t);
            let xb = c.upload(&x, t);
            let y = c.poisoned(rows * len, t);
            c.gpu().softmax(&xb, rows, len, &y).unwrap();
            let want = ops::softmax_last_dim(&tensor(&[rows, len], x)).unwrap();
            assert_close(
                &format!("softmax {rows}x{len}"),
                t,
                &c.download(&y),
                want.data(),
            );
            c.free(&[&xb, &y]);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_timestep_embedding_matches_cpu() {
    let c = Ctx::new();
    let ts = [0.0f32, 1.0, 999.0, 500.5, 981.0];
    let tb = c.upload(&ts, DType::F32);
    for t in TYPES {
        for (dim, flip, shift) in [
            (320usize, true, 0.0f32),
            (1280, true, 0.0),
            (7, false, 1.0),
            (256, false, 1.0),
        ] {
            let y = c.poisoned(ts.len() * dim, t);
            c.gpu()
                .timestep_embedding(&tb, ts.len(), dim, flip, shift, &y)
                .unwrap();
            let want = ops::timestep_embedding(&ts, dim, flip, shift).unwrap();
            assert_close(
                &format!("timestep_embedding dim {dim}"),
                t,
                &c.download(&y),
                want.data(),
            );
            c.free(&[&y]);
        }
    }
    c.free(&[&tb]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_group_norm_matches_cpu() {
    let c = Ctx::new();
    for t in TYPES {
        for (shape, groups, affine, silu) in [
            ([2usize, 64, 9, 11], 32usize, true, true),
            ([2, 64, 9, 11], 32, false, false),
            ([1, 320, 40, 40], 32, true, false),
            ([1, 6, 1, 1], 3, true, true),
        ] {
            let [n, ch, h, w] = shape;
            let x = randn(n * ch * h * w, 9, 2.0, t);
            let (wv, bv) = (randn(ch, 10, 1.0, t), randn(ch, 11, 1.0, t));
            let (xb, wb, bb) = (c.upload(&x, t), c.upload(&wv, t), c.upload(&bv, t));
            let y = c.poisoned(x.len(), t);
            let (wo, bo) = if affine {
                (Some(&wb), Some(&bb))
            } else {
                (None, None)
            };
            c.gpu()
                .group_norm(&xb, n, ch, h * w, groups, wo, bo, 1e-6, silu, &y)
                .unwrap();
            let (wt, bt) = (tensor(&[ch], wv), tensor(&[ch], bv));
            let (wr, br) = if affine {
                (Some(&wt), Some(&bt))
            } else {
                (None, None)
            };
            let want = ops::group_norm(&tensor(&shape, x), groups, wr, br, 1e-6, silu).unwrap();
            assert_close(
                &format!("group_norm {shape:?}"),
                t,
                &c.download(&y),
                want.data(),
            );
            c.free(&[&xb, &wb, &bb, &y]);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_layer_norm_matches_cpu() {
    let c = Ctx::new();
    for t in TYPES {
        for (rows, d, affine) in [
            (2 * 77usize, 768usize, true),
            (5, 37, false),
            (3, 1280, true),
        ] {
            let x = randn(rows * d, 12, 3.0, t);
            let (wv, bv) = (randn(d, 13, 1.0, t), randn(d, 14, 1.0, t));
            let (xb, wb, bb) = (c.upload(&x, t), c.upload(&wv, t), c.upload(&bv, t));
            let y = c.poisoned(x.len(), t);
            let (wo, bo) = if affine {
                (Some(&wb), Some(&bb))
            } else {
                (None, None)
            };
            c.gpu().layer_norm(&xb, rows, d, wo, bo, 1e-5, &y).unwrap();
            let (wt, bt) = (tensor(&[d], wv), tensor(&[d], bv));
            let (wr, br) = if affine {
                (Some(&wt), Some(&bt))
            } else {
                (None, None)
            };
            let want = ops::layer_norm(&tensor(&[rows, d], x), wr, br, 1e-5).unwrap();
            assert_close(
                &format!("layer_norm {rows}x{d}"),
                t,
                &c.download(&y),
                want.data(),
            );
            c.free(&[&xb, &wb, &bb, &y]);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_linear_matches_cpu() {
    let c = Ctx::new();
    for t in TYPES {
        for (m, k, n, bias) in [
            (1usize, 1usize, 1usize, true),
            (65, 33, 67, true),
            (2 * 77, 768, 320, true),
            (130, 320, 1280, false),
            (1024, 640, 129, true),
            (3, 1283, 5, true),
            (77, 8, 3, true),
            (2 * 1024 + 3, 328, 640, true),
            (4096, 320, 320, true), // SD 1.5 64x64 latents, batch 1
        ] {
            let x = randn(m * k, 15, 1.0, t);
            let w = randn(n * k, 16, 1.0 / (k as f32).sqrt(), t);
            let bv = randn(n, 17, 1.0, t);
            let bt = tensor(&[n], bv.clone());
            let want = ops::linear(
                &tensor(&[m, k], x.clone()),
                &tensor(&[n, k], w.clone()),
                bias.then_some(&bt),
            )
            .unwrap();
            let (xb, wb, bb) = (c.upload(&x, t), c.upload(&w, t), c.upload(&bv, t));
            let mut kernels = vec![GemmKernel::Auto, GemmKernel::Tile64];
            if t != DType::F32 && k % 8 == 0 {
                kernels.push(GemmKernel::Tile128);
            }
            for kernel in kernels {
                let y = c.poisoned(m * n, t);
                c.gpu()
                    .linear_with(&xb, m, k, &wb, n, bias.then_some(&bb), &y, kernel)
                    .unwrap();
                assert_close(
                    &format!("linear {kernel:?} m{m} k{k} n{n}"),
                    t,
                    &c.download(&y),
                    want.data(),
                );
                c.free(&[&y]);
            }
            c.free(&[&xb, &wb, &bb]);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_conv2d_matches_cpu() {
    let c = Ctx::new();
    let asym = Conv2dParams {
        stride: (2, 2),
        padding: [0, 1, 0, 1],
    };
    for t in TYPES {
        for (xs, o, kk, params) in [
            ([2usize, 4, 9, 13], 5usize, 3usize, Conv2dParams::new(1, 1)),
            ([2, 4, 9, 13], 5, 3, Conv2dParams::new(2, 1)),
            ([1, 3, 17, 17], 64, 3, Conv2dParams::new(1, 1)), // VAE conv_in-like: c = 3
            ([1, 64, 24, 24], 64, 3, Conv2dParams::new(1, 1)),
            ([1, 64, 24, 24], 64, 3, asym), // VAE encoder downsample
            ([2, 320, 8, 8], 320, 3, Conv2dParams::new(2, 1)),
            ([2, 40, 7, 9], 33, 1, Conv2dParams::new(1, 0)),
            ([1, 640, 16, 16], 320, 1, Conv2dParams::new(1, 0)),
        ] {
            let [n, ch, h, w] = xs;
            let ws = [o, ch, kk, kk];
            let x = randn(n * ch * h * w, 18, 1.0, t);
            let wv = randn(
                o * ch * kk * kk,
                19,
                1.0 / ((ch * kk * kk) as f32).sqrt(),
                t,
            );
            let bv = randn(o, 20, 1.0, t);
            let want = ops::conv2d(
                &tensor(&xs, x.clone()),
                &tensor(&ws, wv.clone()),
                Some(&tensor(&[o], bv.clone())),
                params,
            )
            .unwrap();
            let (xb, wb, bb) = (c.upload(&x, t), c.upload(&wv, t), c.upload(&bv, t));
            let y = c.poisoned(want.numel(), t);
            let (ho, wo) = c
                .gpu()
                .conv2d(&xb, xs, &wb, ws, Some(&bb), params, &y)
                .unwrap();
            assert_eq!(&[n, o, ho, wo][..], want.shape());
            assert_close(
                &format!("conv2d {xs:?} -> {o} k{kk} {params:?}"),
                t,
                &c.download(&y),
                want.data(),
            );
            c.free(&[&xb, &wb, &bb, &y]);
        }
    }
}

/// Attention of shape `(batch, nq, nk, heads, d)` on the GPU against the CPU op.
fn check_attention(
    c: &Ctx,
    t: DType,
    kernel: AttentionKernel,
    shape: (usize, usize, usize, usize, usize),
) {
    let (b, nq, nk, heads, d) = shape;
    let hd = heads * d;
    let q = randn(b * nq * hd, 21, 1.0, t);
    let k = randn(b * nk * hd, 22, 1.0, t);
    let v = randn(b * nk * hd, 23, 1.0, t);
    let want = ops::scaled_dot_product_attention(
        &tensor(&[b, nq, hd], q.clone()),
        &tensor(&[b, nk, hd], k.clone()),
        &tensor(&[b, nk, hd], v.clone()),
        heads,
    )
    .unwrap();
    let (qb, kb, vb) = (c.upload(&q, t), c.upload(&k, t), c.upload(&v, t));
    let o = c.poisoned(b * nq * hd, t);
    let attn = Attention {
        kernel,
        ..Attention::new(b, nq, nk, heads, d)
    };
    c.gpu().attention(&qb, &kb, &vb, &attn, &o).unwrap();
    let what = format!("attention {kernel:?} b{b} nq{nq} nk{nk} heads{heads} d{d}");
    assert_close(&what, t, &c.download(&o), want.data());
    c.free(&[&qb, &kb, &vb, &o]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_flash_attention_matches_cpu() {
    let c = Ctx::new();
    for t in [DType::F16, DType::BF16] {
        for d in [40usize, 64, 80, 160] {
            check_attention(&c, t, AttentionKernel::Auto, (2, 77, 77, 2, d)); // CLIP-like, odd
            check_attention(&c, t, AttentionKernel::Auto, (2, 300, 77, 3, d)); // cross-attention
            check_attention(&c, t, AttentionKernel::Auto, (1, 1, 1, 1, d));
        }
        check_attention(&c, t, AttentionKernel::Auto, (1, 4096, 4096, 1, 64)); // SD 1.5 64x64 latents
        check_attention(&c, t, AttentionKernel::Auto, (1, 65, 16_384, 1, 40)); // long kv
        check_attention(&c, t, AttentionKernel::Auto, (1, 16_384, 77, 1, 40)); // long q, cross
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_simt_attention_matches_cpu() {
    let c = Ctx::new();
    for t in TYPES {
        for d in [40usize, 64, 80, 160] {
            check_attention(&c, t, AttentionKernel::Simt, (2, 77, 77, 2, d));
            check_attention(&c, t, AttentionKernel::Simt, (1, 33, 100, 3, d));
        }
        check_attention(&c, t, AttentionKernel::Simt, (1, 1024, 1024, 1, 512)); // VAE mid-block
        check_attention(&c, t, AttentionKernel::Simt, (1, 5, 7, 2, 3)); // odd head size
    }
}

/// Causal attention (CLIP) computed directly in f64: `qkv [b, n, 3*heads*d]` holds q, k, v as
/// column blocks of one fused projection, as the strided GPU call reads them.
fn causal_reference(qkv: &[f32], b: usize, n: usize, heads: usize, d: usize) -> Vec<f32> {
    let (hd, ld) = (heads * d, 3 * heads * d);
    let mut out = vec![0.0f32; b * n * hd];
    let scale = 1.0 / (d as f64).sqrt();
    for bi in 0..b {
        for h in 0..heads {
            let at = |row: usize, part: usize, c: usize| {
                qkv[(bi * n + row) * ld + part * hd + h * d + c] as f64
            };
            for i in 0..n {
                let s: Vec<f64> = (0..=i)
                    .map(|j| (0..d).map(|c| at(i, 0, c) * at(j, 1, c)).sum::<f64>() * scale)
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let l: f64 = p.iter().sum();
                for c in 0..d {
                    let o: f64 = p.iter().enumerate().map(|(j, pj)| pj * at(j, 2, c)).sum();
                    out[(bi * n + i) * hd + h * d + c] = (o / l) as f32;
                }
            }
        }
    }
    out
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_causal_attention_on_fused_qkv_matches_reference() {
    let c = Ctx::new();
    for t in TYPES {
        for kernel in [AttentionKernel::Auto, AttentionKernel::Simt] {
            for (b, n, heads, d) in [
                (2usize, 77usize, 2usize, 64usize),
                (1, 130, 3, 40),
                (1, 5, 1, 80),
            ] {
                let hd = heads * d;
                let qkv = randn(b * n * 3 * hd, 24, 1.0, t);
                let all = c.upload(&qkv, t);
                let size = t.size() as u64;
                let part = |i: usize| {
                    DevBuf::new(
                        all.ptr.offset(i as u64 * hd as u64 * size),
                        t,
                        all.len - i * hd,
                    )
                };
                let o = c.poisoned(b * n * hd, t);
                let attn = Attention {
                    causal: true,
                    row_strides: Some((3 * hd, 3 * hd, hd)),
                    kernel,
                    ..Attention::new(b, n, n, heads, d)
                };
                c.gpu()
                    .attention(&part(0), &part(1), &part(2), &attn, &o)
                    .unwrap();
                let what =
                    format!("causal fused-qkv attention {kernel:?} b{b} n{n} heads{heads} d{d}");
                assert_close(
                    &what,
                    t,
                    &c.download(&o),
                    &causal_reference(&qkv, b, n, heads, d),
                );
                c.free(&[&all, &o]);
            }
        }
    }
}
