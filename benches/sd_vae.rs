//! One full-size SD 1.5 VAE decode on the CPU (a 1×4×64×64 latent to a 512×512 image), with random
//! fp16 weights generated on the fly and read through the executor on the simulated device, side by
//! side with diffusers' `AutoencoderKL.decode` in PyTorch fp32 on the same weights (a diffusers
//! folder in a temp dir), latent and thread count, run in a child process
//! (`scripts/cpu-bench/torch_step.py`). Prints both times, the ratio, both peak RSS and the largest
//! difference between the two images.
//!
//! `cargo bench -p ferry-sd --bench sd_vae`. Environment: `FERRY_BENCH_STEPS` (decodes per side,
//! default 2; the first is cold), `MATMUL_NUM_THREADS` (threads, both sides), `FERRY_BENCH_PYTHON`
//! (default `python3`; PyTorch is skipped when torch/diffusers do not import), `FERRY_BENCH_TORCH=0`
//! (skip PyTorch), `FERRY_BENCH_TMP` (where the folder goes), `FERRY_OP_PROFILE=1` (per-op times).

#[path = "sd_cpu_common.rs"]
mod common;

use common::{Rng, RssWindow};
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::host::HostStore;
use ferry_pager::Device;
use ferry_sd::exec::{ExecConfig, Executor};
use ferry_sd::models::vae::{Vae, VaeConfig};
use ferry_sd::tensor::Tensor;
use std::sync::Arc;
use std::time::Instant;

/// `runwayml/stable-diffusion-v1-5` `vae/config.json`.
const SD15_VAE_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL",
  "_diffusers_version": "0.6.0",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": [
    "DownEncoderBlock2D",
    "DownEncoderBlock2D",
    "DownEncoderBlock2D",
    "DownEncoderBlock2D"
  ],
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 512,
  "up_block_types": [
    "UpDecoderBlock2D",
    "UpDecoderBlock2D",
    "UpDecoderBlock2D",
    "UpDecoderBlock2D"
  ]
}"#;

/// Keeps freed activation memory for reuse (see `ferry_sd::allocator`).
#[global_allocator]
static GLOBAL: ferry_sd::allocator::MiMalloc = ferry_sd::allocator::MiMalloc;

fn main() {
    ferry_sd::allocator::keep_freed_memory();
    // `cargo test --all-targets` runs this binary without `--bench`; a full decode is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("sd_vae: skipped (run it with `cargo bench -p ferry-sd --bench sd_vae`)");
        return;
    }
    let steps = common::steps(2);
    let threads = common::threads();
    let with_torch = std::env::var("FERRY_BENCH_TORCH").map_or(true, |v| v != "0");

    let vae = Vae::new(VaeConfig::from_json(SD15_VAE_CONFIG).expect("config")).expect("model");
    let dev = SimDevice::new(SimConfig::default());
    let store = HostStore::new(dev.clone() as Arc<dyn Device>);
    let tmp = common::temp_dir("ferry-sd-vae-bench");
    let dir = with_torch.then(|| tmp.path());
    if let Some(d) = dir {
        std::fs::write(d.join("config.json"), SD15_VAE_CONFIG).expect("write config");
    }
    let t0 = Instant::now();
    let shapes = vae.weight_shapes();
    let bytes = common::register_weights(&store, vae.component(), &shapes, 0x05D1_50AE, dir);
    println!(
        "sd15 vae: {} weights, {:.3} GB fp16, generated in {:.1} s; {threads} threads",
        shapes.len(),
        bytes as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );

    // Decoder input as the pipeline feeds it: UNet latents divided by the scaling factor.
    let mut rng = Rng(7);
    let latents = vae.unscale_latents(&common::tensor(&[1, 4, 64, 64], &mut rng));
    if let Some(d) = dir {
        ferry_sd::npy::write_f32(&d.join("latents.npy"), &latents).expect("npy");
    }
    let groups = [vae.groups()];
    let rss = RssWindow::start();
    let exec =
        Executor::new(dev.clone(), &store, &groups, ExecConfig::default()).expect("executor");
    let mut last: Option<Tensor> = None;
    let mut times = Vec::new();
    for step in 0..steps {
        ferry_sd::backend::profile::reset();
        let faults = common::minor_faults();
        let t = Instant::now();
        let out = vae.decode(&exec, &latents).expect("decode");
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(out.shape(), &[1, 3, 512, 512]);
        assert!(out.first_non_finite().is_none(), "non-finite output");
        let faults = common::minor_faults()
            .zip(faults)
            .map_or("?".into(), |(b, a)| (b - a).to_string());
        println!(
            "decode {step}: {secs:.2} s (out max |x| {:.3}, {faults} minor page faults)",
            out.max_abs()
        );
        if ferry_sd::backend::profile::enabled() {
            println!("{}", ferry_sd::backend::profile::report());
        }
        if let Some(prev) = &last {
            assert!(&out == prev, "decode outputs differ");
        }
        last = Some(out);
        times.push(secs);
    }
    drop(exec);
    let (comparable, line) = rss.report(bytes);
    println!("{line}");

    let torch = if with_torch {
        println!("running PyTorch ({steps} decodes, {threads} threads) ...");
        common::run_torch("vae", tmp.path(), threads, steps)
    } else {
        Err("FERRY_BENCH_TORCH=0".into())
    };
    if let Some(out) = &last {
        common::print_summary(
            "SD 1.5 VAE decode, 1x4x64x64 -> 512x512",
            &times,
            comparable,
            out,
            &torch,
        );
    }
}
