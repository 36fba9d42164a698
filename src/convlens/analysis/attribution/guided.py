"""Guided backpropagation on every ReLU-family activation, without touching the model.

Guided backpropagation (Springenberg et al., "Striving for Simplicity", 2015) changes only
the backward pass of the rectifiers: a gradient passes an activation where its local
derivative is non-zero **and** the gradient arriving from above is positive. Captum does
this by overriding ``nn.ReLU`` modules, so a functional ``F.relu`` (the course's
SimpleCNN) is silently left plain and in-place or reused ReLUs go wrong.

:func:`guided_relus` instead intercepts the *calls*: inside the block a
:class:`torch.overrides.TorchFunctionMode` sees every torch function call (a module's
``forward`` calls the functional form, so ``nn.ReLU``, ``nn.ReLU6``, ``nn.LeakyReLU``,
``nn.Hardtanh`` and ``nn.Threshold`` are caught through it) and replaces each ReLU-family
call on a tensor that requires grad by a custom autograd function. Its forward is the
activation itself (the same kernel, bit for bit); its backward is the guided rule::

    grad_in = relu(grad_out) * local_derivative

with the local derivative PyTorch's own: ``x > 0`` for ReLU, ``min < x < max`` for ReLU6
and Hardtanh, ``x > threshold`` for Threshold, and for LeakyReLU ``1`` where ``x > 0``
and ``negative_slope`` elsewhere (its "passes" region is everywhere, so the guided rule
keeps the slope's share of the positive gradients rather than cutting them: with
``negative_slope=0`` it is exactly the ReLU rule).

Nothing is registered on the model: no module swapped, no hook, no flag changed. Leaving
the block (also on an exception) pops the mode and nothing remains.

Caught, functional or through a module, out of place or in place: ``F.relu``,
``torch.relu``, ``Tensor.relu``, ``torch.relu_`` (= ``F.relu_``), ``Tensor.relu_``,
``F.relu6``, ``F.hardtanh``, ``F.hardtanh_``, ``F.leaky_relu``, ``F.leaky_relu_``,
``F.threshold``, ``torch.threshold``, ``torch.threshold_`` (= ``F.threshold_``),
``torch._C._nn.relu6 / relu6_ / hardtanh / leaky_relu`` called directly, and the
``torch.ops.aten`` forms of all of them. Not caught (their gradient stays plain): a ReLU
written as ``x.clamp(min=0)`` or ``torch.maximum``, ``prelu`` / ``rrelu`` / ``elu`` and
smooth activations, a ReLU inside a custom ``autograd.Function`` or a TorchScript module,
and a ReLU called from inside another Python function that itself dispatches
``__torch_function__`` (the mode is paused while such a call runs).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["GuidedStats", "guided_relus"]


@dataclass
class GuidedStats:
    """What :func:`guided_relus` did: ``calls`` activations made guided, and ``kinds``,
    how many of them each function was (``"F.relu"``, ``"Tensor.relu_"``, ...; a module
    counts as the functional form its ``forward`` calls: ``nn.ReLU6`` is ``"F.hardtanh"``;
    ``F.relu_`` *is* ``torch.relu_``, and counts as ``"torch.relu_"``).
    Calls that need no gradient (under ``torch.no_grad()``, or on an input that does not
    require grad) run plain and are not counted.

    Example:
        >>> with guided_relus() as stats:
        ...     F.relu(torch.randn(3, requires_grad=True)).sum().backward()
        >>> stats.calls, dict(stats.kinds)
        (1, {'F.relu': 1})
    """

    calls: int = 0
    kinds: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class _Spec:
    """One ReLU-family function: how to read its arguments and run it out of place."""

    name: str
    # The parameters after the input, with their defaults (None: required).
    params: tuple[tuple[str, float | None], ...]
    # True: always in place (relu_); False: never; None: its ``inplace`` argument decides.
    inplace: bool | None
    # The out-of-place function, called as fn(x, *params) (the functional form itself for
    # ``F.*``, so its own argument checks run).
    fn: Callable[..., torch.Tensor]
    # (x, *params) -> (where the local derivative is non-zero, the derivative elsewhere).
    rule: Callable[..., tuple[torch.Tensor, float]]

    def bind(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, tuple[Any, ...], bool] | None:
        """``(input, params, inplace)`` from a call's arguments; ``None`` when they do not
        fit (the call then runs unchanged, so torch reports the error itself)."""
        rest = list(args)
        kw = dict(kwargs)
        if rest:
            x = rest.pop(0)
        elif "input" in kw:
            x = kw.pop("input")
        elif "self" in kw:
            x = kw.pop("self")
        else:
            return None
        values: list[Any] = []
        for name, default in self.params:
            if rest:
                values.append(rest.pop(0))
            elif name in kw:
                values.append(kw.pop(name))
            elif default is not None:
                values.append(default)
            else:
                return None
        inplace = self.inplace
        if inplace is None:
            inplace = bool(rest.pop(0) if rest else kw.pop("inplace", False))
        if rest or kw or not isinstance(x, torch.Tensor):
            return None
        return x, tuple(values), inplace


def _relu_rule(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    return x > 0, 0.0


def _relu6_rule(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    return (x > 0) & (x < 6), 0.0


def _hardtanh_rule(
    x: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0
) -> tuple[torch.Tensor, float]:
    return (x > min_val) & (x < max_val), 0.0


def _leaky_rule(x: torch.Tensor, negative_slope: float = 0.01) -> tuple[torch.Tensor, float]:
    return x > 0, float(negative_slope)


def _threshold_rule(x: torch.Tensor, threshold: float, value: float) -> tuple[torch.Tensor, float]:
    return x > threshold, 0.0


def _specs() -> dict[Any, _Spec]:
    """Every ReLU-family callable the mode may receive, keyed by the callable itself."""
    nn_c: Any = torch._C._nn
    aten: Any = torch.ops.aten
    hardtanh_p: tuple[tuple[str, float | None], ...] = (("min_val", -1.0), ("max_val", 1.0))
    leaky_p: tuple[tuple[str, float | None], ...] = (("negative_slope", 0.01),)
    threshold_p: tuple[tuple[str, float | None], ...] = (("threshold", None), ("value", None))
    rows: list[tuple[Any, str, tuple[tuple[str, float | None], ...], bool | None, Any, Any]] = [
        (F.relu, "F.relu", (), None, F.relu, _relu_rule),
        (torch.relu, "torch.relu", (), False, torch.relu, _relu_rule),
        (torch.Tensor.relu, "Tensor.relu", (), False, torch.relu, _relu_rule),
        (torch.relu_, "torch.relu_", (), True, torch.relu, _relu_rule),
        (torch.Tensor.relu_, "Tensor.relu_", (), True, torch.relu, _relu_rule),
        (F.relu6, "F.relu6", (), None, F.relu6, _relu6_rule),
        (nn_c.relu6, "torch._C._nn.relu6", (), False, nn_c.relu6, _relu6_rule),
        (nn_c.relu6_, "torch._C._nn.relu6_", (), True, nn_c.relu6, _relu6_rule),
        (F.hardtanh, "F.hardtanh", hardtanh_p, None, F.hardtanh, _hardtanh_rule),
        (nn_c.hardtanh, "torch._C._nn.hardtanh", hardtanh_p, False, nn_c.hardtanh, _hardtanh_rule),
        (nn_c.hardtanh_, "F.hardtanh_", hardtanh_p, True, nn_c.hardtanh, _hardtanh_rule),
        (F.leaky_relu, "F.leaky_relu", leaky_p, None, F.leaky_relu, _leaky_rule),
        (nn_c.leaky_relu, "torch._C._nn.leaky_relu", leaky_p, False, nn_c.leaky_relu, _leaky_rule),
        (nn_c.leaky_relu_, "F.leaky_relu_", leaky_p, True, nn_c.leaky_relu, _leaky_rule),
        (F.threshold, "F.threshold", threshold_p, None, F.threshold, _threshold_rule),
        (torch.threshold, "torch.threshold", threshold_p, False, torch.threshold, _threshold_rule),
        (torch.threshold_, "torch.threshold_", threshold_p, True, torch.threshold, _threshold_rule),
    ]
    for name, params, fn, rule in (
        ("relu", (), aten.relu.default, _relu_rule),
        ("relu6", (), aten.relu6.default, _relu6_rule),
        ("hardtanh", hardtanh_p, aten.hardtanh.default, _hardtanh_rule),
        ("leaky_relu", leaky_p, aten.leaky_relu.default, _leaky_rule),
        ("threshold", threshold_p, aten.threshold.default, _threshold_rule),
    ):
        for suffix, inplace in (("", False), ("_", True)):
            packet = getattr(aten, name + suffix)
            for op in (packet, packet.default):
                rows.append((op, f"aten.{name}{suffix}", params, inplace, fn, rule))
    return {
        func: _Spec(name, params, inplace, fn, rule)
        for func, name, params, inplace, fn, rule in rows
    }


_SPECS = _specs()


class _Guided(torch.autograd.Function):
    """The activation forward (out of place), the guided rule backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, spec: _Spec, params: tuple[Any, ...]) -> torch.Tensor:
        return spec.fn(x, *params)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, spec, params = inputs
        # The mask, not the input: an in-place caller overwrites the input right after.
        passes, elsewhere = spec.rule(x, *params)
        ctx.save_for_backward(passes)
        ctx.elsewhere = elsewhere

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (passes,) = ctx.saved_tensors
        positive = grad.clamp(min=0)
        other = positive * ctx.elsewhere if ctx.elsewhere else 0.0
        return torch.where(passes, positive, other), None, None


class _GuidedMode(TorchFunctionMode):
    def __init__(self, stats: GuidedStats) -> None:
        super().__init__()
        self.stats = stats

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = {} if kwargs is None else kwargs
        try:
            spec = _SPECS.get(func)
        except TypeError:  # an unhashable callable: not one of ours
            spec = None
        if spec is None or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        bound = spec.bind(args, kwargs)
        if bound is None or not bound[0].requires_grad:
            return func(*args, **kwargs)
        x, params, inplace = bound
        out = _Guided.apply(x, spec, params)
        self.stats.calls += 1
        self.stats.kinds[spec.name] += 1
        if inplace:
            # The caller may use the input rather than the result (``x.relu_()``; ``self.relu(x)``
            # with ``inplace=True``): the input holds the activation, as the real op leaves it.
            return x.copy_(out)
        return out


@contextlib.contextmanager
def guided_relus() -> Iterator[GuidedStats]:
    """Make every ReLU-family activation run inside the block guided (see the module
    docstring): same forward, backward ``relu(grad_out) * local_derivative``. Yields a
    :class:`GuidedStats` that counts the activations made guided (``calls == 0`` after a
    backward: the model has none, and guided backprop equals the plain gradient).

    The model is never touched (no module swapped, no hook); in-place forms stay in place
    (the input holds the activation and is returned); under ``torch.no_grad()`` the
    activations run plain. On leaving the block, also on an exception, nothing remains.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> with guided_relus() as stats:
        ...     (F.relu(x) * torch.tensor([3.0, -1.0])).sum().backward()
        >>> x.grad, stats.calls
        (tensor([3., 0.]), 1)
    """
    stats = GuidedStats()
    with _GuidedMode(stats):
        yield stats
