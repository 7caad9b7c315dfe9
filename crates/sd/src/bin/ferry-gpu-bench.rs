//! `ferry-gpu-bench`: the benchmark of the prepared GPU suite (`scripts/gpu-suite/`).
//!
//! On the simulated device (`--device sim`, virtual time) or GPU 0 (`--device cuda`, GPU time
//! from events) it measures:
//!
//! 1. the device, and host→device bandwidth from pinned and pageable memory at 4 KiB – 256 MiB,
//!    with the best plain large pinned copy (one `cuMemcpyHtoDAsync` on CUDA) as the reference;
//! 2. copy/compute overlap: a 64 MiB copy beside a `busy` kernel of 0.5×, 1× and 2× its length;
//! 3. paging a full-size SD 1.5 UNet (fp16, 1.72 GB, the executor's own weight groups from
//!    `UNet2DConditionModel::group_prefixes`) with random host weights, for a few steps in modes
//!    `none`, `sequential`, `group` and `auto` at several budgets: step time, bytes streamed,
//!    GB/s, stall, overlap, peak device bytes, and the planner's predicted step time. After the
//!    timed steps every group is read back from the device and compared with the host bytes.
//!
//! 4. on CUDA only (`--device sim` reports it skipped): the real SD 1.5 UNet, random fp16
//!    weights in a `HostStore`, run by `GpuExecutor` with the real kernels (`forward_on`, batch 2,
//!    4×64×64, 77×768 context) resident and in `sequential`, `group` and `auto` at the
//!    `--real-budgets`: step time from events, streaming and stall from the scheduler, memory from
//!    `cuMemGetInfo`, and the output checked finite and bit-identical across runs.
//!
//! In 3, compute is **modelled**: each group's work is one `busy` kernel whose length is the
//! group's FLOPs (batch 2, 64×64 latents, 77 context tokens) at an assumed throughput
//! (`--tflops`), so it measures paging alone; 4 measures the real kernels.
//!
//! `cargo run --release -p ferry-sd --bin ferry-gpu-bench -- --device sim --out DIR` writes
//! `DIR/gpu-bench-<device>.json` and `DIR/gpu-bench-<device>.md`.

use clap::{Parser, ValueEnum};
use ferry_pager::device::cuda::CudaDevice;
use ferry_pager::device::sim::{SimConfig, SimDevice};
use ferry_pager::host::{HostStore, RawTensor};
use ferry_pager::weights::DType as StoredDType;
use ferry_pager::{Device, DeviceKind, DevicePtr, DeviceRange, HostMemKind, HostPtr};
use ferry_sched::plan::align;
use ferry_sched::transfer::{size_label, TransferRig};
use ferry_sched::{CostModel, GroupDesc, GroupId, Mode, Scheduler, SchedulerConfig, TensorSource};
use ferry_sd::backend::{Backend, CudaBackend, ARENA_ALIGN};
use ferry_sd::exec::{ComponentGroups, ExecConfig, Executor};
use ferry_sd::gpu_exec::{GpuExecutor, GpuGroups};
use ferry_sd::models::unet::{UNet2DConditionModel, UNetConfig};
use ferry_sd::tensor::{DType, Tensor};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const MIB: u64 = 1 << 20;
const GB: f64 = 1e9;

/// `runwayml/stable-diffusion-v1-5` `unet/config.json` (the keys it sets; the rest default).
const SD15_UNET_CONFIG: &str = r#"{
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "out_channels": 4,
  "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

/// Batch of a classifier-free-guidance step.
const BATCH: f64 = 2.0;
/// Latent side at 512×512.
const LATENT: usize = 64;
/// Text context tokens.
const CONTEXT: f64 = 77.0;
/// Shortest modelled compute per group (a group is several kernels, each with launch overhead).
const MIN_GROUP_COMPUTE: Duration = Duration::from_micros(5);
/// Launch latency assumed by the planner on CUDA (the simulator has its own).
const CUDA_LAUNCH_LATENCY: Duration = Duration::from_micros(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Sim,
    Cuda,
}

/// Benchmark of the prepared GPU suite: H2D bandwidth, copy/compute overlap, SD 1.5 UNet paging.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Device to run on.
    #[arg(long, value_enum, default_value = "sim")]
    device: DeviceArg,
    /// Folder for gpu-bench-<device>.json and .md (created if missing).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Timed UNet steps per run (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Assumed achieved fp16 throughput, TFLOP/s, that turns each group's FLOPs into its
    /// modelled compute time.
    #[arg(long, default_value_t = 100.0)]
    tflops: f64,
    /// Paging budgets in GB (1e9 bytes), weights plus engine reserve; a run where everything
    /// fits is always added.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1.0, 0.5])]
    budgets: Vec<f64>,
    /// Engine reserve (activations, workspace) inside each budget, MiB. Not touched here.
    #[arg(long, default_value_t = 128)]
    reserve_mib: u64,
    /// Prefetch depth of `group` mode.
    #[arg(long, default_value_t = 2)]
    depth: usize,
    /// Group uses the host may run ahead of the device (the executor uses 64).
    #[arg(long, default_value_t = 64)]
    run_ahead: usize,
    /// Largest copy of the bandwidth table, MiB.
    #[arg(long, default_value_t = 256)]
    max_copy_mib: u64,
    /// Skip reading every group back after each run.
    #[arg(long)]
    no_verify: bool,
    /// Timed steps per run of the real UNet on CUDA (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    real_steps: usize,
    /// Budgets in GB of the real UNet's paged runs, weights plus the planned activation
    /// reserve; a resident run is always added.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1.0, 0.6])]
    real_budgets: Vec<f64>,
    /// Seconds the real-UNet part may take; runs that would go past it are skipped.
    #[arg(long, default_value_t = 75.0)]
    real_max_s: f64,
}

fn ms(ns: f64) -> f64 {
    ns / 1e6
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------------------------
// 1–2: bandwidth and overlap

/// Bandwidth measurements; the reference bandwidth (bytes/s) and per-copy fixed cost.
struct Bandwidth {
    reference_bps: f64,
    fixed: Duration,
    json: Value,
    md: String,
}

fn bandwidth(rig: &TransferRig) -> BoxResult<Bandwidth> {
    let bw = rig.bandwidth()?;
    let best_gbps = bw.reference_gbps;
    let fixed = bw.per_copy_fixed;
    let mut md = String::new();
    writeln!(
        md,
        "reference: one {} pinned copy, best of {}: **{best_gbps:.2} GB/s**\n",
        size_label(bw.reference_bytes),
        bw.reference_tries
    )?;
    writeln!(
        md,
        "| size | copies | pinned GB/s | pinned / reference | pageable GB/s | pinned / pageable |"
    )?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- |")?;
    let mut rows = Vec::new();
    for r in &bw.rows {
        let (n, pg, qg) = (r.copies, r.pinned_gbps, r.pageable_gbps);
        writeln!(
            md,
            "| {} | {n} | {pg:.2} | {:.1} % | {qg:.2} | {:.2}× |",
            size_label(r.bytes),
            100.0 * pg / best_gbps,
            pg / qg
        )?;
        rows.push(json!({
            "bytes": r.bytes, "copies": n, "pinned_gbps": pg, "pageable_gbps": qg,
            "pinned_fraction_of_reference": pg / best_gbps,
        }));
    }
    writeln!(
        md,
        "\nper-copy fixed cost (4 KiB copies, bytes at the reference bandwidth removed): {fixed:.2?}"
    )?;
    Ok(Bandwidth {
        reference_bps: bw.reference_bytes_per_s(),
        fixed,
        json: json!({
            "reference_bytes": bw.reference_bytes,
            "reference_gbps": best_gbps,
            "per_copy_fixed_ns": fixed.as_nanos() as u64,
            "rows": rows,
        }),
        md,
    })
}

fn overlap(rig: &TransferRig) -> BoxResult<(Value, String)> {
    let measured = rig.overlap(rig.max_bytes().min(64 * MIB), &[0.5, 1.0, 2.0])?;
    let mut md = String::new();
    writeln!(
        md,
        "| copy | kernel | copy alone | kernel alone | together | overlap |"
    )?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- |")?;
    let mut rows = Vec::new();
    for r in measured {
        writeln!(
            md,
            "| {} | {}× copy | {:.2?} | {:.2?} | {:.2?} | {:.1} % |",
            size_label(r.copy_bytes),
            r.kernel_factor,
            r.copy_alone,
            r.kernel_alone,
            r.together,
            100.0 * r.overlap
        )?;
        rows.push(json!({
            "copy_bytes": r.copy_bytes, "kernel_factor": r.kernel_factor,
            "copy_alone_ns": r.copy_alone.as_nanos() as u64,
            "kernel_alone_ns": r.kernel_alone.as_nanos() as u64,
            "together_ns": r.together.as_nanos() as u64,
            "overlap": r.overlap,
        }));
    }
    Ok((Value::Array(rows), md))
}

// ---------------------------------------------------------------------------------------------
// 3: the SD 1.5 UNet, paged

/// One weight group of the UNet as the bench models it.
struct UnetGroup {
    prefix: String,
    tensors: Vec<(String, u64)>,
    flops: f64,
}

/// Latent positions at which a group's convolutions / tokens run, from its module path.
fn group_positions(prefix: &str, levels: usize) -> f64 {
    let side = |level: usize| (LATENT >> level.min(levels - 1)) as f64;
    let index = |rest: &str| {
        rest.split('.')
            .next()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0)
    };
    let level = if let Some(rest) = prefix.strip_prefix("down_blocks.") {
        let i = index(rest);
        // A downsampler's stride-2 convolution produces the next level's resolution.
        if prefix.contains(".downsamplers.") {
            i + 1
        } else {
            i
        }
    } else if prefix.starts_with("mid_block") {
        levels - 1
    } else if let Some(rest) = prefix.strip_prefix("up_blocks.") {
        let i = index(rest);
        let lvl = (levels - 1).saturating_sub(i);
        // The upsampler's convolution runs after the 2× nearest upsample.
        if prefix.contains(".upsamplers.") {
            lvl.saturating_sub(1)
        } else {
            lvl
        }
    } else {
        0
    };
    side(level) * side(level)
}

/// FLOPs of the matrix products that read weight `name` (multiply-add = 2), at `positions`.
fn weight_flops(name: &str, shape: &[usize], positions: f64) -> f64 {
    if !name.ends_with(".weight") {
        return 0.0;
    }
    let numel = shape.iter().product::<usize>() as f64;
    let tokens = match shape.len() {
        4 => positions,
        2 if name.starts_with("time_embedding.") || name.contains("time_emb_proj") => 1.0,
        2 if name.contains("attn2.to_k") || name.contains("attn2.to_v") => CONTEXT,
        2 => positions,
        _ => return 0.0, // norms: memory-bound, not counted
    };
    let mut f = 2.0 * numel * tokens * BATCH;
    // Attention itself (QKᵀ and PV), counted once per attention at its query projection.
    if shape.len() == 2 && name.ends_with("attn1.to_q.weight") {
        f += 4.0 * BATCH * positions * positions * shape[0] as f64;
    } else if shape.len() == 2 && name.ends_with("attn2.to_q.weight") {
        f += 4.0 * BATCH * positions * CONTEXT * shape[0] as f64;
    }
    f
}

/// The SD 1.5 UNet's weight groups in forward order, each weight assigned to the longest
/// matching group prefix (as the executor does), fp16 bytes.
fn unet_groups() -> BoxResult<Vec<UnetGroup>> {
    let config = UNetConfig::from_json(SD15_UNET_CONFIG)?;
    let levels = config.block_out_channels.len();
    let unet = UNet2DConditionModel::new(config)?;
    let mut groups: Vec<UnetGroup> = unet
        .group_prefixes()
        .into_iter()
        .map(|prefix| UnetGroup {
            prefix,
            tensors: Vec::new(),
            flops: 0.0,
        })
        .collect();
    let mut by_len: Vec<usize> = (0..groups.len()).collect();
    by_len.sort_by_key(|&i| std::cmp::Reverse(groups[i].prefix.len()));
    for (name, shape) in unet.weight_shapes() {
        let g = by_len
            .iter()
            .copied()
            .find(|&i| name.starts_with(&format!("{}.", groups[i].prefix)))
            .ok_or_else(|| format!("weight {name} falls under no group prefix"))?;
        let positions = group_positions(&groups[g].prefix, levels);
        let bytes = 2 * shape.iter().product::<usize>() as u64;
        groups[g].flops += weight_flops(&name, &shape, positions);
        groups[g].tensors.push((name, bytes));
    }
    if let Some(g) = groups.iter().find(|g| g.tensors.is_empty()) {
        return Err(format!("group {} has no weights", g.prefix).into());
    }
    Ok(groups)
}

/// The host words of the random weights: a hash of the word index, with each fp16's top
/// exponent bit cleared (finite values, |x| < 2; never NaN or zero-filled pages).
fn word(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & 0xBFFF_BFFF_BFFF_BFFF
}

const SEED: u64 = 0x5D15_0000_F377;

/// The expected host bytes at `[offset, offset + len)` (`offset` a multiple of 8).
fn expected(offset: u64, len: usize) -> Vec<u8> {
    let first = offset / 8;
    let words = len.div_ceil(8) as u64;
    let mut v: Vec<u8> = (first..first + words)
        .flat_map(|k| word(SEED, k).to_le_bytes())
        .collect();
    v.truncate(len);
    v
}

/// Fills `[0, bytes)` of `host` with the random words, on all cores.
fn fill_host(dev: &dyn Device, host: HostPtr, bytes: u64) -> BoxResult<()> {
    const CHUNK: u64 = 32 * MIB;
    let chunks = bytes.div_ceil(CHUNK);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<(), String> {
                    let mut c = t;
                    while c < chunks {
                        let off = c * CHUNK;
                        let len = CHUNK.min(bytes - off) as usize;
                        let data = expected(off, len);
                        dev.host_write(host, off, &data)
                            .map_err(|e| format!("host_write at {off}: {e}"))?;
                        c += threads;
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "a fill thread panicked")??;
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}

/// The UNet laid out in one pinned host allocation, as the scheduler's groups.
struct Model {
    groups: Vec<GroupDesc>,
    flops: Vec<f64>,
    order: Vec<GroupId>,
    host: HostPtr,
    bytes: u64,
}

fn build_model(dev: &dyn Device, src: &[UnetGroup], tflops: f64) -> BoxResult<Model> {
    let bytes: u64 = src
        .iter()
        .flat_map(|g| &g.tensors)
        .map(|(_, b)| align(*b))
        .sum();
    let host = dev.alloc_host(bytes, HostMemKind::Upload)?;
    if let Err(e) = fill_host(dev, host, bytes) {
        let _ = dev.free_host(host);
        return Err(e);
    }
    let mut off = 0;
    let groups = src
        .iter()
        .map(|g| {
            let tensors = g
                .tensors
                .iter()
                .map(|(name, b)| {
                    let t = TensorSource {
                        name: name.clone(),
                        host,
                        offset: off,
                        bytes: *b,
                    };
                    off += align(*b);
                    t
                })
                .collect();
            let ns = g.flops / (tflops * 1e12) * 1e9;
            GroupDesc {
                name: g.prefix.clone(),
                component: "unet".into(),
                tensors,
                compute: Duration::from_nanos(ns as u64).max(MIN_GROUP_COMPUTE),
            }
        })
        .collect::<Vec<_>>();
    Ok(Model {
        order: (0..groups.len()).map(GroupId).collect(),
        flops: src.iter().map(|g| g.flops).collect(),
        groups,
        host,
        bytes,
    })
}

/// One paging run's results.
struct RunResult {
    label: String,
    mode: Mode,
    budget: u64,
    resident: u64,
    staging: u64,
    step_ns: f64,
    steps_ns: Vec<f64>,
    predicted_ns: f64,
    predicted_stall_ns: f64,
    stall_ns: f64,
    bytes: u64,
    gbps: f64,
    overlap: f64,
    arena: u64,
    driver_delta: Option<u64>,
    host_ms_per_step: f64,
    verified: Option<Result<u64, String>>,
}

/// The lowest free device memory seen.
struct FreeWatch<'a> {
    dev: &'a dyn Device,
    min_free: u64,
}

impl FreeWatch<'_> {
    fn sample(&mut self) -> BoxResult<()> {
        self.min_free = self.min_free.min(self.dev.mem_info()?.free);
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn run_paged(
    dev: &Arc<dyn Device>,
    m: &Model,
    cost: CostModel,
    label: &str,
    mode: Mode,
    budget: u64,
    args: &Args,
    check: Option<HostPtr>,
) -> BoxResult<RunResult> {
    let free_before = dev.mem_info()?.free;
    let cfg = SchedulerConfig {
        mode,
        budget,
        reserve: args.reserve_mib * MIB,
        run_ahead: args.run_ahead,
        metrics: true,
        cost,
    };
    let s = Scheduler::new(dev.clone(), m.groups.clone(), m.order.clone(), cfg)?;
    let mut watch = FreeWatch {
        dev: dev.as_ref(),
        min_free: free_before,
    };
    watch.sample()?;
    let compute = s.compute_stream();
    let passes = 1 + args.steps.max(1);
    // Passes run back to back with no host wait between them, as the planner assumes; the host
    // clock runs from the end of the warm-up pass's issue to the device finishing the last pass.
    let mut t0 = Instant::now();
    for pass in 0..passes {
        if pass == 1 {
            t0 = Instant::now();
        }
        s.begin_pass()?;
        for &g in &m.order {
            s.acquire(g)?;
            dev.busy(compute, m.groups[g.0].compute)?;
            s.release(g)?;
        }
        s.end_pass()?;
        watch.sample()?;
    }
    s.synchronize()?;
    let host_time = t0.elapsed();
    let metrics = s.metrics()?;
    let steady = metrics.passes.get(1..).unwrap_or_default();
    if steady.is_empty() {
        return Err("the scheduler recorded no steady-state pass".into());
    }
    let steps_ns: Vec<f64> = steady.iter().map(|p| p.time_ns).collect();
    // The pass whose time is the median (its stall, bytes and overlap are reported with it).
    let median = median_f(steps_ns.clone());
    let mid = steady
        .iter()
        .min_by(|a, b| {
            (a.time_ns - median)
                .abs()
                .total_cmp(&(b.time_ns - median).abs())
        })
        .ok_or("no steady pass")?;
    let plan = s.plan();
    let verified = check.map(|buf| verify(dev.as_ref(), &s, m, buf).map_err(|e| e.to_string()));
    watch.sample()?;
    drop(s);
    Ok(RunResult {
        label: label.into(),
        mode,
        budget,
        resident: plan.resident_bytes,
        staging: plan.staging_bytes,
        step_ns: mid.time_ns,
        steps_ns,
        predicted_ns: plan.predicted_pass.as_nanos() as f64,
        predicted_stall_ns: plan.predicted_stall.as_nanos() as f64,
        stall_ns: mid.stall_ns,
        bytes: mid.bytes,
        gbps: mid.gbps,
        overlap: mid.overlap,
        arena: metrics.peak_device_bytes,
        driver_delta: (dev.kind() == DeviceKind::Cuda || free_before > watch.min_free)
            .then(|| free_before.saturating_sub(watch.min_free)),
        host_ms_per_step: host_time.as_secs_f64() * 1e3 / args.steps.max(1) as f64,
        verified,
    })
}

/// One more pass that reads every group back from the device right after acquiring it and
/// compares it with the host bytes; returns the bytes checked.
fn verify(dev: &dyn Device, s: &Scheduler, m: &Model, buf: HostPtr) -> BoxResult<u64> {
    let compute = s.compute_stream();
    let mut checked = 0;
    let mut got = Vec::new();
    for &g in &m.order {
        let view = s.acquire(g)?;
        let desc = &m.groups[g.0];
        let mut off = 0;
        for (t, r) in desc.tensors.iter().zip(&view.tensors) {
            if r.len != t.bytes {
                return Err(
                    format!("{}: device range {} for {} bytes", t.name, r.len, t.bytes).into(),
                );
            }
            dev.copy_d2h(compute, buf, off, r.ptr, r.len)?;
            off += align(r.len);
        }
        dev.sync_stream(compute)?;
        s.release(g)?;
        let mut off = 0;
        for t in &desc.tensors {
            got.resize(t.bytes as usize, 0);
            dev.host_read(buf, off, &mut got)?;
            if got != expected(t.offset, t.bytes as usize) {
                let first = got
                    .iter()
                    .zip(expected(t.offset, t.bytes as usize))
                    .position(|(a, b)| *a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "{}: device bytes differ from the host weights (first at byte {first})",
                    t.name
                )
                .into());
            }
            checked += t.bytes;
            off += align(t.bytes);
        }
    }
    s.synchronize()?;
    Ok(checked)
}

fn mode_label(mode: Mode) -> String {
    match mode {
        Mode::Group { depth } => format!("group (depth {depth})"),
        m => m.to_string(),
    }
}

fn unet(
    dev: &Arc<dyn Device>,
    cost: CostModel,
    args: &Args,
) -> BoxResult<(Value, String, Vec<String>)> {
    let src = unet_groups()?;
    let t0 = Instant::now();
    let m = build_model(dev.as_ref(), &src, args.tflops)?;
    let fill_s = t0.elapsed().as_secs_f64();
    let result = unet_runs(dev, &m, cost, args, fill_s);
    let _ = dev.free_host(m.host);
    result
}

fn unet_runs(
    dev: &Arc<dyn Device>,
    m: &Model,
    cost: CostModel,
    args: &Args,
    fill_s: f64,
) -> BoxResult<(Value, String, Vec<String>)> {
    let reserve = args.reserve_mib * MIB;
    let largest = m.groups.iter().map(|g| g.device_bytes()).max().unwrap_or(0);
    let largest_name = m
        .groups
        .iter()
        .max_by_key(|g| g.device_bytes())
        .map_or("", |g| g.name.as_str());
    let compute: Duration = m.groups.iter().map(|g| g.compute).sum();
    let flops: f64 = m.flops.iter().sum();
    let tensors: usize = m.groups.iter().map(|g| g.tensors.len()).sum();
    let check = if args.no_verify {
        None
    } else {
        Some(dev.alloc_host(largest, HostMemKind::Readable)?)
    };
    let everything = align(reserve) + m.bytes;
    let mut plan: Vec<(String, u64, Vec<Mode>)> = vec![(
        format!("all fits ({:.3} GB)", everything as f64 / GB),
        everything,
        vec![Mode::None, Mode::Auto],
    )];
    for &b in &args.budgets {
        plan.push((
            format!("{b} GB"),
            (b * GB) as u64,
            vec![
                Mode::Sequential,
                Mode::Group { depth: args.depth },
                Mode::Auto,
            ],
        ));
    }
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for (label, budget, modes) in &plan {
        for &mode in modes {
            eprintln!("  unet: {label}, {mode} ...");
            match run_paged(dev, m, cost, label, mode, *budget, args, check) {
                Ok(r) => {
                    if let Some(Err(e)) = &r.verified {
                        failures.push(format!("{label} {mode}: read-back check failed: {e}"));
                    }
                    results.push(r);
                }
                Err(e) => failures.push(format!("{label} {mode}: {e}")),
            }
        }
    }
    if let Some(buf) = check {
        dev.free_host(buf)?;
    }
    let base = results
        .iter()
        .find(|r| r.mode == Mode::None)
        .map(|r| r.step_ns);

    let mut md = String::new();
    writeln!(
        md,
        "model: SD 1.5 UNet, {} groups, {tensors} tensors, {:.3} GB fp16 ({:.1} MiB), largest \
         group {} ({:.1} MiB); engine reserve {} MiB; random host weights written in {fill_s:.1} s\n",
        m.groups.len(),
        m.bytes as f64 / GB,
        m.bytes as f64 / MIB as f64,
        largest_name,
        largest as f64 / MIB as f64,
        args.reserve_mib,
    )?;
    writeln!(
        md,
        "modelled compute: {:.3} TFLOP per step (batch 2, 64×64 latents, 77 context tokens) at an \
         assumed {} TFLOP/s = {:.2} ms per step (each group at least {:?}); cost model {:.2} GB/s + \
         {:.2?} per copy; run-ahead {}; {} timed steps after one warm-up, the median step shown\n",
        flops / 1e12,
        args.tflops,
        ms(compute.as_nanos() as f64),
        MIN_GROUP_COMPUTE,
        cost.h2d_bandwidth / GB,
        cost.copy_latency,
        args.run_ahead,
        args.steps.max(1),
    )?;
    writeln!(
        md,
        "| budget | mode | resident GB | step ms | predicted ms | × none | stall ms | streamed GB/step | GB/s | overlap | arena GB | driver Δ GB | read-back |"
    )?;
    writeln!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )?;
    let mut rows = Vec::new();
    for r in &results {
        let vs = base.map_or(f64::NAN, |b| r.step_ns / b);
        let check = match &r.verified {
            None => "skipped".to_string(),
            Some(Ok(b)) => format!("ok ({:.2} GB)", *b as f64 / GB),
            Some(Err(_)) => "**FAILED**".to_string(),
        };
        writeln!(
            md,
            "| {} | {} | {:.3} | {:.2} | {:.2} | {vs:.2} | {:.2} | {:.3} | {:.2} | {:.1} % | {:.3} | {} | {check} |",
            r.label,
            mode_label(r.mode),
            r.resident as f64 / GB,
            ms(r.step_ns),
            ms(r.predicted_ns),
            ms(r.stall_ns),
            r.bytes as f64 / GB,
            r.gbps,
            r.overlap * 100.0,
            r.arena as f64 / GB,
            r.driver_delta
                .map_or("n/a".into(), |d| format!("{:.3}", d as f64 / GB)),
        )?;
        rows.push(json!({
            "budget_label": r.label,
            "budget_bytes": r.budget,
            "mode": r.mode.to_string(),
            "resident_bytes": r.resident,
            "staging_bytes": r.staging,
            "step_ns": r.step_ns,
            "steps_ns": r.steps_ns,
            "predicted_step_ns": r.predicted_ns,
            "predicted_stall_ns": r.predicted_stall_ns,
            "stall_ns": r.stall_ns,
            "streamed_bytes_per_step": r.bytes,
            "gbps_while_copying": r.gbps,
            "overlap": r.overlap,
            "vs_none": vs,
            "arena_bytes": r.arena,
            "driver_free_delta_bytes": r.driver_delta,
            "host_ms_per_step": r.host_ms_per_step,
            "readback": match &r.verified {
                None => json!("skipped"),
                Some(Ok(b)) => json!({"ok": true, "bytes": b}),
                Some(Err(e)) => json!({"ok": false, "error": e}),
            },
        }));
    }
    writeln!(
        md,
        "\nstep = compute-stream time of one UNet pass (events); predicted = the planner's cost-model \
         prediction for the same plan; stall = time the compute stream waited for copies; GB/s = \
         bytes / copy time while copying; overlap = 1 − stall / copy time; arena = the scheduler's \
         one device allocation (= budget); driver Δ = free memory before the run minus the lowest \
         free memory seen during it (cuMemGetInfo on CUDA); read-back = every group copied back \
         after acquire and compared with the host bytes."
    )?;
    let json = json!({
        "model": "SD 1.5 UNet (runwayml/stable-diffusion-v1-5 config), random fp16 weights",
        "groups": m.groups.len(),
        "tensors": tensors,
        "weight_bytes": m.bytes,
        "largest_group": {"name": largest_name, "bytes": largest},
        "reserve_bytes": reserve,
        "flops_per_step": flops,
        "assumed_tflops": args.tflops,
        "modelled_compute_ns_per_step": compute.as_nanos() as u64,
        "min_group_compute_ns": MIN_GROUP_COMPUTE.as_nanos() as u64,
        "cost_model": {
            "h2d_gbps": cost.h2d_bandwidth / GB,
            "copy_latency_ns": cost.copy_latency.as_nanos() as u64,
            "launch_latency_ns": cost.launch_latency.as_nanos() as u64,
        },
        "run_ahead": args.run_ahead,
        "group_depth": args.depth,
        "timed_steps": args.steps.max(1),
        "host_fill_s": fill_s,
        "group_table": m.groups.iter().zip(&m.flops).map(|(g, f)| json!({
            "name": g.name, "bytes": g.device_bytes(), "tensors": g.tensors.len(),
            "flops": f, "compute_ns": g.compute.as_nanos() as u64,
        })).collect::<Vec<_>>(),
        "runs": rows,
        "failures": failures,
    });
    Ok((json, md, failures))
}

// ---------------------------------------------------------------------------------------------
// 4: the real SD 1.5 UNet on CUDA

/// Timestep of the real UNet steps (any value; the same in every run).
const REAL_TIMESTEP: f32 = 500.0;
/// Seed of the real UNet's weights and inputs.
const REAL_SEED: u64 = 0x5D15_0000_0E4A;

/// A uniform value in `[-1, 1)` from the hash of `(seed, index)`.
fn unit(seed: u64, index: u64) -> f32 {
    (word(seed, index) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// The random values of weight `name` as `(centre, half-width)`: uniform in ±1/√fan_in for
/// matrices and convolutions (each product shrinks the activations' variance), 1 ± 0.01 for
/// norm scales, ±0.02 for biases and norm shifts; activations stay small and finite.
fn real_weight_range(name: &str, shape: &[usize]) -> (f32, f32) {
    if shape.len() >= 2 {
        let fan_in = shape[1..].iter().product::<usize>().max(1) as f32;
        (0.0, 1.0 / fan_in.sqrt())
    } else if name.ends_with(".weight") && name.contains("norm") {
        (1.0, 0.01)
    } else {
        (0.0, 0.02)
    }
}

/// The weights' fp16 bytes in one buffer, and each tensor's `(offset, bytes)` in it.
type WeightBytes = (Vec<u8>, Vec<(u64, u64)>);

/// The UNet's weights as fp16 bytes, generated on all cores.
fn real_weights(shapes: &[(String, Vec<usize>)]) -> BoxResult<WeightBytes> {
    let mut ranges = Vec::with_capacity(shapes.len());
    let mut total = 0u64;
    for (_, s) in shapes {
        let bytes = 2 * s.iter().product::<usize>() as u64;
        ranges.push((total, bytes));
        total += bytes;
    }
    let mut data = vec![0u8; usize::try_from(total)?];
    // One work item per tensor (the largest is 59 MB: the load stays balanced on 16 cores).
    let mut work: Vec<(usize, &mut [u8])> = Vec::with_capacity(shapes.len());
    let mut rest = data.as_mut_slice();
    for (i, &(_, bytes)) in ranges.iter().enumerate() {
        let (head, tail) = rest.split_at_mut(bytes as usize);
        work.push((i, head));
        rest = tail;
    }
    let queue = std::sync::Mutex::new(work);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let item = queue.lock().ok().and_then(|mut q| q.pop());
                let Some((i, buf)) = item else { break };
                let (name, shape) = &shapes[i];
                let (centre, width) = real_weight_range(name, shape);
                let seed = REAL_SEED ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407);
                for (k, c) in buf.chunks_exact_mut(2).enumerate() {
                    let v = centre + width * unit(seed, k as u64);
                    c.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                }
            });
        }
    });
    Ok((data, ranges))
}

/// Registers random fp16 weights for every weight of `unet` (as `component.name`) in `store`;
/// returns the number of tensors and the seconds spent generating them.
fn register_real_weights(
    store: &HostStore,
    unet: &UNet2DConditionModel,
) -> BoxResult<(usize, f64)> {
    let t0 = Instant::now();
    let shapes: Vec<(String, Vec<usize>)> = unet
        .weight_shapes()
        .into_iter()
        .map(|(n, s)| (format!("{}.{n}", unet.component()), s))
        .collect();
    let (data, ranges) = real_weights(&shapes)?;
    let gen_s = t0.elapsed().as_secs_f64();
    let raws: Vec<RawTensor<'_>> = shapes
        .iter()
        .zip(&ranges)
        .map(|((name, shape), &(off, bytes))| RawTensor {
            name,
            dtype: StoredDType::F16,
            shape,
            data: &data[off as usize..(off + bytes) as usize],
        })
        .collect();
    store.register_batch(&raws)?;
    Ok((shapes.len(), gen_s))
}

/// A host tensor of uniform values in `[-1, 1)`.
fn real_input(shape: &[usize], seed: u64) -> BoxResult<Tensor> {
    let n = shape.iter().product::<usize>() as u64;
    Ok(Tensor::new(
        shape.to_vec(),
        (0..n).map(|k| unit(seed, k)).collect(),
    )?)
}

/// The UNet's activation peak for one step on `sample`/`context` (inputs included), from a
/// recording-mode run with fake weight views (no GPU).
fn real_activation_peak(
    unet: &UNet2DConditionModel,
    groups: &GpuGroups,
    sample: &[usize],
    context: &[usize],
) -> BoxResult<u64> {
    let (views, _) = groups.fake_views(1 << 44)?;
    let log = RefCell::new(Vec::new());
    let ws = DeviceRange::new(DevicePtr(1 << 40), 1 << 42);
    let be = CudaBackend::recording(&log, ws, DType::F16)?;
    let x = be.upload(&Tensor::zeros(sample.to_vec())?)?;
    let ctx = be.upload(&Tensor::zeros(context.to_vec())?)?;
    let out = unet.forward_on(&be, &views, &x, &[REAL_TIMESTEP], &ctx, None)?;
    drop(out);
    Ok(be.arena().peak())
}

/// One real-UNet run's results.
struct RealRun {
    label: String,
    mode: Mode,
    budget: u64,
    min_budget: u64,
    steps_ns: Vec<f64>,
    step_ns: f64,
    sched_step_ns: f64,
    stall_ns: f64,
    bytes: u64,
    gbps: f64,
    overlap: f64,
    arena: u64,
    workspace: u64,
    activation_peak: u64,
    driver_delta: u64,
    setup_s: f64,
    finite: bool,
    steps_identical: bool,
    out: Vec<f32>,
}

/// The fixed parts of every real-UNet run.
struct RealSetup<'a> {
    cuda: &'a Arc<CudaDevice>,
    store: &'a HostStore,
    components: &'a [ComponentGroups],
    unet: &'a UNet2DConditionModel,
    sample: &'a Tensor,
    context: &'a Tensor,
    reserve: u64,
    steps: usize,
}

/// Runs one warm-up and `steps` timed UNet steps with a fresh executor in `mode` within
/// `budget` (`None`: everything resident plus the reserve).
fn run_real(
    s: &RealSetup<'_>,
    label: &str,
    mode: Mode,
    budget: Option<u64>,
    min_budget: u64,
) -> BoxResult<RealRun> {
    let dev: &dyn Device = s.cuda.as_ref();
    let t0 = Instant::now();
    let free_before = dev.mem_info()?.free;
    let exec = GpuExecutor::with_pass(
        s.cuda.clone() as Arc<dyn Device>,
        s.store,
        s.components,
        &[("unet", DType::F16)],
        &["unet"],
        ExecConfig {
            mode,
            budget,
            reserve: s.reserve,
            metrics: true,
            ..ExecConfig::default()
        },
    )?;
    let setup_s = t0.elapsed().as_secs_f64();
    let mut min_free = free_before.min(dev.mem_info()?.free);
    let be = exec.backend(DType::F16)?;
    let stream = exec.compute_stream();
    let (start, end) = (dev.create_event()?, dev.create_event()?);
    let base = be.mark();
    let x = be.upload(s.sample)?;
    let ctx = be.upload(s.context)?;
    let mut steps_ns = Vec::new();
    let mut outs: Vec<Tensor> = Vec::new();
    for step in 0..=s.steps {
        let mark = be.mark();
        dev.record_event(start, stream)?;
        exec.scheduler().begin_pass()?;
        let y = s
            .unet
            .forward_on(&be, &exec, &x, &[REAL_TIMESTEP], &ctx, None)?;
        exec.scheduler().end_pass()?;
        dev.record_event(end, stream)?;
        let out = be.download(&y)?;
        be.release(mark)?;
        dev.sync_event(end)?;
        min_free = min_free.min(dev.mem_info()?.free);
        if step > 0 {
            steps_ns.push(dev.event_elapsed(start, end)?.as_nanos() as f64);
        }
        outs.push(out);
    }
    let activation_peak = be.arena().peak();
    drop((x, ctx));
    be.release(base)?;
    exec.scheduler().synchronize()?;
    let metrics = exec.metrics()?;
    let workspace = exec.workspace().len;
    let median = median_f(steps_ns.clone());
    let mid = steps_ns
        .iter()
        .enumerate()
        .min_by(|a, b| (a.1 - median).abs().total_cmp(&(b.1 - median).abs()))
        .map_or(0, |(i, _)| i);
    let pass = metrics
        .passes
        .get(mid + 1)
        .ok_or("the scheduler recorded fewer passes than steps")?;
    let last = outs.pop().ok_or("no step ran")?;
    let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let steps_identical = outs.iter().all(|o| bits(o) == bits(&last));
    Ok(RealRun {
        label: label.into(),
        mode,
        budget: budget.unwrap_or(metrics.peak_device_bytes),
        min_budget,
        step_ns: steps_ns[mid],
        steps_ns,
        sched_step_ns: pass.time_ns,
        stall_ns: pass.stall_ns,
        bytes: pass.bytes,
        gbps: pass.gbps,
        overlap: pass.overlap,
        arena: metrics.peak_device_bytes,
        workspace,
        activation_peak,
        driver_delta: free_before.saturating_sub(min_free),
        setup_s,
        finite: last.data().iter().all(|v| v.is_finite()),
        steps_identical,
        out: last.into_data(),
    })
}

/// The real SD 1.5 UNet (random fp16 weights) on CUDA through `GpuExecutor`, in each mode at
/// each budget: step time, streaming, stall, memory, and whether every run gives the same bits.
fn real_unet(cuda: &Arc<CudaDevice>, args: &Args) -> BoxResult<(Value, String, Vec<String>)> {
    let started = Instant::now();
    let unet = UNet2DConditionModel::new(UNetConfig::from_json(SD15_UNET_CONFIG)?)?;
    let store = HostStore::new(cuda.clone() as Arc<dyn Device>);
    let (tensors, gen_s) = register_real_weights(&store, &unet)?;
    let load_s = started.elapsed().as_secs_f64() - gen_s;
    let components = vec![unet.groups()];
    let groups = GpuGroups::new(&store, &components, &[("unet", DType::F16)], 0.0)?;
    let sample_shape = [2, 4, LATENT, LATENT];
    let context_shape = [2, CONTEXT as usize, 768];
    let peak = real_activation_peak(&unet, &groups, &sample_shape, &context_shape)?;
    let reserve = peak + ARENA_ALIGN;
    let weights = groups.device_bytes();
    drop(groups);
    let everything = align(reserve) + weights;
    let sample = real_input(&sample_shape, REAL_SEED ^ 1)?;
    let context = real_input(&context_shape, REAL_SEED ^ 2)?;
    let setup = RealSetup {
        cuda,
        store: &store,
        components: &components,
        unet: &unet,
        sample: &sample,
        context: &context,
        reserve,
        steps: args.real_steps.max(1),
    };

    let mut plan: Vec<(String, Option<u64>, Vec<Mode>)> = vec![(
        format!("all fits ({:.3} GB)", everything as f64 / GB),
        None,
        vec![Mode::None],
    )];
    for &b in &args.real_budgets {
        plan.push((
            format!("{b} GB"),
            Some((b * GB) as u64),
            vec![
                Mode::Sequential,
                Mode::Group { depth: args.depth },
                Mode::Auto,
            ],
        ));
    }
    let mut runs: Vec<RealRun> = Vec::new();
    let mut notes = Vec::new();
    let mut failures = Vec::new();
    let deadline = Duration::from_secs_f64(args.real_max_s);
    for (label, budget, modes) in &plan {
        for &mode in modes {
            let min = Executor::minimum_budget(&store, &components, mode, reserve)?;
            let what = format!("{label} {}", mode_label(mode));
            if budget.is_some_and(|b| b < min) {
                notes.push(format!(
                    "{what}: skipped, the budget is below this mode's minimum of {:.3} GB",
                    min as f64 / GB
                ));
                continue;
            }
            // The next run costs about its setup and steps like the last one; skip it rather
            // than run past the time this part may take.
            let guess = runs.last().map_or(Duration::ZERO, |r| {
                Duration::from_secs_f64(r.setup_s + (r.steps_ns.len() + 1) as f64 * r.step_ns / 1e9)
            });
            if started.elapsed() + guess > deadline {
                notes.push(format!(
                    "{what}: skipped, it would run past --real-max-s {} s",
                    args.real_max_s
                ));
                continue;
            }
            eprintln!("  real unet: {what} ...");
            match run_real(&setup, label, mode, *budget, min) {
                Ok(r) => {
                    if !r.finite {
                        failures.push(format!("real unet {what}: the output is not finite"));
                    }
                    if !r.steps_identical {
                        failures.push(format!(
                            "real unet {what}: repeated steps on the same input differ"
                        ));
                    }
                    runs.push(r);
                }
                Err(e) => failures.push(format!("real unet {what}: {e}")),
            }
        }
    }
    // Every run must give the same bits as the first (paging moves weights, never values).
    let same: Vec<Option<bool>> = runs
        .iter()
        .map(|r| {
            runs.first().map(|f| {
                f.out.len() == r.out.len()
                    && f.out
                        .iter()
                        .zip(&r.out)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
            })
        })
        .collect();
    for (r, s) in runs.iter().zip(&same) {
        if *s == Some(false) {
            failures.push(format!(
                "real unet {} {}: output differs from the first run's",
                r.label,
                mode_label(r.mode)
            ));
        }
    }
    let base = runs
        .iter()
        .find(|r| r.mode == Mode::None)
        .map(|r| r.step_ns);
    let out_abs_max = runs
        .first()
        .map_or(f32::NAN, |r| r.out.iter().fold(0f32, |m, v| m.max(v.abs())));

    let mut md = String::new();
    writeln!(
        md,
        "model: SD 1.5 UNet, {} tensors, {:.3} GB fp16 on the device, random weights (generated \
         in {gen_s:.1} s, pinned in {load_s:.1} s); batch 2, 4×{LATENT}×{LATENT} latents, \
         77×768 context, fp16; activation reserve {:.1} MiB (recorded peak {:.1} MiB); \
         {} timed steps after one warm-up, the median shown; output |max| {out_abs_max:.3}\n",
        tensors,
        weights as f64 / GB,
        reserve as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        setup.steps,
    )?;
    writeln!(
        md,
        "| budget | mode | min GB | step ms | × none | sched ms | stall ms | streamed GB/step | GB/s | overlap | arena GB | act. peak MiB | driver Δ GB | finite | same bits |"
    )?;
    writeln!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )?;
    let mut rows = Vec::new();
    for (r, s) in runs.iter().zip(&same) {
        let vs = base.map_or(f64::NAN, |b| r.step_ns / b);
        let same_label = match s {
            Some(true) if r.steps_identical => "yes",
            Some(true) => "across runs; steps differ",
            _ => "**NO**",
        };
        writeln!(
            md,
            "| {} | {} | {:.3} | {:.2} | {vs:.2} | {:.2} | {:.2} | {:.3} | {:.2} | {:.1} % | {:.3} | {:.1} | {:.3} | {} | {same_label} |",
            r.label,
            mode_label(r.mode),
            r.min_budget as f64 / GB,
            ms(r.step_ns),
            ms(r.sched_step_ns),
            ms(r.stall_ns),
            r.bytes as f64 / GB,
            r.gbps,
            r.overlap * 100.0,
            r.arena as f64 / GB,
            r.activation_peak as f64 / MIB as f64,
            r.driver_delta as f64 / GB,
            if r.finite { "yes" } else { "**NO**" },
        )?;
        rows.push(json!({
            "budget_label": r.label,
            "budget_bytes": r.budget,
            "min_budget_bytes": r.min_budget,
            "mode": r.mode.to_string(),
            "step_ns": r.step_ns,
            "steps_ns": r.steps_ns,
            "vs_none": vs,
            "scheduler_pass_ns": r.sched_step_ns,
            "stall_ns": r.stall_ns,
            "streamed_bytes_per_step": r.bytes,
            "gbps_while_copying": r.gbps,
            "overlap": r.overlap,
            "arena_bytes": r.arena,
            "workspace_bytes": r.workspace,
            "activation_peak_bytes": r.activation_peak,
            "driver_free_delta_bytes": r.driver_delta,
            "setup_s": r.setup_s,
            "output_finite": r.finite,
            "steps_identical": r.steps_identical,
            "identical_to_first_run": s,
        }));
    }
    for n in &notes {
        writeln!(md, "\n{n}")?;
    }
    writeln!(
        md,
        "\nstep = compute-stream time of one `forward_on` (CUDA events around the pass, output \
         download excluded); sched = the scheduler's own pass time; stall, streamed, GB/s and \
         overlap from the scheduler's metrics for that pass; min = the mode's minimum budget \
         with the reserve; arena = the scheduler's one device allocation; act. peak = activation \
         arena peak (inputs included); driver Δ = free memory (cuMemGetInfo) before the executor \
         minus the lowest seen during the run; same bits = the final output equals the first \
         run's bit for bit, and every step's output equals the last."
    )?;
    let json = json!({
        "model": "SD 1.5 UNet (runwayml/stable-diffusion-v1-5 config), random fp16 weights, real kernels",
        "tensors": tensors,
        "weight_device_bytes": weights,
        "reserve_bytes": reserve,
        "recorded_activation_peak_bytes": peak,
        "sample_shape": sample_shape,
        "context_shape": context_shape,
        "timestep": REAL_TIMESTEP,
        "timed_steps": setup.steps,
        "weights_generate_s": gen_s,
        "weights_pin_s": load_s,
        "output_abs_max": out_abs_max,
        "runs": rows,
        "notes": notes,
        "failures": failures,
        "wall_s": started.elapsed().as_secs_f64(),
    });
    Ok((json, md, failures))
}

// ---------------------------------------------------------------------------------------------

/// The opened device (and it as a CUDA device, on CUDA).
type Opened = (
    Arc<dyn Device>,
    Value,
    Option<CostModel>,
    Option<Arc<CudaDevice>>,
);

/// The opened device, its description, the cost model to plan with (`None`: measure it), and
/// the CUDA device (on CUDA).
fn open(which: DeviceArg) -> BoxResult<Opened> {
    match which {
        DeviceArg::Sim => {
            let cfg = SimConfig::default();
            let sim = SimDevice::new(cfg.clone());
            let cost = CostModel::of_sim(&cfg);
            let info = json!({
                "kind": "sim",
                "name": Device::name(sim.as_ref()),
                "time": "virtual (the simulator's model; not hardware numbers)",
                "h2d_gbps": cfg.h2d_bandwidth / GB,
                "pageable_gbps": cfg.pageable_bandwidth / GB,
                "copy_latency_ns": cfg.copy_latency.as_nanos() as u64,
                "launch_latency_ns": cfg.launch_latency.as_nanos() as u64,
                "memory_total_bytes": cfg.capacity,
            });
            Ok((sim, info, Some(cost), None))
        }
        DeviceArg::Cuda => {
            let cuda = CudaDevice::new(0)?;
            let (major, minor) = cuda.compute_capability()?;
            let mem = cuda.mem_info()?;
            let v = cuda.driver_version();
            let info = json!({
                "kind": "cuda",
                "name": Device::name(cuda.as_ref()),
                "time": "GPU time from CUDA events",
                "driver_cuda_version": format!("{}.{}", v / 1000, v % 1000 / 10),
                "compute_capability": format!("{major}.{minor}"),
                "memory_total_bytes": mem.total,
                "memory_free_bytes": mem.free,
                "read_only_host_register": cuda.supports_read_only_register(),
            });
            Ok((cuda.clone(), info, None, Some(cuda)))
        }
    }
}

fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(failures) if failures.is_empty() => {}
        Ok(failures) => {
            for f in failures {
                eprintln!("FAILED: {f}");
            }
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("ferry-gpu-bench: {e}");
            std::process::exit(2);
        }
    }
}

/// Runs everything; returns the failed parts (the report is written either way).
fn run(args: &Args) -> BoxResult<Vec<String>> {
    let started = Instant::now();
    let (dev, info, sim_cost, cuda) = open(args.device)?;
    let tag = match args.device {
        DeviceArg::Sim => "sim",
        DeviceArg::Cuda => "cuda",
    };
    let mut md = String::new();
    writeln!(
        md,
        "# ferry-gpu-bench: {}\n",
        info["name"].as_str().unwrap_or("")
    )?;
    if args.device == DeviceArg::Sim {
        writeln!(
            md,
            "**Simulated device, virtual time**: these numbers restate the simulator's model \
             (PCIe 4-like, {} GB/s pinned); they check the benchmark and the scheduler's \
             mechanics, not hardware.\n",
            info["h2d_gbps"]
        )?;
    }
    writeln!(
        md,
        "Sections 1–3 model compute (`busy` kernels sized from FLOPs) and so measure paging \
         alone; section 4 runs the real SD 1.5 UNet kernels through the GPU executor (CUDA only).\n"
    )?;
    writeln!(md, "device: `{info}`\n")?;
    let mut failures = Vec::new();

    eprintln!("[1/4] bandwidth ...");
    let rig = TransferRig::new(dev.clone(), args.max_copy_mib.max(1) * MIB)?;
    let bw = bandwidth(&rig)?;
    writeln!(md, "## H2D bandwidth, pinned vs pageable\n\n{}", bw.md)?;
    eprintln!("[2/4] overlap ...");
    let (ov_json, ov_md) = overlap(&rig)?;
    writeln!(md, "\n## Copy/compute overlap\n\n{ov_md}")?;
    drop(rig);
    // A partial report now, in case the UNet part does not finish (a time limit, a crash).
    let partial = json!({
        "tool": "ferry-gpu-bench",
        "partial": "the UNet part did not finish",
        "device": info,
        "h2d": bw.json,
        "overlap": ov_json,
    });
    save(args, tag, &md, &partial)?;

    let cost = sim_cost.unwrap_or(CostModel {
        h2d_bandwidth: bw.reference_bps,
        copy_latency: bw.fixed,
        launch_latency: CUDA_LAUNCH_LATENCY,
    });
    eprintln!("[3/4] SD 1.5 UNet paging ...");
    let unet_json = match unet(&dev, cost, args) {
        Ok((j, m, f)) => {
            writeln!(md, "\n## SD 1.5 UNet paging (modelled compute)\n\n{m}")?;
            failures.extend(f);
            j
        }
        Err(e) => {
            writeln!(md, "\n## SD 1.5 UNet paging\n\nFAILED: {e}")?;
            failures.push(format!("unet: {e}"));
            json!({"error": e.to_string()})
        }
    };
    // Again, in case the real UNet does not finish.
    let partial = json!({
        "tool": "ferry-gpu-bench",
        "partial": "the real UNet part did not finish",
        "device": info,
        "h2d": bw.json,
        "overlap": ov_json,
        "unet": unet_json,
    });
    save(args, tag, &md, &partial)?;
    eprintln!("[4/4] real SD 1.5 UNet on CUDA ...");
    writeln!(
        md,
        "\n## Real SD 1.5 UNet on CUDA (GpuExecutor, fp16 kernels)\n"
    )?;
    let real_json = match &cuda {
        None => {
            writeln!(md, "skipped: needs CUDA")?;
            json!({"skipped": "needs CUDA"})
        }
        Some(cuda) => match real_unet(cuda, args) {
            Ok((j, m, f)) => {
                writeln!(md, "{m}")?;
                failures.extend(f);
                j
            }
            Err(e) => {
                writeln!(md, "FAILED: {e}")?;
                failures.push(format!("real unet: {e}"));
                json!({"error": e.to_string()})
            }
        },
    };
    let report = json!({
        "tool": "ferry-gpu-bench",
        "version": env!("CARGO_PKG_VERSION"),
        "unix_time": unix_time(),
        "device": info,
        "note": "unet: compute is modelled by busy kernels sized from FLOPs at an assumed \
                 throughput (paging only); real_unet: the real kernels through GpuExecutor (CUDA)",
        "h2d": bw.json,
        "overlap": ov_json,
        "unet": unet_json,
        "real_unet": real_json,
        "wall_s": started.elapsed().as_secs_f64(),
        "failures": failures,
    });
    print!("{md}");
    if let Some(dir) = save(args, tag, &md, &report)? {
        eprintln!("wrote {dir}/gpu-bench-{tag}.json and .md");
    }
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(failures)
}

/// Writes `gpu-bench-<tag>.json` and `.md` under `--out`, if given; returns the folder.
fn save(args: &Args, tag: &str, md: &str, report: &Value) -> BoxResult<Option<String>> {
    let Some(dir) = &args.out else {
        return Ok(None);
    };
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(format!("gpu-bench-{tag}.json")),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(dir.join(format!("gpu-bench-{tag}.md")), md)?;
    Ok(Some(dir.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diffusers 0.42.1 `UNet2DConditionModel(sample_size=64, cross_attention_dim=768,
    /// attention_head_dim=8)` (SD 1.5) has 686 parameter tensors, 859,520,964 values.
    #[test]
    fn groups_hold_every_sd15_weight_once() {
        let groups = unet_groups().unwrap();
        let tensors: usize = groups.iter().map(|g| g.tensors.len()).sum();
        let bytes: u64 = groups.iter().flat_map(|g| &g.tensors).map(|t| t.1).sum();
        assert_eq!(tensors, 686);
        assert_eq!(bytes, 2 * 859_520_964);
        assert_eq!(groups.len(), 96);
    }

    #[test]
    fn positions_follow_the_unet_resolutions() {
        let p = |s: &str| group_positions(s, 4);
        assert_eq!(p("conv_in"), 4096.0);
        assert_eq!(p("down_blocks.0.resnets.1"), 4096.0);
        assert_eq!(p("down_blocks.0.downsamplers.0"), 1024.0);
        assert_eq!(p("down_blocks.2.attentions.0.proj_in"), 256.0);
        assert_eq!(p("down_blocks.3.resnets.0"), 64.0);
        assert_eq!(p("mid_block.attentions.0.transformer_blocks.0"), 64.0);
        assert_eq!(p("up_blocks.0.resnets.2"), 64.0);
        assert_eq!(p("up_blocks.0.upsamplers.0"), 256.0);
        assert_eq!(p("up_blocks.3.attentions.2.proj_out"), 4096.0);
    }

    #[test]
    fn flops_count_products_and_attention() {
        // A 3×3 conv 320→320 at 64×64, batch 2.
        let conv = weight_flops("x.conv1.weight", &[320, 320, 3, 3], 4096.0);
        assert_eq!(conv, 2.0 * 320.0 * 320.0 * 9.0 * 4096.0 * 2.0);
        assert_eq!(weight_flops("x.conv1.bias", &[320], 4096.0), 0.0);
        assert_eq!(weight_flops("x.norm1.weight", &[320], 4096.0), 0.0);
        // Cross-attention keys read 77 context tokens, not the latent positions.
        let k = weight_flops("t.attn2.to_k.weight", &[320, 768], 4096.0);
        assert_eq!(k, 2.0 * 320.0 * 768.0 * 77.0 * 2.0);
        // Self-attention's query projection carries QKᵀ and PV.
        let q = weight_flops("t.attn1.to_q.weight", &[320, 320], 4096.0);
        let proj = 2.0 * 320.0 * 320.0 * 4096.0 * 2.0;
        assert_eq!(q - proj, 4.0 * 2.0 * 4096.0 * 4096.0 * 320.0);
    }

    #[test]
    fn real_weights_are_deterministic_and_bounded() {
        let shapes = vec![
            ("u.conv.weight".to_string(), vec![8, 4, 3, 3]),
            ("u.norm1.weight".to_string(), vec![8]),
            ("u.conv.bias".to_string(), vec![8]),
        ];
        let (data, ranges) = real_weights(&shapes).unwrap();
        assert_eq!(ranges, [(0, 576), (576, 16), (592, 16)]);
        assert_eq!(data, real_weights(&shapes).unwrap().0);
        let vals: Vec<f32> = data
            .chunks(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let (conv, rest) = vals.split_at(288);
        let (norm, bias) = rest.split_at(8);
        let bound = 1.0 / 36f32.sqrt() + 1e-3;
        assert!(conv.iter().all(|v| v.abs() <= bound));
        assert!(conv.iter().any(|v| v.abs() > bound / 2.0));
        assert!(norm.iter().all(|v| (v - 1.0).abs() <= 0.011));
        assert!(bias.iter().all(|v| v.abs() <= 0.021));
        assert!(bias.windows(2).any(|w| w[0] != w[1]));
    }

    /// The SD 1.5 UNet's depth and attention at a narrow width: the random weights keep its
    /// output finite and non-trivial (checked on the CPU), and the reserve recording runs.
    #[test]
    fn real_weights_keep_a_narrow_sd15_unet_finite() {
        use ferry_pager::device::sim::SimDevice;
        let mut cfg: Value = serde_json::from_str(SD15_UNET_CONFIG).unwrap();
        cfg["block_out_channels"] = json!([32, 64, 64, 64]);
        let unet =
            UNet2DConditionModel::new(UNetConfig::from_json(&cfg.to_string()).unwrap()).unwrap();
        let sim = SimDevice::new(SimConfig::default());
        let store = HostStore::new(sim.clone() as Arc<dyn Device>);
        let (n, _) = register_real_weights(&store, &unet).unwrap();
        assert_eq!(n, unet.weight_shapes().len());
        let components = vec![unet.groups()];
        let groups = GpuGroups::new(&store, &components, &[("unet", DType::F16)], 0.0).unwrap();
        let (sample, context) = ([2, 4, 16, 16], [2, 77, 768]);
        let peak = real_activation_peak(&unet, &groups, &sample, &context).unwrap();
        assert!(peak > 2 * (2 * 4 * 16 * 16 + 2 * 77 * 768), "{peak}");
        let exec = Executor::new(sim, &store, &components, ExecConfig::default()).unwrap();
        let x = real_input(&sample, 1).unwrap();
        let ctx = real_input(&context, 2).unwrap();
        let y = unet
            .forward(&exec, &x, &[REAL_TIMESTEP], &ctx, None)
            .unwrap();
        assert_eq!(y.shape(), sample);
        let max = y.data().iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(y.data().iter().all(|v| v.is_finite()), "not finite");
        assert!(max > 1e-3 && max < 1e3, "output |max| {max}");
    }

    #[test]
    fn expected_bytes_are_offset_consistent() {
        let all = expected(0, 4096);
        assert_eq!(&expected(256, 100)[..], &all[256..356]);
        // fp16 values with the top exponent bit clear: finite.
        let halves: Vec<u16> = all
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert!(halves.iter().all(|h| h & 0x4000 == 0));
        assert!(halves.iter().any(|&h| h != 0));
    }
}
