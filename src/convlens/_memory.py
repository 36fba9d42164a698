"""What the machine can hold, and what a forward (and backward) will need: absurd sizes
and batches are refused in one line, before anything is allocated.

:func:`available_memory` is the free memory of a device; :func:`activation_bytes`
estimates, from one trace on the meta device (no memory), at least the bytes one input
row holds up to a layer; :func:`check_fits` turns an estimate above what is free into one
:class:`~convlens.errors.ResourceError` naming the estimate, the limit and the fix.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from convlens.errors import ResourceError

__all__ = [
    "ACTIVATION_RATIO",
    "activation_bytes",
    "available_memory",
    "check_fits",
    "format_bytes",
    "may_exceed",
]

#: A bound on the bytes a network holds per byte of its input (efficientnet_lite0 up to
#: blocks.4: ~40 in its convolution outputs; VGG16 whole: ~90): below ``free / 1000`` of
#: input nothing is traced, so the checks cost nothing (and never run the model) at
#: ordinary sizes.
ACTIVATION_RATIO = 1000

#: the side of the real (not meta) probe when a model cannot run on the meta device
_PROBE_SIDE = 64


def _cgroup_free() -> int | None:
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            with open(limit_file) as fh:
                raw = fh.read().strip()
            if raw == "max":
                return None
            limit = int(raw)
            if limit >= 2**60:
                return None
            with open(usage_file) as fh:
                usage = int(fh.read().strip())
            return max(0, limit - usage)
        except (OSError, ValueError):
            continue
    return None


def available_memory(device: torch.device) -> int:
    """Bytes the device can still give: CUDA's free memory, else the system's available
    memory (``MemAvailable``, capped by a container's cgroup limit); 4 GiB when unknown.

    Example:
        >>> available_memory(torch.device("cpu")) > 0
        True
    """
    if device.type == "cuda":
        cuda_free, _total = torch.cuda.mem_get_info(device)
        return int(cuda_free)
    if device.type == "mps":
        mps = getattr(torch, "mps", None)
        try:
            return int(mps.recommended_max_memory() - mps.current_allocated_memory())  # type: ignore[union-attr]
        except Exception:
            return 4 * 2**30
    free: int | None = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 4 * 2**30
    group = _cgroup_free()
    return int(min(free, group) if group is not None else free)


def format_bytes(n: float) -> str:
    """``n`` bytes for a person: ``'120 GB'``, ``'3.4 MB'`` (powers of 1000).

    Example:
        >>> format_bytes(1.2e11), format_bytes(3.4e6)
        ('120 GB', '3.4 MB')
    """
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v >= 10 else f"{v:.1f} {unit}"
    return f"{int(n)} B"


_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


def _elements(
    net: nn.Module, shape: Sequence[int], dtype: torch.dtype, until: str | None, meta: bool
) -> tuple[float, float]:
    """``(sum, max)`` of the elements of every convolution's and linear layer's output, in
    call order, up to ``until``'s output (``"name#i"``: its call ``i``); the input counts
    as a floor of both."""
    from convlens.models.layers import _meta_forward, _real_forward, evaluating, hooks_aside

    stop_name, _, call = (until or "").partition("#")
    stop_call = int(call) if call.isdigit() else 0
    modules = dict(net.named_modules())
    weighted = [m for n, m in modules.items() if n and isinstance(m, _WEIGHTED)]
    sizes: list[float] = []
    seen = [0]

    class _Done(Exception):
        pass

    def count(_m: nn.Module, _i: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            sizes.append(float(out.numel()))

    def stop(_m: nn.Module, _i: Any, _out: Any) -> None:
        seen[0] += 1
        if seen[0] > stop_call:
            raise _Done

    handles = []
    with hooks_aside(net):
        try:
            for m in weighted:
                handles.append(m.register_forward_hook(count))
            if stop_name and stop_name in modules:
                handles.append(modules[stop_name].register_forward_hook(stop))
            with evaluating(net), torch.no_grad(), contextlib.suppress(_Done):
                (_meta_forward if meta else _real_forward)(net, (1, *shape), dtype)
        finally:
            for h in handles:
                h.remove()
    floor = float(math.prod(shape))
    return max(sum(sizes), floor), max([*sizes, floor])


def activation_bytes(
    net: nn.Module,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    until: str | None = None,
    backward: bool = True,
) -> float:
    """At least the bytes one input row of ``shape`` (``[C, H, W]``) holds through the
    model up to the output of ``until`` (default: the whole model). With ``backward``:
    every convolution's and linear layer's output, each kept for the backward pass; without:
    the largest of them. A lower bound (normalisations, activations and gradients add
    more), so a refusal built on it is never a false alarm. Traced on the meta device, so
    nothing is allocated; a model that cannot run there is traced for real at 64 px and
    scaled by the area.

    Example:
        >>> activation_bytes(SimpleCNN(), (3, 32, 32), until="conv2") > 0
        True
    """
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    try:
        total, most = _elements(net, shape, dtype, until, meta=True)
    except Exception:  # data-dependent code or an op without a meta kernel
        c, h, w = (int(v) for v in shape)
        side_h, side_w = min(h, _PROBE_SIDE), min(w, _PROBE_SIDE)
        total, most = _elements(net, (c, side_h, side_w), dtype, until, meta=False)
        scale = (h * w) / (side_h * side_w)
        total, most = total * scale, most * scale
    return size * (total if backward else most)


def may_exceed(input_bytes: float, free: int, extra: float = 0.0) -> bool:
    """Whether inputs of ``input_bytes`` (plus ``extra`` bytes) could need more than
    ``free`` bytes through any network: only then is the model traced.

    Example:
        >>> may_exceed(56 * 3 * 152 * 152 * 4, 24 * 10**9)
        False
    """
    return input_bytes * ACTIVATION_RATIO + extra > free


def check_fits(
    need: float, device: torch.device, what: str, fix: str, *, memory: int | None = None
) -> None:
    """Raise :class:`ResourceError` when ``need`` bytes exceed what ``device`` has free:
    ``"{what} needs ~N GB ...; this machine has M GB available: {fix}"``.

    Example:
        >>> check_fits(1.2e11, torch.device("cpu"), "--size 100000: an image of 100000 px",
        ...            "use --size <= 4000", memory=23 * 10**9)
        Traceback (most recent call last):
        ResourceError: --size 100000: an image of 100000 px needs at least 120 GB; this machine has 23 GB available: use --size <= 4000
    """
    free = available_memory(device) if memory is None else memory
    if need > free:
        where = "this machine" if device.type == "cpu" else f"{device}"
        raise ResourceError(
            f"{what} needs at least {format_bytes(need)}; {where} has {format_bytes(free)} "
            f"available: {fix}"
        )
