"""The activation atlas's pages: static HTML and one style sheet, written from atlas.json.

The atlas engine (:mod:`convlens.atlas`) samples activation vectors, lays them out, renders
every grid cell's icon and crops, writes ``OUT/atlas.json`` and then calls
:func:`write_atlas_site`, which reads only that document (already parsed) and writes the
pages beside the images. It computes nothing and writes no image. The layout, every path
relative to ``OUT`` and named by the document::

    OUT/
      atlas.json                  the data (the engine's)
      style.css                   the one style sheet (the microscope's look, plus the lattice)
      index.html                  the level whose grid is settings.grid, with everything about
                                  the run: model, layer, samples, layout, agreement, settings,
                                  timing, how it was computed
      level-10.html, ...          the other zoom levels (levels[i].page)
      classes/003.html            one page per class atlas (class_atlases[i].page)
      cells/g20/r03-c07.html      one page per cell (cell["page"]): the icon, its crops, the
                                  label and predicted-class histograms, the top channels
      icons/..., crops/...        the engine's images (linked where they are, never copied)

Every link is relative to the page it is on (:func:`atlas_href`), each path segment
percent-encoded, so the pages work from disk (file://) and from any static server. No
JavaScript, no inline style, nothing from the network (the microscope's
Content-Security-Policy); every name from the model or the dataset is HTML-escaped. An
icon or crop that is null, outside ``OUT`` or not on disk shows as a visible "missing" box.

The lattice: each level is a CSS grid of ``grid x grid`` equal tracks; a cell sits at
``grid-row: row + 1; grid-column: col + 1`` (classes ``.ar{row}`` / ``.ac{col}``), empty
cells stay blank. A cell's opacity shows how many samples it holds: ``0.25 + 0.75 x
log(1 + count) / log(1 + max count)`` over the atlas shown (class ``.o{percent}``), so the
fullest cell is opaque and the shading never decreases with the count.

Example:
    >>> import json
    >>> from convlens.report.atlas import write_atlas_site
    >>> doc = json.loads(open("atlas/atlas.json").read())
    >>> write_atlas_site(doc, "atlas/")[0]  # PosixPath('atlas/index.html')
"""

from __future__ import annotations

import math
import os
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from convlens._io import atomic_open
from convlens.errors import ReportError
from convlens.report._html import _environment, format_value
from convlens.report.site import CSP, _href, _seconds, _site_path

__all__ = ["ATLAS_CSS", "ATLAS_INDEX", "atlas_href", "write_atlas_site"]

ATLAS_INDEX = "index.html"
ATLAS_CSS = "style.css"
ATLAS_JSON = "atlas.json"
_MIN_OPACITY = 25  # percent: the emptiest cell shown is still visible
_TOP_CHANNELS = 20  # the most channels a cell page lists


def atlas_href(target: str, page: str) -> str:
    """The URL of ``target`` (a path relative to the atlas folder, with ``/``) as written
    in the page at ``page`` (also relative to the folder): relative, each segment
    percent-encoded (``#``, ``?``, ``%`` and spaces are part of a file name). ``target``
    may climb out of the folder with leading ``..`` (a microscope page beside the atlas).

    Raises :class:`~convlens.errors.ReportError` for an absolute path or a URL.

    Example:
        >>> atlas_href("icons/g20/r03-c07.png", "cells/g20/r03-c07.html")
        '../../icons/g20/r03-c07.png'
        >>> atlas_href("../0007.html", "index.html")
        '../0007.html'
    """
    path = target
    if not path:
        raise ReportError("atlas.json: an empty link target")
    norm = posixpath.normpath(path)
    if path.startswith("/") or ":" in path.split("/")[0] or "\\" in path or "\x00" in path:
        raise ReportError(
            f"atlas.json: the link {target!r} must be a path relative to the atlas folder"
        )
    climbs = len(page.split("/")) - 1
    if norm == ".":  # the atlas folder itself
        return "../" * climbs or "./"
    parts = norm.split("/")
    if ".." not in parts:
        return _href(norm, page)
    segments = [".."] * climbs + parts
    return "/".join(s if s == ".." else quote(s, safe="") for s in segments)


def write_atlas_site(doc: Mapping[str, Any], out: str | os.PathLike[str]) -> list[Path]:
    """Write the atlas's static pages into ``out`` (where atlas.json, icons/ and crops/
    are) from ``doc`` (atlas.json's content); return the pages written: the index first,
    the other zoom levels by grid, the class atlases, then every cell page (the levels'
    cells, then the class atlases'). Every file is written atomically; the same document
    gives the same bytes.

    Raises :class:`~convlens.errors.ReportError` (a
    :class:`~convlens.errors.ConvlensError`), before writing anything, when the document
    is malformed; the message names the key (``levels is missing``,
    ``levels[0].cells[3].row must be an integer ...``).

    Example:
        >>> doc = json.loads(Path("atlas/atlas.json").read_text())
        >>> [p.name for p in write_atlas_site(doc, "atlas")[:2]]  # ['index.html', 'level-10.html']
    """
    from convlens import __version__

    doc = _obj(doc, "the top level")
    fmt = doc.get("format", 1)
    if fmt != 1:
        raise ReportError(
            f"atlas.json has format {fmt!r}; this convlens ({__version__}) reads format 1: "
            "run `convlens atlas` again to write it"
        )
    root = Path(out)
    levels, classes = _structure(doc, root)
    parent = _parent(doc.get("parent"))
    index = next(lv for lv in levels if lv["page"] == ATLAS_INDEX)
    about = _about(doc, index)
    env = _environment()
    model, layer = _text(doc.get("model")), _text(doc.get("layer"))
    common = {
        "csp": CSP,
        "site_title": _text(doc.get("title"))
        or " ".join(["Activation atlas", *(["of", model, layer] if model or layer else [])]),
        "renderer": f"convlens {__version__}",
        "parent": parent,
        "model": model,
        "layer": layer,
        "levels": levels,
        "classes": classes,
    }

    def write(template: str, page: str, **context: Any) -> Path:
        def url(target: str) -> str:
            return atlas_href(target, page)

        html = env.get_template(template).render({**common, **context, "url": url, "page": page})
        path = root.joinpath(*page.split("/"))
        with atomic_open(path, "wb") as fh:
            fh.write(html.encode("utf-8"))
        return path

    atlases = levels + classes
    css = env.get_template("site.css").render() + env.get_template("atlas.css").render(
        tracks=sorted({a["grid"] for a in atlases}),
        span=max(a["grid"] for a in atlases),
        opacities=sorted({c["opacity"] for a in atlases for c in a["cells"]}),
    )
    with atomic_open(root / ATLAS_CSS, "wb") as fh:
        fh.write(css.encode("utf-8"))

    written = [write("atlas_level.html", ATLAS_INDEX, atlas=index, about=about)]
    for lv in levels:
        if lv is not index:
            written.append(write("atlas_level.html", lv["page"], atlas=lv, about=None))
    for ca in classes:
        written.append(write("atlas_level.html", ca["page"], atlas=ca, about=None))
    for a in atlases:
        for cell in a["cells"]:
            written.append(write("atlas_cell.html", cell["page"], atlas=a, cell=_cell_page(cell)))
    return written


# ---------------------------------------------------------------------------- values


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ReportError(f"atlas.json: {where} must be an object, not {type(value).__name__}")
    return value


def _list(value: Any, where: str, required: bool = False) -> list[Any]:
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise ReportError(f"atlas.json: {where} must be a list, not {type(value).__name__}")
    return value


def _need(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise ReportError(f"atlas.json: {where}.{key} is missing".replace(": .", ": "))
    return obj[key]


def _int(value: Any, where: str, low: int = 0, high: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        span = f"{low}..{high - 1}" if high is not None else f">= {low}"
        raise ReportError(f"atlas.json: {where} must be an integer {span}, not {value!r}")
    return int(value)


def _text(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else format_value(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> float | None:
    return float(value) if _is_number(value) and math.isfinite(value) else None


def _num(value: Any) -> dict[str, str]:
    """A number for reading (``text``) and exactly (``raw``), for ``data-value``."""
    if isinstance(value, int) and not isinstance(value, bool):
        raw = str(value)
    elif isinstance(value, float):
        raw = repr(value)
    else:
        raw = "null"
    return {"text": format_value(value), "raw": raw}


def _percent_text(value: Any) -> str:
    v = _finite(value)
    return "–" if v is None else f"{100 * v:.1f}%"


def _image(value: Any, root: Path) -> dict[str, str | None]:
    """An image the document names: its path when the file is there, else why not."""
    if value is None:
        return {"target": None, "problem": "not rendered"}
    target = _site_path(value)
    if target is None:
        return {"target": None, "problem": f"not a path inside the atlas: {_text(value)}"}
    if not root.joinpath(*target.split("/")).is_file():
        return {"target": None, "problem": f"file missing: {target}"}
    return {"target": target, "problem": None}


def _link(value: Any, where: str) -> str | None:
    """A link target the document gives (relative to OUT), checked now so that a bad one
    is refused before anything is written."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ReportError(f"atlas.json: {where} must be a path relative to the atlas folder")
    try:
        atlas_href(value, ATLAS_INDEX)
    except ReportError as e:
        raise ReportError(f"{e} ({where})") from None
    return value


def _parent(value: Any) -> dict[str, str] | None:
    p = None if value is None else _obj(value, "parent")
    if p is None:
        return None
    href = _link(_need(p, "href", "parent"), "parent.href")
    if href is None:  # a null href: the document names no page to go back to
        raise ReportError("atlas.json: parent.href must be a path relative to the atlas folder")
    return {"href": href, "text": _text(p.get("text")) or "back"}


def _counted(value: Any, where: str) -> list[dict[str, Any]]:
    """``[[name, count], ...]`` as bars: the name, the count, the width (percent of the
    largest count)."""
    pairs = []
    for k, item in enumerate(_list(value, where)):
        if not isinstance(item, list) or len(item) != 2 or not _is_number(item[1]):
            raise ReportError(f"atlas.json: {where}[{k}] must be [name, count], not {item!r}")
        pairs.append((_text(item[0]), item[1]))
    most = max((c for _, c in pairs), default=0)
    return [
        {
            "name": name,
            "count": format_value(count),
            "raw": _num(count)["raw"],
            "share": 0 if most <= 0 else max(0, min(100, round(100 * count / most))),
        }
        for name, count in pairs
    ]


# ---------------------------------------------------------------------------- structure


def _structure(
    doc: Mapping[str, Any], root: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The levels (ascending grid) and class atlases, every page path checked (inside the
    folder, ``.html``, one page per path) and every cell placed on its lattice."""
    claimed: dict[str, str] = {ATLAS_CSS: "the style sheet", ATLAS_JSON: "atlas.json"}

    def claim(value: Any, where: str) -> str:
        page = _site_path(value)
        if page is None or not page.endswith(".html"):
            raise ReportError(
                f"atlas.json: {where} must be an .html path inside the atlas folder, not {value!r}"
            )
        if page in claimed:
            raise ReportError(
                f"atlas.json: {where} and {claimed[page]} are both written to {page!r}"
            )
        claimed[page] = where
        return page

    raw_levels = _list(_need(doc, "levels", ""), "levels", required=True)
    if not raw_levels:
        raise ReportError("atlas.json: levels is empty: an atlas needs at least one level")
    levels: list[dict[str, Any]] = []
    for i, raw in enumerate(raw_levels):
        where = f"levels[{i}]"
        lv = _obj(raw, where)
        grid = _int(_need(lv, "grid", where), f"{where}.grid", low=1)
        page = claim(_need(lv, "page", where), f"{where}.page")
        levels.append(
            {
                "kind": "level",
                "grid": grid,
                "page": page,
                "name": f"{grid} × {grid}",
                "cells": _cells(lv, where, grid, claim, root),
            }
        )
    levels.sort(key=lambda lv: lv["grid"])
    if not any(lv["page"] == ATLAS_INDEX for lv in levels):
        raise ReportError(
            'atlas.json: no level has page "index.html"; the level whose grid equals '
            "settings.grid must (it is the atlas's front page)"
        )
    classes: list[dict[str, Any]] = []
    for i, raw in enumerate(_list(doc.get("class_atlases"), "class_atlases")):
        where = f"class_atlases[{i}]"
        ca = _obj(raw, where)
        grid = _int(_need(ca, "grid", where), f"{where}.grid", low=1)
        page = claim(_need(ca, "page", where), f"{where}.page")
        classes.append(
            {
                "kind": "class",
                "grid": grid,
                "page": page,
                "name": _text(_need(ca, "name", where)),
                "label": format_value(ca.get("label")),
                "samples": format_value(ca.get("samples")),
                "cells": _cells(ca, where, grid, claim, root),
            }
        )
    for a in levels + classes:
        _shade(a["cells"])
        at = {(c["row"], c["col"]): c for c in a["cells"]}
        for c in a["cells"]:
            r, k = c["row"], c["col"]
            c["neighbours"] = [
                (label, at[pos]["page"])
                for label, pos in (
                    ("up", (r - 1, k)),
                    ("left", (r, k - 1)),
                    ("right", (r, k + 1)),
                    ("down", (r + 1, k)),
                )
                if pos in at
            ]
    return levels, classes


def _cells(
    atlas: Mapping[str, Any], where: str, grid: int, claim: Any, root: Path
) -> list[dict[str, Any]]:
    cells: list[dict[str, Any]] = []
    seen: dict[tuple[int, int], str] = {}
    for j, raw in enumerate(_list(_need(atlas, "cells", where), f"{where}.cells", required=True)):
        cw = f"{where}.cells[{j}]"
        c = _obj(raw, cw)
        row = _int(_need(c, "row", cw), f"{cw}.row", high=grid)
        col = _int(_need(c, "col", cw), f"{cw}.col", high=grid)
        if (row, col) in seen:
            raise ReportError(
                f"atlas.json: {cw} and {seen[row, col]} are both at row {row}, col {col}"
            )
        seen[row, col] = cw
        count = _int(_need(c, "count", cw), f"{cw}.count")
        page = claim(_need(c, "page", cw), f"{cw}.page")
        channels = []
        for k, t in enumerate(_list(c.get("top_channels"), f"{cw}.top_channels")):
            tw = f"{cw}.top_channels[{k}]"
            t = _obj(t, tw)
            channels.append(
                {
                    "channel": _int(_need(t, "channel", tw), f"{tw}.channel"),
                    "weight": _num(t.get("weight")),
                    "abs": abs(_finite(t.get("weight")) or 0.0),
                    "unit": _link(t.get("unit"), f"{tw}.unit"),
                }
            )
        crops = []
        for k, e in enumerate(_list(c.get("crops"), f"{cw}.crops")):
            e = _obj(e, f"{cw}.crops[{k}]")
            pos = e.get("position")
            crops.append(
                {
                    "img": _image(e.get("image"), root),
                    "index": format_value(e.get("index")),
                    "label": _text(e.get("label")),
                    "position": (
                        f"y {format_value(pos[0])}, x {format_value(pos[1])}"
                        if isinstance(pos, list) and len(pos) == 2
                        else ""
                    ),
                }
            )
        cells.append(
            {
                "row": row,
                "col": col,
                "count": count,
                "page": page,
                "image": _image(c.get("icon"), root),
                "objective": _num(c.get("objective")),
                "channels": channels,
                "labels": _counted(c.get("labels"), f"{cw}.labels"),
                "predicted": _counted(c.get("predicted"), f"{cw}.predicted"),
                "crops": crops,
            }
        )
    cells.sort(key=lambda c: (c["row"], c["col"]))
    return cells


def _shade(cells: list[dict[str, Any]]) -> None:
    """Each cell's opacity in percent: ``25 + 75 x log(1 + count) / log(1 + max)``."""
    most = max((c["count"] for c in cells), default=0)
    scale = math.log1p(most)
    for c in cells:
        share = math.log1p(c["count"]) / scale if scale > 0 else 1.0
        c["opacity"] = round(_MIN_OPACITY + (100 - _MIN_OPACITY) * share)


def _about(doc: Mapping[str, Any], index: dict[str, Any]) -> dict[str, Any]:
    """What the index page says of the run."""
    samples = _obj(doc.get("samples") or {}, "samples")
    layout = _obj(doc.get("layout") or {}, "layout")
    settings = _obj(doc.get("settings") or {}, "settings")
    timing = dict(_obj(doc.get("timing") or {}, "timing"))
    given = timing.pop("total", None)
    if _finite(given) is not None:
        total: Any = float(given)
    else:
        total = sum(float(v) for v in timing.values() if _finite(v) is not None)
    agreement, chance = layout.get("neighbour_agreement"), layout.get("chance")
    a, c = _finite(agreement), _finite(chance)
    return {
        "channels": format_value(doc.get("channels")),
        "samples": format_value(samples.get("count")),
        "images": format_value(samples.get("images")),
        "samples_file": _text(samples.get("file")),
        "layout": [
            (k, format_value(layout.get(k)))
            for k in ("method", "n_neighbors", "min_dist", "metric", "random_state")
            if k in layout
        ],
        "agreement": None if a is None else {"text": _percent_text(a), "raw": _num(agreement)},
        "chance": None if c is None else {"text": _percent_text(c), "raw": _num(chance)},
        "lift": None if a is None or c is None or c <= 0 else f"{a / c:.1f}",
        "settings": [(str(k), format_value(v)) for k, v in settings.items()],
        "timing": [(str(k), _seconds(v), _num(v)["raw"]) for k, v in timing.items()],
        "total": _seconds(total) if timing or given is not None else None,
        "icons": len(index["cells"]),
    }


def _cell_page(cell: dict[str, Any]) -> dict[str, Any]:
    """Everything a cell's page shows: its top channels with their bars."""
    channels = cell["channels"][:_TOP_CHANNELS]
    most = max((t["abs"] for t in channels), default=0.0)
    return {
        **cell,
        "channels": [
            {**t, "share": 0 if most <= 0 else round(100 * t["abs"] / most)} for t in channels
        ],
        "more_channels": len(cell["channels"]) - len(channels),
    }
