"""What every attribution method shares: targets, the model as it is run, hygiene, batching.

- **Targets** (:func:`parse_targets`): a class index (one for all images, or one per
  image; default the top-1 class), ``"layer:channel"`` (the mean of a channel),
  ``"layer:channel@y,x"`` (one neuron), a list of such strings (one per image, same layer),
  or a callable on the model's output.
- **The scorer** (:class:`Scorer`): rows of inputs -> the target's value per row, a
  differentiable function. A layer target stops the forward right after the layer; a
  layer read for a CAM is kept in the graph (the hook hands the rest of the network a
  copy, so an in-place ReLU after it cannot change what was read).
- **Hygiene** (:func:`clean`): eval mode, parameters frozen (no weight gradients, so no
  ``.grad`` is ever accumulated: gradients are taken with ``torch.autograd.grad``), every
  hook of ours removed; flags restored, also on error.
- **Speed**: a BatchNorm-folded, channels-last structural copy of the model when the model
  carries no hooks of the user's (:func:`fast_model`), checked against the model.
- **Memory** (:func:`auto_rows`): rows per forward from the free memory of the device.
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from convlens._memory import _cgroup_free, available_memory  # noqa: F401 (their old home)
from convlens.device import DeviceLike, resolve_device
from convlens.models.forms import (
    HOOK_TABLES,
    OutputKey,
    dtype_support,
    is_scripted,
    model_dtype,
    require_hooks,
    select_output,
)
from convlens.models.layers import LayerRef, evaluating, find_layers, frozen, parse_layer, unwrap

__all__ = [
    "AttrTarget",
    "Scorer",
    "auto_rows",
    "available_memory",
    "clean",
    "fast_model",
    "parse_targets",
    "score_function",
    "top1_targets",
]

TargetSpec = Any  # int | str | Sequence[int | str] | Tensor | Callable | None

#: The share of the device's free memory one batch of rows may take (``batch="auto"``).
MEMORY_SHARE = 0.4
#: Most rows per batch on a CPU: larger batches gain nothing there and cost memory.
CPU_MAX_ROWS = 32
#: Up to this many rows in all, ``batch="auto"`` runs them at once without measuring the
#: model, and the model runs as it is (folding BatchNorms costs more than it saves).
SMALL_ROWS = 4


class _StopForward(BaseException):
    """Ends a forward right after the layer a target reads (a BaseException, so a model's
    own ``except Exception`` cannot swallow it)."""


# ------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class AttrTarget:
    """One image's target: ``kind`` is ``"class"``, ``"channel"``, ``"neuron"`` or
    ``"callable"``; ``index`` the class or the channel; ``y``/``x`` a neuron's position.

    Example:
        >>> parse_targets("layer2:3@4,5", 1)[0]
        AttrTarget(kind='neuron', spec='layer2:3@4,5', index=3, layer='layer2', call=None, y=4, x=5)
    """

    kind: str
    spec: str
    index: int | None = None
    layer: str | None = None
    call: int | None = None
    y: int | None = None
    x: int | None = None

    @property
    def layer_key(self) -> str | None:
        if self.layer is None:
            return None
        return self.layer if self.call is None else f"{self.layer}#{self.call}"


_TARGET_HELP = (
    "a class index (258), 'layer:channel' (the mean of a channel), 'layer:channel@y,x' "
    "(one neuron), a list of these (one per image) or a callable on the model's output"
)
_UNIT = re.compile(r"^(?P<layer>.+):(?P<ch>\d+)(?:@(?P<y>\d+),(?P<x>\d+))?$")


def _one(t: Any) -> AttrTarget:
    if isinstance(t, bool):
        raise TypeError(f"target must be {_TARGET_HELP}, got {t!r}")
    if isinstance(t, int) or (hasattr(t, "__index__") and not isinstance(t, str)):
        i = int(t)
        if i < 0:
            raise ValueError(f"target class {i} is negative: use {_TARGET_HELP}")
        return AttrTarget("class", str(i), i)
    if not isinstance(t, str):
        raise TypeError(f"target must be {_TARGET_HELP}, got {type(t).__name__}")
    spec = t.strip()
    if spec.isdigit():
        return AttrTarget("class", spec, int(spec))
    m = _UNIT.match(spec.replace(" ", ""))
    if m is None:
        raise ValueError(f"target {t!r}: expected {_TARGET_HELP}")
    name, call = parse_layer(m.group("layer"))
    if m.group("y") is None:
        return AttrTarget("channel", spec, int(m.group("ch")), name, call)
    return AttrTarget(
        "neuron", spec, int(m.group("ch")), name, call, int(m.group("y")), int(m.group("x"))
    )


def parse_targets(target: TargetSpec, n: int) -> list[AttrTarget] | Callable[..., Any]:
    """One :class:`AttrTarget` per image (``n`` images), or the callable itself.

    ``None`` is not resolved here (the caller fills in the top-1 classes). Unit targets of
    one call must read the same layer.

    Example:
        >>> [t.index for t in parse_targets([3, 5], 2)]
        [3, 5]
    """
    if callable(target) and not isinstance(target, (str, int, torch.Tensor)):
        return cast(Callable[..., Any], target)
    if isinstance(target, torch.Tensor):
        target = int(target) if target.ndim == 0 else [int(v) for v in target.flatten().tolist()]
    if isinstance(target, (list, tuple)):
        if len(target) != n:
            raise ValueError(
                f"{len(target)} targets for {n} image(s): give one target for all images "
                "or exactly one per image"
            )
        parsed = [_one(t) for t in target]
    else:
        parsed = [_one(target)] * n
    kinds = {t.kind for t in parsed}
    layers = {t.layer_key for t in parsed}
    if len(layers) > 1 or (len(kinds) > 1 and "class" in kinds):
        raise ValueError(
            "the targets of one call must all be classes or all read the same layer; got "
            + ", ".join(sorted({t.spec for t in parsed})[:4])
            + ": split them into separate calls"
        )
    return parsed


# ------------------------------------------------------------------------ hygiene


@contextlib.contextmanager
def clean(net: nn.Module) -> Iterator[None]:
    """Eval mode, frozen parameters and gradients enabled inside; the model's training
    flags and ``requires_grad`` restored after, also on error.

    Example:
        >>> with clean(model):
        ...     g = torch.autograd.grad(model(x).sum(), x)
    """
    with evaluating(net), frozen(net), torch.enable_grad():
        yield


def has_user_hooks(net: nn.Module) -> bool:
    """Whether any module of ``net`` carries a hook (the user's: convlens removes its own)."""
    return any(getattr(m, name, None) for m in net.modules() for name in HOOK_TABLES)


# model -> (key, folded copy or None): the fast copy, made once per model and input shape
_FAST: weakref.WeakKeyDictionary[nn.Module, tuple[Any, nn.Module | None, int]] = (
    weakref.WeakKeyDictionary()
)


def _param_key(net: nn.Module) -> tuple[Any, ...]:
    return tuple((p.data_ptr(), p._version) for p in net.parameters()) + tuple(
        (b.data_ptr(), b._version) for b in net.buffers()
    )


def fast_model(
    net: nn.Module, example: torch.Tensor, keep: set[str], check: Callable[[nn.Module], Any]
) -> tuple[nn.Module, int]:
    """``(model to run, BatchNorms folded)``: a structural copy of ``net`` with eval-mode
    BatchNorms folded into their convolutions and channels-last weights, when that is
    safe: the model carries no hooks of the user's (the copy would not run them), no layer
    in ``keep`` is a folded convolution, and ``check(copy)`` equals ``check(net)``.
    Otherwise ``(net, 0)``. The copy is kept per model while its weights are unchanged.

    Example:
        >>> run, folded = fast_model(net, x[:1], {"layer4"}, lambda m: m(x[:1]))
    """
    from convlens.analysis.featurevis._fold import fold_batchnorm

    if has_user_hooks(net) or model_dtype(net) != torch.float32:
        return net, 0
    key = (tuple(example.shape[1:]), example.device, tuple(sorted(keep)), _param_key(net))
    cached = _FAST.get(net)
    if cached is not None and cached[0] == key:
        return (cached[1], cached[2]) if cached[1] is not None else (net, 0)
    copy: nn.Module | None = None
    folded = 0
    with torch.no_grad():
        got = fold_batchnorm(net, example, keep)
        if got is not None:
            copy, folded = got
            if example.device.type == "cpu":
                copy.to(memory_format=torch.channels_last)
            try:
                a, b = check(net), check(copy)
            except Exception:
                a, b = None, None
            if not (
                isinstance(a, torch.Tensor)
                and isinstance(b, torch.Tensor)
                and a.shape == b.shape
                and torch.allclose(
                    a.float(), b.float(), rtol=1e-3, atol=1e-4 * (1 + float(a.abs().max()))
                )
            ):
                copy, folded = None, 0
    _FAST[net] = (key, copy, folded)
    return (copy, folded) if copy is not None else (net, 0)


# ------------------------------------------------------------------------ memory


# model -> {(input shape, dtype, stop layer): bytes one row holds in a forward + backward}
_ROW_BYTES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], float]] = (
    weakref.WeakKeyDictionary()
)


def row_bytes(net: nn.Module, shape: Sequence[int], dtype: torch.dtype) -> float:
    """Bytes one input row holds through a forward and backward: every module's output
    once for the forward (saved for backward) and once for its gradient, from one trace on
    the meta device (cached per model and input shape).

    Example:
        >>> row_bytes(SimpleCNN(), (3, 64, 64), torch.float32) > 0
        True
    """
    from convlens.models.layers import trace_calls

    key = (tuple(shape), dtype)
    known = _ROW_BYTES.setdefault(net, {})
    if key not in known and is_scripted(net):  # no hooks to measure it: 32 maps like the input
        known[key] = 2.0 * 4 * 32 * math.prod(shape)
    if key not in known:
        calls = trace_calls(net, (1, *shape), dtype=dtype)
        size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
        leaves = {n for n, m in net.named_modules() if not any(True for _ in m.children())}
        total = sum(math.prod(s) for n, shapes in calls.items() if n in leaves for s in shapes if s)
        known[key] = 2.0 * size * max(total, math.prod(shape))
    return known[key]


def auto_rows(rows: int, per_row: float, device: torch.device, *, memory: int | None = None) -> int:
    """Rows per batch: as many as fit :data:`MEMORY_SHARE` of the free memory (at most
    :data:`CPU_MAX_ROWS` on a CPU), evened out so the last batch is not a small remainder.

    Example:
        >>> auto_rows(400, 50e6, torch.device("cpu"), memory=2**30)  # 0.4 GiB / 50 MB
        8
    """
    if rows <= 0:
        return 1
    free = available_memory(device) if memory is None else memory
    most = max(1, int(MEMORY_SHARE * free // max(per_row, 1.0)))
    if device.type == "cpu":
        most = min(most, CPU_MAX_ROWS)
    most = min(most, rows)
    return math.ceil(rows / math.ceil(rows / most))


def batch_rows(batch: int | str, rows: int, per_row: Callable[[], float], dev: torch.device) -> int:
    """``batch`` as given (a positive int) or sized by :func:`auto_rows` for ``"auto"``."""
    if batch == "auto":
        if rows <= SMALL_ROWS:  # a handful of rows: no trace needed to size them
            return max(rows, 1)
        return auto_rows(rows, per_row(), dev)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int or 'auto', got {batch!r}")
    return batch


# ------------------------------------------------------------------------ the scorer


class Scorer:
    """The targets' values for rows of inputs: ``scorer(xb, rows) -> [B]`` (float32),
    differentiable with respect to ``xb``; ``rows[b]`` is the image row ``b`` belongs to.

    ``read``: a layer whose output is kept in the graph for the CAM family
    (``scorer.activation`` after a call). A layer target stops the forward at its layer.

    Example:
        >>> s = Scorer(model, parse_targets(3, 1))
        >>> s(x, torch.zeros(1, dtype=torch.long)).shape
        torch.Size([1])
    """

    def __init__(
        self,
        net: nn.Module,
        targets: list[AttrTarget] | Callable[..., Any],
        *,
        output: OutputKey | None = None,
        read: str | None = None,
        probability: bool = False,
    ) -> None:
        self.net = net
        self.targets = targets
        self.output = output
        self.output_key: OutputKey | None = None
        self.probability = probability
        self.activation: torch.Tensor | None = None
        self.tlayer: LayerRef | None = None
        self.read: LayerRef | None = None
        if not callable(targets) and targets[0].kind != "class":
            key = cast(str, targets[0].layer_key)
            require_hooks(net, f"target {targets[0].spec!r}")
            self.tlayer = find_layers(net, [key])[0]
        if read is not None:
            require_hooks(net, "a class activation map")
            self.read = find_layers(net, [read])[0]
        if not callable(targets):
            self.index = torch.tensor([t.index or 0 for t in targets], dtype=torch.long)
            self.ys = torch.tensor([t.y or 0 for t in targets], dtype=torch.long)
            self.xs = torch.tensor([t.x or 0 for t in targets], dtype=torch.long)

    @contextlib.contextmanager
    def _hooks(self, got: dict[str, torch.Tensor]) -> Iterator[None]:
        handles = []
        calls: dict[str, int] = {}

        def hook_for(ref: LayerRef, role: str, stop: bool) -> Any:
            def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
                k = calls.get(role, 0)
                calls[role] = k + 1
                wanted = ref.call if ref.call is not None else 0
                if k != wanted:
                    return None
                if not isinstance(out, torch.Tensor):
                    raise TypeError(
                        f"layer {ref.key!r} returns {type(out).__name__}, not a tensor: use "
                        "one of its submodules (`convlens layers MODEL` lists them)"
                    )
                got[role] = out
                if stop:  # a read layer that has not run by now runs after the target
                    raise _StopForward
                # the rest of the network gets a copy: an in-place op after this layer
                # (ReLU(inplace=True)) must not change the tensor read here
                return out.clone()

            return hook

        try:
            if self.read is not None:
                handles.append(
                    self.read.module.register_forward_hook(hook_for(self.read, "read", False))
                )
            if self.tlayer is not None:
                handles.append(
                    self.tlayer.module.register_forward_hook(hook_for(self.tlayer, "target", True))
                )
            yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _per_row(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``values[rows]``; one value (one target for every image) is repeated."""
        values = values.to(rows.device)
        if len(values) == 1:
            return values.expand(len(rows))
        return values[rows]

    def __call__(self, xb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(xb.device)
        dtype = model_dtype(self.net)
        inp = xb.to(dtype) if xb.dtype != dtype and xb.is_floating_point() else xb
        got: dict[str, torch.Tensor] = {}
        out: Any = None
        with (
            self._hooks(got),
            dtype_support(dtype, xb.device),
            contextlib.suppress(_StopForward),
        ):
            out = self.net(inp)
        self.activation = got.get("read")
        if self.read is not None and self.activation is None:
            where = f" before the target layer {self.tlayer.key!r}" if self.tlayer else ""
            raise ValueError(
                f"layer {self.read.key!r} did not run{where}: choose a layer= that runs "
                "before the target's layer"
            )
        if callable(self.targets):
            value = out
            if self.output is not None:
                value, self.output_key = select_output(out, self.output, what="a target")
            s = self.targets(value)
            if not isinstance(s, torch.Tensor) or s.shape[:1] != (xb.shape[0],):
                raise ValueError(
                    "a callable target must return one value per image (a tensor "
                    f"[{xb.shape[0]}]), got "
                    + (
                        f"shape {list(s.shape)}"
                        if isinstance(s, torch.Tensor)
                        else type(s).__name__
                    )
                )
            return s.reshape(xb.shape[0], -1).float().sum(dim=1)
        kind = self.targets[0].kind
        idx = self._per_row(self.index, rows)
        if kind == "class":
            logits, self.output_key = select_output(out, self.output, what="a class target")
            if logits.ndim != 2:
                raise ValueError(
                    f"the model's output has shape {list(logits.shape)}; a class target needs "
                    "logits [N, classes]: use 'layer:channel' targets for this model"
                )
            bad = int(self.index.max())
            if bad >= logits.shape[1]:
                raise ValueError(
                    f"target class {bad} is out of range: the model has {logits.shape[1]} "
                    f"classes (0..{logits.shape[1] - 1})"
                )
            values = logits.float()
            if self.probability:
                values = values.softmax(dim=1)
            return values.gather(1, idx.view(-1, 1)).squeeze(1)
        act = got.get("target")
        ref = cast(LayerRef, self.tlayer)
        if act is None:
            raise ValueError(
                f"layer {ref.key!r} did not run during the forward: choose another layer"
            )
        if act.ndim < 2:
            raise ValueError(f"layer {ref.key!r} has shape {list(act.shape)}: no channel dimension")
        top = int(self.index.max())
        if top >= act.shape[1]:
            raise ValueError(
                f"target channel {top} is out of range: layer {ref.key!r} has "
                f"{act.shape[1]} channels (0..{act.shape[1] - 1})"
            )
        picked = act.float()[torch.arange(act.shape[0], device=act.device), idx]
        if kind == "channel":
            return picked.reshape(act.shape[0], -1).mean(dim=1)
        if act.ndim != 4:
            raise ValueError(
                f"a neuron target needs a layer with a spatial map [N, C, H, W]; "
                f"{ref.key!r} has shape {list(act.shape)}: use 'layer:channel'"
            )
        ys, xs = self._per_row(self.ys, rows), self._per_row(self.xs, rows)
        h, w = act.shape[-2:]
        if int(ys.max()) >= h or int(xs.max()) >= w:
            raise ValueError(
                f"neuron position ({int(ys.max())}, {int(xs.max())}) is outside the {h}x{w} "
                f"map of layer {ref.key!r} (rows 0..{h - 1}, columns 0..{w - 1})"
            )
        return picked[torch.arange(act.shape[0], device=act.device), ys, xs]


def top1_targets(
    net: nn.Module, x: torch.Tensor, output: OutputKey | None = None
) -> list[AttrTarget]:
    """Each image's top-1 class as a target (the default target), from one forward without
    gradients in eval mode.

    Example:
        >>> [t.spec for t in top1_targets(model, x)]
        ['258']
    """
    dtype = model_dtype(net)
    with evaluating(net), torch.no_grad(), dtype_support(dtype, x.device):
        out = net(x.to(dtype))
    logits, _ = select_output(out, output, what="the default target (the top-1 class)")
    if logits.ndim != 2:
        raise ValueError(
            "the default target (the top-1 class) needs logits [N, classes], but the model "
            f"returns shape {list(logits.shape)}: give target='layer:channel'"
        )
    return cast(
        list[AttrTarget], parse_targets([int(v) for v in logits.argmax(dim=1).tolist()], len(x))
    )


def score_function(
    model: Any,
    targets: Sequence[str] | TargetSpec,
    *,
    output: OutputKey | None = None,
    probability: bool = False,
    device: DeviceLike | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(xb [B, C, H, W], rows [B]) -> [B]`` without gradients: for each row, the value
    of the target of image ``rows[b]``: the softmax probability of a class when
    ``probability`` (else its logit), the raw value of a unit target. For the
    faithfulness curves and Score-CAM. The model runs in eval mode; flags are restored
    after every call.

    Example:
        >>> f = score_function(model, ["258", "3"], probability=True)
        >>> f(x2, torch.tensor([0, 1])).shape
        torch.Size([2])
    """
    from convlens.models.zoo import model_and_bundle

    net, _ = model_and_bundle(model)
    net = unwrap(net)
    if device is not None:
        net.to(resolve_device(device))
    if isinstance(targets, (list, tuple)):
        parsed = parse_targets(list(targets), len(targets))
    else:
        parsed = parse_targets(targets, 1)
    scorer = Scorer(net, parsed, output=output, probability=probability)

    def f(xb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with evaluating(net), torch.no_grad():
            return scorer(xb, rows.long()).float()

    return f
