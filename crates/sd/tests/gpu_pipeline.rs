//! The pipeline on CUDA. Without a GPU: the activation-reserve planner (recording-mode runs of
//! the models: it must grow with resolution, batch and guidance, follow the VAE's upcast, and
//! agree with a recording built independently from the UNet's config) and the GPU executor's
//! group building and dtype checks. With a GPU (ignored here): the tiny SD 1.5 / SDXL pipelines
//! on CUDA in f32 against the CPU pipeline, offload-mode invariance on the GPU, and SDXL in f16
//! with its VAE upcast to f32.

mod common;

use common::{fixture, golden, rel_err};
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::host::HostStore;
use ferry_pager::Error as PagerError;
use ferry_pager::{Device, DevicePtr, DeviceRange};
use ferry_sched::Mode;
use ferry_sd::backend::{Backend, CudaBackend, CudaTensor, ARENA_ALIGN};
use ferry_sd::error::Error;
use ferry_sd::exec::ComponentGroups;
use ferry_sd::gpu_exec::GpuGroups;
use ferry_sd::loader::ModelSource;
use ferry_sd::models::unet::{PerBlock, UNet2DConditionModel};
use ferry_sd::pipeline::{token_ids, DeviceChoice, GenerateParams, LoadConfig, Pipeline};
use ferry_sd::tensor::{DType, Tensor};
use ferry_sd::weights::ResidentViews;
use std::cell::RefCell;
use std::sync::Arc;

/// The goldens' generation parameters for fixture `model` (4 steps, CFG, fixed latents).
fn params(model: &str) -> GenerateParams {
    let text = std::fs::read_to_string(fixture(&format!("{model}/goldens.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let p = &json["pipeline"];
    GenerateParams {
        prompt: p["prompt"].as_str().unwrap().into(),
        negative_prompt: p["negative_prompt"].as_str().map(String::from),
        steps: p["steps"].as_u64().unwrap() as usize,
        guidance: p["guidance_scale"].as_f64().unwrap() as f32,
        scheduler: Some("euler".into()),
        width: Some(p["width"].as_u64().unwrap() as usize),
        height: Some(p["height"].as_u64().unwrap() as usize),
        init_latents: Some(golden(model, "pipe.latents_init")),
        ..GenerateParams::default()
    }
}

fn cpu(model: &str) -> Pipeline {
    Pipeline::load(&fixture(model), LoadConfig::default()).unwrap()
}

#[test]
fn reserve_grows_with_resolution_batch_and_guidance() {
    for model in ["sd15", "sdxl"] {
        let pipe = cpu(model);
        let (w, h) = pipe.default_size();
        let base = GenerateParams {
            width: Some(w),
            height: Some(h),
            ..GenerateParams::default()
        };
        let plan = |p: &GenerateParams| pipe.reserve_plan(DType::F16, p).unwrap();
        let one = plan(&base);
        let big = plan(&GenerateParams {
            width: Some(2 * w),
            height: Some(2 * h),
            ..base.clone()
        });
        let two = plan(&GenerateParams {
            batch: 2,
            ..base.clone()
        });
        let no_cfg = plan(&GenerateParams {
            guidance: 1.0,
            ..base.clone()
        });
        println!(
            "{model} f16 at {w}×{h}: {one:?}; at {}×{}: {big:?}",
            2 * w,
            2 * h
        );
        assert!(one.unet > 0 && one.vae_decoder > 0 && one.text_encoders > 0);
        assert!(
            big.unet > one.unet && big.vae_decoder > one.vae_decoder,
            "{model}"
        );
        assert!(
            two.unet > one.unet && two.vae_decoder > one.vae_decoder,
            "{model}"
        );
        // Guidance doubles the UNet's batch; it does not touch the VAE.
        assert!(no_cfg.unet < one.unet, "{model}");
        assert_eq!(no_cfg.vae_decoder, one.vae_decoder);
        // Text encoders run one prompt at a time at a fixed length.
        assert_eq!(big.text_encoders, one.text_encoders);
        assert_eq!(two.text_encoders, one.text_encoders);
        assert!(big.reserve() >= big.unet.max(big.vae_decoder));
        // At 4× the pixels the decoder's activations alone grow at least 3×.
        assert!(big.vae_decoder > 3 * one.vae_decoder, "{model}");

        // f32 activations take more than f16 ones; bf16 as much as f16 (and its kernels exist).
        let f32_plan = pipe.reserve_plan(DType::F32, &base).unwrap();
        let bf16_plan = pipe.reserve_plan(DType::BF16, &base).unwrap();
        assert!(f32_plan.unet > one.unet);
        assert_eq!(bf16_plan.unet, one.unet);
    }
}

#[test]
fn reserve_follows_the_vae_upcast() {
    // The SDXL fixture's VAE has force_upcast: in an f16 pipeline it runs (and plans) in f32.
    let xl = cpu("sdxl");
    let p = GenerateParams::default();
    let f16 = xl.reserve_plan(DType::F16, &p).unwrap();
    let f32_plan = xl.reserve_plan(DType::F32, &p).unwrap();
    assert_eq!(f16.vae_decoder, f32_plan.vae_decoder);
    assert!(f16.unet < f32_plan.unet);
    // The SD 1.5 fixture's does not.
    let sd = cpu("sd15");
    let f16 = sd.reserve_plan(DType::F16, &p).unwrap();
    let f32_plan = sd.reserve_plan(DType::F32, &p).unwrap();
    assert!(f16.vae_decoder < f32_plan.vae_decoder);
}

#[test]
fn reserve_plan_rejects_a_bad_size() {
    let pipe = cpu("sd15");
    let p = GenerateParams {
        width: Some(100),
        ..GenerateParams::default()
    };
    let e = pipe.reserve_plan(DType::F16, &p).unwrap_err().to_string();
    assert!(e.contains("multiple of 8"), "{e}");
}

/// The UNet's peak measured the way tests/unet_recording.rs does: views from the config's
/// weight list (not the store), inputs uploaded first.
fn unet_peak_from_config(
    unet: &UNet2DConditionModel,
    rows: usize,
    hw: usize,
    tokens: usize,
) -> u64 {
    let dtype = DType::F16;
    let prefixes = unet.group_prefixes();
    let mut groups: Vec<Vec<(String, CudaTensor)>> = vec![Vec::new(); prefixes.len()];
    let mut at = 1u64 << 45;
    for (name, shape) in unet.weight_shapes() {
        let (gi, prefix) = prefixes
            .iter()
            .enumerate()
            .filter(|(_, p)| name.starts_with(&format!("{p}.")))
            .max_by_key(|(_, p)| p.len())
            .unwrap();
        let bytes = shape.iter().product::<usize>() as u64 * 2;
        let t = CudaTensor::weight(DeviceRange::new(DevicePtr(at), bytes), dtype, shape).unwrap();
        at = (at + bytes).next_multiple_of(ARENA_ALIGN);
        groups[gi].push((name[prefix.len() + 1..].to_string(), t));
    }
    let mut views = ResidentViews::new();
    for (p, g) in prefixes.iter().zip(groups) {
        views.insert(unet.component(), p, g);
    }
    let log = RefCell::new(Vec::new());
    let ws = DeviceRange::new(DevicePtr(1 << 40), 1 << 40);
    let be = CudaBackend::recording(&log, ws, dtype).unwrap();
    let c = unet.config();
    let ctx_dim = match &c.cross_attention_dim {
        PerBlock::One(d) => *d,
        PerBlock::Each(v) => v[0],
    };
    let x = be
        .upload(&Tensor::zeros([rows, c.in_channels, hw, hw]).unwrap())
        .unwrap();
    let ehs = be
        .upload(&Tensor::zeros([rows, tokens, ctx_dim]).unwrap())
        .unwrap();
    let time_ids = Tensor::zeros([rows, 6]).unwrap();
    let pooled;
    let added = if unet.needs_added_cond() {
        let width = c.projection_class_embeddings_input_dim.unwrap()
            - 6 * c.addition_time_embed_dim.unwrap();
        pooled = be.upload(&Tensor::zeros([rows, width]).unwrap()).unwrap();
        Some((&pooled, &time_ids))
    } else {
        None
    };
    unet.forward_on(&be, &views, &x, &[999.0], &ehs, added)
        .unwrap();
    be.arena().peak()
}

#[test]
fn planned_unet_peak_matches_an_independent_recording() {
    for model in ["sd15", "sdxl"] {
        let pipe = cpu(model);
        let unet =
            UNet2DConditionModel::from_config_file(fixture(&format!("{model}/unet/config.json")))
                .unwrap();
        let tokens = token_ids(&fixture(model), "", None).unwrap()[0]
            .prompt
            .len();
        let (w, _) = pipe.default_size();
        let p = GenerateParams {
            width: Some(w),
            height: Some(w),
            batch: 2,
            ..GenerateParams::default()
        };
        let plan = pipe.reserve_plan(DType::F16, &p).unwrap();
        let want = unet_peak_from_config(&unet, 4, w / 8, tokens);
        assert_eq!(plan.unet, want, "{model}");
    }
}

/// A simulated-device store holding fixture `model`'s components converted to `dtype`, with
/// the pipeline's component groups.
fn store_in(model: &str, dtype: ferry_pager::weights::DType) -> (HostStore, Vec<ComponentGroups>) {
    let source = ModelSource::open(fixture(model)).unwrap();
    let store = HostStore::new(SimDevice::new(SimConfig::default()) as Arc<dyn Device>);
    let unet =
        UNet2DConditionModel::from_config_file(fixture(&format!("{model}/unet/config.json")))
            .unwrap();
    source
        .component("unet")
        .unwrap()
        .register_into(&store, "unet.", Some(dtype))
        .unwrap();
    (store, vec![unet.groups()])
}

#[test]
fn gpu_groups_check_dtypes_and_build_views() {
    use ferry_pager::weights::DType as Stored;
    let (store, groups) = store_in("sd15", Stored::F16);
    let g = GpuGroups::new(&store, &groups, &[("unet", DType::F16)], 0.0).unwrap();
    // The same groups, in the same order, as the CPU executor's.
    let names: Vec<String> = groups[0]
        .groups
        .iter()
        .map(|p| format!("unet.{p}"))
        .collect();
    assert_eq!(g.names(), names);
    let id = g.id("unet", "conv_in").unwrap();
    assert_eq!(g.dtype(id), Some(DType::F16));
    let tensors = g.tensors(id);
    let mut keys: Vec<&str> = tensors.iter().map(|(k, _)| *k).collect();
    keys.sort();
    assert_eq!(keys, ["bias", "weight"]);

    // Views at given ranges: the stored dtype and shapes; the wrong number of ranges or a
    // range too small for its tensor is refused.
    let ranges: Vec<DeviceRange> = tensors
        .iter()
        .enumerate()
        .map(|(i, (_, s))| {
            let bytes = s.iter().product::<usize>() as u64 * 2;
            DeviceRange::new(DevicePtr(0x1000_0000 * (i as u64 + 1)), bytes)
        })
        .collect();
    let views = g.views(id, &ranges).unwrap();
    for ((k, v), (k2, s)) in views.iter().zip(&tensors) {
        assert_eq!(k, k2);
        assert_eq!(v.shape(), *s);
        assert_eq!(v.dtype(), DType::F16);
        assert!(!v.is_owned());
    }
    assert!(g.views(id, &ranges[..1]).is_err());
    let short: Vec<DeviceRange> = ranges
        .iter()
        .map(|r| DeviceRange::new(r.ptr, r.len - 1))
        .collect();
    assert!(g.views(id, &short).is_err());
    let e = g.id("unet", "no_such_block").unwrap_err().to_string();
    assert!(e.contains("unet.no_such_block"), "{e}");

    // Fake views: every group, aligned, non-overlapping, inside the returned span.
    let (_, span) = g.fake_views(1 << 40).unwrap();
    let weight_bytes: u64 = (0..g.len())
        .flat_map(|i| g.tensors(ferry_sched::GroupId(i)))
        .map(|(_, s)| s.iter().product::<usize>() as u64 * 2)
        .sum();
    assert!(
        span.ptr == DevicePtr(1 << 40) && span.len >= weight_bytes,
        "{span:?}"
    );

    // Weights not stored in the compute dtype are refused at build time, with the fix.
    let e = GpuGroups::new(&store, &groups, &[("unet", DType::F32)], 0.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("stored as F16") && e.contains("F32") && e.contains("convert"),
        "{e}"
    );
    let e = GpuGroups::new(&store, &groups, &[("vae", DType::F16)], 0.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no compute dtype") && e.contains("unet"), "{e}");
    // Planning ignores the stored dtype.
    assert!(GpuGroups::for_planning(&store, &groups, &[("unet", DType::F32)]).is_ok());
}

#[test]
fn cuda_load_opens_the_gpu_or_fails_cleanly() {
    let load = |n: usize| {
        Pipeline::load(
            &fixture("sd15"),
            LoadConfig {
                device: DeviceChoice::Cuda(n),
                ..LoadConfig::default()
            },
        )
    };
    // Both cases, whichever this machine is.
    match ferry_pager::device::cuda::CudaDevice::new(0) {
        Ok(_) => {
            let pipe = load(0).unwrap_or_else(|e| panic!("GPU 0 opens, but loading on it: {e}"));
            assert_eq!(pipe.device(), DeviceChoice::Cuda(0));
        }
        Err(_) => {
            let e = load(0)
                .err()
                .expect("no usable GPU 0, yet the pipeline loaded on it");
            assert!(
                matches!(
                    &e,
                    Error::Device {
                        ordinal: 0,
                        source: PagerError::NoDriver | PagerError::NoDevice(_)
                    }
                ),
                "{e:?}"
            );
            let line = e.to_string();
            assert!(
                line.contains("CUDA device 0") && !line.contains('\n'),
                "{line}"
            );
        }
    }
    // A GPU that cannot exist fails the same way everywhere, with the driver's reason as source.
    let e = load(100_000).err().expect("GPU 100000 opened");
    match &e {
        Error::Device { ordinal, source } => {
            assert_eq!(*ordinal, 100_000);
            assert!(
                matches!(source, PagerError::NoDriver | PagerError::NoDevice(_)),
                "{source:?}"
            );
            let src = std::error::Error::source(&e)
                .expect("no source")
                .to_string();
            assert_eq!(src, source.to_string());
        }
        other => panic!("{other:?}"),
    }
}

fn cuda(model: &str, dtype: DType, mode: Option<Mode>, budget: Option<u64>) -> Pipeline {
    Pipeline::load(
        &fixture(model),
        LoadConfig {
            device: DeviceChoice::Cuda(0),
            dtype,
            mode,
            budget,
            reserve: 0,
            ..LoadConfig::default()
        },
    )
    .unwrap_or_else(|e| panic!("{model} on CUDA: {e}"))
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tiny_pipelines_on_cuda_f32_match_the_cpu() {
    for model in ["sd15", "sdxl"] {
        let p = params(model);
        let want = cpu(model).generate(&p, |_, _| {}).unwrap();
        let pipe = cuda(model, DType::F32, None, None);
        assert_eq!(pipe.device(), DeviceChoice::Cuda(0));
        assert_eq!(pipe.dtypes(), (DType::F32, DType::F32));
        let got = pipe.generate(&p, |_, _| {}).unwrap();
        let e = rel_err(&got.latents, &want.latents);
        let ei = rel_err(&got.images, &want.images);
        println!("{model} cuda f32 vs cpu: latents rel err {e:.2e}, images {ei:.2e}");
        assert!(e <= 1e-3, "{model}: latents rel err {e}");
        assert!(ei <= 1e-3, "{model}: images rel err {ei}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn offload_modes_are_invariant_on_the_gpu() {
    let p = params("sd15");
    let resident = cuda("sd15", DType::F32, Some(Mode::None), None)
        .generate(&p, |_, _| {})
        .unwrap();
    let probe = cuda("sd15", DType::F32, Some(Mode::None), None);
    let reserve = probe.reserve();
    for mode in [
        Mode::Model,
        Mode::Sequential,
        Mode::Group { depth: 2 },
        Mode::Auto,
    ] {
        let min = probe.minimum_budget(mode, reserve).unwrap();
        for budget in [min, min + (1 << 20)] {
            let pipe = cuda("sd15", DType::F32, Some(mode), Some(budget));
            let out = pipe.generate(&p, |_, _| {}).unwrap();
            assert!(
                out.latents == resident.latents && out.images == resident.images,
                "{mode} at {budget}: output differs from the resident GPU run"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tiny_sdxl_f16_runs_with_its_vae_upcast() {
    let p = params("sdxl");
    let want = cpu("sdxl").generate(&p, |_, _| {}).unwrap();
    let pipe = cuda("sdxl", DType::F16, None, None);
    assert_eq!(pipe.dtypes(), (DType::F16, DType::F32));
    let got = pipe.generate(&p, |_, _| {}).unwrap();
    assert!(got.images.data().iter().all(|v| v.is_finite()));
    let e = rel_err(&got.latents, &want.latents);
    println!("sdxl cuda f16 (vae f32) vs cpu f32: latents rel err {e:.2e}");
    assert!(e <= 5e-2, "latents rel err {e}");
    // A larger image than the default grows the planned reserve on the fly.
    let before = pipe.reserve();
    let (w, h) = pipe.default_size();
    let big = GenerateParams {
        width: Some(2 * w),
        height: Some(2 * h),
        init_latents: None,
        ..p
    };
    pipe.generate(&big, |_, _| {}).unwrap();
    assert!(pipe.reserve() > before);
}
