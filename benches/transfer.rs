//! Transfer microbenchmarks, on the simulated device always and on GPU 0 when CUDA has one:
//!
//! 1. host→device bandwidth, pinned vs pageable, 4 KiB – 256 MiB, with the pinned bandwidth as a
//!    fraction of the best one measured in the same run by a plain 256 MiB `copy_h2d`
//!    (one `cuMemcpyHtoDAsync` on CUDA);
//! 2. copy/compute overlap: a copy on one stream while a `busy` kernel of known duration runs on
//!    another, overlap = 1 - (together - max(copy, kernel)) / min(copy, kernel);
//! 3. prefetch depth sweep: an SD 1.5-UNet-like model (46 groups, sizes scaled down) run by the
//!    scheduler in `group` mode at depths 0–8 and in `auto`, at two budgets, against `none` (all
//!    resident) and `sequential`; steady-state pass time, stall, GB/s and overlap from
//!    `Scheduler::metrics`.
//!
//! Everything is timed with device events: virtual time on the simulator (deterministic, so each
//! case runs once), GPU time on CUDA (median of several runs). On CUDA a few cases also run under
//! Criterion (`iter_custom` returning event time). Results are printed; with `FERRY_BENCH_OUT=DIR`
//! they are also written to `DIR/transfer-<device>.txt`.
//!
//! `cargo bench -p ferry-sched --bench transfer`

use criterion::{Criterion, Throughput};
use ferry_pager::device::cuda::CudaDevice;
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::{Device, DeviceKind, DevicePtr, EventId, HostMemKind, HostPtr, StreamId};
use ferry_sched::plan::align;
use ferry_sched::{CostModel, GroupDesc, GroupId, Mode, Scheduler, SchedulerConfig, TensorSource};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const MAX_SIZE: u64 = 256 * MIB;
/// Largest copy when run as a smoke test (`cargo test --benches`).
const QUICK_MAX_SIZE: u64 = 4 * MIB;
const SIZES: [u64; 9] = [
    4 * KIB,
    16 * KIB,
    64 * KIB,
    256 * KIB,
    MIB,
    4 * MIB,
    16 * MIB,
    64 * MIB,
    256 * MIB,
];

fn size_label(b: u64) -> String {
    if b >= MIB {
        format!("{} MiB", b / MIB)
    } else {
        format!("{} KiB", b / KIB)
    }
}

fn gbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_nanos().max(1) as f64
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A device with its two streams, a pair of timing events and the buffers every case shares.
struct Rig {
    dev: Arc<dyn Device>,
    compute: StreamId,
    copy: StreamId,
    ev: [EventId; 4],
    host: HostPtr,
    pageable: Vec<u8>,
    dst: DevicePtr,
    /// Largest copy size (the buffers' size).
    max: u64,
    /// Runs per measurement (1 on the simulator: virtual time is deterministic).
    reps: usize,
}

impl Rig {
    fn new(dev: Arc<dyn Device>, max: u64) -> BoxResult<Rig> {
        let compute = dev.create_stream()?;
        let copy = dev.create_stream()?;
        let ev = [
            dev.create_event()?,
            dev.create_event()?,
            dev.create_event()?,
            dev.create_event()?,
        ];
        let host = dev.alloc_host(max, HostMemKind::Upload)?;
        let dst = dev.alloc_device(max)?;
        let reps = if dev.kind() == DeviceKind::Sim { 1 } else { 5 };
        Ok(Rig {
            dev,
            compute,
            copy,
            ev,
            host,
            pageable: vec![0x5a; max as usize],
            dst,
            max,
            reps,
        })
    }

    /// Event time on `stream` of the work `f` enqueues there.
    fn time(&self, stream: StreamId, f: impl FnOnce() -> BoxResult<()>) -> BoxResult<Duration> {
        let [a, b, ..] = self.ev;
        self.dev.record_event(a, stream)?;
        f()?;
        self.dev.record_event(b, stream)?;
        self.dev.sync_event(b)?;
        Ok(self.dev.event_elapsed(a, b)?)
    }

    /// `count` back-to-back pinned copies of `size` bytes on the copy stream.
    fn pinned(&self, size: u64, count: u64) -> BoxResult<Duration> {
        self.time(self.copy, || {
            for _ in 0..count {
                self.dev.copy_h2d(self.copy, self.dst, self.host, 0, size)?;
            }
            Ok(())
        })
    }

    /// `count` pageable copies of `size` bytes (each returns once done, as on CUDA).
    fn pageable(&self, size: u64, count: u64) -> BoxResult<Duration> {
        let src = &self.pageable[..size as usize];
        self.time(self.copy, || {
            for _ in 0..count {
                self.dev.copy_h2d_pageable(self.copy, self.dst, src)?;
            }
            Ok(())
        })
    }

    fn median_of(&self, mut f: impl FnMut() -> BoxResult<Duration>) -> BoxResult<Duration> {
        let runs = (0..self.reps).map(|_| f()).collect::<BoxResult<Vec<_>>>()?;
        Ok(median(runs))
    }

    /// Copies per measurement at `size`: enough to amortise the events, at most 64 MiB (or the
    /// largest size) or 256 copies.
    fn batch(&self, size: u64) -> u64 {
        (self.max.min(64 * MIB) / size).clamp(1, 256)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.dev.free_device(self.dst);
        let _ = self.dev.free_host(self.host);
    }
}

/// Bandwidth table; returns the reference (best plain copy of the largest size) bandwidth in bytes/s and the
/// per-copy fixed cost estimated from the 4 KiB copies.
fn bandwidth(rig: &Rig, out: &mut String) -> BoxResult<(f64, Duration)> {
    // Warm up (first-touch of pinned pages and driver paths on CUDA).
    rig.pinned(rig.max, 1)?;
    let best = (0..rig.reps.max(3))
        .map(|_| rig.pinned(rig.max, 1))
        .collect::<BoxResult<Vec<_>>>()?
        .into_iter()
        .min()
        .unwrap_or_default();
    let best_gbps = gbps(rig.max, best);
    writeln!(
        out,
        "reference: one {} pinned copy, best of {}: {best_gbps:.2} GB/s\n",
        size_label(rig.max),
        rig.reps.max(3)
    )?;
    writeln!(
        out,
        "| size | copies | pinned GB/s | pinned / best | pageable GB/s | pinned / pageable |"
    )?;
    writeln!(out, "| --- | --- | --- | --- | --- | --- |")?;
    let mut fixed = Duration::ZERO;
    for size in SIZES.into_iter().filter(|&s| s <= rig.max) {
        let n = rig.batch(size);
        let p = rig.median_of(|| rig.pinned(size, n))?;
        let q = rig.median_of(|| rig.pageable(size, n))?;
        let (pg, qg) = (gbps(size * n, p), gbps(size * n, q));
        if size == SIZES[0] {
            // Per-copy time minus the bytes at the reference bandwidth.
            let per = p.as_nanos() as f64 / n as f64 - size as f64 / best_gbps;
            fixed = Duration::from_nanos(per.max(0.0) as u64);
        }
        writeln!(
            out,
            "| {} | {n} | {pg:.2} | {:.1} % | {qg:.2} | {:.2}× |",
            size_label(size),
            100.0 * pg / best_gbps,
            pg / qg
        )?;
    }
    writeln!(
        out,
        "\nper-copy fixed cost (4 KiB copies, bytes at the reference bandwidth removed): {fixed:?}"
    )?;
    Ok((best_gbps * 1e9, fixed))
}

/// Copy/compute overlap with a 64 MiB copy and kernels of 0.5×, 1× and 2× its duration.
fn overlap(rig: &Rig, out: &mut String) -> BoxResult<()> {
    let size = rig.max.min(64 * MIB);
    let copy_alone = rig.median_of(|| rig.pinned(size, 1))?;
    writeln!(
        out,
        "| copy | kernel | copy alone | kernel alone | together | overlap |"
    )?;
    writeln!(out, "| --- | --- | --- | --- | --- | --- |")?;
    for factor in [0.5, 1.0, 2.0] {
        let kernel = Duration::from_nanos((copy_alone.as_nanos() as f64 * factor) as u64);
        let kernel_alone =
            rig.median_of(|| rig.time(rig.compute, || Ok(rig.dev.busy(rig.compute, kernel)?)))?;
        let together = rig.median_of(|| concurrent(rig, size, kernel))?;
        let (lo, hi) = if copy_alone < kernel_alone {
            (copy_alone, kernel_alone)
        } else {
            (kernel_alone, copy_alone)
        };
        let frac = 1.0 - together.saturating_sub(hi).as_nanos() as f64 / lo.as_nanos() as f64;
        writeln!(
            out,
            "| {} | {factor}× copy | {copy_alone:.2?} | {kernel_alone:.2?} | {together:.2?} | {:.1} % |",
            size_label(size),
            100.0 * frac
        )?;
    }
    Ok(())
}

/// Time from a common start until both the kernel (compute stream) and the copy (copy stream)
/// are done.
fn concurrent(rig: &Rig, size: u64, kernel: Duration) -> BoxResult<Duration> {
    let dev = &rig.dev;
    let [start, k_end, c_end, _] = rig.ev;
    // A short gate so that both streams have their work queued before the start point runs.
    dev.busy(rig.compute, Duration::from_micros(200))?;
    dev.record_event(start, rig.compute)?;
    dev.wait_event(rig.copy, start)?;
    dev.busy(rig.compute, kernel)?;
    dev.record_event(k_end, rig.compute)?;
    dev.copy_h2d(rig.copy, rig.dst, rig.host, 0, size)?;
    dev.record_event(c_end, rig.copy)?;
    dev.sync_event(k_end)?;
    dev.sync_event(c_end)?;
    Ok(dev
        .event_elapsed(start, k_end)?
        .max(dev.event_elapsed(start, c_end)?))
}

/// SD 1.5 UNet blocks in execution order: (name, parameters in millions, resolution level 0–3 of
/// a 64×64 latent). Approximate counts from the diffusers architecture (~860 M in all).
const UNET: &[(&str, f64, u32)] = &[
    ("conv_in+time_embedding", 2.1, 0),
    ("down_blocks.0.resnets.0", 2.3, 0),
    ("down_blocks.0.attentions.0", 2.6, 0),
    ("down_blocks.0.resnets.1", 2.3, 0),
    ("down_blocks.0.attentions.1", 2.6, 0),
    ("down_blocks.0.downsamplers.0", 0.9, 0),
    ("down_blocks.1.resnets.0", 6.6, 1),
    ("down_blocks.1.attentions.0", 10.0, 1),
    ("down_blocks.1.resnets.1", 8.2, 1),
    ("down_blocks.1.attentions.1", 10.0, 1),
    ("down_blocks.1.downsamplers.0", 3.7, 1),
    ("down_blocks.2.resnets.0", 24.5, 2),
    ("down_blocks.2.attentions.0", 35.0, 2),
    ("down_blocks.2.resnets.1", 31.0, 2),
    ("down_blocks.2.attentions.1", 35.0, 2),
    ("down_blocks.2.downsamplers.0", 14.7, 2),
    ("down_blocks.3.resnets.0", 31.0, 3),
    ("down_blocks.3.resnets.1", 31.0, 3),
    ("mid_block.resnets.0", 31.0, 3),
    ("mid_block.attentions.0", 35.0, 3),
    ("mid_block.resnets.1", 31.0, 3),
    ("up_blocks.0.resnets.0", 49.0, 3),
    ("up_blocks.0.resnets.1", 49.0, 3),
    ("up_blocks.0.resnets.2", 49.0, 3),
    ("up_blocks.0.upsamplers.0", 14.7, 2),
    ("up_blocks.1.resnets.0", 49.0, 2),
    ("up_blocks.1.attentions.0", 35.0, 2),
    ("up_blocks.1.resnets.1", 49.0, 2),
    ("up_blocks.1.attentions.1", 35.0, 2),
    ("up_blocks.1.resnets.2", 41.0, 2),
    ("up_blocks.1.attentions.2", 35.0, 2),
    ("up_blocks.1.upsamplers.0", 14.7, 1),
    ("up_blocks.2.resnets.0", 15.0, 1),
    ("up_blocks.2.attentions.0", 10.0, 1),
    ("up_blocks.2.resnets.1", 11.0, 1),
    ("up_blocks.2.attentions.1", 10.0, 1),
    ("up_blocks.2.resnets.2", 9.0, 1),
    ("up_blocks.2.attentions.2", 10.0, 1),
    ("up_blocks.2.upsamplers.0", 3.7, 0),
    ("up_blocks.3.resnets.0", 4.2, 0),
    ("up_blocks.3.attentions.0", 2.6, 0),
    ("up_blocks.3.resnets.1", 3.0, 0),
    ("up_blocks.3.attentions.1", 2.6, 0),
    ("up_blocks.3.resnets.2", 3.0, 0),
    ("up_blocks.3.attentions.2", 2.6, 0),
    ("conv_norm_out+conv_out", 0.02, 0),
];

/// Compute per pass as a fraction of the time to copy every weight once: below 1, so a model
/// streamed whole is copy-bound and one half resident is close to compute-bound (SD 1.5 on a
/// PCIe 4 card is around 0.6–1).
const COMPUTE_TO_COPY: f64 = 0.6;

struct SdModel {
    groups: Vec<GroupDesc>,
    order: Vec<GroupId>,
    host: HostPtr,
    bytes: u64,
}

/// The UNet at `scale` of its fp16 size; each group is three tensors (weights, second weights,
/// biases and norms), 256-byte aligned and adjacent in one pinned allocation like the host tier
/// lays them out. Compute per group ∝ parameters × latent positions.
fn sd_like(dev: &dyn Device, cost: &CostModel, scale: f64) -> BoxResult<SdModel> {
    let sizes: Vec<[u64; 3]> = UNET
        .iter()
        .map(|&(_, m, _)| {
            let b = (m * 1e6 * 2.0 * scale) as u64 / 2 * 2;
            let w1 = b * 6 / 10 / 2 * 2;
            let w2 = b * 38 / 100 / 2 * 2;
            [w1, w2, (b - w1 - w2).max(2)]
        })
        .collect();
    let bytes: u64 = sizes.iter().flatten().map(|&b| align(b)).sum();
    let host = dev.alloc_host(bytes, HostMemKind::Upload)?;
    let work: Vec<f64> = UNET
        .iter()
        .map(|&(_, m, level)| m * (4096 >> (2 * level)) as f64)
        .collect();
    let total_work: f64 = work.iter().sum();
    let copy_all: f64 = sizes
        .iter()
        .map(|t| cost.copy_time(t.iter().map(|&b| align(b)).sum()))
        .sum();
    let mut off = 0;
    let mut groups = Vec::new();
    for (i, &(name, _, _)) in UNET.iter().enumerate() {
        let tensors = sizes[i]
            .iter()
            .enumerate()
            .map(|(j, &b)| {
                let t = TensorSource {
                    name: format!("{name}.t{j}"),
                    host,
                    offset: off,
                    bytes: b,
                };
                off += align(b);
                t
            })
            .collect();
        let ns = COMPUTE_TO_COPY * copy_all * work[i] / total_work;
        groups.push(GroupDesc {
            name: name.into(),
            component: "unet".into(),
            tensors,
            compute: Duration::from_nanos(ns.max(1_000.0) as u64),
        });
    }
    Ok(SdModel {
        order: (0..groups.len()).map(GroupId).collect(),
        groups,
        host,
        bytes,
    })
}

const PASSES: usize = 3;
/// Run-ahead bounds swept: a host tied to the device, and one far ahead of it.
const RUN_AHEAD: [usize; 2] = [1, 64];

struct Row {
    pass_ns: f64,
    predicted_ns: f64,
    stall_ns: f64,
    bytes: u64,
    gbps: f64,
    overlap: f64,
    resident: u64,
}

fn run_mode(
    dev: &Arc<dyn Device>,
    m: &SdModel,
    cost: CostModel,
    mode: Mode,
    budget: u64,
    reserve: u64,
    run_ahead: usize,
) -> BoxResult<Row> {
    let cfg = SchedulerConfig {
        mode,
        budget,
        reserve,
        run_ahead,
        metrics: true,
        cost,
    };
    let s = Scheduler::new(dev.clone(), m.groups.clone(), m.order.clone(), cfg)?;
    let compute = s.compute_stream();
    for _ in 0..PASSES {
        s.begin_pass()?;
        for &g in &m.order {
            s.acquire(g)?;
            dev.busy(compute, m.groups[g.0].compute)?;
            s.release(g)?;
        }
        s.end_pass()?;
    }
    let metrics = s.metrics()?;
    let last = metrics
        .passes
        .last()
        .ok_or("the scheduler recorded no pass")?;
    let plan = s.plan();
    Ok(Row {
        pass_ns: last.time_ns,
        predicted_ns: plan.predicted_pass.as_nanos() as f64,
        stall_ns: last.stall_ns,
        bytes: last.bytes,
        gbps: last.gbps,
        overlap: last.overlap,
        resident: plan.resident_bytes,
    })
}

fn sweep(dev: &Arc<dyn Device>, cost: CostModel, scale: f64, out: &mut String) -> BoxResult<()> {
    let m = sd_like(dev.as_ref(), &cost, scale)?;
    let reserve = align(m.bytes / 16);
    let compute: Duration = m.groups.iter().map(|g| g.compute).sum();
    let largest = m.groups.iter().map(|g| g.device_bytes()).max().unwrap_or(0);
    writeln!(
        out,
        "model: {} groups, {:.1} MiB of weights (SD 1.5 UNet × {scale}), largest group {:.2} MiB, \
         compute {compute:.2?} per pass ({COMPUTE_TO_COPY} × the time to copy every weight once), \
         engine reserve {:.1} MiB; cost model {:.2} GB/s + {:?} per copy; {PASSES} passes, the \
         last reported\n",
        m.groups.len(),
        m.bytes as f64 / MIB as f64,
        largest as f64 / MIB as f64,
        reserve as f64 / MIB as f64,
        cost.h2d_bandwidth / 1e9,
        cost.copy_latency,
    )?;
    let all = run_mode(dev, &m, cost, Mode::None, reserve + m.bytes, reserve, 1)?;
    for run_ahead in RUN_AHEAD {
        writeln!(
            out,
            "\nrun-ahead {run_ahead} (the host may be {run_ahead} group use(s) ahead of the device)\n"
        )?;
        writeln!(
            out,
            "| budget (weights part) | mode | resident MiB | pass ms | predicted ms | × none | stall ms | copied MiB/pass | GB/s | overlap |"
        )?;
        writeln!(
            out,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        )?;
        let mut line = |label: &str, mode: Mode, r: &Row| {
            writeln!(
                out,
                "| {label} | {mode} | {:.1} | {:.3} | {:.3} | {:.2} | {:.3} | {:.1} | {:.2} | {:.1} % |",
                r.resident as f64 / MIB as f64,
                r.pass_ns / 1e6,
                r.predicted_ns / 1e6,
                r.pass_ns / all.pass_ns,
                r.stall_ns / 1e6,
                r.bytes as f64 / MIB as f64,
                r.gbps,
                r.overlap * 100.0
            )
        };
        line("all (100 %)", Mode::None, &all)?;
        for (label, frac) in [("50 %", 0.5), ("25 %", 0.25)] {
            let budget = reserve + (m.bytes as f64 * frac) as u64;
            let mut modes = vec![Mode::Sequential];
            modes.extend([0, 1, 2, 4, 8].map(|depth| Mode::Group { depth }));
            modes.push(Mode::Auto);
            for mode in modes {
                let r = run_mode(dev, &m, cost, mode, budget, reserve, run_ahead)?;
                line(label, mode, &r)?;
            }
        }
    }
    dev.free_host(m.host)?;
    Ok(())
}

/// How much to run: everything (`cargo bench`), or a smoke test (`cargo test --benches`, which
/// runs bench binaries without `--bench`).
#[derive(Clone, Copy)]
struct Scope {
    max: u64,
    scale: f64,
}

/// Everything for one device; returns the report.
fn report(dev: Arc<dyn Device>, cost: Option<CostModel>, scope: Scope) -> BoxResult<String> {
    let mut out = String::new();
    let rig = Rig::new(dev.clone(), scope.max)?;
    writeln!(out, "## H2D bandwidth, pinned vs pageable\n")?;
    let (best, fixed) = bandwidth(&rig, &mut out)?;
    writeln!(out, "\n## Copy/compute overlap\n")?;
    overlap(&rig, &mut out)?;
    drop(rig);
    // The simulator's own parameters; on CUDA the bandwidth and per-copy cost just measured.
    let cost = cost.unwrap_or(CostModel {
        h2d_bandwidth: best,
        copy_latency: fixed,
        launch_latency: Duration::from_micros(3),
    });
    writeln!(out, "\n## Prefetch depth sweep\n")?;
    sweep(&dev, cost, scope.scale, &mut out)?;
    Ok(out)
}

/// Criterion cases on CUDA: pinned copies and a concurrent copy + kernel, timed by events.
fn criterion_cuda(dev: Arc<dyn Device>) -> BoxResult<()> {
    let rig = Rig::new(dev, 64 * MIB)?;
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let mut g = c.benchmark_group("transfer/cuda");
    for size in [64 * KIB, 4 * MIB, 64 * MIB] {
        g.throughput(Throughput::Bytes(size));
        g.bench_function(format!("h2d_pinned/{}", size_label(size)), |b| {
            b.iter_custom(|iters| rig.pinned(size, iters).expect("pinned copies"))
        });
    }
    g.throughput(Throughput::Bytes(64 * MIB));
    g.bench_function("copy_64MiB_with_2ms_kernel", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| concurrent(&rig, 64 * MIB, Duration::from_millis(2)).expect("overlap"))
                .sum()
        })
    });
    g.finish();
    c.final_summary();
    Ok(())
}

fn emit(name: &str, text: &str) {
    println!("{text}");
    if let Some(dir) = std::env::var_os("FERRY_BENCH_OUT") {
        let path = std::path::Path::new(&dir).join(format!("transfer-{name}.txt"));
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("could not write {}: {e}", path.display());
        }
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (sim_scope, cuda_scope) = if full {
        (
            Scope {
                max: MAX_SIZE,
                scale: 1.0 / 16.0,
            },
            Scope {
                max: MAX_SIZE,
                scale: 0.25,
            },
        )
    } else {
        let quick = Scope {
            max: QUICK_MAX_SIZE,
            scale: 1.0 / 256.0,
        };
        (quick, quick)
    };
    let sim = SimDevice::new(SimConfig::default());
    let cost = CostModel::of_sim(sim.config());
    println!(
        "# Simulated device: {} (virtual time)\n",
        Device::name(sim.as_ref())
    );
    match report(sim, Some(cost), sim_scope) {
        Ok(text) => emit("sim", &text),
        Err(e) => {
            eprintln!("simulated device: {e}");
            std::process::exit(1);
        }
    }
    match CudaDevice::new(0) {
        Err(e) => println!("CUDA: skipped (no device: {e})"),
        Ok(cuda) => {
            println!(
                "# CUDA: {} (GPU time, events)\n",
                Device::name(cuda.as_ref())
            );
            let dev: Arc<dyn Device> = cuda;
            match report(dev.clone(), None, cuda_scope) {
                Ok(text) => emit("cuda", &text),
                Err(e) => {
                    eprintln!("CUDA: {e}");
                    std::process::exit(1);
                }
            }
            if full {
                if let Err(e) = criterion_cuda(dev) {
                    eprintln!("CUDA criterion cases: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
}
