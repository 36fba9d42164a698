"""The activation atlas as one figure: each cell's icon at its place on the grid, read
from the folder :func:`convlens.atlas` wrote."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from convlens.plot._base import new_figure

__all__ = ["atlas_grid"]


def atlas_grid(
    atlas_dir: str | os.PathLike[str], grid: int | None = None, *, class_name: str | None = None
) -> Figure:
    """The icons of one zoom level (``grid``: the atlas's own grid by default) or of one
    class atlas (``class_name``) at their cells; empty cells stay blank, and each icon is
    faded by its sample count (log scale, the fullest opaque), as on the atlas's pages.

    Example:
        >>> fig = convlens.plot.atlas_grid("atlas/")
    """
    import math

    import numpy as np
    from PIL import Image

    root = Path(atlas_dir)
    try:
        doc: dict[str, Any] = json.loads((root / "atlas.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no atlas.json in {str(root)!r}: run convlens atlas --out {root} first"
        ) from None
    if class_name is not None:
        found = [c for c in doc["class_atlases"] if c["name"] == class_name]
        if not found:
            have = ", ".join(c["name"] for c in doc["class_atlases"]) or "none"
            raise KeyError(f"no class atlas {class_name!r} (there are: {have})")
        level = found[0]
        what = f"class {class_name}"
    else:
        want = grid if grid is not None else doc["settings"]["grid"]
        levels = {lv["grid"]: lv for lv in doc["levels"]}
        if want not in levels:
            raise KeyError(f"no level {want} in the atlas (it has {', '.join(map(str, levels))})")
        level = levels[want]
        what = f"{want} x {want}"
    g = int(level["grid"])
    cells = level["cells"]
    side = 0
    icons = []
    for c in cells:
        try:
            with Image.open(root / c["icon"]) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except OSError:
            continue
        side = max(side, arr.shape[0], arr.shape[1])
        icons.append((c, arr))
    side = side or 8
    canvas = np.ones((g * side, g * side, 3), dtype=np.float32)
    most = max((c["count"] for c, _ in icons), default=1)
    for c, arr in icons:
        a = 0.25 + 0.75 * math.log1p(c["count"]) / math.log1p(most)
        y, x = c["row"] * side, c["col"] * side
        h, w = arr.shape[:2]
        canvas[y : y + h, x : x + w] = a * arr + (1 - a) * 1.0
    inches = min(9.0, max(3.0, 0.45 * g))
    fig = new_figure(inches, inches + 0.35)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(f"Activation atlas of {doc['layer']} ({what}, {len(cells)} icons)", fontsize=9)
    return fig
