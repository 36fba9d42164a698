"""Sensitivity maps: occlusion over the whole image (Zeiler and Fergus).

Slide a window over the input, fill it, and record how much a chosen output drops: a
class score, or the mean of one channel of a layer. :func:`sensitivity` returns the drop
at every window position (``.map``) and, as Captum's ``Occlusion`` defines it, an
input-resolution ``.attribution`` where each pixel holds the mean drop over the windows
that cover it, so the two tools can be compared number for number.

The default method is exact and incremental: the model runs once on the input, keeping
every layer's output, and each window then recomputes only the region of each layer it
can change (see :mod:`convlens.analysis._incremental`), batched within a memory budget;
a layer target stops the forward at that layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from convlens._io import versions, write_json
from convlens.analysis.occlusion import FILLS, Fill, apply_fill, one_image
from convlens.capture import capture, model_device
from convlens.device import DeviceLike, resolve_device
from convlens.models.forms import (
    OutputKey,
    dtype_name,
    dtype_support,
    hooks_aside,
    is_scripted,
    model_dtype,
    pick_output,
    select_output,
)
from convlens.models.layers import evaluating, find_layers, parse_layer

__all__ = [
    "SensitivityResult",
    "attribution_from_map",
    "parse_target",
    "sensitivity",
    "window_starts",
]

Method = Literal["incremental", "naive"]
METHODS = ("incremental", "naive")

#: Memory the windows of one batch may take when ``batch_size="auto"`` (CPU).
AUTO_BUDGET_BYTES = 128 * 2**20
#: Most parts a batch is split into on a CPU (window parallelism; see _window_parallel).
_MAX_WORKERS = 8
# model -> {(input shape, dtype, device, window, stride, target, approximate): bytes one
# window of incremental inference holds}, measured on the first call.
_PER_WINDOW: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], float]] = (
    weakref.WeakKeyDictionary()
)


# ------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Target:
    """What :func:`sensitivity` measures: a class score or the mean of a layer's channel."""

    spec: str
    index: int  # the class, or the channel
    layer: str | None = None  # None: the model's output
    call: int | None = None  # ``name#k``: the k-th call of a module that runs several times

    @property
    def kind(self) -> str:
        return "class" if self.layer is None else "channel"

    @property
    def layer_key(self) -> str | None:
        if self.layer is None:
            return None
        return self.layer if self.call is None else f"{self.layer}#{self.call}"


_TARGET_HELP = "a class index (258) or 'layer:channel' (layer2:0, the mean of that channel)"


def parse_target(target: int | str) -> Target:
    """``258`` / ``"258"`` -> class 258; ``"layer2:0"`` -> channel 0 of ``layer2`` (its mean).

    Example:
        >>> parse_target("layer2.1:7")
        Target(spec='layer2.1:7', index=7, layer='layer2.1', call=None)
    """
    if isinstance(target, bool):
        raise TypeError(f"target must be {_TARGET_HELP}, got {target!r}")
    if isinstance(target, int) or (hasattr(target, "__index__") and not isinstance(target, str)):
        index = int(target)  # ints and numpy/torch integers
        if index < 0:
            raise ValueError(f"target class {index} is negative: use {_TARGET_HELP}")
        return Target(str(index), index)
    if not isinstance(target, str):
        raise TypeError(f"target must be {_TARGET_HELP}, got {type(target).__name__}")
    spec = target.strip()
    if spec.isdigit():
        return Target(spec, int(spec))
    layer, sep, channel = spec.rpartition(":")
    layer, channel = layer.strip(), channel.strip()
    if not sep or not layer or not channel.isdigit():
        raise ValueError(f"target {target!r}: expected {_TARGET_HELP}")
    name, call = parse_layer(layer)
    return Target(spec, int(channel), name, call)


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{what} must be an int or (height, width), got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{what} must be at least 1 pixel, got {value!r}")
    return pair


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Where windows start along one axis, as Captum's ``Occlusion`` places them: at 0,
    then every ``stride`` until the whole axis is covered. The last window may be cut
    off by the border (``ceil((size - window) / stride) + 1`` windows).

    Example:
        >>> window_starts(70, 32, 16)  # the last window covers 48..70, 22 pixels
        [0, 16, 32, 48]
    """
    if window > size:
        raise ValueError(f"window {window} is larger than the input ({size} pixels)")
    if stride > window and window < size:
        raise ValueError(
            f"stride {stride} is larger than the window {window}: some pixels would be "
            "in no window (use stride <= window)"
        )
    n = math.ceil((size - window) / stride) + 1
    return [i * stride for i in range(n)]


def attribution_from_map(
    drop_map: torch.Tensor,
    ys: Sequence[int],
    xs: Sequence[int],
    window: tuple[int, int],
    size: tuple[int, int],
) -> torch.Tensor:
    """Captum's ``Occlusion`` attribution from a window map: each pixel is the mean of the
    drops of the windows that cover it. ``drop_map`` is ``[len(ys), len(xs)]``."""
    H, W = size
    total = torch.zeros(H, W, dtype=torch.float64)
    count = torch.zeros(H, W, dtype=torch.float64)
    m = drop_map.detach().double().cpu()
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            total[y : y + window[0], x : x + window[1]] += m[i, j]
            count[y : y + window[0], x : x + window[1]] += 1
    return (total / count).float()


def _model_and_bundle(model: Any) -> tuple[nn.Module, Any]:
    from convlens.models.zoo import model_and_bundle

    return model_and_bundle(model)


def _baseline(
    x: torch.Tensor,
    fill: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    blur_sigma: float,
) -> torch.Tensor:
    """The whole-image fill ``[C, H, W]``: each window takes its pixels from here."""
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}: use one of {', '.join(FILLS)}")
    H, W = x.shape[-2:]
    if fill == "black":
        if mean is None or std is None:
            raise ValueError(
                "fill='black' needs the input normalisation: pass a ModelBundle "
                "(convlens.load_model) or mean=... and std=..."
            )
        return apply_fill(x, (0, H, 0, W), "black", mean=mean, std=std)
    return apply_fill(x, (0, H, 0, W), fill, blur_sigma=blur_sigma)  # type: ignore[arg-type]


# ------------------------------------------------------------------------ result


@dataclass(frozen=True)
class SensitivityResult:
    """The result of :func:`sensitivity`.

    ``map[i, j]`` is ``score - score(window (i, j) filled)``: positive where hiding the
    window lowers the target. Window ``(i, j)`` covers rows ``ys[i] .. ys[i] + window[0]``
    and columns ``xs[j] .. xs[j] + window[1]``, cut off at the border.
    ``attribution`` ``[H, W]`` is Captum's ``Occlusion`` output for the same settings
    (identical across channels, so one channel): the mean drop over the windows covering
    each pixel. ``input`` is the (normalised) model input ``[C, H, W]``.

    Example:
        >>> s = convlens.sensitivity(bundle, x, 258, window=32, stride=16)
        >>> s.map.shape, s.score, s.to_dict()["largest_drop"]
    """

    map: torch.Tensor
    attribution: torch.Tensor = field(repr=False)
    score: float
    target: str
    window: tuple[int, int]
    stride: tuple[int, int]
    fill: str
    method: str
    exact: bool
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    input: torch.Tensor = field(repr=False)
    target_label: str | None = None
    model_name: str = ""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def occluded_scores(self) -> torch.Tensor:
        """The target with each window filled, ``[len(ys), len(xs)]``."""
        return self.score - self.map

    def display_image(self) -> torch.Tensor:
        """The input in ``[0, 1]`` pixel space, for plotting."""
        t = self.input.float()
        if self.mean is None or self.std is None or len(self.mean) != t.shape[0]:
            lo, hi = float(t.min()), float(t.max())
            return ((t - lo) / max(hi - lo, 1e-8)).clamp(0, 1)
        m = torch.tensor(self.mean).view(-1, 1, 1)
        s = torch.tensor(self.std).view(-1, 1, 1)
        return (t * s + m).clamp(0, 1)

    def __repr__(self) -> str:
        label = f" ({self.target_label})" if self.target_label else ""
        return (
            f"SensitivityResult(target={self.target!r}{label}, score={self.score:.4g}, "
            f"map={'x'.join(map(str, self.map.shape))}, max drop={float(self.map.max()):.4g}, "
            f"window={self.window}, stride={self.stride}, method={self.method!r})"
        )

    def _repr_html_(self) -> str:
        from convlens._notebook import sensitivity_result

        return sensitivity_result(self)

    def to_dict(self) -> dict[str, Any]:
        """The numbers: target, score, the map with its window positions, settings."""
        i, j = divmod(int(self.map.argmax()), self.map.shape[1])
        return {
            "model": self.model_name,
            "target": self.target,
            "target_label": self.target_label,
            "score": self.score,
            "window": list(self.window),
            "stride": list(self.stride),
            "fill": self.fill,
            "method": self.method,
            "exact": self.exact,
            "input_shape": list(self.input.shape),
            "window_tops": list(self.ys),
            "window_lefts": list(self.xs),
            "map": self.map.tolist(),
            "largest_drop": {
                "drop": float(self.map[i, j]),
                "box": {
                    "top": self.ys[i],
                    "bottom": min(self.ys[i] + self.window[0], self.input.shape[-2]),
                    "left": self.xs[j],
                    "right": min(self.xs[j] + self.window[1], self.input.shape[-1]),
                },
            },
            "attribution_range": [float(self.attribution.min()), float(self.attribution.max())],
            "seconds": self.seconds,
            "settings": self.settings,
            "versions": versions(),
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``sensitivity.json`` into ``out_dir``; returns its path."""
        return write_json(Path(out_dir) / "sensitivity.json", self.to_dict())


# ------------------------------------------------------------------------ compute


def _auto_batch(per_window: float, n: int, device: torch.device) -> int:
    """Windows per batch within the memory budget, evened out so the last batch is not a
    small remainder."""
    budget = AUTO_BUDGET_BYTES
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = int(min(4 * 2**30, free // 4))
    if n <= 0:
        return 1
    most = max(1, min(n, int(budget // max(per_window, 1.0))))
    batches = math.ceil(n / most)
    return math.ceil(n / batches)


def _read(value: Any, target: Target) -> torch.Tensor:
    """The target's score per batch item from the model's (or the layer's) output."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"the {'model' if target.layer is None else f'layer {target.layer_key!r}'} returns "
            f"{type(value).__name__}, not a tensor: choose a layer that outputs a tensor"
        )
    where = "the model's output" if target.layer is None else f"layer {target.layer_key!r}"
    if target.layer is None and value.ndim != 2:
        raise ValueError(
            f"{where} has shape {list(value.shape)}; a class target needs logits "
            "[N, classes]: use 'layer:channel' for this model"
        )
    if value.ndim < 2:
        raise ValueError(f"{where} has shape {list(value.shape)}: no channel dimension")
    if target.index >= value.shape[1]:
        what = "classes" if target.layer is None else "channels"
        raise ValueError(
            f"target {target.spec!r}: {where} has {value.shape[1]} {what} (0..{value.shape[1] - 1})"
        )
    picked = value[:, target.index]
    return picked.reshape(picked.shape[0], -1).float().mean(dim=1)


def _occluded_batch(
    x: torch.Tensor, baseline: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]]
) -> torch.Tensor:
    xb = x.unsqueeze(0).repeat(len(boxes), 1, 1, 1)
    for b, (y0, y1, x0, x1) in enumerate(boxes):
        xb[b, :, y0:y1, x0:x1] = baseline[:, y0:y1, x0:x1]
    return xb


class _Naive:
    """Full forwards of occluded copies (stopping at the target layer)."""

    def __init__(
        self, model: nn.Module, x: torch.Tensor, target: Target, output: OutputKey | None = None
    ) -> None:
        self.model, self.x, self.target, self.output = model, x, target, output
        self.key: OutputKey | None = None  # the entry of the model's output read

    def scores(self, xb: torch.Tensor) -> torch.Tensor:
        if self.target.layer is None:
            value, self.key = select_output(self.model(xb), self.output, what="a class target")
            return _read(value, self.target)
        key = cast(str, self.target.layer_key)  # a layer target has a key
        acts = capture(self.model, xb, [key])
        return _read(next(iter(acts.values())), self.target).to(xb.device)

    def per_window_bytes(self) -> float:
        from convlens.models.layers import trace_calls

        if is_scripted(self.model):  # no hooks to measure layers: assume 32 maps like x
            return 4.0 * 4 * 32 * self.x.numel()
        calls = trace_calls(self.model, (1, *self.x.shape), dtype=self.x.dtype)
        sizes = [math.prod(s) for shapes in calls.values() for s in shapes if s is not None]
        return 4.0 * 4 * max(sizes, default=self.x.numel())


def _incremental_scores(
    runner: Any,
    boxes: Sequence[tuple[int, int, int, int]],
    base: torch.Tensor,
    target: Target,
    threads: int | None,
) -> tuple[torch.Tensor, int]:
    state, peak = runner.run_windows(boxes, base, threads=threads)
    if target.layer is None:
        return _read(runner.full_value(runner.result_node, state, len(boxes)), target), peak
    value = runner.full_value(runner.result_node, state, len(boxes), target.index)
    return value[:, 0:1].reshape(len(boxes), -1).float().mean(dim=1), peak


def _window_parallel(
    runner: Any, boxes: Sequence[tuple[int, int, int, int]], base: torch.Tensor, target: Target
) -> tuple[torch.Tensor, int]:
    """Scores for a batch of windows. On a CPU with T threads the batch is split in T
    parts run side by side, each on one thread (window parallelism): no op waits for
    another thread, so the many small copies and pointwise ops of incremental inference
    scale, and a busy CPU slows them no more than it slows the convolutions."""
    threads = torch.get_num_threads()
    # At most 8 parts (their Python runs one at a time), of at least 8 windows each; with
    # more threads than parts, each part's convolutions share the rest.
    workers = min(threads, _MAX_WORKERS, len(boxes) // 8) if base.device.type == "cpu" else 1
    if workers <= 1:
        return _incremental_scores(runner, boxes, base, target, None)
    size = math.ceil(len(boxes) / workers)
    parts = [boxes[i : i + size] for i in range(0, len(boxes), size)]
    per_part = max(1, threads // len(parts))

    def work(part: Sequence[tuple[int, int, int, int]]) -> tuple[torch.Tensor, int]:
        torch.set_num_threads(per_part)
        with torch.no_grad():
            return _incremental_scores(runner, part, base, target, per_part)

    try:
        with ThreadPoolExecutor(len(parts), thread_name_prefix="convlens-sensitivity") as ex:
            outs = list(ex.map(work, parts))
    finally:
        torch.set_num_threads(threads)
    return torch.cat([o[0] for o in outs]), sum(o[1] for o in outs)


def _check_single_call(model: nn.Module, x: torch.Tensor, target: Target) -> None:
    from convlens.models.layers import trace_calls

    layer = str(target.layer)
    calls = len(trace_calls(model, (1, *x.shape), [layer], dtype=x.dtype)[layer])
    if calls == 0:
        raise ValueError(
            f"layer {target.layer!r} is part of the model but does not run in its forward: "
            "choose another layer"
        )
    if calls > 1:
        raise ValueError(
            f"layer {target.layer!r} runs {calls} times per forward: say which call, e.g. "
            f"'{target.layer}#0:{target.index}'"
        )


def _graph_entry(structure: Any, key: OutputKey) -> Any:
    """Entry ``key`` of a traced graph's output: a dict, tuple or list of nodes, or the
    node that builds a namedtuple or a dataclass (fx records its constructor call)."""
    from torch import fx

    if isinstance(structure, fx.Node):
        cls = structure.target
        if structure.op != "call_function" or not isinstance(cls, type):
            raise TypeError("the traced output is not a container")
        if hasattr(cls, "_fields"):
            names = list(cls._fields)
        elif dataclasses.is_dataclass(cls):
            names = [f.name for f in dataclasses.fields(cls) if f.init]
        else:
            raise TypeError(f"the traced output is built by {cls.__name__}")
        values = dict(zip(names, structure.args))
        values.update(structure.kwargs)
        return values[key if isinstance(key, str) else names[key]]
    return pick_output(structure, key)


def _incremental(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    approximate: float | None,
    output: OutputKey | None = None,
) -> tuple[Any, Any, OutputKey | None]:
    """An :class:`IncrementalRunner` checked against the model, the unoccluded output, and
    the key of the model's output it reads (None: the output is one tensor)."""
    from convlens.analysis._incremental import Unsupported, trace_model

    with hooks_aside(model):  # the user's hooks must not see fx's proxies
        traced = trace_model(model)  # kept per model; raises Unsupported if fx cannot
    try:
        return _checked_runner(model, traced, x, target, approximate, output)
    except Unsupported:  # a kept trace may be stale (an attribute the forward reads changed)
        with hooks_aside(model):
            traced = trace_model(model, cached=False)
        return _checked_runner(model, traced, x, target, approximate, output)


def _checked_runner(
    model: nn.Module,
    traced: Any,
    x: torch.Tensor,
    target: Target,
    approximate: float | None,
    output: OutputKey | None = None,
) -> tuple[Any, Any, OutputKey | None]:
    from torch import fx

    from convlens.analysis._incremental import IncrementalRunner, Unsupported

    # The reference: the model as the user runs it (their hooks included).
    result_node = None
    key: OutputKey | None = None
    if target.layer is None:
        ref, key = select_output(model(x.unsqueeze(0)), output, what="a class target")
        if key is not None:  # the same entry of the traced graph's output
            out_node = next(n for n in traced.graph.nodes if n.op == "output")
            try:
                result_node = _graph_entry(out_node.args[0], key)
            except (KeyError, IndexError, AttributeError, TypeError, ValueError):
                raise Unsupported(f"the traced graph's output has no entry {key!r}") from None
            if not isinstance(result_node, fx.Node):
                raise Unsupported(f"the traced graph's output {key!r} is not computed")
    else:
        outs = traced.module_outputs.get(target.layer, [])
        call = target.call or 0
        if call >= len(outs):
            raise Unsupported(f"the traced graph has no call {call} of {target.layer!r}")
        result_node = outs[call]
        key_name = cast(str, target.layer_key)  # a layer target has a key
        ref = next(iter(capture(model, x.unsqueeze(0), [key_name]).values())).to(x.device)
    with hooks_aside(model):  # leaf modules run on partial patches: not for the user's hooks
        runner = IncrementalRunner(
            model, traced, x.unsqueeze(0), result_node, approximate=approximate
        )
        out = runner.run_full()
    # The traced graph runs ops out of place; check it reproduces the model.
    rtol, atol = (1e-4, 1e-5) if x.dtype not in (torch.float16, torch.bfloat16) else (2e-2, 2e-2)
    if (
        not isinstance(out, torch.Tensor)
        or not isinstance(ref, torch.Tensor)
        or out.shape != ref.shape
        or not torch.allclose(
            out.float(), ref.float(), rtol=rtol, atol=atol * max(1.0, float(ref.abs().max()))
        )
    ):
        raise Unsupported("the traced graph does not reproduce the model's output")
    return runner, out, key


def sensitivity(
    model: Any,
    x: Any,
    target: int | str,
    *,
    window: int | tuple[int, int] = 32,
    stride: int | tuple[int, int] = 16,
    fill: Fill = "zero",
    batch_size: int | Literal["auto"] = "auto",
    method: Method = "incremental",
    approximate: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    blur_sigma: float = 8.0,
    device: DeviceLike | None = None,
    progress: bool | None = None,
    output: OutputKey | None = None,
) -> SensitivityResult:
    """Occlusion sensitivity: slide a ``window`` over ``x`` (``stride`` apart) and record how
    much ``target`` drops when the window is filled.

    ``model``: a :class:`~convlens.models.zoo.ModelBundle` or a bare ``nn.Module``.
    ``x``: one normalised input ``[C, H, W]`` (or ``[1, C, H, W]``; with a bundle also a
    PIL image, which the bundle's preprocessing turns into one).
    ``target``: a class index of the model's output (``258`` or ``"258"``), or
    ``"layer:channel"`` (``"layer2:0"``), the mean of that channel of the layer's output.

    Windows are placed as Captum's ``Occlusion`` places them (:func:`window_starts`):
    from the top-left corner every ``stride`` pixels until the input is covered, the last
    ones cut off by the border. ``fill``: ``"zero"`` (0 after normalisation, the dataset's
    mean colour, as :func:`~convlens.analysis.occlusion.occlude`), ``"black"`` (true black;
    needs ``mean``/``std``, which a bundle supplies), ``"mean"`` (the image's own mean
    colour per channel) or ``"blur"`` (a Gaussian blur of the image, ``blur_sigma``).

    ``method="incremental"`` (default) recomputes, for each window, only the part of each
    layer the window can change, and stops at the target layer; its numbers equal a plain
    sliding-window loop (``method="naive"``) up to float32 round-off. Models it cannot
    trace fall back to the plain loop, and layers it cannot bound are recomputed in full,
    each with a one-line warning. ``approximate=tau`` (0 < tau <= 1) caps the recomputed
    region of every layer at ``tau`` of its height and width: faster, **not exact**
    (``result.exact`` is then False). ``batch_size``: windows per forward; ``"auto"``
    fits a memory budget (128 MiB on a CPU; on a GPU a quarter of the free memory, at most
    4 GiB). On a CPU each batch is split across the threads, one part per thread.

    The forward runs in eval mode under ``no_grad``; training flags are restored and no
    hook is left behind. ``device``: ``None`` runs where the model is; otherwise the model
    is moved there (``model.to``, in place).

    Any model form: ``torch.compile`` and DataParallel are unwrapped; a float16 / bfloat16
    model runs in its dtype (the scores in float32; ``settings["dtype"]``); a model that
    returns a dict, tuple, list, namedtuple or dataclass has its class scores chosen by
    ``output`` (a key, an index or an attribute name; by default the only 2-d tensor); a
    TorchScript module takes class targets (full forwards per window: it cannot be traced)
    but not layer targets. The model's own hooks run in the full forwards, and are held
    aside (never called) in the incremental recomputation, which feeds leaf modules
    partial patches.

    Example:
        >>> r = sensitivity(bundle, x, 258, window=32, stride=16)
        >>> r.map.shape, r.attribution.shape
        (torch.Size([13, 13]), torch.Size([224, 224]))
    """
    t_start = time.perf_counter()
    net, bundle = _model_and_bundle(model)
    if bundle is not None:
        if mean is None and std is None:
            mean, std = bundle.normalize
        if not isinstance(x, torch.Tensor):  # a PIL image: the bundle's preprocessing
            x = bundle.preprocess(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"x must be a tensor [C, H, W] (normalised), got {type(x).__name__}; "
            "load images with convlens.load_image and preprocess them (bundle.preprocess)"
        )
    x = one_image(x, "sensitivity")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if approximate is not None:
        if method != "incremental":
            raise ValueError("approximate needs method='incremental'")
        if not 0 < approximate <= 1:
            raise ValueError(f"approximate must be in (0, 1], got {approximate}")
    if batch_size != "auto" and (
        not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    if blur_sigma <= 0:
        raise ValueError(f"blur_sigma must be positive, got {blur_sigma}")
    tgt = parse_target(target)
    if tgt.layer is not None:
        find_layers(net, [tgt.layer])  # LayerNotFoundError with the closest names
        if output is not None:
            raise ValueError(
                f"output={output!r} chooses the model's class scores, but target "
                f"{tgt.spec!r} reads a layer: leave output out"
            )
    win = _pair(window, "window")
    step = _pair(stride, "stride")
    H, W = int(x.shape[-2]), int(x.shape[-1])
    if win[0] > H or win[1] > W:
        raise ValueError(
            f"window {win[0]}x{win[1]} is larger than the input ({H}x{W} pixels): "
            "use a smaller window"
        )
    ys = window_starts(H, win[0], step[0])
    xs = window_starts(W, win[1], step[1])
    boxes = [(y, min(y + win[0], H), x0, min(x0 + win[1], W)) for y in ys for x0 in xs]

    if device is not None:
        dev = resolve_device(device)
        net.to(dev)
    else:
        dev = model_device(net)
    dtype = model_dtype(net)
    x = x.detach().to(dev, dtype)
    if mean is not None and len(mean) != x.shape[0]:
        raise ValueError(
            f"mean and std have {len(mean)} values but the input has {x.shape[0]} channel(s): "
            "give one value per channel"
        )
    if tgt.layer is not None and tgt.call is None:
        with dtype_support(dtype, dev):
            _check_single_call(net, x, tgt)
    base = _baseline(x, fill, mean, std, blur_sigma)

    notices: list[str] = []
    used = method
    output_key: OutputKey | None = None
    scores = torch.empty(len(boxes), dtype=torch.float32)
    with (
        evaluating(net),
        torch.no_grad(),
        dtype_support(dtype, dev),
        contextlib.ExitStack() as aside,
    ):
        runner: Any = None
        if method == "incremental" and is_scripted(net):
            notices.append(
                "a TorchScript module cannot be traced by torch.fx; using full forwards "
                "instead (exact, slower)"
            )
            used = "naive"
        elif method == "incremental":
            from convlens.analysis._incremental import Unsupported

            try:
                runner, out, output_key = _incremental(net, x, tgt, approximate, output)
            except Unsupported as e:
                notices.append(f"{e}; using full forwards instead (exact, slower)")
                used = "naive"
        if runner is not None:
            score0 = float(_read(out, tgt)[0])
            aside.enter_context(hooks_aside(net))  # the windows run leaf modules on patches
        else:
            naive = _Naive(net, x, tgt, output)
            score0 = float(naive.scores(x.unsqueeze(0))[0])
            output_key = naive.key
        bs = batch_size if isinstance(batch_size, int) else None
        if bs is None and runner is None:
            bs = _auto_batch(naive.per_window_bytes(), len(boxes), dev)
        from convlens._progress import tqdm

        with tqdm(
            total=len(boxes),
            desc="sensitivity",
            unit="window",
            disable=None if progress is None else not progress,
        ) as bar:
            order = list(range(len(boxes)))
            if bs is None:  # incremental (the naive path sized its batches above)
                # Measure one window from the middle (as large as windows get) alone and
                # size the batches for the others from what it held (kept per model and
                # geometry, so a second call skips this).
                size_key = (tuple(x.shape), x.dtype, str(dev), win, step, tgt.spec, approximate)
                known = _PER_WINDOW.setdefault(net, {})
                if size_key not in known:
                    probe = len(boxes) // 2
                    got, peak = _window_parallel(runner, [boxes[probe]], base, tgt)
                    scores[probe] = got.float().cpu()[0]
                    bar.update(1)
                    order.remove(probe)
                    # peak counts the values held; temporaries (gathers, the operands of
                    # sums) about double it (measured on resnet18).
                    known[size_key] = 2.5 * peak
                bs = _auto_batch(known[size_key], len(order), dev)
            for start in range(0, len(order), bs):
                idx = order[start : start + bs]
                chunk = [boxes[i] for i in idx]
                if runner is not None:
                    got, _ = _window_parallel(runner, chunk, base, tgt)
                else:
                    got = naive.scores(_occluded_batch(x, base, chunk))
                scores[idx] = got.float().cpu()
                bar.update(len(chunk))
        if runner is not None:
            notices.extend(runner.notices)
    for note in notices:
        warnings.warn(f"convlens.sensitivity: {note}", stacklevel=2)

    drop = (score0 - scores).reshape(len(ys), len(xs))
    label = None
    if tgt.layer is None and bundle is not None and tgt.index < len(bundle.labels or []):
        label = bundle.labels[tgt.index]
    return SensitivityResult(
        map=drop,
        attribution=attribution_from_map(drop, ys, xs, win, (H, W)),
        score=score0,
        target=tgt.spec,
        window=win,
        stride=step,
        fill=fill,
        method=used,
        exact=approximate is None,
        ys=tuple(ys),
        xs=tuple(xs),
        input=x.detach().cpu(),
        target_label=label,
        model_name=bundle.description if bundle is not None else type(net).__name__,
        mean=tuple(float(v) for v in mean) if mean is not None else None,
        std=tuple(float(v) for v in std) if std is not None else None,
        seconds=time.perf_counter() - t_start,
        settings={
            "batch_size": batch_size,
            "approximate": approximate,
            "device": str(dev),
            "notices": notices,
            "dtype": dtype_name(dtype),
            **({"output": output_key} if output_key is not None else {}),
            **({"blur_sigma": blur_sigma} if fill == "blur" else {}),
        },
    )
