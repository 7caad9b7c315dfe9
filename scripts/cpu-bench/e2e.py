#!/usr/bin/env python3
"""End to end on the CPU: `txt2img --device cpu` against diffusers' StableDiffusionPipeline.

    /work/venv/bin/python scripts/cpu-bench/e2e.py [--threads N] [--steps 4] [--size 512]

1. Builds (once) a full-size SD 1.5-shaped diffusers folder with random weights from the real
   SD 1.5 configs (UNet, VAE, CLIP ViT-L/14 text encoder; PNDM scheduler; the real CLIP tokenizer
   copied from tests/fixtures/models/sd15), saved with save_pretrained in fp16 (--dtype) under
   target/cpu-bench/ (never committed; --model-dir to choose).
2. Builds txt2img (release) unless --no-build.
3. Runs `txt2img --device cpu` and the diffusers pipeline (fp32, torch.set_num_threads(N)) on that
   folder with the same prompt, seed, steps, guidance and size, each under `/usr/bin/time -v`,
   one after the other, and prints the wall time and peak RSS of each, the ratios, and the largest
   pixel difference between the two images.

Ferry's threads: `txt2img --threads N` (and MATMUL_NUM_THREADS=N) for every op.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "models", "sd15")

# runwayml/stable-diffusion-v1-5 unet/config.json and vae/config.json (the same as in the benches).
UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# openai/clip-vit-large-patch14's text model, as in SD 1.5's text_encoder/config.json.
TEXT_CONFIG = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}


def build_model(d, dtype):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tmp = d + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.manual_seed(0)
    dt = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    t0 = time.time()
    for sub, make in [
        ("unet", lambda: UNet2DConditionModel(**UNET_CONFIG)),
        ("vae", lambda: AutoencoderKL(**VAE_CONFIG)),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))),
    ]:
        m = make().to(dt)
        m.save_pretrained(os.path.join(tmp, sub))
        del m
    for sub in ["tokenizer", "scheduler"]:
        shutil.copytree(os.path.join(FIXTURE, sub), os.path.join(tmp, sub))
    shutil.copy(os.path.join(FIXTURE, "model_index.json"), tmp)
    os.rename(tmp, d)
    print(f"built {d} ({dtype}) in {time.time() - t0:.0f} s", flush=True)


def timed(cmd, env=None):
    """Runs cmd under /usr/bin/time -v; returns (wall_s, peak_rss_bytes, output)."""
    p = subprocess.run(
        ["/usr/bin/time", "-v"] + cmd, env=env, capture_output=True, text=True
    )
    out = p.stdout + p.stderr
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    m = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", out)
    wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out).group(1)) * 1024
    return wall, rss, out


def diffusers_run(a):
    """The diffusers side, run as a child process of this script."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(a.threads)
    pipe = StableDiffusionPipeline.from_pretrained(
        a.model_dir, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    g = torch.Generator("cpu").manual_seed(a.seed)
    with torch.inference_mode():
        img = pipe(
            a.prompt,
            num_inference_steps=a.steps,
            guidance_scale=a.guidance,
            height=a.size,
            width=a.size,
            generator=g,
        ).images[0]
    img.save(a.diffusers_out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="weights on disk")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "target", "cpu-bench", "e2e-out"))
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--diffusers-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.model_dir is None:
        a.model_dir = os.path.join(ROOT, "target", "cpu-bench", f"sd15-random-{a.dtype}")
    if a.diffusers_out:
        return diffusers_run(a)

    if not os.path.isdir(a.model_dir):
        build_model(a.model_dir, a.dtype)
    os.makedirs(a.out_dir, exist_ok=True)
    if not a.no_build:
        subprocess.run(
            ["cargo", "build", "--release", "-q", "-p", "ferry-sd", "--bin", "txt2img"],
            cwd=ROOT,
            check=True,
        )
    common = dict(prompt=a.prompt, steps=a.steps, guidance=a.guidance, size=a.size, seed=a.seed)
    print(f"e2e: {json.dumps(common)}, threads {a.threads}, model {a.model_dir}", flush=True)
    print(f"load before: {os.getloadavg()}", flush=True)

    ferry_png = os.path.join(a.out_dir, "ferry.png")
    env = dict(os.environ, MATMUL_NUM_THREADS=str(a.threads))
    fw, fr, _ = timed(
        [
            os.path.join(ROOT, "target", "release", "txt2img"),
            "--model", a.model_dir, "--device", "cpu",
            "--prompt", a.prompt, "--steps", str(a.steps), "--guidance", str(a.guidance),
            "--width", str(a.size), "--height", str(a.size), "--seed", str(a.seed),
            "--threads", str(a.threads), "-o", ferry_png,
        ],
        env=env,
    )
    print(f"Ferry txt2img --device cpu: wall {fw:.1f} s, peak RSS {fr / 2**30:.2f} GiB", flush=True)
    if a.skip_diffusers:
        return
    diff_png = os.path.join(a.out_dir, "diffusers.png")
    dw, dr, _ = timed(
        [sys.executable, os.path.abspath(__file__), "--diffusers-out", diff_png,
         "--model-dir", a.model_dir, "--threads", str(a.threads), "--prompt", a.prompt,
         "--steps", str(a.steps), "--guidance", str(a.guidance), "--size", str(a.size),
         "--seed", str(a.seed)]
    )
    print(f"diffusers StableDiffusionPipeline fp32: wall {dw:.1f} s, peak RSS {dr / 2**30:.2f} GiB")
    print(f"ratio Ferry/diffusers: wall {fw / dw:.2f}x, peak RSS {fr / dr:.2f}x")
    print(f"load after: {os.getloadavg()}")
    try:
        import numpy as np
        from PIL import Image

        x = np.asarray(Image.open(ferry_png), dtype=np.int16)
        y = np.asarray(Image.open(diff_png).convert(x.ndim == 3 and "RGB" or "L"), dtype=np.int16)
        d = np.abs(x - y)
        print(f"images: max |diff| {d.max()} / 255, mean {d.mean():.3f}")
    except Exception as e:  # noqa: BLE001 - the comparison is informative only
        print(f"images: not compared ({e})")


if __name__ == "__main__":
    main()
