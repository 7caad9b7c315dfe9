//! What the scheduler is asked to run (groups, their order, costs, the budget) and how it decides
//! the layout: which groups stay resident, how large the staging ring is, how far it prefetches.

use crate::error::{Error, Result};
use crate::predict::{predict, Prediction};
use ferry_pager::{Device, DevicePtr, EventId, HostMemKind, HostPtr, StreamId};
use std::fmt;
use std::time::Duration;

/// Device alignment of every tensor and region.
pub const ALIGN: u64 = 256;

/// Rounds up to [`ALIGN`].
pub fn align(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

/// Index of a weight group in the scheduler's group list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub usize);

/// Where one tensor's bytes live in pinned host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSource {
    /// Checkpoint key.
    pub name: String,
    /// Host allocation.
    pub host: HostPtr,
    /// Offset inside it.
    pub offset: u64,
    /// Length in bytes.
    pub bytes: u64,
}

/// A weight group: the tensors of one layer or block, paged as a unit.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupDesc {
    /// Name, following the checkpoint's module path (e.g. `down_blocks.0.resnets.1`).
    pub name: String,
    /// Model component it belongs to (`unet`, `text_encoder`, `vae`): the unit of `model` mode.
    pub component: String,
    /// Its tensors, in order; each lands contiguous and aligned in device memory.
    pub tensors: Vec<TensorSource>,
    /// Modelled or measured compute time of the work that uses it, per use.
    pub compute: Duration,
}

impl GroupDesc {
    /// Device bytes the group occupies (each tensor aligned).
    pub fn device_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| align(t.bytes)).sum()
    }
}

/// How the scheduler pages weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Everything resident.
    None,
    /// Whole components swapped in and out on demand (diffusers' model CPU offload).
    Model,
    /// Every group copied on demand on the compute stream, the host waiting for each (accelerate's
    /// sequential offload; kept as the baseline).
    Sequential,
    /// Every group streamed through the staging ring with a fixed prefetch depth.
    Group {
        /// Groups copied ahead of the one in use.
        depth: usize,
    },
    /// Resident set chosen from the cost model, the rest streamed with prefetch as deep as the
    /// staging ring allows.
    Auto,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::None => write!(f, "none"),
            Mode::Model => write!(f, "model"),
            Mode::Sequential => write!(f, "sequential"),
            Mode::Group { depth } => write!(f, "group(depth {depth})"),
            Mode::Auto => write!(f, "auto"),
        }
    }
}

/// The transfer cost model: measured on the device, or the simulator's own parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostModel {
    /// Pinned host→device bandwidth, bytes per second.
    pub h2d_bandwidth: f64,
    /// Fixed cost of each copy.
    pub copy_latency: Duration,
    /// Delay between issuing work and the device starting it.
    pub launch_latency: Duration,
}

impl CostModel {
    /// Time of one copy of `bytes`.
    pub fn copy_time(&self, bytes: u64) -> f64 {
        let t = self.copy_latency.as_nanos() as f64 + bytes as f64 / self.h2d_bandwidth * 1e9;
        t.ceil().max(1.0)
    }

    /// The simulator's parameters.
    pub fn of_sim(cfg: &ferry_pager::device::sim::SimConfig) -> Self {
        CostModel {
            h2d_bandwidth: cfg.h2d_bandwidth,
            copy_latency: cfg.copy_latency,
            launch_latency: cfg.launch_latency,
        }
    }

    /// Measures pinned host→device bandwidth and per-copy latency on `dev` with device events:
    /// the median of several small (4 KiB) copies gives the latency, a large copy (up to 64 MiB,
    /// less if the device has less free) the bandwidth. `launch_latency` is taken as given.
    /// Frees what it allocated, also on error.
    pub fn measure(dev: &dyn Device, launch_latency: Duration) -> Result<CostModel> {
        let free = dev.mem_info()?.free;
        let large = (64u64 << 20).min(free / 4).max(1 << 20);
        let host = dev.alloc_host(large, HostMemKind::Upload)?;
        let result = dev
            .alloc_device(large)
            .map_err(Error::from)
            .and_then(|buf| {
                let r = time_copies(dev, host, buf, large);
                let _ = dev.free_device(buf);
                r
            });
        let _ = dev.free_host(host);
        let (latency, large_ns) = result?;
        let transfer = (large_ns - latency).max(1.0);
        Ok(CostModel {
            h2d_bandwidth: large as f64 / transfer * 1e9,
            copy_latency: Duration::from_nanos(latency.round() as u64),
            launch_latency,
        })
    }
}

/// (median ns of a 4 KiB copy, ns of one `large`-byte copy), timed with events on a fresh stream.
fn time_copies(dev: &dyn Device, host: HostPtr, buf: DevicePtr, large: u64) -> Result<(f64, f64)> {
    let s = dev.create_stream()?;
    let mut events = Vec::with_capacity(2);
    let r = (|| {
        events.push(dev.create_event()?);
        events.push(dev.create_event()?);
        time_copies_on(dev, s, (events[0], events[1]), host, buf, large)
    })();
    // The caller frees the buffers (which waits for the copies); the handles go now.
    for e in events {
        let _ = dev.destroy_event(e);
    }
    let _ = dev.destroy_stream(s);
    r
}

fn time_copies_on(
    dev: &dyn Device,
    s: StreamId,
    (a, b): (EventId, EventId),
    host: HostPtr,
    buf: DevicePtr,
    large: u64,
) -> Result<(f64, f64)> {
    let time = |bytes: u64| -> Result<f64> {
        // Keep the stream busy so the copy starts right after `a`, not after the launch delay.
        dev.busy(s, Duration::from_micros(100))?;
        dev.record_event(a, s)?;
        dev.copy_h2d(s, buf, host, 0, bytes)?;
        dev.record_event(b, s)?;
        dev.sync_event(b)?;
        Ok(dev.event_elapsed(a, b)?.as_nanos() as f64)
    };
    time(large)?; // warm-up
    let mut small: Vec<f64> = (0..9).map(|_| time(4096)).collect::<Result<_>>()?;
    small.sort_by(f64::total_cmp);
    let small_ns = small[small.len() / 2];
    // Subtract the 4 KiB payload to keep only the fixed cost.
    let big = time(large)?;
    let per_byte = (big - small_ns) / (large - 4096) as f64;
    let latency = (small_ns - 4096.0 * per_byte).max(0.0);
    Ok((latency, big))
}

/// Everything the planner needs.
#[derive(Clone, Debug)]
pub struct Problem {
    /// The groups.
    pub groups: Vec<GroupDesc>,
    /// Order of group uses in one pass (repeats every pass).
    pub order: Vec<GroupId>,
    /// Device bytes the engine needs for activations and workspace, taken from the budget.
    pub reserve: u64,
    /// The transfer cost model.
    pub cost: CostModel,
    /// How many group uses the host may run ahead of the device.
    pub run_ahead: usize,
}

/// A decided layout: the region sizes and the resident set.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    /// The mode it implements.
    pub mode: Mode,
    /// Per group: resident for the whole run.
    pub resident: Vec<bool>,
    /// Bytes of the resident region.
    pub resident_bytes: u64,
    /// Bytes of the staging ring.
    pub staging_bytes: u64,
    /// Prefetch depth in uses (0: none).
    pub depth: usize,
    /// Whether streamed units are whole components.
    pub by_component: bool,
    /// Whether copies go on the compute stream with the host waiting for each.
    pub synchronous: bool,
}

/// The plan as shown to a user before running.
#[derive(Clone, Debug)]
pub struct PlanSummary {
    /// Mode.
    pub mode: Mode,
    /// Budget the plan fits in.
    pub budget: u64,
    /// Engine reserve inside the budget.
    pub reserve: u64,
    /// Bytes of weights kept resident.
    pub resident_bytes: u64,
    /// Groups kept resident.
    pub resident_groups: usize,
    /// Staging ring bytes.
    pub staging_bytes: u64,
    /// Bytes copied per steady-state pass.
    pub streamed_bytes_per_pass: u64,
    /// Smallest budget this mode works with.
    pub minimum_budget: u64,
    /// Predicted steady-state pass time.
    pub predicted_pass: Duration,
    /// Predicted first pass time (includes loading resident weights).
    pub predicted_first_pass: Duration,
    /// Predicted compute-stream stall per steady-state pass.
    pub predicted_stall: Duration,
    /// Pass time if everything were resident (compute only).
    pub compute_per_pass: Duration,
}

impl fmt::Display for PlanSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        writeln!(f, "plan: mode {}", self.mode)?;
        writeln!(
            f,
            "  budget {:.1} MiB (minimum {:.1} MiB), engine reserve {:.1} MiB",
            mib(self.budget),
            mib(self.minimum_budget),
            mib(self.reserve)
        )?;
        writeln!(
            f,
            "  resident {:.1} MiB in {} groups, staging ring {:.1} MiB, streamed {:.1} MiB per pass",
            mib(self.resident_bytes),
            self.resident_groups,
            mib(self.staging_bytes),
            mib(self.streamed_bytes_per_pass)
        )?;
        write!(
            f,
            "  predicted pass {:?} (compute {:?}, stall {:?}), first pass {:?}",
            self.predicted_pass,
            self.compute_per_pass,
            self.predicted_stall,
            self.predicted_first_pass
        )
    }
}

/// Component names in order of first use, and each group's component index.
pub fn components(groups: &[GroupDesc]) -> (Vec<String>, Vec<usize>) {
    let mut names: Vec<String> = Vec::new();
    let idx = groups
        .iter()
        .map(|g| match names.iter().position(|n| *n == g.component) {
            Some(i) => i,
            None => {
                names.push(g.component.clone());
                names.len() - 1
            }
        })
        .collect();
    (names, idx)
}

/// Bytes of each component.
pub fn component_bytes(groups: &[GroupDesc]) -> Vec<u64> {
    let (names, idx) = components(groups);
    let mut bytes = vec![0u64; names.len()];
    for (g, &c) in groups.iter().zip(&idx) {
        bytes[c] += g.device_bytes();
    }
    bytes
}

fn used_groups(p: &Problem) -> Vec<bool> {
    let mut used = vec![false; p.groups.len()];
    for g in &p.order {
        used[g.0] = true;
    }
    used
}

/// The smallest budget `mode` can run `p` in.
///
/// Every group counts, not only those in the order: a group used outside the planned pass (a text
/// encoder before the denoising loop) is loaded on demand through the same staging ring.
pub fn minimum_budget(p: &Problem, mode: Mode) -> u64 {
    let max_group = p.groups.iter().map(|g| g.device_bytes()).max().unwrap_or(0);
    let weights = match mode {
        Mode::None => p.groups.iter().map(|g| g.device_bytes()).sum(),
        Mode::Model => component_bytes(&p.groups).into_iter().max().unwrap_or(0),
        Mode::Sequential | Mode::Group { .. } | Mode::Auto => max_group,
    };
    align(p.reserve) + weights
}

fn check_problem(p: &Problem) -> Result<()> {
    if p.groups.is_empty() || p.order.is_empty() {
        return Err(Error::InvalidArgument(
            "the plan needs at least one group and one use".into(),
        ));
    }
    if let Some(g) = p.order.iter().find(|g| g.0 >= p.groups.len()) {
        return Err(Error::InvalidArgument(format!(
            "the order uses group {} but only {} groups exist",
            g.0,
            p.groups.len()
        )));
    }
    if p.cost.h2d_bandwidth.is_nan() || p.cost.h2d_bandwidth <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "host-to-device bandwidth must be positive, got {}",
            p.cost.h2d_bandwidth
        )));
    }
    Ok(())
}

/// Chooses the layout for `mode` in `budget` and predicts how it runs.
pub fn plan(p: &Problem, mode: Mode, budget: u64) -> Result<(Layout, PlanSummary)> {
    check_problem(p)?;
    let minimum = minimum_budget(p, mode);
    if budget < minimum {
        let detail = match mode {
            Mode::None => "engine reserve + every weight".to_string(),
            Mode::Model => "engine reserve + the largest component".to_string(),
            _ => "engine reserve + the largest weight group".to_string(),
        };
        return Err(Error::BudgetTooSmall {
            budget,
            minimum,
            mode: mode.to_string(),
            detail,
        });
    }
    let avail = budget - align(p.reserve);
    let n = p.groups.len();
    let layout = match mode {
        Mode::None => Layout {
            mode,
            resident: vec![true; n],
            resident_bytes: p.groups.iter().map(|g| g.device_bytes()).sum(),
            staging_bytes: 0,
            depth: 0,
            by_component: false,
            synchronous: false,
        },
        Mode::Model => streamed(mode, n, avail, 0, true, false),
        Mode::Sequential => streamed(mode, n, avail, 0, false, true),
        Mode::Group { depth } => streamed(mode, n, avail, depth, false, false),
        Mode::Auto => auto_layout(p, avail)?,
    };
    let summary = summarize(p, &layout, budget, minimum);
    Ok((layout, summary))
}

fn streamed(mode: Mode, n: usize, avail: u64, depth: usize, comp: bool, sync: bool) -> Layout {
    Layout {
        mode,
        resident: vec![false; n],
        resident_bytes: 0,
        staging_bytes: avail,
        depth,
        by_component: comp,
        synchronous: sync,
    }
}

/// Summarises `layout` with the predictor.
pub fn summarize(p: &Problem, layout: &Layout, budget: u64, minimum: u64) -> PlanSummary {
    let pred = predict(p, layout);
    PlanSummary {
        mode: layout.mode,
        budget,
        reserve: p.reserve,
        resident_bytes: layout.resident_bytes,
        resident_groups: layout.resident.iter().filter(|&&r| r).count(),
        staging_bytes: layout.staging_bytes,
        streamed_bytes_per_pass: pred.streamed_bytes,
        minimum_budget: minimum,
        predicted_pass: Duration::from_nanos(pred.pass_ns.round() as u64),
        predicted_first_pass: Duration::from_nanos(pred.first_pass_ns.round() as u64),
        predicted_stall: Duration::from_nanos(pred.stall_ns.round() as u64),
        compute_per_pass: p.order.iter().map(|g| p.groups[g.0].compute).sum(),
    }
}

/// Resident set for `auto`: a 0/1 knapsack over the resident region for several staging sizes,
/// each candidate scored by the predictor; the fastest predicted layout wins (ties: fewer bytes
/// streamed).
fn auto_layout(p: &Problem, avail: u64) -> Result<Layout> {
    let n = p.groups.len();
    let used = used_groups(p);
    let total: u64 = p
        .groups
        .iter()
        .zip(&used)
        .filter(|(_, &u)| u)
        .map(|(g, _)| g.device_bytes())
        .sum();
    let make = |resident: Vec<bool>| {
        let rb: u64 = resident
            .iter()
            .zip(&p.groups)
            .filter(|(&r, _)| r)
            .map(|(_, g)| g.device_bytes())
            .sum();
        Layout {
            mode: Mode::Auto,
            resident_bytes: rb,
            staging_bytes: avail - rb,
            resident,
            depth: usize::MAX,
            by_component: false,
            synchronous: false,
        }
    };
    // Groups outside the planned pass are always streamed, so the ring must hold the largest.
    let max_unused = p
        .groups
        .iter()
        .zip(&used)
        .filter(|(_, &u)| !u)
        .map(|(g, _)| g.device_bytes())
        .max()
        .unwrap_or(0);
    if total + max_unused <= avail {
        return Ok(make(used));
    }
    let max_group = p.groups.iter().map(|g| g.device_bytes()).max().unwrap_or(0);
    // Uses per pass of each group: a group used twice saves two copies.
    let mut uses = vec![0u64; n];
    for g in &p.order {
        uses[g.0] += 1;
    }
    let copy_ns = |g: usize| p.cost.copy_time(p.groups[g].device_bytes()) * uses[g] as f64;
    let exposed_ns = |g: usize| {
        let c = p.groups[g].compute.as_nanos() as f64 * uses[g] as f64;
        (copy_ns(g) - c).max(0.0) + 1e-3 * copy_ns(g)
    };
    let mut best: Option<(f64, u64, Layout)> = None;
    for staging_groups in [1u64, 2, 3, 4, 6, 8] {
        let staging = max_group * staging_groups;
        if staging > avail {
            break;
        }
        let cap = avail - staging;
        for value in [&copy_ns as &dyn Fn(usize) -> f64, &exposed_ns] {
            let resident = knapsack(p, &used, cap, value);
            let layout = make(resident);
            let pred: Prediction = predict(p, &layout);
            let better = match &best {
                None => true,
                Some((t, b, _)) => {
                    pred.pass_ns < *t - 1e-6 || (pred.pass_ns <= *t && pred.streamed_bytes < *b)
                }
            };
            if better {
                best = Some((pred.pass_ns, pred.streamed_bytes, layout));
            }
        }
    }
    best.map(|(_, _, l)| l).ok_or_else(|| {
        Error::InvalidArgument(
            "no staging size fits; the budget check should have caught it".into(),
        )
    })
}

/// 0/1 knapsack: the set of used groups with the greatest total `value` whose bytes fit `cap`.
/// Weights are quantised to at most 4096 buckets so the table stays small.
fn knapsack(p: &Problem, used: &[bool], cap: u64, value: &dyn Fn(usize) -> f64) -> Vec<bool> {
    let n = p.groups.len();
    let unit = (cap / 4096).max(ALIGN);
    let slots = (cap / unit) as usize;
    let items: Vec<(usize, usize, f64)> = (0..n)
        .filter(|&g| used[g])
        .map(|g| {
            (
                g,
                p.groups[g].device_bytes().div_ceil(unit) as usize,
                value(g),
            )
        })
        .filter(|&(_, w, _)| w <= slots)
        .collect();
    // best[i][c]: best value with the first i items in capacity c; keep choices to reconstruct.
    let mut table = vec![0.0f64; slots + 1];
    let mut take = vec![vec![false; slots + 1]; items.len()];
    for (i, &(_, w, v)) in items.iter().enumerate() {
        for c in (w..=slots).rev() {
            let with = table[c - w] + v;
            if with > table[c] {
                table[c] = with;
                take[i][c] = true;
            }
        }
    }
    let mut resident = vec![false; n];
    let mut c = slots;
    for (i, &(g, w, _)) in items.iter().enumerate().rev() {
        if take[i][c] {
            resident[g] = true;
            c -= w;
        }
    }
    resident
}
