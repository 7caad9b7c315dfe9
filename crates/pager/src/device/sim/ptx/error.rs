//! The interpreter's error type: every failure is one line naming what went wrong and where.

use std::fmt;

/// What kind of failure a [`PtxError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed PTX text.
    Parse,
    /// Well-formed PTX using an instruction, type, modifier or directive the interpreter lacks.
    Unimplemented,
    /// A launch refused before running: unknown kernel, bad parameters, limits exceeded.
    Launch,
    /// A sanitizer finding: out-of-bounds or misaligned access, uninitialised shared read.
    Memory,
    /// Threads wait for each other forever (barrier or warp collective).
    Deadlock,
    /// The per-launch instruction budget ran out.
    Budget,
}

/// An error from parsing or interpreting PTX; its message is a single line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxError {
    /// The kind of failure.
    pub kind: ErrorKind,
    /// The one-line message (names kernel, block, thread, PTX line where they apply).
    pub message: String,
}

impl PtxError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A parse error at `line`.
    pub fn parse(line: u32, message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Parse, format!("PTX line {line}: {message}"))
    }

    /// An unimplemented construct `what` at `line`.
    pub fn unimplemented(line: u32, what: impl fmt::Display) -> Self {
        Self::new(
            ErrorKind::Unimplemented,
            format!("PTX line {line}: unimplemented: {what}"),
        )
    }

    /// A launch refusal.
    pub fn launch(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Launch, message)
    }
}

impl fmt::Display for PtxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PtxError {}

/// Result alias for the interpreter.
pub type Result<T> = std::result::Result<T, PtxError>;
