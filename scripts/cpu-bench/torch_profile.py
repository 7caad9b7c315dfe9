#!/usr/bin/env python3
"""Per-op CPU time of one PyTorch step of the SD 1.5 UNet or VAE decoder (random weights), to set
beside Ferry's `FERRY_OP_PROFILE=1` report of the same bench.

Usage: torch_profile.py {unet,vae} --threads N [--batch 2] [--size 64]

Builds the model from the SD 1.5 config with random weights (speed does not depend on their values),
times two steps without the profiler, then profiles one more under torch.inference_mode() and prints
`torch.profiler`'s table grouped by op and input shape, largest self CPU time first.
"""
import argparse

SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=4, out_channels=4,
    layers_per_block=2, norm_num_groups=32, sample_size=64,
)
SD15_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3,
    latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", choices=["unet", "vae"])
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=64, help="latent height and width")
    p.add_argument("--rows", type=int, default=40)
    a = p.parse_args()
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model == "unet":
        model = UNet2DConditionModel(**SD15_UNET).eval()
        x = torch.randn(a.batch, 4, a.size, a.size)
        ctx = torch.randn(a.batch, 77, 768)
        t = torch.tensor([500.0] * a.batch)

        def step():
            return model(x, t, encoder_hidden_states=ctx).sample
    else:
        model = AutoencoderKL(**SD15_VAE).eval()
        z = torch.randn(1, 4, a.size, a.size)

        def step():
            return model.decode(z).sample

    import time
    with torch.inference_mode():
        for i in range(2):
            t0 = time.perf_counter()
            step()
            print(f"step {i} without the profiler: {time.perf_counter() - t0:.2f} s", flush=True)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=30,
        max_shapes_column_width=70)
    print(table)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
