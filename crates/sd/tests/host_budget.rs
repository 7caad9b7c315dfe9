//! `--host-budget` on the CPU path: groups that do not fit the host budget stay in their
//! safetensors files and are streamed through the disk tier. Outputs are bit-identical to the
//! all-in-RAM run, `--stats` reports the placement and how each file is read (with the reason
//! when `O_DIRECT` was refused: the fixtures may live on a filesystem that refuses it), the
//! pinned weights never exceed the budget, and a budget too small for the staging ring is a
//! one-line error naming both sizes.

mod common;

use common::fixture;
use ferry_pager::disk::ReadMode;
use ferry_sched::Tier;
use ferry_sd::pipeline::{DeviceChoice, GenerateParams, LoadConfig, Pipeline};
use std::path::Path;
use std::process::{Command, Output};

fn txt2img(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_txt2img"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs txt2img on sd15 for 2 steps, writing `name.png` and `name.npy` in `dir`; returns stdout
/// (the `--stats` report) and the two files' bytes.
fn run(dir: &Path, name: &str, extra: &[&str]) -> (String, Vec<u8>, Vec<u8>) {
    let model = fixture("sd15");
    let png = dir.join(format!("{name}.png"));
    let npy = dir.join(format!("{name}.npy"));
    let mut args = vec![
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--prompt",
        "a red cube",
        "--steps",
        "2",
        "--seed",
        "7",
        "--stats",
        "-o",
        png.to_str().unwrap(),
        "--save-latents",
        npy.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = txt2img(&args);
    assert!(
        o.status.success(),
        "txt2img {extra:?} failed: {}",
        stderr(&o)
    );
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        std::fs::read(&png).unwrap(),
        std::fs::read(&npy).unwrap(),
    )
}

/// The number after `label` and before `what` in `line` (e.g. `disk 4 groups`).
fn number_after(line: &str, label: &str) -> u64 {
    let rest = &line[line
        .find(label)
        .unwrap_or_else(|| panic!("no '{label}' in {line}"))
        + label.len()..];
    rest.split_whitespace()
        .next()
        .and_then(|w| w.trim_end_matches([',', ';']).parse().ok())
        .unwrap_or_else(|| panic!("no number after '{label}' in {line}"))
}

#[test]
fn host_budget_output_is_bit_identical_and_stats_report_disk_placement() {
    let dir = tempfile::tempdir().unwrap();
    let (base_stats, base_png, base_npy) = run(dir.path(), "base", &[]);
    assert!(
        !base_stats.contains("placement:"),
        "no tiers without --host-budget"
    );
    // 600 KiB, 1 MiB device budget: the UNet pinned, the text encoder and VAE (used once) on
    // disk. 400 KiB, smaller device budget: nearly everything on disk, the UNet streamed. 600 KiB
    // alone: everything resident in (simulated) VRAM, read from the files once at load.
    for (budget, bytes, extra, on_disk) in [
        ("600KiB", 600u64 << 10, &["--vram-budget", "1MiB"][..], true),
        ("400KiB", 400 << 10, &["--vram-budget", "820KiB"][..], true),
        ("600KiB", 600 << 10, &[][..], false),
    ] {
        let mut args = vec!["--host-budget", budget];
        args.extend_from_slice(extra);
        let (stats, png, npy) = run(dir.path(), budget, &args);
        assert!(
            npy == base_npy,
            "{budget}: latents differ from the all-in-RAM run"
        );
        assert!(
            png == base_png,
            "{budget}: PNG differs from the all-in-RAM run"
        );
        let place = stats
            .lines()
            .find(|l| l.starts_with("placement:"))
            .unwrap_or_else(|| panic!("{budget}: no placement line in {stats}"));
        let disk_groups = number_after(place, "disk ");
        let ram_bytes = number_after(&place[place.find(", ram ").unwrap()..], "groups ");
        assert_eq!(disk_groups > 0, on_disk, "{budget} {extra:?}: {place}");
        assert!(
            ram_bytes <= bytes,
            "{budget}: pinned {ram_bytes} > budget: {place}"
        );
        assert!(place.contains("disk bytes per step"), "{place}");
        let tiers = stats.lines().find(|l| l.starts_with("tiers:")).unwrap();
        assert!(tiers.contains("disk staging"), "{tiers}");
        let files: Vec<&str> = stats
            .lines()
            .filter(|l| l.starts_with("disk file "))
            .collect();
        assert!(
            !files.is_empty(),
            "{budget}: no disk file reported: {stats}"
        );
        for f in files {
            // Either O_DIRECT, or buffered with the reason it was refused.
            assert!(
                f.contains(": O_DIRECT;") || f.contains(": buffered (O_DIRECT refused: "),
                "{f}"
            );
            assert!(number_after(f, "; read ") > 0, "nothing read: {f}");
        }
    }
}

#[test]
fn too_small_host_budget_is_a_one_line_error_naming_both_sizes() {
    let model = fixture("sd15");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never-written.png");
    let o = txt2img(&[
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--steps",
        "1",
        "--host-budget",
        "100KiB",
        "-o",
        out.to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert!(!o.status.success(), "expected failure: {e}");
    assert!(!e.contains("panicked"), "{e}");
    let lines: Vec<&str> = e.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "more than one line: {e}");
    assert!(!out.exists(), "no image is written");
    assert!(lines[0].starts_with("txt2img: error:"), "{e}");
    assert!(
        lines[0].contains("expected at least") && lines[0].contains("found 102400"),
        "{e}"
    );
    assert!(
        txt2img(&["--model", "m", "--host-budget", "lots"])
            .status
            .code()
            == Some(2),
        "a bad size is a usage error"
    );
}

/// The Pipeline API on the hub-layout fixture: same latents with and without a host budget, the
/// pinned weights plus the staging within the budget, and the disk tiers' read mode explained.
#[test]
fn pipeline_api_host_budget_sd15_hub() {
    let params = GenerateParams {
        prompt: "a red cube".into(),
        steps: 2,
        seed: 3,
        ..GenerateParams::default()
    };
    let model = fixture("sd15_hub");
    let base = Pipeline::load(&model, LoadConfig::default()).unwrap();
    let want = base.generate(&params, |_, _| {}).unwrap();
    assert!(base.executor().unwrap().tier_plan().is_none());
    for budget in [450u64 << 10, 700 << 10, 64 << 20] {
        let pipe = Pipeline::load(
            &model,
            LoadConfig {
                host_budget: Some(budget),
                // A device budget below the weights: groups are streamed (not all resident).
                budget: Some(820 << 10),
                reserve: 0,
                ..LoadConfig::default()
            },
        )
        .unwrap_or_else(|e| panic!("host budget {budget}: {e}"));
        let out = pipe.generate(&params, |_, _| {}).unwrap();
        let (a, b) = (want.latents.data(), out.latents.data());
        assert_eq!(a.len(), b.len());
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "host budget {budget}: latents differ"
        );
        let exec = pipe.executor().unwrap();
        let plan = exec.tier_plan().unwrap();
        assert!(plan.host_bytes() <= budget, "{plan}");
        assert!(
            pipe.pinned_host_bytes() + plan.staging_bytes <= budget,
            "{plan}"
        );
        let files = exec.disk_files();
        if budget == 64 << 20 {
            // Everything fits: all pinned, no disk tier.
            assert_eq!(plan.count(Tier::Disk), 0, "{plan}");
            assert_eq!(plan.staging_bytes, 0);
            assert!(files.is_empty());
        } else {
            assert!(plan.count(Tier::Disk) > 0, "{plan}");
            assert!(!files.is_empty());
            for f in &files {
                assert!(f.stats.read_bytes > 0, "{}", f.path.display());
                assert_eq!(f.mode == ReadMode::Buffered, f.fallback_reason.is_some());
            }
        }
    }
}

#[test]
fn host_budget_is_refused_on_cuda() {
    let e = Pipeline::load(
        &fixture("sd15"),
        LoadConfig {
            device: DeviceChoice::Cuda(0),
            host_budget: Some(1 << 30),
            ..LoadConfig::default()
        },
    )
    .err()
    .expect("host budget on CUDA must be refused");
    assert!(
        e.to_string().contains("not yet supported on this device"),
        "{e}"
    );
}

/// Single-file checkpoints rename keys and slice fused tensors: those tensors are still streamed
/// from the file; only tensors stored transposed (SDXL's text projection) must be pinned.
#[test]
fn single_file_checkpoints_stream_from_the_file() {
    let params = GenerateParams {
        prompt: "a red cube".into(),
        steps: 2,
        seed: 5,
        // The fixtures' size (a single file carries no UNet config: its default would be 512).
        width: Some(32),
        height: Some(32),
        ..GenerateParams::default()
    };
    let model = fixture("sd15.single.safetensors");
    let want = Pipeline::load(&model, LoadConfig::default())
        .unwrap()
        .generate(&params, |_, _| {})
        .unwrap();
    let pipe = Pipeline::load(
        &model,
        LoadConfig {
            host_budget: Some(400 << 10),
            budget: Some(1 << 20),
            reserve: 0,
            ..LoadConfig::default()
        },
    )
    .unwrap();
    let out = pipe.generate(&params, |_, _| {}).unwrap();
    assert!(
        want.latents
            .data()
            .iter()
            .zip(out.latents.data())
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "latents differ"
    );
    let exec = pipe.executor().unwrap();
    let plan = exec.tier_plan().unwrap();
    assert!(plan.count(Tier::Disk) > 0, "{plan}");
    assert!(plan.host_bytes() <= 400 << 10, "{plan}");
    let files = exec.disk_files();
    assert_eq!(files.len(), 1, "one file, one tier");
    assert!(files[0].stats.read_bytes > 0);

    // SDXL's transposed text projection must be pinned: the budget must cover it too.
    let e = Pipeline::load(
        &fixture("sdxl.single.safetensors"),
        LoadConfig {
            host_budget: Some(100 << 10),
            budget: Some(2 << 20),
            reserve: 0,
            ..LoadConfig::default()
        },
    )
    .err()
    .expect("100 KiB cannot hold the staging");
    let msg = e.to_string();
    assert!(
        msg.contains("weights that must be pinned 512") && msg.contains("found 102400"),
        "{msg}"
    );
    assert_eq!(msg.lines().count(), 1, "{msg}");
}
