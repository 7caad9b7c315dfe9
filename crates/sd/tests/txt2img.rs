//! The `txt2img` binary on the tiny committed fixtures: the CLI contract, parity through
//! `--init-latents` / `--save-latents`, batch outputs, and one-line errors for bad input.

mod common;

use common::{fixture, golden};
use std::path::Path;
use std::process::{Command, Output};

fn txt2img(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_txt2img"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failing run: non-zero exit, a one-line `txt2img: error:` message, no panic.
fn assert_clean_error(o: &Output, needle: &str) {
    let e = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {e}");
    assert!(!e.contains("panicked"), "panic trace: {e}");
    let line = e.lines().find(|l| l.starts_with("txt2img: error:"));
    assert!(
        line.is_some_and(|l| l.contains(needle)),
        "wanted '{needle}' in: {e}"
    );
}

fn read_npy(p: &Path) -> ferry_sd::tensor::Tensor {
    ferry_sd::npy::read_f32(p).unwrap()
}

#[test]
fn init_latents_in_saved_latents_out_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init.npy");
    let saved = dir.path().join("final.npy");
    let out = dir.path().join("img.png");
    ferry_sd::npy::write_f32(&init, &golden("sd15", "pipe.latents_init")).unwrap();
    let o = txt2img(&[
        "--model",
        fixture("sd15").to_str().unwrap(),
        "--prompt",
        "a photo of an astronaut riding a horse on mars",
        "--negative-prompt",
        "blurry, low quality",
        "--steps",
        "4",
        "--guidance",
        "7.5",
        "--scheduler",
        "dpmpp-2m",
        "--width",
        "64",
        "--height",
        "32",
        "--init-latents",
        init.to_str().unwrap(),
        "--save-latents",
        saved.to_str().unwrap(),
        "--device",
        "cpu",
        "--offload",
        "sequential",
        "--vram-budget",
        "2MiB",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = read_npy(&saved);
    let want = golden("sd15", "pipe.dpmpp_2m.latents");
    let err = got.max_abs_diff(&want).unwrap() / want.max_abs();
    assert!(err <= 1e-3, "latents rel err {err}");
    assert!(out.exists());
}

#[test]
fn batch_outputs_carry_parameters_and_stats_and_trace_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat.png");
    let trace = dir.path().join("trace.json");
    let o = txt2img(&[
        "--model",
        fixture("sdxl").to_str().unwrap(),
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--batch",
        "2",
        "--seed",
        "7",
        "--stats",
        "--trace",
        trace.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for i in 0..2 {
        let p = dir.path().join(format!("cat-{i}.png"));
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&p).unwrap()));
        let r = dec.read_info().unwrap();
        let info = r.info();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("sdxl").join("unet/config.json")).unwrap(),
        )
        .unwrap();
        let side = cfg["sample_size"].as_u64().unwrap() as u32 * 8;
        assert_eq!((info.width, info.height), (side, side), "sample_size * 8");
        let text = &info.uncompressed_latin1_text;
        assert!(
            text.iter()
                .any(|t| t.keyword == "parameters" && t.text.contains("Seed: 7")),
            "{text:?}"
        );
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("plan: mode") && stdout.contains("overlap"),
        "{stdout}"
    );
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert!(t["traceEvents"].as_array().is_some_and(|e| e.len() > 2));
}

#[test]
fn print_tokens_reads_only_the_tokenizers() {
    // A folder holding just model_index.json and the tokenizer folders.
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("sd15");
    std::fs::copy(
        src.join("model_index.json"),
        dir.path().join("model_index.json"),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("tokenizer")).unwrap();
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(
            src.join("tokenizer").join(f),
            dir.path().join("tokenizer").join(f),
        )
        .unwrap();
    }
    let o = txt2img(&[
        "--model",
        dir.path().to_str().unwrap(),
        "--prompt",
        "a photo of a cat",
        "--negative-prompt",
        "",
        "--print-tokens",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids: Vec<u64> = v["tokenizer"]["prompt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 77);
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    let neg = v["tokenizer"]["negative_prompt"].as_array().unwrap();
    assert_eq!(neg[0], 49406);
    assert_eq!(neg[1], 49407);
}

#[test]
fn bad_input_is_a_one_line_error() {
    let m = fixture("sd15");
    let m = m.to_str().unwrap();
    assert_clean_error(&txt2img(&["--model", "/no/such/model"]), "/no/such/model");
    assert_clean_error(&txt2img(&["--model", m, "--width", "100"]), "multiple of 8");
    assert_clean_error(
        &txt2img(&["--model", m, "--scheduler", "heun", "--steps", "1"]),
        "heun",
    );
    assert_clean_error(
        &txt2img(&["--model", m, "--offload", "group", "--vram-budget", "64KiB"]),
        "minimum workable budget",
    );
    assert_clean_error(&txt2img(&["--model", m, "--device", "cuda"]), "GPU");
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("model.safetensors");
    std::fs::write(&corrupt, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    assert_clean_error(
        &txt2img(&["--model", corrupt.to_str().unwrap()]),
        "model.safetensors",
    );
    let bad = txt2img(&["--model", m, "--vram-budget", "lots"]);
    assert!(!bad.status.success() && stderr(&bad).contains("size"));
}
