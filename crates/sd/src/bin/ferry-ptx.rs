//! `ferry-ptx`: run one kernel of a PTX file on the PTX interpreter, with `.npy` inputs and
//! outputs, and report what the sanitizer finds.

use clap::error::ErrorKind;
use clap::Parser;
use ferry_pager::device::sim::ptx::{LaunchConfig, Limits};
use ferry_sd::ptx_runner::{self, Arg, Job};
use std::path::PathBuf;
use std::process::ExitCode;

/// Run a PTX kernel on Ferry's PTX interpreter with sanitizer checks.
///
/// Each ARG, in the kernel's parameter order, is one of: `in:FILE.npy` (a buffer holding the
/// array's raw data bytes), `out:NAME:DTYPE:COUNT` (a buffer of COUNT elements, poisoned with
/// 0xFF bytes, written to DIR/NAME.npy after the launch; DTYPE one of f32 f64 f16 bf16 u8 u16
/// u32 u64 i32 i64, bf16 written as `<u2`), `u32:V`, `i32:V`, `u64:V`, `f32:V`, `f64:V`.
#[derive(Parser, Debug)]
#[command(name = "ferry-ptx", version)]
struct Cli {
    /// The PTX file.
    #[arg(long, value_name = "FILE.ptx")]
    ptx: PathBuf,
    /// Kernel entry to launch.
    #[arg(long, value_name = "NAME")]
    kernel: String,
    /// Blocks in the grid: X[,Y[,Z]].
    #[arg(long, value_name = "X[,Y[,Z]]")]
    grid: String,
    /// Threads per block: X[,Y[,Z]].
    #[arg(long, value_name = "X[,Y[,Z]]")]
    block: String,
    /// Bytes of dynamic shared memory.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    shared: u32,
    /// Directory the outputs are written to.
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
    /// Kernel arguments, in parameter order.
    #[arg(value_name = "ARG", allow_hyphen_values = true)]
    args: Vec<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return clap_exit(e),
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("ferry-ptx: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let grid = ptx_runner::parse_dims(&cli.grid).map_err(|e| format!("--grid: {e}"))?;
    let block = ptx_runner::parse_dims(&cli.block).map_err(|e| format!("--block: {e}"))?;
    let args = cli
        .args
        .iter()
        .map(|a| Arg::parse(a))
        .collect::<Result<Vec<_>, _>>()?;
    let job = Job {
        ptx: cli.ptx.clone(),
        kernel: cli.kernel.clone(),
        config: LaunchConfig {
            grid,
            block,
            dynamic_shared: cli.shared,
        },
        out_dir: cli.out.clone(),
        args,
    };
    let done = ptx_runner::run(&job, Limits::default())?;
    let r = &done.report;
    println!(
        "ferry-ptx: {}: completed, {} blocks x {} threads, {} instructions, {} shared bytes",
        job.kernel, r.blocks, r.threads_per_block, r.instructions, r.shared_bytes
    );
    for p in &done.written {
        println!("ferry-ptx: wrote {}", p.display());
    }
    Ok(())
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
            let msg: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let msg = msg.join(" ");
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprintln!("ferry-ptx: error: {msg} (see --help)");
            ExitCode::from(2)
        }
    }
}
