"""ferry.torch on plain nn.Modules (not diffusion models): bit-identical outputs in every mode,
tied weights, a module called twice, buffers, parameter-less modules, remove, errors, leaks."""

import json

import pytest
import torch

import ferry
import ferry.torch as ft
from conftest import weight_bytes

MODES = ["auto", "group", "sequential", "model"]


class TiedMLP(torch.nn.Module):
    """An MLP whose last layer shares the first layer's weight, with a block called twice, a
    buffer, a parameter-less activation and a parameter-less container."""

    def __init__(self, d: int = 96):
        super().__init__()
        self.inp = torch.nn.Linear(d, d)
        self.mid = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.LayerNorm(d))
        self.act = torch.nn.GELU()  # no parameters
        self.out = torch.nn.Linear(d, d)
        self.out.weight = self.inp.weight  # tied
        self.register_buffer("scale", torch.linspace(0.5, 1.5, d))
        self.register_buffer("steps", torch.arange(d, dtype=torch.int64))

    def forward(self, x):
        x = self.act(self.inp(x))
        x = self.mid(x)
        x = self.mid(x) * self.scale  # called twice per forward
        x = x + self.steps.to(x.dtype) * 1e-3
        return self.out(x)


def make(seed: int = 0) -> TiedMLP:
    torch.manual_seed(seed)
    return TiedMLP().eval()


def reference(m, x):
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("granularity", ["auto", "leaf", "block"])
def test_bit_identical_every_mode(mode, granularity):
    m = make()
    x = torch.randn(8, 96)
    ref = reference(m, x)
    budget = int(0.6 * weight_bytes(m))
    if mode == "model":
        # A plain module is one component: mode "model" swaps it whole, so it needs all of it.
        with pytest.raises(ferry.BudgetTooSmallError, match="largest component"):
            ft.offload(m, budget=budget, mode=mode, granularity=granularity)
        budget = 2 * weight_bytes(m)
    h = ft.offload(m, budget=budget, mode=mode, granularity=granularity)
    try:
        with torch.no_grad():
            y1 = m(x)
            y2 = m(x)  # second call: runs the plan learned on the first
        with torch.inference_mode():
            y3 = m(x)
        assert torch.equal(y1, ref) and torch.equal(y2, ref) and torch.equal(y3, ref)
        c = h.counters()
        assert c["races"] == [], c["races"]
        assert c["device_peak_bytes"] <= budget
        assert c["bytes_copied"] > 0
    finally:
        ft.remove(m)
    assert torch.equal(reference(m, x), ref)


def test_mode_none_needs_every_weight():
    m = make()
    wb = weight_bytes(m)
    with pytest.raises(ferry.BudgetTooSmallError, match="mode 'none'"):
        ft.offload(m, budget=int(0.6 * wb), mode="none")
    x = torch.randn(4, 96)
    ref = reference(m, x)
    ft.offload(m, budget=2 * wb, mode="none")
    with torch.no_grad():
        assert torch.equal(m(x), ref)
    ft.remove(m)


def test_tied_weight_registered_once_and_restored_as_same_object():
    m = make()
    params = {n: p for n, p in m.named_parameters()}
    ids = {n: id(p) for n, p in params.items()}
    values = {n: p.detach().clone() for n, p in m.state_dict(keep_vars=True).items()}
    h = ft.offload(m, budget=0.6)
    # Host memory holds the weights once: the tied weight counts once.
    assert h.counters()["weight_bytes"] == weight_bytes(m)
    ft.remove(m)
    assert m.out.weight is m.inp.weight
    assert {n: id(p) for n, p in m.named_parameters()} == ids
    for n, v in m.state_dict(keep_vars=True).items():
        assert torch.equal(v, values[n]), n
        assert v.is_contiguous()


def test_module_copies_are_released():
    m = make()
    before = {n: t.untyped_storage().nbytes() for n, t in m.state_dict(keep_vars=True).items()}
    assert sum(before.values()) > 0
    ft.offload(m, budget=0.6)
    for n, t in m.state_dict(keep_vars=True).items():
        # Between forwards a parameter is a zero-stride placeholder over one shared scalar.
        assert t.untyped_storage().nbytes() <= 8, (n, t.untyped_storage().nbytes())
        assert all(s == 0 for s in t.stride()), n
        assert t.shape == torch.Size(t.shape)
    ft.remove(m)
    after = {n: t.untyped_storage().nbytes() for n, t in m.state_dict(keep_vars=True).items()}
    assert after == before


def test_views_are_zero_copy_during_forward():
    m = make()
    h = ft.offload(m, budget=0.6, granularity="leaf")
    arena = h._arena
    lo, hi = arena.data_ptr(), arena.data_ptr() + arena.numel()
    seen = []
    hook = m.inp.register_forward_pre_hook(lambda mod, a: seen.append(mod.weight.data_ptr()))
    with torch.no_grad():
        m(torch.randn(2, 96))
    hook.remove()
    assert seen and all(lo <= p < hi for p in seen)
    ft.remove(m)


def test_pipeline_order_learned_and_replanned():
    m = make()
    h = ft.offload(m, budget=0.6, granularity="leaf")
    declared = h.order()
    with torch.no_grad():
        m(torch.randn(2, 96))
    learned = h.order()
    # mid.0 and mid.1 run twice; `out` needs the tied weight owned by `inp`'s group.
    assert learned.count("model.mid.0") == 2 and learned.count("model.mid.1") == 2
    assert learned != declared
    assert learned.index("model.out") > learned.index("model.mid.1")
    ft.remove(m)


def test_plan_before_offload_and_minimum_budget():
    m = make()
    wb = weight_bytes(m)
    p = ft.plan(m, budget=int(0.6 * wb), granularity="leaf")
    assert p.weight_bytes == wb
    assert 0 < p.minimum_budget <= int(0.6 * wb)
    assert p.streamed_bytes_per_pass > 0
    assert p.predicted_stall_s >= 0
    assert "plan: mode auto" in str(p)
    full = ft.plan(m, budget=4 * wb, granularity="leaf")
    assert full.streamed_bytes_per_pass == 0 and len(full.resident_groups) == full.groups
    with pytest.raises(ferry.BudgetTooSmallError) as e:
        ft.plan(m, budget=p.minimum_budget - 1, granularity="leaf")
    assert str(p.minimum_budget) in str(e.value)
    # plan() touched nothing.
    assert all(t.untyped_storage().nbytes() > 8 for t in m.parameters())


def test_metrics_and_trace(tmp_path):
    m = make()
    h = ft.offload(m, budget=0.6)
    with torch.no_grad():
        m(torch.randn(2, 96))
        m(torch.randn(2, 96))
    assert h.passes == 2
    table = ft.metrics(m)
    assert "pass" in table and "GB/s" in table
    path = tmp_path / "trace.json"
    text = ft.trace(m, str(path))
    events = json.loads(path.read_text())
    assert json.loads(text) == events
    assert len(events["traceEvents"] if isinstance(events, dict) else events) > 0
    ft.remove(m)


def test_budget_below_largest_group():
    m = make()
    with pytest.raises(ferry.BudgetTooSmallError) as e:
        ft.offload(m, budget=1000, granularity="leaf")
    msg = str(e.value)
    assert "1000" in msg and "minimum" in msg and "largest group" in msg
    assert not hasattr(m, "_ferry_offload")
    x = torch.randn(2, 96)
    assert torch.equal(reference(m, x), reference(make(), x))


def test_unsupported_dtype_leaves_model_untouched():
    m = make()
    m.extra = torch.nn.Linear(4, 4).double()
    ptrs = [p.data_ptr() for p in m.parameters()]
    with pytest.raises(ferry.UnsupportedDtypeError) as e:
        ft.offload(m, budget=0.6)
    assert "torch.float64" in str(e.value) and "extra.weight" in str(e.value)
    assert "torch.float32" in str(e.value)  # what was expected
    assert [p.data_ptr() for p in m.parameters()] == ptrs


def test_parameter_replaced_after_planning():
    m = make()
    ft.offload(m, budget=0.6)
    m.mid[0].weight = torch.nn.Parameter(torch.zeros(96, 96))
    with pytest.raises(ferry.ModuleChangedError, match="mid.0.weight"):
        with torch.no_grad():
            m(torch.randn(2, 96))
    ft.remove(m)


def test_parameter_data_reassigned_after_planning():
    m = make()
    ft.offload(m, budget=0.6)
    m.mid[0].bias.data = torch.zeros(96)
    with pytest.raises(ferry.ModuleChangedError, match="re-assigned"):
        with torch.no_grad():
            m(torch.randn(2, 96))
    ft.remove(m)


def test_module_to_dtype_after_planning():
    m = make()
    ft.offload(m, budget=0.6)
    m.half()
    with pytest.raises(ferry.ModuleChangedError, match="float16"):
        with torch.no_grad():
            m(torch.randn(2, 96).half())
    ft.remove(m)


def test_in_place_write_during_forward_is_refused():
    m = make()
    ft.offload(m, budget=0.6, granularity="leaf")
    hook = m.inp.register_forward_pre_hook(lambda mod, a: mod.bias.add_(1.0))
    with pytest.raises(ferry.ModuleChangedError, match="in place"):
        with torch.no_grad():
            m(torch.randn(2, 96))
    hook.remove()
    ft.remove(m)


def test_grad_mode_is_refused():
    m = make()
    ft.offload(m, budget=0.6)
    with pytest.raises(ferry.UnsupportedError, match="no_grad"):
        m(torch.randn(2, 96))
    ft.remove(m)


def test_use_after_remove_and_double_remove():
    m = make()
    h = ft.offload(m, budget=0.6)
    ft.remove(m)
    for call in (h.metrics, h.trace, h.plan, h.counters, h.remove):
        with pytest.raises(ferry.UseAfterRemoveError):
            call()
    with pytest.raises(ferry.NotOffloadedError):
        ft.remove(m)
    # The module works as before, without hooks.
    assert not m._forward_pre_hooks and not m.inp._forward_hooks


def test_offload_twice_and_cuda_refused():
    m = make()
    ft.offload(m, budget=0.6)
    with pytest.raises(ferry.AlreadyOffloadedError):
        ft.offload(m, budget=0.6)
    ft.remove(m)
    with pytest.raises(ferry.UnsupportedError, match="CUDA"):
        ft.offload(m, budget=0.6, device="cuda")
    with pytest.raises(ferry.InvalidArgumentError):
        ft.offload(m, budget=0.6, mode="fast")


def test_nothing_leaks():
    m = make()
    h = ft.offload(m, budget=0.6)
    with torch.no_grad():
        m(torch.randn(2, 96))
    assert h.resources()["device_allocs"] == 1
    ft.remove(m)
    r = h.resources()
    assert r == {"device_allocs": 0, "device_bytes": 0, "host_allocs": 0, "host_bytes": 0,
                 "events": 0, "streams": 0}, r


def test_exception_inside_forward_releases_groups():
    m = make()
    h = ft.offload(m, budget=0.6, granularity="leaf")

    def boom(mod, args):
        raise RuntimeError("boom")

    hk = m.mid[1].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad():
            m(torch.randn(2, 96))
    hk.remove()
    assert all(g.holds == 0 for g in h._groups)
    x = torch.randn(2, 96)
    with torch.no_grad():
        y = m(x)
    ft.remove(m)
    assert torch.equal(y, reference(m, x))


def test_errors_are_ferry_errors():
    for cls in (ferry.BudgetTooSmallError, ferry.ModuleChangedError, ferry.UnsupportedDtypeError,
                ferry.UseAfterRemoveError, ferry.NotOffloadedError, ferry.UnsupportedError,
                ferry.AlreadyOffloadedError, ferry.DeviceError, ferry.InvalidArgumentError):
        assert issubclass(cls, ferry.FerryError)
