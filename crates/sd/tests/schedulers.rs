//! Schedulers against diffusers 0.42.1 (tests/fixtures/schedulers/goldens.*, written by
//! scripts/fixtures/schedulers_goldens.py): timesteps, sigmas, init_noise_sigma, alphas_cumprod
//! and every scaled input and step output of full runs on fixed tensors, for the SD 1.5, SD 2.1
//! and SDXL scheduler configs plus two synthetic ones, each scheduler, with and without Karras
//! sigmas, at 4, 10 and 25 steps.

use ferry_sd::rng::TorchGenerator;
use ferry_sd::schedulers::{build, Scheduler, SchedulerError, SchedulerKind};
use safetensors::SafeTensors;
use serde_json::Value;

/// Largest allowed error of one step's output given diffusers' input, relative to the output's
/// max |value|.
const STEP_TOL: f64 = 1e-6;
/// Largest allowed error along a free-running chain of steps (errors compound).
const CHAIN_TOL: f64 = 2e-5;
/// The zero-terminal-SNR config: torch's float32 sqrt (MKL, within 1 ulp but not correctly
/// rounded) in `rescale_zero_terminal_snr` leaves `alphas_cumprod` near t = 999 off by more than an
/// ulp, and sigmas up to 4096 amplify it.
const ZSNR_TOL: f64 = 1e-4;

fn fixture(rel: &str) -> String {
    format!("{}/../../tests/fixtures/{rel}", env!("CARGO_MANIFEST_DIR"))
}

struct Goldens {
    meta: Value,
    bytes: Vec<u8>,
}

impl Goldens {
    fn load() -> Self {
        let text = std::fs::read_to_string(fixture("schedulers/goldens.json")).expect("read json");
        let bytes = std::fs::read(fixture("schedulers/goldens.safetensors")).expect("read st");
        Self {
            meta: serde_json::from_str(&text).expect("parse json"),
            bytes,
        }
    }

    fn tensor(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("safetensors");
        let t = st.tensor(name).unwrap_or_else(|_| panic!("tensor {name}"));
        let data = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (t.shape().to_vec(), data)
    }

    /// The config text: the real model file for sd15/sd2/sdxl, else the recorded synthetic one.
    fn config_text(&self, name: &str) -> String {
        if ["sd15", "sd2", "sdxl"].contains(&name) {
            std::fs::read_to_string(fixture(&format!(
                "models/{name}/scheduler/scheduler_config.json"
            )))
            .expect("read scheduler config")
        } else {
            serde_json::to_string(&self.meta["configs"][name]).unwrap()
        }
    }
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

/// Max |got - want| / max |finite want|. Non-finite values must coincide: a NaN with a NaN, an
/// infinity with the same infinity (a mismatch panics); anything else non-finite never passes.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want
        .iter()
        .filter(|w| w.is_finite())
        .fold(0f64, |m, &w| m.max((w as f64).abs()));
    let mut worst = 0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !w.is_finite() || !g.is_finite() {
            let same = (w.is_nan() && g.is_nan()) || w == g;
            assert!(same, "non-finite mismatch at {i}: got {g}, want {w}");
            continue;
        }
        let d = (g as f64 - w as f64).abs();
        let e = if scale > 0.0 { d / scale } else { d };
        // `f64::max` would drop a NaN; `d` is finite here, but keep the fold honest anyway.
        worst = if e.is_nan() { f64::NAN } else { worst.max(e) };
    }
    worst
}

#[test]
fn rel_err_rejects_non_finite_mismatches() {
    let want = [1.0f32, -2.0, 0.5, f32::NEG_INFINITY, f32::NAN];
    assert_eq!(rel_err(&want, &want), 0.0);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for at in 0..3 {
            let mut got = want;
            got[at] = bad;
            let r = std::panic::catch_unwind(|| rel_err(&got, &want));
            assert!(r.is_err(), "{bad} at {at} accepted: {r:?}");
            let r = std::panic::catch_unwind(|| rel_err(&want[..3], &got[..3]));
            assert!(r.is_err(), "reference {bad} at {at} accepted: {r:?}");
        }
    }
    // An infinity in the reference does not make the scale infinite (which hid every error).
    let mut got = want;
    got[0] = 1.5;
    assert!((rel_err(&got, &want) - 0.25).abs() < 1e-12);
    got = want;
    got[3] = f32::INFINITY;
    assert!(std::panic::catch_unwind(|| rel_err(&got, &want)).is_err());
}

/// Runs the whole case; Err(msg) where our scheduler refused at some stage.
fn run_case(
    g: &Goldens,
    case: &Value,
    base: &[f32],
    outputs: &[f32],
    n: usize,
    stats: &mut Stats,
) -> Result<(), SchedulerError> {
    let id = case["id"].as_str().unwrap();
    let name = case["scheduler"].as_str();
    let karras = case["karras"].as_bool().unwrap();
    let steps = case["steps"].as_u64().unwrap() as usize;
    let config_name = case["config"].as_str().unwrap();
    let config = g.config_text(config_name);
    let (step_tol, chain_tol) = if config_name == "x_zsnr" {
        (ZSNR_TOL, ZSNR_TOL)
    } else {
        (STEP_TOL, CHAIN_TOL)
    };
    let mut s: Box<dyn Scheduler> = build(name, karras, &config)?;
    s.set_timesteps(steps)?;
    let expect_error = !case["error"].is_null();
    if !expect_error {
        assert_eq!(
            s.kind().class_name(),
            case["class_name"].as_str().unwrap(),
            "{id}: class"
        );
        let (_, ac) = g.tensor(case["alphas_cumprod"].as_str().unwrap());
        // Exact except after rescale_betas_zero_snr, whose float32 sqrt torch takes from MKL
        // (within 1 ulp, not always correctly rounded).
        if bits(s.alphas_cumprod()) != bits(&ac) {
            let e = rel_err(s.alphas_cumprod(), &ac);
            assert!(e <= 1e-6, "{id}: alphas_cumprod rel err {e:e}");
            stats.note(&format!("{id} alphas_cumprod"), e);
        }
        let want_t = f32s(&case["timesteps"]);
        if bits(s.timesteps()) == bits(&want_t) {
            stats.exact_timesteps += 1;
        } else {
            let e = rel_err(s.timesteps(), &want_t);
            assert!(
                e <= 1e-6,
                "{id}: timesteps {:?} want {want_t:?}",
                s.timesteps()
            );
            stats.note(&format!("{id} timesteps"), e);
        }
        if case["sigmas"].is_null() {
            assert!(s.sigmas().is_empty(), "{id}: sigmas");
        } else {
            let want = f32s(&case["sigmas"]);
            if bits(s.sigmas()) == bits(&want) {
                stats.exact_sigmas += 1;
            } else {
                let e = rel_err(s.sigmas(), &want);
                assert!(e <= 1e-6, "{id}: sigmas {:?} want {want:?}", s.sigmas());
                stats.note(&format!("{id} sigmas"), e);
            }
        }
        let want_init = case["init_noise_sigma"].as_f64().unwrap() as f32;
        let got_init = s.init_noise_sigma();
        if got_init != want_init {
            let e = rel_err(&[got_init], &[want_init]);
            assert!(
                e <= 1e-6,
                "{id}: init_noise_sigma {got_init} want {want_init}"
            );
            stats.note(&format!("{id} init_noise_sigma"), e);
        }
    }
    let samples = (!expect_error).then(|| g.tensor(&format!("{id}.samples")).1);
    let scaled =
        (case["has_scaled"].as_bool() == Some(true)).then(|| g.tensor(&format!("{id}.scaled")).1);
    let seed = g.meta["generator_seed"].as_u64().unwrap();
    // Pass 1, only where diffusers ran: each step fed diffusers' own input latents, so its error
    // is that step's alone (stateful schedulers see diffusers' history too).
    let mut exact = true;
    let mut case_worst = 0f64;
    if let Some(sm) = &samples {
        let mut t: Box<dyn Scheduler> = build(name, karras, &config)?;
        t.set_timesteps(steps)?;
        let mut gen = TorchGenerator::manual_seed(seed);
        let want_init = case["init_noise_sigma"].as_f64().unwrap() as f32;
        let first: Vec<f32> = base.iter().map(|&b| b * want_init).collect();
        for i in 0..t.timesteps().len() {
            let latents = if i == 0 {
                &first[..]
            } else {
                &sm[(i - 1) * n..i * n]
            };
            let mut input = latents.to_vec();
            t.scale_model_input(&mut input, i)?;
            if let Some(sc) = &scaled {
                let want = &sc[i * n..(i + 1) * n];
                let e = rel_err(&input, want);
                exact &= bits(&input) == bits(want);
                if e > step_tol {
                    stats
                        .failures
                        .push(format!("{id}: scaled input {i}: rel err {e:e}"));
                }
                case_worst = case_worst.max(e);
            } else {
                assert_eq!(bits(&input), bits(latents), "{id}: scaling is the identity");
            }
            let out = t.step(&outputs[i * n..(i + 1) * n], i, latents, &mut gen)?;
            let want = &sm[i * n..(i + 1) * n];
            let e = rel_err(&out, want);
            exact &= bits(&out) == bits(want);
            if e > step_tol {
                stats
                    .failures
                    .push(format!("{id}: step {i}: rel err {e:e}"));
            }
            case_worst = case_worst.max(e);
        }
    }
    // Pass 2: the free-running chain, as a pipeline runs it; per-step differences may compound.
    let mut gen = TorchGenerator::manual_seed(seed);
    let init = s.init_noise_sigma();
    let mut latents: Vec<f32> = base.iter().map(|&b| b * init).collect();
    let mut chain_worst = 0f64;
    for i in 0..s.timesteps().len() {
        let mut input = latents.clone();
        s.scale_model_input(&mut input, i)?;
        latents = s.step(&outputs[i * n..(i + 1) * n], i, &latents, &mut gen)?;
        if let Some(sm) = &samples {
            let e = rel_err(&latents, &sm[i * n..(i + 1) * n]);
            if e > chain_tol {
                stats
                    .failures
                    .push(format!("{id}: chained step {i}: rel err {e:e}"));
            }
            chain_worst = chain_worst.max(e);
        }
    }
    if !expect_error && chain_worst > 0.0 {
        stats.note(&format!("{id} chain"), chain_worst);
    }
    if !expect_error {
        assert_eq!(
            s.timesteps().len() as u64,
            case["num_steps_run"].as_u64().unwrap(),
            "{id}: steps run"
        );
        if exact {
            stats.exact_runs += 1;
        } else {
            stats.note(&format!("{id} steps"), case_worst);
        }
    }
    Ok(())
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[derive(Default)]
struct Stats {
    exact_timesteps: usize,
    exact_sigmas: usize,
    exact_runs: usize,
    inexact: Vec<(String, f64)>,
    failures: Vec<String>,
}

impl Stats {
    fn note(&mut self, what: &str, e: f64) {
        self.inexact.push((what.to_owned(), e));
    }
}

#[test]
fn matches_diffusers_runs() {
    let g = Goldens::load();
    let (_, base) = g.tensor("base");
    let (oshape, outputs) = g.tensor("model_outputs");
    let n = base.len();
    assert_eq!(oshape[1], n);
    let cases = g.meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 150);
    let mut stats = Stats::default();
    let (mut ran, mut refused, mut diffusers_bug) = (0, 0, 0);
    for case in cases {
        let id = case["id"].as_str().unwrap();
        let r = run_case(&g, case, &base, &outputs, n, &mut stats);
        match (&case["error"], r) {
            (Value::Null, Ok(())) => ran += 1,
            (Value::Null, Err(e)) => panic!("{id}: diffusers ran it but we failed: {e}"),
            // diffusers' `index_for_timestep` starts at index 1 when the first timestep repeats
            // (Karras timesteps rounded to integers can) and runs off the end: a diffusers bug we
            // do not copy; our step index is the loop index.
            (want, Ok(())) if want.as_str().is_some_and(|w| w.contains("IndexError")) => {
                diffusers_bug += 1
            }
            (want, Ok(())) => panic!("{id}: expected an error like {want}, but it ran"),
            (_, Err(_)) => refused += 1,
        }
    }
    stats.inexact.sort_by(|a, b| b.1.total_cmp(&a.1));
    eprintln!(
        "{ran} runs ({} bit-exact), {refused} refused as diffusers/Ferry do, {diffusers_bug} \
         diffusers IndexErrors we run; timesteps exact {}, sigmas exact {}; largest inexact: {:?}",
        stats.exact_runs,
        stats.exact_timesteps,
        stats.exact_sigmas,
        &stats.inexact[..stats.inexact.len().min(40)]
    );
    assert!(ran >= 100);
    assert!(stats.failures.is_empty(), "{:#?}", stats.failures);
}

fn sdxl_config() -> String {
    std::fs::read_to_string(fixture("models/sdxl/scheduler/scheduler_config.json")).unwrap()
}

#[test]
fn unknown_scheduler_name_is_an_error() {
    let e = build(Some("lms"), false, &sdxl_config()).unwrap_err();
    assert!(matches!(e, SchedulerError::UnknownName(_)));
    assert!(e.to_string().contains("dpmpp-2m"), "{e}");
}

#[test]
fn names_and_aliases() {
    for k in SchedulerKind::ALL {
        assert_eq!(SchedulerKind::from_name(k.cli_name()).unwrap(), k);
        assert_eq!(SchedulerKind::from_name(k.class_name()).unwrap(), k);
        assert_eq!(SchedulerKind::from_class_name(k.class_name()), Some(k));
    }
    assert_eq!(
        SchedulerKind::from_name("DPMPP_2M").unwrap(),
        SchedulerKind::DpmSolverMultistep
    );
    // The model's own class.
    let s = build(None, false, &sdxl_config()).unwrap();
    assert_eq!(s.kind(), SchedulerKind::Euler);
}

#[test]
fn bad_configs_are_errors() {
    let cases: &[(&str, &str)] = &[
        ("not json", "valid"),
        ("[1, 2]", "JSON object"),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "beta_schedule": "cubic"}"#,
            "beta_schedule",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "beta_start": "small"}"#,
            "beta_start",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": -5}"#,
            "num_train_timesteps",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "random"}"#,
            "timestep_spacing",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "prediction_type": "noise"}"#,
            "prediction_type",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "trained_betas": [0.1, 0.2]}"#,
            "trained_betas",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "thresholding": true}"#,
            "thresholding",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "clip_sample": "yes"}"#,
            "clip_sample",
        ),
        (
            r#"{"_class_name": "LMSDiscreteScheduler"}"#,
            "LMSDiscreteScheduler",
        ),
        (r#"{"beta_schedule": "linear"}"#, "_class_name"),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "solver_order": 5}"#,
            "solver_order",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}"#,
            "sde-dpmsolver++",
        ),
        (
            r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"}"#,
            "sigma_min",
        ),
        (
            r#"{"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": true, "use_exponential_sigmas": true}"#,
            "only one",
        ),
        (
            r#"{"_class_name": "EulerAncestralDiscreteScheduler", "prediction_type": "sample"}"#,
            "sample",
        ),
    ];
    for (json, needle) in cases {
        let e = build(None, false, json)
            .and_then(|mut s| s.set_timesteps(4))
            .expect_err(json);
        assert!(e.to_string().contains(needle), "{json}: {e}");
    }
}

#[test]
fn karras_is_rejected_where_diffusers_has_none() {
    for name in ["ddim", "pndm", "euler-a"] {
        let e = build(Some(name), true, &sdxl_config()).unwrap_err();
        assert!(matches!(e, SchedulerError::Unsupported(_)), "{name}");
        assert!(e.to_string().contains("Karras"), "{e}");
    }
    for name in ["euler", "dpmpp-2m"] {
        let mut s = build(Some(name), true, &sdxl_config()).unwrap();
        s.set_timesteps(10).unwrap();
        // Karras timesteps are not the evenly spaced ones.
        let plain = {
            let mut p = build(Some(name), false, &sdxl_config()).unwrap();
            p.set_timesteps(10).unwrap();
            p.timesteps().to_vec()
        };
        // Different, and not merely because of a NaN (which is unequal to everything).
        assert!(s.timesteps().iter().all(|t| t.is_finite()), "{name}");
        assert_ne!(s.timesteps(), &plain[..], "{name}");
    }
}

#[test]
fn misuse_is_an_error() {
    let mut gen = TorchGenerator::manual_seed(0);
    for name in ["ddim", "pndm", "euler", "euler-a", "dpmpp-2m"] {
        let mut s = build(Some(name), false, &sdxl_config()).unwrap();
        assert!(s.set_timesteps(0).is_err(), "{name}: 0 steps");
        s.set_timesteps(4).unwrap();
        let x = vec![0.5f32; 8];
        // Mismatched lengths.
        assert!(
            s.step(&[0.0; 7], 0, &x, &mut gen).is_err(),
            "{name}: lengths"
        );
        // Out of range.
        let len = s.timesteps().len();
        assert!(s.step(&x, len, &x, &mut gen).is_err(), "{name}: index");
        assert!(s.scale_model_input(&mut x.clone(), len).is_err(), "{name}");
    }
    // Multistep schedulers need their steps in order.
    for name in ["pndm", "dpmpp-2m"] {
        let mut s = build(Some(name), false, &sdxl_config()).unwrap();
        s.set_timesteps(4).unwrap();
        let x = vec![0.5f32; 8];
        assert!(
            s.step(&x, 1, &x, &mut gen).is_err(),
            "{name}: skipped step 0"
        );
        s.step(&x, 0, &x, &mut gen).unwrap();
        assert!(
            s.step(&x, 0, &x, &mut gen).is_err(),
            "{name}: repeated step 0"
        );
    }
    // DDIM cannot take more steps than it was trained with.
    let mut s = build(Some("ddim"), false, &sdxl_config()).unwrap();
    assert!(s.set_timesteps(1001).is_err());
}
