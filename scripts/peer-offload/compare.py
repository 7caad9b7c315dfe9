#!/usr/bin/env python3
"""Ferry against diffusers' own offloading on one pipeline, one process per run.

Runs the same diffusers pipeline (same prompt, seed, steps, size) with:

  none        everything on the device (the reference output)
  model       pipe.enable_model_cpu_offload()           (CUDA only)
  sequential  pipe.enable_sequential_cpu_offload()      (CUDA only)
  group_leaf  pipe.enable_group_offload(offload_type="leaf_level", use_stream=True)  (CUDA only)
  ferry       ferry.torch.offload(pipe, budget=...)     (Ferry's simulated device on the CPU;
              its CUDA path is not built yet and is reported as unsupported)

and reports, per run: seconds per denoising step (median of the step intervals), wall time,
peak device memory (torch.cuda.max_memory_allocated, and device-wide use from cuMemGetInfo via
torch.cuda.mem_get_info at the end), peak host RSS, and the largest difference of the image
from the `none` run. Writes results.json and results.md into --out.

Without a GPU (`--device cpu`, the default when CUDA is unavailable) it is a smoke run: `none`
and `ferry` run, the CUDA-only modes are listed as skipped.

  python scripts/peer-offload/compare.py --model tests/fixtures/models/sd15 --steps 2 --size 64
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

MODES = ["none", "model", "sequential", "group_leaf", "ferry"]
CUDA_ONLY = {"model", "sequential", "group_leaf"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="a diffusers pipeline folder")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--budget", type=float, default=0.6,
                   help="Ferry's device budget: a fraction of the weight bytes (<= 1) or bytes")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=512, help="image height and width")
    p.add_argument("--prompt", default="a lighthouse on a cliff at dusk")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default="peer-offload-results")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def weight_bytes(pipe, torch):
    seen, total = set(), 0
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            for t in list(m.parameters()) + list(m.buffers()):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


def worker(args):
    """One run in this process; prints one JSON line."""
    import numpy as np
    import torch
    import diffusers
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    dlogging.set_verbosity_error()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    pipe = diffusers.DiffusionPipeline.from_pretrained(args.model, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    weights = weight_bytes(pipe, torch)
    budget = int(args.budget * weights) if args.budget <= 1 else int(args.budget)
    mode = args.worker
    handle = None
    if mode == "none":
        pipe.to("cuda" if cuda else "cpu")
    elif mode == "model":
        pipe.enable_model_cpu_offload()
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload()
    elif mode == "group_leaf":
        pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_type="leaf_level",
                                  use_stream=True)
    elif mode == "ferry":
        import ferry.torch as ft

        handle = ft.offload(pipe, budget=budget, device="cuda" if cuda else None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stamps = []

    def on_step(_pipe, _i, _t, kwargs):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return kwargs

    t0 = time.perf_counter()
    with torch.inference_mode():
        image = pipe(args.prompt, num_inference_steps=args.steps, height=args.size,
                     width=args.size, generator=torch.Generator().manual_seed(0),
                     output_type="np", callback_on_step_end=on_step).images
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    out = pathlib.Path(args.out)
    np.save(out / f"image-{mode}.npy", image)
    result = {
        "mode": mode,
        "status": "ok",
        "s_per_step": statistics.median(intervals) if intervals else wall,
        "wall_s": wall,
        "weight_bytes": weights,
        "budget_bytes": budget if mode == "ferry" else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_vram_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "device_used_bytes": (lambda f, t: t - f)(*torch.cuda.mem_get_info()) if cuda else None,
    }
    if handle is not None:
        (out / "ferry-metrics.txt").write_text(handle.metrics())
    print(json.dumps(result))


def run_one(args, mode):
    """Runs `mode` in a child process; returns its result dict."""
    cmd = [sys.executable, __file__, "--worker", mode, "--model", args.model, "--device",
           args.device, "--budget", str(args.budget), "--steps", str(args.steps), "--size",
           str(args.size), "--prompt", args.prompt, "--threads", str(args.threads), "--out",
           args.out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        status = "unsupported" if "UnsupportedError" in proc.stderr else "failed"
        return {"mode": mode, "status": status, "error": err}
    return json.loads(lines[-1])


def fmt_bytes(b):
    return "-" if b is None else f"{b / 2**30:.2f} GiB"


def table(results, args):
    rows = [f"Pipeline `{args.model}`, device {args.device}, {args.steps} steps, "
            f"{args.size}x{args.size}, Ferry budget {args.budget}.", "",
            "| mode | status | s/step | wall s | peak VRAM | device used | peak RSS | max diff vs none |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if r["status"] != "ok":
            rows.append(f"| {r['mode']} | {r['status']}: {r.get('error', '')} | | | | | | |")
            continue
        diff = r.get("max_diff_vs_none")
        rows.append(
            f"| {r['mode']} | ok | {r['s_per_step']:.3f} | {r['wall_s']:.2f} | "
            f"{fmt_bytes(r['peak_vram_bytes'])} | {fmt_bytes(r['device_used_bytes'])} | "
            f"{fmt_bytes(r['peak_rss_bytes'])} | {'-' if diff is None else f'{diff:.3g}'} |")
    return "\n".join(rows) + "\n"


def main(argv):
    args = parse_args(argv)
    if args.device is None:
        try:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            args.device = "cpu"
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    import numpy as np

    results = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            sys.exit(f"--modes: expected some of {MODES}, found {mode!r}")
        if mode in CUDA_ONLY and args.device != "cuda":
            results.append({"mode": mode, "status": "skipped", "error": "needs a CUDA device"})
            continue
        r = run_one(args, mode)
        results.append(r)
        print(json.dumps(r), flush=True)
    ref_path = out / "image-none.npy"
    if ref_path.exists():
        ref = np.load(ref_path)
        for r in results:
            img = out / f"image-{r['mode']}.npy"
            if r["status"] == "ok" and img.exists():
                r["max_diff_vs_none"] = float(np.abs(np.load(img).astype(np.float64) - ref).max())
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"device": args.device, "results": results}, indent=2))
    os.replace(tmp, out / "results.json")
    md = table(results, args)
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
