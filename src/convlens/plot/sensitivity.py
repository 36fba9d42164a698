"""Sensitivity-map figure: the image, the map over it, and the map per window."""

from __future__ import annotations

from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from convlens.analysis.sensitivity import SensitivityResult
from convlens.plot._base import hide_ticks, new_figure, show_image

__all__ = ["sensitivity"]


def _display(image: Any, result: SensitivityResult) -> torch.Tensor:
    if image is None:
        return result.display_image()
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3, int(result.input.shape[0])):
            raise ValueError(
                f"image must be [3, H, W] (or [1, H, W], or the model input's "
                f"[{result.input.shape[0]}, H, W]) in [0, 1], got {list(image.shape)}"
            )
        return t
    from convlens.images import load_image

    return load_image(image)  # a PIL image, an array or a path


def sensitivity(
    result: SensitivityResult,
    image: Any = None,
    *,
    alpha: float = 0.6,
    cmap: str = "RdBu_r",
) -> Figure:
    """Three panels: the image with the window that matters most outlined, the
    input-resolution map (``result.attribution``) over the image, and the drop per window
    position (``result.map``). Red: filling the window lowers the target; blue: raises it
    (one colour scale, centred on 0).

    ``image``: what to draw under the map, ``[3, H, W]`` in ``[0, 1]`` (``[1, H, W]`` is
    drawn grey) or a PIL image
    (stretched to the input's size if it differs); ``None`` shows the model input,
    un-normalised with the result's mean and std.

    Example:
        >>> fig = convlens.plot.sensitivity(convlens.sensitivity(bundle, x, 258), img)
    """
    if not isinstance(result, SensitivityResult):
        raise TypeError(f"expected a SensitivityResult, got {type(result).__name__}")
    img = _display(image, result)
    H, W = result.attribution.shape
    attr = result.attribution.numpy()
    drops = result.map.numpy()
    limit = float(max(abs(drops.min()), abs(drops.max()), 1e-12))
    fig = new_figure(13.5, 4.8)
    axes = fig.subplots(1, 3)
    extent = (-0.5, W - 0.5, H - 0.5, -0.5)

    i, j = divmod(int(result.map.argmax()), result.map.shape[1])
    top, left = result.ys[i], result.xs[j]
    bottom, right = min(top + result.window[0], H), min(left + result.window[1], W)
    show_image(axes[0], img, extent=extent)
    axes[0].add_patch(
        Rectangle(
            (left - 0.5, top - 0.5),
            right - left,
            bottom - top,
            fill=False,
            edgecolor="yellow",
            lw=2,
        )
    )
    label = f"{result.target} ({result.target_label})" if result.target_label else result.target
    axes[0].set_title(f"target {label}\nscore {result.score:.4g}; largest drop outlined")

    show_image(axes[1], img, extent=extent)
    im = axes[1].imshow(attr, cmap=cmap, vmin=-limit, vmax=limit, alpha=alpha, extent=extent)
    kind = "exact" if result.exact else "APPROXIMATE"
    axes[1].set_title(
        f"drop when occluded ({kind})\nwindow {result.window[0]}x{result.window[1]}, "
        f"stride {result.stride[0]}, fill {result.fill}"
    )
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)

    im2 = axes[2].imshow(drops, cmap=cmap, vmin=-limit, vmax=limit)
    axes[2].set_title(f"drop per window position ({drops.shape[0]}x{drops.shape[1]})")
    fig.colorbar(im2, ax=axes[2], fraction=0.046, pad=0.04)
    for ax in axes:
        hide_ticks(ax)
    if result.model_name:
        fig.suptitle(result.model_name, fontsize=10)
    fig.tight_layout()
    return fig
