"""Sanity checks for saliency maps: does the map change when the model's weights do?

Adebayo et al. ("Sanity Checks for Saliency Maps", NeurIPS 2018), cascading model-parameter
randomization: re-initialise the network's units from the output down, recompute each
method's map after every unit, and measure its Spearman rank correlation with the original
map (signed, and of ``|map|``). A map that stays the same while the network is destroyed
says little about what the network does (the paper: guided backprop; gradients and
Grad-CAM pass).

**Units** (:func:`randomization_units`): the model's direct children that hold parameters,
with container children (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``)
expanded one level, ordered output first (the reverse of the order the forward first calls
them). resnet18: ``fc, layer4.1, layer4.0, ..., layer1.0, bn1, conv1``. A model whose only
unit is one wrapper (``nn.Sequential(net, nn.Softmax())``) is expanded into it.

**Randomization** (:func:`randomized_copy`) happens on a structural copy: every
parameter and buffer of the listed units is a new tensor, re-initialised by its module's
``reset_parameters()`` (BatchNorm's running statistics too) under a seed derived from
``seed`` and the unit's name, so a unit gets the same values in every step and in both
cascading and independent modes. The user's weights are never written.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from convlens._io import versions
from convlens.device import DeviceLike

__all__ = [
    "Sanity",
    "randomization_units",
    "randomized_copy",
    "sanity",
    "spearman",
]

DEFAULT_METHODS = ("saliency", "integrated_gradients", "guided_backprop", "gradcam")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# ------------------------------------------------------------------------ units


def _net(model: Any) -> tuple[nn.Module, Any]:
    from convlens.models.forms import is_scripted
    from convlens.models.layers import unwrap
    from convlens.models.zoo import model_and_bundle

    net, bundle = model_and_bundle(model)
    net = unwrap(net)
    if is_scripted(net):
        raise TypeError(
            "the sanity test re-initialises layers of a copy of the model, which a TorchScript "
            "model does not allow: pass the eager nn.Module"
        )
    return net, bundle


def _holds_parameters(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _candidates(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The units in registration order (see the module's docstring)."""

    def level(prefix: str, parent: nn.Module) -> list[tuple[str, nn.Module]]:
        out: list[tuple[str, nn.Module]] = []
        for name, child in parent.named_children():
            if child is None or not _holds_parameters(child):
                continue
            full = f"{prefix}{name}"
            if isinstance(child, _CONTAINERS):
                out.extend(
                    (f"{full}.{n}", c)
                    for n, c in child.named_children()
                    if c is not None and _holds_parameters(c)
                )
            else:
                out.append((full, child))
        return out

    prefix, parent = "", net
    units = level(prefix, parent)
    seen: set[int] = set()
    # a lone wrapper (all the parameters in one unit): look inside it
    while len(units) == 1 and any(True for _ in units[0][1].children()):
        name, parent = units[0]
        if id(parent) in seen:
            break
        seen.add(id(parent))
        inner = level(f"{name}.", parent)
        if not inner:
            break
        units = inner
    # a module registered twice is one unit, under its first name
    unique: dict[int, tuple[str, nn.Module]] = {}
    for name, m in units:
        unique.setdefault(id(m), (name, m))
    return list(unique.values())


def randomization_units(model: Any, x: torch.Tensor | None = None) -> list[str]:
    """The units :func:`sanity` re-initialises, output first: the model's direct children
    that hold parameters, ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict``
    children expanded one level.

    With an input ``x`` (one image is enough), the order is the reverse of the order in
    which a forward first calls each unit (run on a structural copy, in eval mode, without
    gradients), and units the forward never calls (an auxiliary head) are left out;
    without it, the reverse of the registration order.

    Example:
        >>> randomization_units(torchvision.models.resnet18())[:3]
        ['fc', 'layer4.1', 'layer4.0']
    """
    net, _ = _net(model)
    units = _candidates(net)
    if x is None:
        return [name for name, _ in reversed(units)]
    return _forward_order(net, [name for name, _ in units], x)


def _forward_order(net: nn.Module, names: list[str], x: torch.Tensor) -> list[str]:
    from convlens.analysis.featurevis._fold import structural_copy
    from convlens.capture import model_device
    from convlens.models.forms import dtype_support, model_dtype
    from convlens.models.layers import evaluating

    copy = structural_copy(net)
    modules = dict(copy.named_modules())
    order: list[str] = []
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: Any) -> None:
            if name not in order:
                order.append(name)

        return hook

    dev, dtype = model_device(copy), model_dtype(copy)
    xb = x.detach()
    if xb.ndim == 3:
        xb = xb.unsqueeze(0)
    xb = xb[:1].to(dev, dtype)
    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(hook_for(name)))
        with evaluating(copy), torch.no_grad(), dtype_support(dtype, dev):
            copy(xb)
    finally:
        for h in handles:
            h.remove()
    return list(reversed(order))


# ------------------------------------------------------------------------ randomize


def _unit_seed(seed: int, name: str) -> int:
    """A seed for one unit: the same for the same ``(seed, name)`` in every step."""
    return (int(seed) * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63 - 1)


def _reinit(unit: nn.Module, seed: int, done: set[int]) -> None:
    """Replace every parameter and buffer of ``unit``'s modules by a new tensor,
    re-initialised on the CPU in float32 under ``seed`` and then moved to the original
    device and dtype; never writes into the old tensors."""
    modules = [m for m in unit.modules() if id(m) not in done]
    done.update(id(m) for m in modules)
    originals: list[tuple[nn.Module, str, torch.Tensor]] = []
    buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in modules:
            for k, p in list(m._parameters.items()):
                if p is None:
                    continue
                originals.append((m, k, p))
                fresh = (
                    torch.full(p.shape, math.nan, dtype=torch.float32)
                    if p.is_floating_point()
                    else p.detach().cpu().clone()
                )
                m._parameters[k] = nn.Parameter(fresh, requires_grad=False)
            for k, b in list(m._buffers.items()):
                if b is None:
                    continue
                buffers.append((m, k, b))
                dtype = torch.float32 if b.is_floating_point() else b.dtype
                m._buffers[k] = b.detach().to("cpu", dtype, copy=True)
        for m in modules:
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                try:
                    with torch.no_grad():
                        reset()
                except Exception:  # an unusual module: its parameters take the fallback
                    pass
        for m, k, was in originals:
            new = m._parameters[k]
            if new is None or not was.is_floating_point():
                continue
            # no reset_parameters covered it: a normal with the original's mean and std
            missing = torch.isnan(new.data)
            if missing.any():
                old = was.detach().float().cpu()
                std = float(old.std()) if old.numel() > 1 else 0.0
                if math.isfinite(std) and std > 0:
                    draw = torch.randn(old.shape) * std + float(old.mean())
                else:
                    draw = old.clone()
                new.data = torch.where(missing, draw, new.data)
    for m, k, was in originals:
        new = m._parameters[k]
        if new is not None:
            m._parameters[k] = nn.Parameter(new.data.to(was.device, was.dtype), requires_grad=False)
    for m, k, b in buffers:
        fresh_b = m._buffers[k]
        if fresh_b is not None:
            m._buffers[k] = fresh_b.to(b.device, b.dtype)


def randomized_copy(model: Any, units: Sequence[str], seed: int = 0) -> nn.Module:
    """A structural copy of ``model`` with the listed units re-initialised.

    Every parameter and buffer of each unit (all its submodules) is replaced by a new
    tensor: its module's ``reset_parameters()`` draws it (BatchNorm: weight 1, bias 0,
    running statistics reset), under a seed made from ``seed`` and the unit's name, on the
    CPU in float32 and then cast to the model's device and dtype, so the numbers are the
    same on every device. A parameter no ``reset_parameters()`` covers is drawn from a
    normal with its original mean and standard deviation. Everything else is shared with
    ``model``, whose tensors are never written. Parameters held directly by the root
    module are not randomized.

    Example:
        >>> twin = randomized_copy(net, ["fc"], seed=0)
        >>> torch.equal(twin.fc.weight, net.fc.weight), twin.conv1.weight is not None
        (False, True)
    """
    from convlens.analysis.featurevis._fold import structural_copy

    net, _ = _net(model)
    if isinstance(units, str):
        units = [units]
    modules = dict(net.named_modules())
    for name in units:
        if not isinstance(name, str) or name not in modules or name == "":
            raise ValueError(
                f"unknown unit {name!r}: use names from randomization_units(model) "
                "(`convlens layers MODEL` lists every module)"
            )
    copy = structural_copy(net)
    copied = dict(copy.named_modules())
    done: set[int] = set()
    for name in units:
        _reinit(copied[name], _unit_seed(seed, name), done)
    return copy


# ------------------------------------------------------------------------ similarity


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks ``1..P`` of a 1-d tensor, ties given their average rank (scipy's default)."""
    sorted_v, order = torch.sort(v, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2  # the mean of ranks (end - count + 1) .. end
    ranks = torch.empty_like(v, dtype=torch.float64)
    ranks[order] = average[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation per image of ``a`` and ``b`` (``[N, ...]``, flattened
    per image): the Pearson correlation of their ranks, ties given their average rank.
    ``[N]`` float32; NaN where a map is constant (as ``scipy.stats.spearmanr``). For the
    absolute-value variant pass ``a.abs(), b.abs()``.

    Example:
        >>> spearman(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 5.0, 9.0]]))
        tensor([1.])
    """
    if a.shape != b.shape:
        raise ValueError(
            f"maps of different shapes {list(a.shape)} and {list(b.shape)}: "
            "compare maps of the same images"
        )
    if a.ndim == 0:
        raise ValueError("spearman needs [N, ...] maps, got a scalar")
    fa = a.detach().reshape(a.shape[0], -1).double().cpu()
    fb = b.detach().reshape(b.shape[0], -1).double().cpu()
    out = torch.empty(fa.shape[0], dtype=torch.float64)
    for i in range(fa.shape[0]):
        ra, rb = _ranks(fa[i]), _ranks(fb[i])
        ra, rb = ra - ra.mean(), rb - rb.mean()
        denom = ra.norm() * rb.norm()
        out[i] = (ra * rb).sum() / denom if denom > 0 else math.nan
    return out.clamp(-1.0, 1.0).float()


# ------------------------------------------------------------------------ result


@dataclass(frozen=True, eq=False)
class Sanity:
    """Adebayo's model-parameter randomization test, for several attribution methods.

    - ``units``: the units re-initialised, in the order randomized (output first);
      ``cascade``: ``True`` when step ``k`` randomizes ``units[: k + 1]``, ``False`` when
      only ``units[k]``.
    - ``correlation[method]`` ``[len(units), N]``: Spearman's rank correlation of the
      signed map after step ``k`` with the original map, per image; ``abs_correlation``
      the same of ``|map|``. Near 1 all the way down: the map does not depend on the
      weights (the method fails the test).
    - ``maps[method]`` ``[len(units) + 1, N, H, W]``: the original map first, then one per
      step.
    - ``target``: what was attributed, fixed on the original model before randomizing.

    Example:
        >>> s = convlens.sanity(bundle, x, methods=("saliency", "guided_backprop"))
        >>> s.correlation["saliency"].shape == (len(s.units), len(x))
        True
    """

    units: tuple[str, ...]
    cascade: bool
    methods: tuple[str, ...]
    correlation: dict[str, torch.Tensor] = field(repr=False)
    abs_correlation: dict[str, torch.Tensor] = field(repr=False)
    maps: dict[str, torch.Tensor] = field(repr=False)
    target: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        n = int(next(iter(self.maps.values())).shape[1]) if self.maps else 0
        last = ", ".join(
            f"{m}={float(self.abs_correlation[m][-1].nanmean()):.3g}"
            for m in self.methods
            if len(self.units)
        )
        return (
            f"Sanity(methods={list(self.methods)}, units={len(self.units)}, "
            f"cascade={self.cascade}, images={n}, final |map| rho: {last or '-'})"
        )

    def _repr_html_(self) -> str:
        from convlens._notebook import sanity

        return sanity(self)

    def to_dict(self) -> dict[str, Any]:
        """The numbers (per method: the mean correlation after each unit and the
        per-image values, signed and of ``|map|``), the units, the target and the settings,
        for JSON (NaN, from a constant map, is written as ``null``).

        Example:
            >>> s.to_dict()["correlation"]["saliency"]["mean"][0]
            0.42
        """

        def numbers(table: dict[str, torch.Tensor]) -> dict[str, Any]:
            return {
                m: {
                    "mean": [_mean(row) for row in table[m]],
                    "images": [[_num(v) for v in row] for row in table[m]],
                }
                for m in self.methods
            }

        return {
            "units": list(self.units),
            "cascade": self.cascade,
            "methods": list(self.methods),
            "target": list(self.target),
            "correlation": numbers(self.correlation),
            "abs_correlation": numbers(self.abs_correlation),
            "settings": self.settings,
            "versions": versions(),
        }


def _num(v: torch.Tensor) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None


def _mean(row: torch.Tensor) -> float | None:
    ok = row[torch.isfinite(row)]
    return float(ok.mean()) if ok.numel() else None


# ------------------------------------------------------------------------ public


def _attribute(model: Any, x: torch.Tensor, target: Any, method: str, **kw: Any) -> Any:
    """:func:`convlens.attribute` (one place, so tests can stand in for it)."""
    from convlens.analysis.attribution import attribute

    return attribute(model, x, target, method=method, **kw)


def _check_methods(methods: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    got = tuple(methods)
    if not got or not all(isinstance(m, str) for m in got):
        raise ValueError(
            f"methods must be a non-empty sequence of method names, got {methods!r}: "
            f"e.g. {DEFAULT_METHODS}"
        )
    if len(set(got)) != len(got):
        raise ValueError(f"methods {list(got)} name a method twice: list each once")
    return got


def sanity(
    model: Any,
    x: torch.Tensor,
    target: Any = None,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    cascade: bool = True,
    units: Sequence[str] | None = None,
    seed: int = 0,
    steps: int = 16,
    output: Any = None,
    batch: int | str = "auto",
    device: DeviceLike | None = None,
    layer: str | None = None,
    baseline: str | torch.Tensor = "zero",
    samples: int | None = None,
) -> Sanity:
    """Adebayo et al.'s model-parameter randomization test of attribution ``methods``.

    The original maps come from :func:`convlens.attribute` on ``model``; then, for each
    unit of ``units`` (default :func:`randomization_units`, output first), a
    :func:`randomized_copy` with ``units[: k + 1]`` re-initialised (``cascade=True``) or
    only ``units[k]`` (``cascade=False``) is attributed again for the **same** targets
    (``target=None``: the original model's top-1 class, fixed before any randomization).
    ``steps`` and ``baseline`` go to integrated gradients only, ``layer`` to the CAM
    methods, ``samples`` (SmoothGrad) to the pixel-space methods, as
    :func:`convlens.attribute` takes them; ``output`` and ``batch`` to every call.
    ``seed`` seeds the re-initialisation. The user's model is never changed (weights,
    flags, hooks).

    Example:
        >>> s = convlens.sanity(bundle, x, methods=("saliency", "guided_backprop"))
        >>> s.correlation["saliency"].shape == (len(s.units), len(x))
        True
    """
    start = time.perf_counter()
    names = _check_methods(methods)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor [N, C, H, W], got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"x must be [N, C, H, W] or [C, H, W], got shape {list(x.shape)}")
    net, bundle = _net(model)

    if units is None:
        unit_list = randomization_units(net, x)
    else:
        unit_list = [units] if isinstance(units, str) else list(units)
        known = dict(net.named_modules())
        for u in unit_list:
            if not isinstance(u, str) or u == "" or u not in known:
                raise ValueError(
                    f"unknown unit {u!r}: use names from randomization_units(model) "
                    "(`convlens layers MODEL` lists every module)"
                )
    if not unit_list:
        raise ValueError("the model has no unit with parameters to randomize")

    from convlens.analysis.attribution.api import CAM_METHODS
    from convlens.analysis.attribution.gradients import PIXEL_METHODS

    layers: dict[str, str] = {}

    def run(m: Any, method: str, tgt: Any) -> Any:
        kw: dict[str, Any] = {"output": output, "batch": batch, "device": device}
        if method == "integrated_gradients":
            kw["steps"] = steps
            kw["baseline"] = baseline
        if samples is not None and method in PIXEL_METHODS:
            kw["samples"] = samples
            kw["seed"] = seed
        if method in layers:  # a CAM method reads the layer the original map used
            kw["layer"] = layers[method]
        elif layer is not None and method in CAM_METHODS:
            kw["layer"] = layer
        return _attribute(m, x, tgt, method, **kw)

    # the original maps; the target is fixed by the first of them
    first = run(model, names[0], target)
    fixed: Any = target if callable(target) else list(first.target)
    originals = {names[0]: first}
    for method in names[1:]:
        originals[method] = run(model, method, fixed)

    for method, a in originals.items():
        if method in CAM_METHODS and getattr(a, "layer", None):
            layers[method] = str(a.layer)

    maps: dict[str, list[torch.Tensor]] = {
        m: [originals[m].map.detach().float().cpu()] for m in names
    }
    for k in range(len(unit_list)):
        chosen = unit_list[: k + 1] if cascade else [unit_list[k]]
        copy = randomized_copy(net, chosen, seed)
        randomized: Any = dataclasses.replace(bundle, model=copy) if bundle is not None else copy
        for method in names:
            maps[method].append(run(randomized, method, fixed).map.detach().float().cpu())
        del copy, randomized

    stacked = {m: torch.stack(v) for m, v in maps.items()}
    correlation = {
        m: torch.stack([spearman(stacked[m][0], stacked[m][k + 1]) for k in range(len(unit_list))])
        for m in names
    }
    abs_correlation = {
        m: torch.stack(
            [spearman(stacked[m][0].abs(), stacked[m][k + 1].abs()) for k in range(len(unit_list))]
        )
        for m in names
    }
    settings = {
        "seed": seed,
        "steps": steps,
        "baseline": baseline if isinstance(baseline, str) else "tensor",
        "samples": samples,
        "granularity": "direct children holding parameters, containers expanded one level",
        "layers": layers,
        "reinit": "reset_parameters() per module, seeded per unit name",
        "similarity": "spearman rank correlation (average ranks for ties)",
        "output": output if output is None or isinstance(output, (str, int)) else str(output),
        "batch": batch,
        "device": None if device is None else str(device),
        "model": getattr(bundle, "name", type(net).__name__),
        "seconds": time.perf_counter() - start,
    }
    return Sanity(
        units=tuple(unit_list),
        cascade=bool(cascade),
        methods=names,
        correlation=correlation,
        abs_correlation=abs_correlation,
        maps=stacked,
        target=tuple(str(t) for t in first.target),
        settings=settings,
    )
