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
    disk: Option<DiskModel>,
}

/// The disk tier as the predictor sees it: which groups stream from disk, the simulated disk,
/// and the host staging ring, replayed exactly as `ferry_pager::disk::DiskTier` drives them.
pub(crate) struct DiskModel {
    pub on_disk: Vec<bool>,
    pub disk: ferry_pager::disk::SimDisk,
    pub chunk_bytes: u64,
    pub request_bytes: u64,
    /// Per staging chunk: when the last copy out of it ends, ns.
    pub chunk_free: Vec<f64>,
    pub next_chunk: usize,
    pub read_bytes: u64,
}

impl CostTimeline {
    fn new(cost: crate::plan::CostModel) -> Self {
        CostTimeline {
            cost,
            host: 0.0,
            h2d_free: 0.0,
            copy_tail: 0.0,
            compute_tail: 0.0,
            disk: None,
        }
    }

    /// Copies of a disk-streamed unit of `bytes`: spans of one chunk each, read into the staging
    /// ring (at most one span in flight per chunk) and copied out in order after `tail`.
    fn disk_copy(&mut self, bytes: u64, mut tail: f64) -> f64 {
        let Some(d) = self.disk.as_mut() else {
            return tail;
        };
        let cap = d.chunk_bytes.max(1);
        let spans: Vec<u64> = (0..bytes.div_ceil(cap))
            .map(|i| cap.min(bytes - i * cap))
            .collect();
        let k = d.chunk_free.len().max(1);
        let mut read_end = vec![0.0f64; spans.len()];
        let (mut dispatched, mut completed) = (0usize, 0usize);
        while completed < spans.len() {
            while dispatched < spans.len() && dispatched - completed < k {
                let c = (d.next_chunk + dispatched) % k;
                // The host waits for the chunk's fence before its readers write into it.
                self.host = self.host.max(d.chunk_free[c]);
                let mut pos = 0;
                let mut end = 0.0f64;
                while pos < spans[dispatched] {
                    let len = d.request_bytes.max(1).min(spans[dispatched] - pos);
                    let (_, e) = d.disk.read(self.host.ceil() as u64, len);
                    end = end.max(e as f64);
                    pos += len;
                }
                read_end[dispatched] = end;
                d.read_bytes += spans[dispatched];
                dispatched += 1;
            }
            let c = (d.next_chunk + completed) % k;
            self.host = self.host.max(read_end[completed]);
            let start = tail
                .max(self.h2d_free)
                .max(self.host + self.cost.launch_latency.as_nanos() as f64);
            tail = start + self.cost.copy_time(spans[completed]);
            self.h2d_free = tail;
            d.chunk_free[c] = tail;
            completed += 1;
        }
        d.next_chunk = (d.next_chunk + spans.len()) % k;
        tail
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
        group: Option<crate::plan::GroupId>,
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
        let from_disk = match (&self.disk, group) {
            (Some(d), Some(g)) => d.on_disk.get(g.0).copied().unwrap_or(false),
            _ => false,
        };
        if from_disk {
            let bytes = ops.iter().map(|o| o.len).sum();
            tail = self.disk_copy(bytes, tail);
        }
        for op in ops.iter().filter(|_| !from_disk) {
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

/// Predicts `layout` with the groups marked in `disk.on_disk` streamed from disk (infinite times
/// if the layout cannot run); also returns the bytes read from disk per steady-state pass.
pub(crate) fn predict_with_disk(
    p: &Problem,
    layout: &Layout,
    disk: DiskModel,
) -> (Prediction, u64) {
    run_with(p, layout, Some(disk)).unwrap_or((
        Prediction {
            pass_ns: f64::INFINITY,
            first_pass_ns: f64::INFINITY,
            stall_ns: f64::INFINITY,
            streamed_bytes: u64::MAX,
        },
        u64::MAX,
    ))
}

fn run(p: &Problem, layout: &Layout) -> Result<Prediction> {
    run_with(p, layout, None).map(|(p, _)| p)
}

fn run_with(p: &Problem, layout: &Layout, disk: Option<DiskModel>) -> Result<(Prediction, u64)> {
    let mut core: Core<f64> = Core::new(
        &p.groups,
        p.order.clone(),
        layout.clone(),
        p.reserve,
        p.run_ahead,
    )?;
    let mut tl = CostTimeline::new(p.cost);
    tl.disk = disk;
    let start = tl.compute_mark()?;
    core.load_residents(&p.groups, &mut tl)?;
    let mut first = 0.0;
    let mut last = Prediction {
        pass_ns: 0.0,
        first_pass_ns: 0.0,
        stall_ns: 0.0,
        streamed_bytes: 0,
    };
    let mut disk_bytes = 0;
    for pass in 0..PREDICTED_PASSES {
        let begin = if pass == 0 { start } else { tl.compute_mark()? };
        let bytes = core.bytes_copied;
        let read_before = tl.disk.as_ref().map_or(0, |d| d.read_bytes);
        let mut stall = 0.0;
        for &g in &p.order {
            let before = tl.compute_mark()?;
            core.acquire(g, &mut tl)?;
            stall += tl.compute_mark()? - before;
            tl.compute(p.groups[g.0].compute.as_nanos() as f64);
            core.release(g, &mut tl)?;
        }
        let end = tl.compute_mark()?;
        disk_bytes = tl.disk.as_ref().map_or(0, |d| d.read_bytes) - read_before;
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
    Ok((last, disk_bytes))
}
