//! `TorchGenerator::randn` against torch's own output (tests/fixtures/randn/goldens.json, written by
//! scripts/fixtures/randn_goldens.py), bit for bit, for both Box-Muller paths.

use ferry_sd::rng::{BoxMullerPath, TorchGenerator};
use serde_json::Value;

fn goldens() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/randn/goldens.json"
    );
    let text = std::fs::read_to_string(path).expect("read randn goldens");
    serde_json::from_str(&text).expect("parse randn goldens")
}

fn fnv1a64(values: &[f32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn check_path(name: &str, path: BoxMullerPath) {
    let g = goldens();
    let cases = g["paths"][name].as_array().expect("cases");
    assert!(cases.len() >= 10);
    let mut checked = 0usize;
    for case in cases {
        let seed: u64 = case["seed"].as_str().unwrap().parse().unwrap();
        let mut gen = TorchGenerator::with_path(seed, path);
        for (k, call) in case["calls"].as_array().unwrap().iter().enumerate() {
            let n = call["numel"].as_u64().unwrap() as usize;
            let got = gen.randn(n);
            let what = format!("{name} seed {seed} call {k} shape {}", call["shape"]);
            if let Some(bits) = call["bits"].as_array() {
                assert_eq!(bits.len(), n);
                for (i, b) in bits.iter().enumerate() {
                    let want = b.as_u64().unwrap() as u32;
                    assert_eq!(
                        got[i].to_bits(),
                        want,
                        "{what} index {i}: got {} want {}",
                        got[i],
                        f32::from_bits(want)
                    );
                    checked += 1;
                }
            } else {
                for s in call["samples"].as_array().unwrap() {
                    let i = s[0].as_u64().unwrap() as usize;
                    let want = s[1].as_u64().unwrap() as u32;
                    assert_eq!(
                        got[i].to_bits(),
                        want,
                        "{what} index {i}: got {} want {}",
                        got[i],
                        f32::from_bits(want)
                    );
                    checked += 1;
                }
                assert_eq!(
                    fnv1a64(&got),
                    call["fnv1a64"].as_str().unwrap(),
                    "{what} hash"
                );
            }
        }
    }
    assert!(checked > 1000);
}

#[test]
fn randn_matches_torch_avx2_path() {
    check_path("avx2", BoxMullerPath::Avx2);
}

#[test]
fn randn_matches_torch_scalar_path() {
    check_path("scalar", BoxMullerPath::Scalar);
}

#[test]
fn manual_seed_defaults_to_avx2_path() {
    assert_eq!(TorchGenerator::manual_seed(0).path(), BoxMullerPath::Avx2);
    let a = TorchGenerator::manual_seed(3).randn(40);
    let b = TorchGenerator::with_path(3, BoxMullerPath::Avx2).randn(40);
    assert_eq!(a, b);
}

#[test]
fn empty_randn_draws_nothing() {
    let mut g = TorchGenerator::manual_seed(0);
    assert!(g.randn(0).is_empty());
    let mut fresh = TorchGenerator::manual_seed(0);
    assert_eq!(g.random_u32(), fresh.random_u32());
}
