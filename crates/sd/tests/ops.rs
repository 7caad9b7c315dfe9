//! The CPU reference ops against PyTorch / diffusers / transformers goldens
//! (tests/fixtures/ops, written by scripts/fixtures/ops_goldens.py).

use ferry_sd::ops::{self, Activation, Conv2dParams};
use ferry_sd::tensor::{DType, OpError, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::sync::OnceLock;

/// Tolerance for GEMM-based ops (summation order differs from PyTorch's):
/// max |ours - torch| <= TOL * max |torch|. Measured: <= 3.6e-7.
const TOL: f32 = 1e-5;
/// Tolerance for point-wise and row-wise ops (measured <= 1.6e-7: an ulp or so).
const TIGHT: f32 = 1e-6;

struct Goldens {
    bytes: Vec<u8>,
    params: Value,
}

fn goldens() -> &'static Goldens {
    static G: OnceLock<Goldens> = OnceLock::new();
    G.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/ops");
        let bytes = std::fs::read(format!("{dir}/ops.safetensors")).expect("read ops.safetensors");
        let json = std::fs::read_to_string(format!("{dir}/ops.json")).expect("read ops.json");
        Goldens {
            bytes,
            params: serde_json::from_str(&json).expect("parse ops.json"),
        }
    })
}

fn raw(name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
    let st = SafeTensors::deserialize(&goldens().bytes).expect("parse safetensors");
    let view = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("golden {name}: {e}"));
    (view.dtype(), view.shape().to_vec(), view.data().to_vec())
}

fn t(name: &str) -> Tensor {
    let (dtype, shape, data) = raw(name);
    let dt = match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        other => panic!("golden {name}: unexpected dtype {other:?}"),
    };
    Tensor::from_bytes(&data, dt, shape).expect("decode golden")
}

fn has(name: &str) -> bool {
    SafeTensors::deserialize(&goldens().bytes)
        .expect("parse safetensors")
        .tensor(name)
        .is_ok()
}

fn param(case: &str) -> &'static Value {
    &goldens().params[case]
}

#[track_caller]
fn check_tol(what: &str, ours: &Tensor, reference: &Tensor, tol: f32) {
    assert_eq!(ours.shape(), reference.shape(), "{what}: shape");
    // An infinity on either side would make `diff <= tol * scale` read `inf <= inf`.
    for (side, t) in [("output", ours), ("reference", reference)] {
        if let Some((i, v)) = t.first_non_finite() {
            panic!("{what}: the {side} is not finite (element {i} is {v})");
        }
    }
    let diff = ours.max_abs_diff(reference).expect("shapes match");
    let scale = reference.max_abs().max(f32::MIN_POSITIVE);
    assert!(
        diff <= tol * scale,
        "{what}: max |diff| {diff:e} > {tol:e} * max |ref| {scale:e} (rel {:e})",
        diff / scale
    );
}

#[track_caller]
fn check(what: &str, ours: &Tensor, reference: &Tensor) {
    check_tol(what, ours, reference, TOL);
}

#[test]
fn check_rejects_nan_and_inf_in_output_or_reference() {
    let reference = t("softmax.out");
    check("itself", &reference, &reference);
    let n = reference.numel();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for at in [0, n / 2, n - 1] {
            let mut d = reference.data().to_vec();
            d[at] = bad;
            let planted = Tensor::new(reference.shape().to_vec(), d).unwrap();
            for (o, r) in [
                (&planted, &reference),
                (&reference, &planted),
                (&planted, &planted),
            ] {
                let res = std::panic::catch_unwind(|| check_tol("planted", o, r, 1.0));
                assert!(res.is_err(), "{bad} at {at} accepted");
            }
        }
    }
}

fn opt(name: &str) -> Option<Tensor> {
    has(name).then(|| t(name))
}

#[test]
fn linear_matches_torch() {
    for case in ["linear_3d", "linear_2d_nobias", "linear_wide"] {
        let b = opt(&format!("{case}.bias"));
        let out = ops::linear(
            &t(&format!("{case}.x")),
            &t(&format!("{case}.weight")),
            b.as_ref(),
        )
        .unwrap();
        check(case, &out, &t(&format!("{case}.out")));
    }
}

#[test]
fn matmul_matches_torch() {
    for case in ["matmul", "bmm", "matmul_4d"] {
        let out = ops::matmul(&t(&format!("{case}.a")), &t(&format!("{case}.b"))).unwrap();
        check(case, &out, &t(&format!("{case}.out")));
    }
    // A 2-d right operand is shared by every batch.
    let a = t("bmm.a");
    let b2 = t("bmm.b")
        .narrow(0, 1, 1)
        .unwrap()
        .reshape([29, 17])
        .unwrap();
    let shared = ops::matmul(&a, &b2).unwrap();
    let second = ops::matmul(
        &a.narrow(0, 1, 1).unwrap(),
        &t("bmm.b").narrow(0, 1, 1).unwrap(),
    );
    check(
        "matmul shared rhs",
        &shared.narrow(0, 1, 1).unwrap(),
        &second.unwrap(),
    );
}

#[test]
fn conv2d_matches_torch() {
    for case in [
        "conv3x3",
        "conv1x1",
        "conv3x3_s2",
        "conv3x3_s2_asym",
        "conv5x3_nobias",
        "conv3x3_wide",
    ] {
        let p = param(case);
        let s: Vec<usize> = p["stride"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let pad: Vec<usize> = p["padding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let params = Conv2dParams {
            stride: (s[0], s[1]),
            padding: [pad[0], pad[1], pad[2], pad[3]],
        };
        let b = opt(&format!("{case}.bias"));
        let out = ops::conv2d(
            &t(&format!("{case}.x")),
            &t(&format!("{case}.weight")),
            b.as_ref(),
            params,
        )
        .unwrap();
        check(case, &out, &t(&format!("{case}.out")));
    }
}

#[test]
fn group_norm_matches_torch() {
    for case in [
        "group_norm",
        "group_norm_silu",
        "group_norm_noaffine",
        "group_norm_3d",
    ] {
        let p = param(case);
        let (w, b) = (opt(&format!("{case}.weight")), opt(&format!("{case}.bias")));
        let out = ops::group_norm(
            &t(&format!("{case}.x")),
            p["groups"].as_u64().unwrap() as usize,
            w.as_ref(),
            b.as_ref(),
            p["eps"].as_f64().unwrap() as f32,
            p["silu"].as_bool().unwrap(),
        )
        .unwrap();
        check_tol(case, &out, &t(&format!("{case}.out")), TIGHT);
    }
}

#[test]
fn layer_norm_matches_torch() {
    let out = ops::layer_norm(
        &t("layer_norm.x"),
        Some(&t("layer_norm.weight")),
        Some(&t("layer_norm.bias")),
        param("layer_norm")["eps"].as_f64().unwrap() as f32,
    )
    .unwrap();
    check_tol("layer_norm", &out, &t("layer_norm.out"), TIGHT);
}

#[test]
fn softmax_matches_torch() {
    let out = ops::softmax_last_dim(&t("softmax.x")).unwrap();
    check_tol("softmax", &out, &t("softmax.out"), TIGHT);
    let rows: Vec<f32> = out
        .data()
        .chunks(19)
        .map(|r| r.iter().sum::<f32>())
        .collect();
    assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-6), "{rows:?}");
}

#[test]
fn attention_matches_torch() {
    for case in ["attn_self", "attn_cross", "attn_one_head"] {
        let heads = param(case)["heads"].as_u64().unwrap() as usize;
        let out = ops::scaled_dot_product_attention(
            &t(&format!("{case}.q")),
            &t(&format!("{case}.k")),
            &t(&format!("{case}.v")),
            heads,
        )
        .unwrap();
        check(case, &out, &t(&format!("{case}.out")));
    }
}

#[test]
fn activations_match_torch() {
    let x = t("act.x");
    check_tol("gelu", &ops::gelu(&x), &t("act.gelu"), TIGHT);
    check_tol("gelu_tanh", &ops::gelu_tanh(&x), &t("act.gelu_tanh"), TIGHT);
    check_tol(
        "quick_gelu",
        &ops::quick_gelu(&x),
        &t("act.quick_gelu"),
        TIGHT,
    );
    check_tol("silu", &ops::silu(&x), &t("act.silu"), TIGHT);
    check_tol("sigmoid", &ops::sigmoid(&x), &t("act.sigmoid"), TIGHT);
    assert_eq!(Activation::Silu.forward(&x), ops::silu(&x));
}

#[test]
fn geglu_matches_diffusers() {
    let out = ops::geglu(&t("geglu.x"), &t("geglu.weight"), Some(&t("geglu.bias"))).unwrap();
    check("geglu", &out, &t("geglu.out"));
}

#[test]
fn upsample_matches_torch() {
    let out = ops::upsample_nearest2x(&t("upsample.x")).unwrap();
    assert_eq!(
        out,
        t("upsample.out"),
        "nearest upsampling is a copy: exact"
    );
}

#[test]
fn timestep_embedding_matches_diffusers() {
    // PyTorch's vectorised f32 `exp` is 1 ulp off the correctly rounded value for a few
    // frequencies (3 of 160 for SD's dim 320); ours is correctly rounded. The argument t * freq
    // then differs by up to |t| * 2^-23, which sin/cos pass through. So allow exactly that per row
    // (5.9e-5 at t = 999) and nothing more.
    for case in ["temb_sd", "temb_odd", "temb_sdxl_time_ids"] {
        let p = param(case);
        let dim = p["dim"].as_u64().unwrap() as usize;
        let ts = t(&format!("{case}.t"));
        let out = ops::timestep_embedding(
            ts.data(),
            dim,
            p["flip_sin_to_cos"].as_bool().unwrap(),
            p["downscale_freq_shift"].as_f64().unwrap() as f32,
        )
        .unwrap();
        let reference = t(&format!("{case}.out"));
        assert_eq!(out.shape(), reference.shape(), "{case}: shape");
        for (i, &tv) in ts.data().iter().enumerate() {
            let row = |x: &Tensor| x.narrow(0, i, 1).unwrap();
            let diff = row(&out).max_abs_diff(&row(&reference)).unwrap();
            let bound = tv.abs() * 2f32.powi(-23) + 1e-6;
            assert!(
                diff <= bound,
                "{case} t={tv}: max |diff| {diff:e} > {bound:e}"
            );
        }
        if dim % 2 == 1 {
            let last: Vec<f32> = out
                .data()
                .iter()
                .skip(dim - 1)
                .step_by(dim)
                .copied()
                .collect();
            assert!(
                last.iter().all(|&v| v == 0.0),
                "{case}: odd dim pads a zero column"
            );
        }
    }
}

#[test]
fn shape_ops_match_torch() {
    let out = ops::cat_channels(&[&t("cat_channels.a"), &t("cat_channels.b")]).unwrap();
    assert_eq!(out, t("cat_channels.out"));
    let out = t("permute.x").permute(&[0, 2, 3, 1]).unwrap();
    assert_eq!(out, t("permute.nhwc"));
    let out = t("narrow.x").narrow(2, 3, 4).unwrap();
    assert_eq!(out, t("narrow.out"));
    let out = ops::add_channel_bias(&t("add_channel.x"), &t("add_channel.b")).unwrap();
    assert_eq!(out, t("add_channel.out"), "one f32 add per element: exact");
    check_tol(
        "mean dim1",
        &ops::mean_dim(&t("mean.x"), 1).unwrap(),
        &t("mean.dim1"),
        TIGHT,
    );
    check_tol(
        "mean dim2",
        &ops::mean_dim(&t("mean.x"), 2).unwrap(),
        &t("mean.dim2"),
        TIGHT,
    );
}

#[test]
fn half_precision_decoding_matches_torch() {
    // Exact: every f16/bf16 value is representable in f32.
    assert_eq!(t("dtype.f16"), t("dtype.f16_as_f32"));
    assert_eq!(t("dtype.bf16"), t("dtype.bf16_as_f32"));
    let (dtype, shape, _) = raw("dtype.f16");
    assert_eq!((dtype, shape), (Dtype::F16, vec![5, 7]));
}

#[test]
fn results_are_bit_identical_across_runs() {
    let x = t("conv3x3_wide.x");
    let w = t("conv3x3_wide.weight");
    let a = ops::conv2d(&x, &w, None, Conv2dParams::new(1, 1)).unwrap();
    let b = ops::conv2d(&x, &w, None, Conv2dParams::new(1, 1)).unwrap();
    assert_eq!(a.data(), b.data());
}

fn expect_shape_err(r: Result<Tensor, OpError>, needle: &str) {
    match r {
        Err(e @ OpError::Shape { .. }) => {
            assert!(
                e.to_string().contains(needle),
                "message {e:?} lacks {needle:?}"
            )
        }
        other => panic!("expected a shape error containing {needle:?}, got {other:?}"),
    }
}

#[test]
fn shape_mismatches_are_errors() {
    let x = Tensor::zeros([2, 5, 37]).unwrap();
    let w = Tensor::zeros([23, 36]).unwrap();
    expect_shape_err(ops::linear(&x, &w, None), "input [..., 36]");
    let w = Tensor::zeros([23, 37]).unwrap();
    let b = Tensor::zeros([22]).unwrap();
    expect_shape_err(ops::linear(&x, &w, Some(&b)), "[23]");

    let img = Tensor::zeros([1, 4, 8, 8]).unwrap();
    let cw = Tensor::zeros([6, 3, 3, 3]).unwrap();
    expect_shape_err(
        ops::conv2d(&img, &cw, None, Conv2dParams::new(1, 1)),
        "weight [out, 4, kh, kw]",
    );
    let tiny = Tensor::zeros([1, 3, 1, 1]).unwrap();
    expect_shape_err(
        ops::conv2d(&tiny, &cw, None, Conv2dParams::new(1, 0)),
        "padded input 1x1",
    );
    expect_shape_err(ops::conv2d(&x, &cw, None, Conv2dParams::new(1, 1)), "4-d");

    let q = Tensor::zeros([2, 9, 24]).unwrap();
    let k = Tensor::zeros([2, 7, 20]).unwrap();
    expect_shape_err(
        ops::scaled_dot_product_attention(&q, &k, &k, 4),
        "k [b, nk, 4*d]",
    );
    expect_shape_err(ops::matmul(&q, &k), "a [..., m, k]");
    expect_shape_err(
        Tensor::concat(&[&q, &k], 1),
        "shapes equal to [2, 9, 24] except in dim 1",
    );
    expect_shape_err(q.clone().reshape([5, 5]), "432 elements");
    expect_shape_err(
        ops::add(&q, &Tensor::zeros([2, 9, 23]).unwrap()),
        "[2, 9, 24]",
    );
    expect_shape_err(ops::geglu_gate(&Tensor::zeros([2, 3]).unwrap()), "2*f");

    match ops::group_norm(&img, 3, None, None, 1e-5, false) {
        Err(OpError::Invalid { msg, .. }) => assert!(msg.contains("3 groups"), "{msg}"),
        other => panic!("expected invalid-argument error, got {other:?}"),
    }
}

/// Bits of a conv + attention big enough for the GEMM to use several threads, and of the
/// element-wise, norm and resampling ops on tensors big enough to be split over threads.
fn threaded_workload_digest() -> u64 {
    let mk = |shape: &[usize], seed: u64| {
        let n: usize = shape.iter().product();
        let data = (0..n as u64)
            .map(|i| ((i * 2_654_435_761 + seed) % 1999) as f32 / 1000.0 - 1.0)
            .collect();
        Tensor::new(shape, data).unwrap()
    };
    let x = mk(&[2, 64, 32, 32], 1);
    let w = mk(&[96, 64, 3, 3], 2);
    let y = ops::conv2d(&x, &w, None, Conv2dParams::new(1, 1)).unwrap();
    let q = y
        .clone()
        .reshape([2, 96, 1024])
        .unwrap()
        .permute(&[0, 2, 1])
        .unwrap();
    let a = ops::scaled_dot_product_attention(&q, &q, &q, 4).unwrap();
    let (g, b) = (mk(&[96], 3), mk(&[96], 4));
    let mut outs = vec![
        a,
        ops::group_norm(&y, 8, Some(&g), Some(&b), 1e-5, true).unwrap(),
        ops::group_norm(&y, 8, None, None, 1e-5, false).unwrap(),
        ops::layer_norm(&q, Some(&g), Some(&b), 1e-5).unwrap(),
        ops::gelu(&y),
        ops::gelu_tanh(&y),
        ops::quick_gelu(&y),
        ops::silu(&y),
        ops::sigmoid(&y),
        ops::geglu_gate(&q).unwrap(),
        ops::add(&y, &y).unwrap(),
        ops::mul(&y, &y).unwrap(),
        ops::scale(&y, 0.3),
        ops::add_channel_bias(&y, &mk(&[2, 96], 5)).unwrap(),
        ops::upsample_nearest2x(&y).unwrap(),
        ops::resize_nearest(&y, 45, 50).unwrap(),
        ops::mean_dim(&q, 1).unwrap(),
        ops::cat_channels(&[&y, &y]).unwrap(),
    ];
    let mut acc = y.clone();
    ops::add_assign(&mut acc, &outs[1]).unwrap();
    outs.push(acc);
    // FNV-1a over the raw bits.
    outs.iter()
        .flat_map(|t| t.data())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
            (h ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3)
        })
}

/// Run by `results_do_not_depend_on_thread_count` in child processes.
#[test]
#[ignore = "helper: run as a child process with MATMUL_NUM_THREADS set"]
fn print_threaded_workload_digest() {
    if let Ok(n) = std::env::var("FERRY_TEST_THREADS") {
        ops::set_threads(n.parse().unwrap()).unwrap();
        assert_eq!(ops::num_threads(), n.parse::<usize>().unwrap());
    }
    println!("DIGEST {:016x}", threaded_workload_digest());
}

#[test]
fn results_do_not_depend_on_thread_count() {
    // The thread count is fixed once per process (matrixmultiply reads MATMUL_NUM_THREADS once),
    // so compare child processes; each sets the ops' and the GEMM's count.
    let exe = std::env::current_exe().unwrap();
    let digest = |threads: &str| {
        let out = std::process::Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "print_threaded_workload_digest",
                "--nocapture",
            ])
            .env("MATMUL_NUM_THREADS", threads)
            .env("FERRY_TEST_THREADS", threads)
            .output()
            .expect("run test binary");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("DIGEST ").map(str::to_owned))
            .unwrap_or_else(|| panic!("no digest from child: {text}"))
    };
    let one = digest("1");
    assert_eq!(one, digest("2"), "1 vs 2 GEMM threads");
    assert_eq!(one, digest("4"), "1 vs 4 GEMM threads");
    assert_eq!(one, digest("3"), "1 vs 3 threads");
    assert_eq!(one, format!("{:016x}", threaded_workload_digest()));
}

#[test]
fn set_threads_after_the_first_op_is_refused() {
    let n = ops::num_threads();
    assert!(n >= 1);
    assert_eq!(ops::set_threads(n), Ok(()));
    let err = ops::set_threads(n + 1).unwrap_err();
    assert_eq!((err.current, err.requested), (n, n + 1));
    assert!(err.to_string().contains("before the first op"), "{err}");
    assert_eq!(ops::num_threads(), n);
}
