//! `txt2img`: generate images from text with SD 1.x, SD 2.x or SDXL, weights paged by Ferry.

use clap::Parser;
use ferry_pager::device::cuda::CudaDevice;
use ferry_pager::Device;
use ferry_sd::cli::{check_dim, Args, Precision};
use ferry_sd::error::{Error, Result};
use ferry_sd::image::{to_rgb8, write_png};
use ferry_sd::npy;
use ferry_sd::pipeline::{token_ids, DeviceChoice, GenerateParams, LoadConfig, Pipeline};
use ferry_sd::tensor::DType;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("txt2img: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where the compute runs: the pipeline's device choice.
fn choose_device(spec: &str) -> Result<DeviceChoice> {
    let cuda_ordinal = match spec {
        "cpu" => return Ok(DeviceChoice::Cpu),
        "auto" => None,
        "cuda" => Some(0),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Some(n),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "--device must be auto, cpu, cuda or cuda:N, got '{spec}'"
                )))
            }
        },
    };
    match cuda_ordinal {
        // auto: the first GPU when one is usable, else the CPU.
        None => Ok(match CudaDevice::new(0) {
            Ok(_) => DeviceChoice::Cuda(0),
            Err(_) => DeviceChoice::Cpu,
        }),
        Some(n) => match CudaDevice::new(n) {
            Err(e) => Err(Error::InvalidArgument(format!(
                "--device {spec} asked for a GPU, but none is usable: {e}"
            ))),
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

fn print_tokens(args: &Args) -> Result<()> {
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

fn run(args: &Args) -> Result<()> {
    if args.print_tokens {
        return print_tokens(args);
    }
    let device = choose_device(&args.device)?;
    for (name, v) in [("width", args.width), ("height", args.height)] {
        if let Some(v) = v {
            check_dim(name, v)?;
        }
    }
    let dtype = match (device, args.dtype) {
        (DeviceChoice::Cpu, Some(p)) if p != Precision::F32 => {
            eprintln!(
                "txt2img: note: the CPU path computes in f32 (weights keep their stored dtype)"
            );
            DType::F32
        }
        (DeviceChoice::Cpu, _) | (_, Some(Precision::F32)) => DType::F32,
        (DeviceChoice::Cuda(_), None | Some(Precision::F16)) => DType::F16,
        (DeviceChoice::Cuda(_), Some(Precision::Bf16)) => DType::BF16,
    };
    let init_latents = match &args.init_latents {
        Some(p) => Some(npy::read_f32(p)?),
        None => None,
    };
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
        },
    )?;
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
    let sampler = args.scheduler.as_deref().unwrap_or("model default");
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
            println!(
                "pinned host memory {:.1} MiB, device arena {:.1} MiB (the budget; never exceeded)",
                pipe.pinned_host_bytes() as f64 / (1 << 20) as f64,
                m.peak_device_bytes as f64 / (1 << 20) as f64
            );
            if device == DeviceChoice::Cpu {
                println!("simulated device timings (CPU path):\n{}", m.table());
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
        }
        if let Some(t) = &args.trace {
            std::fs::write(t, m.chrome_trace())
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", t.display())))?;
        }
    }
    let races = pipe.races();
    if !races.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "the simulated device reported {} data race(s); first: {}",
            races.len(),
            races[0]
        )));
    }
    Ok(())
}
