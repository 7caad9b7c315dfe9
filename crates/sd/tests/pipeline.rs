//! End-to-end parity with diffusers' pipelines on the tiny fixtures: final latents within 1e-3 of
//! the reference (relative to its max |value|) and decoded images within 2/255, for several
//! schedulers; bit-identical results across offload modes and budgets.

mod common;

use common::{fixture, golden, rel_err, to_np};
use ferry_sched::Mode;
use ferry_sd::error::Error;
use ferry_sd::loader::LoadError;
use ferry_sd::pipeline::{token_ids, GenerateParams, LoadConfig, Pipeline};
use ferry_sd::schedulers::SchedulerError;
use ferry_sd::tensor::Tensor;
use std::path::{Path, PathBuf};

fn model_dir(name: &str) -> std::path::PathBuf {
    fixture(name)
}

struct Goldens {
    model: String,
    json: serde_json::Value,
}

impl Goldens {
    fn load(name: &str) -> Goldens {
        let dir = model_dir(name);
        Goldens {
            json: serde_json::from_str(&std::fs::read_to_string(dir.join("goldens.json")).unwrap())
                .unwrap(),
            model: name.to_string(),
        }
    }

    fn tensor(&self, key: &str) -> Tensor {
        golden(&self.model, key)
    }

    fn params(&self, scheduler: &str) -> GenerateParams {
        let p = &self.json["pipeline"];
        GenerateParams {
            prompt: p["prompt"].as_str().unwrap().into(),
            negative_prompt: p["negative_prompt"].as_str().map(String::from),
            steps: p["steps"].as_u64().unwrap() as usize,
            guidance: p["guidance_scale"].as_f64().unwrap() as f32,
            scheduler: Some(scheduler.into()),
            width: Some(p["width"].as_u64().unwrap() as usize),
            height: Some(p["height"].as_u64().unwrap() as usize),
            init_latents: Some(self.tensor("pipe.latents_init")),
            ..GenerateParams::default()
        }
    }
}

fn check_runs(name: &str, runs: &[(&str, &str)]) {
    let g = Goldens::load(name);
    let pipe = Pipeline::load(&model_dir(name), LoadConfig::default()).unwrap();
    for &(golden, cli) in runs {
        let out = pipe.generate(&g.params(cli), |_, _| {}).unwrap();
        let want = g.tensor(&format!("pipe.{golden}.latents"));
        let e = rel_err(&out.latents, &want);
        assert!(e <= 1e-3, "{name} {golden}: latents rel err {e}");
        let img = g.tensor(&format!("pipe.{golden}.image"));
        let d = to_np(&out.images).max_abs_diff(&img).unwrap();
        assert!(d <= 2.0 / 255.0, "{name} {golden}: image max diff {d}");
        eprintln!("{name} {golden}: latents {e:.2e}, image {d:.2e}");
    }
    assert!(pipe.races().is_empty(), "{:?}", pipe.races());
}

#[test]
fn sd15_matches_diffusers() {
    check_runs(
        "sd15",
        &[
            ("ddim", "ddim"),
            ("euler", "euler"),
            ("dpmpp_2m", "dpmpp-2m"),
            ("pndm", "pndm"),
        ],
    );
}

#[test]
fn sd2_matches_diffusers() {
    check_runs(
        "sd2",
        &[
            ("ddim", "ddim"),
            ("euler", "euler"),
            ("dpmpp_2m", "dpmpp-2m"),
        ],
    );
}

#[test]
fn sdxl_matches_diffusers() {
    check_runs(
        "sdxl",
        &[
            ("ddim", "ddim"),
            ("euler", "euler"),
            ("dpmpp_2m", "dpmpp-2m"),
        ],
    );
}

#[test]
fn sdxl_without_negative_prompt_uses_zero_embeddings() {
    let g = Goldens::load("sdxl");
    let pipe = Pipeline::load(&model_dir("sdxl"), LoadConfig::default()).unwrap();
    let mut p = g.params("euler");
    p.negative_prompt = None;
    let out = pipe.generate(&p, |_, _| {}).unwrap();
    let want = g.tensor("pipe.euler_no_negative.latents");
    let e = rel_err(&out.latents, &want);
    assert!(e <= 1e-3, "latents rel err {e}");
}

#[test]
fn offload_modes_and_budgets_give_bit_identical_latents() {
    let g = Goldens::load("sd15");
    let p = g.params("euler");
    let resident = Pipeline::load(&model_dir("sd15"), LoadConfig::default())
        .unwrap()
        .generate(&p, |_, _| {})
        .unwrap();
    let probe = Pipeline::load(&model_dir("sd15"), LoadConfig::default()).unwrap();
    let weights = probe.pinned_host_bytes();
    let reserve = 1 << 20;
    for mode in [
        Mode::Model,
        Mode::Sequential,
        Mode::Group { depth: 2 },
        Mode::Auto,
    ] {
        let min = probe.minimum_budget(mode, reserve).unwrap();
        for budget in [
            min,
            (min + reserve + weights) / 2,
            reserve + weights + (1 << 20),
        ] {
            let cfg = LoadConfig {
                mode: Some(mode),
                budget: Some(budget),
                reserve,
                metrics: false,
                ..LoadConfig::default()
            };
            let pipe = Pipeline::load(&model_dir("sd15"), cfg)
                .unwrap_or_else(|e| panic!("{mode} at {budget}: {e}"));
            let out = pipe.generate(&p, |_, _| {}).unwrap();
            assert!(
                out.latents == resident.latents && out.images == resident.images,
                "{mode} at {budget}: output differs from the resident run"
            );
            assert!(pipe.races().is_empty(), "{mode}: {:?}", pipe.races());
        }
        let below = LoadConfig {
            mode: Some(mode),
            budget: Some(min - 1),
            reserve,
            metrics: false,
            ..LoadConfig::default()
        };
        let e = Pipeline::load(&model_dir("sd15"), below)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("minimum workable budget is {min} bytes")),
            "{e}"
        );
    }
}

#[test]
fn token_ids_use_each_tokenizer_and_its_pad() {
    let ids = token_ids(&model_dir("sdxl"), "a cat", None).unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0].component, "tokenizer");
    assert_eq!(&ids[0].prompt[..4], &[49406, 320, 2368, 49407]);
    assert_eq!(ids[0].prompt[4], 49407, "tokenizer pads with eos");
    assert_eq!(ids[1].prompt[4], 0, "tokenizer_2 pads with '!'");
    assert!(ids[0].negative_prompt.is_none());
}

#[test]
fn bad_requests_are_clear_errors() {
    let pipe = Pipeline::load(&model_dir("sd15"), LoadConfig::default()).unwrap();
    let p = GenerateParams {
        width: Some(60),
        steps: 1,
        ..GenerateParams::default()
    };
    let e = pipe.generate(&p, |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    let e = e.to_string();
    assert!(
        e.contains("width") && e.contains("60") && e.contains("multiple of 8"),
        "{e}"
    );
    let p = GenerateParams {
        scheduler: Some("heun".into()),
        steps: 1,
        ..GenerateParams::default()
    };
    let e = pipe.generate(&p, |_, _| {}).unwrap_err();
    assert!(
        matches!(&e, Error::Scheduler(SchedulerError::UnknownName(n)) if n == "heun"),
        "{e:?}"
    );
    // The message lists what would have been accepted, not just the input back.
    assert!(e.to_string().contains("ddim"), "{e}");
}

/// A copy of fixture `name` that a test may damage.
fn copy_model(name: &str) -> (tempfile::TempDir, PathBuf) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    copy(&model_dir(name), &dir);
    (tmp, dir)
}

/// The chain of `e`'s sources, outermost first, as displayed.
fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    std::iter::successors(Some(e), |e| e.source())
        .map(|e| e.to_string())
        .collect()
}

/// The `std::io::Error` at the end of `e`'s source chain.
fn io_cause(e: &Error) -> &std::io::Error {
    e.root_cause()
        .downcast_ref::<std::io::Error>()
        .unwrap_or_else(|| panic!("no io::Error at the end of {:?}", chain(e)))
}

#[test]
fn a_missing_model_is_an_io_error_naming_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("no-such-model");
    let e = Pipeline::load(&path, LoadConfig::default()).err().unwrap();
    match &e {
        Error::Load(LoadError::Io {
            path: p, source, ..
        }) => {
            assert_eq!(p, &path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("not a load I/O error: {other:?}"),
    }
    assert_eq!(io_cause(&e).kind(), std::io::ErrorKind::NotFound);
    let line = e.to_string();
    assert!(
        line.contains("no-such-model")
            && !line.contains('\n')
            && !line.contains("invalid argument"),
        "{line}"
    );
    // token_ids opens models the same way.
    let e = token_ids(&path, "a", None).unwrap_err();
    assert!(matches!(e, Error::Load(LoadError::Io { .. })), "{e:?}");
}

#[test]
fn an_unreadable_component_file_keeps_its_io_error_and_path() {
    let (_tmp, dir) = copy_model("sd15");
    let config = dir.join("unet/config.json");
    // Missing, then present but unreadable as a file (a folder: unreadable even for root).
    std::fs::remove_file(&config).unwrap();
    for kind in [
        std::io::ErrorKind::NotFound,
        std::io::ErrorKind::IsADirectory,
    ] {
        if kind == std::io::ErrorKind::IsADirectory {
            std::fs::create_dir(&config).unwrap();
        }
        let e = Pipeline::load(&dir, LoadConfig::default()).err().unwrap();
        match &e {
            Error::Load(LoadError::Io { path, .. }) => assert_eq!(path, &config),
            other => panic!("{kind:?}: not a load I/O error: {other:?}"),
        }
        assert_eq!(io_cause(&e).kind(), kind, "{:?}", chain(&e));
        let line = e.to_string();
        assert!(
            line.contains("unet") && line.contains("config.json"),
            "{line}"
        );
        assert!(
            !line.starts_with("config:") && !line.contains('\n'),
            "{line}"
        );
    }
}

#[test]
fn a_missing_weight_shard_is_a_load_error_with_the_io_chain() {
    let (_tmp, dir) = copy_model("sd15");
    let vae = dir.join("vae");
    // Shard the VAE into one file listed by an index, then lose the shard.
    std::fs::rename(
        vae.join("diffusion_pytorch_model.safetensors"),
        vae.join("shard-1.safetensors"),
    )
    .unwrap();
    std::fs::write(
        vae.join("diffusion_pytorch_model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"decoder.conv_in.weight": "shard-1.safetensors"}}"#,
    )
    .unwrap();
    Pipeline::load(&dir, LoadConfig::default()).expect("the sharded copy loads");
    std::fs::remove_file(vae.join("shard-1.safetensors")).unwrap();
    let e = Pipeline::load(&dir, LoadConfig::default()).err().unwrap();
    assert!(matches!(e, Error::Load(_)), "{e:?}");
    assert_eq!(io_cause(&e).kind(), std::io::ErrorKind::NotFound);
    let c = chain(&e);
    assert!(c[0].contains("shard-1.safetensors"), "{c:?}");
    assert!(c.len() >= 2, "flattened: {c:?}");
}

#[test]
fn data_races_on_the_simulated_device_fail_generate() {
    use ferry_pager::device::sim::KernelSpec;
    use ferry_pager::{Device, DeviceRange, HostMemKind};
    let pipe = Pipeline::load(&model_dir("sd15"), LoadConfig::default()).unwrap();
    let p = GenerateParams {
        steps: 1,
        ..GenerateParams::default()
    };
    pipe.generate(&p, |_, _| {}).unwrap();
    pipe.check_races().unwrap();
    // Plant a race on the pipeline's device: a kernel reads what a copy on another stream writes,
    // with no event between them.
    let dev = pipe.executor().unwrap().device();
    let (copy, compute) = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
    let host = dev.alloc_host(256, HostMemKind::Upload).unwrap();
    let buf = dev.alloc_device(256).unwrap();
    let range = DeviceRange::new(buf, 256);
    dev.copy_h2d(copy, buf, host, 0, 256).unwrap();
    dev.launch(
        compute,
        KernelSpec::new("planted_reader", std::time::Duration::from_nanos(500)).reads(range),
        move |mem| mem.read(range).map(drop),
    )
    .unwrap();
    dev.sync_stream(compute).unwrap();
    dev.sync_stream(copy).unwrap();
    assert!(!pipe.races().is_empty());
    let e = pipe.check_races().unwrap_err();
    assert!(
        matches!(&e, Error::Races { count, first } if *count >= 1 && first.contains("planted_reader")),
        "{e:?}"
    );
    let e = pipe.generate(&p, |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::Races { .. }), "{e:?}");
    let line = e.to_string();
    assert!(
        line.contains("data race") && !line.contains("invalid argument"),
        "{line}"
    );
}

#[test]
fn an_over_long_prompt_is_truncated_with_a_warning() {
    let pipe = Pipeline::load(&model_dir("sd15"), LoadConfig::default()).unwrap();
    let long = "a very detailed painting of a lighthouse ".repeat(20);
    let p = GenerateParams {
        prompt: long,
        steps: 1,
        ..GenerateParams::default()
    };
    let out = pipe.generate(&p, |_, _| {}).unwrap();
    assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
    assert!(
        out.warnings[0].contains("truncated to 77"),
        "{:?}",
        out.warnings
    );
    let short = GenerateParams {
        prompt: "a lighthouse".into(),
        steps: 1,
        ..GenerateParams::default()
    };
    assert!(pipe
        .generate(&short, |_, _| {})
        .unwrap()
        .warnings
        .is_empty());
}

/// `generate` on sd15 with every initial latent set to `value`.
fn generate_from(scheduler: &str, value: f32) -> Result<ferry_sd::pipeline::Generated, Error> {
    let g = Goldens::load("sd15");
    let pipe = Pipeline::load(&model_dir("sd15"), LoadConfig::default()).unwrap();
    let mut p = g.params(scheduler);
    let shape = g.tensor("pipe.latents_init").shape().to_vec();
    p.init_latents = Some(Tensor::full(shape, value).unwrap());
    pipe.generate(&p, |_, _| {})
}

#[test]
fn non_finite_initial_latents_are_refused() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let e = generate_from("ddim", bad).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        let line = e.to_string();
        assert!(
            line.contains("--init-latents") && line.contains("finite"),
            "{line}"
        );
    }
}

#[test]
fn nan_or_inf_in_the_loop_is_an_error_naming_the_stage_and_step() {
    // Values this large overflow somewhere; each case is where the CPU path overflows first.
    let unet = generate_from("ddim", f32::MAX).unwrap_err();
    assert_eq!(
        unet.to_string(),
        "the UNet produced NaN at step 1 of 4 (256 of 256 values are not finite)"
    );
    let step = generate_from("ddim", -1e38).unwrap_err();
    assert!(
        matches!(
            step,
            Error::NonFinite {
                stage: "the scheduler step",
                step: Some(1),
                steps: 4,
                value: f32::NEG_INFINITY,
                ..
            }
        ),
        "{step:?}"
    );
    // Euler's init_noise_sigma (14.6) overflows 1e38 before the UNet runs.
    let init = generate_from("euler", 1e38).unwrap_err();
    assert!(
        matches!(&init, Error::NonFinite { step: None, .. })
            && init.to_string().contains("init_noise_sigma"),
        "{init:?}"
    );
}

#[test]
fn nan_in_the_decoded_image_is_an_error_not_a_black_image() {
    let e = generate_from("pndm", 3e37).unwrap_err();
    match &e {
        Error::NonFinite {
            stage, step, value, ..
        } => {
            assert_eq!((*stage, *step), ("the VAE decoder", None));
            assert!(value.is_nan());
        }
        other => panic!("{other:?}"),
    }
    // The same pipeline still generates from finite latents.
    let ok = generate_from("pndm", 0.5).unwrap();
    assert!(ok.images.first_non_finite().is_none());
}

#[test]
fn malformed_json_keeps_its_parse_error_as_source() {
    let (_tmp, dir) = copy_model("sd15");
    let config = dir.join("vae/config.json");
    std::fs::write(&config, "{\n  \"in_channels\": 3,\n  oops\n}").unwrap();
    let e = Pipeline::load(&dir, LoadConfig::default()).err().unwrap();
    match &e {
        Error::Load(LoadError::Json { path, source }) => {
            assert_eq!(path, &config);
            assert_eq!(source.line, 3, "{source}");
        }
        other => panic!("{other:?}"),
    }
    let line = e.to_string();
    assert!(
        line.contains("not valid JSON") && line.contains("line 3"),
        "{line}"
    );
    assert!(
        std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<ferry_sd::json::JsonError>())
            .is_some(),
        "{:?}",
        chain(&e)
    );
}
