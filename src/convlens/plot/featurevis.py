"""Feature-visualization figures: the rendered images with what each maximises."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from convlens.plot._base import image_grid

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
    steps = result.settings.get("steps", "?")
    return image_grid(
        images,
        [f"{labels[i]}\nobjective {float(values[i]):.3g}" for i in range(n)],
        max_cols=max_cols,
        panel=(2.3, 2.5),
        suptitle=title or f"{result.objective}: {steps} steps",
    )
