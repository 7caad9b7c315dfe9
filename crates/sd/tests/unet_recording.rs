//! `UNet2DConditionModel::forward_on` on the CUDA backend in recording mode (no GPU): every
//! weight is a view at a fake device address, every launch is checked against its kernel's PTX
//! signature and must only touch the workspace or the weights, the output has the right shape,
//! and only the inputs and the output are left on the activation stack. Prints the arena peak:
//! for the full-size SD 1.5 UNet at batch 2 and 64×64 latents, the activation reserve a real
//! GPU step needs.

mod common;

use common::{buf_args, fake_views, fixture};
use ferry_pager::device::cuda::check_launch_args;
use ferry_pager::{DevicePtr, DeviceRange};
use ferry_sd::backend::{Backend, CudaBackend, ARENA_ALIGN};
use ferry_sd::models::unet::{UNet2DConditionModel, UNetConfig};
use ferry_sd::tensor::{DType, Tensor};
use ferry_sd::weights::ResidentViews;
use std::cell::RefCell;

const WS: u64 = 0x7_0000_0000;
const WEIGHTS: u64 = 0x20_0000_0000; // above the 16 GiB workspace

/// Resident views for every weight of `unet` in `dtype`, packed from [`WEIGHTS`] on.
fn views(unet: &UNet2DConditionModel, dtype: DType) -> (ResidentViews, DeviceRange) {
    fake_views(
        unet.component(),
        &unet.group_prefixes(),
        unet.weight_shapes(),
        dtype,
        WEIGHTS,
    )
}

/// Bytes a tensor of `shape` takes on the arena's stack.
fn stacked(shape: &[usize], dtype: DType) -> u64 {
    let bytes = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
    bytes.div_ceil(ARENA_ALIGN) * ARENA_ALIGN
}

/// What one recorded forward pass left behind.
struct Recorded {
    /// The kernels launched, in order.
    funcs: Vec<&'static str>,
    launches: usize,
    peak: u64,
    /// The highest workspace byte a launch touched (with `keep`'s staging above the top).
    touched: u64,
    inputs: u64,
}

/// Records one forward pass of `unet` on `sample [n, c, h, w]` with a `[n, tokens, ctx]`
/// context (and SDXL conditioning when the model needs it) and checks it.
fn record(unet: &UNet2DConditionModel, sample: [usize; 4], tokens: usize) -> Recorded {
    let dtype = DType::F16;
    let (views, weights) = views(unet, dtype);
    let ws = DeviceRange::new(DevicePtr(WS), 16 << 30);
    let log = RefCell::new(Vec::new());
    let be = CudaBackend::recording(&log, ws, dtype).unwrap();
    let c = unet.config();
    let ctx_dim = match &c.cross_attention_dim {
        ferry_sd::models::unet::PerBlock::One(d) => *d,
        ferry_sd::models::unet::PerBlock::Each(v) => v[0],
    };
    let n = sample[0];
    let x = be.upload(&Tensor::zeros(sample).unwrap()).unwrap();
    let ehs = be
        .upload(&Tensor::zeros([n, tokens, ctx_dim]).unwrap())
        .unwrap();
    let mut inputs = stacked(&sample, dtype) + stacked(&[n, tokens, ctx_dim], dtype);
    let text_embeds;
    let time_ids = Tensor::new(
        [n, 6],
        (0..n)
            .flat_map(|_| [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0])
            .collect(),
    )
    .unwrap();
    let added = if unet.needs_added_cond() {
        let atd = c.addition_time_embed_dim.unwrap();
        let pooled = c.projection_class_embeddings_input_dim.unwrap() - 6 * atd;
        text_embeds = be.upload(&Tensor::zeros([n, pooled]).unwrap()).unwrap();
        inputs += stacked(&[n, pooled], dtype);
        Some((&text_embeds, &time_ids))
    } else {
        None
    };
    assert_eq!(be.arena().used(), inputs);

    let out = unet
        .forward_on(&be, &views, &x, &[999.0], &ehs, added)
        .unwrap();
    let out_shape = [n, c.out_channels, sample[2], sample[3]];
    assert_eq!(be.shape(&out), out_shape);
    assert!(out.is_owned());
    // Everything but the inputs and the output was released.
    assert_eq!(be.arena().used(), inputs + stacked(&out_shape, dtype));
    assert_eq!(
        out.buf().ptr.0,
        WS + inputs,
        "the output sits right above the inputs"
    );

    let peak = be.arena().peak();
    let log = log.into_inner();
    assert!(!log.is_empty());
    let inside = |r: &DeviceRange, o: &DeviceRange| r.ptr.0 >= o.ptr.0 && r.end() <= o.end();
    let mut reads_weights = false;
    let mut touched = 0;
    for l in &log {
        check_launch_args(l.ptx, l.func, &l.args).unwrap_or_else(|e| panic!("{}: {e}", l.func));
        for r in buf_args(l) {
            let w = inside(&r, &weights);
            reads_weights |= w;
            assert!(
                inside(&r, &ws) || w,
                "{}: buffer {r} outside the workspace and the weights",
                l.func
            );
            if inside(&r, &ws) {
                touched = touched.max(r.end() - WS);
            }
        }
    }
    assert!(reads_weights);
    // `keep` stages an overlapping move through the free space above the stack top, when
    // there is room: at most as much again as the peak.
    assert!(
        peak <= touched && touched <= 2 * peak,
        "launches touch {touched} bytes of the workspace, peak {peak}"
    );
    Recorded {
        funcs: log.iter().map(|l| l.func).collect(),
        launches: log.len(),
        peak,
        touched,
        inputs,
    }
}

fn fixture_unet(model: &str) -> UNet2DConditionModel {
    UNet2DConditionModel::from_config_file(fixture(&format!("{model}/unet/config.json"))).unwrap()
}

#[test]
fn tiny_sd15_records_within_the_arena() {
    let unet = fixture_unet("sd15");
    let r = record(&unet, [2, 4, 8, 8], 5);
    let count = |f: &str| r.funcs.iter().filter(|&&g| g == f).count();
    assert_eq!(count("ferry_upsample2x_f16"), 1, "{:?}", r.funcs);
    assert_eq!(count("ferry_resize_nearest_f16"), 0);
    println!(
        "tiny sd15 unet, [2, 4, 8, 8]: {} launches, activation peak {} bytes",
        r.launches, r.peak
    );
    assert!(r.peak > r.inputs);
}

#[test]
fn tiny_sd15_records_an_odd_latent_size() {
    // 7×5 is not a multiple of 2: the upsampler resizes to the skip's 4×3 instead of doubling.
    let unet = fixture_unet("sd15");
    let r = record(&unet, [1, 4, 7, 5], 3);
    let count = |f: &str| r.funcs.iter().filter(|&&g| g == f).count();
    assert_eq!(count("ferry_resize_nearest_f16"), 1, "{:?}", r.funcs);
    assert_eq!(count("ferry_upsample2x_f16"), 0);
}

#[test]
fn tiny_sdxl_records_with_added_conditioning() {
    let unet = fixture_unet("sdxl");
    assert!(unet.needs_added_cond());
    let r = record(&unet, [2, 4, 8, 8], 5);
    println!(
        "tiny sdxl unet, [2, 4, 8, 8]: {} launches, activation peak {} bytes",
        r.launches, r.peak
    );
}

/// `runwayml/stable-diffusion-v1-5` `unet/config.json` (as in benches/sd_unet.rs).
const SD15_UNET_CONFIG: &str = r#"{
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
    "DownBlock2D"],
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
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
    "CrossAttnUpBlock2D"]
}"#;

#[test]
fn full_size_sd15_step_reports_its_activation_reserve() {
    let unet = UNet2DConditionModel::new(UNetConfig::from_json(SD15_UNET_CONFIG).unwrap()).unwrap();
    let r = record(&unet, [2, 4, 64, 64], 77);
    println!(
        "sd15 unet fp16, batch 2, 64×64 latents, 77 tokens: {} launches, activation peak {} \
         bytes ({:.1} MiB; inputs {} bytes; highest byte touched with keep's staging {:.1} MiB)",
        r.launches,
        r.peak,
        r.peak as f64 / (1u64 << 20) as f64,
        r.inputs,
        r.touched as f64 / (1u64 << 20) as f64,
    );
    // At least the largest single activation chain: the 64×64×320 skips alone are 4 × 5 MiB.
    assert!(r.peak > 4 * 2 * 320 * 64 * 64 * 2);
}
