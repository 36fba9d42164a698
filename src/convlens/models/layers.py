"""Layer addressing: dotted ``named_modules()`` names, ``name#k`` for the k-th call of a
module that runs several times, and a listing of every layer with its output shape.

Shapes and call counts come from a trace on PyTorch's ``meta`` device (no arithmetic,
no memory), falling back to a real forward for models the meta device cannot run.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from convlens.device import DeviceLike, resolve_device
from convlens.errors import LayerNotFoundError
from convlens.models.forms import hooks_aside, is_scripted, model_dtype, require_hooks

__all__ = [
    "LayerInfo",
    "LayerRef",
    "evaluating",
    "find_layers",
    "frozen",
    "list_layers",
    "parse_layer",
    "trace_calls",
    "unwrap",
]

_CALL_RE = re.compile(r"^(?P<name>.*?)#(?P<call>\d+)$")


def _compiled_type() -> type | None:
    # torch.compile's wrapper; a model can only be compiled once torch._dynamo is imported,
    # so there is no need to import it (slow) to check.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None) if eval_frame is not None else None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``DataParallel`` / ``DistributedDataParallel`` wrappers and
    ``torch.compile``'s ``OptimizedModule`` (its ``_orig_mod``), in any nesting; else itself.

    Every compute function starts here, so layer names are the user's own and the original
    eager module is what runs (hooks sit on its modules; nothing gets compiled).

    Example:
        >>> net = SimpleCNN()
        >>> unwrap(torch.compile(nn.DataParallel(net))) is net
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    compiled = _compiled_type()
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


@dataclass(frozen=True)
class LayerRef:
    """A resolved layer name: the module, its dotted name and, for ``name#k``, the call."""

    name: str
    module: nn.Module = field(repr=False, compare=False)
    call: int | None = None

    @property
    def key(self) -> str:
        return self.name if self.call is None else f"{self.name}#{self.call}"


def parse_layer(spec: str) -> tuple[str, int | None]:
    """Split ``"layer1.0.relu#1"`` into ``("layer1.0.relu", 1)``; no ``#`` gives ``None``.

    Example:
        >>> parse_layer("pool#2"), parse_layer("layer4")
        (('pool', 2), ('layer4', None))
    """
    if not isinstance(spec, str):
        raise TypeError(f"layer names are strings, got {type(spec).__name__}")
    spec = spec.strip()
    if ":" in spec:
        raise ValueError(
            f"{spec!r}: ':' selects a channel (as in 'layer4:3'); pass the layer name alone"
        )
    m = _CALL_RE.match(spec)
    if m:
        return m.group("name"), int(m.group("call"))
    return spec, None


def _suggest(name: str, names: Sequence[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    children = [s for s in names if s.startswith(name + ".") and s not in close]
    lowered = [s for s in names if s.lower() == name.lower() and s not in close]
    return (lowered + close + children)[:n]


def find_layers(model: nn.Module, layers: str | Iterable[str]) -> list[LayerRef]:
    """Resolve layer names (dotted, optionally ``#k``) to modules of ``model``.

    Raises :class:`convlens.LayerNotFoundError` listing the closest names.

    Example:
        >>> [r.key for r in find_layers(torchvision.models.resnet18(), ["layer4", "relu#0"])]
        ['layer4', 'relu#0']
    """
    model = unwrap(model)
    require_hooks(model, "reading a layer by name")
    if isinstance(layers, str):
        layers = [s for s in layers.split(",") if s.strip()]
    refs: list[LayerRef] = []
    for spec in layers:
        name, call = parse_layer(spec)
        try:
            if not name:
                raise AttributeError(name)
            module = model.get_submodule(name)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            raise LayerNotFoundError(name, _suggest(name, names)) from None
        refs.append(LayerRef(name, module, call))
    if not refs:
        raise ValueError("no layer names given")
    return refs


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; restore every module's own training flag afterwards.

    Example:
        >>> with evaluating(model):
        ...     y = model(x)
    """
    was_training = [m for m in model.modules() if m.training]
    try:
        if was_training:  # an eval-mode model (the usual case) is left alone: no cost
            model.eval()
        yield model
    finally:
        for m in model.modules():
            if m.training:  # something switched it back on inside the block
                m.training = False
        for m in was_training:
            m.training = True


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter gradients inside (none computed, none accumulated); every
    ``requires_grad`` flag restored after, also on error.

    Example:
        >>> with frozen(model):
        ...     (g,) = torch.autograd.grad(model(x).sum(), x)  # no weight gradients
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _shape_of(out: Any) -> tuple[int, ...] | None:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    return None


def _meta_forward(model: nn.Module, x_shape: Sequence[int], dtype: torch.dtype) -> None:
    state: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():
        state[n] = torch.empty_like(p, device="meta")
    for n, b in model.named_buffers():
        state[n] = torch.empty_like(b, device="meta")
    x = torch.empty(tuple(x_shape), dtype=dtype, device="meta")
    torch.func.functional_call(model, state, (x,), strict=False)


def _real_forward(model: nn.Module, x_shape: Sequence[int], dtype: torch.dtype) -> None:
    dev = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
    model(torch.zeros(tuple(x_shape), dtype=dtype, device=dev))


def trace_calls(
    model: nn.Module,
    input_shape: Sequence[int],
    names: Iterable[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, list[tuple[int, ...] | None]]:
    """Run one forward (on the meta device when possible) and record, for each named module,
    the output shape of every call: ``{name: [shape_call0, shape_call1, ...]}``.

    ``dtype`` is the input's (default: the model's own, see
    :func:`convlens.models.forms.model_dtype`). Modules that never run map to ``[]``. The model's modes are restored and every hook
    removed, even on error. The model's own hooks are held aside during this probe (they
    never see its meta tensors) and are back, unchanged, afterwards.

    Example:
        >>> trace_calls(SimpleCNN(), (1, 3, 32, 32), ["pool"])
        {'pool': [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4)]}
    """
    model = unwrap(model)
    require_hooks(model, "tracing the calls of each layer")
    if dtype is None:
        dtype = model_dtype(model)
    modules = dict(model.named_modules())
    wanted = [n for n in modules if n] if names is None else list(names)
    calls: dict[str, list[tuple[int, ...] | None]] = {n: [] for n in wanted}

    def make_hook(n: str) -> Any:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            calls[n].append(_shape_of(out))

        return hook

    handles = []
    with hooks_aside(model):
        try:
            for n in wanted:
                handles.append(modules[n].register_forward_hook(make_hook(n)))
            with evaluating(model), torch.no_grad():
                try:
                    _meta_forward(model, input_shape, dtype)
                except Exception:  # data-dependent code or an op without a meta kernel
                    for v in calls.values():
                        v.clear()
                    _real_forward(model, input_shape, dtype)
        finally:
            for h in handles:
                h.remove()
    return calls


@dataclass(frozen=True)
class LayerInfo:
    """One addressable module: dotted name, type, output shape(s), calls per forward, and
    the number of parameters it holds (its submodules' included).

    Example:
        >>> info = convlens.list_layers(model, (1, 3, 224, 224))[1]
        >>> info.name, info.type, info.output_shape, info.params
    """

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    calls: int
    params: int
    output_shapes: tuple[tuple[int, ...] | None, ...] = ()
    depth: int = 0
    #: False where shapes and calls could not be measured (a TorchScript module takes no
    #: hooks): then ``output_shape`` is None and ``calls`` 0 mean "unknown".
    measured: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "output_shape": list(self.output_shape) if self.output_shape else None,
            "calls": self.calls if self.measured else None,
            "params": self.params,
        }


def list_layers(
    model: nn.Module,
    input_shape: Sequence[int] = (1, 3, 224, 224),
    *,
    device: DeviceLike | None = None,
) -> list[LayerInfo]:
    """Every addressable module of ``model`` in registration order, with its output shape
    for an input of ``input_shape`` and how many times it runs per forward.

    A module that runs ``n > 1`` times is captured as ``name#0 .. name#{n-1}``; one that
    never runs has ``calls == 0`` and no shape. Shapes come from the meta device (no
    arithmetic); only a model the meta device cannot run does a real forward, where the
    model is (``device=None``) or on ``device`` (the model is moved there, in place).
    A TorchScript module cannot take the hooks that measure shapes: its layers are listed
    by name, type and parameters, with ``measured=False`` (no shapes, no call counts).

    Example:
        >>> [(l.name, l.output_shape, l.calls) for l in list_layers(SimpleCNN())][-3:]
        [('pool', (1, 16, 112, 112), 3), ('gap', (1, 64, 1, 1), 1), ('fc', (1, 10), 1)]
    """
    model = unwrap(model)
    if len(input_shape) < 2:
        raise ValueError(
            f"input_shape needs a batch dimension, e.g. (1, 3, 224, 224), got {input_shape}"
        )
    if device is not None:
        model.to(resolve_device(device))
    if is_scripted(model):
        return [
            LayerInfo(
                name=name,
                type=str(getattr(module, "original_name", type(module).__name__)),
                output_shape=None,
                calls=0,
                params=sum(p.numel() for p in module.parameters()),
                depth=name.count(".") + 1,
                measured=False,
            )
            for name, module in model.named_modules()
            if name
        ]
    calls = trace_calls(model, input_shape)
    out = []
    for name, module in model.named_modules():
        if not name:
            continue
        shapes = calls.get(name, [])
        out.append(
            LayerInfo(
                name=name,
                type=type(module).__name__,
                output_shape=shapes[0] if shapes else None,
                calls=len(shapes),
                params=sum(p.numel() for p in module.parameters()),
                output_shapes=tuple(shapes),
                depth=name.count(".") + 1,
            )
        )
    return out
