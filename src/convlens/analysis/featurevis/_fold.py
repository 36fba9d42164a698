"""Fold eval-mode BatchNorm into the convolution before it, in a private copy of a model.

In eval mode ``bn(conv(x))`` is one convolution with rescaled weights and a new bias, so
a render that runs the model hundreds of times can skip every BatchNorm forward and
backward. The user's model is never changed: the folding happens in a deep copy, and
:func:`fold_batchnorm` returns ``None`` (use the model as it is) when nothing folds.

Pairs are found by running the copy once: a BatchNorm folds into a ``Conv2d`` when its
input is that convolution's output, both run exactly once per forward, and the
convolution's own output is not something the caller reads (``keep``). A BatchNorm is
replaced by ``nn.Identity``; timm's ``BatchNormAct2d`` (BatchNorm, dropout, activation in
one module) by a module that keeps its dropout and activation under the same names. A
caller must check the copy against the original (``render`` compares the outputs it
reads on one input and falls back to the original when they differ), because a
convolution output that is also used elsewhere (a rare skip connection straight from a
conv) would change there too.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batchnorm"]


class _ActAfterNorm(nn.Module):
    """What is left of timm's ``BatchNormAct2d`` once its normalisation is folded away."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _foldable_bn(m: nn.Module) -> bool:
    if not isinstance(m, nn.BatchNorm2d) or m.running_mean is None or m.running_var is None:
        return False
    if type(m) is nn.BatchNorm2d:
        return True
    # timm's BatchNormAct2d: F.batch_norm, then self.drop, then self.act
    return (
        type(m).__name__ == "BatchNormAct2d"
        and isinstance(getattr(m, "drop", None), nn.Module)
        and isinstance(getattr(m, "act", None), nn.Module)
    )


def _foldable_conv(m: nn.Module) -> bool:
    # timm's Conv2dSame pads, then runs the plain convolution with self.weight/self.bias
    return type(m) is nn.Conv2d or (isinstance(m, nn.Conv2d) and type(m).__name__ == "Conv2dSame")


def _after(bn: nn.Module) -> nn.Module:
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    # _foldable_bn checked that both are modules
    return _ActAfterNorm(cast(nn.Module, bn.drop), cast(nn.Module, bn.act))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def fold_batchnorm(
    model: nn.Module,
    example: torch.Tensor,
    keep: set[str] = frozenset(),  # type: ignore[assignment]
) -> tuple[nn.Module, int] | None:
    """A copy of ``model`` (in eval mode, no parameter gradients) with BatchNorms folded
    into their convolutions, and how many were folded; ``None`` when none fold.

    ``example`` is one input batch (a batch of one is enough) used to find the pairs;
    convolutions named in ``keep`` are left alone.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> folded, n = fold_batchnorm(net, torch.rand(1, 3, 8, 8))
        >>> n, type(folded[1]).__name__
        (1, 'Identity')
    """
    named = dict(model.named_modules())
    if not any(_foldable_bn(m) for m in named.values()):
        return None
    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    modules = dict(clone.named_modules())
    calls: Counter[str] = Counter()
    made: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # keep outputs alive so their ids stay unique
    pairs: list[tuple[str, str]] = []
    handles = []

    def conv_hook(name: str) -> Any:
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            calls[name] += 1
            if isinstance(out, torch.Tensor):
                made[id(out)] = name
                alive.append(out)

        return hook

    def bn_hook(name: str) -> Any:
        def hook(_m: nn.Module, inp: Any) -> None:
            calls[name] += 1
            src = made.get(id(inp[0])) if inp and isinstance(inp[0], torch.Tensor) else None
            if src is not None:
                pairs.append((src, name))

        return hook

    try:
        for name, m in modules.items():
            if _foldable_conv(m) and name not in keep:
                handles.append(m.register_forward_hook(conv_hook(name)))
            elif _foldable_bn(m):
                handles.append(m.register_forward_pre_hook(bn_hook(name)))
        with torch.no_grad():
            clone(example)
    except Exception:  # folding is an optimisation: the render's own
        return None  # forward runs next and raises whatever is wrong, where it belongs
    finally:
        for h in handles:
            h.remove()
        alive.clear()
    used = Counter(c for c, _ in pairs)
    folded = 0
    for conv_name, bn_name in pairs:
        if calls[conv_name] != 1 or calls[bn_name] != 1 or used[conv_name] != 1:
            continue
        # the hooks went only on foldable convolutions and BatchNorms
        conv = cast(nn.Conv2d, modules[conv_name])
        bn = cast(nn.BatchNorm2d, modules[bn_name])
        _set(clone, conv_name, fuse_conv_bn_eval(conv, bn))
        _set(clone, bn_name, _after(bn))
        folded += 1
    if folded == 0:
        return None
    for m in clone.modules():
        # An in-place activation under autograd computes out of place and copies back;
        # in our own copy it may as well just compute out of place.
        if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish)):
            m.inplace = False
    return clone, folded
