"""ferry.torch on the tiny sd15 and sdxl fixture pipelines loaded in real diffusers (simulated
device, CPU tensors): output bit-identical to the same pipeline without offload, in every mode
that fits 60 % of the weight bytes; components called in any order; remove restores."""

import numpy as np
import pytest
import torch

import ferry
import ferry.torch as ft
from conftest import MODELS, weight_bytes

diffusers = pytest.importorskip("diffusers")
from diffusers.utils import logging as dlogging  # noqa: E402

dlogging.disable_progress_bar()
dlogging.set_verbosity_error()

PIPES = ["sd15", "sdxl"]


def load(name):
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(MODELS / name), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe):
    return pipe(
        "a red cube on a table",
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def pipe_weight_bytes(pipe):
    return sum(weight_bytes(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module))


@pytest.fixture(scope="module", params=PIPES)
def loaded(request):
    pipe = load(request.param)
    return request.param, pipe, run(pipe)


@pytest.mark.parametrize("mode", ["auto", "group", "sequential", "model"])
def test_bit_identical(loaded, mode):
    name, pipe, ref = loaded
    budget = int(0.6 * pipe_weight_bytes(pipe))
    h = ft.offload(pipe, budget=budget, mode=mode)
    try:
        out = run(pipe)
        assert np.array_equal(out, ref), f"{name} {mode}: max diff {np.abs(out - ref).max()}"
        if mode == "auto":
            # Second call: runs the plan re-made from the order learned on the first.
            assert np.array_equal(run(pipe), ref)
            assert h.plan().mode == "auto"
        c = h.counters()
        assert c["races"] == []
        assert c["device_peak_bytes"] <= budget
        assert c["weight_bytes"] == pipe_weight_bytes(pipe)
    finally:
        ft.remove(pipe)
    # remove restores bit-identical behaviour.
    assert np.array_equal(run(pipe), ref)


def test_mode_none_refuses_60_percent(loaded):
    name, pipe, _ = loaded
    with pytest.raises(ferry.BudgetTooSmallError, match="mode 'none'"):
        ft.offload(pipe, budget=0.6, mode="none")
    assert not hasattr(pipe, "_ferry_offload")


def test_components_in_any_order_and_weights_held_once(loaded):
    name, pipe, _ = loaded
    torch.manual_seed(1)
    latents = torch.randn(1, 4, 8, 8)
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        img_ref = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        te_ref = pipe.text_encoder(ids)[0]
    storages = {
        n: t.untyped_storage().nbytes() for n, t in pipe.unet.state_dict(keep_vars=True).items()
    }
    h = ft.offload(pipe, budget=0.6)
    try:
        # The module's own copies were released: every tensor is a placeholder now.
        for n, t in pipe.unet.state_dict(keep_vars=True).items():
            assert t.untyped_storage().nbytes() <= 8 < storages[n] or storages[n] <= 8, n
        # vae first, then the text encoder: the reverse of the pipeline's order.
        with torch.inference_mode():
            img = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
            te = pipe.text_encoder(ids)[0]
            img2 = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        assert torch.equal(img, img_ref) and torch.equal(img2, img_ref)
        assert torch.equal(te, te_ref)
        order = h.order()
        assert order[0].startswith("text_encoder")  # components keep the pipeline's order
        assert h.counters()["races"] == []
    finally:
        ft.remove(pipe)


def test_vae_tiling_and_pipe_to_cpu(loaded):
    name, pipe, ref = loaded
    h = ft.offload(pipe, budget=0.6)
    try:
        pipe.to("cpu")  # a no-op for Ferry's placeholders: keeps working
        assert pipe._execution_device == torch.device("cpu")
        assert np.array_equal(run(pipe), ref)
        pipe.to(torch.float16)  # changes every parameter: refused with a clear error
        with pytest.raises(ferry.ModuleChangedError, match="float16"):
            run(pipe)
    finally:
        # remove() gives back the float32 weights Ferry holds (the float16 cast did not reach
        # them), so the reference still matches.
        ft.remove(pipe)
    assert np.array_equal(run(pipe), ref)
    vae = pipe.vae
    saved = (vae.tile_sample_min_size, vae.tile_latent_min_size)
    vae.enable_tiling()
    # Tiles small enough for the tiny fixture: the decoder runs once per tile.
    vae.tile_latent_min_size = 4
    vae.tile_sample_min_size = 4 * 2 ** (len(vae.config.block_out_channels) - 1)
    calls = []
    hk = vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with torch.no_grad():
            latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
            tiled_ref = vae.decode(latents).sample
        n = len(calls)
        assert n > 1
        ft.offload(pipe, budget=0.6)
        with torch.no_grad():
            tiled = vae.decode(latents).sample
        assert len(calls) == 2 * n
        assert torch.equal(tiled, tiled_ref)
        ft.remove(pipe)
    finally:
        hk.remove()
        vae.disable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved
