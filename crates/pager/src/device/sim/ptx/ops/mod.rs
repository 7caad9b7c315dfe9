//! Instruction semantics by family, as pure functions on bit patterns.

pub mod atomic;
pub mod cvt;
pub mod float;
pub mod int;
