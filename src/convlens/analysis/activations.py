"""Activation views: mean map per layer, every feature map of a layer, per-channel stats.

Pure tensor code: takes the ``[C, H, W]`` or ``[N, C, H, W]`` activations that
:func:`convlens.capture` returns; :mod:`convlens.plot` draws them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ChannelStats", "channel_stats", "mean_map", "normalize_maps"]


def _as_chw(act: torch.Tensor, what: str = "activation") -> torch.Tensor:
    if not isinstance(act, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(act).__name__}")
    if act.ndim == 4:
        if act.shape[0] != 1:
            raise ValueError(f"{what} has a batch of {act.shape[0]}: pick one image, e.g. act[0]")
        act = act[0]
    if act.ndim != 3:
        raise ValueError(
            f"{what} must be a feature map [C, H, W] or [1, C, H, W], got {list(act.shape)} "
            "(a linear layer's output has no spatial map)"
        )
    return act.detach().float()


def mean_map(act: torch.Tensor, *, relu: bool = False) -> torch.Tensor:
    """The channel-mean activation map ``[H, W]`` (``[N, H, W]`` for a batch).

    ``relu=True`` applies ReLU first, as the course does for BatchNorm outputs (whose
    negative values would otherwise cancel positive ones).

    Example:
        >>> mean_map(torch.tensor([[[1.0, -1.0]], [[3.0, -3.0]]]), relu=True)
        tensor([[2., 0.]])
    """
    if act.ndim not in (3, 4):
        raise ValueError(f"expected [C, H, W] or [N, C, H, W], got {list(act.shape)}")
    a = act.detach().float()
    if relu:
        a = a.clamp(min=0)
    return a.mean(dim=-3)


def normalize_maps(act: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Scale each channel of ``[C, H, W]`` to ``[0, 1]`` by its own min and max.

    A constant channel becomes all zeros (there is nothing to show).

    Example:
        >>> normalize_maps(torch.tensor([[[2.0, 4.0]], [[5.0, 5.0]]]))
        tensor([[[0., 1.]],
        <BLANKLINE>
                [[0., 0.]]])
    """
    a = _as_chw(act)
    flat = a.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    span = hi - lo
    return torch.where(span > eps, (a - lo) / span.clamp(min=eps), torch.zeros_like(a))


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of one layer's output for one image (each a ``[C]`` tensor).

    Example:
        >>> acts = convlens.capture(model, x, ["layer4"])
        >>> s = convlens.channel_stats(acts["layer4"])
        >>> s.mean.shape, float(s.fraction_active.mean())
    """

    mean: torch.Tensor
    max: torch.Tensor
    fraction_active: torch.Tensor  # share of positions with a value > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean.tolist(),
            "max": self.max.tolist(),
            "fraction_active": self.fraction_active.tolist(),
        }

    def top_channels(self, k: int = 5, by: str = "mean") -> list[int]:
        """Indices of the ``k`` channels with the highest ``by`` (mean, max, fraction_active)."""
        values = getattr(self, by, None)
        if not isinstance(values, torch.Tensor):
            raise ValueError(f"by must be 'mean', 'max' or 'fraction_active', got {by!r}")
        return values.topk(min(k, values.numel())).indices.tolist()


def channel_stats(act: torch.Tensor) -> ChannelStats:
    """Mean, max and fraction of positive positions of every channel of ``[C, H, W]``.

    Example:
        >>> s = channel_stats(torch.tensor([[[1.0, -1.0]], [[0.0, 2.0]]]))
        >>> s.mean.tolist(), s.max.tolist(), s.fraction_active.tolist()
        ([0.0, 1.0], [1.0, 2.0], [0.5, 0.5])
    """
    flat = _as_chw(act).flatten(1)
    return ChannelStats(
        mean=flat.mean(dim=1),
        max=flat.max(dim=1).values,
        fraction_active=(flat > 0).float().mean(dim=1),
    )
