//! `tokenizer.json`, the `tokenizers` library's format (what transformers 5 saves instead of
//! `vocab.json` + `merges.txt`), read as CLIP's BPE tokenizer.
//!
//! Only the vocabulary, merges and added tokens are taken from the file; the normaliser,
//! pre-tokeniser and post-processor are Ferry's fixed CLIP pipeline. transformers 5's
//! `CLIPTokenizer` likewise rebuilds that pipeline itself, so a file that describes another one
//! would be tokenised differently by different readers: it is refused with what was expected
//! and what was found, rather than silently tokenised one way.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::{
    config_matches, read_file, special_ids, ClipTokenizer, Result, SpecialTokens, TokenizerError,
    CLIP_PATTERN, END_OF_WORD,
};

/// CLIP's pre-tokenisation pattern as transformers 4's converter wrote it (without the two
/// specials, which are cut out before pre-tokenisation anyway; transformers 5 reads such files
/// with the pattern above, and so does Ferry).
const LEGACY_CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The parts of `tokenizer.json` that decide token ids.
#[derive(Deserialize)]
struct TokenizerJson {
    model: Value,
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
    #[serde(default)]
    normalizer: Value,
    #[serde(default)]
    pre_tokenizer: Value,
    #[serde(default)]
    post_processor: Value,
}

/// A `model` of type `BPE`.
#[derive(Deserialize)]
struct BpeModel {
    vocab: HashMap<String, u32>,
    merges: Vec<Merge>,
    #[serde(default)]
    dropout: Option<f64>,
    #[serde(default)]
    continuing_subword_prefix: Option<String>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
    #[serde(default)]
    byte_fallback: bool,
    #[serde(default)]
    ignore_merges: bool,
}

/// One merge: `["a", "b"]` (tokenizers 0.20 and later) or `"a b"` (earlier versions).
#[derive(Deserialize)]
#[serde(untagged)]
enum Merge {
    Pair(String, String),
    Joined(String),
}

/// An entry of `added_tokens`.
#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
    #[serde(default)]
    special: bool,
    /// Absent means `!special`, as in `tokenizers`.
    #[serde(default)]
    normalized: Option<bool>,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    single_word: bool,
}

/// Loads `path` (a `tokenizer.json`) with the special-token settings read from its folder.
pub(super) fn load(path: &Path, specials: &SpecialTokens) -> Result<ClipTokenizer> {
    let format = |message: String| TokenizerError::Format {
        path: path.to_path_buf(),
        message,
    };
    let text = read_file(path)?;
    let file: TokenizerJson = crate::json::from_str(&text)
        .map_err(|e| format(format!("expected a tokenizers JSON object: {e}")))?;

    let kind = file.model.get("type").and_then(Value::as_str);
    if kind != Some("BPE") {
        return Err(format(format!(
            "expected model type \"BPE\" (CLIP's byte-pair encoding), found {}",
            kind.map_or_else(|| "none".to_string(), |k| format!("{k:?}"))
        )));
    }
    let model: BpeModel = serde_json::from_value(file.model)
        .map_err(|e| format(format!("BPE model: expected vocab and merges: {e}")))?;
    check_model(&model).map_err(format)?;
    check_normalizer(&file.normalizer).map_err(format)?;
    check_pre_tokenizer(&file.pre_tokenizer).map_err(format)?;

    let mut encoder = model.vocab;
    let mut merges = Vec::with_capacity(model.merges.len());
    for (i, merge) in model.merges.into_iter().enumerate() {
        merges.push(match merge {
            Merge::Pair(a, b) => (a, b),
            Merge::Joined(s) => {
                let mut parts = s.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                        (a.to_string(), b.to_string())
                    }
                    _ => {
                        return Err(format(format!(
                            "merge {i}: expected \"a b\" or [\"a\", \"b\"], found {s:?}"
                        )))
                    }
                }
            }
        });
    }

    // Added tokens are cut out of the text with the file's flags (transformers 5 ignores the
    // flags of the configs' AddedToken objects here); ids outside the vocabulary extend it.
    let mut matched: Vec<(String, u32, bool)> = Vec::new();
    for t in &file.added_tokens {
        if t.lstrip || t.rstrip || t.single_word {
            return Err(format(format!(
                "added token {:?}: expected lstrip, rstrip and single_word false (CLIP's), found \
                 lstrip {}, rstrip {}, single_word {}",
                t.content, t.lstrip, t.rstrip, t.single_word
            )));
        }
        match encoder.get(&t.content) {
            Some(&id) if id != t.id => {
                return Err(format(format!(
                    "added token {:?} has id {}, but the vocabulary gives it id {id}",
                    t.content, t.id
                )))
            }
            Some(_) => {}
            None => {
                if let Some((other, _)) = encoder.iter().find(|(_, &id)| id == t.id) {
                    return Err(format(format!(
                        "added token {:?} has id {}, which the vocabulary gives to {other:?}",
                        t.content, t.id
                    )));
                }
                encoder.insert(t.content.clone(), t.id);
            }
        }
        if !matched.iter().any(|m| m.0 == t.content) {
            matched.push((t.content.clone(), t.id, t.normalized.unwrap_or(!t.special)));
        }
    }
    // Config special tokens the file does not list are added as transformers does.
    let ids = special_ids(&encoder, specials).map_err(|e| format(e.to_string()))?;
    for d in config_matches(specials, ids) {
        if !matched.iter().any(|m| m.0 == d.0) {
            matched.push(d);
        }
    }
    check_post_processor(&file.post_processor, ids[0], ids[1]).map_err(format)?;
    ClipTokenizer::build(encoder, &merges, specials, matched).map_err(|e| match e {
        TokenizerError::Invalid(message) => format(message),
        e => e,
    })
}

fn check_model(m: &BpeModel) -> std::result::Result<(), String> {
    if let Some(p) = m.dropout {
        return Err(format!("BPE model: expected dropout null, found {p}"));
    }
    let prefix = m.continuing_subword_prefix.as_deref().unwrap_or("");
    if !prefix.is_empty() {
        return Err(format!(
            "BPE model: expected continuing_subword_prefix \"\" (CLIP's), found {prefix:?}"
        ));
    }
    if m.end_of_word_suffix.as_deref() != Some(END_OF_WORD) {
        return Err(format!(
            "BPE model: expected end_of_word_suffix {END_OF_WORD:?} (CLIP's), found {}",
            m.end_of_word_suffix
                .as_ref()
                .map_or_else(|| "none".to_string(), |s| format!("{s:?}"))
        ));
    }
    if m.byte_fallback || m.ignore_merges {
        return Err(format!(
            "BPE model: expected byte_fallback and ignore_merges false (CLIP's), found {} and {}",
            m.byte_fallback, m.ignore_merges
        ));
    }
    Ok(())
}

/// The steps of a component, `Sequence`s flattened.
fn steps(v: &Value, list_key: &str) -> Vec<Value> {
    match v {
        Value::Null => Vec::new(),
        _ if v.get("type").and_then(Value::as_str) == Some("Sequence") => v
            .get(list_key)
            .and_then(Value::as_array)
            .map(|items| items.iter().flat_map(|i| steps(i, list_key)).collect())
            .unwrap_or_else(|| vec![v.clone()]),
        _ => vec![v.clone()],
    }
}

/// A step in a short, readable form for error messages.
fn describe(step: &Value) -> String {
    let ty = step.get("type").and_then(Value::as_str).unwrap_or("?");
    let regex = |v: &Value| {
        v.get("pattern")
            .map(|p| match (p.get("Regex"), p.get("String")) {
                (Some(r), _) => format!("/{}/", r.as_str().unwrap_or("?")),
                (_, Some(s)) => format!("{s}"),
                _ => p.to_string(),
            })
            .unwrap_or_else(|| "?".to_string())
    };
    match ty {
        "Replace" => format!(
            "Replace({} -> {})",
            regex(step),
            step.get("content").unwrap_or(&Value::Null)
        ),
        "Split" => format!(
            "Split({}, {}, invert {})",
            regex(step),
            step.get("behavior").unwrap_or(&Value::Null),
            step.get("invert").unwrap_or(&Value::Null)
        ),
        "ByteLevel" => format!(
            "ByteLevel(add_prefix_space {}, use_regex {})",
            step.get("add_prefix_space").unwrap_or(&Value::Null),
            step.get("use_regex").unwrap_or(&Value::Bool(true))
        ),
        _ => ty.to_string(),
    }
}

fn describe_all(steps: &[Value]) -> String {
    if steps.is_empty() {
        return "none".to_string();
    }
    let parts: Vec<String> = steps.iter().map(describe).collect();
    format!("[{}]", parts.join(", "))
}

/// CLIP's normaliser: NFC, whitespace runs to one space, lower case.
fn check_normalizer(v: &Value) -> std::result::Result<(), String> {
    let found = steps(v, "normalizers");
    let ok = match found.as_slice() {
        [a, b, c] => {
            is_type(a, "NFC")
                && is_type(b, "Replace")
                && b.pointer("/pattern/Regex").and_then(Value::as_str) == Some(r"\s+")
                && b.get("content").and_then(Value::as_str) == Some(" ")
                && is_type(c, "Lowercase")
        }
        _ => false,
    };
    if ok {
        return Ok(());
    }
    Err(format!(
        "normalizer: expected CLIP's [NFC, Replace(/\\s+/ -> \" \"), Lowercase], found {}",
        describe_all(&found)
    ))
}

/// CLIP's pre-tokeniser: keep the matches of CLIP's pattern, then GPT-2's byte-level mapping.
fn check_pre_tokenizer(v: &Value) -> std::result::Result<(), String> {
    let found = steps(v, "pretokenizers");
    let ok = match found.as_slice() {
        [split, byte_level] => {
            let pattern = split.pointer("/pattern/Regex").and_then(Value::as_str);
            is_type(split, "Split")
                && (pattern == Some(CLIP_PATTERN) || pattern == Some(LEGACY_CLIP_PATTERN))
                && split.get("behavior").and_then(Value::as_str) == Some("Removed")
                && split.get("invert").and_then(Value::as_bool) == Some(true)
                && is_type(byte_level, "ByteLevel")
                && byte_level.get("add_prefix_space").and_then(Value::as_bool) != Some(true)
                && byte_level.get("use_regex").and_then(Value::as_bool) != Some(false)
        }
        _ => false,
    };
    if ok {
        return Ok(());
    }
    Err(format!(
        "pre_tokenizer: expected CLIP's [Split(/{CLIP_PATTERN}/, \"Removed\", invert true), \
         ByteLevel(add_prefix_space false, use_regex true)], found {}",
        describe_all(&found)
    ))
}

/// bos + text + eos, with the ids the configs give them (or none: transformers adds its own).
fn check_post_processor(v: &Value, bos: u32, eos: u32) -> std::result::Result<(), String> {
    let pair = |key: &str| -> Option<(String, u64)> {
        let p = v.get(key)?.as_array()?;
        Some((p.first()?.as_str()?.to_string(), p.get(1)?.as_u64()?))
    };
    let found = match v.get("type").and_then(Value::as_str) {
        None if v.is_null() => return Ok(()),
        Some("RobertaProcessing") | Some("BertProcessing") => {
            let (cls, sep) = (pair("cls"), pair("sep"));
            if cls.as_ref().map(|c| c.1) == Some(u64::from(bos))
                && sep.as_ref().map(|s| s.1) == Some(u64::from(eos))
            {
                return Ok(());
            }
            format!("cls {cls:?}, sep {sep:?}")
        }
        Some("TemplateProcessing") => {
            let ids = template_ids(v);
            if ids.as_deref() == Some(&[Some(bos), None, Some(eos)][..]) {
                return Ok(());
            }
            format!("TemplateProcessing with single {ids:?} (None = the text)")
        }
        Some(other) => format!("type {other:?}"),
        None => format!("{v}"),
    };
    Err(format!(
        "post_processor: expected bos {bos} + text + eos {eos} (RobertaProcessing or \
         TemplateProcessing), found {found}"
    ))
}

/// The `single` template as ids: `Some(id)` for a special token of one id, `None` for `$A`.
fn template_ids(v: &Value) -> Option<Vec<Option<u32>>> {
    let specials = v.get("special_tokens")?;
    v.get("single")?
        .as_array()?
        .iter()
        .map(|piece| {
            if piece.get("Sequence").is_some() {
                return Some(None);
            }
            let name = piece.pointer("/SpecialToken/id")?.as_str()?;
            match specials.get(name)?.get("ids")?.as_array()?.as_slice() {
                [id] => Some(Some(u32::try_from(id.as_u64()?).ok()?)),
                _ => None,
            }
        })
        .collect()
}

fn is_type(v: &Value, ty: &str) -> bool {
    v.get("type").and_then(Value::as_str) == Some(ty)
}
