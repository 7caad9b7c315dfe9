"""``ferry.torch``: Ferry as the weight-offload engine of a PyTorch model or diffusers pipeline.

    import ferry.torch
    handle = ferry.torch.offload(pipe, budget=2 << 30)   # bytes of device memory for weights
    image = pipe("a cat").images[0]
    print(handle.metrics())
    ferry.torch.remove(pipe)                           # the model as it was, bit for bit

How it works (see docs/python.md): parameters and buffers are grouped by module (a block of
modules when it is small enough, else the tensors a module owns directly); every group is
registered once with Ferry's pinned host store and the module's own copies are released. Hooks
acquire a module's groups before its forward and release them after; during the forward each
parameter's ``.data`` is a zero-copy view of Ferry's device memory. The first call of each
component records the execution order, and Ferry re-plans with it (and with the measured time of
each group's use).

Without a GPU this runs on Ferry's *simulated device*, whose device memory is host memory, with
CPU tensors. The CUDA path is not implemented in this build (``device="cuda"`` raises
:class:`ferry.UnsupportedError`).
"""

from __future__ import annotations

import ctypes
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import _ferry
from .errors import (
    AlreadyOffloadedError,
    BudgetTooSmallError,
    FerryError,
    InvalidArgumentError,
    ModuleChangedError,
    NotOffloadedError,
    UnsupportedDtypeError,
    UnsupportedError,
    UseAfterRemoveError,
)

__all__ = ["offload", "plan", "remove", "handle", "metrics", "trace", "Offload", "Plan"]

_ATTR = "_ferry_offload"

_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int32: "int32",
    torch.int64: "int64",
}

_MODES = ("auto", "group", "sequential", "model", "none")

# One scalar per dtype backs every placeholder (an expanded, zero-stride view): a parameter keeps
# its shape, dtype and device between uses while holding no memory of its own. Floats read NaN,
# so a weight read outside its module's forward shows up in the output instead of passing as 0.
_FILL: Dict[torch.dtype, torch.Tensor] = {}
_FILL_PTR: Dict[torch.dtype, int] = {}


def _fill(dtype: torch.dtype) -> torch.Tensor:
    t = _FILL.get(dtype)
    if t is None:
        with torch.inference_mode(False), torch.no_grad():
            t = torch.full((), float("nan") if dtype.is_floating_point else 0, dtype=dtype)
        _FILL[dtype] = t
        _FILL_PTR[dtype] = t.data_ptr()
    return t


def _placeholder(dtype: torch.dtype, shape: Tuple[int, ...]) -> torch.Tensor:
    return _fill(dtype).expand(shape)


def _contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


@dataclass
class _Entry:
    """One offloaded tensor: a parameter or buffer object (shared ones appear once)."""

    path: str  # e.g. "unet.down_blocks.0.resnets.0.conv1.weight" (its first owner)
    kind: str  # "parameter" or "buffer"
    module: torch.nn.Module
    name: str
    obj: torch.Tensor
    dtype: torch.dtype
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    nbytes: int
    index: int = -1  # in the engine
    view: Optional[torch.Tensor] = None
    versions: Tuple[int, int] = (0, 0)


@dataclass
class _Group:
    index: int
    name: str
    component: str
    entries: List[_Entry]
    nbytes: int
    holds: int = 0
    started: int = 0
    measured_ns: int = 0
    uses: int = 0
    # Tensors of a module that also has children with weights: held for its whole forward,
    # they would pin the staging ring (a FIFO) while the children's groups stream through it.
    # They are copied out of Ferry's memory at acquire and released to Ferry at once.
    copy_out: bool = False


@dataclass
class Plan:
    """A residency plan (``ferry.torch.plan`` or :meth:`Offload.plan`). Times are predictions of
    Ferry's cost model (the simulated device's, on a machine without a GPU)."""

    mode: str
    budget: int
    minimum_budget: int
    weight_bytes: int
    resident_groups: List[str]
    resident_bytes: int
    streamed_bytes_per_pass: int
    staging_bytes: int
    predicted_stall_s: float
    predicted_pass_s: float
    compute_per_pass_s: float
    groups: int
    text: str = field(repr=False, default="")

    def __str__(self) -> str:
        return self.text


def _plan_from(d: Dict[str, Any], names: List[str], weight_bytes: int) -> Plan:
    return Plan(
        mode=d["mode"],
        budget=d["budget"],
        minimum_budget=d["minimum_budget"],
        weight_bytes=weight_bytes,
        resident_groups=[names[i] for i in d["resident"]],
        resident_bytes=d["resident_bytes"],
        streamed_bytes_per_pass=d["streamed_bytes_per_pass"],
        staging_bytes=d["staging_bytes"],
        predicted_stall_s=d["predicted_stall_ns"] / 1e9,
        predicted_pass_s=d["predicted_pass_ns"] / 1e9,
        compute_per_pass_s=d["compute_per_pass_ns"] / 1e9,
        groups=len(names),
        text=d["text"],
    )


# ----------------------------------------------------------------------------------------------
# Discovering components, tensors and groups


def _components(obj: Any) -> List[Tuple[str, torch.nn.Module]]:
    """(name, module) of every component: the module itself, or every nn.Module of a diffusers
    pipeline (``pipe.components``), in ``model_cpu_offload_seq`` order first."""
    if isinstance(obj, torch.nn.Module):
        return [("model", obj)]
    comps = getattr(obj, "components", None)
    if not isinstance(comps, dict):
        raise InvalidArgumentError(
            f"expected a torch.nn.Module or a diffusers pipeline (with .components), "
            f"found {type(obj).__name__}"
        )
    mods = [(k, v) for k, v in comps.items() if isinstance(v, torch.nn.Module)]
    if not mods:
        raise InvalidArgumentError(
            f"expected a pipeline with at least one nn.Module component, found none in "
            f"{type(obj).__name__} (components: {sorted(comps)})"
        )
    seq = [s.strip() for s in (getattr(obj, "model_cpu_offload_seq", None) or "").split("->")]
    rank = {name: i for i, name in enumerate(s for s in seq if s)}
    mods.sort(key=lambda kv: rank.get(kv[0], len(rank)))
    # The same module object as two components is offloaded once, under its first name.
    seen, out = set(), []
    for k, v in mods:
        if id(v) not in seen:
            seen.add(id(v))
            out.append((k, v))
    return out


def _check_not_offloaded(obj: Any, comps: List[Tuple[str, torch.nn.Module]]) -> None:
    if getattr(obj, _ATTR, None) is not None:
        raise AlreadyOffloadedError(
            f"expected a model without offloading, found it already offloaded by Ferry "
            f"(call ferry.torch.remove({type(obj).__name__}) first)"
        )
    for cname, comp in comps:
        for mname, m in comp.named_modules():
            if getattr(m, _ATTR, None) is not None:
                raise AlreadyOffloadedError(
                    f"expected no Ferry hooks, found module '{cname}.{mname}' offloaded by "
                    f"another ferry.torch.offload call"
                )
            if hasattr(m, "_hf_hook"):
                raise AlreadyOffloadedError(
                    f"expected a model without accelerate hooks, found one on '{cname}.{mname}' "
                    f"(enable_model_cpu_offload / enable_sequential_cpu_offload / device_map): "
                    f"remove them (pipe.remove_all_hooks()) before ferry.torch.offload"
                )


def _collect(comps: List[Tuple[str, torch.nn.Module]]):
    """Every distinct parameter and buffer, each with its first owner; per module, the entries
    it holds directly (shared tensors included)."""
    entries: Dict[int, _Entry] = {}
    direct: Dict[int, List[_Entry]] = {}  # id(module) -> entries it holds directly
    modules: Dict[int, Tuple[str, str, torch.nn.Module]] = {}  # id -> (component, path, module)
    for cname, comp in comps:
        for mpath, m in comp.named_modules():
            if id(m) in modules:
                continue
            modules[id(m)] = (cname, mpath, m)
            mine: List[_Entry] = []
            for kind, table in (("parameter", m._parameters), ("buffer", m._buffers)):
                for name, t in table.items():
                    if t is None:
                        continue
                    path = f"{cname}.{mpath}.{name}" if mpath else f"{cname}.{name}"
                    e = entries.get(id(t))
                    if e is None:
                        if t.dtype not in _DTYPES:
                            raise UnsupportedDtypeError(
                                f"{kind} '{path}': expected one of "
                                f"{', '.join(str(d) for d in _DTYPES)}, found {t.dtype}"
                            )
                        if t.device.type != "cpu":
                            raise UnsupportedError(
                                f"{kind} '{path}': expected a CPU tensor (Ferry's simulated "
                                f"device pages from host memory), found one on {t.device}"
                            )
                        if t.is_sparse or t.layout != torch.strided:
                            raise UnsupportedError(
                                f"{kind} '{path}': expected a dense strided tensor, found "
                                f"layout {t.layout}"
                            )
                        shape = tuple(t.shape)
                        e = _Entry(
                            path=path,
                            kind=kind,
                            module=m,
                            name=name,
                            obj=t,
                            dtype=t.dtype,
                            shape=shape,
                            stride=tuple(t.stride()),
                            nbytes=t.numel() * t.element_size(),
                        )
                        entries[id(t)] = e
                    mine.append(e)
            direct[id(m)] = mine
    return entries, direct, modules


def _groups(
    comps: List[Tuple[str, torch.nn.Module]],
    direct: Dict[int, List[_Entry]],
    threshold: int,
) -> Tuple[List[_Group], List[Tuple[torch.nn.Module, int]]]:
    """Splits each component into groups: a subtree whose tensors total at most ``threshold``
    bytes is one group (a block, hooked at its root); otherwise the tensors a module holds
    directly form a group and its children are split in turn. Returns the groups (in module
    order) and the block roots."""
    owner: Dict[int, int] = {}  # id(entry) -> group index
    groups: List[_Group] = []
    roots: List[Tuple[torch.nn.Module, int]] = []
    visited = set()

    def subtree_entries(m: torch.nn.Module) -> List[_Entry]:
        out, seen = [], set()
        for sub in m.modules():
            for e in direct.get(id(sub), []):
                if id(e) not in owner and id(e) not in seen:
                    seen.add(id(e))
                    out.append(e)
        return out

    def add(name: str, comp: str, es: List[_Entry], copy_out: bool = False) -> None:
        es = [e for e in es if id(e) not in owner]
        if not es:
            return
        g = _Group(len(groups), name, comp, es, sum(e.nbytes for e in es), copy_out=copy_out)
        for e in es:
            owner[id(e)] = g.index
        groups.append(g)

    def walk(comp: str, path: str, m: torch.nn.Module) -> None:
        if id(m) in visited:
            return
        visited.add(id(m))
        sub = subtree_entries(m)
        size = sum(e.nbytes for e in sub)
        if sub and size <= threshold:
            add(path, comp, sub)
            roots.append((m, len(groups) - 1))
            for s in m.modules():
                visited.add(id(s))
            return
        enclosing = any(direct.get(id(s)) for s in m.modules() if s is not m)
        add(path, comp, direct.get(id(m), []), copy_out=enclosing)
        for cname, child in m.named_children():
            walk(comp, f"{path}.{cname}", child)

    for cname, comp in comps:
        walk(cname, cname, comp)
    return groups, roots


def _threshold(granularity: Union[str, int], budget: int, direct_sizes: List[int]) -> int:
    if isinstance(granularity, bool) or not isinstance(granularity, (str, int)):
        raise InvalidArgumentError(
            f"granularity: expected 'auto', 'leaf', 'block' or a byte count, found {granularity!r}"
        )
    if isinstance(granularity, int):
        return granularity
    if granularity == "leaf":
        return 0
    largest = max(direct_sizes, default=0)
    if granularity == "auto":
        # Blocks small enough that the staging ring holds several of them (room to prefetch).
        return max(budget // 8, 1)
    if granularity == "block":
        return max(budget // 3, largest)
    raise InvalidArgumentError(
        f"granularity: expected 'auto', 'leaf', 'block' or a byte count, found {granularity!r}"
    )


def _resolve_budget(budget: Union[int, float], weight_bytes: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise InvalidArgumentError(
            f"budget: expected bytes (int) or a fraction of the weight bytes (float), found "
            f"{budget!r}"
        )
    if isinstance(budget, float):
        if not (0 < budget and math.isfinite(budget)):
            raise InvalidArgumentError(f"budget: expected a positive fraction, found {budget}")
        return max(int(budget * weight_bytes), 1)
    if budget <= 0:
        raise InvalidArgumentError(f"budget: expected a positive byte count, found {budget}")
    return int(budget)


def _resolve_device(device: Any) -> str:
    if device is None:
        if torch.cuda.is_available():
            raise UnsupportedError(
                "expected the simulated device: this build of ferry.torch has no CUDA path yet "
                "(found a CUDA GPU; pass device='sim' to run on Ferry's simulated device with "
                "CPU tensors, see docs/python.md)"
            )
        return "sim"
    d = str(device)
    if d in ("sim", "cpu"):
        return "sim"
    if d.startswith("cuda"):
        raise UnsupportedError(
            f"device: expected 'sim' (Ferry's simulated device), found {d!r}: the CUDA path of "
            f"ferry.torch is designed (docs/python.md) but not implemented in this build"
        )
    raise InvalidArgumentError(f"device: expected None, 'sim' or 'cpu', found {d!r}")


# ----------------------------------------------------------------------------------------------
# The offload state


class Offload:
    """The state of one ``ferry.torch.offload`` call; returned by it and by
    :func:`ferry.torch.handle`. Methods raise :class:`ferry.UseAfterRemoveError` after
    :meth:`remove`."""

    def __init__(self, obj, comps, entries, groups, roots, direct, modules, mode, budget, engine,
                 depth, reserve):
        self._obj = weakref.ref(obj) if _weakrefable(obj) else (lambda o=obj: o)
        self._comps = comps
        self._entries: List[_Entry] = entries
        self._groups: List[_Group] = groups
        self._engine = engine
        self.mode = mode
        self.budget = budget
        self._depth = depth
        self._reserve = reserve
        self.weight_bytes = sum(e.nbytes for e in entries)
        self._hooks: List[Any] = []
        self._removed = False
        self._arena: Optional[torch.Tensor] = None
        self._pass_depth = 0
        self._comp_depth: Dict[str, int] = {}
        self._recording: Dict[str, List[int]] = {}
        self._traced: Dict[str, List[int]] = {}
        self._declared = {c: [g.index for g in groups if g.component == c] for c, _ in comps}
        self._roots = roots
        self._direct = direct
        self._modules = modules
        self._hooked: List[torch.nn.Module] = []
        self.passes = 0

    # -- public API ----------------------------------------------------------------------------

    @property
    def removed(self) -> bool:
        """Whether :meth:`remove` was called."""
        return self._removed

    @property
    def groups(self) -> List[str]:
        """Group names, in index order."""
        return [g.name for g in self._groups]

    @property
    def group_bytes(self) -> List[int]:
        """Bytes of each group's tensors."""
        return [g.nbytes for g in self._groups]

    def order(self) -> List[str]:
        """The order of group uses Ferry currently plans for (learned on the first call of each
        component; the modules' registration order before that)."""
        return [self._groups[i].name for i in self._order()]

    def plan(self, budget: Optional[Union[int, float]] = None, mode: Optional[str] = None) -> Plan:
        """The running plan, or (with ``budget`` / ``mode``) the plan Ferry would make for them
        with the current order."""
        self._alive()
        names = self.groups
        if budget is None and mode is None:
            return _plan_from(self._engine.running_plan(), names, self.weight_bytes)
        b = self.budget if budget is None else _resolve_budget(budget, self.weight_bytes)
        d = self._engine.plan(mode or self.mode, b, self._order(), self._reserve, self._depth)
        return _plan_from(d, names, self.weight_bytes)

    def metrics(self) -> str:
        """Ferry's metrics table: per pass (one call of a component), time, bytes copied, GB/s,
        stall and overlap, in the simulated device's virtual time."""
        self._alive()
        return self._engine.metrics_table()

    def trace(self, path: Optional[str] = None) -> str:
        """The Chrome / Perfetto trace (JSON) of the copies and uses so far; also written to
        ``path`` if given (open it at https://ui.perfetto.dev)."""
        self._alive()
        text = self._engine.trace_json()
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def counters(self) -> Dict[str, Any]:
        """Bytes copied host→device, weight / pinned host bytes, device bytes, race reports."""
        self._alive()
        return dict(self._engine.counters())

    def resources(self) -> Dict[str, int]:
        """Live resources of the (simulated) device: allocations, events, streams."""
        return dict(self._engine.resources())

    def remove(self) -> None:
        """Restores every parameter and buffer (same objects, same bytes), removes the hooks and
        frees Ferry's host and device memory."""
        self._alive()
        held = [g.name for g in self._groups if g.holds]
        if held:
            raise FerryError(
                f"expected no forward in progress, found groups in use: {held[:3]} "
                f"(remove() cannot run inside a forward)"
            )
        for e in self._entries:
            with torch.inference_mode(False), torch.no_grad():
                t = torch.empty(e.shape, dtype=e.dtype)
                self._engine.read_into(e.index, t.data_ptr(), e.nbytes)
                if e.stride != _contiguous_strides(e.shape) and e.nbytes:
                    s = torch.empty_strided(e.shape, e.stride, dtype=e.dtype)
                    s.copy_(t)
                    t = s
                e.obj.data = t
            e.view = None
        self._teardown()

    # -- internals -----------------------------------------------------------------------------

    def _alive(self) -> None:
        if self._removed:
            raise UseAfterRemoveError(
                "expected live Ferry offload state, found it removed (ferry.torch.remove was "
                "called); offload the model again to use Ferry"
            )

    def _teardown(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for m in self._hooked:
            if getattr(m, _ATTR, None) is self:
                delattr(m, _ATTR)
        obj = self._obj()
        if obj is not None and getattr(obj, _ATTR, None) is self:
            try:
                delattr(obj, _ATTR)
            except AttributeError:
                pass
        self._arena = None
        self._engine.close()
        self._removed = True

    def _order(self) -> List[int]:
        out: List[int] = []
        for c, _ in self._comps:
            out.extend(self._traced.get(c, self._declared[c]))
        return out

    def _install(self) -> None:
        needs: Dict[int, List[int]] = {}
        owner = {id(e): g.index for g in self._groups for e in g.entries}
        for mid, es in self._direct.items():
            gs = []
            for e in es:
                g = owner[id(e)]
                if g not in gs:
                    gs.append(g)
            if gs:
                needs[mid] = gs
        for r, block in self._roots:
            gs = needs.setdefault(id(r), [])
            if block in gs:
                gs.remove(block)
            gs.insert(0, block)
        comp_of = {id(m): c for c, m in self._comps}
        for mid, (cname, _path, m) in self._modules.items():
            is_comp = mid in comp_of
            gs = needs.get(mid)
            if not gs and not is_comp:
                continue
            if is_comp:
                self._hooks.append(m.register_forward_pre_hook(self._pass_pre(cname)))
            if gs:
                self._hooks.append(m.register_forward_pre_hook(self._pre(gs)))
                self._hooks.append(m.register_forward_hook(self._post(gs), always_call=True))
            if is_comp:
                self._hooks.append(
                    m.register_forward_hook(self._pass_post(cname), always_call=True)
                )
            setattr(m, _ATTR, self)
            self._hooked.append(m)

    def _pass_pre(self, comp: str):
        def hook(module, args):
            self._alive()
            if self._pass_depth == 0:
                self._engine.begin_pass()
            self._pass_depth += 1
            d = self._comp_depth.get(comp, 0)
            self._comp_depth[comp] = d + 1
            if d == 0 and comp not in self._traced and comp not in self._recording:
                self._recording[comp] = []
                for g in self._groups:
                    if g.component == comp:
                        g.measured_ns = 0
                        g.uses = 0

        return hook

    def _pass_post(self, comp: str):
        def hook(module, args, output):
            if self._removed:
                return None
            self._comp_depth[comp] -= 1
            self._pass_depth -= 1
            if self._comp_depth[comp] == 0 and comp in self._recording:
                order = self._recording.pop(comp)
                self._traced[comp] = order or self._declared[comp]
                # Per use: the wall time a group was held (its module's forward, children
                # included), averaged over the uses of the recorded call.
                compute = [max(g.measured_ns // max(g.uses, 1), 1) for g in self._groups]
                self._engine.replan(order=self._order(), compute_ns=compute)
            if self._pass_depth == 0:
                self._engine.end_pass()
                self.passes += 1
            return None

        return hook

    def _pre(self, gs: List[int]):
        def hook(module, args):
            self._alive()
            done = []
            try:
                for g in gs:
                    self._hold(self._groups[g])
                    done.append(g)
            except BaseException:
                for g in reversed(done):
                    self._drop(self._groups[g], check=False)
                raise
            return None

        return hook

    def _post(self, gs: List[int]):
        def hook(module, args, output):
            if self._removed:
                return None
            err = None
            for g in reversed(gs):
                try:
                    self._drop(self._groups[g])
                except FerryError as e:
                    err = err or e
            if err is not None:
                raise err
            return None

        return hook

    def _check_unchanged(self, g: _Group) -> None:
        for e in g.entries:
            table = e.module._parameters if e.kind == "parameter" else e.module._buffers
            cur = table.get(e.name)
            if cur is not e.obj:
                raise ModuleChangedError(
                    f"{e.kind} '{e.path}' changed after Ferry planned the model: expected the "
                    f"registered {e.kind} object, found {_describe(cur)} "
                    f"(call ferry.torch.remove before changing the model, then offload again)"
                )
            o = e.obj
            if not (
                o.data_ptr() == _FILL_PTR.get(e.dtype)
                and o.dtype == e.dtype
                and o.shape == e.shape
                and o.device.type == "cpu"
                and not any(o.stride())
            ):
                raise ModuleChangedError(
                    f"{e.kind} '{e.path}' was re-assigned after Ferry planned the model (e.g. "
                    f"module.to(...), load_state_dict, LoRA fusing): expected Ferry's placeholder "
                    f"of {e.dtype} {list(e.shape)} on cpu, found {o.dtype} {list(o.shape)} on "
                    f"{o.device} (call ferry.torch.remove before changing the model)"
                )

    def _hold(self, g: _Group) -> None:
        if g.holds:
            g.holds += 1
            return
        self._check_unchanged(g)
        if torch.is_grad_enabled():
            for e in g.entries:
                if e.obj.requires_grad:
                    raise UnsupportedError(
                        f"expected inference (torch.no_grad() or torch.inference_mode()), found "
                        f"grad mode on with parameter '{e.path}' requiring grad: ferry.torch "
                        f"pages weights for inference only"
                    )
        offsets = self._engine.acquire(g.index)
        arena = self._arena
        if arena is None:
            raise UseAfterRemoveError("expected a live device arena, found none")
        try:
            with torch.inference_mode(False), torch.no_grad():
                for e, off in zip(g.entries, offsets):
                    v = arena[off : off + e.nbytes].view(e.dtype).view(e.shape)
                    if g.copy_out:
                        v = v.clone()
                    e.obj.data = v
                    e.view = v
                    e.versions = (e.obj._version, v._version)
            if g.copy_out:
                self._engine.release(g.index, 0)
        except BaseException:
            with torch.inference_mode(False), torch.no_grad():
                for e in g.entries:
                    e.obj.data = _placeholder(e.dtype, e.shape)
                    e.view = None
            if not g.copy_out:
                self._engine.release(g.index, 0)
            raise
        g.holds = 1
        g.started = time.perf_counter_ns()
        for rec in self._recording.values():
            rec.append(g.index)

    def _drop(self, g: _Group, check: bool = True) -> None:
        if g.holds == 0:
            return
        g.holds -= 1
        if g.holds:
            return
        elapsed = time.perf_counter_ns() - g.started
        if g.component in self._recording:
            g.measured_ns += elapsed
            g.uses += 1
        changed = None
        with torch.inference_mode(False), torch.no_grad():
            for e in g.entries:
                v = e.view
                o = e.obj
                if check and changed is None and v is not None:
                    if o.data_ptr() != v.data_ptr() or o.shape != e.shape or o.dtype != e.dtype:
                        changed = ModuleChangedError(
                            f"{e.kind} '{e.path}' was re-assigned during the forward: expected "
                            f"Ferry's view of {e.dtype} {list(e.shape)}, found {o.dtype} "
                            f"{list(o.shape)} on {o.device}"
                        )
                    elif (o._version, v._version) != e.versions:
                        changed = ModuleChangedError(
                            f"{e.kind} '{e.path}' was modified in place during the forward: "
                            f"expected read-only weights (Ferry pages them from its single host "
                            f"copy, so the write would be lost), found its version counter "
                            f"advanced"
                        )
                o.data = _fill(e.dtype).expand(e.shape)
                e.view = None
        if not g.copy_out:
            self._engine.release(g.index, elapsed)
        if changed is not None:
            raise changed


def _describe(t: Any) -> str:
    if t is None:
        return "nothing (it was deleted)"
    if isinstance(t, torch.Tensor):
        return f"another tensor ({t.dtype} {list(t.shape)} on {t.device})"
    return type(t).__name__


def _weakrefable(obj: Any) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False


# ----------------------------------------------------------------------------------------------
# Public functions


def offload(
    obj: Any,
    budget: Union[int, float],
    mode: str = "auto",
    device: Any = None,
    *,
    granularity: Union[str, int] = "auto",
    depth: int = 0,
    reserve: int = 0,
    metrics: bool = True,
) -> Offload:
    """Offloads the weights of ``obj`` (a ``torch.nn.Module`` or a diffusers pipeline: then
    every nn.Module component) to Ferry, which pages them into ``budget`` bytes of device memory.

    Args:
        obj: the model or pipeline. Its weights must be CPU tensors of float32, float16,
            bfloat16, int32 or int64.
        budget: device memory for weights, in bytes (int), or as a fraction of the weight bytes
            (float, e.g. ``0.6``).
        mode: ``"auto"`` (resident set from the cost model, the rest streamed with deep
            prefetch), ``"group"`` (every group streamed, prefetch ``depth``), ``"sequential"``
            (copy on demand, the host waiting: the slow baseline), ``"model"`` (whole components
            swapped, like ``enable_model_cpu_offload``) or ``"none"`` (everything resident).
        device: ``None`` or ``"sim"``: Ferry's simulated device (CPU tensors). CUDA is not
            implemented in this build (raises :class:`ferry.UnsupportedError`).
        granularity: ``"auto"`` (blocks of at most budget/8 bytes), ``"block"`` (at most
            budget/3), ``"leaf"`` (the tensors each module holds directly) or a byte count.
        depth: prefetch depth of mode ``"group"`` (0: Ferry's default, 2).
        reserve: bytes of the budget kept for activations (0 on the simulated device, whose
            activations live in host memory).
        metrics: record per-use events for :meth:`Offload.metrics` and :meth:`Offload.trace`.

    Returns the :class:`Offload` handle (also reachable with :func:`ferry.torch.handle`).

    Raises :class:`ferry.BudgetTooSmallError` if the budget cannot hold the largest group (or
    what ``mode`` needs), :class:`ferry.UnsupportedDtypeError` for a tensor of another dtype.
    On error the model is left as it was.
    """
    if mode not in _MODES:
        raise InvalidArgumentError(f"mode: expected one of {_MODES}, found {mode!r}")
    _resolve_device(device)
    comps = _components(obj)
    _check_not_offloaded(obj, comps)
    entries_by_id, direct, modules = _collect(comps)
    entries = list(entries_by_id.values())
    if not entries:
        raise InvalidArgumentError(
            f"expected a model with parameters or buffers, found none in {type(obj).__name__}"
        )
    weight_bytes = sum(e.nbytes for e in entries)
    budget_b = _resolve_budget(budget, weight_bytes)
    threshold = _threshold(granularity, budget_b, [sum(x.nbytes for x in v) for v in direct.values()])
    groups, roots = _groups(comps, direct, threshold)
    largest = max(groups, key=lambda g: g.nbytes)
    engine = _ferry.Engine.sim()
    h = Offload(obj, comps, entries, groups, roots, direct, modules, mode, budget_b, engine,
                depth, reserve)
    # Check the plan before touching the model (no bytes copied yet).
    try:
        probe = _ferry.Engine.sim()
        idx = [probe.declare(e.path, e.nbytes) for e in entries]
        pos = {id(e): i for i, e in enumerate(entries)}
        for g in groups:
            probe.add_group(g.name, g.component, [idx[pos[id(e)]] for e in g.entries], 1000)
        probe.plan(mode, budget_b, h._order(), reserve, depth)
        probe.close()
    except BudgetTooSmallError as e:
        raise BudgetTooSmallError(
            f"{e} [largest group: '{largest.name}', {largest.nbytes} bytes; weights "
            f"{weight_bytes} bytes in {len(groups)} groups]"
        ) from None
    done: List[_Entry] = []
    try:
        for g in groups:
            # Register one group at a time and release the module's own copies at once, so the
            # host holds at most one group twice while offloading.
            items = []
            keep = []
            for e in g.entries:
                t = e.obj.detach()
                if not t.is_contiguous():
                    t = t.contiguous()
                keep.append(t)
                items.append((e.path, _DTYPES[e.dtype], list(e.shape), t.data_ptr(), e.nbytes))
            ids = engine.register(items)
            for e, i in zip(g.entries, ids):
                e.index = i
            with torch.inference_mode(False), torch.no_grad():
                for e in g.entries:
                    e.obj.data = _placeholder(e.dtype, e.shape)
                    done.append(e)
            del keep, items
            _trim_host_heap()
        pos = {id(e): e.index for e in entries}
        for g in groups:
            engine.add_group(g.name, g.component, [pos[id(e)] for e in g.entries], 1000)
        arena = engine.build(mode, budget_b, h._order(), reserve, depth, 64, metrics)
        h._arena = _arena_tensor(arena)
        h._install()
    except BaseException:
        # Give the model its weights back.
        for e in done:
            with torch.inference_mode(False), torch.no_grad():
                t = torch.empty(e.shape, dtype=e.dtype)
                engine.read_into(e.index, t.data_ptr(), e.nbytes)
                if e.stride != _contiguous_strides(e.shape) and e.nbytes:
                    t = torch.empty_strided(e.shape, e.stride, dtype=e.dtype).copy_(t)
                e.obj.data = t
        for hk in h._hooks:
            hk.remove()
        for m in h._hooked:
            if getattr(m, _ATTR, None) is h:
                delattr(m, _ATTR)
        h._arena = None
        engine.close()
        raise
    try:
        setattr(obj, _ATTR, h)
    except AttributeError:
        pass
    return h


def _trim_host_heap() -> None:
    """Gives the heap pages of the released weight copies back to the OS (glibc keeps freed
    blocks below its mmap threshold in the process otherwise, so RSS would still count the
    module's old copies). Best effort: a no-op where ``malloc_trim`` does not exist."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def _arena_tensor(arena: Any) -> torch.Tensor:
    """A uint8 tensor over the whole device arena (zero-copy; keeps the arena alive)."""
    n = arena.nbytes

    class _Bytes(ctypes.c_ubyte * n):  # type: ignore[misc, valid-type]
        pass

    buf = _Bytes.from_address(arena.address)
    buf._owner = arena  # the arena (and Ferry's device memory) lives while any view does
    with torch.inference_mode(False):
        return torch.frombuffer(buf, dtype=torch.uint8)


def handle(obj: Any) -> Offload:
    """The :class:`Offload` state of an offloaded model or pipeline."""
    h = getattr(obj, _ATTR, None)
    if h is None:
        raise NotOffloadedError(
            f"expected a model offloaded with ferry.torch.offload, found a "
            f"{type(obj).__name__} without Ferry offloading"
        )
    return h


def remove(obj: Any) -> None:
    """Undoes :func:`offload`: every parameter and buffer gets its own copy of its bytes back
    (the same objects, bit-identical values), hooks are removed, Ferry's memory is freed."""
    handle(obj).remove()


def metrics(obj: Any) -> str:
    """Ferry's metrics table for an offloaded model (see :meth:`Offload.metrics`)."""
    return handle(obj).metrics()


def trace(obj: Any, path: Optional[str] = None) -> str:
    """The Perfetto trace JSON for an offloaded model (see :meth:`Offload.trace`)."""
    return handle(obj).trace(path)


def plan(
    obj: Any,
    budget: Union[int, float],
    mode: str = "auto",
    *,
    granularity: Union[str, int] = "auto",
    depth: int = 0,
    reserve: int = 0,
) -> Plan:
    """The plan Ferry would run for ``obj`` under ``budget``, before running anything: resident
    groups, streamed bytes per pass, predicted stall and the minimum budget. For a model not yet
    offloaded the order is the modules' registration order (each group used once per pass);
    for an offloaded one, the order learned on its first call. Copies no weights.

    Raises :class:`ferry.BudgetTooSmallError` (naming the minimum budget) if it does not fit.
    """
    if mode not in _MODES:
        raise InvalidArgumentError(f"mode: expected one of {_MODES}, found {mode!r}")
    h = getattr(obj, _ATTR, None)
    if h is not None:
        return h.plan(budget, mode)
    comps = _components(obj)
    entries_by_id, direct, _modules = _collect(comps)
    entries = list(entries_by_id.values())
    if not entries:
        raise InvalidArgumentError(
            f"expected a model with parameters or buffers, found none in {type(obj).__name__}"
        )
    weight_bytes = sum(e.nbytes for e in entries)
    b = _resolve_budget(budget, weight_bytes)
    threshold = _threshold(granularity, b, [sum(x.nbytes for x in v) for v in direct.values()])
    groups, _roots = _groups(comps, direct, threshold)
    eng = _ferry.Engine.sim()
    try:
        pos = {id(e): eng.declare(e.path, e.nbytes) for e in entries}
        for g in groups:
            eng.add_group(g.name, g.component, [pos[id(e)] for e in g.entries], 1000)
        d = eng.plan(mode, b, [g.index for g in groups], reserve, depth)
    finally:
        eng.close()
    return _plan_from(d, [g.name for g in groups], weight_bytes)
