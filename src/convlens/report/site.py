"""The microscope's site: static HTML pages and one style sheet, written from microscope.json.

``convlens.microscope`` computes every number, writes every image (PNG) and puts the data
in ``OUT/microscope.json``; :func:`write_site` reads only that document (already parsed)
and writes the pages beside the images. It computes nothing and writes no image. The
layout, every path relative to ``OUT``::

    OUT/
      microscope.json              the data (the engine's)
      style.css                    the one style sheet every page links
      index.html                   model, dataset, layers, stages (seconds), settings, versions
      1-blocks.4/                  a layer's folder (layer["dir"])
        index.html                 a grid of every channel, by channel index
        by-selectivity.html        the same grid by class selectivity (descending; none last)
        by-mean.html               the same grid by mean activation (descending)
        0007.html                  one page per channel (unit["page"]): renders, dataset
                                   examples, their attributions, statistics, histogram,
                                   connections
        r-ab12/0007-channel.png    images the engine wrote (linked where they are, never copied)

A layer may carry ``"atlas"``, the site path of its activation atlas page (written by a
stage of its own): its three grids then link it ("Activation atlas"); without it the pages
are the same bytes as before.

Every link is relative to the page it is on, with each path segment percent-encoded, so the
site works opened from disk (file://) and from any static file server. The pages are plain
HTML and CSS: no JavaScript, no inline styles, nothing from the network, and a
Content-Security-Policy (:data:`CSP`) that allows only the site's own images and style
sheet. Every string from the model, the dataset or a file name is HTML-escaped (Jinja2
autoescape). An image that is null, outside ``OUT`` or not on disk shows as a "no image"
box, never as a broken ``<img>``. Numbers are formatted for reading; the channel pages also
carry each exact value, ``data-key="stats.mean" data-value="0.51234..."`` (``repr`` of the
float), so a test can hold the pages to the JSON.

Example:
    >>> import json
    >>> from convlens.report.site import write_site
    >>> doc = json.loads(open("micro/microscope.json").read())
    >>> write_site(doc, "micro/")[0]  # PosixPath('micro/index.html')
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from convlens._io import atomic_open
from convlens.errors import ReportError
from convlens.report._html import _environment, format_value

__all__ = ["CSP", "SITE_CSS", "SITE_INDEX", "VIEWS", "write_site"]

SITE_INDEX = "index.html"
SITE_CSS = "style.css"
# Only the site's own images and style sheet; no script, font, frame or connection at all.
# Chromium matches 'self' against file:// pages' own folder tree, so this works from disk too.
CSP = "default-src 'none'; img-src 'self'; style-src 'self'; base-uri 'none'; form-action 'none'"
# A layer's three grids: (file in the layer's folder, what its tab says).
VIEWS = (
    ("index.html", "by index"),
    ("by-selectivity.html", "by selectivity"),
    ("by-mean.html", "by mean activation"),
)
_RENDER_KINDS = (("channel", "Channel"), ("neuron", "Neuron"), ("negative", "Negative"))
_STATS = (
    ("count", "images"),
    ("mean", "mean"),
    ("std", "std"),
    ("min", "min"),
    ("max", "max"),
    ("active", "fraction active"),
)
_HIST_LABELS = 5  # edge values written under a histogram


def write_site(doc: Mapping[str, Any], out: str | os.PathLike[str]) -> list[Path]:
    """Write ``out/style.css``, ``out/index.html``, each layer's three grids and each
    channel's page for ``doc`` (the content of ``out/microscope.json``); every file is
    written atomically. Returns the HTML pages: the index first, then per layer its three
    views and its channel pages, by channel.

    Raises :class:`~convlens.errors.ReportError`, before writing anything, when the
    document's structure is wrong (``layers`` not a list, a page path outside ``out``, two
    pages on one path, ...).

    Example:
        >>> pages = write_site(json.loads(Path("micro/microscope.json").read_text()), "micro")
        >>> [p.name for p in pages[:4]]  # ['index.html', 'index.html', 'by-selectivity.html', 'by-mean.html']
    """
    from convlens import __version__

    doc = _obj(doc, "the top level")
    fmt = doc.get("format", 1)
    if fmt != 1:
        raise ReportError(
            f"microscope.json has format {fmt!r}; this convlens ({__version__}) reads format 1: "
            "run `convlens microscope` again to write it"
        )
    root = Path(out)
    layers = _layers(doc)
    pages = {SITE_INDEX} | {v for la in layers for v in la["views"]}
    pages |= {u["page"] for la in layers for u in la["units"]}
    common = {
        "csp": CSP,
        "site_title": _text(doc.get("title")) or "convlens microscope",
        "created": "",  # on the index only: the other pages stay the same bytes across runs
        "renderer": f"convlens {__version__}",
    }

    def write(template: str, page: str, **context: Any) -> Path:
        def url(target: str) -> str:
            return _href(target, page)

        page_context = {**common, **context, "url": url, "page": page}
        html = _environment().get_template(template).render(page_context)
        path = root.joinpath(*page.split("/"))
        with atomic_open(path, "wb") as fh:
            fh.write(html.encode("utf-8"))
        return path

    css = _environment().get_template("site.css").render()
    with atomic_open(root / SITE_CSS, "wb") as fh:
        fh.write(css.encode("utf-8"))
    index = _index(doc, layers)
    labelled = (_opt_obj(doc.get("dataset"), "dataset") or {}).get("labelled") is not False
    written = [write("site_index.html", SITE_INDEX, created=_text(doc.get("created")), **index)]
    for i, layer in enumerate(layers):
        cells = [_cell(u, root) for u in layer["units"]]
        checked = [c for c in cells if c["check"] is not None]
        below = {
            "count": sum(c["below"] for c in checked),
            "checked": len(checked),
            "reduce": checked[0]["check"]["reduce"] if checked else "",
        }
        around = {
            "prev_layer": layers[i - 1] if i > 0 else None,
            "next_layer": layers[i + 1] if i + 1 < len(layers) else None,
        }
        for (file, label), page, order in zip(VIEWS, layer["views"], _ORDERS):
            written.append(
                write(
                    "site_layer.html",
                    page,
                    layer=layer,
                    view=label,
                    views=list(zip(layer["views"], (lab for _, lab in VIEWS))),
                    cells=sorted(cells, key=order),
                    below=below,
                    unsorted=file == VIEWS[1][0] and all(c["sel_key"] is None for c in cells),
                    **around,
                )
            )
        units = layer["units"]
        for j, u in enumerate(units):
            written.append(
                write(
                    "site_unit.html",
                    u["page"],
                    layer=layer,
                    prev=units[j - 1] if j > 0 else None,
                    next=units[j + 1] if j + 1 < len(units) else None,
                    unit=_unit(u, root, pages),
                    labelled=labelled,
                )
            )
    return written


# ---------------------------------------------------------------------------- paths


def _site_path(value: Any) -> str | None:
    """``value`` as a normalised POSIX path inside the site, or None when it is not one
    (not a string, empty, absolute, or climbing out with ``..``)."""
    if not isinstance(value, str) or not value or "\x00" in value:
        return None
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return None
    return p.as_posix()


def _href(target: str, page: str) -> str:
    """The relative URL of site path ``target`` seen from the page at site path ``page``;
    every segment percent-encoded (``#``, ``?``, quotes, ``:`` and spaces included)."""
    here = page.split("/")[:-1]
    there = target.split("/")
    common = 0
    while common < min(len(here), len(there) - 1) and here[common] == there[common]:
        common += 1
    parts = [".."] * (len(here) - common) + there[common:]
    return "/".join(p if p == ".." else quote(p, safe="") for p in parts)


def _image(value: Any, root: Path, why: Any = None) -> dict[str, str | None]:
    """An image named by the document: its site path when the file is there, else why not."""
    if value is None:
        return {"target": None, "problem": _text(why) or "not computed"}
    target = _site_path(value)
    if target is None:
        return {"target": None, "problem": f"not a path inside the site: {_text(value)}"}
    if not root.joinpath(*target.split("/")).is_file():
        return {"target": None, "problem": f"file missing: {target}"}
    return {"target": target, "problem": None}


# ---------------------------------------------------------------------------- values


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ReportError(f"microscope.json: {where} must be an object, not {type(value).__name__}")
    return value


def _opt_obj(value: Any, where: str) -> Mapping[str, Any] | None:
    return None if value is None else _obj(value, where)


def _seq(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ReportError(f"microscope.json: {where} must be a list, not {type(value).__name__}")
    return value


def _text(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else format_value(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> float | None:
    """A finite number as a float (for sorting), else None."""
    return float(value) if _is_number(value) and math.isfinite(value) else None


def _num(value: Any) -> dict[str, str]:
    """A number for reading (``text``) and exactly (``raw``: the int, ``repr`` of the float,
    or ``null``), for ``data-value``."""
    if isinstance(value, int) and not isinstance(value, bool):
        raw = str(value)
    elif isinstance(value, float):
        raw = repr(value)
    else:
        raw = "null"
    return {"text": format_value(value), "raw": raw}


def _percent(part: Any, whole: float) -> int:
    """``part`` as a whole percent of ``whole``, in 0..100 (a .wN class); 0 when unknown."""
    if _finite(part) is None or whole <= 0:
        return 0
    return max(0, min(100, round(100 * part / whole)))


def _shape(value: Any) -> str:
    if isinstance(value, list) and all(_is_number(v) for v in value):
        return " × ".join(format_value(v) for v in value)
    return format_value(value)


def _pairs(value: Any, where: str) -> list[tuple[str, str]]:
    return [(str(k), format_value(v)) for k, v in (_opt_obj(value, where) or {}).items()]


def _seconds(value: Any) -> str:
    """A duration for reading: ``12.3 s``, ``4 min 05 s``, ``2 h 07 min``."""
    if not _is_number(value) or not math.isfinite(value):
        return format_value(value)
    if value < 60:
        return f"{format_value(float(value))} s"
    minutes, s = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _receptive(value: Any, where: str) -> str:
    rf = _opt_obj(value, where)
    if rf is None:
        return "–"
    if rf.get("bounded") is False:
        reason = _text(rf.get("reason"))
        return f"unbounded ({reason})" if reason else "unbounded"
    text = f"{_shape(rf.get('size'))} px"
    if rf.get("stride") is not None:
        text += f", stride {_shape(rf.get('stride'))}"
    return text


# ---------------------------------------------------------------------------- structure


def _layers(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every layer with its page paths checked (inside the site, one page per path) and its
    units in channel order."""
    claimed: dict[str, str] = {SITE_INDEX: "the index page", SITE_CSS: "the style sheet"}

    def claim(page: str, what: str) -> None:
        if page in claimed:
            raise ReportError(
                f"microscope.json: {what} and {claimed[page]} are both written to {page!r}"
            )
        claimed[page] = what

    layers = []
    for i, raw in enumerate(_seq(doc.get("layers"), "layers")):
        where = f"layers[{i}]"
        layer = _obj(raw, where)
        name = _text(layer.get("name")) or f"layer {i}"
        folder = _site_path(layer.get("dir"))
        if folder is None:
            raise ReportError(
                f"microscope.json: {where}.dir must be a folder inside the site, "
                f"not {layer.get('dir')!r}"
            )
        views = [f"{folder}/{file}" for file, _ in VIEWS]
        for view in views:
            claim(view, f"{where} (a grid)")
        units: list[dict[str, Any]] = []
        for j, u in enumerate(_seq(layer.get("units"), f"{where}.units")):
            uwhere = f"{where}.units[{j}]"
            unit = _obj(u, uwhere)
            channel = unit.get("channel")
            if not isinstance(channel, int) or isinstance(channel, bool):
                raise ReportError(f"microscope.json: {uwhere}.channel must be an integer")
            page = _site_path(unit.get("page"))
            if page is None or not page.endswith(".html"):
                raise ReportError(
                    f"microscope.json: {uwhere}.page must be an .html path inside the site, "
                    f"not {unit.get('page')!r}"
                )
            claim(page, uwhere)
            units.append({"channel": channel, "page": page, "raw": unit, "where": uwhere})
        units.sort(key=lambda u: u["channel"])
        for a, b in itertools.pairwise(units):
            if a["channel"] == b["channel"]:
                raise ReportError(
                    f"microscope.json: {a['where']} and {b['where']} are both channel "
                    f"{a['channel']} of {name!r}"
                )
        connections = _opt_obj(layer.get("connections"), f"{where}.connections") or {}
        atlas = None
        if layer.get("atlas") is not None:  # a later stage's activation atlas page
            atlas = _site_path(layer.get("atlas"))
            if atlas is None or not atlas.endswith(".html"):
                raise ReportError(
                    f"microscope.json: {where}.atlas must be an .html path inside the site, "
                    f"not {layer.get('atlas')!r}"
                )
        layers.append(
            {
                "name": name,
                "dir": folder,
                "views": views,
                "units": units,
                "channels": format_value(layer.get("channels")),
                "shown": (
                    None
                    if layer.get("channels") == len(units)
                    else f"{len(units):,} of {format_value(layer.get('channels'))}"
                ),
                "shape": _shape(layer.get("shape")),
                "receptive_field": _receptive(
                    layer.get("receptive_field"), f"{where}.receptive_field"
                ),
                "from": _text(connections.get("from")),
                "from_why": _text(connections.get("why")),
                "atlas": atlas,
            }
        )
    return layers


def _index(doc: Mapping[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
    model = _opt_obj(doc.get("model"), "model") or {}
    data = _opt_obj(doc.get("dataset"), "dataset") or {}
    classes = data.get("classes")
    stages = dict(_opt_obj(doc.get("stages"), "stages") or {})
    # A stage named "total" is the run's wall time (it may exceed the sum of the others);
    # without one, the total is the sum.
    given = stages.pop("total", None)
    if _finite(given) is not None:
        total, total_raw = float(given), _num(given)["raw"]
    else:
        total = sum(float(v) for v in stages.values() if _finite(v) is not None)
        total_raw = repr(total)
    notes = doc.get("notes") or []
    return {
        "model": {
            "name": _text(model.get("name")),
            "description": _text(model.get("description")),
            "parameters": format_value(model.get("parameters")),
        },
        "dataset": {
            "name": _text(data.get("name")),
            "size": format_value(data.get("size")),
            "labelled": format_value(data.get("labelled")),
            "classes": [_text(c) for c in classes] if isinstance(classes, list) else None,
            "skipped": format_value(data.get("skipped")),
        },
        "layers": layers,
        "settings": _pairs(doc.get("settings"), "settings"),
        "versions": _pairs(doc.get("versions"), "versions"),
        "stages": [
            {
                "name": str(name),
                "text": _seconds(s),
                "raw": _num(s)["raw"],
                "share": _percent(s, total),
            }
            for name, s in stages.items()
        ],
        "total": (
            {"text": _seconds(total), "raw": total_raw} if stages or given is not None else None
        ),
        "notes": [_text(n) for n in (notes if isinstance(notes, list) else [notes])],
    }


def _cell(unit: dict[str, Any], root: Path) -> dict[str, Any]:
    """What a layer's grid shows of a unit: its channel render, its top 3 crops, the mean,
    the selectivity and top class."""
    u, where = unit["raw"], unit["where"]
    renders = _opt_obj(u.get("renders"), f"{where}.renders")
    if renders is None:
        render = {"target": None, "problem": "no renders"}
    else:
        channel = _opt_obj(renders.get("channel"), f"{where}.renders.channel") or {}
        render = _image(channel.get("image"), root, channel.get("why"))
    top = [_obj(t, f"{where}.top[{k}]") for k, t in enumerate(_seq(u.get("top"), f"{where}.top"))]
    stats = _opt_obj(u.get("stats"), f"{where}.stats") or {}
    sel = _opt_obj(u.get("selectivity"), f"{where}.selectivity")
    sel_index = None if sel is None else sel.get("index")
    check = _check(u.get("render_vs_dataset"), f"{where}.render_vs_dataset")
    return {
        "channel": unit["channel"],
        "page": unit["page"],
        "render": render,
        "check": check,
        "below": check is not None and check["below"],
        "crops": [_image(t.get("crop"), root, t.get("why")) for t in top[:3]],
        "mean": _num(stats.get("mean")),
        "mean_key": _finite(stats.get("mean")),
        "selectivity": None if sel_index is None else _num(sel_index),
        "sel_key": _finite(sel_index),
        "top_class": "" if sel is None else _text(sel.get("top_class")),
    }


def _check(value: Any, where: str) -> dict[str, Any] | None:
    """A unit's render checked against its top dataset example: the two values, their
    ratio (``text`` as ``x0.78``), whether the render stays below, the reduction."""
    c = _opt_obj(value, where)
    if c is None:
        return None
    ratio = c.get("ratio")
    return {
        "render": _num(c.get("render")),
        "top_example": _num(c.get("top_example")),
        "ratio": _num(ratio),
        "ratio_text": "–" if _finite(ratio) is None else f"×{ratio:.2f}",
        "below": c.get("below") is True,
        "reduce": _text(c.get("reduce")),
        "top_index": format_value(c.get("top_index")),
    }


def _by_index(c: dict[str, Any]) -> tuple[Any, ...]:
    return (c["channel"],)


def _by_selectivity(c: dict[str, Any]) -> tuple[Any, ...]:
    s = c["sel_key"]
    return (s is None, 0.0 if s is None else -s, c["channel"])


def _by_mean(c: dict[str, Any]) -> tuple[Any, ...]:
    m = c["mean_key"]
    return (m is None, 0.0 if m is None else -m, c["channel"])


_ORDERS: tuple[Callable[[dict[str, Any]], tuple[Any, ...]], ...] = (
    _by_index,
    _by_selectivity,
    _by_mean,
)


def _example(e: Mapping[str, Any], key: str, root: Path) -> dict[str, Any]:
    box = e.get("box")
    return {
        "rank": format_value(e.get("rank")),
        "index": format_value(e.get("index")),
        "score": _num(e.get("score")),
        "key": key,
        "label": _text(e.get("label")),
        "path": _text(e.get("path")),
        "at": (
            f"y {format_value(e.get('y'))}, x {format_value(e.get('x'))}"
            if e.get("y") is not None or e.get("x") is not None
            else ""
        ),
        "box": (
            f"rows {format_value(box[0])}–{format_value(box[1])}, "
            f"columns {format_value(box[2])}–{format_value(box[3])}"
            if isinstance(box, list) and len(box) == 4
            else ""
        ),
        "crop": _image(e.get("crop"), root, e.get("why")),
        "full": _image(e.get("full"), root, e.get("why")),
    }


def _histogram(value: Any, where: str) -> dict[str, Any]:
    """Bars for CSS: ``h`` in 0..100 is the height class, ~ log10(1+count)/log10(1+max)."""
    h = _opt_obj(value, where)
    if h is None:
        return {"problem": "no histogram in microscope.json"}
    edges, counts = h.get("edges"), h.get("counts")
    if (
        not isinstance(edges, list)
        or not isinstance(counts, list)
        or not counts
        or len(edges) != len(counts) + 1
        or not all(_is_number(v) for v in [*edges, *counts])
    ):
        return {"problem": "the histogram in microscope.json is not B counts with B + 1 edges"}
    top = max(counts)
    scale = math.log10(1 + top) if top > 0 else 1.0
    bars = []
    for i, c in enumerate(counts):
        height = 0 if c <= 0 else max(1, min(100, round(100 * math.log10(1 + c) / scale)))
        bars.append(
            {
                "h": height,
                "count": _num(c),
                "title": f"{format_value(c)} in [{format_value(edges[i])}, "
                f"{format_value(edges[i + 1])}{']' if i == len(counts) - 1 else ')'}",
            }
        )
    n = len(counts)
    ticks = {
        (2 * k * n + _HIST_LABELS - 1) // (2 * (_HIST_LABELS - 1)) for k in range(_HIST_LABELS)
    }
    return {
        "problem": None,
        "bars": bars,
        # one slot per bar, holding the label of its left edge (the last also its right one)
        "axis": [{"i": i, "value": _num(edges[i])} if i in ticks else None for i in range(n)],
        "end": {"i": n, "value": _num(edges[n])},
        "scale": _text(h.get("scale")),
        "max": format_value(top),
    }


def _unit(unit: dict[str, Any], root: Path, pages: set[str]) -> dict[str, Any]:
    """Everything a channel's page shows."""
    u, where = unit["raw"], unit["where"]
    renders = _opt_obj(u.get("renders"), f"{where}.renders")
    fv = None
    if renders is not None:
        main = []
        for kind, label in _RENDER_KINDS:
            r = _opt_obj(renders.get(kind), f"{where}.renders.{kind}") or {}
            main.append(
                {
                    "label": label,
                    "image": _image(r.get("image"), root, r.get("why")),
                    "value": _num(r.get("value")),
                    "key": f"renders.{kind}.value",
                    "objective": _text(r.get("objective")),
                }
            )
        diversity = []
        for k, d in enumerate(_seq(renders.get("diversity"), f"{where}.renders.diversity")):
            d = _obj(d, f"{where}.renders.diversity[{k}]")
            relative = _finite(d.get("relative"))
            diversity.append(
                {
                    "image": _image(d.get("image"), root, d.get("why")),
                    "value": _num(d.get("value")),
                    "key": f"renders.diversity.{k}.value",
                    "objective": _text(d.get("objective")),
                    "relative": _num(d.get("relative")) if "relative" in d else None,
                    "relative_key": f"renders.diversity.{k}.relative",
                    "relative_text": "–" if relative is None else f"{100 * relative:.0f}%",
                }
            )
        fv = {"main": main, "diversity": diversity}
    examples = {}
    for side in ("top", "bottom"):
        entries = _seq(u.get(side), f"{where}.{side}")
        examples[side] = [
            _example(_obj(e, f"{where}.{side}[{k}]"), f"{side}.{k}.score", root)
            for k, e in enumerate(entries)
        ]
    stats = _opt_obj(u.get("stats"), f"{where}.stats") or {}
    sel = _opt_obj(u.get("selectivity"), f"{where}.selectivity")
    attribution = _attribution(u.get("attribution"), f"{where}.attribution", root)
    top_classes = u.get("top_classes")
    classes = None
    if isinstance(top_classes, list):
        counts = [_finite(c.get("count")) for c in top_classes if isinstance(c, Mapping)]
        most = max((n for n in counts if n is not None), default=0.0)
        classes = [
            {
                "name": _text(c.get("class")),
                "count": format_value(c.get("count")),
                "share": _percent(c.get("count"), most),
            }
            for c in (_obj(c, f"{where}.top_classes") for c in top_classes)
        ]
    connected = u.get("connected")
    links = None
    if isinstance(connected, list):
        links = []
        for k, c in enumerate(connected):
            c = _obj(c, f"{where}.connected[{k}]")
            target = _site_path(c.get("page"))
            links.append(
                {
                    "layer": _text(c.get("layer")),
                    "channel": format_value(c.get("channel")),
                    "strength": _num(c.get("strength")),
                    "key": f"connected.{k}.strength",
                    "target": target if target in pages else None,
                }
            )
    return {
        "channel": unit["channel"],
        "renders": fv,
        "top": examples["top"],
        "bottom": examples["bottom"],
        "stats": [(label, f"stats.{k}", _num(stats.get(k))) for k, label in _STATS],
        "selectivity": None
        if sel is None
        else {"index": _num(sel.get("index")), "top_class": _text(sel.get("top_class"))},
        "top_classes": classes,
        "histogram": _histogram(u.get("histogram"), f"{where}.histogram"),
        "connected": links,
        "connected_why": _text(u.get("connected_why")),
        "attribution": attribution,
        "attribution_why": _text(u.get("attribution_why")),
        "check": _check(u.get("render_vs_dataset"), f"{where}.render_vs_dataset"),
        "check_why": _text(u.get("render_vs_dataset_why")),
    }


def _attribution(value: Any, where: str, root: Path) -> dict[str, Any] | None:
    """A unit's attributions: what they are, the colour scale (``±scale``) and per top
    example the overlay, the sum over the crop and the share of positive mass inside it."""
    a = _opt_obj(value, where)
    if a is None:
        return None
    examples = []
    for k, e in enumerate(_seq(a.get("top"), f"{where}.top")):
        e = _obj(e, f"{where}.top[{k}]")
        inside = _finite(e.get("inside"))
        examples.append(
            {
                "rank": format_value(e.get("rank")),
                "index": format_value(e.get("index")),
                "image": _image(e.get("image"), root, e.get("why")),
                "sum": _num(e.get("sum")),
                "sum_key": f"attribution.top.{k}.sum",
                "inside": _num(e.get("inside")),
                "inside_key": f"attribution.top.{k}.inside",
                "inside_text": "–" if inside is None else f"{100 * inside:.1f}%",
            }
        )
    return {
        "about": _text(a.get("about")),
        "method": _text(a.get("method")),
        "scale": _num(a.get("scale")),
        "colour_scale": _text(a.get("colour_scale")),
        "top": examples,
    }
