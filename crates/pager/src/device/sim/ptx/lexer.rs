//! Splits PTX text into tokens with line numbers.

use super::error::{PtxError, Result};

/// One token of PTX source.
#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// Identifier, opcode, directive, register or special register (may contain dots).
    Word(String),
    /// An integer literal's bits (decimal, hex `0x`, octal, binary), before any sign.
    Int(u64),
    /// A float literal as f64 bits (`0d…`, decimal) or f32 bits (`0f…`).
    Float {
        /// The literal's bits.
        bits: u64,
        /// Whether the bits are an f64 (else an f32).
        double: bool,
    },
    /// A string literal (for `.pragma`).
    Str(String),
    /// Punctuation: one of `{ } ( ) [ ] , ; : @ ! + - | < > =`.
    Punct(char),
}

/// A token and the 1-based line it starts on.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// The token.
    pub tok: Tok,
    /// Its line.
    pub line: u32,
}

fn is_word_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'%' | b'.')
}

fn number(text: &str, line: u32) -> Result<Tok> {
    let bad = || PtxError::parse(line, format!("bad number literal `{text}`"));
    let lower = text.to_ascii_lowercase();
    let hex = |digits: &str| u64::from_str_radix(digits, 16).map_err(|_| bad());
    if let Some(d) = lower.strip_prefix("0f") {
        if d.len() != 8 {
            return Err(bad());
        }
        return Ok(Tok::Float {
            bits: hex(d)?,
            double: false,
        });
    }
    if let Some(d) = lower.strip_prefix("0d") {
        if d.len() != 16 {
            return Err(bad());
        }
        return Ok(Tok::Float {
            bits: hex(d)?,
            double: true,
        });
    }
    let body = lower.strip_suffix('u').unwrap_or(&lower);
    if let Some(d) = body.strip_prefix("0x") {
        return Ok(Tok::Int(hex(d)?));
    }
    if let Some(d) = body.strip_prefix("0b") {
        return u64::from_str_radix(d, 2).map(Tok::Int).map_err(|_| bad());
    }
    if body.contains(['.', 'e']) {
        let v: f64 = body.parse().map_err(|_| bad())?;
        return Ok(Tok::Float {
            bits: v.to_bits(),
            double: true,
        });
    }
    if body.len() > 1 && body.starts_with('0') {
        return u64::from_str_radix(&body[1..], 8)
            .map(Tok::Int)
            .map_err(|_| bad());
    }
    body.parse::<u64>().map(Tok::Int).map_err(|_| bad())
}

/// Tokenises `src`, dropping comments.
pub fn lex(src: &str) -> Result<Vec<Token>> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1u32;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let start = line;
            i += 2;
            loop {
                if i + 1 >= b.len() {
                    return Err(PtxError::parse(start, "unterminated comment"));
                }
                if b[i] == b'*' && b[i + 1] == b'/' {
                    i += 2;
                    break;
                }
                if b[i] == b'\n' {
                    line += 1;
                }
                i += 1;
            }
        } else if c == b'"' {
            let start = i + 1;
            i += 1;
            while i < b.len() && b[i] != b'"' && b[i] != b'\n' {
                i += 1;
            }
            if i >= b.len() || b[i] != b'"' {
                return Err(PtxError::parse(line, "unterminated string"));
            }
            out.push(Token {
                tok: Tok::Str(src[start..i].to_string()),
                line,
            });
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                // `1e-5` style exponents
                i += 1;
                if (b[i - 1] == b'e' || b[i - 1] == b'E')
                    && !src[start..i].to_ascii_lowercase().starts_with("0x")
                    && !src[start..i].to_ascii_lowercase().starts_with("0f")
                    && !src[start..i].to_ascii_lowercase().starts_with("0d")
                    && i < b.len()
                    && (b[i] == b'-' || b[i] == b'+')
                {
                    i += 1;
                }
            }
            out.push(Token {
                tok: number(&src[start..i], line)?,
                line,
            });
        } else if is_word_char(c) {
            let start = i;
            loop {
                while i < b.len() && is_word_char(b[i]) {
                    i += 1;
                }
                // Sub-qualifiers such as `.shared::cta` or `.L2::cache_hint` stay in the word.
                if b.get(i) == Some(&b':')
                    && b.get(i + 1) == Some(&b':')
                    && b.get(i + 2).is_some_and(|&c| c.is_ascii_alphabetic())
                {
                    i += 2;
                } else {
                    break;
                }
            }
            out.push(Token {
                tok: Tok::Word(src[start..i].to_string()),
                line,
            });
        } else if b"{}()[],;:@!+-|<>=".contains(&c) {
            out.push(Token {
                tok: Tok::Punct(c as char),
                line,
            });
            i += 1;
        } else {
            let ch = src[i..].chars().next().unwrap_or('?');
            return Err(PtxError::parse(
                line,
                format!("unexpected character `{ch}`"),
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        let t = lex("0f3F800000 0d3FF0000000000000 0x10 -9223372036854775808 1.5").unwrap();
        assert_eq!(
            t[0].tok,
            Tok::Float {
                bits: 0x3F80_0000,
                double: false
            }
        );
        assert_eq!(
            t[1].tok,
            Tok::Float {
                bits: 0x3FF0_0000_0000_0000,
                double: true
            }
        );
        assert_eq!(t[2].tok, Tok::Int(16));
        assert_eq!(t[3].tok, Tok::Punct('-'));
        assert_eq!(t[4].tok, Tok::Int(9_223_372_036_854_775_808));
        assert_eq!(
            t[5].tok,
            Tok::Float {
                bits: 1.5f64.to_bits(),
                double: true
            }
        );
    }

    #[test]
    fn words_and_lines() {
        let t = lex("ld.global.nc.f64 %fd1, [%rd2+8]; // c\n$L__BB0_2:").unwrap();
        assert_eq!(t[0].tok, Tok::Word("ld.global.nc.f64".into()));
        assert_eq!(t.last().unwrap().line, 2);
        assert!(lex("a # b").is_err());
    }
}
