//! The CLIP text tokenizer with the behaviour of transformers 5's `CLIPTokenizer` (which is backed
//! by the `tokenizers` library), as diffusers' Stable Diffusion pipelines call it:
//! `tokenizer(prompt, padding="max_length", max_length=model_max_length, truncation=True)`.
//!
//! Steps, in the order `tokenizers` applies them:
//! 1. Special tokens (bos, eos, unk, pad and any `added_tokens_decoder` entry) are cut out of the
//!    raw text first, case-sensitively. SD 2.x and SDXL's second tokenizer use `!` as pad token,
//!    so there every `!` in a prompt becomes id 0 rather than the BPE token `!</w>`.
//! 2. The rest is normalised: Unicode NFC, every whitespace run replaced by one space, lower-cased
//!    character by character (no ftfy, no HTML unescaping: transformers 5 does neither).
//! 3. Pre-tokenisation keeps the matches of CLIP's regex (specials, contractions, letter runs,
//!    single digits, runs of other non-space characters) and maps each piece's UTF-8 bytes to
//!    GPT-2's printable byte alphabet.
//! 4. Each piece is split by byte-pair merges (lowest rank first, leftmost on ties), with `</w>`
//!    appended to its last symbol.
//! 5. `bos ids eos`, truncated to `max_length` keeping eos, padded with the pad token.
//!
//! A folder holds either `vocab.json` + `merges.txt` (transformers 4 and the SD hub repos; used
//! when both are present) or only `tokenizer.json` (what transformers 5 saves; read by the
//! `hub_json` module), plus `tokenizer_config.json` from either version.

mod hub_json;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// OpenAI's CLIP BPE file (MIT licence, see `assets/NOTICE`), for checkpoints without tokenizer files.
static OPENAI_BPE_GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");

/// CLIP's pre-tokenisation pattern, as in transformers' `CLIPTokenizer`.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// GPT-2's byte-level pattern restricted to text without whitespace (pieces never hold any; the
/// original's whitespace alternatives need a look-ahead the `regex` crate does not have).
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// Suffix marking the last symbol of a word in CLIP's vocabulary.
const END_OF_WORD: &str = "</w>";

/// Words kept in the BPE cache at most (as `tokenizers` does).
const CACHE_CAPACITY: usize = 10_000;

/// Errors from loading or configuring a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A tokenizer file could not be read.
    #[error("cannot read tokenizer file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A tokenizer file did not have the expected content.
    #[error("invalid tokenizer file {path}: {message}")]
    Format {
        /// The file (or `<embedded>` for the built-in vocabulary).
        path: PathBuf,
        /// What was expected and what was found.
        message: String,
    },
    /// A tokenizer folder holds neither `vocab.json` + `merges.txt` nor `tokenizer.json`.
    #[error(
        "no tokenizer in {dir}: expected vocab.json and merges.txt, or tokenizer.json; found neither"
    )]
    Missing {
        /// The folder.
        dir: PathBuf,
    },
    /// The vocabulary, merges and special tokens do not fit together.
    #[error("invalid tokenizer: {0}")]
    Invalid(String),
}

/// Result alias for tokenizer operations.
pub type Result<T> = std::result::Result<T, TokenizerError>;

/// One special token: its text and whether it is matched in normalised (lower-cased) text
/// rather than in the raw prompt (the `normalized` flag of an AddedToken).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    /// The token text.
    pub content: String,
    /// Matched after normalisation (so `<|ENDOFTEXT|>` also matches `<|endoftext|>`).
    pub normalized: bool,
}

impl SpecialToken {
    /// A token matched in the raw text, as a plain string in a config file is.
    pub fn raw(content: &str) -> Self {
        Self {
            content: content.to_string(),
            normalized: false,
        }
    }
}

/// Special-token settings of a tokenizer folder (`tokenizer_config.json` overridden by
/// `special_tokens_map.json`, as transformers merges them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token.
    pub bos: SpecialToken,
    /// End-of-sequence token.
    pub eos: SpecialToken,
    /// Unknown token.
    pub unk: SpecialToken,
    /// Padding token (`<|endoftext|>` for SD 1.x, `!` for SD 2.x and SDXL's tokenizer_2).
    pub pad: SpecialToken,
    /// Padded length (`model_max_length`).
    pub max_length: usize,
    /// Further added tokens from `added_tokens_decoder`: (text, id).
    pub added: Vec<(String, u32)>,
}

impl Default for SpecialTokens {
    /// `CLIPTokenizer`'s defaults with SD's 77-token context.
    fn default() -> Self {
        Self {
            bos: SpecialToken::raw("<|startoftext|>"),
            eos: SpecialToken::raw("<|endoftext|>"),
            unk: SpecialToken::raw("<|endoftext|>"),
            pad: SpecialToken::raw("<|endoftext|>"),
            max_length: 77,
            added: Vec::new(),
        }
    }
}

impl SpecialTokens {
    /// The defaults with another pad token (e.g. `"!"` for SD 2.x / SDXL's second tokenizer).
    pub fn with_pad(pad: &str) -> Self {
        Self {
            pad: SpecialToken::raw(pad),
            ..Self::default()
        }
    }

    /// Reads `tokenizer_config.json` and `special_tokens_map.json` from `dir` where present; the
    /// latter wins, as in transformers. Missing keys keep the defaults, unknown keys are ignored.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let mut out = Self::default();
        let config_path = dir.join("tokenizer_config.json");
        if let Some(config) = read_json_if_exists(&config_path)? {
            out.apply(&config, &config_path)?;
            if let Some(len) = config.get("model_max_length") {
                // transformers writes a huge integer (or a float) when a folder has no limit.
                let n = len.as_f64().ok_or_else(|| TokenizerError::Format {
                    path: config_path.clone(),
                    message: format!("model_max_length must be a number, found {len}"),
                })?;
                if (2.0..=1e6).contains(&n) {
                    out.max_length = n as usize;
                }
            }
            if let Some(added) = config
                .get("added_tokens_decoder")
                .and_then(|v| v.as_object())
            {
                for (id, entry) in added {
                    let id: u32 = id.parse().map_err(|_| TokenizerError::Format {
                        path: config_path.clone(),
                        message: format!(
                            "added_tokens_decoder key must be a token id, found {id:?}"
                        ),
                    })?;
                    let content = token_text(entry).ok_or_else(|| TokenizerError::Format {
                        path: config_path.clone(),
                        message: format!("added token {id} has no content: {entry}"),
                    })?;
                    out.added.push((content, id));
                }
            }
        }
        let map_path = dir.join("special_tokens_map.json");
        if let Some(map) = read_json_if_exists(&map_path)? {
            out.apply(&map, &map_path)?;
        }
        Ok(out)
    }

    fn apply(&mut self, json: &serde_json::Value, path: &Path) -> Result<()> {
        let fields: [(&str, &mut SpecialToken); 4] = [
            ("bos_token", &mut self.bos),
            ("eos_token", &mut self.eos),
            ("unk_token", &mut self.unk),
            ("pad_token", &mut self.pad),
        ];
        for (key, slot) in fields {
            match json.get(key) {
                None | Some(serde_json::Value::Null) => {}
                Some(v) => {
                    let content = token_text(v).ok_or_else(|| TokenizerError::Format {
                        path: path.to_path_buf(),
                        message: format!(
                            "{key} must be a string or an object with \"content\", found {v}"
                        ),
                    })?;
                    let normalized = v
                        .get("normalized")
                        .and_then(|n| n.as_bool())
                        .unwrap_or(false);
                    *slot = SpecialToken {
                        content,
                        normalized,
                    };
                }
            }
        }
        Ok(())
    }
}

/// A token given as `"text"` or as an AddedToken object `{"content": "text", ...}`.
fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = read_file(path)?;
    crate::json::parse(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Format {
            path: path.to_path_buf(),
            message: format!("expected JSON: {e}"),
        })
}

/// GPT-2's reversible map from bytes to printable characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let code = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        // Codes are below 0x200, always valid scalar values.
        table[b as usize] = char::from_u32(code).unwrap_or('\u{fffd}');
    }
    table
}

/// A padded, possibly truncated token sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoding {
    /// `max_length` ids: bos, tokens, eos, then padding.
    pub ids: Vec<u32>,
    /// Whether tokens were dropped to fit `max_length` (callers should warn).
    pub truncated: bool,
    /// Length of the sequence with bos and eos before truncation.
    pub untruncated_len: usize,
}

/// The CLIP BPE tokenizer.
#[derive(Debug)]
pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    decoder: HashMap<u32, String>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_chars: [char; 256],
    /// Special tokens (text, id, matched after normalisation), longest first.
    specials: Vec<(String, u32, bool)>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
    max_length: usize,
    pattern: Regex,
    byte_level_pattern: Regex,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `vocab.json` and `merges.txt` when present, else
    /// `tokenizer.json`; plus `tokenizer_config.json` and `special_tokens_map.json` where present.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let json_path = dir.join("tokenizer.json");
        let (has_vocab, has_merges) = (vocab_path.exists(), merges_path.exists());
        if !(has_vocab && has_merges) && json_path.exists() {
            let specials = SpecialTokens::from_folder(dir)?;
            return hub_json::load(&json_path, &specials);
        }
        if !has_vocab && !has_merges {
            return Err(TokenizerError::Missing {
                dir: dir.to_path_buf(),
            });
        }
        let vocab_text = read_file(&vocab_path)?;
        let encoder: HashMap<String, u32> =
            crate::json::from_str(&vocab_text).map_err(|e| TokenizerError::Format {
                path: vocab_path.clone(),
                message: format!("expected a JSON object of token -> id: {e}"),
            })?;
        let merges_text = read_file(&merges_path)?;
        let mut merges = Vec::new();
        for (n, line) in merges_text.lines().enumerate() {
            if (n == 0 && line.starts_with("#version")) || line.is_empty() {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(TokenizerError::Format {
                        path: merges_path,
                        message: format!(
                            "line {}: expected two tokens separated by a space, found {line:?}",
                            n + 1
                        ),
                    })
                }
            }
        }
        let specials = SpecialTokens::from_folder(dir)?;
        Self::new(encoder, &merges, &specials)
    }

    /// The tokenizer built from OpenAI's CLIP BPE file embedded in the binary (the same
    /// vocabulary as `openai/clip-vit-large-patch14`), for single-file checkpoints.
    pub fn embedded(specials: &SpecialTokens) -> Result<Self> {
        let embedded = || PathBuf::from("<embedded bpe_simple_vocab_16e6.txt.gz>");
        let mut text = String::new();
        flate2::read::GzDecoder::new(OPENAI_BPE_GZ)
            .read_to_string(&mut text)
            .map_err(|e| TokenizerError::Format {
                path: embedded(),
                message: format!("expected gzipped UTF-8 text: {e}"),
            })?;
        // As OpenAI's SimpleTokenizer: skip the header line, keep 49152 - 256 - 2 merges.
        let lines: Vec<&str> = text.split('\n').collect();
        const N_MERGES: usize = 49152 - 256 - 2;
        if lines.len() < N_MERGES + 1 {
            return Err(TokenizerError::Format {
                path: embedded(),
                message: format!(
                    "expected at least {} lines, found {}",
                    N_MERGES + 1,
                    lines.len()
                ),
            });
        }
        let mut merges = Vec::with_capacity(N_MERGES);
        for line in &lines[1..=N_MERGES] {
            let (a, b) = line.split_once(' ').ok_or_else(|| TokenizerError::Format {
                path: embedded(),
                message: format!("expected a merge \"a b\", found {line:?}"),
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        // The first 512 ids follow Python's dict order of bytes_to_unicode(): the printable
        // bytes (mapped to themselves) first, then the remapped ones.
        let table = bytes_to_unicode();
        let mut byte_chars: Vec<char> = table
            .iter()
            .copied()
            .filter(|&c| (c as u32) < 256)
            .collect();
        byte_chars.extend(table.iter().copied().filter(|&c| (c as u32) >= 256));
        let mut vocab: Vec<String> = byte_chars.iter().map(|c| c.to_string()).collect();
        vocab.extend(byte_chars.iter().map(|c| format!("{c}{END_OF_WORD}")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<|startoftext|>".into());
        vocab.push("<|endoftext|>".into());
        let encoder = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        Self::new(encoder, &merges, specials)
    }

    /// Builds a tokenizer from a token -> id map, merges in rank order, and special tokens.
    pub fn new(
        encoder: HashMap<String, u32>,
        merges: &[(String, String)],
        specials: &SpecialTokens,
    ) -> Result<Self> {
        let ids = special_ids(&encoder, specials)?;
        let matched = config_matches(specials, ids);
        Self::build(encoder, merges, specials, matched)
    }

    /// [`ClipTokenizer::new`] with the special tokens cut out of the text given as (text, id,
    /// matched after normalisation).
    fn build(
        encoder: HashMap<String, u32>,
        merges: &[(String, String)],
        specials: &SpecialTokens,
        matched: Vec<(String, u32, bool)>,
    ) -> Result<Self> {
        let id_of = |what: &str, token: &str| -> Result<u32> {
            encoder.get(token).copied().ok_or_else(|| {
                TokenizerError::Invalid(format!("{what} token {token:?} is not in the vocabulary"))
            })
        };
        let [bos_id, eos_id, unk_id, pad_id] = special_ids(&encoder, specials)?;
        if specials.max_length < 2 {
            return Err(TokenizerError::Invalid(format!(
                "max_length must leave room for bos and eos (at least 2), found {}",
                specials.max_length
            )));
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let left = id_of("merge", a)?;
            let right = id_of("merge", b)?;
            let merged = id_of("merged", &format!("{a}{b}"))?;
            // The first occurrence of a pair defines its rank.
            merge_map
                .entry((left, right))
                .or_insert((rank as u32, merged));
        }
        let mut special_list: Vec<(String, u32, bool)> = Vec::new();
        for (text, id, normalized) in matched {
            if text.is_empty() {
                continue;
            }
            match special_list.iter_mut().find(|d| d.0 == text) {
                Some(d) => d.2 &= normalized,
                None => special_list.push((text, id, normalized)),
            }
        }
        special_list.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        let pattern = Regex::new(CLIP_PATTERN)
            .map_err(|e| TokenizerError::Invalid(format!("CLIP pre-tokenisation regex: {e}")))?;
        let byte_level_pattern = Regex::new(BYTE_LEVEL_PATTERN)
            .map_err(|e| TokenizerError::Invalid(format!("byte-level regex: {e}")))?;
        let decoder = encoder.iter().map(|(t, &i)| (i, t.clone())).collect();
        Ok(Self {
            encoder,
            decoder,
            merges: merge_map,
            byte_chars: bytes_to_unicode(),
            specials: special_list,
            bos_id,
            eos_id,
            pad_id,
            unk_id,
            max_length: specials.max_length,
            pattern,
            byte_level_pattern,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Padded length of [`ClipTokenizer::encode`]'s output.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Id of the beginning-of-sequence token.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of the end-of-sequence token.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of the padding token.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Number of entries in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    /// Id of a vocabulary entry.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.encoder.get(token).copied()
    }

    /// Vocabulary entry of an id.
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.decoder.get(&id).map(String::as_str)
    }

    /// Tokenises `text` into ids without bos, eos, truncation or padding.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        // Raw-text specials first; each text between them is normalised, then split on the
        // normalised specials (as `tokenizers`' AddedVocabulary does).
        self.split_specials(text, false, &mut out, &mut |segment, out| {
            if !segment.is_empty() {
                let normalized = normalize(segment);
                self.split_specials(&normalized, true, out, &mut |piece, out| {
                    self.tokenize_normalized(piece, out)
                });
            }
        });
        out
    }

    fn split_specials(
        &self,
        text: &str,
        normalized: bool,
        out: &mut Vec<u32>,
        rest_fn: &mut dyn FnMut(&str, &mut Vec<u32>),
    ) {
        let mut rest = text;
        while let Some((start, len, id)) = self.find_special(rest, normalized) {
            rest_fn(&rest[..start], out);
            out.push(id);
            rest = &rest[start + len..];
        }
        rest_fn(rest, out);
    }

    /// Encodes `text` as diffusers does: bos, tokens, eos, truncated to `max_length` keeping
    /// eos, padded with the pad token.
    pub fn encode(&self, text: &str) -> Encoding {
        let tokens = self.tokenize(text);
        let room = self.max_length - 2;
        let truncated = tokens.len() > room;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&tokens[..tokens.len().min(room)]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Encoding {
            ids,
            truncated,
            untruncated_len: tokens.len() + 2,
        }
    }

    /// Leftmost, then longest, special token in `text`: (byte offset, byte length, id).
    fn find_special(&self, text: &str, normalized: bool) -> Option<(usize, usize, u32)> {
        let mut best: Option<(usize, usize, u32)> = None;
        for (token, id, _) in self.specials.iter().filter(|s| s.2 == normalized) {
            if let Some(pos) = text.find(token.as_str()) {
                // specials are sorted longest first, so ties on position keep the longest.
                if best.is_none_or(|(p, _, _)| pos < p) {
                    best = Some((pos, token.len(), *id));
                }
            }
        }
        best
    }

    fn tokenize_normalized(&self, text: &str, out: &mut Vec<u32>) {
        for clip_piece in self.pattern.find_iter(text) {
            // The ByteLevel pre-tokenizer splits again with GPT-2's pattern (this only changes
            // pieces such as "<|endoftext|>" written in another case).
            for piece in self.byte_level_pattern.find_iter(clip_piece.as_str()) {
                let word: String = piece
                    .as_str()
                    .bytes()
                    .map(|b| self.byte_chars[b as usize])
                    .collect();
                self.bpe(&word, out);
            }
        }
    }

    fn bpe(&self, word: &str, out: &mut Vec<u32>) {
        if let Ok(cache) = self.cache.lock() {
            if let Some(ids) = cache.get(word) {
                out.extend_from_slice(ids);
                return;
            }
        }
        let chars: Vec<char> = word.chars().collect();
        let mut symbols: Vec<u32> = chars
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut s = c.to_string();
                if i + 1 == chars.len() {
                    s.push_str(END_OF_WORD);
                }
                self.encoder.get(&s).copied().unwrap_or(self.unk_id)
            })
            .collect();
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for (i, pair) in symbols.windows(2).enumerate() {
                if let Some(&(rank, merged)) = self.merges.get(&(pair[0], pair[1])) {
                    if best.is_none_or(|(r, _, _)| rank < r) {
                        best = Some((rank, i, merged));
                    }
                }
            }
            match best {
                Some((_, i, merged)) => {
                    symbols[i] = merged;
                    symbols.remove(i + 1);
                }
                None => break,
            }
        }
        out.extend_from_slice(&symbols);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() < CACHE_CAPACITY {
                cache.insert(word.to_string(), symbols);
            }
        }
    }
}

/// Ids of the bos, eos, unk and pad tokens.
fn special_ids(encoder: &HashMap<String, u32>, specials: &SpecialTokens) -> Result<[u32; 4]> {
    let id_of = |what: &str, token: &SpecialToken| -> Result<u32> {
        encoder.get(&token.content).copied().ok_or_else(|| {
            TokenizerError::Invalid(format!(
                "{what} token {:?} is not in the vocabulary",
                token.content
            ))
        })
    };
    Ok([
        id_of("bos", &specials.bos)?,
        id_of("eos", &specials.eos)?,
        id_of("unk", &specials.unk)?,
        id_of("pad", &specials.pad)?,
    ])
}

/// The special tokens a `vocab.json` folder cuts out of the text: (text, id, matched after
/// normalisation), from the configs' bos, eos, unk, pad (ids in that order) and added tokens.
/// Measured on real folder shapes with transformers 5: a text used as unk or pad token is matched
/// after normalisation only if all its unk/pad definitions say so; otherwise its own definition
/// decides.
fn config_matches(specials: &SpecialTokens, ids: [u32; 4]) -> Vec<(String, u32, bool)> {
    let [bos_id, eos_id, unk_id, pad_id] = ids;
    let mut defs: Vec<(String, u32, bool)> = Vec::new();
    for (token, id) in [(&specials.bos, bos_id), (&specials.eos, eos_id)] {
        defs.push((token.content.clone(), id, token.normalized));
    }
    for (text, id) in &specials.added {
        defs.push((text.clone(), *id, false));
    }
    for (token, id) in [(&specials.unk, unk_id), (&specials.pad, pad_id)] {
        defs.retain(|d| d.0 != token.content);
        defs.push((token.content.clone(), id, token.normalized));
    }
    defs
}

/// NFC, whitespace runs to one space, per-character lower-casing (the `tokenizers` normaliser
/// sequence of `CLIPTokenizer`; per character, so a final capital sigma becomes `σ`, not `ς`).
fn normalize(text: &str) -> String {
    let nfc: String = text.nfc().collect();
    let mut out = String::with_capacity(nfc.len());
    let mut in_space = false;
    for c in nfc.chars() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}
