"""Fold eval-mode BatchNorm into the convolution before it, in a private copy of a model.

In eval mode ``bn(conv(x))`` is one convolution with rescaled weights and a new bias, so
a render that runs the model hundreds of times can skip every BatchNorm forward and
backward. The user's model is never changed, and nothing on it is copied: the folding
happens in a *structural* copy (:func:`structural_copy`: every module shallow-copied with
its own attribute table, parameters and buffers as views of the model's storage, no hooks),
and the fused weights are computed from the parameters, in float32 whatever the model's
dtype. :func:`fold_batchnorm` returns ``None`` (use the model as it is) when nothing folds.
The copy carries none of the user's hooks (a ``SaveFeatures``-style hook object holding a
tensor with autograd history is never deep-copied); state the user hung on a module is
shared by reference, never copied.

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

from collections import Counter
from typing import Any, cast

import torch
from torch import nn

from convlens.analysis.featurevis._inputgrad import fast_input_grads
from convlens.models.forms import HOOK_TABLES, is_scripted

__all__ = ["fold_batchnorm", "fuse_conv_bn", "structural_copy"]

# Per-module tables convlens must not carry into a copy: every hook (and the hook ids of
# the with_kwargs / always_called sets) and the state-dict hooks.
_HOOK_STATE = (
    *HOOK_TABLES,
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree that shares its weights and none of its hooks.

    Every module is shallow-copied (a new attribute table, so setting an attribute on the
    copy leaves the model alone); its parameters become new ``requires_grad=False``
    parameters over the same storage (no memory), its buffers views of the same storage,
    its hook tables empty, and its submodules copies made the same way. Anything else a
    module holds (the user's own state) is shared by reference, never copied; a tensor
    attribute with autograd history is shared detached (the same values, no link into the
    user's graph). Replace modules of the copy, not their tensors in place.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3))
        >>> twin = structural_copy(net)
        >>> twin[0] is not net[0], twin[0].weight.data_ptr() == net[0].weight.data_ptr()
        (True, True)
    """
    done: dict[int, nn.Module] = {}

    def copy_of(m: nn.Module) -> nn.Module:
        if id(m) in done:  # a module registered under two names stays one module
            return done[id(m)]
        twin = object.__new__(type(m))
        done[id(m)] = twin
        state = twin.__dict__
        state.update(m.__dict__)
        for k, v in state.items():  # the user's tensors: the same values, no autograd history
            if isinstance(v, torch.Tensor) and v.requires_grad:
                state[k] = v.detach()
        for name in _HOOK_STATE:
            table = state.get(name)
            if table is not None:
                state[name] = type(table)()
        state["_parameters"] = {
            k: None if p is None else nn.Parameter(p.detach(), requires_grad=False)
            for k, p in m._parameters.items()
        }
        state["_buffers"] = {k: None if b is None else b.detach() for k, b in m._buffers.items()}
        state["_non_persistent_buffers_set"] = set(m._non_persistent_buffers_set)
        state["_modules"] = {k: None if c is None else copy_of(c) for k, c in m._modules.items()}
        return twin

    return copy_of(model)


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """``conv`` followed by eval-mode ``bn`` as one convolution: a structural copy of
    ``conv`` with the rescaled weight and the new bias, computed from the parameters in
    float32 and stored in the convolution's dtype (no parameter gradients).

    Example:
        >>> conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval()
        >>> x = torch.rand(1, 3, 8, 8)
        >>> torch.allclose(fuse_conv_bn(conv, bn)(x), bn(conv(x)), atol=1e-6)
        True
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a BatchNorm without running statistics does not fold")
    w = conv.weight.detach()
    dtype = w.dtype
    n = w.shape[0]
    mean = bn.running_mean.detach().float()
    scale = torch.rsqrt(bn.running_var.detach().float() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().float()
    shift = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(mean)
    bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros_like(mean)
    fused = structural_copy(conv)
    new_w = (w.float() * scale.view(n, *([1] * (w.ndim - 1)))).to(dtype)
    new_b = ((bias - mean) * scale + shift).to(dtype)
    fused._parameters["weight"] = nn.Parameter(new_w, requires_grad=False)
    fused._parameters["bias"] = nn.Parameter(new_b, requires_grad=False)
    return cast(nn.Conv2d, fused)


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
    into their convolutions, and how many were folded; ``None`` when none fold (and for
    a TorchScript module, which cannot be copied this way).

    ``example`` is one input batch (a batch of one is enough) used to find the pairs;
    convolutions named in ``keep`` are left alone. The copy is a :func:`structural_copy`:
    the model's hooks are not on it (they neither run in the copy nor see ``example``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> folded, n = fold_batchnorm(net, torch.rand(1, 3, 8, 8))
        >>> n, type(folded[1]).__name__
        (1, 'Identity')
    """
    if is_scripted(model):
        return None
    named = dict(model.named_modules())
    if not any(_foldable_bn(m) for m in named.values()):
        return None
    clone = structural_copy(model).eval()
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
        _set(clone, conv_name, fuse_conv_bn(conv, bn))
        _set(clone, bn_name, _after(bn))
        folded += 1
    if folded == 0:
        return None
    fast_input_grads(clone, keep)
    for m in clone.modules():
        # An in-place activation under autograd computes out of place and copies back;
        # in our own copy it may as well just compute out of place.
        if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish)):
            m.inplace = False
    return clone, folded
