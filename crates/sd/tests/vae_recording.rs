//! The VAE on the CUDA backend in recording mode (no GPU): `decode_on` (and the encoder's
//! `encode_moments_on`) with a fake weight view for every weight, every launch checked against
//! its PTX signature and kept inside the workspace and the weights, output shapes, nothing but
//! the input and output left on the arena, and the activation arena's peak (printed: the
//! reserve a real GPU run needs).

mod common;

use common::{buf_args, fake_views, fixture, golden};
use ferry_pager::device::cuda::check_launch_args;
use ferry_pager::{DevicePtr, DeviceRange, WeightsFile};
use ferry_sd::backend::{Backend, CudaBackend, ARENA_ALIGN};
use ferry_sd::models::vae::{Vae, VaeConfig};
use ferry_sd::tensor::{DType, Tensor};
use ferry_sd::weights::ResidentViews;
use std::cell::RefCell;
use std::io::Read;

const WS: u64 = 0x7_0000_0000;
const WEIGHTS: u64 = 0x40_0000_0000;
/// Address space only: a recording backend never touches it.
const WS_BYTES: u64 = 16 << 30;

/// Resident views for every weight of `vae` at fake device addresses from [`WEIGHTS`] on.
fn views(be: &CudaBackend<'_>, vae: &Vae) -> (ResidentViews, DeviceRange) {
    fake_views(
        vae.component(),
        &vae.groups().groups,
        vae.weight_shapes(),
        be.dtype(),
        WEIGHTS,
    )
}

/// Bytes one activation of `dims` takes on the arena.
fn arena_bytes(dims: &[usize], dtype: DType) -> u64 {
    (dims.iter().product::<usize>() as u64 * dtype.size() as u64).next_multiple_of(ARENA_ALIGN)
}

/// What one recorded pass measured.
struct Pass {
    peak: u64,
    launches: usize,
}

/// Which half of the VAE to record.
#[derive(Clone, Copy, Debug)]
enum Part {
    Decode,
    Encode,
}

/// Runs `part` of `vae` on a recording backend in `dtype` on zero input of shape `input`,
/// checks the output shape, that only input and output remain on the arena, one attention
/// launch (the mid block), and every launch against its PTX and the memory it may touch.
fn record(vae: &Vae, part: Part, input: &[usize], dtype: DType) -> Pass {
    let log = RefCell::new(Vec::new());
    let ws = DeviceRange::new(DevicePtr(WS), WS_BYTES);
    let be = CudaBackend::recording(&log, ws, dtype).unwrap();
    let (src, weights) = views(&be, vae);
    let x = be.upload(&Tensor::zeros(input.to_vec()).unwrap()).unwrap();
    let c = vae.config();
    let f = vae.scale_factor();
    let (out, want) = match part {
        Part::Decode => (
            vae.decode_on(&be, &src, &x).unwrap(),
            vec![input[0], c.out_channels, input[2] * f, input[3] * f],
        ),
        Part::Encode => (
            vae.encode_moments_on(&be, &src, &x).unwrap(),
            vec![input[0], 2 * c.latent_channels, input[2] / f, input[3] / f],
        ),
    };
    assert_eq!(be.shape(&out), want.as_slice(), "{part:?}");
    assert_eq!(
        be.arena().used(),
        arena_bytes(input, dtype) + arena_bytes(&want, dtype),
        "{part:?}: a layer left temporaries on the arena"
    );
    let peak = be.arena().peak();
    drop((out, x, src, be));
    let log = log.into_inner();
    let attn = log
        .iter()
        .filter(|l| l.func.contains("attention") || l.func.contains("flash"))
        .count();
    assert_eq!(attn, usize::from(c.mid_block_add_attention), "{part:?}");
    for l in &log {
        check_launch_args(l.ptx, l.func, &l.args).unwrap_or_else(|e| panic!("{}: {e}", l.func));
        for r in buf_args(l) {
            let inside = |o: &DeviceRange| r.ptr.0 >= o.ptr.0 && r.end() <= o.end();
            assert!(
                inside(&ws) || inside(&weights),
                "{}: buffer {r} outside the workspace and the weights",
                l.func
            );
        }
    }
    Pass {
        peak,
        launches: log.len(),
    }
}

fn sorted(mut v: Vec<(String, Vec<usize>)>) -> Vec<(String, Vec<usize>)> {
    v.sort();
    v
}

#[test]
fn tiny_sd15_vae_records_on_cuda() {
    let vae = Vae::from_config_file(fixture("sd15/vae/config.json")).unwrap();
    // The weight list the views are built from is exactly the checkpoint's.
    let file = WeightsFile::open(fixture("sd15/vae/diffusion_pytorch_model.safetensors")).unwrap();
    let stored = file
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    assert_eq!(sorted(vae.weight_shapes()), sorted(stored));

    let latents = golden("sd15", "vae.decode.latents").shape().to_vec();
    let image = golden("sd15", "vae.encode.image").shape().to_vec();
    for dtype in [DType::F32, DType::F16] {
        let d = record(&vae, Part::Decode, &latents, dtype);
        let e = record(&vae, Part::Encode, &image, dtype);
        println!(
            "tiny sd15 VAE {dtype:?}: decode {latents:?} {} launches, arena peak {} bytes; \
             encode {image:?} {} launches, arena peak {} bytes",
            d.launches, d.peak, e.launches, e.peak
        );
    }
}

/// The real SD 1.5 VAE config, as recorded from diffusers with its checkpoint's weight list.
fn real_sd15() -> (VaeConfig, Vec<(String, Vec<usize>)>) {
    let gz = std::fs::read(fixture("../real_shapes/sd15.json.gz")).unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cfg = VaeConfig::from_json(&v["configs"]["vae"].to_string()).unwrap();
    let shapes = v["diffusers"]["vae"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| {
            let dims = s.as_array().unwrap();
            let dims = dims.iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (k.clone(), dims)
        })
        .collect();
    (cfg, shapes)
}

#[test]
fn full_size_sd15_vae_decodes_512_on_cuda_within_a_bounded_reserve() {
    let (cfg, real) = real_sd15();
    let vae = Vae::new(cfg).unwrap();
    assert_eq!(sorted(vae.weight_shapes()), sorted(real));
    for dtype in [DType::F16, DType::F32] {
        let p = record(&vae, Part::Decode, &[1, 4, 64, 64], dtype);
        // The largest activation: the last upsampler's output, 256 channels at 512×512.
        let largest = arena_bytes(&[1, 256, 512, 512], dtype);
        println!(
            "SD 1.5 VAE decode 1x4x64x64 -> 512x512 {dtype:?}: {} launches, activation peak \
             {} bytes ({:.1} MiB, {:.2}x the largest activation)",
            p.launches,
            p.peak,
            p.peak as f64 / (1 << 20) as f64,
            p.peak as f64 / largest as f64
        );
        // Each resnet keeps only its input, its output and one conv's temporaries: 2.5x,
        // plus small tensors (the latents).
        assert!(
            2 * p.peak <= 5 * largest + (2 << 20),
            "{dtype:?}: peak {} is more than 2.5x the largest activation {largest} + 1 MiB",
            p.peak
        );
    }
}
