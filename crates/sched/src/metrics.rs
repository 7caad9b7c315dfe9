//! Per-group and per-pass metrics read back from device events, a plain-text summary table, and a
//! Chrome trace (compute, copy and disk-read lanes; opens in Perfetto).

use crate::error::Result;
use crate::plan::{GroupDesc, GroupId};
use ferry_pager::{Device, DiskReadTiming, EventId};
use serde_json::json;
use std::fmt::Write as _;
use std::time::Duration;

/// Events around one use of a group on the compute stream.
#[derive(Clone, Debug)]
pub struct UseRecord {
    /// The group.
    pub group: GroupId,
    /// Before the wait for its copy.
    pub before: EventId,
    /// After the wait (compute may start).
    pub after: EventId,
    /// At release (compute done).
    pub end: Option<EventId>,
}

/// Events around one copy of a unit.
#[derive(Clone, Debug)]
pub struct CopyRecord {
    /// Bytes copied.
    pub bytes: u64,
    /// Before the first byte.
    pub start: EventId,
    /// After the last byte.
    pub end: EventId,
    /// The group copied (`None` for resident or whole-component loads).
    pub group: Option<GroupId>,
}

/// Events bracketing one pass.
#[derive(Clone, Debug)]
pub struct PassRecord {
    /// Pass start on the compute stream.
    pub start: EventId,
    /// Pass end on the compute stream.
    pub end: EventId,
    /// Scheduler's copied-bytes counter at the start of the pass.
    pub bytes_at_start: u64,
    /// Scheduler's copied-bytes counter at the end of the pass.
    pub bytes_at_end: u64,
    /// Index of the pass's first use.
    pub first_use: usize,
    /// Index one past the pass's last use.
    pub end_use: usize,
}

/// Totals for one group over the run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupMetrics {
    /// Group name.
    pub name: String,
    /// Device bytes.
    pub bytes: u64,
    /// Uses.
    pub uses: u64,
    /// Copies of it.
    pub copies: u64,
    /// Time its copies took, ns.
    pub copy_ns: f64,
    /// Time its compute took, ns.
    pub compute_ns: f64,
    /// Time the compute stream waited for it, ns.
    pub stall_ns: f64,
}

/// One pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PassMetrics {
    /// Wall time of the pass on the compute stream, ns.
    pub time_ns: f64,
    /// Bytes copied during the pass.
    pub bytes: u64,
    /// Time the compute stream waited for copies, ns.
    pub stall_ns: f64,
    /// Copy time during the pass, ns.
    pub copy_ns: f64,
    /// Achieved host→device GB/s while copying.
    pub gbps: f64,
    /// Fraction of copy time hidden behind compute (1 = fully overlapped).
    pub overlap: f64,
}

/// Timed slice for traces.
#[derive(Clone, Debug, PartialEq)]
pub struct Slice {
    /// Lane: "compute", "stall", "copy" or "disk".
    pub lane: &'static str,
    /// Label.
    pub name: String,
    /// Start, ns from the scheduler's origin.
    pub start_ns: f64,
    /// End, ns.
    pub end_ns: f64,
    /// Bytes (copies).
    pub bytes: u64,
}

/// Everything measured over a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunMetrics {
    /// Per group, in group order.
    pub groups: Vec<GroupMetrics>,
    /// Per pass.
    pub passes: Vec<PassMetrics>,
    /// Device bytes held (the arena; never more than the budget).
    pub peak_device_bytes: u64,
    /// All timed slices.
    pub slices: Vec<Slice>,
}

/// Nanoseconds from event `a` to event `b`.
fn span(dev: &dyn Device, a: EventId, b: EventId) -> Result<f64> {
    Ok(dev.event_elapsed(a, b)?.as_nanos() as f64)
}

/// Reads the recorded events (all must be complete, and none before `origin`).
///
/// Every duration (stall, compute, copy, pass time) is timed between its own two adjacent
/// events: CUDA reports intervals in f32 milliseconds, so an interval measured from the origin
/// loses precision as the run gets longer (an ulp is 62.5 µs after 1000 s) and differences of
/// two such values lose all of it. Only positions on the trace timeline are measured from the
/// origin.
pub fn collect(
    dev: &dyn Device,
    origin: EventId,
    groups: &[GroupDesc],
    uses: &[UseRecord],
    copies: &[CopyRecord],
    passes: &[PassRecord],
    budget: u64,
) -> Result<RunMetrics> {
    let mut m = RunMetrics {
        groups: groups
            .iter()
            .map(|g| GroupMetrics {
                name: g.name.clone(),
                bytes: g.device_bytes(),
                ..GroupMetrics::default()
            })
            .collect(),
        peak_device_bytes: budget,
        ..RunMetrics::default()
    };
    let mut use_times = Vec::with_capacity(uses.len());
    for u in uses {
        let stall = span(dev, u.before, u.after)?;
        let compute = match u.end {
            Some(e) => span(dev, u.after, e)?,
            None => 0.0,
        };
        let b = span(dev, origin, u.before)?;
        let (a, e) = (b + stall, b + stall + compute);
        let gm = &mut m.groups[u.group.0];
        gm.uses += 1;
        gm.stall_ns += stall;
        gm.compute_ns += compute;
        let name = groups[u.group.0].name.clone();
        if a > b {
            m.slices.push(Slice {
                lane: "stall",
                name: format!("wait {name}"),
                start_ns: b,
                end_ns: a,
                bytes: 0,
            });
        }
        m.slices.push(Slice {
            lane: "compute",
            name,
            start_ns: a,
            end_ns: e,
            bytes: 0,
        });
        use_times.push(stall);
    }
    let mut copy_times = Vec::with_capacity(copies.len());
    for c in copies {
        let took = span(dev, c.start, c.end)?;
        let s = span(dev, origin, c.start)?;
        let e = s + took;
        if let Some(g) = c.group {
            m.groups[g.0].copies += 1;
            m.groups[g.0].copy_ns += took;
        }
        let name = match c.group {
            Some(g) => groups[g.0].name.clone(),
            None => "load".to_string(),
        };
        m.slices.push(Slice {
            lane: "copy",
            name,
            start_ns: s,
            end_ns: e,
            bytes: c.bytes,
        });
        copy_times.push((s, took, c.bytes));
    }
    for p in passes {
        let time = span(dev, p.start, p.end)?;
        let s = span(dev, origin, p.start)?;
        let e = s + time;
        let uses = &use_times[p.first_use.min(use_times.len())..p.end_use.min(use_times.len())];
        let stall: f64 = uses.iter().sum();
        // Which copies ran in the pass is decided on the (coarser) timeline positions.
        let (copy_ns, copied): (f64, u64) = copy_times
            .iter()
            .filter(|(cs, _, _)| *cs >= s && *cs < e)
            .fold((0.0, 0), |(t, b), (_, took, by)| (t + took, b + by));
        m.passes.push(PassMetrics {
            time_ns: time,
            bytes: p.bytes_at_end - p.bytes_at_start,
            stall_ns: stall,
            copy_ns,
            gbps: if copy_ns > 0.0 {
                copied as f64 / copy_ns
            } else {
                0.0
            },
            overlap: if copy_ns > 0.0 {
                (1.0 - stall / copy_ns).clamp(0.0, 1.0)
            } else if stall > 0.0 {
                0.0
            } else {
                1.0
            },
        });
    }
    Ok(m)
}

impl RunMetrics {
    /// A plain-text summary: per-pass totals, then the groups with the most stall.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:>4} {:>12} {:>12} {:>12} {:>8} {:>8}",
            "pass", "time ms", "copied MiB", "stall ms", "GB/s", "overlap"
        );
        for (i, p) in self.passes.iter().enumerate() {
            let _ = writeln!(
                s,
                "{:>4} {:>12.3} {:>12.2} {:>12.3} {:>8.2} {:>7.1}%",
                i,
                p.time_ns / 1e6,
                p.bytes as f64 / (1 << 20) as f64,
                p.stall_ns / 1e6,
                p.gbps,
                p.overlap * 100.0
            );
        }
        let _ = writeln!(
            s,
            "\n{:<40} {:>10} {:>5} {:>6} {:>11} {:>11} {:>11}",
            "group", "MiB", "uses", "copies", "copy ms", "compute ms", "stall ms"
        );
        let mut order: Vec<&GroupMetrics> = self.groups.iter().filter(|g| g.uses > 0).collect();
        order.sort_by(|a, b| b.stall_ns.total_cmp(&a.stall_ns));
        for g in order.iter().take(20) {
            let _ = writeln!(
                s,
                "{:<40} {:>10.2} {:>5} {:>6} {:>11.3} {:>11.3} {:>11.3}",
                g.name,
                g.bytes as f64 / (1 << 20) as f64,
                g.uses,
                g.copies,
                g.copy_ns / 1e6,
                g.compute_ns / 1e6,
                g.stall_ns / 1e6
            );
        }
        s
    }

    /// Adds one "disk" slice per read of a disk tier, on the tier's clock with `zero` at the
    /// metrics origin. Disk reads happen on the host: on a real GPU their placement against
    /// the device lanes is as exact as the host and device clocks agree at the origin.
    pub fn add_disk_reads(&mut self, name: &str, reads: &[DiskReadTiming], zero: Duration) {
        for r in reads {
            let s = r.start.saturating_sub(zero).as_nanos() as f64;
            let e = r.end.saturating_sub(zero).as_nanos() as f64;
            self.slices.push(Slice {
                lane: "disk",
                name: name.to_string(),
                start_ns: s,
                end_ns: e.max(s),
                bytes: r.bytes,
            });
        }
    }

    /// Chrome trace JSON (the "traceEvents" format; opens in Perfetto and chrome://tracing).
    pub fn chrome_trace(&self) -> String {
        let tid = |lane: &str| match lane {
            "compute" | "stall" => 1,
            "disk" => 3,
            _ => 2,
        };
        let mut events = vec![
            json!({"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "compute stream"}}),
            json!({"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "copy stream"}}),
        ];
        if self.slices.iter().any(|s| s.lane == "disk") {
            events.push(json!({"ph": "M", "name": "thread_name", "pid": 1, "tid": 3, "args": {"name": "disk reads"}}));
        }
        for sl in &self.slices {
            events.push(json!({
                "ph": "X",
                "pid": 1,
                "tid": tid(sl.lane),
                "name": sl.name,
                "cat": sl.lane,
                "ts": sl.start_ns / 1e3,
                "dur": (sl.end_ns - sl.start_ns) / 1e3,
                "args": {"bytes": sl.bytes},
            }));
        }
        json!({"traceEvents": events, "displayTimeUnit": "ms"}).to_string()
    }
}
