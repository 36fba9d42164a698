"""The course's filter grid: each test image and each kernel's response to it."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from matplotlib.figure import Figure

from convlens.analysis.filters import (
    COURSE_IMAGES,
    COURSE_KERNELS,
    KERNELS,
    filter_responses,
    test_images,
)
from convlens.plot._base import hide_ticks, new_figure

__all__ = ["filter_grid", "kernels"]


def filter_grid(
    images: Mapping[str, torch.Tensor] | None = None,
    kernels: Mapping[str, torch.Tensor] | None = None,
    *,
    annotate: bool | None = None,
) -> Figure:
    """Rows: test images; columns: the image, then each kernel's response
    (``conv2d(padding=1)``) on one shared, symmetric diverging colour scale, so responses
    compare across panels (red positive, blue negative).

    The default is the course's 2x4 grid: the vertical-edge and diagonal-line images
    against the vertical, horizontal and diagonal kernels. ``annotate`` writes the value
    in each cell (default: for images of at most 12x12 pixels).

    Example:
        >>> fig = convlens.plot.filter_grid()
    """
    if images is None:
        all_images = test_images()
        images = {k: all_images[k] for k in COURSE_IMAGES}
    if kernels is None:
        kernels = {k: KERNELS[k] for k in COURSE_KERNELS}
    names_i, names_k = list(images), list(kernels)
    resp = filter_responses(dict(images), dict(kernels))
    vmax = float(resp.abs().max()) or 1.0
    n_i, n_k = len(names_i), len(names_k)
    fig = new_figure(3.0 * (n_k + 1) + 0.8, 3.0 * n_i)
    axes = fig.subplots(n_i, n_k + 1, squeeze=False)
    h, w = resp.shape[-2:]
    if annotate is None:
        annotate = max(h, w) <= 12
    im = None
    for i, iname in enumerate(names_i):
        img = images[iname].detach().float().cpu()
        axes[i, 0].imshow(img.numpy(), cmap="gray", vmin=0, vmax=max(1.0, float(img.max())))
        axes[i, 0].set_title(f"input: {iname}")
        for j, kname in enumerate(names_k):
            r = resp[i, j]
            ax = axes[i, j + 1]
            im = ax.imshow(r.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_title(f"{kname} kernel\npeak {float(r.max()):.1f}")
            if annotate:
                for y in range(h):
                    for x in range(w):
                        v = float(r[y, x])
                        if v != 0:
                            ax.text(x, y, f"{v:g}", ha="center", va="center", fontsize=6)
    for ax in axes.flat:
        hide_ticks(ax)
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=list(axes[:, 1:].flat), fraction=0.02, pad=0.02, label="response")
    return fig


def kernels(kernel_map: Mapping[str, torch.Tensor] | None = None) -> Figure:
    """Each named 3x3 kernel with its weights written in the cells.

    Example:
        >>> fig = convlens.plot.kernels()
    """
    kernel_map = dict(kernel_map or KERNELS)
    n = len(kernel_map)
    fig = new_figure(2.0 * n, 2.4)
    axes = fig.subplots(1, n, squeeze=False)[0]
    vmax = max(float(k.abs().max()) for k in kernel_map.values()) or 1.0
    for ax, (name, k) in zip(axes, kernel_map.items()):
        ax.imshow(k.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        for (y, x), v in zip(
            [(y, x) for y in range(k.shape[0]) for x in range(k.shape[1])], k.flatten().tolist()
        ):
            ax.text(x, y, f"{v:.2g}", ha="center", va="center", fontsize=8)
        ax.set_title(name)
        hide_ticks(ax)
    fig.tight_layout()
    return fig
