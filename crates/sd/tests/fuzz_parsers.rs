//! Fuzzing every parser that takes user files or text, on stable Rust with proptest: the
//! Python-style JSON reader, the UNet / VAE / CLIP config parsers on mutated real configs (and
//! building the model from what they accept), the single-file checkpoint key mapping on
//! checkpoints with random subsets and renames of real keys, `.npy` latents files, the CLIP
//! tokenizer on arbitrary Unicode and lossy-decoded bytes, and CLI size strings.
//!
//! Property for every case: no panic, no hang (a time bound per case), either a value or an error
//! with a message, and no more heap than `BOUND_FACTOR` × input bytes + `BOUND_BASE` (a counting
//! global allocator measures each case's peak on its own thread).
//!
//! `FERRY_FUZZ_CASES=100000` runs that many cases per generator instead of the CI default.

mod common;

use common::fixture;
use ferry_sd::models::clip::ClipTextConfig;
use ferry_sd::models::unet::{UNet2DConditionModel, UNetConfig};
use ferry_sd::models::vae::{Vae, VaeConfig};
use ferry_sd::tokenizer::ClipTokenizer;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[path = "../../pager/tests/counting_alloc/mod.rs"]
mod counting_alloc;

/// Peak heap bytes per case may be at most `BOUND_FACTOR` × input bytes + [`BOUND_BASE`]. JSON
/// becomes a `serde_json::Value` tree (a 2-byte `[]` or `0,` costs a 32-byte node plus vector
/// slack), tokens become ids and cache entries, a mapping copies each key a few times: a few
/// tens of bytes per input byte is the worst honest case, while anything sized by a *claimed*
/// count (a shape, a layer count, a length field) exceeds it by orders of magnitude.
const BOUND_FACTOR: usize = 64;
/// Fixed allowance: error messages, regex scratch space, small tables.
const BOUND_BASE: usize = 1 << 20;
/// The tokenizer's fixed allowance: the `regex` crate grows a lazy-DFA cache per pattern on
/// first use (up to about 2 MiB each by default; the tokenizer has two patterns), whatever the
/// input length.
const TOKENIZER_BASE: usize = 5 << 20;
/// A case taking longer than this is a hang (generous for a loaded 2-core CI machine).
const CASE_LIMIT: Duration = Duration::from_secs(3);

/// Runs `f` on `input_len` bytes of input, asserting the heap and time bounds.
fn bounded<R>(what: &str, input_len: usize, f: impl FnOnce() -> R) -> R {
    bounded_with(what, input_len, BOUND_BASE, f)
}

/// [`bounded`] with another fixed allowance.
fn bounded_with<R>(what: &str, input_len: usize, base: usize, f: impl FnOnce() -> R) -> R {
    let start = counting_alloc::start();
    let t = Instant::now();
    let r = f();
    let elapsed = t.elapsed();
    let peak = counting_alloc::peak_since(start);
    let bound = BOUND_FACTOR * input_len + base;
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

/// An error's message, with its sources.
fn message(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// JSON

/// Text that looks like JSON often enough to get past the first character.
fn jsonish() -> impl Strategy<Value = String> {
    let atom = prop_oneof![
        Just("NaN".to_string()),
        Just("Infinity".to_string()),
        Just("-Infinity".to_string()),
        Just("-".to_string()),
        Just("1e999".to_string()),
        Just("\"a\\\"NaN\"".to_string()),
        Just("\"\\u0000ferry-non-finite:NaN\"".to_string()),
        Just("null".to_string()),
        "-?[0-9]{1,20}(\\.[0-9]{0,5})?".prop_map(String::from),
        "\"[a-zé灯\\\\\"\n]{0,6}\"".prop_map(String::from),
        prop::sample::select(vec!["{", "}", "[", "]", ":", ",", " ", "\n", "\""])
            .prop_map(String::from),
    ];
    prop::collection::vec(atom, 0..40).prop_map(|v| v.concat())
}

fn check_json(what: &str, text: &str) {
    let r = bounded(what, text.len(), || ferry_sd::json::parse(text));
    if let Err(e) = r {
        assert!(
            e.line >= 1 && e.column >= 1 && !e.message.is_empty(),
            "{e:?}"
        );
        assert!(
            e.line <= text.lines().count().max(1) + 1,
            "{what}: line {} past the text",
            e.line
        );
    }
}

#[test]
fn json_arbitrary_text() {
    runner(2000)
        .run(&any::<String>(), |s| {
            check_json("arbitrary text", &s);
            Ok(())
        })
        .unwrap();
    runner(2000)
        .run(&jsonish(), |s| {
            check_json("json-ish text", &s);
            Ok(())
        })
        .unwrap();
}

#[test]
fn json_deep_nesting_is_an_error_not_a_stack_overflow() {
    for open in ["[", "{\"a\":", "[NaN,"] {
        let text = open.repeat(100_000);
        check_json("deep nesting", &text);
        assert!(ferry_sd::json::parse(&text).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// Configs

fn configs(component: &str) -> Vec<String> {
    ["sd15", "sd2", "sdxl"]
        .iter()
        .flat_map(|m| {
            let mut v = vec![format!("{m}/{component}/config.json")];
            if component == "text_encoder" {
                v.push(format!("{m}/text_encoder_2/config.json"));
            }
            v
        })
        .filter_map(|rel| std::fs::read_to_string(fixture(&rel)).ok())
        .collect()
}

/// A hostile replacement for a config value.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("NaN".to_string()),
        Just("-Infinity".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("1e300".to_string()),
        Just("18446744073709551615".to_string()),
        Just("4294967296".to_string()),
        Just("1000000000".to_string()),
        Just("[]".to_string()),
        Just("[0, 0, 0, 0]".to_string()),
        Just("[1000000000]".to_string()),
        Just("[320, 640, 1280, 1280, 1280, 1280, 1280, 1280]".to_string()),
        Just("null".to_string()),
        Just("\"\"".to_string()),
        Just("\"CrossAttnDownBlock2D\"".to_string()),
        Just("{}".to_string()),
        Just("true".to_string()),
        (0u64..5000).prop_map(|n| n.to_string()),
    ]
}

#[derive(Clone, Debug)]
enum Edit {
    /// Replace the value of the i-th key (mod key count).
    Replace(usize, String),
    /// Remove the i-th key.
    Remove(usize),
    /// Change one byte of the text.
    Byte(usize, u8),
    /// Cut the text at a position.
    Truncate(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(
        prop_oneof![
            6 => (any::<usize>(), hostile()).prop_map(|(i, v)| Edit::Replace(i, v)),
            2 => any::<usize>().prop_map(Edit::Remove),
            1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Byte(i, b)),
            1 => any::<usize>().prop_map(Edit::Truncate),
        ],
        1..5,
    )
}

/// Applies `edits` to a config's text (keys edited through the parsed object, re-serialised
/// with the hostile value spliced in as text so Python literals survive).
fn mutate(text: &str, edits: &[Edit]) -> String {
    let mut text = text.to_string();
    for e in edits {
        match e {
            Edit::Replace(i, _) | Edit::Remove(i) => {
                let Ok(Value::Object(mut m)) = ferry_sd::json::parse(&text) else {
                    continue;
                };
                if m.is_empty() {
                    continue;
                }
                let key = m.keys().nth(i % m.len()).cloned().unwrap_or_default();
                let placeholder = "\u{1}PLACEHOLDER\u{1}";
                match e {
                    Edit::Replace(..) => {
                        m.insert(key, json!(placeholder));
                    }
                    _ => {
                        m.remove(&key);
                    }
                }
                let out = serde_json::to_string_pretty(&Value::Object(m)).unwrap_or_default();
                text = match e {
                    Edit::Replace(_, v) => {
                        out.replace(&format!("\"{}\"", "\\u0001PLACEHOLDER\\u0001"), v)
                    }
                    _ => out,
                };
            }
            Edit::Byte(i, b) => {
                let mut bytes = text.into_bytes();
                if !bytes.is_empty() {
                    let n = bytes.len();
                    bytes[i % n] = *b;
                }
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            Edit::Truncate(i) => {
                let mut at = i % (text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.truncate(at);
            }
        }
    }
    text
}

fn fuzz_config(component: &str, parse: impl Fn(&str) -> Result<(), String>) {
    let bases = configs(component);
    assert!(!bases.is_empty(), "no {component} configs");
    for b in &bases {
        parse(b).unwrap_or_else(|e| panic!("{component}: a real config fails: {e}"));
    }
    let strategy = (0..bases.len(), edits());
    runner(400)
        .run(&strategy, |(i, edits)| {
            let text = mutate(&bases[i], &edits);
            let r = bounded(component, text.len(), || parse(&text));
            if let Err(m) = r {
                assert!(!m.is_empty());
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn unet_configs() {
    fuzz_config("unet", |t| {
        let cfg = UNetConfig::from_json(t).map_err(|e| message(&e))?;
        // What the loader does next with an accepted config.
        let unet = UNet2DConditionModel::new(cfg).map_err(|e| message(&e))?;
        let _ = unet.groups();
        Ok(())
    });
}

#[test]
fn vae_configs() {
    fuzz_config("vae", |t| {
        let cfg = VaeConfig::from_json(t).map_err(|e| message(&e))?;
        let vae = Vae::new(cfg).map_err(|e| message(&e))?;
        let _ = vae.groups();
        Ok(())
    });
}

#[test]
fn clip_configs() {
    fuzz_config("text_encoder", |t| {
        ClipTextConfig::from_json(t).map_err(|e| message(&e))?;
        let m = ferry_sd::models::clip::ClipTextModel::from_config_json(t, "text_encoder")
            .map_err(|e| message(&e))?;
        let _ = m.groups();
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Single-file checkpoints

/// The real single-file checkpoint's header entries and its data area.
fn single_parts() -> (Vec<(String, Value)>, Vec<u8>) {
    let bytes = std::fs::read(fixture("sd15.single.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let entries = header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .collect();
    (entries, bytes[8 + n..].to_vec())
}

fn write_single(path: &std::path::Path, entries: &[(String, Value)], data: &[u8]) {
    let mut m = serde_json::Map::new();
    for (k, v) in entries {
        m.insert(k.clone(), v.clone());
    }
    let header = serde_json::to_vec(&Value::Object(m)).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

#[derive(Clone, Debug)]
enum KeyEdit {
    Drop,
    Keep,
    /// Replace the segment at this index with a string.
    Segment(usize, String),
    /// Swap the component prefix for another known one.
    Prefix(usize),
}

fn key_edit() -> impl Strategy<Value = KeyEdit> {
    prop_oneof![
        12 => Just(KeyEdit::Keep),
        3 => Just(KeyEdit::Drop),
        2 => (any::<usize>(), prop_oneof![
            Just("0".to_string()), Just("99".to_string()), Just("".to_string()),
            Just("weight".to_string()), Just("ä".to_string()), Just("18446744073709551616".to_string()),
        ]).prop_map(|(i, s)| KeyEdit::Segment(i, s)),
        1 => any::<usize>().prop_map(KeyEdit::Prefix),
    ]
}

const PREFIXES: [&str; 6] = [
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.transformer.",
    "conditioner.embedders.0.",
    "",
    "model.",
];

fn edit_key(key: &str, e: &KeyEdit) -> Option<String> {
    match e {
        KeyEdit::Keep => Some(key.to_string()),
        KeyEdit::Drop => None,
        KeyEdit::Segment(i, s) => {
            let mut parts: Vec<&str> = key.split('.').collect();
            let n = parts.len();
            parts[i % n] = s;
            Some(parts.join("."))
        }
        KeyEdit::Prefix(i) => {
            let rest = PREFIXES
                .iter()
                .filter(|p| !p.is_empty())
                .find_map(|p| key.strip_prefix(p))
                .unwrap_or(key);
            Some(format!("{}{rest}", PREFIXES[i % PREFIXES.len()]))
        }
    }
}

#[test]
fn single_file_key_mapping() {
    let (entries, data) = single_parts();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    // The unedited file maps.
    write_single(&path, &entries, &data);
    let src = ferry_sd::loader::ModelSource::open(&path).unwrap();
    assert!(src.component("unet").is_ok());
    let n = entries.len();
    runner(120)
        .run(&prop::collection::vec(key_edit(), n..=n), |edits| {
            let mut edited: Vec<(String, Value)> = Vec::new();
            for ((k, v), e) in entries.iter().zip(&edits) {
                if let Some(k) = edit_key(k, e) {
                    if !edited.iter().any(|(x, _)| *x == k) {
                        edited.push((k, v.clone()));
                    }
                }
            }
            write_single(&path, &edited, &data);
            let header_len: usize = edited
                .iter()
                .map(|(k, v)| k.len() + v.to_string().len())
                .sum();
            bounded("single file", header_len + data.len(), || {
                match ferry_sd::loader::ModelSource::open(&path) {
                    Ok(src) => {
                        for c in src.components() {
                            match src.component(c) {
                                Ok(comp) => {
                                    let _ = comp.config();
                                }
                                Err(e) => assert!(!message(&e).is_empty()),
                            }
                        }
                    }
                    Err(e) => assert!(!message(&e).is_empty()),
                }
            });
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// .npy

fn npy_bytes(shape: &str, descr: &str, fortran: bool, data: usize) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
        if fortran { "True" } else { "False" }
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend(std::iter::repeat_n(0x3fu8, data));
    out
}

#[test]
fn npy_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.npy");
    let shapes = prop_oneof![
        Just("()".to_string()),
        Just("(0,)".to_string()),
        Just("(1, 4, 8, 8)".to_string()),
        Just("(2,)".to_string()),
        Just("(1099511627776, 1099511627776)".to_string()),
        Just("(4611686018427387904,)".to_string()),
        Just("(18446744073709551615, 2)".to_string()),
        Just("(-1,)".to_string()),
        Just("(3, 0, 1000000000000)".to_string()),
        Just("(1000000000,)".to_string()),
        Just("(".to_string()),
    ];
    let descr = prop::sample::select(vec!["<f4", ">f4", "<f8", "|u1", "<f2", "x"]);
    let structured =
        (shapes, descr, any::<bool>(), 0usize..600).prop_map(|(s, d, f, n)| npy_bytes(&s, d, f, n));
    let strategy = prop_oneof![
        3 => structured,
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => (prop::collection::vec(any::<u8>(), 0..16), 0usize..600)
            .prop_map(|(mut h, n)| { let mut b = b"\x93NUMPY\x01\x00".to_vec(); b.append(&mut h); b.extend(std::iter::repeat_n(0, n)); b }),
    ];
    runner(400)
        .run(&strategy, |bytes| {
            std::fs::write(&path, &bytes).unwrap();
            match bounded("npy", bytes.len(), || ferry_sd::npy::read_f32(&path)) {
                Ok(t) => assert_eq!(t.data().len() * 4, t.numel() * 4),
                Err(e) => assert!(!message(&e).is_empty()),
            }
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

fn check_tokens(tok: &ClipTokenizer, what: &str, text: &str) {
    let (ids, enc) = bounded_with(what, text.len(), TOKENIZER_BASE, || {
        (tok.tokenize(text), tok.encode(text))
    });
    let vocab = tok.vocab_size() as u32;
    assert!(
        ids.iter().all(|&i| i < vocab),
        "{what}: id out of vocab for {text:?}"
    );
    assert!(
        enc.ids.iter().all(|&i| i < vocab),
        "{what}: id out of vocab for {text:?}"
    );
    assert_eq!(enc.ids.len(), tok.max_length(), "{what}: {text:?}");
    assert!(enc.ids.len() <= 77);
    assert_eq!(enc.ids[0], tok.bos_id());
    assert!(enc.ids.contains(&tok.eos_id()));
    assert_eq!(enc.truncated, ids.len() + 2 > tok.max_length());
}

#[test]
fn tokenizer_on_arbitrary_text() {
    let tok = ClipTokenizer::from_folder(&fixture("sd15/tokenizer")).unwrap();
    let unicode = prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9 ,.'!?<>|—“”灯台🌅\u{301}\u{200d}\u{fe0f}]{0,120}".prop_map(String::from),
        Just("<|endoftext|><|startoftext|>".repeat(10)),
        Just("a".repeat(5000)),
        Just("🌅".repeat(300)),
    ];
    runner(1500)
        .run(&unicode, |s| {
            check_tokens(&tok, "unicode", &s);
            Ok(())
        })
        .unwrap();
    runner(1500)
        .run(&prop::collection::vec(any::<u8>(), 0..300), |b| {
            check_tokens(&tok, "lossy bytes", &String::from_utf8_lossy(&b));
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// CLI sizes

#[test]
fn cli_size_strings() {
    let structured = (
        prop_oneof![
            "[0-9]{0,25}".prop_map(String::from),
            "[0-9]{0,5}\\.[0-9]{0,5}".prop_map(String::from),
            Just("1e3".to_string()),
            Just("..".to_string()),
            Just("-1".to_string()),
            Just("inf".to_string()),
            Just("NaN".to_string()),
        ],
        prop::sample::select(vec![
            "", "B", "kb", "MiB", "GiB", "TiB", "tb", " GiB", "gib ", "iB", "ЖB", "GiB\0",
        ]),
    )
        .prop_map(|(n, u)| format!("{n}{u}"));
    let strategy = prop_oneof![structured, any::<String>()];
    runner(3000)
        .run(&strategy, |s| {
            match bounded("size", s.len(), || ferry_sd::cli::parse_size(&s)) {
                Ok(n) => assert!(n >= 1, "{s:?} gave {n}"),
                Err(m) => assert!(m.contains("size") || m.contains("unit"), "{s:?}: {m}"),
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(ferry_sd::cli::parse_size("4GiB"), Ok(4 << 30));
    assert!(ferry_sd::cli::parse_size("99999999999999999999TiB").is_err());
}
