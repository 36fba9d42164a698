"""Activation figures: mean map per layer, every feature map of one layer, channel stats."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from matplotlib.figure import Figure

from convlens.analysis.activations import ChannelStats, mean_map, normalize_maps
from convlens.analysis.activations import channel_stats as _channel_stats
from convlens.plot._base import grid_shape, hide_ticks, new_figure

__all__ = ["channel_stats", "feature_maps", "mean_maps"]


def _one(act: torch.Tensor, name: str) -> torch.Tensor:
    if act.ndim == 4:
        if act.shape[0] != 1:
            raise ValueError(f"{name}: a batch of {act.shape[0]}; pick one image, e.g. act[:1]")
        act = act[0]
    if act.ndim != 3:
        raise ValueError(f"{name}: expected a feature map [C, H, W], got {list(act.shape)}")
    return act


def mean_maps(
    acts: Mapping[str, torch.Tensor],
    *,
    relu: bool | Mapping[str, bool] = False,
    cmap: str = "viridis",
) -> Figure:
    """One panel per layer: the channel-mean activation map, its shape in the title.

    ``relu`` applies ReLU first (the course does it for BatchNorm outputs): one flag for
    every layer or a ``{layer: flag}`` mapping.

    Example:
        >>> acts = convlens.capture(model, x, ["bn1", "bn2", "bn3"])
        >>> fig = convlens.plot.mean_maps(acts, relu=True)
    """
    if not acts:
        raise ValueError("no activations to plot")
    n = len(acts)
    fig = new_figure(3.4 * n, 3.6)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, act) in zip(axes, acts.items()):
        a = _one(act, name)
        use_relu = relu.get(name, False) if isinstance(relu, Mapping) else relu
        m = mean_map(a, relu=use_relu)
        im = ax.imshow(m.numpy(), cmap=cmap)
        c, h, w = a.shape
        ax.set_title(f"{name}{' (ReLU)' if use_relu else ''}\n{c} ch, {h}x{w}")
        hide_ticks(ax)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def feature_maps(
    act: torch.Tensor,
    *,
    title: str = "",
    max_maps: int = 64,
    cmap: str = "viridis",
) -> Figure:
    """Every feature map of one layer (up to ``max_maps``), each scaled to its own range.

    Example:
        >>> fig = convlens.plot.feature_maps(acts["conv1"], title="conv1")
    """
    if max_maps < 1:
        raise ValueError(f"max_maps must be at least 1, got {max_maps}")
    a = _one(act, title or "activation")
    maps = normalize_maps(a)[:max_maps]
    n = maps.shape[0]
    rows, cols = grid_shape(n, max_cols=8)
    fig = new_figure(1.5 * cols, 1.5 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        hide_ticks(ax)
        if i < n:
            ax.imshow(maps[i].numpy(), cmap=cmap, vmin=0, vmax=1)
            ax.set_title(str(i), fontsize=7)
        else:
            ax.set_axis_off()
    shown = f"{n} of {a.shape[0]}" if n < a.shape[0] else f"all {n}"
    fig.suptitle(
        f"{title + ': ' if title else ''}{shown} feature maps, each scaled to its own range"
    )
    fig.tight_layout()
    return fig


def channel_stats(stats: ChannelStats | torch.Tensor, *, title: str = "") -> Figure:
    """Bars of each channel's mean and max, and the fraction of positions that are active.

    Example:
        >>> fig = convlens.plot.channel_stats(acts["layer1"], title="layer1")
    """
    s = stats if isinstance(stats, ChannelStats) else _channel_stats(_one(stats, title or "act"))
    c = s.mean.numel()
    idx = list(range(c))
    fig = new_figure(max(6.0, min(16.0, 0.12 * c + 4)), 4.5)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.bar(idx, s.max.numpy(), color="#c9d7ea", label="max")
    ax1.bar(idx, s.mean.numpy(), color="#2b6cb0", label="mean")
    ax1.axhline(0, color="black", lw=0.5)
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_ylabel("activation")
    ax2.bar(idx, s.fraction_active.numpy(), color="#dd6b20")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("fraction > 0")
    ax2.set_xlabel("channel")
    if title:
        ax1.set_title(title)
    fig.tight_layout()
    return fig
