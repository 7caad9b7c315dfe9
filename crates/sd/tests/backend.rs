//! The [`Backend`] implementations against the f32 CPU reference ops, one test body per op,
//! instantiated per backend by `backend_tests!`.
//!
//! Each body builds random inputs (rounded to the backend's storage type), runs the op through
//! the backend, downloads, and compares with the [`ops`] function on the same inputs: exactly on
//! the CPU backend, within 1e-4 (f32) / 1e-2 (f16) of max |reference| on CUDA. The CUDA
//! instances need a GPU and are `#[ignore]`d (run with `-- --ignored`, they fail if GPU 0
//! cannot be opened). Without a GPU: the activation arena, and the CUDA backend in recording
//! mode checked against the PTX signatures.

use ferry_pager::device::cuda::{check_launch_args, CudaDevice, KernelArg};
use ferry_pager::{Device, DevicePtr, DeviceRange, StreamId};
use ferry_sd::backend::{
    ActivationArena, ArenaError, Backend, CpuBackend, CudaBackend, CudaTensor, ARENA_ALIGN,
};
use ferry_sd::cuda::Launch;
use ferry_sd::error::Error;
use ferry_sd::ops::{self, Activation, Conv2dParams};
use ferry_sd::rng::TorchGenerator;
use ferry_sd::tensor::{DType, Tensor};
use std::cell::RefCell;
use std::sync::Arc;

/// How close a backend must come to the reference.
#[derive(Clone, Copy, Debug)]
enum Tol {
    /// Bit-identical.
    Exact,
    /// max |got - want| <= this × max |want|.
    Rel(f32),
}

fn cpu_backend(_: &()) -> CpuBackend {
    CpuBackend::new()
}

/// GPU 0, opened once per test binary: every test gets the same device, so each PTX module is
/// JIT-compiled once, not once per test.
fn shared_gpu() -> Arc<CudaDevice> {
    static DEV: std::sync::OnceLock<Result<Arc<CudaDevice>, String>> = std::sync::OnceLock::new();
    match DEV.get_or_init(|| CudaDevice::new(0).map_err(|e| e.to_string())) {
        Ok(dev) => dev.clone(),
        Err(e) => panic!("this test needs a CUDA GPU (it runs only with --ignored): {e}"),
    }
}

/// A GPU, a stream and a workspace allocation standing in for the scheduler's reserve.
struct CudaOwner {
    dev: Arc<CudaDevice>,
    stream: StreamId,
    workspace: DeviceRange,
    dtype: DType,
}

impl CudaOwner {
    fn new(dtype: DType) -> CudaOwner {
        let dev = shared_gpu();
        let stream = dev.create_stream().unwrap();
        let len = 256 << 20;
        let ptr = dev.alloc_device(len).unwrap();
        CudaOwner {
            dev,
            stream,
            workspace: DeviceRange::new(ptr, len),
            dtype,
        }
    }

    fn backend(&self) -> CudaBackend<'_> {
        CudaBackend::new(self.dev.as_ref(), self.stream, self.workspace, self.dtype).unwrap()
    }
}

impl Drop for CudaOwner {
    fn drop(&mut self) {
        // Best effort; the device is shared by the tests of this binary, so give back now.
        let _ = self.dev.sync_stream(self.stream);
        let _ = self.dev.free_device(self.workspace.ptr);
        let _ = self.dev.destroy_stream(self.stream);
    }
}

/// Instantiates every body of `bodies` as a test of one backend: `name`, an owner expression
/// (kept alive for the test), a function from `&owner` to the backend, the tolerance, and an
/// optional attribute (e.g. `#[ignore = "needs a CUDA GPU"]`).
macro_rules! backend_tests {
    (@cases $owner:expr, $make:path, $tol:expr, $attr:meta; $($body:ident),* $(,)?) => {
        $(
            #[test]
            #[$attr]
            fn $body() {
                let owner = $owner;
                let be = $make(&owner);
                super::bodies::$body(&be, $tol);
            }
        )*
    };
    ($name:ident, $owner:expr, $make:path, $tol:expr) => {
        backend_tests!($name, $owner, $make, $tol, #[cfg(all())]);
    };
    ($name:ident, $owner:expr, $make:path, $tol:expr, #[$attr:meta]) => {
        mod $name {
            use super::*;
            backend_tests!(@cases $owner, $make, $tol, $attr;
                linear, linear_3d, conv2d, group_norm, layer_norm, attention, causal_attention,
                activations, geglu, add_and_scale, add_channel_bias, upsample_nearest2x,
                cat_channels, timestep_embedding, keep_reclaims_temporaries, resnet_chain,
                nchw_tokens, embedding, gather_rows, resize_nearest, reshape,
            );
        }
    };
}

backend_tests!(cpu, (), cpu_backend, Tol::Exact);
backend_tests!(
    cuda_f32,
    CudaOwner::new(DType::F32),
    CudaOwner::backend,
    Tol::Rel(1e-4),
    #[ignore = "needs a CUDA GPU"]
);
backend_tests!(
    cuda_f16,
    CudaOwner::new(DType::F16),
    CudaOwner::backend,
    Tol::Rel(1e-2),
    #[ignore = "needs a CUDA GPU"]
);

/// `shape` standard normals times `scale`, rounded to `t` (what the backend stores).
fn randn(shape: &[usize], seed: u64, scale: f32, t: DType) -> Tensor {
    let n = shape.iter().product();
    let v = TorchGenerator::manual_seed(seed)
        .randn(n)
        .into_iter()
        .map(|x| {
            let x = x * scale;
            match t {
                DType::F32 => x,
                DType::F16 => half::f16::from_f32(x).to_f32(),
                DType::BF16 => half::bf16::from_f32(x).to_f32(),
            }
        })
        .collect();
    Tensor::new(shape.to_vec(), v).unwrap()
}

/// Panics unless `got` matches `want` within `tol`. A NaN or infinity in the reference fails (bit
/// equality would otherwise let a NaN output match a NaN reference).
#[track_caller]
fn check(what: &str, tol: Tol, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    if let Some((i, v)) = want.first_non_finite() {
        panic!("{what}: the reference is not finite (element {i} is {v})");
    }
    match tol {
        Tol::Exact => assert!(
            got.data()
                .iter()
                .zip(want.data())
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: not bit-identical to the reference (max diff {})",
            got.max_abs_diff(want).unwrap()
        ),
        Tol::Rel(rel) => {
            let max_ref = want.max_abs().max(1e-6);
            let worst = got
                .data()
                .iter()
                .zip(want.data())
                .map(|(a, b)| {
                    let d = (a - b).abs();
                    if d.is_nan() {
                        f32::INFINITY
                    } else {
                        d
                    }
                })
                .fold(0.0f32, f32::max);
            assert!(
                worst <= rel * max_ref,
                "{what}: max |got - want| = {worst} > {rel} × max |want| {max_ref}"
            );
        }
    }
}

#[test]
fn check_rejects_nan_and_inf_in_either_tensor() {
    let want = randn(&[2, 5], 3, 1.0, DType::F32);
    for tol in [Tol::Exact, Tol::Rel(1e-2)] {
        check("same", tol, &want, &want);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 4, 9] {
                let mut d = want.data().to_vec();
                d[at] = bad;
                let planted = Tensor::new(want.shape().to_vec(), d).unwrap();
                for (g, w) in [(&planted, &want), (&want, &planted), (&planted, &planted)] {
                    let r = std::panic::catch_unwind(|| check("planted", tol, g, w));
                    assert!(r.is_err(), "{bad} at {at} accepted");
                }
            }
        }
    }
}

/// The test bodies, generic over the backend.
mod bodies {
    pub use super::layout_bodies::{embedding, gather_rows, nchw_tokens, reshape, resize_nearest};
    use super::*;

    /// Random input of `shape` rounded to the backend's storage, on the host and uploaded.
    fn input<B: Backend>(be: &B, shape: &[usize], seed: u64, scale: f32) -> (Tensor, B::Tensor) {
        let t = randn(shape, seed, scale, be.dtype());
        let d = be.upload(&t).unwrap();
        (t, d)
    }

    fn run<B: Backend>(be: &B, what: &str, tol: Tol, got: &B::Tensor, want: &Tensor) {
        assert_eq!(be.shape(got), want.shape(), "{what}: backend shape");
        check(
            &format!("{} {what}", be.name()),
            tol,
            &be.download(got).unwrap(),
            want,
        );
    }

    pub fn linear<B: Backend>(be: &B, tol: Tol) {
        for (m, k, n, bias) in [(1, 1, 1, true), (65, 33, 67, true), (130, 320, 129, false)] {
            let (x, xd) = input(be, &[m, k], 1, 1.0);
            let (w, wd) = input(be, &[n, k], 2, 1.0 / (k as f32).sqrt());
            let (b, bd) = input(be, &[n], 3, 1.0);
            let want = ops::linear(&x, &w, bias.then_some(&b)).unwrap();
            let got = be.linear(&xd, &wd, bias.then_some(&bd)).unwrap();
            run(be, &format!("linear {m}x{k}x{n}"), tol, &got, &want);
        }
        let (_, xd) = input(be, &[3, 4], 1, 1.0);
        let (_, wd) = input(be, &[5, 3], 2, 1.0);
        assert!(be.linear(&xd, &wd, None).is_err(), "k mismatch accepted");
    }

    pub fn linear_3d<B: Backend>(be: &B, tol: Tol) {
        let (x, xd) = input(be, &[2, 7, 40], 4, 1.0);
        let (w, wd) = input(be, &[24, 40], 5, 0.2);
        let (b, bd) = input(be, &[24], 6, 1.0);
        let want = ops::linear(&x, &w, Some(&b)).unwrap();
        run(
            be,
            "linear [2,7,40]",
            tol,
            &be.linear(&xd, &wd, Some(&bd)).unwrap(),
            &want,
        );
    }

    pub fn conv2d<B: Backend>(be: &B, tol: Tol) {
        let asym = Conv2dParams {
            stride: (2, 2),
            padding: [0, 1, 0, 1],
        };
        for (xs, o, kk, params) in [
            ([2usize, 4, 9, 13], 5usize, 3usize, Conv2dParams::new(1, 1)),
            ([1, 3, 17, 17], 8, 3, Conv2dParams::new(2, 1)),
            ([1, 6, 10, 10], 6, 3, asym),
            ([2, 7, 5, 9], 3, 1, Conv2dParams::new(1, 0)),
        ] {
            let ws = [o, xs[1], kk, kk];
            let (x, xd) = input(be, &xs, 7, 1.0);
            let (w, wd) = input(be, &ws, 8, 1.0 / ((xs[1] * kk * kk) as f32).sqrt());
            let (b, bd) = input(be, &[o], 9, 1.0);
            let want = ops::conv2d(&x, &w, Some(&b), params).unwrap();
            let got = be.conv2d(&xd, &wd, Some(&bd), params).unwrap();
            run(
                be,
                &format!("conv2d {xs:?} k{kk} {params:?}"),
                tol,
                &got,
                &want,
            );
        }
    }

    pub fn group_norm<B: Backend>(be: &B, tol: Tol) {
        for (shape, groups, affine, silu) in [
            (vec![2usize, 64, 9, 11], 32usize, true, true),
            (vec![2, 64, 9, 11], 32, false, false),
            (vec![1, 6, 1, 1], 3, true, true),
            (vec![2, 12, 5], 4, true, false),
        ] {
            let c = shape[1];
            let (x, xd) = input(be, &shape, 10, 2.0);
            let (w, wd) = input(be, &[c], 11, 1.0);
            let (b, bd) = input(be, &[c], 12, 1.0);
            let (wr, br) = if affine {
                (Some(&w), Some(&b))
            } else {
                (None, None)
            };
            let (wo, bo) = if affine {
                (Some(&wd), Some(&bd))
            } else {
                (None, None)
            };
            let want = ops::group_norm(&x, groups, wr, br, 1e-6, silu).unwrap();
            let got = be.group_norm(&xd, groups, wo, bo, 1e-6, silu).unwrap();
            run(
                be,
                &format!("group_norm {shape:?} silu {silu}"),
                tol,
                &got,
                &want,
            );
        }
    }

    pub fn layer_norm<B: Backend>(be: &B, tol: Tol) {
        for (shape, affine) in [(vec![2usize, 7, 96], true), (vec![5, 37], false)] {
            let d = shape[shape.len() - 1];
            let (x, xd) = input(be, &shape, 13, 3.0);
            let (w, wd) = input(be, &[d], 14, 1.0);
            let (b, bd) = input(be, &[d], 15, 1.0);
            let (wr, br) = if affine {
                (Some(&w), Some(&b))
            } else {
                (None, None)
            };
            let (wo, bo) = if affine {
                (Some(&wd), Some(&bd))
            } else {
                (None, None)
            };
            let want = ops::layer_norm(&x, wr, br, 1e-5).unwrap();
            let got = be.layer_norm(&xd, wo, bo, 1e-5).unwrap();
            run(be, &format!("layer_norm {shape:?}"), tol, &got, &want);
        }
    }

    pub fn attention<B: Backend>(be: &B, tol: Tol) {
        // Self-attention with a tensor-core head size, cross-attention with an odd one.
        for (b, nq, nk, heads, d) in [
            (2usize, 77usize, 77usize, 2usize, 64usize),
            (1, 33, 19, 3, 5),
        ] {
            let (q, qd) = input(be, &[b, nq, heads * d], 16, 1.0);
            let (k, kd) = input(be, &[b, nk, heads * d], 17, 1.0);
            let (v, vd) = input(be, &[b, nk, heads * d], 18, 1.0);
            let want = ops::scaled_dot_product_attention(&q, &k, &v, heads).unwrap();
            let got = be.attention(&qd, &kd, &vd, heads, false).unwrap();
            run(
                be,
                &format!("attention b{b} nq{nq} nk{nk} h{heads} d{d}"),
                tol,
                &got,
                &want,
            );
        }
    }

    /// Causal attention against a direct f64 evaluation (the ops have no mask).
    pub fn causal_attention<B: Backend>(be: &B, tol: Tol) {
        let (b, n, heads, d) = (2usize, 9usize, 2usize, 8usize);
        let c = heads * d;
        let (q, qd) = input(be, &[b, n, c], 19, 1.0);
        let (k, kd) = input(be, &[b, n, c], 20, 1.0);
        let (v, vd) = input(be, &[b, n, c], 21, 1.0);
        let mut want = vec![0.0f32; b * n * c];
        for bi in 0..b {
            for h in 0..heads {
                let at = |t: &Tensor, row: usize, ch: usize| {
                    t.data()[(bi * n + row) * c + h * d + ch] as f64
                };
                for i in 0..n {
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..d).map(|ch| at(&q, i, ch) * at(&k, j, ch)).sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let l: f64 = p.iter().sum();
                    for ch in 0..d {
                        let o: f64 = p.iter().enumerate().map(|(j, pj)| pj * at(&v, j, ch)).sum();
                        want[(bi * n + i) * c + h * d + ch] = (o / l) as f32;
                    }
                }
            }
        }
        let want = Tensor::new([b, n, c], want).unwrap();
        let got = be
            .download(&be.attention(&qd, &kd, &vd, heads, true).unwrap())
            .unwrap();
        // Against f64 no backend is exact: f32 rounding of the CPU GEMM/softmax only.
        let tol = match tol {
            Tol::Exact => Tol::Rel(1e-5),
            t => t,
        };
        check(&format!("{} causal attention", be.name()), tol, &got, &want);
        // Query 0 sees only key 0: its output is v's row 0.
        let row0 = got.narrow(1, 0, 1).unwrap();
        check("causal row 0", tol, &row0, &v.narrow(1, 0, 1).unwrap());
        let (_, kd2) = input(be, &[b, n + 1, c], 20, 1.0);
        assert!(
            be.attention(&qd, &kd2, &kd2, heads, true).is_err(),
            "nq != nk accepted"
        );
    }

    pub fn activations<B: Backend>(be: &B, tol: Tol) {
        let (x, xd) = input(be, &[3, 5, 7], 22, 3.0);
        for act in [
            Activation::Silu,
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::QuickGelu,
        ] {
            let got = be.activation(act, &xd).unwrap();
            run(be, &format!("{act:?}"), tol, &got, &act.forward(&x));
        }
    }

    pub fn geglu<B: Backend>(be: &B, tol: Tol) {
        let (x, xd) = input(be, &[2, 5, 24], 23, 1.0);
        let (w, wd) = input(be, &[2 * 19, 24], 24, 0.3);
        let (b, bd) = input(be, &[2 * 19], 25, 1.0);
        let want = ops::geglu(&x, &w, Some(&b)).unwrap();
        let got = be.geglu(&xd, &wd, Some(&bd)).unwrap();
        run(be, "geglu", tol, &got, &want);
    }

    pub fn add_and_scale<B: Backend>(be: &B, tol: Tol) {
        let (a, ad) = input(be, &[2, 3, 11], 26, 1.0);
        let (b, bd) = input(be, &[2, 3, 11], 27, 1.0);
        run(
            be,
            "add",
            tol,
            &be.add(&ad, &bd).unwrap(),
            &ops::add(&a, &b).unwrap(),
        );
        run(
            be,
            "scale",
            tol,
            &be.scale(&ad, 0.18215).unwrap(),
            &ops::scale(&a, 0.18215),
        );
        let (_, other) = input(be, &[2, 33], 27, 1.0);
        assert!(be.add(&ad, &other).is_err(), "shape mismatch accepted");
    }

    pub fn add_channel_bias<B: Backend>(be: &B, tol: Tol) {
        let (x, xd) = input(be, &[2, 3, 5, 7], 28, 1.0);
        for bs in [vec![3usize], vec![2, 3]] {
            let (b, bd) = input(be, &bs, 29, 1.0);
            let want = ops::add_channel_bias(&x, &b).unwrap();
            let got = be.add_channel_bias(&xd, &bd).unwrap();
            run(be, &format!("add_channel_bias {bs:?}"), tol, &got, &want);
        }
    }

    pub fn upsample_nearest2x<B: Backend>(be: &B, tol: Tol) {
        let (x, xd) = input(be, &[2, 3, 5, 7], 30, 1.0);
        let want = ops::upsample_nearest2x(&x).unwrap();
        run(
            be,
            "upsample",
            tol,
            &be.upsample_nearest2x(&xd).unwrap(),
            &want,
        );
    }

    pub fn cat_channels<B: Backend>(be: &B, tol: Tol) {
        let (a, ad) = input(be, &[2, 3, 5, 7], 31, 1.0);
        let (b, bd) = input(be, &[2, 4, 5, 7], 32, 1.0);
        let want = ops::cat_channels(&[&a, &b]).unwrap();
        run(
            be,
            "cat_channels",
            tol,
            &be.cat_channels(&ad, &bd).unwrap(),
            &want,
        );
        let (_, cd) = input(be, &[2, 4, 5, 6], 32, 1.0);
        assert!(
            be.cat_channels(&ad, &cd).is_err(),
            "spatial mismatch accepted"
        );
    }

    pub fn timestep_embedding<B: Backend>(be: &B, tol: Tol) {
        let ts = [0.0f32, 1.0, 999.0, 500.5];
        for (dim, flip, shift) in [(320usize, true, 0.0f32), (7, false, 1.0)] {
            let want = ops::timestep_embedding(&ts, dim, flip, shift).unwrap();
            // Stored in the backend's type, so compare with the rounded reference.
            let want = randn_like_rounded(&want, be.dtype());
            let got = be.timestep_embedding(&ts, dim, flip, shift).unwrap();
            run(be, &format!("timestep_embedding {dim}"), tol, &got, &want);
        }
    }

    fn randn_like_rounded(t: &Tensor, dtype: DType) -> Tensor {
        let data = t
            .data()
            .iter()
            .map(|&x| match dtype {
                DType::F32 => x,
                DType::F16 => half::f16::from_f32(x).to_f32(),
                DType::BF16 => half::bf16::from_f32(x).to_f32(),
            })
            .collect();
        Tensor::new(t.shape().to_vec(), data).unwrap()
    }

    /// A layer that allocates temporaries, keeps its output, and is repeated: the output is
    /// intact after the release and the stack does not grow with the repetitions.
    pub fn keep_reclaims_temporaries<B: Backend>(be: &B, tol: Tol) {
        let (x, mut xd) = input(be, &[1, 8, 6, 6], 33, 1.0);
        let (w, wd) = input(be, &[8, 8, 3, 3], 34, 0.1);
        let mut want = x;
        for _ in 0..3 {
            let mark = be.mark();
            let h = be.group_norm(&xd, 4, None, None, 1e-6, true).unwrap();
            let h = be.conv2d(&h, &wd, None, Conv2dParams::new(1, 1)).unwrap();
            let out = be.add(&h, &xd).unwrap();
            xd = be.keep(mark, out).unwrap();
            let h = ops::group_norm(&want, 4, None, None, 1e-6, true).unwrap();
            let h = ops::conv2d(&h, &w, None, Conv2dParams::new(1, 1)).unwrap();
            want = ops::add(&h, &want).unwrap();
        }
        run(be, "kept chain", tol, &xd, &want);
        let mark = be.mark();
        let _tmp = be.scale(&xd, 2.0).unwrap();
        be.release(mark).unwrap();
        run(be, "kept after release", tol, &xd, &want);
    }

    /// group_norm+silu -> conv -> add time-embedding bias -> group_norm+silu -> conv -> residual.
    pub fn resnet_chain<B: Backend>(be: &B, tol: Tol) {
        let (x, xd) = input(be, &[2, 8, 7, 9], 35, 1.0);
        let (w1, w1d) = input(be, &[8, 8, 3, 3], 36, 0.1);
        let (w2, w2d) = input(be, &[8, 8, 3, 3], 37, 0.1);
        let (t, td) = input(be, &[2, 8], 38, 1.0);
        let (g, gd) = input(be, &[8], 39, 1.0);
        let p = Conv2dParams::new(1, 1);
        let h = ops::group_norm(&x, 4, Some(&g), None, 1e-6, true).unwrap();
        let h = ops::conv2d(&h, &w1, None, p).unwrap();
        let h = ops::add_channel_bias(&h, &t).unwrap();
        let h = ops::group_norm(&h, 4, None, Some(&g), 1e-6, true).unwrap();
        let h = ops::conv2d(&h, &w2, None, p).unwrap();
        let want = ops::add(&x, &h).unwrap();
        let h = be.group_norm(&xd, 4, Some(&gd), None, 1e-6, true).unwrap();
        let h = be.conv2d(&h, &w1d, None, p).unwrap();
        let h = be.add_channel_bias(&h, &td).unwrap();
        let h = be.group_norm(&h, 4, None, Some(&gd), 1e-6, true).unwrap();
        let h = be.conv2d(&h, &w2d, None, p).unwrap();
        let got = be.add(&xd, &h).unwrap();
        run(be, "resnet chain", tol, &got, &want);
    }
}

/// The layout ops move elements without arithmetic: exact on every backend and storage type
/// (inputs are already rounded to it).
mod layout_bodies {
    use super::*;

    fn input<B: Backend>(be: &B, shape: &[usize], seed: u64) -> (Tensor, B::Tensor) {
        let t = randn(shape, seed, 1.0, be.dtype());
        let d = be.upload(&t).unwrap();
        (t, d)
    }

    fn exact<B: Backend>(be: &B, what: &str, got: &B::Tensor, want: &Tensor) {
        assert_eq!(be.shape(got), want.shape(), "{what}: backend shape");
        let what = format!("{} {what}", be.name());
        check(&what, Tol::Exact, &be.download(got).unwrap(), want);
    }

    pub fn nchw_tokens<B: Backend>(be: &B, _tol: Tol) {
        // Sizes around the 32-wide transpose tiles, and a single pixel.
        for [b, c, h, w] in [[2usize, 5, 3, 7], [2, 40, 5, 13], [1, 64, 1, 1]] {
            let (x, xd) = input(be, &[b, c, h, w], 40);
            let mut want = vec![0.0f32; b * c * h * w];
            for (bi, ci, p) in itertools(b, c, h * w) {
                want[(bi * h * w + p) * c + ci] = x.data()[(bi * c + ci) * h * w + p];
            }
            let want = Tensor::new([b, h * w, c], want).unwrap();
            let tokens = be.nchw_to_tokens(&xd).unwrap();
            exact(
                be,
                &format!("nchw_to_tokens {:?}", x.shape()),
                &tokens,
                &want,
            );
            let back = be.tokens_to_nchw(&tokens, h, w).unwrap();
            exact(be, &format!("tokens_to_nchw {:?}", want.shape()), &back, &x);
            let err = be
                .tokens_to_nchw(&tokens, h + 1, w)
                .unwrap_err()
                .to_string();
            assert!(err.contains("tokens_to_nchw"), "{err}");
        }
        let (_, flat) = input(be, &[2, 3, 4], 41);
        assert!(be.nchw_to_tokens(&flat).is_err(), "rank 3 accepted");
    }

    /// `(i, j, k)` over `0..a × 0..b × 0..c`, row-major.
    fn itertools(a: usize, b: usize, c: usize) -> impl Iterator<Item = (usize, usize, usize)> {
        (0..a).flat_map(move |i| (0..b).flat_map(move |j| (0..c).map(move |k| (i, j, k))))
    }

    pub fn embedding<B: Backend>(be: &B, _tol: Tol) {
        let (v, d) = (11usize, 37usize);
        let (table, td) = input(be, &[v, d], 42);
        let ids = vec![vec![0u32, 3, 10, 3], vec![7, 7, 1, 0]];
        let mut want = Vec::new();
        for &id in ids.iter().flatten() {
            want.extend_from_slice(&table.data()[id as usize * d..(id as usize + 1) * d]);
        }
        let want = Tensor::new([2, 4, d], want).unwrap();
        exact(be, "embedding", &be.embedding(&td, &ids).unwrap(), &want);
        // CLIP's position embedding is the same lookup with ids 0..n.
        let pos: Vec<Vec<u32>> = vec![(0..4).collect(); 2];
        let got = be.download(&be.embedding(&td, &pos).unwrap()).unwrap();
        assert_eq!(got.narrow(0, 1, 1).unwrap().data(), &table.data()[..4 * d]);

        let err = be.embedding(&td, &[vec![1, 11]]).unwrap_err().to_string();
        assert!(
            err.contains("id 11 at [0, 1]") && err.contains("11 rows"),
            "{err}"
        );
        let err = be
            .embedding(&td, &[vec![1, 2], vec![3]])
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 1 has 1 ids"), "{err}");
        let empty = be.embedding(&td, &[]).unwrap();
        assert_eq!(be.shape(&empty), &[0, 0, d]);
    }

    pub fn gather_rows<B: Backend>(be: &B, _tol: Tol) {
        let (b, n, d) = (3usize, 6usize, 37usize);
        let (x, xd) = input(be, &[b, n, d], 43);
        let rows = [5usize, 0, 2];
        let mut want = Vec::new();
        for (bi, &r) in rows.iter().enumerate() {
            let start = (bi * n + r) * d;
            want.extend_from_slice(&x.data()[start..start + d]);
        }
        let want = Tensor::new([b, d], want).unwrap();
        exact(
            be,
            "gather_rows",
            &be.gather_rows(&xd, &rows).unwrap(),
            &want,
        );
        let err = be.gather_rows(&xd, &[5, 6, 0]).unwrap_err().to_string();
        assert!(err.contains("row 6 for batch item 1"), "{err}");
        assert!(be.gather_rows(&xd, &[0, 0]).is_err(), "2 rows for 3 items");
    }

    /// PyTorch's nearest source index, written out: `min(floor(dst * (in / out)), in - 1)` with
    /// the scale and the product in f32 (ATen `nearest_neighbor_compute_source_index`).
    fn torch_nearest(dst: usize, input: usize, output: usize) -> usize {
        let scale = input as f32 / output as f32;
        ((dst as f32 * scale).floor() as usize).min(input - 1)
    }

    pub fn resize_nearest<B: Backend>(be: &B, _tol: Tol) {
        let (x, xd) = input(be, &[1, 2, 14, 5], 44);
        // Source rows / columns of `F.interpolate(x, size=(46, 9), mode="nearest")` on a
        // [1, 2, 14, 5] arange, printed by torch 2.15.0 (CPU). Output row 23 reads input row 6
        // although 23 * 14 / 46 = 7 exactly: the f32 product rounds below 7.
        let rows = [
            0usize, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7,
            8, 8, 8, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 12, 12, 12, 13, 13, 13,
        ];
        let cols = [0usize, 0, 1, 1, 2, 2, 3, 3, 4];
        // Downscaling to (4, 3), same source: rows [0, 3, 7, 10], columns [0, 1, 3].
        for (h, w, rows, cols) in [
            (46, 9, &rows[..], &cols[..]),
            (4, 3, &[0, 3, 7, 10][..], &[0, 1, 3][..]),
        ] {
            let want: Vec<f32> = itertools(2, h, w)
                .map(|(p, i, j)| x.data()[(p * 14 + rows[i]) * 5 + cols[j]])
                .collect();
            let want = Tensor::new([1, 2, h, w], want).unwrap();
            let got = be.resize_nearest(&xd, h, w).unwrap();
            exact(
                be,
                &format!("resize_nearest to {h}x{w} (torch)"),
                &got,
                &want,
            );
        }
        // The formula on more shapes: UNet-style 7 -> 13, up, down, identity, and ×2 against the
        // dedicated upsample op.
        let (y, yd) = input(be, &[2, 3, 7, 5], 45);
        for (h, w) in [(13, 9), (3, 2), (7, 5), (1, 1), (14, 10)] {
            let want: Vec<f32> = itertools(6, h, w)
                .map(|(p, i, j)| {
                    y.data()[(p * 7 + torch_nearest(i, 7, h)) * 5 + torch_nearest(j, 5, w)]
                })
                .collect();
            let want = Tensor::new([2, 3, h, w], want).unwrap();
            let got = be.resize_nearest(&yd, h, w).unwrap();
            exact(be, &format!("resize_nearest 7x5 -> {h}x{w}"), &got, &want);
        }
        let up = ops::upsample_nearest2x(&y).unwrap();
        exact(
            be,
            "resize ×2",
            &be.resize_nearest(&yd, 14, 10).unwrap(),
            &up,
        );
        assert!(be.resize_nearest(&yd, 0, 4).is_err(), "zero size accepted");
    }

    pub fn reshape<B: Backend>(be: &B, _tol: Tol) {
        let (x, xd) = input(be, &[2, 3, 4], 46);
        let r = be.reshape(xd.clone(), &[6, 4]).unwrap();
        exact(be, "reshape", &r, &x.clone().reshape([6, 4]).unwrap());
        let err = be.reshape(xd, &[5, 5]).unwrap_err().to_string();
        assert!(err.contains("[5, 5]") && err.contains("[2, 3, 4]"), "{err}");
    }
}

// ---------------------------------------------------------------------------------------------
// The activation arena (no GPU: it only does address arithmetic).

fn range(ptr: u64, len: u64) -> DeviceRange {
    DeviceRange::new(DevicePtr(ptr), len)
}

#[test]
fn arena_allocates_aligned_and_releases_to_marks() {
    // An unaligned start is rounded up; everything handed out is 256-aligned.
    let a = ActivationArena::new(range(0x1000_0010, 10_000)).unwrap();
    assert_eq!(a.capacity(), 10_000 - (0x100 - 0x10));
    let r1 = a.alloc(100).unwrap();
    assert_eq!((r1.ptr.0 % ARENA_ALIGN, r1.len), (0, 100));
    assert_eq!(r1.ptr.0, 0x1000_0100);
    assert_eq!(a.used(), 256);
    let m = a.mark();
    let r2 = a.alloc(257).unwrap();
    assert_eq!(r2.ptr.0, r1.ptr.0 + 256);
    assert_eq!(a.used(), 256 + 512);
    assert!(a.is_live(r2) && a.is_live(r1));
    a.release(m).unwrap();
    assert!(!a.is_live(r2) && a.is_live(r1));
    assert_eq!(a.used(), 256);
    // The released space is handed out again, at the same address.
    assert_eq!(a.alloc(10).unwrap().ptr, r2.ptr);
    assert_eq!(a.peak(), 768);
    // A zero-byte allocation takes no space.
    let used = a.used();
    assert_eq!(a.alloc(0).unwrap().len, 0);
    assert_eq!(a.used(), used);
    a.reset();
    assert_eq!((a.used(), a.free(), a.peak()), (0, a.capacity(), 768));
    a.reset_peak();
    assert_eq!(a.peak(), 0);
}

#[test]
fn arena_refuses_too_large_and_stale_marks() {
    let a = ActivationArena::new(range(0x2000_0000, 4096)).unwrap();
    a.alloc(1000).unwrap();
    let err = a.alloc(4000).unwrap_err();
    assert_eq!(
        err,
        ArenaError::OutOfMemory {
            asked: 4096,
            free: 4096 - 1024,
            capacity: 4096,
            peak: 1024,
        }
    );
    let msg = err.to_string();
    assert!(
        msg.contains("asked for 4096 bytes") && msg.contains("3072 of 4096 bytes free"),
        "{msg}"
    );
    // A failed allocation changes nothing.
    assert_eq!(a.used(), 1024);
    let inner = a.mark();
    a.alloc(10).unwrap();
    let outer_is_lower = ActivationArena::new(range(0, 0)).unwrap();
    assert_eq!(outer_is_lower.capacity(), 0);
    assert!(outer_is_lower.alloc(1).is_err());
    a.release(inner).unwrap();
    a.reset();
    // Releasing to a mark above the top (already released below it) is refused.
    assert!(matches!(a.release(inner), Err(ArenaError::Invalid(_))));
    assert!(ActivationArena::new(range(u64::MAX - 10, 100)).is_err());
}

// ---------------------------------------------------------------------------------------------
// The CUDA backend in recording mode: launches validated against the PTX, no GPU.

const WS: u64 = 0x7_0000_0000;
const WEIGHTS: u64 = 0x9_0000_0000;

fn buf_args(l: &Launch) -> Vec<(DevicePtr, u64)> {
    l.args
        .iter()
        .filter_map(|a| match a {
            KernelArg::Buf { ptr, bytes } => Some((*ptr, *bytes)),
            _ => None,
        })
        .collect()
}

#[test]
fn recording_backend_runs_a_resnet_chain_within_its_arena() {
    let log = RefCell::new(Vec::new());
    let ws = range(WS, 1 << 20);
    let be = CudaBackend::recording(&log, ws, DType::F16).unwrap();
    let (c, h, w) = (32usize, 8usize, 8usize);
    let wt = |off: u64, shape: &[usize]| {
        let bytes = shape.iter().product::<usize>() as u64 * 2;
        be.weight(range(WEIGHTS + off, bytes), shape.to_vec())
            .unwrap()
    };
    let gamma = wt(0, &[c]);
    let beta = wt(0x1000, &[c]);
    let conv_w = wt(0x2000, &[c, c, 3, 3]);
    let conv_b = wt(0x10_0000, &[c]);
    assert!(!conv_w.is_owned());
    let x = be.upload(&Tensor::zeros([2, c, h, w]).unwrap()).unwrap();
    assert!(x.is_owned());

    let mark = be.mark();
    let n = be
        .group_norm(&x, 8, Some(&gamma), Some(&beta), 1e-6, true)
        .unwrap();
    let y = be
        .conv2d(&n, &conv_w, Some(&conv_b), Conv2dParams::new(1, 1))
        .unwrap();
    let out = be.add(&y, &x).unwrap();
    assert_eq!(out.shape(), &[2, c, h, w]);
    let before_keep = be.arena().used();
    let out = be.keep(mark, out).unwrap();
    // Only x and the kept output remain; the output moved down to the mark.
    let act = (2 * c * h * w * 2) as u64;
    assert_eq!(be.arena().used(), 2 * act);
    assert!(before_keep > be.arena().used());
    assert_eq!(out.buf().ptr, be.arena().addr(mark));

    let log = log.into_inner();
    let funcs: Vec<&str> = log.iter().map(|l| l.func).collect();
    let (gn, conv, add) = (buf_args(&log[0]), buf_args(&log[1]), buf_args(&log[2]));
    assert_eq!(gn[1].0, conv[0].0, "conv input is the norm output");
    assert_eq!(add[0].0, conv[3].0, "add reads the conv output");
    assert_eq!(add[1].0, x.buf().ptr, "add reads the residual");

    assert_eq!(
        &funcs[..3],
        ["ferry_group_norm_f16", "ferry_conv2d_f16", "ferry_add_f16"],
        "{funcs:?}"
    );
    // keep: the output (3rd allocation) does not overlap the mark (1st): one copy.
    assert_eq!(&funcs[3..], ["ferry_scale_f16"], "{funcs:?}");
    let copy = buf_args(&log[3]);
    assert_eq!((copy[0].0, copy[1].0), (add[2].0, out.buf().ptr));
    let weights = range(WEIGHTS, 0x10_0000 + 64);
    for l in &log {
        check_launch_args(l.ptx, l.func, &l.args).unwrap_or_else(|e| panic!("{}: {e}", l.func));
        for (ptr, bytes) in buf_args(l) {
            let r = DeviceRange::new(ptr, bytes);
            let inside = |o: &DeviceRange| r.ptr.0 >= o.ptr.0 && r.end() <= o.end();
            assert!(
                inside(&ws) || inside(&weights),
                "{}: buffer {r} outside the workspace and the weights",
                l.func
            );
            if l.func.contains("scale") {
                assert!(inside(&ws), "{}: copies stay in the arena", l.func);
            }
        }
    }
    // The conv reads the norm's output and the add writes a fresh buffer.
}

#[test]
fn recording_backend_reports_a_small_reserve_and_stale_tensors() {
    let log = RefCell::new(Vec::new());
    let be = CudaBackend::recording(&log, range(WS, 64 << 10), DType::F32).unwrap();
    let x = be.upload(&Tensor::zeros([1, 32, 16, 16]).unwrap()).unwrap(); // 32 KiB
    let err = be.upsample_nearest2x(&x).unwrap_err();
    assert!(matches!(err, Error::Arena(ArenaError::OutOfMemory { .. })));
    let msg = err.to_string();
    assert!(
        msg.contains("asked for 131072 bytes") && msg.contains("reserve"),
        "{msg}"
    );

    let mark = be.mark();
    let tmp = be.scale(&x, 2.0).unwrap();
    be.release(mark).unwrap();
    let err = be.add(&x, &tmp).unwrap_err().to_string();
    assert!(err.contains("freed by a release"), "{err}");
    // Releasing again to an outer mark that is above the top is refused.
    be.arena().reset();
    assert!(be.release(mark).is_err());
    // Wrong storage type and shape errors name what they expected.
    let w32 = CudaTensor::weight(range(WEIGHTS, 1 << 20), DType::F16, [4, 4]).unwrap();
    let y = be.upload(&Tensor::zeros([2, 4]).unwrap()).unwrap();
    let err = be.linear(&y, &w32, None).unwrap_err().to_string();
    assert!(err.contains("F16") && err.contains("F32"), "{err}");
    assert!(CudaTensor::weight(range(WEIGHTS, 10), DType::F16, [4, 4]).is_err());
    assert!(
        be.download(&y).is_err(),
        "a recording backend cannot download"
    );
}

#[test]
fn recording_keep_stages_an_overlapping_output_above_itself() {
    let log = RefCell::new(Vec::new());
    let be = CudaBackend::recording(&log, range(WS, 4096), DType::F32).unwrap();
    let mark = be.mark();
    let _tmp = be.alloc([64]).unwrap();
    let out = be.alloc([256]).unwrap();
    let kept = be.keep(mark, out).unwrap();
    assert_eq!((kept.buf().ptr, be.arena().used()), (DevicePtr(WS), 1024));
    let log = log.into_inner();
    let b: Vec<_> = log.iter().map(buf_args).collect();
    assert_eq!(b.len(), 2, "source -> scratch -> destination");
    let scratch = b[0][1].0;
    assert_eq!((b[0][0].0 .0, scratch.0), (WS + 256, WS + 1280));
    assert_eq!((b[1][0].0, b[1][1].0), (scratch, DevicePtr(WS)));
}

#[test]
fn recording_keep_copies_in_pieces_when_there_is_no_room_to_stage() {
    let log = RefCell::new(Vec::new());
    // Room for a 256-byte temporary and a 1 KiB output, and nothing above.
    let be = CudaBackend::recording(&log, range(WS, 1280), DType::F32).unwrap();
    let mark = be.mark();
    let _tmp = be.alloc([64]).unwrap();
    let out = be.alloc([256]).unwrap();
    let kept = be.keep(mark, out).unwrap();
    assert_eq!(kept.buf().ptr, DevicePtr(WS));
    let log = log.into_inner();
    // 256 elements, 64 apart: four non-overlapping pieces, in order.
    assert_eq!(log.len(), 4);
    for (i, l) in log.iter().enumerate() {
        let b = buf_args(l);
        assert_eq!(b[1].0 .0 + 256, b[0].0 .0, "piece {i}: 64 elements apart");
        assert_eq!(b[1].0 .0, WS + i as u64 * 256, "piece {i}: forward order");
        assert!(b[0].1 <= 256);
    }
}

#[test]
fn recording_backend_layout_ops_launch_as_planned() {
    let log = RefCell::new(Vec::new());
    let ws = range(WS, 1 << 20);
    let be = CudaBackend::recording(&log, ws, DType::F16).unwrap();
    let x = be.upload(&Tensor::zeros([2, 40, 5, 13]).unwrap()).unwrap();
    let tokens = be.nchw_to_tokens(&x).unwrap();
    assert_eq!(tokens.shape(), &[2, 65, 40]);
    let back = be.tokens_to_nchw(&tokens, 5, 13).unwrap();
    assert_eq!(back.shape(), &[2, 40, 5, 13]);

    let (v, d) = (49408usize, 768usize);
    let table_bytes = (v * d * 2) as u64;
    let table = be.weight(range(WEIGHTS, table_bytes), [v, d]).unwrap();
    let ids = vec![vec![49406u32, 1, 49407], vec![49406, 2, 49407]];
    let used = be.arena().used();
    let before = log.borrow().len();
    assert!(be.embedding(&table, &[vec![49408]]).is_err());
    assert_eq!((be.arena().used(), log.borrow().len()), (used, before));
    let emb = be.embedding(&table, &ids).unwrap();
    assert_eq!(emb.shape(), &[2, 3, d]);
    // The staged ids are popped with the launch: only the output stays.
    let out_bytes = (2 * 3 * d * 2) as u64;
    assert_eq!(
        be.arena().used(),
        used + out_bytes.div_ceil(ARENA_ALIGN) * ARENA_ALIGN
    );
    let pooled = be.gather_rows(&emb, &[2, 1]).unwrap();
    assert_eq!(pooled.shape(), &[2, d]);
    let resized = be.resize_nearest(&back, 9, 25).unwrap();
    let flat = be.reshape(resized.clone(), &[80, 225]).unwrap();
    assert_eq!(
        (flat.buf(), flat.shape()),
        (resized.buf(), &[80usize, 225][..])
    );
    assert!(be.reshape(resized, &[80, 224]).is_err());

    let log = log.into_inner();
    let funcs: Vec<&str> = log.iter().map(|l| l.func).collect();
    assert_eq!(
        funcs,
        [
            "ferry_transpose_f16",
            "ferry_transpose_f16",
            "ferry_gather_f16",
            "ferry_gather_f16",
            "ferry_resize_nearest_f16",
        ]
    );
    let scalars = |l: &Launch| -> Vec<KernelArg> {
        l.args
            .iter()
            .filter(|a| !matches!(a, KernelArg::Buf { .. }))
            .cloned()
            .collect()
    };
    use KernelArg::{F32, U32, U64};
    assert_eq!(scalars(&log[0]), [U64(2), U32(40), U32(65)], "b, c, h*w");
    assert_eq!(scalars(&log[1]), [U64(2), U32(65), U32(40)], "b, h*w, c");
    assert_eq!(scalars(&log[2]), [U64(6), U32(768), U32(49408)]);
    // gather_rows: x as a [2*3, d] table, one id per batch item.
    assert_eq!(scalars(&log[3]), [U64(2), U32(768), U32(6)]);
    assert_eq!(
        scalars(&log[4]),
        [
            U64(80),
            U32(5),
            U32(13),
            U32(9),
            U32(25),
            F32(5.0 / 9.0),
            F32(13.0 / 25.0)
        ]
    );
    let gather = buf_args(&log[2]);
    assert_eq!(gather[0].0, DevicePtr(WEIGHTS), "reads the table");
    assert_eq!(gather[1].1, 6 * 4, "six u32 ids");
    assert_eq!(gather[2].0, emb.buf().ptr);
    assert!(
        gather[1].0 .0 >= emb.range().end(),
        "ids staged above the output"
    );
    assert_eq!(
        buf_args(&log[3])[0].0,
        emb.buf().ptr,
        "pooling reads the embedding"
    );
    let weights = range(WEIGHTS, table_bytes);
    for l in &log {
        check_launch_args(l.ptx, l.func, &l.args).unwrap_or_else(|e| panic!("{}: {e}", l.func));
        for (ptr, bytes) in buf_args(l) {
            let r = DeviceRange::new(ptr, bytes);
            let inside = |o: &DeviceRange| r.ptr.0 >= o.ptr.0 && r.end() <= o.end();
            assert!(inside(&ws) || inside(&weights), "{}: {r} outside", l.func);
        }
    }
}

/// Downloads reuse one pinned staging buffer: it is allocated once, grown (to a power of two)
/// only when a download is larger, and never for a download that fits.
#[test]
fn download_staging_is_reused_and_grows_geometrically() {
    use ferry_sd::backend::staging_growth;
    let mib = 1u64 << 20;
    assert_eq!(
        staging_growth(None, 10),
        Some(mib),
        "first download allocates"
    );
    assert_eq!(staging_growth(Some(mib), 10), None);
    assert_eq!(staging_growth(Some(mib), mib), None);
    assert_eq!(staging_growth(Some(mib), mib + 1), Some(2 * mib));
    assert_eq!(staging_growth(Some(2 * mib), 3 * mib), Some(4 * mib));
    assert_eq!(staging_growth(Some(64 * mib), 50 * mib), None);
    // A run of downloads of growing size reallocates a handful of times, not once per call.
    let mut have = None;
    let mut allocs = 0;
    for step in 1..=1000u64 {
        if let Some(size) = staging_growth(have, step * 100_000) {
            have = Some(size);
            allocs += 1;
        }
    }
    assert!(allocs <= 8, "{allocs} allocations for 1000 downloads");
    assert_eq!(staging_growth(None, u64::MAX), Some(u64::MAX));
}
