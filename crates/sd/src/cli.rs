//! The `txt2img` command line: arguments, and the parsing of values such as VRAM sizes.

use crate::error::{Error, Result};
use clap::{Parser, ValueEnum};
use std::path::PathBuf;

/// Generate images from text with Stable Diffusion 1.x, 2.x or SDXL, on a GPU smaller than the
/// model (weights paged by Ferry), on the CPU, or on an emulated GPU.
#[derive(Parser, Debug, Clone)]
#[command(name = "txt2img", version, about)]
pub struct Args {
    /// Model: a diffusers folder (with model_index.json) or a single-file .safetensors checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// The negative prompt (omitted: diffusers' negative_prompt=None).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Denoising steps (1 to 1000).
    #[arg(long, default_value_t = 30, value_parser = parse_steps)]
    pub steps: usize,
    /// Classifier-free guidance scale (a finite number; 1 or less turns guidance off).
    #[arg(long, default_value_t = 7.5, value_parser = parse_guidance, allow_negative_numbers = true)]
    pub guidance: f32,
    /// Scheduler: ddim, pndm, euler, euler-a, dpmpp-2m (default: the model's own).
    #[arg(long, value_parser = parse_scheduler)]
    pub scheduler: Option<String>,
    /// Karras sigmas (euler, dpmpp-2m).
    #[arg(long)]
    pub karras: bool,
    /// Seed for the initial latents (torch.manual_seed semantics on a CPU generator).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image width in pixels (a multiple of 8 up to 16384; default: the model's sample size).
    #[arg(long, value_parser = parse_dim)]
    pub width: Option<usize>,
    /// Image height in pixels (a multiple of 8 up to 16384; default: the model's sample size).
    #[arg(long, value_parser = parse_dim)]
    pub height: Option<usize>,
    /// Images per prompt (1 to 64).
    #[arg(long, default_value_t = 1, value_parser = parse_batch)]
    pub batch: usize,
    /// auto, cpu, cuda, cuda:N or sim. sim runs the whole GPU path (GPU executor, planned
    /// activation reserve, weights paged by the scheduler, the CUDA kernels) on a simulated GPU
    /// that interprets the kernels' PTX: the output is emulated, and very slow beyond tiny
    /// models. Its memory is --vram-budget (default 8 GiB).
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: String,
    /// Compute precision (default: f16 on CUDA and sim; the CPU path computes in f32).
    #[arg(long, value_enum)]
    pub dtype: Option<Precision>,
    /// Offload mode (default: none when the model fits the budget, auto otherwise).
    #[arg(long, value_enum)]
    pub offload: Option<Offload>,
    /// Device memory budget, e.g. 4GiB, 512MiB, 1.5GB or a byte count.
    #[arg(long, value_parser = parse_size)]
    pub vram_budget: Option<u64>,
    /// Host memory for the weights (pinned copies plus disk staging), e.g. 8GiB; groups that do
    /// not fit stay in the safetensors files and are streamed from disk (CPU path only).
    #[arg(long, value_parser = parse_size)]
    pub host_budget: Option<u64>,
    /// Initial latents (float32 .npy, [batch, 4, H/8, W/8]) instead of seeded noise.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Save the final denoised latents (before VAE scaling) as float32 .npy.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Write a Chrome trace of copies and compute.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Print the paging summary.
    #[arg(long)]
    pub stats: bool,
    /// Print the padded token ids as JSON and exit.
    #[arg(long)]
    pub print_tokens: bool,
    /// CPU threads for the ops, GEMMs included (0 or omitted: all cores). Results do not depend
    /// on it. MATMUL_NUM_THREADS, if set, still sets the GEMMs' count.
    #[arg(long, default_value_t = 0, value_parser = parse_threads)]
    pub threads: usize,
    /// On error, print each cause on its own line (by default: one line).
    #[arg(short, long)]
    pub verbose: bool,
    /// Output PNG (with --batch N > 1: OUT-0.png ... OUT-(N-1).png).
    #[arg(short = 'o', long = "output", default_value = "out.png")]
    pub output: PathBuf,
}

/// Compute precision.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
}

/// Offload mode names on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offload {
    /// Everything resident.
    None,
    /// Whole components swapped (diffusers' model CPU offload).
    Model,
    /// Every layer copied on demand, synchronously (accelerate's sequential offload).
    Sequential,
    /// Every block streamed with fixed prefetch.
    Group,
    /// Planned residency + prefetch.
    Auto,
}

impl Offload {
    /// The scheduler mode.
    pub fn mode(self) -> ferry_sched::Mode {
        match self {
            Offload::None => ferry_sched::Mode::None,
            Offload::Model => ferry_sched::Mode::Model,
            Offload::Sequential => ferry_sched::Mode::Sequential,
            Offload::Group => ferry_sched::Mode::Group { depth: 2 },
            Offload::Auto => ferry_sched::Mode::Auto,
        }
    }
}

/// Parses a byte size: a plain count, or a number with a unit (B, KB, MB, GB, TB in powers of
/// 1000; KiB, MiB, GiB, TiB in powers of 1024; case-insensitive; fractions allowed).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("'{s}' is not a size: expected e.g. 4GiB, 512MiB, 1.5GB or a byte count")
    })?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        other => {
            return Err(format!(
                "unknown size unit '{other}' in '{s}': use B, KB, MB, GB, KiB, MiB or GiB"
            ))
        }
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("'{s}' is not a usable size"));
    }
    Ok(bytes.round() as u64)
}

/// The largest `--width` / `--height` accepted.
pub const MAX_DIM: usize = 16384;
/// The largest `--batch` accepted.
pub const MAX_BATCH: usize = 64;
/// The largest `--steps` accepted (the schedulers' training timesteps).
pub const MAX_STEPS: usize = 1000;

fn parse_count(s: &str, max: usize) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))?;
    if v == 0 || v > max {
        return Err(format!("must be between 1 and {max}, got {v}"));
    }
    Ok(v)
}

/// Parses `--steps`: a whole number from 1 to [`MAX_STEPS`].
pub fn parse_steps(s: &str) -> Result<usize, String> {
    parse_count(s, MAX_STEPS)
}

/// Parses `--batch`: a whole number from 1 to [`MAX_BATCH`].
pub fn parse_batch(s: &str) -> Result<usize, String> {
    parse_count(s, MAX_BATCH)
}

/// The most `--threads` accepted.
pub const MAX_THREADS: usize = 4096;

/// Parses `--threads`: 0 (all cores) up to [`MAX_THREADS`].
pub fn parse_threads(s: &str) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number of threads"))?;
    if v > MAX_THREADS {
        return Err(format!("must be at most {MAX_THREADS}, got {v}"));
    }
    Ok(v)
}

/// Parses `--width` / `--height`: a positive multiple of 8 up to [`MAX_DIM`].
pub fn parse_dim(s: &str) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number of pixels"))?;
    check_dim_value(v)?;
    Ok(v)
}

fn check_dim_value(v: usize) -> Result<(), String> {
    if v == 0 || !v.is_multiple_of(8) || v > MAX_DIM {
        return Err(format!(
            "must be a positive multiple of 8 up to {MAX_DIM}, got {v}"
        ));
    }
    Ok(())
}

/// Parses `--guidance`: a finite number (NaN and infinities are rejected).
pub fn parse_guidance(s: &str) -> Result<f32, String> {
    let v: f32 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number"))?;
    if !v.is_finite() {
        return Err(format!("must be a finite number, got {s}"));
    }
    Ok(v)
}

/// Parses `--scheduler`: one of the names (or aliases) the schedulers accept; returns the
/// canonical name (e.g. `DPMSolverMultistepScheduler` becomes `dpmpp-2m`).
pub fn parse_scheduler(s: &str) -> Result<String, String> {
    crate::schedulers::SchedulerKind::from_name(s)
        .map(|k| k.cli_name().to_string())
        .map_err(|e| e.to_string())
}

/// A parsed `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The first GPU when one is usable, else the CPU.
    Auto,
    /// The CPU path.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
    /// The GPU path on the simulated GPU (kernels interpreted: emulated output).
    Sim,
}

impl DeviceSpec {
    /// Parses `auto`, `cpu`, `cuda` (device 0), `cuda:N` or `sim`.
    pub fn parse(s: &str) -> Result<DeviceSpec, String> {
        let bad = || format!("'{s}' is not a device: expected auto, cpu, cuda, cuda:N or sim");
        Ok(match s.trim() {
            "auto" => DeviceSpec::Auto,
            "cpu" => DeviceSpec::Cpu,
            "sim" => DeviceSpec::Sim,
            "cuda" => DeviceSpec::Cuda(0),
            t => match t.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                    DeviceSpec::Cuda(n.parse().map_err(|_| bad())?)
                }
                _ => return Err(bad()),
            },
        })
    }
}

/// Validates `--device` (see [`DeviceSpec::parse`]), keeping the text.
pub fn parse_device(s: &str) -> Result<String, String> {
    DeviceSpec::parse(s).map(|_| s.trim().to_string())
}

/// Checks an image dimension: a positive multiple of 8 up to [`MAX_DIM`].
pub fn check_dim(name: &str, v: usize) -> Result<()> {
    check_dim_value(v).map_err(|e| Error::InvalidArgument(format!("--{name} {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_parse() {
        assert_eq!(parse_threads("0").unwrap(), 0);
        assert_eq!(parse_threads(" 2 ").unwrap(), 2);
        assert!(parse_threads("-1").is_err());
        assert!(parse_threads("two").unwrap_err().contains("whole number"));
        assert!(parse_threads("5000").unwrap_err().contains("at most"));
        let a = Args::try_parse_from(["txt2img", "--model", "m", "--threads", "1"]).unwrap();
        assert_eq!(a.threads, 1);
        let a = Args::try_parse_from(["txt2img", "--model", "m"]).unwrap();
        assert_eq!(a.threads, 0);
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("123456").unwrap(), 123_456);
        assert_eq!(parse_size(" 2 gib ").unwrap(), 2 << 30);
        assert!(parse_size("4 parsecs")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn args_follow_the_contract() {
        let a = Args::try_parse_from([
            "txt2img",
            "--model",
            "m",
            "--prompt",
            "a cat",
            "--steps",
            "4",
            "--vram-budget",
            "512MiB",
            "--offload",
            "auto",
            "--batch",
            "2",
            "-o",
            "x.png",
            "--karras",
        ])
        .unwrap();
        assert_eq!(a.steps, 4);
        assert_eq!(a.vram_budget, Some(512 << 20));
        assert_eq!(a.offload, Some(Offload::Auto));
        assert!(a.karras && a.negative_prompt.is_none());
        assert!(
            Args::try_parse_from(["txt2img", "--model", "m", "--vram-budget", "lots"]).is_err()
        );
        assert!(check_dim("width", 100).is_err() && check_dim("width", 512).is_ok());
    }

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut v = vec!["txt2img", "--model", "m"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v)
    }

    #[test]
    fn out_of_range_values_are_rejected_by_the_parser() {
        for bad in [
            &["--guidance", "nan"][..],
            &["--guidance", "inf"],
            &["--guidance=-inf"],
            &["--guidance", "NaN"],
            &["--steps", "0"],
            &["--steps", "1001"],
            &["--steps=-1"],
            &["--batch", "0"],
            &["--batch", "100000"],
            &["--width", "65536"],
            &["--height", "100"],
            &["--width", "0"],
            &["--scheduler", "nosuch"],
            &["--device", "cuda:x"],
            &["--device", "cuda:"],
            &["--device", "gpu"],
        ] {
            let e = parse(bad).expect_err(&format!("{bad:?} accepted"));
            let msg = e.to_string();
            let flag = bad[0].split('=').next().unwrap_or_default();
            assert!(msg.contains(flag), "{bad:?}: {msg}");
        }
        let a = parse(&[
            "--guidance",
            "-1.5",
            "--steps",
            "1000",
            "--batch",
            "64",
            "--width",
            "16384",
            "--scheduler",
            "DPMSolverMultistepScheduler",
            "--device",
            "cuda:1",
        ])
        .unwrap();
        assert_eq!(a.guidance, -1.5);
        assert_eq!((a.steps, a.batch, a.width), (1000, 64, Some(16384)));
        assert_eq!(a.scheduler.as_deref(), Some("dpmpp-2m"));
        assert_eq!(DeviceSpec::parse(&a.device), Ok(DeviceSpec::Cuda(1)));
        assert_eq!(DeviceSpec::parse("auto"), Ok(DeviceSpec::Auto));
        assert_eq!(DeviceSpec::parse("cuda"), Ok(DeviceSpec::Cuda(0)));
        assert_eq!(DeviceSpec::parse(" sim "), Ok(DeviceSpec::Sim));
        assert!(DeviceSpec::parse("sim:0").is_err());
        assert!(parse(&["--scheduler", "euler_a"]).is_ok());
    }
}
