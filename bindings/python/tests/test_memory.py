"""Host memory holds the weights once. On the simulated device, whose device memory is host
memory, the issue's bound is: peak RSS <= 1.1 x weight bytes + budget + the un-offloaded run's
non-weight memory. Each run is its own process (ru_maxrss is a per-process high-water mark)."""

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, sys
import torch
import ferry.torch as ft
torch.set_num_threads(1)
offload = sys.argv[1] == "ferry"
layers, d = 48, 724
# Warm torch up (allocator, kernels) before anything is measured.
with torch.no_grad():
    torch.nn.functional.linear(torch.randn(4, d), torch.randn(d, d))
torch.manual_seed(0)
m = torch.nn.Sequential(*[torch.nn.Linear(d, d) for _ in range(layers)]).eval()
wb = sum(p.numel() * p.element_size() for p in m.parameters())
budget = int(0.6 * wb)
if offload:
    ft.offload(m, budget=budget, mode="auto")
x = torch.ones(4, d)
with torch.no_grad():
    for _ in range(2):
        y = m(x)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak": peak, "weights": wb, "budget": budget, "sum": float(y.sum())}))
"""


def measure(kind):
    out = subprocess.run([sys.executable, "-c", SCRIPT, kind], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB on Linux")
def test_peak_rss_holds_weights_once():
    plain = measure("plain")
    ferry = measure("ferry")
    assert ferry["sum"] == plain["sum"]  # the same seeded model, the same output
    w = plain["weights"]
    non_weight = plain["peak"] - w
    bound = 1.1 * w + ferry["budget"] + non_weight
    assert ferry["peak"] <= bound, (
        f"peak RSS {ferry['peak'] / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB "
        f"(weights {w / 2**20:.1f} MiB, budget {ferry['budget'] / 2**20:.1f} MiB, "
        f"non-weight {non_weight / 2**20:.1f} MiB)"
    )
    # And it is not trivially met: two host copies of the weights would break it.
    assert 2 * w + ferry["budget"] + non_weight > bound
