//! Helpers of the sanitizer checks the executor runs on every access.

/// Index of the first byte never written, if any.
pub fn first_unset(init: &[bool]) -> Option<usize> {
    init.iter().position(|b| !b)
}
