//! One full-size SD 1.5 UNet step on the CPU (batch 2 as with classifier-free guidance, 64×64
//! latents, 77-token context), with random fp16 weights generated on the fly and paged through
//! the executor on the simulated device.
//!
//! `cargo bench -p ferry-sd --bench sd_unet`. Environment: `FERRY_BENCH_STEPS` (timed steps per
//! mode, default 2), `FERRY_BENCH_MODES` (comma-separated `none`, `sequential`; default both),
//! `MATMUL_NUM_THREADS` (GEMM threads). Takes ~1.7 GB of host memory for the weights, plus as
//! much again of simulated device memory in mode `none`.

use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::host::HostStore;
use ferry_pager::weights::DType;
use ferry_pager::Device;
use ferry_sched::Mode;
use ferry_sd::exec::{ExecConfig, Executor};
use ferry_sd::models::unet::{UNet2DConditionModel, UNetConfig};
use ferry_sd::tensor::Tensor;
use std::sync::Arc;
use std::time::Instant;

/// `runwayml/stable-diffusion-v1-5` `unet/config.json` (diffusers 0.6 era keys; the rest default).
const SD15_UNET_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.6.0",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": [
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D"
  ],
  "downsample_padding": 1,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "out_channels": 4,
  "sample_size": 64,
  "up_block_types": [
    "UpBlock2D",
    "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D"
  ]
}"#;

/// A small deterministic generator (splitmix64) for weights and inputs.
struct Rng(u64);

impl Rng {
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn tensor(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    Tensor::new(shape, (0..n).map(|_| rng.next()).collect()).expect("shape matches data")
}

/// Registers every weight the config implies as fp16: norm weights near 1, other weights
/// uniform with std ~1/sqrt(fan_in) (PyTorch-like init keeps activations finite), biases small.
fn register_weights(store: &HostStore, unet: &UNet2DConditionModel) -> u64 {
    let mut rng = Rng(0x5D15);
    let mut bytes = 0u64;
    for (name, shape) in unet.weight_shapes() {
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
            .register_bytes(&format!("unet.{name}"), DType::F16, &shape, &data)
            .expect("register weight");
        bytes += data.len() as u64;
    }
    bytes
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it, and
    // a minute-long step does not belong in the test suite.
    if !std::env::args().any(|a| a == "--bench") {
        println!("sd_unet: skipped (run it with `cargo bench -p ferry-sd --bench sd_unet`)");
        return;
    }
    let steps: usize = std::env::var("FERRY_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let modes = std::env::var("FERRY_BENCH_MODES").unwrap_or_else(|_| "none,sequential".into());

    let unet = UNet2DConditionModel::new(UNetConfig::from_json(SD15_UNET_CONFIG).expect("config"))
        .expect("model");
    let dev = SimDevice::new(SimConfig::default());
    let store = HostStore::new(dev.clone() as Arc<dyn Device>);
    let t0 = Instant::now();
    let bytes = register_weights(&store, &unet);
    println!(
        "sd15 unet: {} weights, {:.3} GB fp16, {} groups, generated in {:.1} s",
        unet.weight_shapes().len(),
        bytes as f64 / 1e9,
        unet.group_prefixes().len(),
        t0.elapsed().as_secs_f64()
    );

    let mut rng = Rng(42);
    let sample = tensor(&[2, 4, 64, 64], &mut rng);
    let context = tensor(&[2, 77, 768], &mut rng);
    let groups = [unet.groups()];
    for mode_name in modes.split(',') {
        let mode = match mode_name.trim() {
            "none" => Mode::None,
            "sequential" => Mode::Sequential,
            other => panic!("FERRY_BENCH_MODES: unknown mode {other:?} (none, sequential)"),
        };
        let reserve = 1 << 20;
        let budget = match mode {
            Mode::None => None,
            _ => Some(Executor::minimum_budget(&store, &groups, mode, reserve).expect("budget")),
        };
        let cfg = ExecConfig {
            mode,
            budget,
            reserve,
            ..ExecConfig::default()
        };
        let exec = Executor::new(dev.clone(), &store, &groups, cfg).expect("executor");
        let mut last = None;
        for step in 0..steps {
            let t = Instant::now();
            let out = unet
                .forward(&exec, &sample, &[500.0], &context, None)
                .expect("forward");
            let secs = t.elapsed().as_secs_f64();
            assert!(
                out.data().iter().all(|v| v.is_finite()),
                "non-finite output"
            );
            println!(
                "mode {mode_name}: budget {}, step {step}: {secs:.2} s (out max |x| {:.3})",
                budget.map_or("all resident".to_string(), |b| format!(
                    "{:.1} MB",
                    b as f64 / 1e6
                )),
                out.max_abs()
            );
            if let Some(prev) = &last {
                assert!(&out == prev, "step outputs differ");
            }
            last = Some(out);
        }
    }
}
