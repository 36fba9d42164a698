"""Activation capture: forward hooks on named layers, in a context that always cleans up.

``capture`` runs the model once in eval mode under ``no_grad`` and returns the outputs of
the requested layers as detached CPU copies. Hooks sit only on the requested modules and
are removed in ``finally``; every module's training flag is restored; with ``stop_early``
the forward ends as soon as the last requested output exists.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from convlens.device import DeviceLike, resolve_device
from convlens.models.forms import dtype_support, model_dtype
from convlens.models.layers import LayerRef, evaluating, find_layers, trace_calls, unwrap

__all__ = ["capture", "model_device"]


class _StopForward(BaseException):
    """Raised by the last hook to end the forward early. A BaseException, so that a model's
    own ``except Exception`` cannot swallow it."""


# model -> {(input shape, dtype, layer names): calls per layer}; see _expected_calls.
_CALLS_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], dict[str, int]]] = (
    weakref.WeakKeyDictionary()
)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a stateless model)."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _expected_calls(
    model: nn.Module, x: torch.Tensor, refs: dict[str, nn.Module]
) -> dict[str, int]:
    """How many times each named module runs for an input like ``x`` (cached per model,
    input shape and the identity of the requested modules)."""
    names = list(refs)
    key = (tuple(x.shape), x.dtype, tuple(names), tuple(id(m) for m in refs.values()))
    per_model = _CALLS_CACHE.setdefault(model, {})
    if key not in per_model:
        if len(per_model) > 64:
            per_model.clear()
        calls = trace_calls(model, x.shape, names, dtype=x.dtype)
        per_model[key] = {n: len(v) for n, v in calls.items()}
    return per_model[key]


def _store(ref_name: str, out: Any) -> torch.Tensor:
    # A copy on the output's own device (fast, asynchronous on a GPU); moved to the CPU
    # once the forward is over, so the GPU is not stalled at every hooked layer.
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    raise TypeError(
        f"layer {ref_name!r} returns {type(out).__name__}, not a tensor: capture one of its "
        "submodules instead (`convlens layers MODEL` lists them)"
    )


def capture(
    model: nn.Module,
    x: torch.Tensor,
    layers: str | Iterable[str],
    *,
    stop_early: bool = True,
    device: DeviceLike | None = None,
) -> dict[str, torch.Tensor]:
    """Outputs of the named layers for input ``x``, as detached CPU tensors.

    ``layers`` are dotted ``named_modules()`` names (a list or a comma-separated string).
    A module that runs several times per forward is returned as ``name#0``, ``name#1``,
    ...; ask for one call with ``"name#k"``. Outputs are copied at the moment the layer
    returns, so a later in-place op (torchvision's ``ReLU(inplace=True)``) cannot change
    them. The forward runs in eval mode under ``no_grad``; the model's training flags are
    restored and all hooks removed afterwards, also when the forward raises.

    ``stop_early`` ends the forward right after the last call of the deepest requested
    layer, so nothing after it is computed. To know how often each requested module runs,
    the model's forward is traced once on PyTorch's ``meta`` device (shapes only, no
    arithmetic; a real forward for models the meta device cannot run) and the counts are
    cached per model and input shape. ``x`` is ``[N, C, H, W]`` (or ``[C, H, W]``,
    made a batch of one) in the model's input space (normalised). ``device``: ``None``
    runs where the model is; otherwise the model is moved there (``model.to``, in place).
    DataParallel / DistributedDataParallel wrappers and ``torch.compile`` are unwrapped
    (the original module runs). ``x`` is cast to the model's dtype (a float16 / bfloat16
    model gets float16 / bfloat16 input; the outputs are in that dtype). The model's own
    hooks run in the forward, as the model would run them; a TorchScript module, which
    takes no hooks, is a :class:`convlens.ConvlensError`.

    Raises :class:`convlens.LayerNotFoundError` for an unknown name (with close matches).

    Example:
        >>> acts = capture(torchvision.models.resnet18(), torch.rand(1, 3, 224, 224), ["bn1", "layer4"])
        >>> {k: tuple(v.shape) for k, v in acts.items()}
        {'bn1': (1, 64, 112, 112), 'layer4': (1, 512, 7, 7)}
    """
    model = unwrap(model)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}; load images with load_image")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    refs = find_layers(model, layers)
    if device is not None:
        dev = resolve_device(device)
        model.to(dev)
    else:
        dev = model_device(model)
    dtype = model_dtype(model)
    x = x.to(dev, dtype) if x.is_floating_point() else x.to(dev)
    names = list(dict.fromkeys(r.name for r in refs))
    by_name: dict[str, list[LayerRef]] = {n: [r for r in refs if r.name == n] for n in names}

    # Calls needed from each module before the forward may stop (None: run to the end).
    needed: dict[str, int] | None = None
    if stop_early:
        with dtype_support(dtype, dev):
            expected = _expected_calls(model, x, {n: by_name[n][0].module for n in names})
        needed = {}
        for n in names:
            calls = [r.call for r in by_name[n]]
            needed[n] = expected[n] if None in calls else max(c for c in calls if c is not None) + 1
            needed[n] = max(needed[n], 1)

    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    pending = set(names)

    def make_hook(n: str) -> Any:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            outputs[n].append(_store(n, out))
            if needed is not None and len(outputs[n]) >= needed[n]:
                pending.discard(n)
                if not pending:
                    raise _StopForward

        return hook

    modules = {r.name: r.module for r in refs}
    handles = []
    try:
        for n in names:
            handles.append(modules[n].register_forward_hook(make_hook(n)))
        stop = contextlib.suppress(_StopForward)
        with evaluating(model), torch.no_grad(), dtype_support(dtype, dev), stop:
            model(x)
    finally:
        for h in handles:
            h.remove()

    result: dict[str, torch.Tensor] = {}
    for r in refs:
        got = [t.cpu() for t in outputs[r.name]]
        if not got:
            raise ValueError(
                f"layer {r.name!r} is part of the model but did not run during its forward "
                "(it is registered but never called): choose another layer"
            )
        if r.call is not None:
            if r.call >= len(got):
                raise ValueError(
                    f"layer {r.name!r} runs {len(got)} time(s) per forward; "
                    f"{r.key!r} does not exist (use #0..#{len(got) - 1})"
                )
            result[r.key] = got[r.call]
        elif len(got) == 1:
            result[r.name] = got[0]
        else:
            for i, t in enumerate(got):
                result[f"{r.name}#{i}"] = t
    return result
