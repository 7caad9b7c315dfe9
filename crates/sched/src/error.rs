//! The scheduler's error type.

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What planning and scheduling can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device layer failed.
    #[error(transparent)]
    Device(#[from] ferry_pager::Error),
    /// The budget cannot run this mode at all.
    #[error("VRAM budget of {budget} bytes is too small for mode '{mode}': the minimum workable budget is {minimum} bytes ({detail})")]
    BudgetTooSmall {
        /// The budget given.
        budget: u64,
        /// The smallest budget that works.
        minimum: u64,
        /// The mode asked for.
        mode: String,
        /// What the minimum is made of.
        detail: String,
    },
    /// A call that does not fit the scheduler's state or inputs.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}
