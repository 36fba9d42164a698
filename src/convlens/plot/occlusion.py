"""The course's spatial-experiment figure: original, occluded, and where layers changed."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from convlens.analysis.occlusion import OcclusionResult
from convlens.plot._base import hide_ticks, new_figure, show_image

__all__ = ["occlusion"]


def _outline(ax: object, box: tuple[int, int, int, int], color: str = "red") -> None:
    t, b, le, r = box
    ax.add_patch(  # type: ignore[attr-defined]
        Rectangle((le - 0.5, t - 0.5), r - le, b - t, fill=False, edgecolor=color, lw=1.8)
    )


def occlusion(result: OcclusionResult, layers: Sequence[str] | None = None) -> Figure:
    """Original image with the box, the occluded image, then for each layer the map of
    mean absolute change with the box (at that layer's resolution) outlined and
    ``inside_fraction`` vs ``area_fraction`` in the title. Two layers give the course's
    4-panel figure.

    Example:
        >>> fig = convlens.plot.occlusion(convlens.occlude(model, x, (30, 90, 40, 110), ["bn1", "layer4"]))
    """
    names = list(layers) if layers is not None else list(result.layers)
    unknown = [n for n in names if n not in result.layers]
    if unknown:
        raise ValueError(f"layers {unknown} are not in the result; it has {list(result.layers)}")
    n = 2 + len(names)
    fig = new_figure(3.3 * n, 3.9)
    axes = fig.subplots(1, n, squeeze=False)[0]
    orig, occ = result.display_images()
    show_image(axes[0], orig)
    _outline(axes[0], result.box)
    axes[0].set_title("original")
    show_image(axes[1], occ)
    axes[1].set_title(f"occluded (fill: {result.fill})")
    for ax, name in zip(axes[2:], names):
        ch = result.layers[name]
        im = ax.imshow(ch.diff.numpy(), cmap="magma")
        _outline(ax, ch.box, color="cyan")
        inside = "n/a" if ch.inside_fraction != ch.inside_fraction else f"{ch.inside_fraction:.0%}"
        h, w = ch.diff.shape
        ax.set_title(
            f"{name} |change| ({h}x{w})\ninside box {inside} (area {ch.area_fraction:.0%})"
        )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes:
        hide_ticks(ax)
    fig.tight_layout()
    return fig
