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
use ferry_pager::{Device, HostMemKind, HostPtr};
use ferry_sched::plan::align;
use ferry_sched::transfer::{size_label, TransferRig};
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

/// Bandwidth table; returns the reference (best plain copy of the largest size) bandwidth in
/// bytes/s and the per-copy fixed cost estimated from the 4 KiB copies.
fn bandwidth(rig: &TransferRig, out: &mut String) -> BoxResult<(f64, Duration)> {
    let bw = rig.bandwidth()?;
    let best_gbps = bw.reference_gbps;
    writeln!(
        out,
        "reference: one {} pinned copy, best of {}: {best_gbps:.2} GB/s\n",
        size_label(bw.reference_bytes),
        bw.reference_tries
    )?;
    writeln!(
        out,
        "| size | copies | pinned GB/s | pinned / best | pageable GB/s | pinned / pageable |"
    )?;
    writeln!(out, "| --- | --- | --- | --- | --- | --- |")?;
    for r in &bw.rows {
        let (pg, qg) = (r.pinned_gbps, r.pageable_gbps);
        writeln!(
            out,
            "| {} | {} | {pg:.2} | {:.1} % | {qg:.2} | {:.2}× |",
            size_label(r.bytes),
            r.copies,
            100.0 * pg / best_gbps,
            pg / qg
        )?;
    }
    let fixed = bw.per_copy_fixed;
    writeln!(
        out,
        "\nper-copy fixed cost (4 KiB copies, bytes at the reference bandwidth removed): {fixed:?}"
    )?;
    Ok((bw.reference_bytes_per_s(), fixed))
}

/// Copy/compute overlap with a 64 MiB copy and kernels of 0.5×, 1× and 2× its duration.
fn overlap(rig: &TransferRig, out: &mut String) -> BoxResult<()> {
    let rows = rig.overlap(rig.max_bytes().min(64 * MIB), &[0.5, 1.0, 2.0])?;
    writeln!(
        out,
        "| copy | kernel | copy alone | kernel alone | together | overlap |"
    )?;
    writeln!(out, "| --- | --- | --- | --- | --- | --- |")?;
    for r in rows {
        writeln!(
            out,
            "| {} | {}× copy | {:.2?} | {:.2?} | {:.2?} | {:.1} % |",
            size_label(r.copy_bytes),
            r.kernel_factor,
            r.copy_alone,
            r.kernel_alone,
            r.together,
            100.0 * r.overlap
        )?;
    }
    Ok(())
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
    let rig = TransferRig::new(dev.clone(), scope.max)?;
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
    let rig = TransferRig::new(dev, 64 * MIB)?;
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
                .map(|_| {
                    rig.concurrent(64 * MIB, Duration::from_millis(2))
                        .expect("overlap")
                })
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
