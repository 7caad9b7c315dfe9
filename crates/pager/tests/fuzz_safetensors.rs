//! Fuzzing the safetensors header parser on stable Rust with proptest: arbitrary bytes, headers
//! built from random (often hostile) entries — bad dtypes, huge or overflowing shapes such as
//! `[2^40, 2^40]`, offsets out of range, reversed or overlapping, wrong length fields — and byte
//! mutations of a real file. Property: no panic, no hang, either a value that satisfies the
//! layout invariants or an error naming the file, and no more heap than a bound derived from the
//! input size (checked with a counting global allocator; see [`BOUND_FACTOR`]).
//!
//! `FERRY_FUZZ_CASES=100000` runs that many cases per generator instead of the CI default.

use ferry_pager::weights::{byte_len, parse_bytes, DType, TensorInfo};
use ferry_pager::WeightsFile;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::time::{Duration, Instant};

#[path = "counting_alloc/mod.rs"]
mod counting_alloc;

/// Peak heap bytes per case may be at most `BOUND_FACTOR` × input bytes + [`BOUND_BASE`]: parsing
/// builds a `serde_json::Value` tree (a number or an empty object of a few input bytes costs a
/// 32-byte node plus map/vector slack) and a `TensorInfo` per entry, so a few tens of bytes per
/// input byte is the worst honest case; anything proportional to a *claimed* size (a header
/// length, a shape, an offset) instead of the actual input blows far past it.
const BOUND_FACTOR: usize = 64;
/// Fixed allowance for error messages and small tables.
const BOUND_BASE: usize = 1 << 20;
/// A case taking longer than this is a hang (generous for a loaded 2-core CI machine).
const CASE_LIMIT: Duration = Duration::from_secs(2);

/// Runs `f` on `input_len` bytes of input, asserting the heap and time bounds.
fn bounded<R>(what: &str, input_len: usize, f: impl FnOnce() -> R) -> R {
    let start = counting_alloc::start();
    let t = Instant::now();
    let r = f();
    let elapsed = t.elapsed();
    let peak = counting_alloc::peak_since(start);
    let bound = BOUND_FACTOR * input_len + BOUND_BASE;
    assert!(
        peak <= bound,
        "{what}: {peak} heap bytes for {input_len} input bytes (bound {bound})"
    );
    assert!(elapsed <= CASE_LIMIT, "{what}: took {elapsed:?}");
    r
}

/// A runner for `default` cases with a fixed seed (CI runs are reproducible), or for
/// `FERRY_FUZZ_CASES` cases with a fresh random seed (long runs explore further).
fn runner(default: u32) -> TestRunner {
    let long: Option<u32> = std::env::var("FERRY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    let config = Config {
        cases: long.unwrap_or(default),
        failure_persistence: None,
        ..Config::default()
    };
    match long {
        Some(_) => TestRunner::new(config),
        None => TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha)),
    }
}

/// The layout invariants an accepted file must satisfy.
fn check_accepted(bytes: &[u8], data_start: u64, tensors: &[TensorInfo]) {
    assert!(data_start >= 8 && data_start as usize <= bytes.len());
    let data_len = bytes.len() - data_start as usize;
    let mut prev_end = 0;
    for t in tensors {
        assert!(t.offset >= prev_end, "{} overlaps its predecessor", t.name);
        assert!(
            t.offset + t.len <= data_len,
            "{} runs past the data",
            t.name
        );
        assert_eq!(byte_len(t.dtype, &t.shape), Some(t.len), "{}", t.name);
        prev_end = t.offset + t.len;
    }
}

fn parse_checked(what: &str, bytes: &[u8]) {
    let path = Path::new("fuzz.safetensors");
    let r = bounded(what, bytes.len(), || parse_bytes(path, bytes));
    match r {
        Ok((start, tensors)) => check_accepted(bytes, start, &tensors),
        Err(e) => {
            let m = e.to_string();
            assert!(
                m.starts_with("fuzz.safetensors: "),
                "{what}: error without the file: {m}"
            );
        }
    }
}

fn file(header: &[u8], data_len: usize, claimed_len: Option<u64>) -> Vec<u8> {
    let mut out = claimed_len
        .unwrap_or(header.len() as u64)
        .to_le_bytes()
        .to_vec();
    out.extend_from_slice(header);
    out.extend(std::iter::repeat_n(0u8, data_len));
    out
}

#[test]
fn arbitrary_bytes() {
    runner(3000)
        .run(&prop::collection::vec(any::<u8>(), 0..600), |bytes| {
            parse_checked("arbitrary bytes", &bytes);
            Ok(())
        })
        .unwrap();
}

#[test]
fn arbitrary_headers_after_a_valid_length() {
    let header = prop::collection::vec(any::<u8>(), 0..400);
    runner(3000)
        .run(&(header, 0usize..64), |(h, data)| {
            parse_checked("arbitrary header", &file(&h, data, None));
            Ok(())
        })
        .unwrap();
}

/// Dimensions that are usual, borderline or overflowing.
fn dim() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => (0u64..5).prop_map(Value::from),
        2 => Just(Value::from(1u64 << 40)),
        1 => Just(Value::from(1u64 << 62)),
        1 => Just(Value::from(u64::MAX)),
        1 => Just(Value::from(-1i64)),
        1 => Just(json!(1.5)),
        1 => Just(json!("2")),
    ]
}

fn dtype() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => prop::sample::select(vec!["F32", "F16", "BF16", "I64", "I32"]).prop_map(Value::from),
        1 => prop::sample::select(vec!["F8_E4M3", "U8", "f32", "", "F64"]).prop_map(Value::from),
        1 => Just(json!(4)),
        1 => Just(Value::Null),
    ]
}

fn offset() -> impl Strategy<Value = Value> {
    prop_oneof![
        8 => (0u64..200).prop_map(Value::from),
        1 => Just(Value::from(u64::MAX)),
        1 => Just(Value::from(1u64 << 40)),
        1 => Just(json!(-3)),
    ]
}

/// One entry: mostly well-formed, with any field possibly hostile or missing.
fn entry() -> impl Strategy<Value = Value> {
    (
        dtype(),
        prop::collection::vec(dim(), 0..5),
        prop::collection::vec(offset(), 0..4),
        0u8..10,
    )
        .prop_map(|(dtype, shape, offsets, drop)| {
            let mut m = Map::new();
            if drop != 0 {
                m.insert("dtype".into(), dtype);
            }
            if drop != 1 {
                m.insert("shape".into(), Value::Array(shape));
            }
            if drop != 2 {
                m.insert("data_offsets".into(), Value::Array(offsets));
            }
            if drop == 3 {
                return json!([1, 2]);
            }
            Value::Object(m)
        })
}

/// A consistent entry (the right byte count at a random place), to reach the overlap checks.
fn consistent_entry() -> impl Strategy<Value = (String, Value)> {
    (
        "[a-z]{1,3}",
        prop::sample::select(vec![DType::F32, DType::F16, DType::I64]),
        prop::collection::vec(0usize..4, 0..3),
        0usize..64,
    )
        .prop_map(|(name, dt, shape, start)| {
            let len = byte_len(dt, &shape).unwrap_or(0);
            let e =
                json!({"dtype": dt.name(), "shape": shape, "data_offsets": [start, start + len]});
            (name, e)
        })
}

#[test]
fn structured_headers() {
    let entries = prop::collection::vec(
        prop_oneof![
            1 => ("[a-z]{1,3}", entry()),
            2 => consistent_entry(),
        ],
        0..6,
    );
    let metadata = prop_oneof![
        3 => Just(None),
        1 => Just(Some(json!({"format": "pt"}))),
        1 => Just(Some(json!({"format": 3}))),
        1 => Just(Some(json!([]))),
    ];
    let claimed = prop_oneof![
        6 => Just(None),
        1 => Just(Some(u64::MAX)),
        1 => Just(Some(100_000_001u64)),
        1 => (0u64..600).prop_map(Some),
    ];
    runner(3000)
        .run(
            &(entries, metadata, claimed, 0usize..128),
            |(entries, metadata, claimed, data)| {
                let mut m = Map::new();
                if let Some(md) = metadata {
                    m.insert("__metadata__".into(), md);
                }
                for (k, v) in entries {
                    m.insert(k, v);
                }
                let header = serde_json::to_vec(&Value::Object(m)).unwrap();
                parse_checked("structured header", &file(&header, data, claimed));
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn shape_overflow_is_an_error_not_a_wrapped_length() {
    for shape in [
        json!([1u64 << 40, 1u64 << 40]),
        json!([1u64 << 62, 4]),
        json!([u64::MAX, 0, 2]),
    ] {
        let h = json!({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}});
        let bytes = file(&serde_json::to_vec(&h).unwrap(), 16, None);
        let e = parse_bytes(Path::new("x"), &bytes).unwrap_err().to_string();
        assert!(e.contains("tensor 't'"), "{e}");
    }
}

fn real_file() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/dtypes.safetensors"
    ))
    .unwrap()
}

#[test]
fn mutations_of_a_real_file() {
    let base = real_file();
    assert!(parse_bytes(Path::new("x"), &base).is_ok());
    let header_end = 8 + u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let edits = prop::collection::vec((0usize..header_end, any::<u8>(), 0u8..4), 1..8);
    runner(3000)
        .run(&edits, |edits| {
            let mut b = base.clone();
            for (at, byte, how) in edits {
                let at = at.min(b.len().saturating_sub(1));
                match how {
                    0 | 1 => b[at] = byte,
                    2 => b.insert(at, byte),
                    _ => {
                        b.remove(at);
                    }
                }
            }
            parse_checked("mutated file", &b);
            Ok(())
        })
        .unwrap();
}

/// Whole files through `WeightsFile::open` (mmap included), fewer cases: each writes a file.
#[test]
fn files_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.safetensors");
    let base = real_file();
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        (0usize..base.len()).prop_map(move |n| base[..n].to_vec()),
    ];
    runner(200)
        .run(&strategy, |bytes| {
            std::fs::write(&path, &bytes).unwrap();
            match bounded("file", bytes.len(), || WeightsFile::open(&path)) {
                Ok(f) => {
                    for t in f.tensors() {
                        assert_eq!(f.bytes_of(t).len(), t.len);
                    }
                }
                Err(e) => assert!(e.to_string().contains("f.safetensors"), "{e}"),
            }
            Ok(())
        })
        .unwrap();
}
