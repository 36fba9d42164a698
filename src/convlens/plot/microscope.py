"""A compact microscope grid: one row per channel, its feature visualization beside its
top dataset examples, read from a site :func:`convlens.microscope` wrote."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from convlens.plot._base import hide_ticks, new_figure

__all__ = ["microscope_grid"]


def microscope_grid(
    site: str | os.PathLike[str],
    layer: str | None = None,
    *,
    max_channels: int = 8,
    examples: int = 3,
) -> Figure:
    """One row per channel of ``layer`` (the site's first layer by default; its first
    ``max_channels`` channels): the channel-objective render, then the top ``examples``
    dataset crops with the activation over them, titled with the channel and its scores.
    A render's title carries its ratio to the unit's top dataset example
    (``render_vs_dataset``); a render that stays below it is framed and titled in orange.

    Example:
        >>> fig = convlens.plot.microscope_grid("site/", "blocks.4", max_channels=6)
    """
    from PIL import Image

    root = Path(site)
    try:
        doc: dict[str, Any] = json.loads((root / "microscope.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no microscope.json in {str(root)!r}: run convlens microscope --out {root} first"
        ) from None
    layers = {entry["name"]: entry for entry in doc["layers"]}
    if not layers:
        raise ValueError(f"the site in {str(root)!r} has no layers")
    name = layer if layer is not None else next(iter(layers))
    if name not in layers:
        raise KeyError(f"no layer {name!r} in the site (it has {', '.join(layers)})")
    units = layers[name]["units"][:max_channels]
    if not units:
        raise ValueError(f"the site has no channels of {name!r}")
    cols = 1 + examples
    cell = 1.2
    fig = new_figure(cell * cols + 0.4, cell * 1.22 * len(units) + 0.4)
    axes = fig.subplots(len(units), cols, squeeze=False)
    for r, u in enumerate(units):
        render = (u.get("renders") or {}).get("channel") or {}
        check = u.get("render_vs_dataset") or {}
        head = f"ch {u['channel']}: render"
        if check.get("ratio") is not None:
            head += f" ×{check['ratio']:.2f}"
        if check.get("below"):
            head += " (below top)"
        cells: list[tuple[Any, str]] = [(render.get("image"), head)]
        for e in u.get("top", [])[:examples]:
            cells.append((e.get("crop"), f"#{e['index']} {e['score']:.3g}"))
        for j in range(cols):
            ax = axes[r, j]
            hide_ticks(ax)
            if j >= len(cells) or cells[j][0] is None:
                ax.set_axis_off()
                continue
            path, title = cells[j]
            with Image.open(root / path) as img:
                ax.imshow(img.convert("RGB"), interpolation="nearest")
            below = j == 0 and bool(check.get("below"))
            ax.set_title(title, fontsize=7, pad=2, **({"color": "#c2410c"} if below else {}))
            if below:  # a unit whose render stays below its top dataset example
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_color("#c2410c")
                    spine.set_linewidth(2)
    fig.suptitle(f"{name}: feature visualization and top examples", fontsize=9)
    return fig
