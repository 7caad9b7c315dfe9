//! `ClipTokenizer` against transformers 5.24's `CLIPTokenizer` on a varied prompt list
//! (tests/fixtures/tokenizer/goldens.json, written by scripts/fixtures/tokenizer_goldens.py).

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
    let g = goldens();
    let prompts = g["prompts"].as_array().unwrap();
    let f = &g["folders"][folder];
    assert_eq!(tok.pad_id() as u64, f["pad_token_id"].as_u64().unwrap());
    assert_eq!(
        tok.max_length() as u64,
        f["model_max_length"].as_u64().unwrap()
    );
    let padded = f["padded"].as_array().unwrap();
    let full = f["untruncated"].as_array().unwrap();
    assert!(prompts.len() >= 25);
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
