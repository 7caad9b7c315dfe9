//! `ClipTokenizer` against transformers 5.24's `CLIPTokenizer` on a varied prompt list
//! (tests/fixtures/tokenizer/goldens.json, written by scripts/fixtures/tokenizer_goldens.py), and
//! on every folder layout the hub has (tests/fixtures/tokenizer/hub_goldens.json, written by
//! scripts/fixtures/hub_layouts.py).

use std::io::Read;
use std::path::{Path, PathBuf};

use ferry_sd::tokenizer::{ClipTokenizer, SpecialTokens};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer")
}

fn goldens() -> Value {
    let text = std::fs::read_to_string(fixtures().join("goldens.json")).expect("read goldens");
    serde_json::from_str(&text).expect("parse goldens")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check(tok: &ClipTokenizer, folder: &str) {
    check_against(tok, &goldens(), folder, 25);
}

/// Asserts `tok` gives transformers' padded and untruncated ids for every prompt of `g`.
fn check_against(tok: &ClipTokenizer, g: &Value, folder: &str, min_prompts: usize) {
    let prompts = g["prompts"].as_array().unwrap();
    let f = &g["folders"][folder];
    assert!(f.is_object(), "no goldens for {folder}");
    assert_eq!(tok.pad_id() as u64, f["pad_token_id"].as_u64().unwrap());
    assert_eq!(
        tok.max_length() as u64,
        f["model_max_length"].as_u64().unwrap()
    );
    let padded = f["padded"].as_array().unwrap();
    let full = f["untruncated"].as_array().unwrap();
    assert!(prompts.len() >= min_prompts);
    assert_eq!((padded.len(), full.len()), (prompts.len(), prompts.len()));
    let mut truncated = 0;
    for (i, p) in prompts.iter().enumerate() {
        let p = p.as_str().unwrap();
        let enc = tok.encode(p);
        assert_eq!(enc.ids, ids(&padded[i]), "{folder}: prompt {i} {p:?}");
        let want_full = ids(&full[i]);
        assert_eq!(
            enc.untruncated_len,
            want_full.len(),
            "{folder}: prompt {i} {p:?}"
        );
        assert_eq!(enc.truncated, want_full.len() > 77, "{folder}: prompt {i}");
        let mut unpadded = vec![tok.bos_id()];
        unpadded.extend(tok.tokenize(p));
        unpadded.push(tok.eos_id());
        assert_eq!(
            unpadded, want_full,
            "{folder}: prompt {i} {p:?} untruncated"
        );
        truncated += enc.truncated as usize;
    }
    assert!(truncated >= 3, "the list must exercise truncation");
}

#[test]
fn embedded_vocab_matches_transformers_sd15_padding() {
    let specials = SpecialTokens::from_folder(&fixtures().join("sd15")).unwrap();
    assert_eq!(specials.pad.content, "<|endoftext|>");
    let tok = ClipTokenizer::embedded(&specials).unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (49406, 49407, 49407)
    );
    check(&tok, "sd15");
}

#[test]
fn embedded_vocab_matches_transformers_sd2_padding() {
    // special_tokens_map.json ("!") overrides tokenizer_config.json (<|endoftext|>).
    let specials = SpecialTokens::from_folder(&fixtures().join("sd2")).unwrap();
    assert_eq!(specials.pad.content, "!");
    let tok = ClipTokenizer::embedded(&specials).unwrap();
    assert_eq!(tok.pad_id(), 0);
    check(&tok, "sd2");
    // "!" is a special token there, so it is cut out as id 0 instead of BPE's "!</w>".
    assert_eq!(tok.tokenize("hi!"), vec![1883, 0]);
}

/// Writes vocab.json / merges.txt in the Hugging Face layout from the OpenAI BPE file.
fn write_hf_vocab(dir: &Path) {
    let gz = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/bpe_simple_vocab_16e6.txt.gz"),
    )
    .unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .unwrap();
    let merges: Vec<&str> = text.split('\n').skip(1).take(49152 - 256 - 2).collect();
    let tok = ClipTokenizer::embedded(&SpecialTokens::default()).unwrap();
    let vocab: serde_json::Map<String, Value> = (0..tok.vocab_size() as u32)
        .map(|i| (tok.id_to_token(i).unwrap().to_string(), Value::from(i)))
        .collect();
    std::fs::write(
        dir.join("vocab.json"),
        serde_json::to_string(&vocab).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("merges.txt"),
        format!("#version: 0.2\n{}\n", merges.join("\n")),
    )
    .unwrap();
}

#[test]
fn folder_loading_matches_transformers() {
    for folder in ["sd15", "sd2"] {
        let dir = tempfile::tempdir().unwrap();
        for f in ["tokenizer_config.json", "special_tokens_map.json"] {
            std::fs::copy(fixtures().join(folder).join(f), dir.path().join(f)).unwrap();
        }
        write_hf_vocab(dir.path());
        let tok = ClipTokenizer::from_folder(dir.path()).unwrap();
        check(&tok, folder);
    }
}

#[test]
fn missing_or_broken_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("expected vocab.json and merges.txt, or tokenizer.json; found neither"),
        "{err}"
    );
    std::fs::write(dir.path().join("merges.txt"), "").unwrap();
    let err = ClipTokenizer::from_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot read tokenizer file"), "{err}");
    assert!(err.contains("vocab.json"), "{err}");
    std::fs::write(dir.path().join("vocab.json"), "[1, 2]").unwrap();
    std::fs::write(dir.path().join("merges.txt"), "").unwrap();
    let err = ClipTokenizer::from_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("token -> id"), "{err}");
    std::fs::write(dir.path().join("vocab.json"), r#"{"a": 0, "b": 1}"#).unwrap();
    let err = ClipTokenizer::from_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bos token \"<|startoftext|>\" is not in the vocabulary"),
        "{err}"
    );
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"pad_token": 5}"#,
    )
    .unwrap();
    let err = SpecialTokens::from_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("pad_token"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Hub layouts: tokenizer.json-only folders (transformers 5) and transformers 4 configs.

fn hub_goldens() -> Value {
    let text = std::fs::read_to_string(fixtures().join("hub_goldens.json")).expect("read goldens");
    serde_json::from_str(&text).expect("parse goldens")
}

/// A folder under tests/fixtures, named as in hub_goldens.json.
fn hub_folder(name: &str) -> PathBuf {
    fixtures().join("..").join(name)
}

/// Each folder of hub_goldens.json and its layout.
const HUB_FOLDERS: [(&str, &str); 5] = [
    ("models/sd15_hub/tokenizer", "tokenizer.json"),
    ("models/sd15/tokenizer", "vocab.json"),
    ("tokenizer/hub_sd2", "tokenizer.json"),
    ("models/sd2/tokenizer", "vocab.json"),
    ("tokenizer/t4_sd2", "vocab.json"),
];

#[test]
fn every_hub_layout_matches_transformers() {
    let g = hub_goldens();
    let prompts = g["prompts"].as_array().unwrap();
    // Em dash, smart quote, CJK, emoji, combining acute accent.
    for c in ['\u{2014}', '\u{201c}', '\u{706f}', '\u{1f305}', '\u{301}'] {
        assert!(
            prompts.iter().any(|p| p.as_str().unwrap().contains(c)),
            "prompt list lacks {c:?}"
        );
    }
    assert!(prompts.iter().any(|p| p.as_str() == Some("")));
    assert!(prompts.iter().any(|p| {
        p.as_str()
            .is_some_and(|p| !p.is_empty() && p.trim().is_empty())
    }));
    for (folder, layout) in HUB_FOLDERS {
        let dir = hub_folder(folder);
        assert!(dir.join(layout).exists(), "{folder} lacks {layout}");
        if layout == "tokenizer.json" {
            assert!(!dir.join("vocab.json").exists() && !dir.join("merges.txt").exists());
        }
        let tok = ClipTokenizer::from_folder(&dir).unwrap_or_else(|e| panic!("{folder}: {e}"));
        check_against(&tok, &g, folder, 40);
    }
}

#[test]
fn tokenizer_json_gives_the_ids_of_vocab_json() {
    let g = hub_goldens();
    for (hub, classic, pad) in [
        ("models/sd15_hub/tokenizer", "models/sd15/tokenizer", 49407),
        ("tokenizer/hub_sd2", "models/sd2/tokenizer", 0),
    ] {
        let a = ClipTokenizer::from_folder(&hub_folder(hub)).unwrap();
        let b = ClipTokenizer::from_folder(&hub_folder(classic)).unwrap();
        assert_eq!((a.pad_id(), b.pad_id()), (pad, pad));
        assert_eq!(a.vocab_size(), b.vocab_size());
        for p in g["prompts"].as_array().unwrap() {
            let p = p.as_str().unwrap();
            assert_eq!(a.encode(p), b.encode(p), "{hub} vs {classic}: {p:?}");
        }
    }
}

/// The real hub_sd2 tokenizer.json, parsed.
fn hub_sd2_json() -> Value {
    let text = std::fs::read_to_string(hub_folder("tokenizer/hub_sd2/tokenizer.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A folder holding `json` as tokenizer.json and hub_sd2's tokenizer_config.json.
fn folder_with(json: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::copy(
        hub_folder("tokenizer/hub_sd2/tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    dir
}

#[test]
fn legacy_string_merges_give_the_same_ids() {
    // tokenizers before 0.20 wrote each merge as "a b"; transformers reads both forms alike
    // (checked by hub_layouts.py), so the goldens of the pair form apply.
    let g = hub_goldens();
    assert_eq!(g["legacy_string_merges_same_ids"], Value::Bool(true));
    let mut json = hub_sd2_json();
    let merges = json["model"]["merges"].as_array_mut().unwrap();
    assert!(merges[0].is_array());
    for m in merges.iter_mut() {
        let pair = m.as_array().unwrap();
        *m = Value::from(format!(
            "{} {}",
            pair[0].as_str().unwrap(),
            pair[1].as_str().unwrap()
        ));
    }
    let dir = folder_with(&json);
    let tok = ClipTokenizer::from_folder(dir.path()).unwrap();
    check_against(&tok, &g, "tokenizer/hub_sd2", 40);
}

#[test]
fn transformers4_pre_tokenizer_pattern_gives_the_same_ids() {
    // transformers 4's converter wrote CLIP's pattern without the two specials; transformers 5
    // tokenises such a file as one with today's pattern (checked by hub_layouts.py).
    let g = hub_goldens();
    assert_eq!(g["legacy_pattern_same_ids"], Value::Bool(true));
    let mut json = hub_sd2_json();
    let pattern = &mut json["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"];
    assert!(pattern.as_str().unwrap().starts_with(r"<\|startoftext\|>|"));
    *pattern = g["legacy_pattern"].clone();
    let dir = folder_with(&json);
    let tok = ClipTokenizer::from_folder(dir.path()).unwrap();
    check_against(&tok, &g, "tokenizer/hub_sd2", 40);
}

#[test]
fn vocab_json_is_preferred_over_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(
            hub_folder("models/sd2/tokenizer").join(f),
            dir.path().join(f),
        )
        .unwrap();
    }
    // A tokenizer.json that would fail if it were read.
    std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
    let tok = ClipTokenizer::from_folder(dir.path()).unwrap();
    check_against(&tok, &hub_goldens(), "models/sd2/tokenizer", 40);
    // Without merges.txt the pair is incomplete: tokenizer.json is read.
    std::fs::remove_file(dir.path().join("merges.txt")).unwrap();
    let err = ClipTokenizer::from_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("expected a tokenizers JSON object"),
        "{err}"
    );
}

/// A small tokenizer.json with hub_sd2's real pipeline: bytes and specials only, no merges.
fn small_json() -> Value {
    let mut json = hub_sd2_json();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    let small: serde_json::Map<String, Value> = vocab
        .iter()
        .filter(|(_, id)| {
            let id = id.as_u64().unwrap();
            !(512..49406).contains(&id)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    json["model"]["vocab"] = Value::Object(small);
    json["model"]["merges"] = Value::Array(Vec::new());
    json
}

#[test]
fn small_tokenizer_json_loads_and_splits_into_bytes() {
    let dir = folder_with(&small_json());
    let tok = ClipTokenizer::from_folder(dir.path()).unwrap();
    assert_eq!((tok.vocab_size(), tok.pad_id()), (514, 0));
    // No merges: one id per character, "</w>" on the last; "!" is the pad token, cut out as 0.
    let (a, b, b_end) = (
        tok.token_to_id("a").unwrap(),
        tok.token_to_id("b").unwrap(),
        tok.token_to_id("b</w>").unwrap(),
    );
    assert_eq!(tok.tokenize("AB b!"), vec![a, b_end, b_end, 0]);
    assert_eq!(tok.tokenize("ab"), vec![a, b_end]);
    assert_ne!(b, b_end);
}

/// Applies `edit` to the small tokenizer.json and returns the load error.
fn load_error(edit: impl FnOnce(&mut Value)) -> String {
    let mut json = small_json();
    edit(&mut json);
    let dir = folder_with(&json);
    let err = ClipTokenizer::from_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(err.contains("tokenizer.json"), "names the file: {err}");
    err
}

#[track_caller]
fn assert_has(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "{p:?} not in: {err}");
    }
}

#[test]
fn tokenizer_json_not_clip_is_refused() {
    let err = load_error(|j| j["model"]["type"] = "WordPiece".into());
    assert_has(
        &err,
        &["expected model type \"BPE\"", "found \"WordPiece\""],
    );
    let err = load_error(|j| j["model"] = serde_json::json!({"type": "Unigram", "vocab": []}));
    assert_has(&err, &["found \"Unigram\""]);
    let err = load_error(|j| j["model"]["end_of_word_suffix"] = Value::Null);
    assert_has(
        &err,
        &["expected end_of_word_suffix \"</w>\"", "found none"],
    );
    let err = load_error(|j| j["model"]["continuing_subword_prefix"] = "##".into());
    assert_has(&err, &["continuing_subword_prefix", "found \"##\""]);
    let err = load_error(|j| j["model"]["dropout"] = 0.1.into());
    assert_has(&err, &["expected dropout null, found 0.1"]);
    let err = load_error(|j| j["model"]["merges"] = serde_json::json!(["a b c"]));
    assert_has(&err, &["merge 0", "found \"a b c\""]);
    let err = load_error(|j| j["model"]["merges"] = serde_json::json!([["a", "zz"]]));
    assert_has(&err, &["merge token \"zz\" is not in the vocabulary"]);
}

#[test]
fn tokenizer_json_with_another_pipeline_is_refused() {
    let err = load_error(|j| {
        j["normalizer"]["normalizers"].as_array_mut().unwrap().pop();
    });
    assert_has(
        &err,
        &[
            "normalizer: expected CLIP's [NFC, Replace(/\\s+/ -> \" \"), Lowercase]",
            "found [NFC, Replace(/\\s+/ -> \" \")]",
        ],
    );
    let err = load_error(|j| j["normalizer"] = Value::Null);
    assert_has(&err, &["normalizer: expected", "found none"]);
    let err = load_error(|j| j["normalizer"]["normalizers"][0]["type"] = "NFKC".into());
    assert_has(&err, &["found [NFKC, "]);
    let err =
        load_error(|j| j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+".into());
    assert_has(
        &err,
        &[
            "pre_tokenizer: expected CLIP's [Split(",
            "found [Split(/\\w+/",
        ],
    );
    let err =
        load_error(|j| j["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = true.into());
    assert_has(&err, &["ByteLevel(add_prefix_space true, use_regex true)]"]);
    let err = load_error(|j| j["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"}));
    assert_has(&err, &["found [Whitespace]"]);
    let err = load_error(|j| j["post_processor"]["cls"][1] = 7.into());
    assert_has(
        &err,
        &["post_processor: expected bos 49406 + text + eos 49407"],
    );
}

#[test]
fn tokenizer_json_added_tokens_are_checked() {
    let err = load_error(|j| j["added_tokens"][1]["id"] = 5.into());
    assert_has(
        &err,
        &[
            "added token \"<|startoftext|>\" has id 5",
            "gives it id 49406",
        ],
    );
    let err = load_error(|j| {
        j["added_tokens"][0]["content"] = "<new>".into();
    });
    assert_has(&err, &["added token \"<new>\" has id 0", "gives to \"!\""]);
    let err = load_error(|j| j["added_tokens"][2]["lstrip"] = true.into());
    assert_has(
        &err,
        &[
            "expected lstrip, rstrip and single_word false",
            "lstrip true",
        ],
    );
    let err = load_error(|j| j["model"] = serde_json::json!({"type": "BPE"}));
    assert_has(&err, &["BPE model: expected vocab and merges"]);
    let err = load_error(|j| *j = serde_json::json!([1, 2]));
    assert_has(&err, &["expected a tokenizers JSON object"]);
}

#[test]
fn tokenizer_json_added_token_outside_the_vocabulary_extends_it() {
    // As transformers: an added token with a new id is cut out of the raw text (normalized false).
    let mut json = small_json();
    json["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": 49408, "content": "<sks>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": false
        }));
    let dir = folder_with(&json);
    let tok = ClipTokenizer::from_folder(dir.path()).unwrap();
    assert_eq!(tok.token_to_id("<sks>"), Some(49408));
    let a = tok.token_to_id("a</w>").unwrap();
    assert_eq!(tok.tokenize("a<sks>a"), vec![a, 49408, a]);
    assert!(!tok.tokenize("<SKS>").contains(&49408));
}
