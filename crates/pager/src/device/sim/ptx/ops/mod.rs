//! Instruction semantics by family, as pure functions on bit patterns.

pub mod cvt;
pub mod float;
pub mod int;
