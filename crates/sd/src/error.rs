//! The executor's error type.

use crate::tensor::OpError;

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What loading and running a model can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CPU op rejected its operands.
    #[error(transparent)]
    Op(#[from] OpError),
    /// The pager or device failed.
    #[error(transparent)]
    Pager(#[from] ferry_pager::Error),
    /// The scheduler failed (including a budget below the minimum).
    #[error(transparent)]
    Sched(#[from] ferry_sched::Error),
    /// The CUDA backend's activation arena (reserve too small, or a stale mark).
    #[error(transparent)]
    Arena(#[from] crate::backend::ArenaError),
    /// A weight the model needs is not in the checkpoint.
    #[error("weight '{0}' is missing from the checkpoint")]
    MissingWeight(String),
    /// A weight whose shape disagrees with the config.
    #[error("weight '{name}' has shape {found:?}, but the config implies {expected:?}")]
    WeightShape {
        /// Full weight name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A config field that is missing, malformed or unsupported.
    #[error("config: {0}")]
    Config(String),
    /// Anything else wrong with the arguments.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}
