//! Fault injection and resource accounting for the simulated device.
//!
//! A [`FaultPlan`] makes chosen calls fail with [`Error::Injected`] before they have any effect,
//! as a CUDA call returning an error code would: the k-th allocation, copy, event call, sync or
//! kernel launch since the plan was set. Frees never fail, so that cleanup paths can be checked for
//! leaks with [`SimResources`].

use crate::error::Error;
use std::fmt;

/// A kind of simulated-device call that a [`FaultPlan`] can make fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultOp {
    /// [`crate::Device::alloc_device`].
    AllocDevice,
    /// [`crate::Device::alloc_host`] and [`crate::Device::register_host_file`].
    AllocHost,
    /// [`crate::Device::create_stream`].
    CreateStream,
    /// [`crate::Device::create_event`].
    CreateEvent,
    /// [`crate::Device::record_event`].
    RecordEvent,
    /// [`crate::Device::wait_event`].
    WaitEvent,
    /// [`crate::Device::sync_event`] and [`crate::Device::sync_stream`].
    Sync,
    /// [`crate::Device::copy_h2d`], [`crate::Device::copy_h2d_pageable`] and
    /// [`crate::Device::copy_d2h`].
    Copy,
    /// [`super::SimDevice::launch`], [`crate::Device::busy`] and [`crate::Device::launch_ptx`].
    Launch,
}

impl FaultOp {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultOp; 9] = [
        FaultOp::AllocDevice,
        FaultOp::AllocHost,
        FaultOp::CreateStream,
        FaultOp::CreateEvent,
        FaultOp::RecordEvent,
        FaultOp::WaitEvent,
        FaultOp::Sync,
        FaultOp::Copy,
        FaultOp::Launch,
    ];

    /// A short name for messages (`"alloc_device"`, `"copy"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            FaultOp::AllocDevice => "alloc_device",
            FaultOp::AllocHost => "alloc_host",
            FaultOp::CreateStream => "create_stream",
            FaultOp::CreateEvent => "create_event",
            FaultOp::RecordEvent => "record_event",
            FaultOp::WaitEvent => "wait_event",
            FaultOp::Sync => "sync",
            FaultOp::Copy => "copy",
            FaultOp::Launch => "launch",
        }
    }

    fn index(self) -> usize {
        FaultOp::ALL.iter().position(|&o| o == self).unwrap_or(0)
    }
}

impl fmt::Display for FaultOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One rule of a [`FaultPlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rule {
    op: FaultOp,
    index: u64,
    persistent: bool,
}

/// Which calls of a simulated device fail. Calls are counted per [`FaultOp`] from 0, from the
/// moment the plan is set with [`super::SimDevice::set_fault_plan`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    rules: Vec<Rule>,
}

impl FaultPlan {
    /// No faults.
    pub fn none() -> FaultPlan {
        FaultPlan::default()
    }

    /// The `index`-th call (0-based) of kind `op` fails; later ones succeed.
    pub fn nth(op: FaultOp, index: u64) -> FaultPlan {
        FaultPlan::none().and_nth(op, index)
    }

    /// The `index`-th call of kind `op` and every later one fail (a device that stays broken).
    pub fn from_nth(op: FaultOp, index: u64) -> FaultPlan {
        FaultPlan::none().and_from_nth(op, index)
    }

    /// This plan, plus the `index`-th call of kind `op` failing.
    pub fn and_nth(mut self, op: FaultOp, index: u64) -> FaultPlan {
        self.rules.push(Rule {
            op,
            index,
            persistent: false,
        });
        self
    }

    /// This plan, plus every call of kind `op` from the `index`-th on failing.
    pub fn and_from_nth(mut self, op: FaultOp, index: u64) -> FaultPlan {
        self.rules.push(Rule {
            op,
            index,
            persistent: true,
        });
        self
    }

    /// Whether the plan makes no call fail.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn fails(&self, op: FaultOp, index: u64) -> bool {
        self.rules
            .iter()
            .any(|r| r.op == op && (r.index == index || (r.persistent && index > r.index)))
    }
}

/// How many calls of each [`FaultOp`] kind a simulated device has seen since its fault plan was
/// last set (or since it was created).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    counts: [u64; FaultOp::ALL.len()],
    /// Calls that were made to fail.
    pub injected: u64,
}

impl FaultCounts {
    /// Calls of kind `op`.
    pub fn get(&self, op: FaultOp) -> u64 {
        self.counts[op.index()]
    }
}

/// The fault plan and the call counters, kept in the device state.
#[derive(Debug, Default)]
pub(super) struct Faults {
    plan: FaultPlan,
    counts: FaultCounts,
}

impl Faults {
    /// Replaces the plan and restarts the counters.
    pub(super) fn set(&mut self, plan: FaultPlan) {
        self.plan = plan;
        self.counts = FaultCounts::default();
    }

    pub(super) fn counts(&self) -> FaultCounts {
        self.counts
    }

    /// Counts one call of kind `op`; `Err(Error::Injected)` if the plan makes it fail.
    pub(super) fn check(&mut self, op: FaultOp) -> Result<(), Error> {
        let i = op.index();
        let index = self.counts.counts[i];
        self.counts.counts[i] += 1;
        if self.plan.fails(op, index) {
            self.counts.injected += 1;
            return Err(Error::Injected {
                op: op.name(),
                index,
            });
        }
        Ok(())
    }
}

/// What a simulated device holds right now (for leak checks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimResources {
    /// Live device allocations.
    pub device_allocs: usize,
    /// Bytes in them.
    pub device_bytes: u64,
    /// Live pinned host allocations (registrations not included).
    pub host_allocs: usize,
    /// Bytes in them.
    pub host_bytes: u64,
    /// Live in-place file registrations.
    pub registrations: usize,
    /// Bytes of registered files.
    pub registered_bytes: u64,
    /// Events created and not destroyed.
    pub events: usize,
    /// Streams created and not destroyed.
    pub streams: usize,
    /// Enqueued operations whose effects have not all been applied yet.
    pub pending_ops: usize,
}

impl SimResources {
    /// The same numbers, ignoring pending operations (which a host sync drains).
    pub fn held(&self) -> SimResources {
        SimResources {
            pending_ops: 0,
            ..*self
        }
    }
}
