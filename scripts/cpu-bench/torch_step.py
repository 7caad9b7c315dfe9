#!/usr/bin/env python3
"""PyTorch side of the CPU benches (benches/sd_unet.rs, benches/sd_vae.rs).

Usage: torch_step.py {unet,vae} DIR --threads N --steps S

DIR is a diffusers model folder (config.json + diffusion_pytorch_model.safetensors) that also holds
the inputs as float32 .npy: unet: sample.npy, context.npy, timestep.npy; vae: latents.npy. Loads
the model in float32, runs S steps under torch.inference_mode() with torch.set_num_threads(N)
(the first one is the cold step), writes the last output to DIR/torch_out.npy and prints one line
`RESULT {json}` (load_s, steps_s, peak_rss_bytes from getrusage). When torch or diffusers cannot be
imported it prints `SKIP <reason>` and exits with status 3.
"""
import argparse
import json
import os
import resource
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", choices=["unet", "vae"])
    p.add_argument("dir")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    try:
        import numpy as np
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
    except Exception as e:  # noqa: BLE001 - any import failure means "no PyTorch here"
        print(f"SKIP cannot import torch/diffusers: {type(e).__name__}: {e}")
        sys.exit(3)

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    cls = UNet2DConditionModel if a.model == "unet" else AutoencoderKL
    model, info = cls.from_pretrained(a.dir, torch_dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        # Random init of a missing weight would make the cross-check meaningless.
        print(f"ERROR weights do not match the model: {bad}")
        sys.exit(2)
    model.eval()
    load_s = time.perf_counter() - t0

    def npy(name):
        return torch.from_numpy(np.load(os.path.join(a.dir, name)))

    if a.model == "unet":
        sample, context, ts = npy("sample.npy"), npy("context.npy"), npy("timestep.npy")

        def step():
            return model(sample, ts, encoder_hidden_states=context).sample
    else:
        latents = npy("latents.npy")

        def step():
            return model.decode(latents).sample

    steps_s = []
    out = None
    with torch.inference_mode():
        for _ in range(a.steps):
            t = time.perf_counter()
            out = step()
            steps_s.append(time.perf_counter() - t)
    np.save(os.path.join(a.dir, "torch_out.npy"), out.float().numpy())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    res = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "steps_s": steps_s,
        "peak_rss_bytes": rss,
    }
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
