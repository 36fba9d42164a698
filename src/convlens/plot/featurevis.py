"""Feature-visualization figures: the rendered images with what each maximises."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from convlens.plot._base import grid_shape, hide_ticks, new_figure, to_numpy_image

__all__ = ["feature_vis"]


def feature_vis(result: Any, *, max_cols: int = 5, title: str | None = None) -> Figure:
    """A grid of a :class:`~convlens.analysis.featurevis.RenderResult`'s images, each titled
    with its label (``mixed4a:3``) and final objective value.

    Example:
        >>> fig = convlens.plot.feature_vis(convlens.render(bundle, "blocks.4:0-9"))
    """
    images = result.images
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("the render has no images")
    labels = list(result.labels) or [str(result.objective)] * n
    values = result.final_values
    rows, cols = grid_shape(n, max_cols=max_cols)
    fig = new_figure(2.3 * cols, 2.5 * rows + (0.4 if title else 0))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        hide_ticks(ax)
        if i >= n:
            ax.set_axis_off()
            continue
        ax.imshow(to_numpy_image(images[i, :3]))
        ax.set_title(f"{labels[i]}\nobjective {float(values[i]):.3g}", fontsize=8)
    steps = result.settings.get("steps", "?")
    fig.suptitle(title or f"{result.objective}: {steps} steps", fontsize=9)
    fig.tight_layout()
    return fig
