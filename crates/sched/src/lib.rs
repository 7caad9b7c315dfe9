//! Ferry's prefetching transfer scheduler: given the weight groups of a model, the order they are
//! used in each pass, a cost model and a VRAM budget, it plans which groups stay resident and
//! streams the rest on a copy stream ahead of compute, ordered by events, inside the budget.

mod core;
pub mod error;
pub mod metrics;
pub mod plan;
pub mod predict;
pub mod ring;
pub mod scheduler;
pub mod tiers;
pub mod transfer;

pub use error::{Error, Result};
pub use metrics::RunMetrics;
pub use plan::{CostModel, GroupDesc, GroupId, Layout, Mode, PlanSummary, Problem, TensorSource};
pub use scheduler::{GroupView, Replan, Scheduler, SchedulerConfig};
pub use tiers::{plan_tiers, DiskCost, Tier, TierPlan};

/// The README's code examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
