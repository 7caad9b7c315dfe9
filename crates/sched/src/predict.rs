//! The cost-model predictor: runs the scheduling logic against virtual times instead of a device,
//! so a plan's pass time, stall and traffic are known before anything runs.

use crate::core::{CopyOp, Core, Timeline};
use crate::error::Result;
use crate::plan::{Layout, Problem};

/// What a layout is predicted to do.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    /// Steady-state pass time, ns.
    pub pass_ns: f64,
    /// First pass time including the resident load, ns.
    pub first_pass_ns: f64,
    /// Compute-stream stall per steady-state pass, ns.
    pub stall_ns: f64,
    /// Bytes copied per steady-state pass.
    pub streamed_bytes: u64,
}

/// Virtual-time model of one compute stream, one copy stream, one H2D engine and the host, with
/// the same rules as the simulated device.
pub(crate) struct CostTimeline {
    cost: crate::plan::CostModel,
    host: f64,
    h2d_free: f64,
    copy_tail: f64,
    compute_tail: f64,
}

impl CostTimeline {
    fn new(cost: crate::plan::CostModel) -> Self {
        CostTimeline {
            cost,
            host: 0.0,
            h2d_free: 0.0,
            copy_tail: 0.0,
            compute_tail: 0.0,
        }
    }

    fn launch(&self) -> f64 {
        self.host + self.cost.launch_latency.as_nanos() as f64
    }

    fn compute(&mut self, ns: f64) {
        let start = self.compute_tail.max(self.launch());
        self.compute_tail = start + ns.max(1.0);
    }
}

impl Timeline for CostTimeline {
    type Token = f64;

    fn copy(
        &mut self,
        _group: Option<crate::plan::GroupId>,
        ops: &[CopyOp],
        _base: u64,
        wait_for: &[f64],
        sync: bool,
    ) -> Result<f64> {
        let mut tail = if sync {
            self.compute_tail
        } else {
            self.copy_tail
        };
        for &t in wait_for {
            tail = tail.max(t);
        }
        for op in ops {
            let start = tail.max(self.h2d_free).max(self.launch());
            tail = start + self.cost.copy_time(op.len);
            self.h2d_free = tail;
        }
        if sync {
            self.compute_tail = tail;
        } else {
            self.copy_tail = tail;
        }
        Ok(tail.max(self.host))
    }

    fn compute_wait(&mut self, t: &f64) -> Result<()> {
        self.compute_tail = self.compute_tail.max(*t);
        Ok(())
    }

    fn compute_mark(&mut self) -> Result<f64> {
        Ok(self.compute_tail.max(self.host))
    }

    fn host_wait(&mut self, t: &f64) -> Result<()> {
        self.host = self.host.max(*t);
        Ok(())
    }

    fn recycle(&mut self, _t: f64) {}
}

/// Number of passes the predictor runs; the last one is the steady state.
pub const PREDICTED_PASSES: usize = 3;

/// Predicts `layout` on `p` (infinite times if the layout cannot run).
pub fn predict(p: &Problem, layout: &Layout) -> Prediction {
    run(p, layout).unwrap_or(Prediction {
        pass_ns: f64::INFINITY,
        first_pass_ns: f64::INFINITY,
        stall_ns: f64::INFINITY,
        streamed_bytes: u64::MAX,
    })
}

fn run(p: &Problem, layout: &Layout) -> Result<Prediction> {
    let mut core: Core<f64> = Core::new(
        &p.groups,
        p.order.clone(),
        layout.clone(),
        p.reserve,
        p.run_ahead,
    )?;
    let mut tl = CostTimeline::new(p.cost);
    let start = tl.compute_mark()?;
    core.load_residents(&p.groups, &mut tl)?;
    let mut first = 0.0;
    let mut last = Prediction {
        pass_ns: 0.0,
        first_pass_ns: 0.0,
        stall_ns: 0.0,
        streamed_bytes: 0,
    };
    for pass in 0..PREDICTED_PASSES {
        let begin = if pass == 0 { start } else { tl.compute_mark()? };
        let bytes = core.bytes_copied;
        let mut stall = 0.0;
        for &g in &p.order {
            let before = tl.compute_mark()?;
            core.acquire(g, &mut tl)?;
            stall += tl.compute_mark()? - before;
            tl.compute(p.groups[g.0].compute.as_nanos() as f64);
            core.release(g, &mut tl)?;
        }
        let end = tl.compute_mark()?;
        if pass == 0 {
            first = end - begin;
        }
        last = Prediction {
            pass_ns: end - begin,
            first_pass_ns: first,
            stall_ns: stall,
            streamed_bytes: core.bytes_copied - bytes,
        };
    }
    Ok(last)
}
