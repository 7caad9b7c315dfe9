//! One full-size SD 1.5 UNet step on the CPU (batch 2 as with classifier-free guidance, 64×64
//! latents, 77-token context), with random fp16 weights generated on the fly and paged through
//! the executor on the simulated device.
//!
//! The same weights (written as a diffusers folder in a temp dir) and inputs (`.npy`) then go to
//! diffusers' `UNet2DConditionModel` in PyTorch fp32 with the same thread count, in a child process
//! (`scripts/cpu-bench/torch_step.py`); the bench prints both step times, the ratio, both peak RSS
//! and the largest difference between the two outputs.
//!
//! `cargo bench -p ferry-sd --bench sd_unet`. Environment: `FERRY_BENCH_STEPS` (timed steps per
//! side and mode, default 2; the first is cold), `FERRY_BENCH_MODES` (comma-separated `none`,
//! `sequential`; default `none`), `MATMUL_NUM_THREADS` (threads, both sides),
//! `FERRY_BENCH_PYTHON` (default `python3`; PyTorch is skipped when torch/diffusers do not import),
//! `FERRY_BENCH_TORCH=0` (skip PyTorch), `FERRY_BENCH_TMP` (where the 1.7 GB folder goes),
//! `FERRY_OP_PROFILE=1` (per-op times of each step). Takes
//! ~1.7 GB of host memory for the weights, plus as much again of simulated device memory in mode
//! `none`; the PyTorch child peaks at ~4.3 GB.

#[path = "sd_cpu_common.rs"]
mod common;

use common::{Rng, RssWindow};
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::host::HostStore;
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

/// Keeps freed activation memory for reuse (see `ferry_sd::allocator`).
#[global_allocator]
static GLOBAL: ferry_sd::allocator::MiMalloc = ferry_sd::allocator::MiMalloc;

fn main() {
    ferry_sd::allocator::keep_freed_memory();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it, and
    // a minute-long step does not belong in the test suite.
    if !std::env::args().any(|a| a == "--bench") {
        println!("sd_unet: skipped (run it with `cargo bench -p ferry-sd --bench sd_unet`)");
        return;
    }
    let steps = common::steps(2);
    let threads = common::threads();
    let modes = std::env::var("FERRY_BENCH_MODES").unwrap_or_else(|_| "none".into());
    let with_torch = std::env::var("FERRY_BENCH_TORCH").map_or(true, |v| v != "0");

    let unet = UNet2DConditionModel::new(UNetConfig::from_json(SD15_UNET_CONFIG).expect("config"))
        .expect("model");
    let dev = SimDevice::new(SimConfig::default());
    let store = HostStore::new(dev.clone() as Arc<dyn Device>);
    let tmp = common::temp_dir("ferry-sd-unet-bench");
    let dir = with_torch.then(|| tmp.path());
    if let Some(d) = dir {
        std::fs::write(d.join("config.json"), SD15_UNET_CONFIG).expect("write config");
    }
    let t0 = Instant::now();
    let bytes = common::register_weights(&store, "unet", &unet.weight_shapes(), 0x5D15, dir);
    println!(
        "sd15 unet: {} weights, {:.3} GB fp16, {} groups, generated in {:.1} s; {threads} threads",
        unet.weight_shapes().len(),
        bytes as f64 / 1e9,
        unet.group_prefixes().len(),
        t0.elapsed().as_secs_f64()
    );

    let mut rng = Rng(42);
    let sample = common::tensor(&[2, 4, 64, 64], &mut rng);
    let context = common::tensor(&[2, 77, 768], &mut rng);
    let timestep = 500.0f32;
    if let Some(d) = dir {
        ferry_sd::npy::write_f32(&d.join("sample.npy"), &sample).expect("npy");
        ferry_sd::npy::write_f32(&d.join("context.npy"), &context).expect("npy");
        ferry_sd::npy::write_f32(&d.join("timestep.npy"), &Tensor::scalar(timestep)).expect("npy");
    }
    let groups = [unet.groups()];
    let mut results = Vec::new();
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
        let rss = RssWindow::start();
        let exec = Executor::new(dev.clone(), &store, &groups, cfg).expect("executor");
        let mut last: Option<Tensor> = None;
        let mut times = Vec::new();
        for step in 0..steps {
            ferry_sd::backend::profile::reset();
            let faults = common::minor_faults();
            let t = Instant::now();
            let out = unet
                .forward(&exec, &sample, &[timestep], &context, None)
                .expect("forward");
            let secs = t.elapsed().as_secs_f64();
            assert!(
                out.data().iter().all(|v| v.is_finite()),
                "non-finite output"
            );
            let faults = common::minor_faults()
                .zip(faults)
                .map_or("?".into(), |(b, a)| (b - a).to_string());
            println!(
                "mode {mode_name}: budget {}, step {step}: {secs:.2} s (out max |x| {:.3}, {faults} minor page faults)",
                budget.map_or("all resident".to_string(), |b| format!(
                    "{:.1} MB",
                    b as f64 / 1e6
                )),
                out.max_abs()
            );
            if ferry_sd::backend::profile::enabled() {
                println!("{}", ferry_sd::backend::profile::report());
            }
            if let Some(prev) = &last {
                assert!(&out == prev, "step outputs differ");
            }
            last = Some(out);
            times.push(secs);
        }
        drop(exec);
        let (comparable, line) = rss.report(bytes);
        println!("mode {mode_name}: {line}");
        results.push((mode_name.trim().to_string(), times, comparable, last));
    }

    let torch = if with_torch {
        println!("running PyTorch ({steps} steps, {threads} threads) ...");
        common::run_torch("unet", tmp.path(), threads, steps)
    } else {
        Err("FERRY_BENCH_TORCH=0".into())
    };
    for (mode, times, rss, out) in &results {
        if let Some(out) = out {
            common::print_summary(
                &format!("SD 1.5 UNet step, batch 2, 64x64, mode {mode}"),
                times,
                *rss,
                out,
                &torch,
            );
        }
    }
}
