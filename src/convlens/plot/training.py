"""Training figures: the course's loss/accuracy curves, conv1 filters before vs after,
the confusion matrix, and validation images with predicted vs true class."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from convlens.plot._base import hide_ticks, image_grid, new_figure

__all__ = ["confusion", "curves", "filters_before_after", "predictions", "sample_batch"]


def curves(history: Sequence[Mapping[str, Any]], *, title: str = "") -> Figure:
    """Loss (train and val) and validation accuracy per epoch, as the course plots them.

    Example:
        >>> fig = convlens.plot.curves(result.history)
    """
    if not history:
        raise ValueError("the history is empty: train at least one epoch")
    ep = [int(r["epoch"]) for r in history]
    fig = new_figure(11, 4)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    val = [(int(r["epoch"]), r) for r in history if r.get("val_loss") is not None]
    if val:
        ax1.plot([e for e, _ in val], [r["val_loss"] for _, r in val], "s-", label="val")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_title("loss")
    ax1.legend()
    if "train_accuracy" in history[0]:
        ax2.plot(ep, [100 * r["train_accuracy"] for r in history], "o-", label="train")
    if val:
        ax2.plot([e for e, _ in val], [100 * r["val_accuracy"] for _, r in val], "s-", label="val")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("accuracy")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(ep)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _filter_tiles(weight: torch.Tensor) -> np.ndarray:
    """``[F, 3, k, k]`` to ``[F, k, k, 3]``, each filter scaled to [0, 1] by its own range."""
    w = weight.detach().float().cpu()
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"expected RGB conv weights [F, 3, k, k], got {list(w.shape)}")
    flat = w.flatten(1)
    lo = flat.min(1).values.view(-1, 1, 1, 1)
    hi = flat.max(1).values.view(-1, 1, 1, 1)
    return ((w - lo) / (hi - lo).clamp(min=1e-8)).permute(0, 2, 3, 1).numpy()


def filters_before_after(
    before: torch.Tensor, after: torch.Tensor, *, title: str = "conv1"
) -> Figure:
    """First-layer filters as RGB tiles, each normalised to its own range: before training
    (top) and after (bottom).

    Example:
        >>> fig = convlens.plot.filters_before_after(result.conv1_before, result.conv1_after)
    """
    tiles = [_filter_tiles(before), _filter_tiles(after)]
    n = tiles[0].shape[0]
    if tiles[1].shape[0] != n:
        raise ValueError("before and after have different numbers of filters")
    cols = min(n, 16)
    rows = (n + cols - 1) // cols
    fig = new_figure(0.75 * cols + 1.2, 1.7 * rows * 2 + 0.4)
    sub = fig.subfigures(2, 1, squeeze=False)
    for sf, t, label in zip(sub.flat, tiles, ["before training", "after training"]):
        axes = sf.subplots(rows, cols, squeeze=False)
        for i, ax in enumerate(axes.flat):
            hide_ticks(ax)
            if i < n:
                ax.imshow(t[i], interpolation="nearest")
            else:
                ax.set_axis_off()
        sf.suptitle(f"{title} filters {label} (each scaled to its own range)", fontsize=10)
    return fig


def confusion(matrix: torch.Tensor, classes: Sequence[str], *, normalize: bool = True) -> Figure:
    """The confusion matrix (rows: true class, columns: predicted), row-normalised by default,
    with counts written in the cells.

    Example:
        >>> fig = convlens.plot.confusion(result.final.confusion, result.classes)
    """
    m = matrix.detach().cpu().double()
    k = m.shape[0]
    if m.shape != (k, k) or len(classes) != k:
        raise ValueError(f"confusion must be [K, K] with K = len(classes) = {len(classes)}")
    shown = m / m.sum(1, keepdim=True).clamp(min=1) if normalize else m
    size = max(5.0, 0.55 * k + 2)
    fig = new_figure(size + 1, size)
    ax = fig.subplots()
    im = ax.imshow(shown.numpy(), cmap="Blues", vmin=0, vmax=1 if normalize else None)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            if m[i, j] > 0:
                ax.text(
                    j,
                    i,
                    f"{int(m[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if shown[i, j] > 0.5 else "black",
                )
    fig.colorbar(
        im,
        ax=ax,
        fraction=0.046,
        pad=0.04,
        label="share of the true class" if normalize else "count",
    )
    fig.tight_layout()
    return fig


def predictions(
    images: Sequence[torch.Tensor] | torch.Tensor,
    true: Sequence[int],
    predicted: Sequence[int],
    classes: Sequence[str],
) -> Figure:
    """Validation images (``[3, H, W]`` in [0, 1]) titled with predicted vs true class,
    green when right and red when wrong.

    Example:
        >>> fig = convlens.plot.predictions(imgs, labels, preds, result.classes)
    """
    n = len(images)
    if not (n == len(true) == len(predicted)) or n == 0:
        raise ValueError("need as many true and predicted labels as images (at least one)")
    ok = [int(t) == int(p) for t, p in zip(true, predicted)]
    return image_grid(
        images,
        [f"pred: {classes[int(p)]}\ntrue: {classes[int(t)]}" for t, p in zip(true, predicted)],
        colors=["#2f855a" if good else "#c53030" for good in ok],
    )


def sample_batch(
    images: Sequence[torch.Tensor] | torch.Tensor,
    labels: Sequence[int],
    classes: Sequence[str],
    *,
    title: str = "",
) -> Figure:
    """Images (``[3, H, W]`` in [0, 1]) titled with their class: a look at the data.

    Example:
        >>> fig = convlens.plot.sample_batch(imgs, labels, train.classes)
    """
    if len(images) != len(labels):
        raise ValueError("need one label per image (at least one image)")
    titles = [str(classes[int(label)]) for label in labels]
    return image_grid(images, titles, panel=(2.1, 2.2), fontsize=9, suptitle=title)
