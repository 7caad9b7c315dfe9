//! A pipeline folder as current libraries save it (tests/fixtures/models/sd15_hub, written by
//! scripts/fixtures/hub_layouts.py): diffusers 0.42.1's DPM-Solver++ `scheduler_config.json` with
//! `"lambda_min_clipped": -Infinity` and a transformers 5 tokenizer folder holding only
//! `tokenizer.json`. It must load, tokenise like transformers, and generate diffusers' goldens with
//! its own scheduler and with any scheduler named on the command line.

mod common;

use std::path::Path;
use std::process::Command;

use common::{fixture, golden, golden_ids, to_np};
use ferry_sd::pipeline::{token_ids, GenerateParams, LoadConfig, Pipeline};
use ferry_sd::tensor::Tensor;

const MODEL: &str = "sd15_hub";

fn goldens_json() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(MODEL).join("goldens.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The goldens' prompt, size, steps and guidance on sd15's initial latents.
fn params(scheduler: Option<&str>) -> GenerateParams {
    let g = goldens_json();
    let p = &g["pipeline"];
    GenerateParams {
        prompt: p["prompt"].as_str().unwrap().into(),
        negative_prompt: p["negative_prompt"].as_str().map(String::from),
        steps: p["steps"].as_u64().unwrap() as usize,
        guidance: p["guidance_scale"].as_f64().unwrap() as f32,
        scheduler: scheduler.map(String::from),
        width: Some(p["width"].as_u64().unwrap() as usize),
        height: Some(p["height"].as_u64().unwrap() as usize),
        init_latents: Some(golden(MODEL, "pipe.latents_init")),
        ..GenerateParams::default()
    }
}

/// max |a - b|, or infinity when either holds a NaN or an infinity (a fold with `f32::max` would
/// drop NaNs, so an all-NaN output would pass).
fn max_diff_finite(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let mut worst = 0.0f32;
    for (&x, &y) in a.data().iter().zip(b.data()) {
        if !x.is_finite() || !y.is_finite() {
            return f32::INFINITY;
        }
        worst = worst.max((x - y).abs());
    }
    worst
}

/// max |a - b| relative to max |b|; infinity on any non-finite value.
fn rel_err_finite(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b.data().iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "zero reference");
    max_diff_finite(a, b) / scale
}

/// Asserts `out` is within 1e-3 (latents, relative) and 2/255 (image) of diffusers' `run`.
#[track_caller]
fn assert_matches(latents: &Tensor, images: &Tensor, run: &str) {
    let want = golden(MODEL, &format!("pipe.{run}.latents"));
    let e = rel_err_finite(latents, &want);
    assert!(e <= 1e-3, "{run}: latents rel err {e}");
    assert!(
        images.data().iter().all(|v| v.is_finite()),
        "{run}: image holds NaN or infinity"
    );
    let img = golden(MODEL, &format!("pipe.{run}.image"));
    let d = max_diff_finite(&to_np(images), &img);
    assert!(d <= 2.0 / 255.0, "{run}: image max diff {d}");
    eprintln!("{MODEL} {run}: latents {e:.2e}, image {d:.2e}");
}

#[test]
fn comparisons_fail_on_nan_and_infinity() {
    let a = Tensor::new(vec![3], vec![1.0, 2.0, 3.0]).unwrap();
    assert_eq!(max_diff_finite(&a, &a), 0.0);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let b = Tensor::new(vec![3], vec![1.0, bad, 3.0]).unwrap();
        assert_eq!(max_diff_finite(&b, &a), f32::INFINITY);
        assert_eq!(max_diff_finite(&a, &b), f32::INFINITY);
        assert!(rel_err_finite(&b, &a) > 1e-3);
    }
    let nan = Tensor::new(vec![3], vec![f32::NAN; 3]).unwrap();
    assert!(rel_err_finite(&nan, &a) > 1e-3);
}

#[test]
fn folder_is_what_current_libraries_save() {
    let dir = fixture(MODEL);
    let sched = std::fs::read_to_string(dir.join("scheduler/scheduler_config.json")).unwrap();
    assert!(sched.contains("\"_class_name\": \"DPMSolverMultistepScheduler\""));
    assert!(
        sched.contains("\"lambda_min_clipped\": -Infinity"),
        "{sched}"
    );
    let mut tok: Vec<String> = std::fs::read_dir(dir.join("tokenizer"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    tok.sort();
    assert_eq!(tok, ["tokenizer.json", "tokenizer_config.json"]);
    let cfg = std::fs::read_to_string(dir.join("tokenizer/tokenizer_config.json")).unwrap();
    assert!(cfg.contains("\"backend\": \"tokenizers\""));
    assert!(!cfg.contains("added_tokens_decoder"));
}

#[test]
fn tokenizer_json_folder_gives_transformers_ids() {
    let want = golden_ids(MODEL, "text_encoder.input_ids");
    let g = goldens_json();
    let p = &g["pipeline"];
    let got = token_ids(
        &fixture(MODEL),
        p["prompt"].as_str().unwrap(),
        p["negative_prompt"].as_str(),
    )
    .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].prompt, want[0]);
    assert_eq!(got[0].negative_prompt.as_ref(), Some(&want[1]));
    // The same ids as the vocab.json + merges.txt folder it was saved from.
    let classic = token_ids(
        &fixture("sd15"),
        p["prompt"].as_str().unwrap(),
        p["negative_prompt"].as_str(),
    )
    .unwrap();
    assert_eq!(got, classic);
}

#[test]
fn own_dpm_solver_scheduler_matches_diffusers() {
    let g = goldens_json();
    let run = &g["pipeline"]["runs"]["dpmpp"];
    assert_eq!(run["scheduler_class"], "DPMSolverMultistepScheduler");
    assert_eq!(run["scheduler_config"]["lambda_min_clipped"], "-inf");
    assert_eq!(run["scheduler_config"]["algorithm_type"], "dpmsolver++");
    let pipe = Pipeline::load(&fixture(MODEL), LoadConfig::default()).unwrap();
    let out = pipe.generate(&params(None), |_, _| {}).unwrap();
    assert_matches(&out.latents, &out.images, "dpmpp");
    // Named explicitly, DPM-Solver++ (order 2) is the folder's own.
    let out = pipe.generate(&params(Some("dpmpp-2m")), |_, _| {}).unwrap();
    assert_matches(&out.latents, &out.images, "dpmpp");
    assert!(pipe.races().is_empty(), "{:?}", pipe.races());
}

#[test]
fn named_schedulers_on_the_folder_match_diffusers() {
    // The runs differ, so a run with the wrong scheduler fails the check.
    let dpm = golden(MODEL, "pipe.dpmpp.latents");
    for name in ["ddim", "euler", "pndm"] {
        let other = golden(MODEL, &format!("pipe.{name}.latents"));
        assert!(rel_err_finite(&other, &dpm) > 1e-2, "{name}");
    }
    let pipe = Pipeline::load(&fixture(MODEL), LoadConfig::default()).unwrap();
    for name in ["ddim", "euler", "pndm"] {
        let out = pipe.generate(&params(Some(name)), |_, _| {}).unwrap();
        assert_matches(&out.latents, &out.images, name);
    }
    // No golden for euler-a (it draws noise), but it must run to finite output.
    let out = pipe.generate(&params(Some("euler-a")), |_, _| {}).unwrap();
    assert!(out.latents.data().iter().all(|v| v.is_finite()));
}

#[test]
fn txt2img_scheduler_ddim_on_the_folder_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init.npy");
    let saved = dir.path().join("final.npy");
    let png = dir.path().join("out.png");
    ferry_sd::npy::write_f32(&init, &golden(MODEL, "pipe.latents_init")).unwrap();
    let g = goldens_json();
    let p = &g["pipeline"];
    let arg = |v: &serde_json::Value| v.to_string().trim_matches('"').to_string();
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let args = [
        "--model".into(),
        path(&fixture(MODEL)),
        "--prompt".into(),
        arg(&p["prompt"]),
        "--negative-prompt".into(),
        arg(&p["negative_prompt"]),
        "--steps".into(),
        arg(&p["steps"]),
        "--guidance".into(),
        arg(&p["guidance_scale"]),
        "--width".into(),
        arg(&p["width"]),
        "--height".into(),
        arg(&p["height"]),
        "--scheduler".into(),
        "ddim".into(),
        "--device".into(),
        "cpu".into(),
        "--init-latents".into(),
        path(&init),
        "--save-latents".into(),
        path(&saved),
        "-o".into(),
        path(&png),
    ];
    let o = Command::new(env!("CARGO_BIN_EXE_txt2img"))
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let got = ferry_sd::npy::read_f32(&saved).unwrap();
    let want = golden(MODEL, "pipe.ddim.latents");
    let e = rel_err_finite(&got, &want);
    assert!(e <= 1e-3, "latents rel err {e}");
    assert!(std::fs::metadata(&png).unwrap().len() > 100);
}
