"""Receptive fields: which input pixels each unit of a layer can see.

The model is traced once with ``torch.fx`` and every node's output size is propagated
(on PyTorch's ``meta`` device: no arithmetic, no memory). Then, per axis, each node that
depends on the input carries ``(S, lo, hi)``: its output index ``i`` reads input indices
``[i*S + lo, i*S + hi)``. The input is ``(1, 0, 1)``, and:

- a convolution or max/avg pool with kernel ``k``, stride ``s``, top/left padding ``p``
  and dilation ``d`` maps ``(S, lo, hi)`` to ``(s*S, lo - p*S, hi + (d*(k-1) - p)*S)``
  (timm's TF-"same" layers take ``p`` from their input size; reflect and replicate
  padding are bounded where they re-read pixels inside the window, circular is not);
  zero pads (``nn.ZeroPad2d``, constant ``F.pad``) shift ``lo`` and ``hi``;
- pointwise layers (BatchNorm in any mode, activations, dropout, casts) keep it;
- elementwise sums and products and channel concatenation take the hull of the operands
  that depend on the input (a parameter or a number is ignored); one that depends on it
  through a global op, such as a squeeze-excite gate, makes the result unbounded;
- anything else (upsampling, adaptive pooling, flatten, linear, a convolution subclass
  with a forward of its own, an unknown op) makes every later unit see the whole image,
  and the reason names the first such op.

Nodes that only read shapes (``x.size()``, ``x.shape[2]``) bound nothing by themselves.
A field is a hull: a dilated or strided-past kernel can leave pixels inside it unread,
and where an earlier layer drops trailing rows (stride that does not divide the size, no
padding) a later padded layer's field may count a few of them at the bottom/right border.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from convlens.analysis._incremental import (
    _BINARY_FUNCS,
    _BINARY_METHODS,
    _GLOBAL_FUNCS,
    _GLOBAL_METHODS,
    _GLOBAL_MODULES,
    _INPLACE_FUNCS,
    _POINTWISE_FUNCS,
    _POINTWISE_METHODS,
    _POINTWISE_MODULES,
    Traced,
    Unsupported,
    _fetch_attr,
    _pair,
    _same_padding,
    _timm_same,
    _window_kind,
    trace_model,
)
from convlens.models.forms import hooks_aside
from convlens.models.layers import evaluating, find_layers, trace_calls, unwrap

__all__ = ["ReceptiveField", "receptive_field"]


@dataclass(frozen=True)
class ReceptiveField:
    """Where one layer's units look in the input, in input pixels.

    Unit ``(y, x)`` of a bounded layer sees input rows ``[offset[0] + y*stride[0],
    offset[0] + y*stride[0] + size[0])`` and likewise columns, clipped to the input. An
    unbounded one (``bounded=False``, ``reason`` says why) sees the whole image: it is
    stored as ``stride=(0, 0)``, ``size=input_hw``, ``offset=(0, 0)``.

    Example:
        >>> rf = receptive_field(SimpleCNN(), "bn3", (1, 3, 64, 64))
        >>> rf.size, rf.stride, rf.offset, rf.box(0, 0)
        ((18, 18), (4, 4), (-7, -7), (0, 11, 0, 11))
    """

    layer: str
    input_hw: tuple[int, int]
    stride: tuple[int, int]
    size: tuple[int, int]
    offset: tuple[int, int]
    bounded: bool
    reason: str = ""

    def box(self, y: int, x: int) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)``, half-open and clipped to the input, of the pixels
        unit ``(y, x)`` sees (as ``occlude``'s ``box``); the whole image when unbounded.

        Example:
            >>> receptive_field(SimpleCNN(), "bn3", (1, 3, 64, 64)).box(5, 3)
            (13, 31, 5, 23)
        """
        y, x = _unit(y, "y"), _unit(x, "x")
        H, W = self.input_hw
        if not self.bounded:
            return 0, H, 0, W
        top, left = self.offset[0] + y * self.stride[0], self.offset[1] + x * self.stride[1]
        bottom, right = top + self.size[0], left + self.size[1]
        t, b, le, r = max(0, top), min(H, bottom), max(0, left), min(W, right)
        if t >= b or le >= r:
            raise ValueError(
                f"unit ({y}, {x}) of {self.layer!r} is outside the layer's map: its field, rows "
                f"[{top}, {bottom}) and columns [{left}, {right}), misses the {H}x{W} input; "
                "use a smaller index"
            )
        return t, b, le, r

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (tuples as lists).

        Example:
            >>> receptive_field(SimpleCNN(), "bn1", (1, 3, 64, 64)).to_dict()["size"]
            [3, 3]
        """
        return {
            "layer": self.layer,
            "input_hw": list(self.input_hw),
            "stride": list(self.stride),
            "size": list(self.size),
            "offset": list(self.offset),
            "bounded": self.bounded,
            "reason": self.reason,
        }


def _unit(v: Any, name: str) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an integer unit index, got {v!r}")
    try:
        i = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer unit index, got {type(v).__name__}") from None
    if i < 0:
        raise ValueError(f"{name} must be 0 or more (units count from the top-left), got {i}")
    return i


# ------------------------------------------------------------------------- states


@dataclass(frozen=True)
class _Span:
    """Output index ``i`` reads input indices ``[i*stride + lo, i*stride + hi)``, per axis."""

    stride: tuple[int, int]
    lo: tuple[int, int]
    hi: tuple[int, int]


@dataclass(frozen=True)
class _Whole:
    """Depends on the whole input; ``reason`` names the op that made it so."""

    reason: str


# None: the node does not depend on the input's values (a constant, a shape).
_State = _Span | _Whole | None

_INPUT = _Span((1, 1), (0, 0), (1, 1))

# Spatially pointwise beyond _incremental's lists (each position on its own).
_MORE_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LocalResponseNorm,
    nn.Softmax2d,
    nn.ChannelShuffle,
    nn.Threshold,
    nn.RReLU,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Hardshrink,
    nn.Softshrink,
)
_MORE_POINTWISE_METHODS = {"clone", "detach", "type", "type_as", "half", "double", "bfloat16"}
# Tensors whose values come from another tensor's shape only.
_SHAPE_FUNCS = {
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
    torch.rand_like,
    torch.randn_like,
}
_SHAPE_METHODS = {"new_zeros", "new_ones", "new_empty", "new_full", "size", "dim"}
_POOL_GLOBAL = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d)


@dataclass
class _Analysis:
    """One model at one input size: its layers' output nodes and every node's state when
    it was computed (an in-place op later may widen what its readers see)."""

    outputs: dict[str, list[fx.Node]]
    states: dict[fx.Node, _State]
    failure: str = ""  # why fx could not trace the model ("" when it could)


# model -> (its modules by name and identity, {input shape: analysis})
_CACHE: weakref.WeakKeyDictionary[
    nn.Module, tuple[tuple[Any, ...], dict[tuple[int, ...], _Analysis]]
] = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------ the API


def receptive_field(model: nn.Module, layer: str, input_shape: Sequence[int]) -> ReceptiveField:
    """The receptive field of ``layer``'s units for an input of ``input_shape``
    (``(N, C, H, W)``, or ``(C, H, W)``).

    ``layer`` is a dotted module name, ``name#k`` for call ``k`` of a module that runs
    several times. The model is traced once per model and input shape (later calls, for
    other layers, reuse it); nothing runs on real data unless the meta device cannot run
    the model. Its training flags are left as they were and no hook stays behind.
    DataParallel / DistributedDataParallel wrappers are unwrapped.

    Raises :class:`convlens.LayerNotFoundError` for an unknown name (with close matches),
    ``ValueError`` for a bare name of a module that runs more than once.

    Example:
        >>> rf = receptive_field(torchvision.models.resnet18(), "layer2", (1, 3, 224, 224))
        >>> rf.size, rf.stride, rf.offset
        ((99, 99), (8, 8), (-49, -49))
        >>> receptive_field(SimpleCNN(), "fc", (1, 3, 64, 64)).reason
        "'gap' (AdaptiveAvgPool2d) pools the whole map"
    """
    model = unwrap(model)
    shape = _check_shape(input_shape)
    ref = find_layers(model, [layer])[0]  # LayerNotFoundError with the closest names
    hw = (shape[2], shape[3])
    analysis = _analyse(model, shape)

    def whole(reason: str) -> ReceptiveField:
        return ReceptiveField(ref.key, hw, (0, 0), hw, (0, 0), False, reason)

    if analysis.failure:
        _pick_call(ref.name, ref.call, len(trace_calls(model, shape, [ref.name])[ref.name]))
        return whole(analysis.failure)
    nodes = analysis.outputs.get(ref.name, [])
    node = nodes[_pick_call(ref.name, ref.call, len(nodes))]
    state = analysis.states[node]
    if state is None:
        return whole(f"{ref.key!r} does not depend on the input")
    if isinstance(state, _Whole):
        return whole(state.reason)
    size = (state.hi[0] - state.lo[0], state.hi[1] - state.lo[1])
    return ReceptiveField(ref.key, hw, state.stride, size, state.lo, True)


def _check_shape(input_shape: Sequence[int]) -> tuple[int, int, int, int]:
    try:
        dims = [operator.index(v) for v in input_shape]
    except TypeError:
        raise TypeError(
            f"input_shape must be a sequence of ints such as (1, 3, 224, 224), got {input_shape!r}"
        ) from None
    if len(dims) == 3:
        dims = [1, *dims]
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(
            f"input_shape must be (N, C, H, W) (or (C, H, W)) with positive sizes, "
            f"e.g. (1, 3, 224, 224), got {tuple(input_shape)}"
        )
    return dims[0], dims[1], dims[2], dims[3]


def _pick_call(name: str, call: int | None, calls: int) -> int:
    if calls == 0:
        raise ValueError(
            f"layer {name!r} has no traced output: it never runs in the forward, or returns "
            "something other than one tensor; choose another layer"
        )
    if call is None:
        if calls > 1:
            raise ValueError(
                f"layer {name!r} runs {calls} times per forward: say which call, "
                f"{name}#0..{name}#{calls - 1}"
            )
        return 0
    if call >= calls:
        raise ValueError(
            f"layer {name!r} runs {calls} time(s) per forward; {name}#{call} does not exist "
            f"(use {name}#0..{name}#{calls - 1})"
        )
    return call


def _analyse(model: nn.Module, shape: tuple[int, int, int, int]) -> _Analysis:
    key = tuple((name, id(m)) for name, m in model.named_modules())
    hit = _CACHE.get(model)
    if hit is None or hit[0] != key:
        hit = (key, {})
        _CACHE[model] = hit
    by_shape = hit[1]
    if shape not in by_shape:
        by_shape[shape] = _compute(model, shape)
    return by_shape[shape]


def _compute(model: nn.Module, shape: tuple[int, int, int, int]) -> _Analysis:
    # A probe: the user's own hooks must not see fx's proxies or the size forward.
    with hooks_aside(model), evaluating(model), torch.no_grad():
        try:
            traced = trace_model(model)
        except Unsupported as e:
            return _Analysis({}, {}, failure=str(e))
        info = _propagate(model, traced, shape)
    return _Analysis(traced.module_outputs, _walk(model, traced.graph, info))


# ---------------------------------------------------------------- output sizes


@dataclass(frozen=True)
class _Info:
    tensor: bool  # the value holds a tensor (else it is a shape, a number, ...)
    shape: tuple[int, ...] | None  # its shape, when it is one tensor


def _propagate(
    model: nn.Module, traced: Traced, shape: tuple[int, int, int, int]
) -> dict[fx.Node, _Info]:
    """Each node's output shape for an input of ``shape``: on the meta device, else (an op
    the meta device cannot run) from a real forward of zeros."""
    try:
        return _run(model, traced.graph, shape, meta=True)
    except Exception:
        pass
    try:
        return _run(model, traced.graph, shape, meta=False)
    except Exception as e:
        why = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"the model cannot run on an input of shape {shape} ({type(e).__name__}: {why}); "
            "pass the input_shape it expects"
        ) from e


def _run(
    model: nn.Module, graph: fx.Graph, shape: tuple[int, int, int, int], *, meta: bool
) -> dict[fx.Node, _Info]:
    tensors = [*model.parameters(), *model.buffers()]
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    device = torch.device("meta") if meta else next((t.device for t in tensors), None)
    modules = dict(model.named_modules())
    states: dict[str, dict[str, torch.Tensor]] = {}
    values: dict[fx.Node, Any] = {}
    info: dict[fx.Node, _Info] = {}
    last_use = {a: n for n in graph.nodes for a in n.all_input_nodes}
    seen_input = False
    for n in graph.nodes:
        if n.op == "output":
            continue
        if n.op == "placeholder":
            if not seen_input:
                v: Any = torch.zeros(shape, dtype=dtype, device=device)
                seen_input = True
            elif n.args:
                v = n.args[0]  # a default value
            else:
                raise ValueError(f"the model's forward needs a second input {n.name!r}")
        else:
            args = fx.node.map_arg(n.args, values.__getitem__)
            kwargs = fx.node.map_arg(n.kwargs, values.__getitem__)
            if n.op == "get_attr":
                v = _fetch_attr(model, str(n.target))
                if meta and isinstance(v, torch.Tensor):
                    v = torch.empty_like(v, device="meta")
            elif n.op == "call_module":
                mod = modules[str(n.target)]
                if meta:
                    if n.target not in states:
                        states[str(n.target)] = {
                            k: torch.empty_like(t, device="meta")
                            for k, t in [*mod.named_parameters(), *mod.named_buffers()]
                        }
                    v = torch.func.functional_call(mod, states[str(n.target)], args, kwargs)
                else:
                    v = mod(*args, **kwargs)
            elif n.op == "call_function":
                v = cast(Any, n.target)(*args, **kwargs)
            else:  # call_method
                v = getattr(args[0], str(n.target))(*args[1:], **kwargs)
        values[n] = v
        info[n] = _Info(
            any(isinstance(t, torch.Tensor) for t in tree_leaves(v)),
            tuple(v.shape) if isinstance(v, torch.Tensor) else None,
        )
        for a in n.all_input_nodes:  # keep only what a later node reads
            if last_use.get(a) is n:
                values.pop(a, None)
    return info


# -------------------------------------------------------------------- the walk


def _walk(model: nn.Module, graph: fx.Graph, info: dict[fx.Node, _Info]) -> dict[fx.Node, _State]:
    """Every node's state when computed. ``live`` is what a later reader of a node sees:
    an in-place op changes it (``out += identity`` widens ``out``)."""
    modules = dict(model.named_modules())
    born: dict[fx.Node, _State] = {}
    live: dict[fx.Node, _State] = {}
    seen_input = False
    for n in graph.nodes:
        if n.op == "output":
            continue
        st: _State
        if n.op == "placeholder":
            st = None if seen_input else _INPUT
            seen_input = True
        elif not info[n].tensor or all(live[a] is None for a in n.all_input_nodes):
            st = None  # a shape or a number, or a value that does not read the input
        else:
            st = _step(n, modules, live, info)
        born[n] = live[n] = st
        if _inplace(n, modules) and isinstance(n.args[0], fx.Node):
            live[n.args[0]] = st
    return born


def _inplace(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if not n.args:
        return False
    if n.op == "call_module":
        return bool(getattr(modules.get(str(n.target)), "inplace", False))
    if n.op == "call_function":
        return n.target in _INPLACE_FUNCS or bool(n.kwargs.get("inplace", False))
    if n.op == "call_method":
        name = str(n.target)
        return name.endswith("_") and not name.endswith("__")
    return False


def _describe(n: fx.Node, modules: dict[str, nn.Module]) -> str:
    if n.op == "call_module":
        return f"'{n.target}' ({type(modules[str(n.target)]).__name__})"
    what = (
        f"'{getattr(n.target, '__name__', str(n.target))}'"
        if n.op == "call_function"
        else f"'.{n.target}()'"
    )
    stack = n.meta.get("nn_module_stack")
    inner = list(stack.values())[-1] if isinstance(stack, dict) and stack else None
    if isinstance(inner, tuple) and len(inner) == 2:  # (path, class) of the calling module
        return f"{what} in '{inner[0]}' ({getattr(inner[1], '__name__', inner[1])})"
    return what


def _step(
    n: fx.Node,
    modules: dict[str, nn.Module],
    live: dict[fx.Node, _State],
    info: dict[fx.Node, _Info],
) -> _State:
    """The state of ``n``, which reads the input (some operand's state is not None)."""
    desc = _describe(n, modules)
    operands = n.all_input_nodes
    for a in operands:  # a value that already saw the whole image passes it on
        whole = live[a]
        if isinstance(whole, _Whole):
            return whole
    first = n.args[0] if n.args else None
    src = first if isinstance(first, fx.Node) and len(operands) == 1 else None
    if n.op == "call_module":
        mod = modules[str(n.target)]
        if src is not None and len(n.args) == 1 and not n.kwargs:
            windowed = _window(mod, desc, cast(_Span, live[src]), info[src].shape)
            if windowed is not None:
                return windowed
        if isinstance(mod, (*_POINTWISE_MODULES, *_MORE_POINTWISE_MODULES)):
            return _combine(n, desc, operands, live, info)
        if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d)) and src is not None:
            return _pad(cast(_Span, live[src]), _pair4(mod.padding))
        return _Whole(_why(mod, desc))
    name = ""
    if n.op == "call_method":
        name = str(n.target)
        name = name[:-1] if name.endswith("_") and not name.endswith("__") else name
    if n.target in _SHAPE_FUNCS or name in _SHAPE_METHODS:
        return None
    if (
        n.target in _BINARY_FUNCS
        or n.target in _INPLACE_FUNCS
        or n.target in _POINTWISE_FUNCS
        or n.target is F.batch_norm
        or name in _BINARY_METHODS
        or name in _POINTWISE_METHODS
        or name in _MORE_POINTWISE_METHODS
    ):
        return _combine(n, desc, operands, live, info)
    if n.target is torch.cat:
        return _cat(n, desc, live, info)
    if n.target is F.pad and src is not None:
        pad = n.args[1] if len(n.args) > 1 else n.kwargs.get("pad")
        mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
        if mode == "constant" and isinstance(pad, (tuple, list)) and len(pad) in (2, 4, 6):
            return _pad(cast(_Span, live[src]), _pair4(pad))
        return _Whole(f"{desc} with mode {mode!r} cannot be bounded")
    if n.target in _GLOBAL_FUNCS or name in _GLOBAL_METHODS:
        return _Whole(f"{desc} reduces or reshapes the whole map")
    return _Whole(f"{desc} cannot be bounded")


def _why(mod: nn.Module, desc: str) -> str:
    if isinstance(mod, _POOL_GLOBAL):
        return f"{desc} pools the whole map"
    if isinstance(mod, _GLOBAL_MODULES):
        return f"{desc} flattens or mixes the whole map"
    if isinstance(mod, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and _window_kind(mod) is None:
        return f"{desc} has a forward of its own: cannot be bounded"
    return f"{desc} cannot be bounded"


def _pair4(pad: Any) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` of an ``F.pad``-style tuple (or one int)."""
    if isinstance(pad, int):
        return pad, pad, pad, pad
    p = [int(v) for v in pad]
    return p[0], p[1], (p[2] if len(p) > 2 else 0), (p[3] if len(p) > 3 else 0)


def _pad(st: _Span, pad: tuple[int, int, int, int]) -> _Span:
    left, _, top, _ = pad  # output index i is input index i - top (rows)
    (sy, sx), (ly, lx), (hy, hx) = st.stride, st.lo, st.hi
    return _Span(st.stride, (ly - top * sy, lx - left * sx), (hy - top * sy, hx - left * sx))


def _window(
    mod: nn.Module, desc: str, st: _Span, in_shape: tuple[int, ...] | None
) -> _State | None:
    """A convolution's or pool's state; ``None`` when ``mod`` is not one this bounds."""
    kind = _window_kind(mod)
    timm_avg = type(mod).__module__.startswith("timm.") and type(mod).__name__ == "AvgPool2dSame"
    if kind is None and not timm_avg:
        return None
    if in_shape is None or len(in_shape) != 4:
        return _Whole(f"{desc} reads a {len(in_shape or ())}-D tensor: cannot be bounded")
    size = (in_shape[2], in_shape[3])
    k = _pair(cast(Any, mod).kernel_size)
    s = _pair(cast(Any, mod).stride or cast(Any, mod).kernel_size)
    d = _pair(getattr(mod, "dilation", 1)) if kind != "avgpool" else (1, 1)
    padding = cast(Any, mod).padding
    if _timm_same(mod) or timm_avg:
        p = (_same_padding(size[0], k[0], s[0], d[0]), _same_padding(size[1], k[1], s[1], d[1]))
        after = p  # the bottom/right pads do not matter here
    elif padding == "valid":
        p = after = (0, 0)
    elif padding == "same":  # stride 1; the odd pad goes bottom/right
        p = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
        after = (d[0] * (k[0] - 1) - p[0], d[1] * (k[1] - 1) - p[1])
    else:
        p = after = _pair(padding)
    if kind == "maxpool" and cast(nn.MaxPool2d, mod).return_indices:
        return _Whole(f"{desc} returns indices: cannot be bounded")
    mode = getattr(mod, "padding_mode", "zeros")
    if mode != "zeros" and (any(p) or any(after)):
        # Reflect/replicate read pixels near the border again: still inside the window
        # when the pad is small enough; circular wraps around.
        reach = [d[i] * (k[i] - 1) for i in (0, 1)]
        factor = {"reflect": 2, "replicate": 1}.get(mode)
        if factor is None or any(factor * max(p[i], after[i]) > reach[i] for i in (0, 1)):
            return _Whole(f"{desc} pads with mode {mode!r}, which this cannot bound")
    stride = (s[0] * st.stride[0], s[1] * st.stride[1])
    lo = tuple(st.lo[i] - p[i] * st.stride[i] for i in (0, 1))
    hi = tuple(st.hi[i] + (d[i] * (k[i] - 1) - p[i]) * st.stride[i] for i in (0, 1))
    return _Span(stride, cast(tuple[int, int], lo), cast(tuple[int, int], hi))


def _combine(
    n: fx.Node,
    desc: str,
    operands: Sequence[fx.Node],
    live: dict[fx.Node, _State],
    info: dict[fx.Node, _Info],
) -> _State:
    """The hull of the operands that read the input (elementwise ops and concatenation);
    their maps must match the result's and share a stride."""
    spans = [(a, st) for a in operands if isinstance(st := live[a], _Span)]
    out = info[n].shape
    if out is None or len(out) != 4:
        return _Whole(f"{desc} does not return one [N, C, H, W] map: cannot be bounded")
    for a, _ in spans:
        got = info[a].shape
        if got is None or len(got) != 4 or got[2:] != out[2:]:
            where = "x".join(str(v) for v in (got or ())[2:]) or "non-map"
            return _Whole(
                f"{desc} broadcasts a {where} map over {out[2]}x{out[3]}: cannot be bounded"
            )
    strides = list(dict.fromkeys(st.stride for _, st in spans))
    if len(strides) > 1:
        return _Whole(f"{desc} combines maps of different strides {strides}: cannot be bounded")
    lo = (min(st.lo[0] for _, st in spans), min(st.lo[1] for _, st in spans))
    hi = (max(st.hi[0] for _, st in spans), max(st.hi[1] for _, st in spans))
    return _Span(strides[0], lo, hi)


def _cat(n: fx.Node, desc: str, live: dict[fx.Node, _State], info: dict[fx.Node, _Info]) -> _State:
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    out = info[n].shape
    if out is None or len(out) != 4 or not isinstance(dim, int) or dim % 4 != 1:
        return _Whole(f"{desc} along dim {dim} cannot be bounded (only channels, dim 1)")
    return _combine(n, desc, n.all_input_nodes, live, info)
