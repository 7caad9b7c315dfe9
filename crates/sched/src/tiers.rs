//! Three-tier placement: for each weight group, whether it lives in VRAM (the device plan's
//! resident set), in pinned host RAM, or stays on disk and is streamed through the disk tier's
//! staging ring (`ferry_pager::disk::DiskTier`) — inside a host-memory budget.
//!
//! The device side is the ordinary plan ([`crate::plan::plan`]): it decides the resident set and
//! the device staging ring. This module then spends the host budget: when every weight fits, all
//! of it is pinned and no disk tier exists. Otherwise the disk tier's staging ring (and reader
//! buffers) are taken from the budget first, and the rest holds the groups that save the most
//! disk time per pass (groups used in every pass before groups used once per run, which are
//! never in the pass order); VRAM-resident groups need no pinned copy at all, they are read from
//! disk once when loaded. Candidate sets are scored by the predictor, which replays the
//! scheduler's own core with the disk, the host staging ring, the H2D engine and compute all
//! overlapping, across pass boundaries.

use crate::error::{Error, Result};
use crate::plan::{GroupId, Layout, Problem};
use crate::predict::{predict, predict_with_disk, DiskModel};
use ferry_pager::disk::{DiskConfig, DiskFile, SimDisk, SimDiskConfig};
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Where a weight group lives between uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Resident in device memory for the whole run (loaded once).
    Vram,
    /// Pinned in host RAM, copied to the device ahead of each use.
    Pinned,
    /// Left in the file, read through the staging ring and copied ahead of each use.
    Disk,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tier::Vram => write!(f, "vram"),
            Tier::Pinned => write!(f, "ram"),
            Tier::Disk => write!(f, "disk"),
        }
    }
}

/// The disk's costs and the disk tier's staging configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct DiskCost {
    /// Bandwidth, latency and queue depth of reads (measured, or the simulated disk's).
    pub disk: SimDiskConfig,
    /// Staging ring and reader configuration of the disk tier.
    pub staging: DiskConfig,
    /// How the file is read (`O_DIRECT`, buffered and why, or simulated), for the plan.
    pub read_mode: String,
}

impl DiskCost {
    /// The simulated disk's parameters.
    pub fn of_sim(disk: SimDiskConfig, staging: DiskConfig) -> DiskCost {
        DiskCost {
            disk,
            staging,
            read_mode: "simulated disk".into(),
        }
    }

    /// Calibrates on the real file: drops its cached pages, then times one small read (the
    /// latency) and a sequential read of up to `bytes` in `staging.request_bytes` requests (the
    /// bandwidth), with `O_DIRECT` where the filesystem allows it.
    pub fn calibrate(path: impl AsRef<Path>, staging: DiskConfig, bytes: u64) -> Result<DiskCost> {
        let file = DiskFile::open(path, staging.direct)?;
        let total = bytes.min(file.len());
        if total == 0 {
            return Err(Error::InvalidArgument(format!(
                "{}: cannot calibrate disk bandwidth on an empty file",
                file.path().display()
            )));
        }
        // Ignore failure: some filesystems do not keep a page cache to drop.
        let _ = file.drop_cache();
        let mut buf = file.buffer(staging.request_bytes.max(4096))?;
        let probe = file.len() / 2;
        let t0 = Instant::now();
        file.read_range(probe, 1.min(file.len() - probe), &mut buf, |_, _| Ok(()))?;
        let latency = t0.elapsed();
        let t1 = Instant::now();
        file.read_range(0, total, &mut buf, |_, _| Ok(()))?;
        let elapsed = t1.elapsed().max(Duration::from_nanos(1));
        let read_mode = match file.fallback_reason() {
            None => file.mode().to_string(),
            Some(why) => format!("{} ({why})", file.mode()),
        };
        Ok(DiskCost {
            disk: SimDiskConfig {
                bandwidth: total as f64 / elapsed.as_secs_f64(),
                latency,
                queue_depth: staging.readers.max(1),
            },
            staging,
            read_mode,
        })
    }
}

/// Where each group lives, what it costs in host memory and what a pass is predicted to take.
#[derive(Clone, Debug)]
pub struct TierPlan {
    /// Per group, in the problem's group order.
    pub tiers: Vec<Tier>,
    /// Group names.
    pub names: Vec<String>,
    /// Group bytes.
    pub bytes: Vec<u64>,
    /// Uses of each group per pass.
    pub uses: Vec<u32>,
    /// The host budget planned for.
    pub host_budget: u64,
    /// Pinned bytes of weights (groups in [`Tier::Pinned`], and in [`Tier::Vram`] when no
    /// disk tier is needed).
    pub pinned_bytes: u64,
    /// Host bytes of the disk tier (staging ring and reader buffers); 0 without a disk tier.
    pub staging_bytes: u64,
    /// Bytes kept in VRAM.
    pub vram_bytes: u64,
    /// Bytes read from disk per steady-state pass.
    pub disk_bytes_per_pass: u64,
    /// Predicted steady-state pass time.
    pub predicted_pass: Duration,
    /// Predicted compute-stream stall per pass.
    pub predicted_stall: Duration,
    /// Predicted pass time with every weight pinned in RAM (the in-RAM baseline).
    pub in_ram_pass: Duration,
    /// How the file is read.
    pub read_mode: String,
}

impl TierPlan {
    /// Host memory the plan uses: pinned weights plus the disk tier's staging.
    pub fn host_bytes(&self) -> u64 {
        self.pinned_bytes + self.staging_bytes
    }

    /// Groups in `tier`.
    pub fn count(&self, tier: Tier) -> usize {
        self.tiers.iter().filter(|&&t| t == tier).count()
    }

    /// One line per group: name, bytes, uses per pass, tier.
    pub fn table(&self) -> String {
        let w = self.names.iter().map(|n| n.len()).max().unwrap_or(5).max(5);
        let mut s = format!("{:<w$} {:>10} {:>5}  tier\n", "group", "MiB", "uses");
        for i in 0..self.tiers.len() {
            s.push_str(&format!(
                "{:<w$} {:>10.2} {:>5}  {}\n",
                self.names[i],
                self.bytes[i] as f64 / (1 << 20) as f64,
                self.uses[i],
                self.tiers[i]
            ));
        }
        s
    }
}

impl fmt::Display for TierPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let sum = |t: Tier| -> u64 {
            self.tiers
                .iter()
                .zip(&self.bytes)
                .filter(|(&x, _)| x == t)
                .map(|(_, &b)| b)
                .sum()
        };
        writeln!(
            f,
            "tiers: host budget {:.1} MiB, used {:.1} MiB (pinned weights {:.1} MiB + disk staging {:.1} MiB)",
            mib(self.host_budget),
            mib(self.host_bytes()),
            mib(self.pinned_bytes),
            mib(self.staging_bytes)
        )?;
        writeln!(
            f,
            "  vram {} groups {:.1} MiB | ram {} groups {:.1} MiB | disk {} groups {:.1} MiB ({})",
            self.count(Tier::Vram),
            mib(self.vram_bytes),
            self.count(Tier::Pinned),
            mib(sum(Tier::Pinned)),
            self.count(Tier::Disk),
            mib(sum(Tier::Disk)),
            self.read_mode
        )?;
        write!(
            f,
            "  disk reads {:.1} MiB per pass, predicted pass {:?} (stall {:?}; in RAM {:?})",
            mib(self.disk_bytes_per_pass),
            self.predicted_pass,
            self.predicted_stall,
            self.in_ram_pass
        )
    }
}

fn model(on_disk: Vec<bool>, disk: &DiskCost) -> DiskModel {
    DiskModel {
        on_disk,
        disk: SimDisk::new(disk.disk),
        chunk_bytes: disk.staging.chunk_bytes,
        request_bytes: disk.staging.request_bytes,
        chunk_free: vec![0.0; disk.staging.chunks.max(1)],
        next_chunk: 0,
        read_bytes: 0,
    }
}

fn ns(x: f64) -> Duration {
    if x.is_finite() {
        Duration::from_nanos(x.max(0.0).round() as u64)
    } else {
        Duration::MAX
    }
}

/// Places every group of `p` in VRAM (the `layout`'s resident set), pinned RAM or on disk within
/// `host_budget` bytes of host memory, and predicts the pass (see the module docs).
///
/// An error if the budget cannot even hold the disk tier's staging ring while some weights must
/// stay on disk.
pub fn plan_tiers(
    p: &Problem,
    layout: &Layout,
    host_budget: u64,
    disk: &DiskCost,
) -> Result<TierPlan> {
    let n = p.groups.len();
    if layout.resident.len() != n {
        return Err(Error::InvalidArgument(format!(
            "layout has {} groups, the problem {n}",
            layout.resident.len()
        )));
    }
    if disk.disk.bandwidth.is_nan() || disk.disk.bandwidth <= 0.0 {
        return Err(Error::InvalidArgument(format!(
            "disk bandwidth must be positive, got {}",
            disk.disk.bandwidth
        )));
    }
    let bytes: Vec<u64> = p.groups.iter().map(|g| g.device_bytes()).collect();
    let uses = uses_per_pass(n, &p.order);
    let vram: Vec<bool> = layout.resident.clone();
    let vram_bytes: u64 = (0..n).filter(|&g| vram[g]).map(|g| bytes[g]).sum();
    let in_ram = predict(p, layout);
    let all: u64 = bytes.iter().sum();
    let make =
        |tiers: Vec<Tier>, pinned: u64, staging: u64, pass: f64, stall: f64, db: u64| TierPlan {
            tiers,
            names: p.groups.iter().map(|g| g.name.clone()).collect(),
            bytes: bytes.clone(),
            uses: uses.clone(),
            host_budget,
            pinned_bytes: pinned,
            staging_bytes: staging,
            vram_bytes,
            disk_bytes_per_pass: db,
            predicted_pass: ns(pass),
            predicted_stall: ns(stall),
            in_ram_pass: ns(in_ram.pass_ns),
            read_mode: disk.read_mode.clone(),
        };
    if all <= host_budget {
        let tiers = (0..n)
            .map(|g| if vram[g] { Tier::Vram } else { Tier::Pinned })
            .collect();
        return Ok(make(tiers, all, 0, in_ram.pass_ns, in_ram.stall_ns, 0));
    }
    let staging = disk.staging.host_bytes();
    if staging > host_budget {
        return Err(Error::InvalidArgument(format!(
            "host budget of {host_budget} bytes is smaller than the disk tier's staging ring \
             ({} chunks x {} bytes + {} reader buffers = {staging} bytes), and the weights \
             ({all} bytes) do not fit in it",
            disk.staging.chunks, disk.staging.chunk_bytes, disk.staging.readers
        )));
    }
    let cap = host_budget - staging;
    let compute: Vec<f64> = p
        .groups
        .iter()
        .map(|g| g.compute.as_nanos() as f64)
        .collect();
    let read_ns = |g: usize| bytes[g] as f64 / disk.disk.bandwidth * 1e9;
    // Candidate orders of preference for pinning.
    let mut by_uses: Vec<usize> = (0..n).filter(|&g| !vram[g]).collect();
    by_uses.sort_by(|&a, &b| uses[b].cmp(&uses[a]).then(bytes[b].cmp(&bytes[a])));
    let mut by_exposed = by_uses.clone();
    let exposed = |g: usize| {
        let e = (read_ns(g) - compute[g]).max(0.0) * uses[g] as f64;
        e / bytes[g].max(1) as f64
    };
    by_exposed.sort_by(|&a, &b| {
        exposed(b)
            .total_cmp(&exposed(a))
            .then(uses[b].cmp(&uses[a]))
    });
    let mut best: Option<(f64, u64, TierPlan)> = None;
    for pref in [&by_uses, &by_exposed] {
        let mut tiers: Vec<Tier> = (0..n)
            .map(|g| if vram[g] { Tier::Vram } else { Tier::Disk })
            .collect();
        let mut used = 0u64;
        for &g in pref {
            if used + bytes[g] <= cap {
                used += bytes[g];
                tiers[g] = Tier::Pinned;
            }
        }
        let on_disk: Vec<bool> = tiers.iter().map(|&t| t != Tier::Pinned).collect();
        let (pred, db) = predict_with_disk(p, layout, model(on_disk, disk));
        let better = match &best {
            None => true,
            Some((t, b, _)) => pred.pass_ns < *t - 1e-6 || (pred.pass_ns <= *t && db < *b),
        };
        if better {
            let plan = make(tiers, used, staging, pred.pass_ns, pred.stall_ns, db);
            best = Some((pred.pass_ns, db, plan));
        }
    }
    best.map(|(_, _, plan)| plan)
        .ok_or_else(|| Error::InvalidArgument("no tier placement was evaluated".into()))
}

/// Predicts a given placement (for tests and for comparing placements by hand).
pub fn predict_tiers(
    p: &Problem,
    layout: &Layout,
    tiers: &[Tier],
    disk: &DiskCost,
) -> (crate::predict::Prediction, u64) {
    let on_disk = tiers.iter().map(|&t| t != Tier::Pinned).collect();
    predict_with_disk(p, layout, model(on_disk, disk))
}

/// Uses of each group per pass of `order`.
pub fn uses_per_pass(groups: usize, order: &[GroupId]) -> Vec<u32> {
    let mut uses = vec![0u32; groups];
    for g in order {
        if let Some(u) = uses.get_mut(g.0) {
            *u += 1;
        }
    }
    uses
}
