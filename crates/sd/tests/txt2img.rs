//! The `txt2img` binary on the tiny committed fixtures: the CLI contract, parity through
//! `--init-latents` / `--save-latents`, batch outputs, one-line errors for bad input (found
//! before any weight is read), outputs that never lose an earlier file, UTF-8 parameters, and the
//! memory estimate against the measured peak.

mod common;

use common::{fixture, golden};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

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

/// A failing run whose stderr is exactly one `txt2img: error:` line containing `needle`.
fn assert_one_line_error(o: &Output, needle: &str) {
    assert_clean_error(o, needle);
    let e = stderr(o);
    let lines: Vec<&str> = e.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "more than one line: {e}");
}

/// Copies a fixture folder (recursively) into `dst`.
fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// The sd15 fixture with every weight file cut to 10 bytes: any attempt to open or read a weight
/// fails, naming the file.
fn model_with_truncated_weights(dir: &Path) -> PathBuf {
    let m = dir.join("truncated");
    copy_dir(&fixture("sd15"), &m);
    for c in [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
    ] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.join(c))
            .unwrap();
        f.set_len(10).unwrap();
    }
    let vae = m.join("vae/diffusion_pytorch_model.safetensors");
    std::fs::OpenOptions::new()
        .write(true)
        .open(vae)
        .unwrap()
        .set_len(10)
        .unwrap();
    m
}

/// The sd15 fixture whose UNet file has valid headers but lacks `conv_in.weight`: opening it
/// (configs and headers) works, loading the weights fails.
fn model_missing_a_weight(dir: &Path) -> PathBuf {
    let m = dir.join("missing");
    copy_dir(&fixture("sd15"), &m);
    let f = m.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "conv_in.weight")
        .collect();
    assert_eq!(kept.len() + 1, st.len(), "the fixture has conv_in.weight");
    std::fs::write(&f, safetensors::serialize(kept, None).unwrap()).unwrap();
    m
}

/// `txt2img` timed.
fn timed(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let o = txt2img(args);
    (o, t.elapsed())
}

/// Names of the entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
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
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cuda.png");
    let o = txt2img(&[
        "--model",
        m,
        "--device",
        "cuda",
        "--steps",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]);
    if o.status.success() {
        // A GPU is present: the image is written where asked.
        assert!(out.is_file(), "{}", stderr(&o));
    } else {
        // None: a clean error naming the GPU, and nothing written.
        assert_one_line_error(&o, "GPU");
        assert!(entries(dir.path()).is_empty());
    }
    let corrupt = dir.path().join("model.safetensors");
    std::fs::write(&corrupt, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json").unwrap();
    assert_clean_error(
        &txt2img(&["--model", corrupt.to_str().unwrap()]),
        "model.safetensors",
    );
    let bad = txt2img(&["--model", m, "--vram-budget", "lots"]);
    assert!(!bad.status.success() && stderr(&bad).contains("size"));
}

#[test]
fn bad_values_fail_fast_before_any_weight_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_with_truncated_weights(dir.path());
    let m = m.to_str().unwrap();
    let out = dir.path().join("x.png");
    let out = out.to_str().unwrap();
    // The truncated weights are noticed as soon as the model is opened for real.
    let o = txt2img(&["--model", m, "--steps", "1", "-o", out]);
    assert_one_line_error(&o, ".safetensors");
    let cases: &[(&[&str], &str)] = &[
        (&["--guidance", "nan"], "--guidance"),
        (&["--guidance=-inf"], "finite"),
        (&["--width", "65536", "--height", "65536"], "up to 16384"),
        (&["--batch", "100000"], "between 1 and 64"),
        (&["--batch", "0"], "--batch"),
        (&["--steps", "0"], "between 1 and 1000"),
        (&["--scheduler", "nosuch"], "unknown scheduler"),
        (&["--device", "cuda:x"], "cuda:N"),
        (&["-o", "/nonexistent/dir/x.png"], "/nonexistent/dir"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["--model", m];
        if !extra.contains(&"-o") {
            args.extend(["-o", out]);
        }
        args.extend_from_slice(extra);
        let (o, took) = timed(&args);
        assert_one_line_error(&o, needle);
        let e = stderr(&o);
        assert!(
            !e.contains("safetensors"),
            "{extra:?} read the weights: {e}"
        );
        assert!(took < Duration::from_secs(5), "{extra:?} took {took:?}");
    }
    assert!(!Path::new(out).exists());
}

#[test]
fn a_request_larger_than_memory_is_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_missing_a_weight(dir.path());
    let m = m.to_str().unwrap();
    let out = dir.path().join("x.png");
    let out = out.to_str().unwrap();
    // Loading this model fails...
    let o = txt2img(&["--model", m, "--steps", "1", "--device", "cpu", "-o", out]);
    assert_one_line_error(&o, "conv_in.weight");
    // ...but a request no machine holds (~4.8 TiB for the tiny model) is refused first.
    let (o, took) = timed(&[
        "--model", m, "--width", "16384", "--height", "16384", "--batch", "64", "--device", "cpu",
        "-o", out,
    ]);
    assert_one_line_error(&o, "of host memory for 16384×16384 (batch 64)");
    let e = stderr(&o);
    assert!(e.contains("needs ~") && e.contains("available"), "{e}");
    assert!(!e.contains("conv_in"), "{e}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn verbose_prints_each_cause_on_its_own_line() {
    let m = fixture("sd15");
    let m = m.to_str().unwrap();
    let o = txt2img(&["--model", m, "-o", "/nonexistent/dir/x.png"]);
    assert_one_line_error(&o, "cannot write /nonexistent/dir/x.png: directory");
    let o = txt2img(&["--model", m, "-o", "/nonexistent/dir/x.png", "--verbose"]);
    let e = stderr(&o);
    let lines: Vec<&str> = e.lines().collect();
    assert!(!o.status.success());
    assert_eq!(lines.len(), 2, "{e}");
    assert_eq!(
        lines[0],
        "txt2img: error: cannot write /nonexistent/dir/x.png"
    );
    assert!(
        lines[1].starts_with("  caused by: directory /nonexistent/dir"),
        "{e}"
    );
}

#[test]
fn unicode_prompt_is_kept_exactly_in_the_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lighthouse.png");
    let prompt = "a lighthouse — at dusk, 灯台 🌅";
    let o = txt2img(&[
        "--model",
        fixture("sd15").to_str().unwrap(),
        "--prompt",
        prompt,
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "32",
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let params = ferry_sd::image::read_parameters(&bytes).unwrap().unwrap();
    assert!(
        params.starts_with(&format!("{prompt}\nSteps: 2")),
        "{params}"
    );
    // sd15's own scheduler is PNDM, which AUTOMATIC1111 calls PLMS.
    assert!(params.contains("Sampler: PLMS,"), "{params}");
    // A valid PNG: the pixels decode at the requested size.
    let mut r = png::Decoder::new(std::io::Cursor::new(&bytes[..]))
        .read_info()
        .unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (64, 32));
    assert_eq!(
        entries(dir.path()),
        ["lighthouse.png"],
        "no temporary files"
    );
}

#[test]
fn a_failing_run_never_destroys_an_existing_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("keep.png");
    let latents = dir.path().join("keep.npy");
    let earlier = b"an earlier image, precious".to_vec();
    std::fs::write(&out, &earlier).unwrap();
    std::fs::write(&latents, &earlier).unwrap();
    let m = fixture("sd15");
    let base = [
        "--model",
        m.to_str().unwrap(),
        "--steps",
        "1",
        "--width",
        "64",
        "--height",
        "32",
        "--device",
        "cpu",
        "-o",
        out.to_str().unwrap(),
        "--save-latents",
        latents.to_str().unwrap(),
    ];
    // Fails while loading (budget below the minimum), and before loading (latents of the wrong
    // shape).
    let bad_init = dir.path().join("init.npy");
    ferry_sd::npy::write_f32(
        &bad_init,
        &ferry_sd::tensor::Tensor::new(vec![1, 4, 2, 2], vec![0.0; 16]).unwrap(),
    )
    .unwrap();
    let failing: [&[&str]; 2] = [
        &["--offload", "group", "--vram-budget", "64KiB"],
        &["--init-latents", bad_init.to_str().unwrap()],
    ];
    for extra in failing {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let o = txt2img(&args);
        assert_clean_error(&o, "");
        assert_eq!(std::fs::read(&out).unwrap(), earlier, "{extra:?}");
        assert_eq!(std::fs::read(&latents).unwrap(), earlier, "{extra:?}");
        assert_eq!(entries(dir.path()), ["init.npy", "keep.npy", "keep.png"]);
    }
    // A successful run replaces both with complete files, and leaves no temporary file.
    let o = txt2img(&base);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        ferry_sd::image::read_parameters(&std::fs::read(&out).unwrap())
            .unwrap()
            .is_some()
    );
    assert_eq!(read_npy(&latents).shape(), [1, 4, 4, 8]);
    assert_eq!(entries(dir.path()), ["init.npy", "keep.npy", "keep.png"]);
}

/// The estimate's stated accuracy: within a factor of 2 of the peak resident set (`VmHWM`) that
/// `--stats` reports, for the tiny model at its smallest and at a moderate size.
#[test]
fn memory_estimate_is_within_a_factor_of_two_of_the_measured_peak() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    for (w, h) in [("64", "32"), ("256", "128")] {
        let o = txt2img(&[
            "--model",
            fixture("sd15").to_str().unwrap(),
            "--steps",
            "2",
            "--width",
            w,
            "--height",
            h,
            "--device",
            "cpu",
            "--stats",
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        let line = stdout
            .lines()
            .find(|l| l.starts_with("host memory: estimated"))
            .unwrap_or_else(|| panic!("no estimate line: {stdout}"));
        let nums: Vec<f64> = line
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        if nums.len() < 2 {
            // No /proc/self/status here: nothing measured to compare with.
            continue;
        }
        let ratio = nums[0] / nums[1];
        assert!((0.5..=2.0).contains(&ratio), "{w}x{h}: {line}");
    }
}
