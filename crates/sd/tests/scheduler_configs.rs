//! Scheduler configs exactly as diffusers 0.42.1 saves them (tests/fixtures/schedulers/saved/,
//! written by scripts/fixtures/saved_scheduler_configs.py): every class Ferry supports, from the
//! SD 1.5 and SDXL configs, with and without Karras sigmas. DPM-Solver's files carry
//! `"lambda_min_clipped": -Infinity`, which Python's JSON writes and strict JSON parsers reject.
//! Each must load with its own class and give diffusers' 10-step schedule.

use ferry_sd::schedulers::build;
use serde_json::Value;

fn saved(rel: &str) -> String {
    format!(
        "{}/../../tests/fixtures/schedulers/saved/{rel}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

/// Largest relative difference; NaN (a NaN on either side) when any element is not comparable.
fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    got.iter().zip(want).fold(0.0, |m: f64, (&g, &w)| {
        let d = (g as f64 - w).abs() / w.abs().max(1.0);
        if d.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(d)
        }
    })
}

#[test]
fn every_saved_class_loads_and_matches_diffusers_schedule() {
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(saved("expected.json")).expect("expected.json"),
    )
    .expect("parse expected.json");
    let cases = meta["cases"].as_object().expect("cases");
    assert!(cases.len() >= 14, "fixture lists {} cases", cases.len());
    let mut with_infinity = 0;
    for (case, want) in cases {
        let text = std::fs::read_to_string(saved(&format!("{case}/scheduler_config.json")))
            .expect("config file");
        if text.contains("-Infinity") {
            with_infinity += 1;
        }
        let mut s = build(None, false, &text).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(s.kind().class_name(), want["class"], "{case}");
        assert_eq!(s.kind().cli_name(), want["scheduler"], "{case}");
        let steps = want["steps"].as_u64().expect("steps") as usize;
        s.set_timesteps(steps).expect("set_timesteps");
        let t = floats(&want["timesteps"]);
        assert_eq!(s.timesteps().len(), t.len(), "{case}: timesteps");
        // Karras timesteps come from an interpolation that torch and Ferry round differently
        // (within a few f32 ulps), as in tests/schedulers.rs.
        let e = max_rel(s.timesteps(), &t);
        assert!(
            e <= 1e-6,
            "{case}: timesteps off by {e}: {:?}",
            s.timesteps()
        );
        let sig = floats(&want["sigmas"]);
        assert_eq!(s.sigmas().len(), sig.len(), "{case}: sigmas");
        let e = max_rel(s.sigmas(), &sig);
        assert!(e <= 1e-6, "{case}: sigmas off by {e}");
        let init = want["init_noise_sigma"].as_f64().expect("init_noise_sigma");
        let e = max_rel(&[s.init_noise_sigma()], &[init]);
        assert!(e <= 1e-6, "{case}: init_noise_sigma off by {e}");
    }
    assert_eq!(with_infinity, 4, "the DPM-Solver files carry -Infinity");
}

#[test]
fn comparison_helper_rejects_nan() {
    assert!(max_rel(&[1.0, f32::NAN], &[1.0, 2.0]).is_nan());
    assert!(max_rel(&[1.0, 2.0], &[1.0, f64::NAN]).is_nan());
    let inf = max_rel(&[f32::INFINITY], &[1.0]);
    assert!(
        inf.is_nan() || inf > 1e-6,
        "an infinite output is not within tolerance"
    );
    assert_eq!(max_rel(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
}

#[test]
fn the_dpm_solver_files_keep_minus_infinity() {
    // Editing the literal to a malformed one must be refused with its position.
    let text = std::fs::read_to_string(saved(
        "sd15_DPMSolverMultistepScheduler/scheduler_config.json",
    ))
    .expect("config");
    let broken = text.replace("-Infinity", "-Infinityy");
    let e = build(None, false, &broken).unwrap_err().to_string();
    assert!(e.contains("line") && e.contains("column"), "{e}");
}
