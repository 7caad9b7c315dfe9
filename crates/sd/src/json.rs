//! JSON as Python writes it. `json.dumps` emits `NaN`, `Infinity` and `-Infinity` for non-finite
//! floats, and diffusers / transformers configs carry them (DPM-Solver's `lambda_min_clipped` is
//! `-Infinity`); `serde_json` rejects them. Every config Ferry reads goes through this module.
//!
//! A non-finite literal becomes a marker string in the parsed [`Value`] (a `serde_json` number
//! cannot hold one); [`number`] reads it back as the `f64` it stands for, and typed fields that need
//! a finite number get an error naming the literal. Anything else that is not JSON is rejected with
//! its line and column in the original text.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Prefix of the marker string that stands for a non-finite literal (starts with U+0000, which
/// real JSON can only spell as an escape, so no config string looks like it).
const MARKER: &str = "\u{0}ferry-non-finite:";

/// A JSON text that is not JSON (nor Python's `NaN` / `Infinity` extension), or that does not fit
/// the type asked for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message} at line {line} column {column}")]
pub struct JsonError {
    /// 1-based line in the original text.
    pub line: usize,
    /// 1-based byte column in the original text.
    pub column: usize,
    /// What was wrong (serde_json's description, non-finite markers spelled as in the file).
    pub message: String,
}

/// One substitution: on `line`, a literal of `from` bytes ending at output column `out_end`
/// became a marker of `to` bytes.
struct Substitution {
    line: usize,
    out_end: usize,
    from: usize,
    to: usize,
}

/// Parses Python-style JSON into a [`Value`].
pub fn parse(text: &str) -> Result<Value, JsonError> {
    from_str(text)
}

/// Parses Python-style JSON that must be an object.
pub fn parse_object(text: &str) -> Result<Map<String, Value>, JsonError> {
    match parse(text)? {
        Value::Object(m) => Ok(m),
        other => Err(JsonError {
            line: 1,
            column: 1,
            message: format!("expected a JSON object, found {}", kind(&other)),
        }),
    }
}

/// Parses Python-style JSON into `T`. A non-finite literal in a field that needs a finite number
/// is an error naming it.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, JsonError> {
    let (strict, subs) = substitute(text);
    serde_json::from_str(&strict).map_err(|e| map_error(&e, &subs))
}

/// A number field: a JSON number, or a non-finite literal (`NaN`, `Infinity`, `-Infinity`).
pub fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.strip_prefix(MARKER)? {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

/// The value that stands for `x` (a plain number when finite), as [`parse`] would produce it.
pub fn from_f64(x: f64) -> Value {
    match serde_json::Number::from_f64(x) {
        Some(n) => Value::Number(n),
        None => Value::String(format!("{MARKER}{}", python_literal(x))),
    }
}

/// Describes a value for an error message: its kind, or the non-finite literal it stands for.
pub fn kind(v: &Value) -> String {
    if let Some(x) = number(v).filter(|x| !x.is_finite()) {
        return format!("the non-finite number {}", python_literal(x));
    }
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
    .to_string()
}

fn python_literal(x: f64) -> &'static str {
    if x.is_nan() {
        "NaN"
    } else if x > 0.0 {
        "Infinity"
    } else {
        "-Infinity"
    }
}

/// Replaces each non-finite literal outside strings with a marker string; records where.
fn substitute(text: &str) -> (String, Vec<Substitution>) {
    let mut out = String::with_capacity(text.len());
    let mut subs = Vec::new();
    let (mut line, mut line_start) = (1usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(lit) = ["NaN", "Infinity", "-Infinity"]
            .into_iter()
            .find(|l| literal_at(rest, l) && !is_key(&rest[l.len()..]))
        {
            let marker = format!("\"\\u0000{}{lit}\"", &MARKER[1..]);
            out.push_str(&marker);
            subs.push(Substitution {
                line,
                out_end: out.len() - line_start,
                from: lit.len(),
                to: marker.len(),
            });
            rest = &rest[lit.len()..];
            continue;
        }
        out.push(c);
        if c == '\n' {
            line += 1;
            line_start = out.len();
        }
        rest = &rest[c.len_utf8()..];
    }
    (out, subs)
}

/// `rest` starts with the literal `lit`, not followed by more of an identifier.
/// Whether a literal followed by `after` stands where an object key goes (`{NaN: 1}`): left as
/// it is, so that it stays the syntax error it is in Python's JSON too.
fn is_key(after: &str) -> bool {
    after.trim_start().starts_with(':')
}

fn literal_at(rest: &str, lit: &str) -> bool {
    rest.starts_with(lit)
        && !rest[lit.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
}

/// serde_json's error, with its position moved back to the original text and markers spelled as
/// the literals they replaced.
fn map_error(e: &serde_json::Error, subs: &[Substitution]) -> JsonError {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let mut message = full.strip_suffix(&suffix).unwrap_or(&full).to_string();
    for lit in ["-Infinity", "Infinity", "NaN"] {
        message = message.replace(
            &format!("string \"\\0{}{lit}\"", &MARKER[1..]),
            &format!("the non-finite number {lit}"),
        );
    }
    let mut column = e.column();
    for s in subs.iter().filter(|s| s.line == e.line()) {
        if s.out_end <= e.column() {
            column -= s.to - s.from;
        } else if s.out_end - s.to < e.column() {
            // Inside a marker: point at the literal's start.
            column = s.out_end - s.to + 1 - subs_before(subs, s);
        }
    }
    JsonError {
        line: e.line().max(1),
        column: column.max(1),
        message,
    }
}

/// Bytes added by the markers before `s` on its line.
fn subs_before(subs: &[Substitution], s: &Substitution) -> usize {
    subs.iter()
        .filter(|o| o.line == s.line && o.out_end < s.out_end)
        .map(|o| o.to - o.from)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_literals_keep_their_meaning() {
        let v =
            parse(r#"{"a": -Infinity, "b": [NaN, Infinity, 1.5], "c": "NaN -Infinity"}"#).unwrap();
        assert_eq!(number(&v["a"]), Some(f64::NEG_INFINITY));
        assert!(number(&v["b"][0]).unwrap().is_nan());
        assert_eq!(number(&v["b"][1]), Some(f64::INFINITY));
        assert_eq!(number(&v["b"][2]), Some(1.5));
        assert_eq!(v["c"], "NaN -Infinity", "strings are untouched");
        assert_eq!(number(&v["c"]), None);
        assert_eq!(kind(&v["a"]), "the non-finite number -Infinity");
    }

    #[test]
    fn markers_survive_a_round_trip_through_text() {
        let v = parse(r#"{"x": -Infinity, "s": "a\"NaN\\"}"#).unwrap();
        let again = parse(&serde_json::to_string(&v).unwrap()).unwrap();
        assert_eq!(v, again);
        assert_eq!(number(&again["x"]), Some(f64::NEG_INFINITY));
        assert_eq!(again["s"], "a\"NaN\\");
        assert_eq!(from_f64(f64::NEG_INFINITY), v["x"]);
        assert_eq!(from_f64(2.0), serde_json::json!(2.0));
    }

    #[test]
    fn malformed_json_reports_the_original_position() {
        // Line 2: the error (a missing comma) comes after two substituted literals.
        let e = parse("{\"a\": 1,\n \"b\": [NaN, -Infinity 3]}").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert_eq!(e.column, 23, "{e}");
        assert!(e.message.contains("expected"), "{e}");
        let e = parse("{\"a\": nan}").unwrap_err();
        assert_eq!((e.line, e.column), (1, 8), "{e}");
        assert!(parse("{\"a\": NaNa}").is_err());
        assert!(parse("{NaN: 1}").is_err(), "a literal is not a key");
        assert!(parse("{\"a\": {Infinity : 2}}").is_err());
        assert!(parse("{\"a\": +Infinity}").is_err());
        assert!(parse_object("[1]")
            .unwrap_err()
            .message
            .contains("an array"));
    }

    #[test]
    fn typed_fields_name_a_non_finite_literal() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct C {
            eps: f64,
        }
        let e = from_str::<C>("{\"eps\": NaN}").unwrap_err();
        assert!(e.message.contains("the non-finite number NaN"), "{e}");
        assert_eq!((e.line, e.column), (1, 11), "{e}");
        assert_eq!(from_str::<C>("{\"eps\": 0.5}").unwrap().eps, 0.5);
    }
}
