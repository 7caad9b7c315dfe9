"""Shared fixtures. Everything here runs on Ferry's simulated device with CPU tensors."""

import os
import pathlib

import torch

# One intra-op thread: deterministic timing on small shared CI machines (results are
# bit-identical either way; every comparison is between runs in the same process).
torch.set_num_threads(1)

REPO = pathlib.Path(__file__).resolve().parents[3]
MODELS = REPO / "tests" / "fixtures" / "models"


def weight_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
