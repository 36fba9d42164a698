"""Incremental inference for occlusion: recompute only what a window can change.

The model is traced once with ``torch.fx`` and run once on the unoccluded input, keeping
every node's output. For a batch of windows, each node is then computed only on the
region of its output that the window can influence (a box per window, the same size for
every window in the batch), reading the unchanged rest from the kept outputs:

- the input: the window's box;
- convolutions and max/avg pooling: the outputs whose receptive field meets the input's
  box, computed from that box's receptive field plus the halo the kernel needs (the
  kept input, padded with the layer's padding value, with the changed box pasted in).
  These modules stay whole in the trace, subclasses included; torch's own and timm's
  TF-"same" ones (``Conv2dSame``, ``MaxPool2dSame``: padding from the input size, uneven)
  are bounded, a subclass with a forward of its own is recomputed in full;
- pointwise layers (eval BatchNorm, ReLU and other activations, dropout in eval): the
  same box;
- elementwise sums and products (residual additions) and channel concatenation: the
  union of the operands' boxes;
- anything else (global pooling, flatten, linear, an op it cannot bound): the whole
  tensor, recomputed for every window. For ops that are not global by nature, a
  one-line notice says so once.

Every recomputed value goes through the same arithmetic as a plain forward, so the
result equals a plain sliding-window evaluation up to float32 round-off (patches may
pick other convolution kernels than the full map). ``approximate=tau`` caps each box at
``tau`` of its layer's height and width (Nakandala et al.'s projective-field threshold):
faster, no longer exact.
"""

from __future__ import annotations

import contextlib
import math
import operator
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["IncrementalRunner", "Unsupported", "trace_model"]


class Unsupported(Exception):
    """The model cannot be run incrementally (tracing failed, unsafe in-place ops, or the
    traced graph does not reproduce the model); callers fall back to full forwards."""


# ------------------------------------------------------------------------ tracing


class _Tracer(fx.Tracer):
    """An fx tracer that also records the node each named module returned."""

    def __init__(self) -> None:
        super().__init__()
        self.module_outputs: dict[str, list[fx.Node]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # Convolutions and pools stay whole, subclasses included: the runner bounds the
        # plain ones and timm's TF-"same" ones (whose padding depends on the input size,
        # which fx cannot trace through), and recomputes any other in full.
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        try:
            name = self.path_of_module(m)
        except NameError:
            return out
        if isinstance(out, fx.Proxy):
            self.module_outputs.setdefault(name, []).append(out.node)
        return out


@dataclass
class Traced:
    graph: fx.Graph
    module_outputs: dict[str, list[fx.Node]]


# model -> (its modules by name and identity, the trace); see trace_model.
_TRACES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], Traced]] = (
    weakref.WeakKeyDictionary()
)


def trace_model(model: nn.Module, *, cached: bool = True) -> Traced:
    """Symbolically trace ``model``; :class:`Unsupported` if fx cannot. The trace is kept
    per model while its modules stay the same objects under the same names (callers
    check the traced graph against the model anyway, and retrace on a mismatch)."""
    key = tuple((name, id(m)) for name, m in model.named_modules())
    hit = _TRACES.get(model)
    if cached and hit is not None and hit[0] == key:
        return hit[1]
    traced = _trace(model)
    _TRACES[model] = (key, traced)
    return traced


def _trace(model: nn.Module) -> Traced:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # data-dependent control flow, unsupported Python
        why = (str(e).strip().splitlines() or [""])[0]
        raise Unsupported(f"torch.fx cannot trace the model ({type(e).__name__}: {why})") from e
    return Traced(graph, tracer.module_outputs)


# ---------------------------------------------------------------- op classification

_INPLACE_FUNCS: dict[Any, Any] = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}

_BINARY_FUNCS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
}
_BINARY_METHODS = {"add", "sub", "mul", "div", "maximum", "minimum"}

_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.Dropout1d,
    nn.AlphaDropout,
)
_POINTWISE_FUNCS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
    F.dropout,
    F.dropout2d,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.abs,
    torch.neg,
    torch.clamp,
    torch.nn.functional.sigmoid,
    torch.nn.functional.tanh,
    operator.neg,
}
_POINTWISE_METHODS = {
    "relu",
    "sigmoid",
    "tanh",
    "exp",
    "abs",
    "neg",
    "clamp",
    "clip",
    "contiguous",
    "float",
    "to",
}
# Ops that need the whole map by nature: recomputing them in full is no loss.
_GLOBAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveAvgPool1d,
    nn.Flatten,
    nn.Linear,
)
_GLOBAL_FUNCS = {
    torch.flatten,
    torch.mean,
    torch.sum,
    torch.amax,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.linear,
}
_GLOBAL_METHODS = {"mean", "sum", "amax", "flatten", "view", "reshape"}
# In-place methods without an equivalent out-of-place form here.
_MUTATING_METHODS = {"copy_", "fill_", "zero_", "set_", "index_put_", "scatter_", "resize_"}


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCS or bool(node.kwargs.get("inplace", False))
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    return False


def _check_inplace_safety(nodes: Sequence[fx.Node], modules: dict[str, nn.Module]) -> None:
    """Ops run out of place here; that is only safe when nothing reads the mutated tensor
    after the in-place op."""
    order = {n: i for i, n in enumerate(nodes)}
    for n in nodes:
        if n.op == "call_function" and n.target is operator.setitem:
            raise Unsupported("the model assigns into a tensor (x[...] = y)")
        if n.op == "call_method" and str(n.target) in _MUTATING_METHODS:
            raise Unsupported(f"the model mutates a tensor with .{n.target}()")
        if not _is_inplace(n, modules) or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        mutated = n.args[0]
        later = [u for u in mutated.users if u is not n and order.get(u, -1) > order[n]]
        if later:
            raise Unsupported(
                f"{n.name} changes {mutated.name} in place and {later[0].name} reads it after"
            )


def _fetch_attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))
    return int(v), int(v)


def _fresh(out: Any, inp: torch.Tensor) -> bool:
    """Whether ``out`` is a new tensor, sharing no memory with ``inp``."""
    return (
        isinstance(out, torch.Tensor)
        and out.untyped_storage().data_ptr() != inp.untyped_storage().data_ptr()
    )


def _live_bytes(states: Iterable[Any]) -> int:
    """Bytes held by the tensors of ``states``, each storage counted once."""
    seen: dict[int, int] = {}
    for st in states:
        v = st.data if isinstance(st, _Patch) else getattr(st, "value", st)
        if isinstance(v, torch.Tensor):
            storage = v.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _timm_same(mod: nn.Module) -> bool:
    """timm's TF-"same" convolution or max pool (padding computed from the input size)."""
    cls = type(mod)
    return cls.__module__.startswith("timm.") and cls.__name__ in ("Conv2dSame", "MaxPool2dSame")


def _window_kind(mod: nn.Module) -> str | None:
    """``"conv"``, ``"maxpool"`` or ``"avgpool"`` for the modules whose regions the runner
    bounds: torch's own (a subclass only if it keeps their forward) and timm's
    TF-"same" ones; ``None`` for anything else, which is recomputed in full."""
    cls: Any = type(mod)
    if isinstance(mod, nn.Conv2d) and (
        _timm_same(mod)
        or (cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward)
    ):
        return "conv"
    if isinstance(mod, nn.MaxPool2d) and (_timm_same(mod) or cls.forward is nn.MaxPool2d.forward):
        return "maxpool"
    if isinstance(mod, nn.AvgPool2d) and cls.forward is nn.AvgPool2d.forward:
        return "avgpool"
    return None


def _same_padding(size: int, k: int, s: int, d: int) -> int:
    """The top (left) padding of TensorFlow's "same" (timm's ``pad_same``): the total
    ``max((ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)``, its smaller half first."""
    total = max((_ceil_div(size, s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


# --------------------------------------------------------------------- states


@dataclass
class _Patch:
    """The values of a 4-D node ``[B, C, h, w]`` on one box per window: rows
    ``ys[b] .. ys[b] + h`` and columns ``xs[b] .. xs[b] + w`` of the full map. Outside its
    box a window's values equal the kept unoccluded output."""

    data: torch.Tensor
    ys: list[int]
    xs: list[int]
    owned: bool = False  # data is this node's own tensor (may be changed in place)

    @property
    def h(self) -> int:
        return int(self.data.shape[-2])

    @property
    def w(self) -> int:
        return int(self.data.shape[-1])


@dataclass
class _Batched:
    """A value recomputed in full for every window (batch dimension first)."""

    value: Any


@dataclass
class _Box:
    ys: list[int]
    xs: list[int]
    h: int
    w: int


def _unify(
    lo: Sequence[int], hi: Sequence[int], size: int, tau: float | None
) -> tuple[list[int], int]:
    """One length for every window's interval ``[lo, hi)`` within ``[0, size)``: the longest
    (capped at ``tau * size`` when approximating), each start moved so it fits."""
    lo = [max(0, v) for v in lo]
    hi = [min(size, v) for v in hi]
    length = max(1, *(h - lo_ for lo_, h in zip(lo, hi)))
    if tau is not None:
        length = max(1, min(length, math.ceil(tau * size)))
    starts = []
    for a, b in zip(lo, hi):
        start = a if b - a <= length else (a + b - length) // 2  # centred when capped
        starts.append(min(max(start, 0), size - length))
    return starts, min(length, size)


_CL = torch.channels_last


@contextlib.contextmanager
def _threads(n: int, device: torch.device) -> Iterator[None]:
    """Run the block with ``n`` CPU threads (a no-op off the CPU)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gather(src: torch.Tensor, box: _Box, margins: tuple[int, int]) -> torch.Tensor:
    """``[B, C, h, w]`` (channels-last) crops of ``src`` ``[1, C, H', W']``, padded by
    ``margins`` = (top, left), at each window's box."""
    mt, ml = margins
    h, w = box.h, box.w
    hwc = src[0].permute(1, 2, 0)  # [H', W', C]: the stack is [B, h, w, C], channels-last
    out = torch.stack(
        [hwc[y + mt : y + mt + h, x + ml : x + ml + w] for y, x in zip(box.ys, box.xs)]
    )
    return out.permute(0, 3, 1, 2)


def _paste(out: torch.Tensor, box: _Box, patch: _Patch) -> torch.Tensor:
    """Write each window's patch over ``out`` (values on ``box``) where they overlap, in
    place: one copy when the patch sits at the same place in every box, else one per
    window."""
    ph, pw = patch.h, patch.w
    dst = out.permute(0, 2, 3, 1)  # [B, h, w, C] views: rows of C contiguous values
    src = patch.data.permute(0, 2, 3, 1)
    offsets = [(py - y, px - x) for py, px, y, x in zip(patch.ys, patch.xs, box.ys, box.xs)]
    whole = len(set(offsets)) == 1
    for b, (dy, dx) in enumerate(offsets[:1] if whole else offsets):
        r0, r1 = max(0, dy), min(box.h, dy + ph)
        c0, c1 = max(0, dx), min(box.w, dx + pw)
        if r0 < r1 and c0 < c1:
            pick = slice(None) if whole else b
            dst[pick, r0:r1, c0:c1] = src[pick, r0 - dy : r1 - dy, c0 - dx : c1 - dx]
    return out


# ------------------------------------------------------------------------ runner


class IncrementalRunner:
    """Runs one traced model on one input, then on batches of occluded copies of it,
    recomputing only what each window can change. Build it inside ``no_grad`` and eval."""

    def __init__(
        self,
        model: nn.Module,
        traced: Traced,
        x: torch.Tensor,
        result_node: fx.Node | None = None,
        *,
        approximate: float | None = None,
    ) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        graph_nodes = list(traced.graph.nodes)
        out_node = next(n for n in graph_nodes if n.op == "output")
        if result_node is None:
            result_node = out_node.args[0]
            if not isinstance(result_node, fx.Node):
                raise Unsupported("the model does not return one tensor")
        self.result_node = result_node
        self.nodes = self._needed(graph_nodes, self.result_node)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if not placeholders:
            raise Unsupported("the traced graph does not read its input")
        self.input_node = placeholders[0]
        _check_inplace_safety(graph_nodes, self.modules)
        self.tau = approximate
        self.x = x.contiguous(memory_format=_CL)  # channels-last: faster convolutions
        self.dirty = self._downstream(self.input_node)
        self.last_use = self._last_uses()
        members = set(self.nodes)
        self.users = {n: [u for u in n.users if u in members] for n in self.nodes}
        self.cache: dict[fx.Node, Any] = {}
        self.notices: list[str] = []
        self._padded: dict[tuple[Any, ...], tuple[torch.Tensor, tuple[int, ...]]] = {}
        self._noticed: set[str] = set()
        self.threads = torch.get_num_threads()
        self._local = threading.local()  # per-call state: run_windows may run in threads
        self._lock = threading.Lock()
        self._affine: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- graph helpers

    @staticmethod
    def _needed(nodes: list[fx.Node], result: fx.Node) -> list[fx.Node]:
        keep: set[fx.Node] = set()
        stack = [result]
        while stack:
            n = stack.pop()
            if n in keep:
                continue
            keep.add(n)
            stack.extend(n.all_input_nodes)
        return [n for n in nodes if n in keep and n.op != "output"]

    def _downstream(self, start: fx.Node) -> set[fx.Node]:
        dirty = {start}
        for n in self.nodes:
            if any(a in dirty for a in n.all_input_nodes):
                dirty.add(n)
        return dirty

    def _last_uses(self) -> dict[fx.Node, int]:
        last: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a] = i
        return last

    # ---- plain execution (the unoccluded forward)

    def _exec(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run one node out of place (in-place ops would overwrite kept outputs)."""
        if node.op == "call_module":
            mod = self.modules[str(node.target)]
            if getattr(mod, "inplace", False) and args and isinstance(args[0], torch.Tensor):
                args = (args[0].clone(), *args[1:])
            return mod(*args, **kwargs)
        if node.op == "call_function":
            fn = _INPLACE_FUNCS.get(node.target, node.target)
            if kwargs.get("inplace"):
                kwargs = {**kwargs, "inplace": False}
            return fn(*args, **kwargs)
        if node.op == "call_method":
            name = str(node.target)
            obj = args[0]
            if name.endswith("_") and not name.endswith("__") and hasattr(obj, name[:-1]):
                name = name[:-1]
            return getattr(obj, name)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return _fetch_attr(self.model, str(node.target))
        raise Unsupported(f"unexpected node {node.op} {node.target}")

    def run_full(self) -> Any:
        """The unoccluded forward, keeping every node's output; returns the result node's."""
        for n in self.nodes:
            if n.op == "placeholder":
                if n is self.input_node:
                    self.cache[n] = self.x
                elif n.args:
                    self.cache[n] = n.args[0]  # a default value
                else:
                    raise Unsupported(f"the model needs a second input {n.name!r}")
                continue
            args = fx.node.map_arg(n.args, lambda a: self.cache[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: self.cache[a])
            self.cache[n] = self._exec(n, args, kwargs)
        return self.cache[self.result_node]

    # ---- regions

    def _padded_full(
        self,
        node: fx.Node,
        margins: tuple[int, int, int, int],
        value: float,
        channel: int | None,
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The kept output of ``node`` padded with ``value`` by at least ``margins`` (top,
        bottom, left, right), and the (top, left) padding it has. Cached for the run."""
        key = (node, value, channel)
        have = self._padded.get(key)
        if have is not None and all(h >= m for h, m in zip(have[1], margins)):
            t, m4 = have
            return t, (m4[0], m4[2])
        if have is not None:
            margins = tuple(max(h, m) for h, m in zip(have[1], margins))  # type: ignore[assignment]
        full = self.cache[node]
        if channel is not None:
            full = full[:, channel : channel + 1]
        mt, mb, ml, mr = margins
        t = F.pad(full, (ml, mr, mt, mb), value=value) if any(margins) else full
        self._padded[key] = (t, margins)
        return t, (mt, ml)

    def region(
        self,
        node: fx.Node,
        state: Any,
        box: _Box,
        pad: float = 0.0,
        channel: int | None = None,
    ) -> torch.Tensor:
        """``[B, C, h, w]``: ``node``'s values on each window's box (which may reach outside
        the map, where ``pad`` fills in), the window's patch pasted over the kept output."""
        if isinstance(state, _Patch) and (state.h, state.w, state.ys, state.xs) == (
            box.h,
            box.w,
            box.ys,
            box.xs,
        ):
            data = state.data
            return data if channel is None else data[:, channel : channel + 1]
        full = self.cache[node]
        H, W = int(full.shape[-2]), int(full.shape[-1])
        margins = (
            max(0, -min(box.ys)),
            max(0, max(box.ys) + box.h - H),
            max(0, -min(box.xs)),
            max(0, max(box.xs) + box.w - W),
        )
        src, offset = self._padded_full(node, margins, pad, channel)
        out = _gather(src, box, offset)
        if isinstance(state, _Patch):
            pdata = state.data if channel is None else state.data[:, channel : channel + 1]
            out = _paste(out, box, _Patch(pdata, state.ys, state.xs))
        return out

    def full_value(self, node: fx.Node, state: Any, B: int, channel: int | None = None) -> Any:
        """The whole value of ``node`` for every window."""
        if isinstance(state, _Patch):
            full = self.cache[node]
            H, W = int(full.shape[-2]), int(full.shape[-1])
            return self.region(node, state, _Box([0] * B, [0] * B, H, W), 0.0, channel)
        if isinstance(state, _Batched):
            v = state.value
            return v if channel is None else v[:, channel : channel + 1]
        return state

    # ---- the incremental pass

    def run_windows(
        self,
        boxes: Sequence[tuple[int, int, int, int]],
        baseline: torch.Tensor,
        *,
        threads: int | None = None,
    ) -> tuple[Any, int]:
        """The result node's value for each occluded copy of the input: window ``b`` replaces
        ``x[..., y0:y1, x0:x1]`` by ``baseline`` there. Returns that value (a
        :class:`_Patch`, a :class:`_Batched` or a constant) and the most bytes the call
        held at once (its values and the largest convolution input), which sizes
        automatic batches. ``threads``: CPU threads for the convolutions (default: as
        many as when the runner was made). Safe to call from several threads at once.

        Everything but the convolutions and pools runs on one CPU thread: gathers, pastes
        and pointwise ops on patches are small and memory-bound, and on a busy CPU a
        parallel one waits for the second thread far longer than it works."""
        env: dict[fx.Node, Any] = {}
        full_cache: dict[fx.Node, Any] = {}
        B = len(boxes)

        def full(a: fx.Node) -> Any:
            if a not in self.dirty:
                return self.cache[a]
            if a not in full_cache:
                full_cache[a] = self.full_value(a, env[a], B)
            return full_cache[a]

        self._local.temp = 0
        self._local.threads = threads or self.threads
        peak = 0
        with _threads(1, self.x.device):
            for i, n in enumerate(self.nodes):
                if n not in self.dirty:
                    continue
                if n is self.input_node:
                    env[n] = self._input_patch(boxes, baseline)
                else:
                    env[n] = self._step(n, env, B, full)
                for a in n.all_input_nodes:  # free what no later node reads
                    if self.last_use.get(a) == i and a is not self.result_node:
                        env.pop(a, None)
                        full_cache.pop(a, None)
                live = _live_bytes([*env.values(), *full_cache.values()])
                peak = max(peak, live + self._local.temp)
        if self.result_node not in self.dirty:
            return self.cache[self.result_node], peak
        return env[self.result_node], peak

    def _input_patch(
        self, boxes: Sequence[tuple[int, int, int, int]], baseline: torch.Tensor
    ) -> _Patch:
        H, W = int(self.x.shape[-2]), int(self.x.shape[-1])
        ys, h = _unify([b[0] for b in boxes], [b[1] for b in boxes], H, None)
        xs, w = _unify([b[2] for b in boxes], [b[3] for b in boxes], W, None)
        box = _Box(ys, xs, h, w)
        orig = _gather(self.x, box, (0, 0))
        dev = orig.device
        base = baseline.to(dev, orig.dtype)
        fill = _gather(base.unsqueeze(0) if base.ndim == 3 else base, box, (0, 0))
        r = torch.arange(h, device=dev)[None, :]
        c = torch.arange(w, device=dev)[None, :]
        y0 = torch.tensor([b[0] - y for b, y in zip(boxes, ys)], device=dev)[:, None]
        y1 = torch.tensor([b[1] - y for b, y in zip(boxes, ys)], device=dev)[:, None]
        x0 = torch.tensor([b[2] - x for b, x in zip(boxes, xs)], device=dev)[:, None]
        x1 = torch.tensor([b[3] - x for b, x in zip(boxes, xs)], device=dev)[:, None]
        inside = ((r >= y0) & (r < y1))[:, :, None] & ((c >= x0) & (c < x1))[:, None, :]
        return _Patch(torch.where(inside[:, None], fill, orig), ys, xs, owned=True)

    def _notice(self, node: fx.Node, what: str) -> None:
        with self._lock:
            if what in self._noticed:
                return
            self._noticed.add(what)
            self.notices.append(
                f"cannot bound the region that {what} changes: recomputing it, and what "
                "follows from it, in full for every window"
            )

    def _generic(self, n: fx.Node, env: dict[fx.Node, Any], B: int, full: Any) -> Any:
        partial = [
            a
            for a in n.all_input_nodes
            if isinstance(env.get(a), _Patch)
            and (env[a].h, env[a].w) != tuple(self.cache[a].shape[-2:])
        ]
        if partial and not self._is_global(n):
            self._notice(n, self._describe(n))
        args = fx.node.map_arg(n.args, full)
        kwargs = fx.node.map_arg(n.kwargs, full)
        value = self._exec(n, args, kwargs)
        ref = self.cache[n]
        if (
            isinstance(value, torch.Tensor)
            and isinstance(ref, torch.Tensor)
            and ref.ndim == 4
            and value.shape == (B, *ref.shape[1:])
        ):
            return _Patch(value, [0] * B, [0] * B)
        return _Batched(value)

    def _describe(self, n: fx.Node) -> str:
        if n.op == "call_module":
            return f"{n.target} ({type(self.modules[str(n.target)]).__name__})"
        if n.op == "call_function":
            return getattr(n.target, "__name__", str(n.target))
        return f".{n.target}()"

    def _is_global(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            return isinstance(self.modules[str(n.target)], _GLOBAL_MODULES)
        if n.op == "call_function":
            return n.target in _GLOBAL_FUNCS
        return n.op == "call_method" and str(n.target) in _GLOBAL_METHODS

    def _step(self, n: fx.Node, env: dict[fx.Node, Any], B: int, full: Any) -> Any:
        first = n.args[0] if n.args else None
        st = env.get(first) if isinstance(first, fx.Node) else None
        if n.op == "call_module":
            mod = self.modules[str(n.target)]
            if isinstance(st, _Patch) and len(n.args) == 1 and not n.kwargs:
                first = cast(fx.Node, first)  # st is a _Patch only for a node argument
                kind = _window_kind(mod)
                if kind == "conv" and cast(nn.Conv2d, mod).padding_mode == "zeros":
                    return self._conv(n, first, st, cast(nn.Conv2d, mod))
                if kind == "maxpool" and not cast(nn.MaxPool2d, mod).return_indices:
                    return self._pool(n, first, st, mod)
                if kind == "avgpool" and self._avgpool_ok(cast(nn.AvgPool2d, mod), n, first):
                    return self._pool(n, first, st, mod)
                if self._eval_bn(mod) and self._may_overwrite(first, st):
                    scale, shift = self._bn_affine(mod)
                    # One in-place pass (no new tensor); equal to batch_norm up to
                    # float32 round-off.
                    data = torch.addcmul(shift, st.data, scale, out=st.data)
                    return _Patch(data, st.ys, st.xs, owned=True)
                if isinstance(mod, _POINTWISE_MODULES) or self._eval_bn(mod):
                    data = st.data
                    if getattr(mod, "inplace", False) and not self._may_overwrite(first, st):
                        data = data.clone()
                    out = mod(data)
                    return _Patch(out, st.ys, st.xs, owned=_fresh(out, st.data) or out is data)
            return self._generic(n, env, B, full)
        if n.op == "call_function":
            if n.target in _BINARY_FUNCS or n.target in _INPLACE_FUNCS:
                return self._elementwise(n, env, B, full)
            if n.target in _POINTWISE_FUNCS or n.target is F.batch_norm:
                return self._pointwise_call(n, env, B, full)
            if n.target is torch.cat:
                return self._cat(n, env, B, full)
            if n.target is getattr and isinstance(st, _Patch):
                first = cast(fx.Node, first)  # st is a _Patch only for a node argument
                if n.args[1] == "shape":
                    return torch.Size((B, *self.cache[first].shape[1:]))
                if n.args[1] in ("dtype", "device", "ndim"):
                    return self.cache[n]
            return self._generic(n, env, B, full)
        if n.op == "call_method":
            name = str(n.target).rstrip("_") if str(n.target).endswith("_") else str(n.target)
            if isinstance(st, _Patch):
                first = cast(fx.Node, first)  # st is a _Patch only for a node argument
                if name == "size":
                    size = torch.Size((B, *self.cache[first].shape[1:]))
                    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
                    return size if dim is None else size[int(dim)]  # type: ignore[arg-type]
                if name == "dim":
                    return self.cache[n]
            if name in _BINARY_METHODS:
                return self._elementwise(n, env, B, full)
            if name in _POINTWISE_METHODS:
                return self._pointwise_call(n, env, B, full)
            return self._generic(n, env, B, full)
        return self._generic(n, env, B, full)

    def _may_overwrite(self, node: fx.Node, st: _Patch) -> bool:
        """Whether ``node``'s patch may be changed in place: its own tensor, read by no
        one else, and not the result."""
        return st.owned and len(self.users[node]) == 1 and node is not self.result_node

    def _bn_affine(self, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """An eval BatchNorm as ``x * scale + shift`` (``[1, C, 1, 1]`` each), cached."""
        with self._lock:
            got = self._affine.get(bn)
            if got is None:
                # Called only where _eval_bn(bn) held: a BatchNorm with running statistics.
                bn = cast(nn.modules.batchnorm._BatchNorm, bn)
                mean, var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
                scale = torch.rsqrt(var + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight
                shift = -mean * scale
                if bn.bias is not None:
                    shift = shift + bn.bias
                got = (scale.detach().view(1, -1, 1, 1), shift.detach().view(1, -1, 1, 1))
                self._affine[bn] = got
            return got

    @staticmethod
    def _eval_bn(mod: nn.Module) -> bool:
        return (
            isinstance(mod, nn.modules.batchnorm._BatchNorm)
            and not mod.training
            and mod.running_mean is not None
            and mod.running_var is not None
        )

    def _avgpool_ok(self, mod: nn.AvgPool2d, n: fx.Node, src: fx.Node) -> bool:
        k, s, p = _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size), _pair(mod.padding)
        if any(p) and not mod.count_include_pad:
            return False
        if not mod.ceil_mode:
            return True
        H, W = self.cache[src].shape[-2:]
        Ho, Wo = self.cache[n].shape[-2:]
        # ceil_mode is harmless when no window reaches past the padded border
        return (Ho - 1) * s[0] + k[0] <= H + 2 * p[0] and (Wo - 1) * s[1] + k[1] <= W + 2 * p[1]

    # ---- receptive-field bookkeeping

    def _out_box(
        self,
        st: _Patch,
        out_hw: tuple[int, int],
        k: tuple[int, int],
        s: tuple[int, int],
        p: tuple[int, int],
        d: tuple[int, int],
    ) -> _Box:
        """Outputs whose receptive field meets each window's input box (one size for all)."""
        spans = []
        for axis, starts, length in ((0, st.ys, st.h), (1, st.xs, st.w)):
            lo = [_ceil_div(a + p[axis] - d[axis] * (k[axis] - 1), s[axis]) for a in starts]
            hi = [(a + length - 1 + p[axis]) // s[axis] + 1 for a in starts]
            spans.append(_unify(lo, hi, out_hw[axis], self.tau))
        (ys, h), (xs, w) = spans
        return _Box(ys, xs, h, w)

    def _window_op(
        self,
        n: fx.Node,
        src: fx.Node,
        st: _Patch,
        k: tuple[int, int],
        s: tuple[int, int],
        p: tuple[int, int],
        d: tuple[int, int],
        pad_value: float,
        fn: Callable[[torch.Tensor], torch.Tensor],
        whole: Callable[[torch.Tensor], torch.Tensor],
    ) -> _Patch:
        """A convolution or pool on each window's region: ``fn`` runs on the receptive
        field of the outputs the window can change (padding taken from ``pad_value``);
        ``whole`` is the layer itself, for when the window changes every output."""
        ref = self.cache[n]
        out = self._out_box(st, (int(ref.shape[-2]), int(ref.shape[-1])), k, s, p, d)
        H, W = (int(v) for v in self.cache[src].shape[-2:])
        if (st.h, st.w, out.h, out.w) == (H, W, *ref.shape[-2:]):
            # Every window changes the whole map: the layer itself, padding and all.
            with _threads(self._local.threads, st.data.device):
                return _Patch(whole(st.data), out.ys, out.xs, owned=True)
        in_box = _Box(
            [y * s[0] - p[0] for y in out.ys],
            [x * s[1] - p[1] for x in out.xs],
            (out.h - 1) * s[0] + d[0] * (k[0] - 1) + 1,
            (out.w - 1) * s[1] + d[1] * (k[1] - 1) + 1,
        )
        region = self.region(src, st, in_box, pad_value)
        self._local.temp = max(self._local.temp, int(region.nbytes))
        # Data movement and pointwise work run on one thread (memory-bound; see
        # run_windows); the convolution itself gets every thread.
        with _threads(self._local.threads, region.device):
            data = fn(region)
        return _Patch(data, out.ys, out.xs, owned=True)

    def _conv(self, n: fx.Node, src: fx.Node, st: _Patch, mod: nn.Conv2d) -> _Patch:
        k, s, d = _pair(mod.kernel_size), _pair(mod.stride), _pair(mod.dilation)
        if _timm_same(mod):
            p = self._same(src, k, s, d)
        elif isinstance(mod.padding, str):  # "valid" or "same" (stride 1): left/top pads
            p = (
                (0, 0)
                if mod.padding == "valid"
                else (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
            )
        else:
            p = _pair(mod.padding)

        def conv(t: torch.Tensor) -> torch.Tensor:
            return F.conv2d(t, mod.weight, mod.bias, s, 0, d, mod.groups)

        return self._window_op(n, src, st, k, s, p, d, 0.0, conv, mod)

    def _same(
        self, src: fx.Node, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int]
    ) -> tuple[int, int]:
        """Top and left padding of TF-"same" on ``src``'s map (the bottom and right ones
        follow from the output size, which the kept output gives)."""
        H, W = (int(v) for v in self.cache[src].shape[-2:])
        return _same_padding(H, k[0], s[0], d[0]), _same_padding(W, k[1], s[1], d[1])

    def _pool(self, n: fx.Node, src: fx.Node, st: _Patch, mod: nn.Module) -> _Patch:
        k = _pair(mod.kernel_size)
        s = _pair(mod.stride or mod.kernel_size)
        p = _pair(mod.padding)
        if isinstance(mod, nn.MaxPool2d):
            d = _pair(mod.dilation)
            if _timm_same(mod):
                p = self._same(src, k, s, d)

            def pool(t: torch.Tensor) -> torch.Tensor:
                return F.max_pool2d(t, k, s, 0, d)

            return self._window_op(n, src, st, k, s, p, d, -math.inf, pool, mod)

        divisor = cast(nn.AvgPool2d, mod).divisor_override  # _window_kind: max or avg pool

        def avg(t: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(t, k, s, 0, False, True, divisor)

        return self._window_op(n, src, st, k, s, p, (1, 1), 0.0, avg, mod)

    # ---- elementwise

    def _spatial_operands(
        self, n: fx.Node, env: dict[fx.Node, Any], nodes: Iterable[fx.Node]
    ) -> tuple[list[fx.Node], bool] | None:
        """The operands that are patches, and whether one is a batched value broadcast over
        the map (a gate), which makes the whole map change. ``None``: not elementwise here."""
        ref = self.cache[n]
        if not isinstance(ref, torch.Tensor) or ref.ndim != 4 or ref.shape[0] != 1:
            return None
        hw = tuple(ref.shape[-2:])
        patches, broadcast = [], False
        for a in nodes:
            v = self.cache[a]
            if not isinstance(v, torch.Tensor):
                if a in self.dirty:
                    return None
                continue
            spatial = v.ndim >= 2 and tuple(v.shape[-2:]) == hw and hw != (1, 1)
            if a in self.dirty:
                st = env[a]
                if isinstance(st, _Patch):
                    if v.ndim != 4 or v.shape[0] != 1:
                        return None
                    patches.append(a)
                elif spatial or v.ndim < 2 or v.ndim > 4:
                    return None  # a batched map, or an odd shape
                else:
                    broadcast = True
            elif spatial and (v.ndim != 4 or v.shape[0] != 1):
                return None
        if not patches:
            return None
        return patches, broadcast

    def _union_box(
        self, n: fx.Node, env: dict[fx.Node, Any], patches: list[fx.Node], B: int, whole: bool
    ) -> _Box:
        H, W = (int(v) for v in self.cache[n].shape[-2:])
        if whole:
            return _Box([0] * B, [0] * B, H, W)
        sts = [env[a] for a in patches]
        ys, h = _unify(
            [min(st.ys[b] for st in sts) for b in range(B)],
            [max(st.ys[b] + st.h for st in sts) for b in range(B)],
            H,
            None,
        )
        xs, w = _unify(
            [min(st.xs[b] for st in sts) for b in range(B)],
            [max(st.xs[b] + st.w for st in sts) for b in range(B)],
            W,
            None,
        )
        return _Box(ys, xs, h, w)

    def _operand(self, a: Any, env: dict[fx.Node, Any], box: _Box, hw: tuple[int, ...]) -> Any:
        if not isinstance(a, fx.Node):
            return a
        v = self.cache[a]
        if a in self.dirty:
            st = env[a]
            if isinstance(st, _Patch):
                return self.region(a, st, box)
            return st.value if isinstance(st, _Batched) else st
        if isinstance(v, torch.Tensor) and v.ndim == 4 and tuple(v.shape[-2:]) == hw:
            return self.region(a, None, box)
        return v

    def _elementwise(self, n: fx.Node, env: dict[fx.Node, Any], B: int, full: Any) -> Any:
        found = self._spatial_operands(n, env, n.all_input_nodes)
        if found is None:
            return self._generic(n, env, B, full)
        patches, whole = found
        box = self._union_box(n, env, patches, B, whole)
        hw = tuple(self.cache[n].shape[-2:])
        args: Any = fx.node.map_arg(n.args, lambda a: self._operand(a, env, box, hw))
        kwargs: Any = fx.node.map_arg(n.kwargs, lambda a: self._operand(a, env, box, hw))
        if n.target in (operator.add, operator.iadd, torch.add) and len(n.args) == 2:
            for i, a in enumerate(n.args):  # a residual sum into a patch nobody else reads
                st = env.get(a) if isinstance(a, fx.Node) else None
                if (
                    not n.kwargs
                    and isinstance(st, _Patch)
                    and (st.h, st.w, st.ys, st.xs) == (box.h, box.w, box.ys, box.xs)
                    and self._may_overwrite(a, st)  # type: ignore[arg-type]
                ):
                    other = args[1 - i]
                    if isinstance(other, torch.Tensor) and (
                        torch.broadcast_shapes(st.data.shape, other.shape) == st.data.shape
                    ):
                        return _Patch(st.data.add_(other), box.ys, box.xs, owned=True)
        value = self._exec(n, args, kwargs)
        return _Patch(value, box.ys, box.xs, owned=True)

    def _pointwise_call(self, n: fx.Node, env: dict[fx.Node, Any], B: int, full: Any) -> Any:
        first = n.args[0] if n.args else None
        others = [a for a in n.all_input_nodes if a is not first]
        if (
            not isinstance(first, fx.Node)
            or not isinstance(env.get(first), _Patch)
            or any(a in self.dirty for a in others)
            or (n.target is F.batch_norm and self._bn_training(n))
        ):
            return self._generic(n, env, B, full)
        for a in others:  # per-channel or scalar constants only
            v = self.cache[a]
            if isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[-2:].numel() > 1:
                return self._generic(n, env, B, full)
        st = env[first]
        args = fx.node.map_arg(n.args, lambda a: st.data if a is first else self.cache[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self.cache[a])
        out = self._exec(n, args, kwargs)
        return _Patch(out, st.ys, st.xs, owned=_fresh(out, st.data))

    def _bn_training(self, n: fx.Node) -> bool:
        training = n.args[5] if len(n.args) > 5 else n.kwargs.get("training", False)
        running = n.args[1] if len(n.args) > 1 else n.kwargs.get("running_mean")
        return bool(training) or running is None

    def _cat(self, n: fx.Node, env: dict[fx.Node, Any], B: int, full: Any) -> Any:
        tensors = n.args[0] if n.args else n.kwargs.get("tensors")
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or dim not in (1, -3):
            return self._generic(n, env, B, full)
        nodes = [t for t in tensors if isinstance(t, fx.Node)]
        found = self._spatial_operands(n, env, nodes)
        if found is None or found[1] or len(nodes) != len(tensors):
            return self._generic(n, env, B, full)
        box = self._union_box(n, env, found[0], B, False)
        hw = tuple(self.cache[n].shape[-2:])
        parts = [self._operand(t, env, box, hw) for t in nodes]
        parts = [p if p.shape[0] == B else p.expand(B, -1, -1, -1) for p in parts]
        return _Patch(torch.cat(parts, dim=1), box.ys, box.xs, owned=True)
