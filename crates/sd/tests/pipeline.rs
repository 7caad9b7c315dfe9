//! End-to-end parity with diffusers' pipelines on the tiny fixtures: final latents within 1e-3 of
//! the reference (relative to its max |value|) and decoded images within 2/255, for several
//! schedulers; bit-identical results across offload modes and budgets.

mod common;

use common::{fixture, golden, rel_err, to_np};
use ferry_sched::Mode;
use ferry_sd::pipeline::{token_ids, GenerateParams, LoadConfig, Pipeline};
use ferry_sd::tensor::Tensor;

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
    let e = pipe.generate(&p, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("width") && e.contains("60"), "{e}");
    let p = GenerateParams {
        scheduler: Some("heun".into()),
        steps: 1,
        ..GenerateParams::default()
    };
    let e = pipe.generate(&p, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("heun"), "{e}");
    let e = Pipeline::load(&model_dir("nope"), LoadConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nope"), "{e}");
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
