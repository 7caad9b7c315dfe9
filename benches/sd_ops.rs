//! Benchmarks of ferry-sd's f32 CPU reference ops at Stable Diffusion 1.5 sizes.
//!
//! `cargo bench -p ferry-sd --bench sd_ops`. Throughput is reported in elements/s where one
//! "element" is one floating-point operation (multiply-adds count 2), so Gelem/s reads as GFLOP/s.
//! `FERRY_THREADS=N` sets the thread count of all ops through `ops::set_threads` (default: all
//! cores), like txt2img's `--threads`; `MATMUL_NUM_THREADS`, if set, still sets the GEMM's.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ferry_sd::ops::{self, Conv2dParams};
use ferry_sd::tensor::Tensor;

fn filled(shape: &[usize], seed: u32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed;
    let data = (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect();
    Tensor::new(shape, data).expect("shape matches data")
}

fn bench_ops(c: &mut Criterion) {
    let threads = std::env::var("FERRY_THREADS").map_or(0, |v| v.parse().expect("FERRY_THREADS"));
    ops::set_threads(threads).expect("set_threads before the first op");
    let mut g = c.benchmark_group("sd15");
    g.sample_size(10);

    // UNet down block 0 ResNet conv: 320 -> 320, 3x3, 64x64 latents, batch 2 (CFG).
    let x = filled(&[2, 320, 64, 64], 1);
    let w = filled(&[320, 320, 3, 3], 2);
    let b = filled(&[320], 3);
    g.throughput(Throughput::Elements(2 * 2 * 320 * 320 * 9 * 64 * 64));
    g.bench_function("conv2d_3x3_320_64x64_b2", |bn| {
        bn.iter(|| ops::conv2d(black_box(&x), &w, Some(&b), Conv2dParams::new(1, 1)).unwrap())
    });

    // Downsampler: 320 -> 320, 3x3 stride 2.
    g.throughput(Throughput::Elements(2 * 2 * 320 * 320 * 9 * 32 * 32));
    g.bench_function("conv2d_3x3_s2_320_64x64_b2", |bn| {
        bn.iter(|| ops::conv2d(black_box(&x), &w, Some(&b), Conv2dParams::new(2, 1)).unwrap())
    });

    // Deeper UNet levels and skip concatenations (3x3, pad 1, batch 2), then VAE decoder convs
    // (batch 1): (name, n, c, o, h, w).
    for (name, n, ci, co, h, w) in [
        ("conv2d_3x3_960to320_64x64_b2", 2, 960, 320, 64, 64),
        ("conv2d_3x3_640_32x32_b2", 2, 640, 640, 32, 32),
        ("conv2d_3x3_1280_16x16_b2", 2, 1280, 1280, 16, 16),
        ("conv2d_3x3_2560to1280_8x8_b2", 2, 2560, 1280, 8, 8),
        ("conv2d_3x3_512_64x64_vae", 1, 512, 512, 64, 64),
        ("conv2d_3x3_128_512x512_vae", 1, 128, 128, 512, 512),
        ("conv2d_3x3_128to3_512x512_vae", 1, 128, 3, 512, 512),
    ] {
        let xi = filled(&[n, ci, h, w], 11);
        let wi = filled(&[co, ci, 3, 3], 12);
        let bi = filled(&[co], 13);
        g.throughput(Throughput::Elements((2 * n * co * ci * 9 * h * w) as u64));
        g.bench_function(name, |bn| {
            bn.iter(|| {
                ops::conv2d(black_box(&xi), &wi, Some(&bi), Conv2dParams::new(1, 1)).unwrap()
            })
        });
    }

    // ResNet shortcut / proj_in 1x1 conv on a skip concatenation: 960 -> 320 at 64x64, batch 2.
    let x1 = filled(&[2, 960, 64, 64], 14);
    let w1 = filled(&[320, 960, 1, 1], 15);
    g.throughput(Throughput::Elements(2 * 2 * 320 * 960 * 64 * 64));
    g.bench_function("conv2d_1x1_960to320_64x64_b2", |bn| {
        bn.iter(|| ops::conv2d(black_box(&x1), &w1, Some(&b), Conv2dParams::default()).unwrap())
    });

    // Transformer projection at 64x64: [4096, 320] · [320, 320]ᵀ.
    let xs = filled(&[1, 4096, 320], 4);
    let wl = filled(&[320, 320], 5);
    g.throughput(Throughput::Elements(2 * 4096 * 320 * 320));
    g.bench_function("linear_4096x320x320", |bn| {
        bn.iter(|| ops::linear(black_box(&xs), &wl, Some(&b)).unwrap())
    });

    // GEGLU projection (320 -> 2x1280) and feed-forward output (1280 -> 320) at 64x64.
    for (name, m, k, n) in [
        ("linear_4096x320x2560", 4096, 320, 2560),
        ("linear_4096x1280x320", 4096, 1280, 320),
    ] {
        let xl = filled(&[1, m, k], 16);
        let wl = filled(&[n, k], 17);
        let bl = filled(&[n], 18);
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        g.bench_function(name, |bn| {
            bn.iter(|| ops::linear(black_box(&xl), &wl, Some(&bl)).unwrap())
        });
    }

    // Self-attention at 64x64: 4096 tokens, 8 heads of 40, batch 1 (QKᵀ and PV GEMMs).
    let q = filled(&[1, 4096, 320], 6);
    let k = filled(&[1, 4096, 320], 7);
    g.throughput(Throughput::Elements(2 * 2 * 4096 * 4096 * 320));
    g.bench_function("attention_4096_8x40_b1", |bn| {
        bn.iter(|| ops::scaled_dot_product_attention(black_box(&q), &k, &k, 8).unwrap())
    });

    // Other attention shapes: the UNet's batch of 2 (CFG) at 64x64, SD 2.x/SDXL heads of 64 at
    // 4096 tokens, SD 1.5 at 32x32 (1024 tokens, heads of 80) and 16x16 (256 tokens, heads of
    // 160), cross-attention to 77 text tokens, and the VAE mid-block (one head of 512 channels
    // at 64x64 latents).
    for (name, b, nq, nk, heads, d) in [
        ("attention_4096_8x40_b2", 2, 4096, 4096, 8, 40),
        ("attention_4096_5x64_b1", 1, 4096, 4096, 5, 64),
        ("attention_1024_8x80_b2", 2, 1024, 1024, 8, 80),
        ("attention_256_8x160_b2", 2, 256, 256, 8, 160),
        ("attention_cross_4096x77_8x40_b2", 2, 4096, 77, 8, 40),
        ("attention_cross_1024x77_8x80_b2", 2, 1024, 77, 8, 80),
        ("attention_vae_4096_1x512_b1", 1, 4096, 4096, 1, 512),
    ] {
        let q = filled(&[b, nq, heads * d], 9);
        let k = filled(&[b, nk, heads * d], 10);
        g.throughput(Throughput::Elements(
            (2 * 2 * b * nq * nk * heads * d) as u64,
        ));
        g.bench_function(name, |bn| {
            bn.iter(|| ops::scaled_dot_product_attention(black_box(&q), &k, &k, heads).unwrap())
        });
    }

    // The softmax inside that attention, one band: 1024 query rows x 4096 keys.
    let scores = filled(&[1024, 4096], 8);
    g.throughput(Throughput::Elements(scores.numel() as u64));
    g.bench_function("softmax_1024x4096", |bn| {
        bn.iter(|| ops::softmax_last_dim(black_box(&scores)).unwrap())
    });

    // GroupNorm(32) + SiLU on the same activation (memory-bound: elements, not FLOPs).
    g.throughput(Throughput::Elements(x.numel() as u64));
    g.bench_function("group_norm_silu_320_64x64_b2", |bn| {
        bn.iter(|| ops::group_norm(black_box(&x), 32, Some(&b), Some(&b), 1e-5, true).unwrap())
    });

    // LayerNorm before a transformer block at 64x64: [2, 4096, 320] rows of 320.
    let s = filled(&[2, 4096, 320], 9);
    g.throughput(Throughput::Elements(s.numel() as u64));
    g.bench_function("layer_norm_4096x320_b2", |bn| {
        bn.iter(|| ops::layer_norm(black_box(&s), Some(&b), Some(&b), 1e-5).unwrap())
    });

    // GEGLU's gate at 64x64 (the feed-forward's 2 x 1280 projection): erf-GELU per element.
    let h = filled(&[2, 4096, 2560], 10);
    g.throughput(Throughput::Elements(h.numel() as u64 / 2));
    g.bench_function("geglu_gate_4096x1280_b2", |bn| {
        bn.iter(|| ops::geglu_gate(black_box(&h)).unwrap())
    });

    // A residual add on the ResNet activation.
    g.throughput(Throughput::Elements(x.numel() as u64));
    g.bench_function("add_320_64x64_b2", |bn| {
        bn.iter(|| ops::add(black_box(&x), &x).unwrap())
    });
    g.finish();
}

/// GEGLU (fused projection + gate, and the unfused pair it replaces) and the layout permutes.
/// The old element-wise loops are timed side by side with the new ones by the ignored
/// `perf_*` unit tests (`cargo test -p ferry-sd --release --lib -- --ignored --nocapture perf_`).
fn bench_elementwise(c: &mut Criterion) {
    let threads = std::env::var("FERRY_THREADS").map_or(0, |v| v.parse().expect("FERRY_THREADS"));
    // Repeating the count bench_ops set is fine; a different one is a bug.
    ops::set_threads(threads).expect("set_threads before the first op");
    let mut g = c.benchmark_group("sd15_ew");
    g.sample_size(10);

    // GEGLU at 64x64 and 32x32 (batch 2): x [rows, in] · W [2f, in]ᵀ, then hidden * gelu(gate).
    for (name, rows, k, f) in [
        ("geglu_8192x320x1280", 8192, 320, 1280),
        ("geglu_2048x640x2560", 2048, 640, 2560),
    ] {
        let x = filled(&[rows, k], 21);
        let w = filled(&[2 * f, k], 22);
        let b = filled(&[2 * f], 23);
        g.throughput(Throughput::Elements((2 * rows * k * 2 * f) as u64));
        g.bench_function(format!("{name}_fused"), |bn| {
            bn.iter(|| ops::geglu(black_box(&x), &w, Some(&b)).unwrap())
        });
        g.bench_function(format!("{name}_linear_then_gate"), |bn| {
            bn.iter(|| ops::geglu_gate(&ops::linear(black_box(&x), &w, Some(&b)).unwrap()).unwrap())
        });
    }

    // nchw_to_tokens / tokens_to_nchw at 64x64, 320 channels, batch 2.
    let x = filled(&[2, 320, 64, 64], 24);
    let t = filled(&[2, 4096, 320], 25);
    g.throughput(Throughput::Elements(x.numel() as u64));
    g.bench_function("nchw_to_tokens_320_64x64_b2", |bn| {
        bn.iter(|| black_box(&x).permute(&[0, 2, 3, 1]).unwrap())
    });
    g.bench_function("tokens_to_nchw_4096x320_b2", |bn| {
        bn.iter(|| black_box(&t).transpose(1, 2).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench_ops);
criterion_group!(ew_benches, bench_elementwise);
criterion_main!(benches, ew_benches);
