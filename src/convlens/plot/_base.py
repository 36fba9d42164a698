"""Figure helpers shared by the plot functions: pyplot-free figures, atomic saving."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from convlens._io import atomic_open

__all__ = [
    "grid_shape",
    "hide_ticks",
    "image_grid",
    "new_figure",
    "save_figure",
    "show_image",
    "to_numpy_image",
]


def new_figure(width: float, height: float, **kwargs: Any) -> Figure:
    """A Figure not registered with pyplot: no global state, no leaks in loops, shown once
    by Jupyter when it is the cell's value."""
    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG atomically (temp file + rename); returns the path.

    Example:
        >>> save_figure(convlens.plot.filter_grid(), "out/filters.png")
        PosixPath('out/filters.png')
    """
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    return path


def grid_shape(n: int, max_cols: int = 8) -> tuple[int, int]:
    """Rows and columns of a near-square grid for ``n`` panels."""
    cols = min(max_cols, max(1, math.ceil(math.sqrt(n))))
    return math.ceil(n / cols), cols


def hide_ticks(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def to_numpy_image(img: torch.Tensor) -> Any:
    """``[3, H, W]`` / ``[1, H, W]`` / ``[H, W]`` tensor to a numpy array for ``imshow``
    (``[H, W, 3]``, or ``[H, W]`` for one channel); of more channels the first 3 are shown,
    of 2 the first."""
    t = img.detach().float().cpu()
    if t.ndim == 3 and t.shape[0] >= 1:
        t = t[:3] if t.shape[0] >= 3 else t[:1]
        t = t.permute(1, 2, 0)
        if t.shape[2] == 1:
            t = t[:, :, 0]
    elif t.ndim != 2:
        raise ValueError(f"expected an image [3, H, W] or [H, W], got {list(img.shape)}")
    return t.clamp(0, 1).numpy() if t.ndim == 3 else t.numpy()


def show_image(ax: Axes, img: torch.Tensor, **kwargs: Any) -> Any:
    """``imshow`` an image in ``[0, 1]`` of any number of channels: RGB as colour (of 4 or
    more channels the first 3), one channel as greyscale on the same 0..1 scale.

    Example:
        >>> show_image(ax, torch.rand(1, 32, 32))  # greyscale, not a colour map
    """
    arr = to_numpy_image(img)
    if arr.ndim == 2:
        kwargs = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0, **kwargs}
    return ax.imshow(arr, **kwargs)


def image_grid(
    images: Sequence[torch.Tensor] | torch.Tensor,
    titles: Sequence[str],
    *,
    colors: Sequence[str] | None = None,
    max_cols: int = 6,
    panel: tuple[float, float] = (2.2, 2.4),
    fontsize: int = 8,
    suptitle: str = "",
) -> Figure:
    """Images (``[C, H, W]`` in [0, 1]: RGB, greyscale for one channel, the first 3 of
    more) in a near-square grid, each with its title."""
    n = len(images)
    if n == 0 or n != len(titles):
        raise ValueError("need one title per image (at least one image)")
    rows, cols = grid_shape(n, max_cols=max_cols)
    fig = new_figure(panel[0] * cols, panel[1] * rows + (0.4 if suptitle else 0))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        hide_ticks(ax)
        if i >= n:
            ax.set_axis_off()
            continue
        show_image(ax, images[i])
        ax.set_title(titles[i], fontsize=fontsize, color=colors[i] if colors else "black")
    if suptitle:
        fig.suptitle(suptitle, fontsize=fontsize + 1)
    fig.tight_layout()
    return fig


def show_in_jupyter() -> bool:
    """Make IPython draw a :class:`~matplotlib.figure.Figure` that is a cell's value as a
    PNG, as ``%matplotlib inline`` would (convlens's figures are made without pyplot, so
    the inline backend, which registers that only when pyplot is imported, may never
    run). Returns whether a formatter was added; nothing happens outside IPython or where
    one is already there.

    Example:
        >>> show_in_jupyter()  # outside IPython
        False
    """
    import sys

    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if get is not None else None
    if shell is None:
        return False
    png = shell.display_formatter.formatters["image/png"]
    try:
        png.lookup_by_type(Figure)
        return False  # %matplotlib inline (or the user) already did
    except KeyError:
        pass
    from IPython.core.pylabtools import print_figure

    png.for_type(Figure, lambda fig: print_figure(fig, "png", bbox_inches="tight"))
    return True
