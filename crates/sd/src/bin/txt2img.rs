//! `txt2img`: generate images from text with SD 1.x, SD 2.x or SDXL, weights paged by Ferry.

use clap::error::ErrorKind;
use clap::Parser;
use ferry_pager::device::cuda::CudaDevice;
use ferry_pager::Device;
use ferry_sd::cli::{Args, DeviceSpec, Precision};
use ferry_sd::footprint::{self, ModelDims, Request, Target};
use ferry_sd::image::{to_rgb8, write_png};
use ferry_sd::loader::ModelSource;
use ferry_sd::npy;
use ferry_sd::output;
use ferry_sd::pipeline::{token_ids, DeviceChoice, GenerateParams, LoadConfig, Pipeline};
use ferry_sd::tensor::DType;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Any error the command reports; its `source()` chain is printed.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Keeps freed activation memory for reuse (see `ferry_sd::allocator`).
#[global_allocator]
static GLOBAL: ferry_sd::allocator::MiMalloc = ferry_sd::allocator::MiMalloc;

fn main() -> ExitCode {
    ferry_sd::allocator::keep_freed_memory();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => return clap_exit(e),
    };
    // Before anything runs an op (and before any thread is spawned: it may set an env var).
    if let Err(e) = ferry_sd::ops::set_threads(args.threads) {
        eprintln!("txt2img: warning: {e}");
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let causes = causes(e.as_ref());
            if args.verbose {
                let mut lines = causes.iter();
                if let Some(top) = lines.next() {
                    eprintln!("txt2img: error: {top}");
                }
                for c in lines {
                    eprintln!("  caused by: {c}");
                }
            } else {
                eprintln!("txt2img: error: {}", one_line(&causes));
            }
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout as clap prints them; a usage error becomes one line.
fn clap_exit(e: clap::Error) -> ExitCode {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        _ => {
            let text = e.to_string();
            // The message is everything before the first blank line (the usage hint follows).
            let msg: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let mut msg = msg.join(" ");
            // Keep clap's suggestion ("tip: a similar argument exists: '--steps'").
            for tip in text
                .lines()
                .map(str::trim)
                .filter(|l| l.starts_with("tip:"))
            {
                msg.push_str("; ");
                msg.push_str(tip);
            }
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprintln!("txt2img: error: {msg} (see --help)");
            ExitCode::from(2)
        }
    }
}

/// The messages of `e` and its `source()` chain, outermost first, without exact repeats.
fn causes(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let msg = err.to_string();
        if !msg.is_empty() && out.last() != Some(&msg) {
            out.push(msg);
        }
        cur = err.source();
    }
    out
}

/// The chain joined with ": ", leaving out a cause whose text its outer message already carries
/// (errors that format their source inline).
fn one_line(causes: &[String]) -> String {
    let mut line = String::new();
    for c in causes {
        if line.contains(c.as_str()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(c);
    }
    line
}

/// Where the compute runs: the pipeline's device choice.
fn choose_device(spec: &str) -> Result<DeviceChoice, BoxError> {
    let cuda_ordinal = match DeviceSpec::parse(spec)? {
        DeviceSpec::Cpu => return Ok(DeviceChoice::Cpu),
        DeviceSpec::Sim => return Ok(DeviceChoice::Sim),
        DeviceSpec::Auto => None,
        DeviceSpec::Cuda(n) => Some(n),
    };
    match cuda_ordinal {
        // auto: the first GPU when one is usable, else the CPU.
        None => Ok(match CudaDevice::new(0) {
            Ok(_) => DeviceChoice::Cuda(0),
            Err(_) => DeviceChoice::Cpu,
        }),
        Some(n) => match CudaDevice::new(n) {
            Err(e) => {
                Err(format!("--device {spec} asked for a GPU, but none is usable: {e}").into())
            }
            Ok(_) => Ok(DeviceChoice::Cuda(n)),
        },
    }
}

/// `OUT.png` for one image; `OUT-i.png` for a batch.
fn output_path(out: &Path, index: usize, batch: usize) -> PathBuf {
    if batch == 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    let ext = out.extension().and_then(|s| s.to_str()).unwrap_or("png");
    out.with_file_name(format!("{stem}-{index}.{ext}"))
}

fn print_tokens(args: &Args) -> Result<(), BoxError> {
    let ids = token_ids(&args.model, &args.prompt, args.negative_prompt.as_deref())?;
    let mut obj = serde_json::Map::new();
    for t in ids {
        obj.insert(
            t.component,
            serde_json::json!({"prompt": t.prompt, "negative_prompt": t.negative_prompt}),
        );
    }
    println!("{}", serde_json::Value::Object(obj));
    Ok(())
}

/// Everything `run` checks before any weight is read: output paths, the device, the initial
/// latents, and whether the machine has the memory the request needs.
struct Checked {
    device: DeviceChoice,
    dtype: DType,
    init_latents: Option<ferry_sd::tensor::Tensor>,
    estimate: footprint::Footprint,
}

fn preflight(args: &Args) -> Result<Checked, BoxError> {
    // Every file this run will write: its directory exists and takes new files.
    for i in 0..args.batch {
        output::check_writable(&output_path(&args.output, i, args.batch))?;
    }
    for p in [&args.save_latents, &args.trace].into_iter().flatten() {
        output::check_writable(p)?;
    }
    let init_latents = match &args.init_latents {
        Some(p) => Some(npy::read_f32(p)?),
        None => None,
    };
    let device = choose_device(&args.device)?;
    let dtype = match (device, args.dtype) {
        (DeviceChoice::Cpu, Some(p)) if p != Precision::F32 => {
            eprintln!(
                "txt2img: note: the CPU path computes in f32 (weights keep their stored dtype)"
            );
            DType::F32
        }
        (DeviceChoice::Cpu, _) | (_, Some(Precision::F32)) => DType::F32,
        (DeviceChoice::Cuda(_) | DeviceChoice::Sim, None | Some(Precision::F16)) => DType::F16,
        (DeviceChoice::Cuda(_) | DeviceChoice::Sim, Some(Precision::Bf16)) => DType::BF16,
    };

    // The model's configs and safetensors headers only: no weight bytes are read.
    let source = ModelSource::open(&args.model)?;
    let dims = ModelDims::of(&source)?;
    let (width, height) = (
        args.width.unwrap_or(dims.default_size.0),
        args.height.unwrap_or(dims.default_size.1),
    );
    if let Some(t) = &init_latents {
        let f = dims.vae_scale.max(1);
        let want = [args.batch, dims.latent_channels, height / f, width / f];
        if t.shape() != want {
            return Err(format!(
                "--init-latents: expected shape {want:?} for {width}×{height} (batch {}), found {:?}",
                args.batch,
                t.shape()
            )
            .into());
        }
    }
    let req = Request {
        width,
        height,
        batch: args.batch,
        cfg: args.guidance > 1.0,
        target: match device {
            DeviceChoice::Cpu => Target::Cpu,
            DeviceChoice::Cuda(_) | DeviceChoice::Sim => Target::Cuda {
                elem_bytes: dtype.size() as u64,
            },
        },
        budget: args.vram_budget,
    };
    let mut estimate = dims.estimate(&req);
    if device == DeviceChoice::Sim {
        // The simulated GPU's memory is host memory.
        estimate.host = estimate.host.saturating_add(estimate.device);
    }
    let device_free = match device {
        DeviceChoice::Cuda(n) => CudaDevice::new(n)
            .ok()
            .and_then(|d| d.mem_info().ok())
            .map(|m| m.free),
        DeviceChoice::Sim => Some(ferry_sd::pipeline::sim_capacity(args.vram_budget)),
        DeviceChoice::Cpu => None,
    };
    if let Some(msg) = footprint::check(&estimate, &req, footprint::host_available(), device_free) {
        return Err(msg.into());
    }
    Ok(Checked {
        device,
        dtype,
        init_latents,
        estimate,
    })
}

fn run(args: &Args) -> Result<(), BoxError> {
    if args.print_tokens {
        return print_tokens(args);
    }
    let Checked {
        device,
        dtype,
        init_latents,
        estimate,
    } = preflight(args)?;
    let metrics = args.stats || args.trace.is_some();
    // The driver's view of device memory, sampled around the run: everything Ferry allocates
    // (the arena = the budget) is allocated at load, so "used" at the end is the peak.
    let driver_probe = match device {
        DeviceChoice::Cuda(n) if args.stats => CudaDevice::new(n)
            .ok()
            .and_then(|d| d.mem_info().ok().map(|m| (d, m.free))),
        _ => None,
    };
    let pipe = Pipeline::load(
        &args.model,
        LoadConfig {
            mode: args.offload.map(|o| o.mode()),
            budget: args.vram_budget,
            // On the CPU path activations live in host memory: the simulated budget holds
            // weights. On CUDA the engine plans the reserve from the models (0 = no minimum).
            reserve: 0,
            metrics,
            device,
            dtype,
            host_budget: args.host_budget,
        },
    )?;
    for note in pipe.notes() {
        eprintln!("txt2img: {note}");
    }
    let params = GenerateParams {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        guidance: args.guidance,
        scheduler: args.scheduler.clone(),
        karras: args.karras,
        seed: args.seed,
        width: args.width,
        height: args.height,
        batch: args.batch,
        init_latents,
    };
    let bar = ProgressBar::new(args.steps as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps [{elapsed} < {eta}]")
    {
        bar.set_style(style);
    }
    let out = pipe.generate(&params, |step, total| {
        bar.set_length(total as u64);
        bar.set_position(step as u64);
    })?;
    bar.finish_and_clear();
    for w in &out.warnings {
        eprintln!("txt2img: warning: {w}");
    }

    if let Some(p) = &args.save_latents {
        npy::write_f32(p, &out.latents)?;
    }
    let (w, h) = out.size;
    // A1111's sampler names, so web UIs and image browsers read the parameters back.
    let sampler = pipe.scheduler_kind(args.scheduler.as_deref())?.a1111_name();
    for i in 0..args.batch {
        let mut parameters = args.prompt.clone();
        if let Some(n) = &args.negative_prompt {
            parameters.push_str(&format!("\nNegative prompt: {n}"));
        }
        parameters.push_str(&format!(
            "\nSteps: {}, Sampler: {}{}, CFG scale: {}, Seed: {}, Size: {}x{}, Batch index: {}, Model: {}",
            args.steps,
            sampler,
            if args.karras { " Karras" } else { "" },
            args.guidance,
            args.seed,
            w,
            h,
            i,
            args.model.display()
        ));
        let (pw, ph, rgb) = to_rgb8(&out.images, i)?;
        let path = output_path(&args.output, i, args.batch);
        write_png(&path, pw, ph, &rgb, &parameters)?;
        eprintln!("txt2img: wrote {}", path.display());
    }
    if metrics {
        let m = pipe.metrics()?;
        if args.stats {
            println!("{}", pipe.plan());
            if let Some(r) = pipe.executor().and_then(|e| e.tier_report()) {
                println!("{r}");
            }
            println!(
                "pinned host memory {:.1} MiB, device arena {:.1} MiB (the budget; never exceeded)",
                pipe.pinned_host_bytes() as f64 / (1 << 20) as f64,
                m.peak_device_bytes as f64 / (1 << 20) as f64
            );
            if device == DeviceChoice::Cpu {
                println!("simulated device timings (CPU path):\n{}", m.table());
            } else if device == DeviceChoice::Sim {
                println!(
                    "activation reserve {:.1} MiB (planned)\nsimulated GPU timings (virtual \
                     time; kernels interpreted, output emulated):\n{}",
                    pipe.reserve() as f64 / (1 << 20) as f64,
                    m.table()
                );
            } else {
                println!(
                    "activation reserve {:.1} MiB (planned)\nGPU timings:\n{}",
                    pipe.reserve() as f64 / (1 << 20) as f64,
                    m.table()
                );
                if let Some((d, free_before)) = &driver_probe {
                    if let Ok(now) = d.mem_info() {
                        println!(
                            "device memory in use by this run (driver, cuMemGetInfo): {:.1} MiB",
                            free_before.saturating_sub(now.free) as f64 / (1 << 20) as f64
                        );
                    }
                }
            }
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            match footprint::peak_rss() {
                Some(peak) => println!(
                    "host memory: estimated {:.1} MiB, peak resident set {:.1} MiB (VmHWM)",
                    mib(estimate.host),
                    mib(peak)
                ),
                None => println!("host memory: estimated {:.1} MiB", mib(estimate.host)),
            }
            if estimate.device > 0 {
                println!("device memory: estimated {:.1} MiB", mib(estimate.device));
            }
        }
        if let Some(t) = &args.trace {
            output::write_bytes(t, m.chrome_trace().as_bytes())?;
        }
    }
    // generate checks after its own passes; this covers the metrics and trace reads above.
    pipe.check_races()?;
    Ok(())
}
