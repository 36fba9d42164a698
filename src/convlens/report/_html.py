"""Render ``report.json`` + PNGs into one self-contained, escaped HTML page (Jinja2)."""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from convlens._io import atomic_open
from convlens.errors import ReportError

__all__ = [
    "REPORT_HTML",
    "REPORT_JSON",
    "format_value",
    "load_report",
    "render_html",
    "write_report",
]

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"

STATUSES = ("done", "missing", "failed")
MAX_FIGURE_BYTES = 32 * 1024 * 1024
_MAGIC = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}
_RESERVED_IDS = frozenset({"top", "contents", "about"})


def format_value(value: Any) -> str:
    """A JSON value as text for a reader: floats to 4 significant digits, ``1,234`` for
    integers, ``yes``/``no``, a dash for ``null``, lists joined with commas.

    Example:
        >>> format_value(0.123456), format_value(1234), format_value(None)
        ('0.1235', '1,234', '–')
    """
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return _format_float(value)
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(
            f"[{format_value(v)}]" if isinstance(v, (list, tuple)) else format_value(v)
            for v in value
        )
    return str(value)


def _format_float(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    a = abs(v)
    if a == 0:
        return "0"
    if 1e-3 <= a < 1e4:
        s = f"{v:.4g}"
        if "e" not in s:
            return s
    if 9999 <= a < 1e15:  # 9999.7 would read 1e+04 above
        return f"{v:,.0f}"
    return f"{v:.4g}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numeric_column(rows: list[list[Any]], k: int) -> bool:
    """Every filled cell of column ``k`` is a number (its header is then right-aligned)."""
    cells = [r[k] for r in rows if k < len(r) and r[k] is not None]
    return bool(cells) and all(_is_number(c) for c in cells)


def _text(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else format_value(value)


def _anchor(raw: str, used: set[str]) -> str:
    """An id safe in ``id=""`` and ``href="#..."``: ``[A-Za-z0-9_-]``, unique on the page."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-")[:64] or "section"
    if base in _RESERVED_IDS:
        base += "-section"
    anchor, n = base, 2
    while anchor in used:
        anchor, n = f"{base}-{n}", n + 1
    used.add(anchor)
    return anchor


def _embed(base_dir: Path, name: Any) -> dict[str, Any]:
    """A figure as a data URI, or the reason it cannot be shown."""
    label = _text(name) or "(no file named)"
    fig: dict[str, Any] = {"name": label, "src": None, "width": None, "height": None}
    if not isinstance(name, str) or not name:
        fig["problem"] = "no file named"
        return fig
    rel = Path(name)
    root = base_dir.resolve()
    path = (base_dir / rel).resolve()
    if rel.is_absolute() or ".." in rel.parts or not path.is_relative_to(root):
        fig["problem"] = "outside the report folder"
        return fig
    if not path.is_file():
        fig["problem"] = "no such file"
        return fig
    if path.stat().st_size > MAX_FIGURE_BYTES:
        fig["problem"] = f"larger than {MAX_FIGURE_BYTES // 2**20} MB"
        return fig
    data = path.read_bytes()
    mime = next((m for magic, m in _MAGIC.items() if data.startswith(magic)), None)
    if mime is None:
        fig["problem"] = "not a PNG or JPEG file"
        return fig
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes every pixel: a truncated or corrupt file fails here
            fig["width"], fig["height"] = im.size
    except Exception as e:  # PIL raises many types for bad files
        fig["problem"] = f"unreadable image ({type(e).__name__})"
        return fig
    fig["src"] = f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
    return fig


def _expect(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind):
        noun = "a list" if kind is list else "an object"
        raise ReportError(f"report.json: {where} must be {noun}, not {type(value).__name__}")
    return value


def _field(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``obj[key]`` checked to be a ``kind``; an empty one when absent or null."""
    value = obj.get(key)
    return kind() if value is None else _expect(value, kind, where)


def _pairs(obj: dict[str, Any], key: str, where: str) -> list[tuple[str, str]]:
    return [(str(k), format_value(v)) for k, v in _field(obj, key, dict, where).items()]


def _section(sec: Any, i: int, base_dir: Path, used: set[str]) -> dict[str, Any]:
    where = f"sections[{i}]"
    sec = _expect(sec, dict, where)
    title = _text(sec.get("title")) or _text(sec.get("id")) or f"Section {i + 1}"
    status = _text(sec.get("status")) or "done"
    figures = []
    for j, f in enumerate(_field(sec, "figures", list, f"{where}.figures")):
        f = _expect(f, dict, f"{where}.figures[{j}]")
        figures.append({**_embed(base_dir, f.get("file")), "caption": _text(f.get("caption"))})
    tables = []
    for j, t in enumerate(_field(sec, "tables", list, f"{where}.tables")):
        t = _expect(t, dict, f"{where}.tables[{j}]")
        rows = [
            r if isinstance(r, list) else [r]
            for r in _field(t, "rows", list, f"{where}.tables[{j}].rows")
        ]
        columns = _field(t, "columns", list, f"{where}.tables[{j}].columns")
        tables.append(
            {
                "caption": _text(t.get("caption")),
                "columns": [
                    {"text": _text(c), "num": _numeric_column(rows, k)}
                    for k, c in enumerate(columns)
                ],
                "rows": [
                    [{"text": format_value(c), "num": _is_number(c)} for c in r] for r in rows
                ],
            }
        )
    missing = _field(sec, "missing", dict, f"{where}.missing")
    notes = sec.get("notes") or []
    return {
        "anchor": _anchor(_text(sec.get("id")) or title, used),
        "title": title,
        "status": status,
        "status_class": status if status in STATUSES else "other",
        "intro": [p.strip() for p in re.split(r"\n\s*\n", _text(sec.get("intro"))) if p.strip()],
        "figures": figures,
        "tables": tables,
        "numbers": _pairs(sec, "numbers", f"{where}.numbers"),
        "notes": [_text(n) for n in (notes if isinstance(notes, list) else [notes])],
        "links": _links(sec, f"{where}.links"),
        "missing": (
            {"reason": _text(missing.get("reason")), "fix": _text(missing.get("fix"))}
            if missing or status != "done"
            else None
        ),
    }


def _links(sec: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A section's links to files next to the report (relative paths only: no scheme, no
    absolute path, no ``..``), each segment percent-encoded."""
    from urllib.parse import quote

    out = []
    for j, a in enumerate(_field(sec, "links", list, where)):
        a = _expect(a, dict, f"{where}[{j}]")
        href = _text(a.get("href"))
        parts = href.split("/")
        if not href or ":" in parts[0] or href.startswith("/") or ".." in parts or "\\" in href:
            raise ValueError(
                f"{where}[{j}].href {href!r}: a path relative to the report's folder, "
                "e.g. microscope/index.html"
            )
        out.append(
            {"href": "/".join(quote(p) for p in parts), "text": _text(a.get("text")) or href}
        )
    return out


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("convlens.report", "templates"),
        autoescape=jinja2.select_autoescape(
            enabled_extensions=("html",), default_for_string=True, default=True
        ),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_html(doc: Mapping[str, Any], base_dir: str | os.PathLike[str]) -> str:
    """The report as one HTML string: figures from ``base_dir`` embedded as data URIs,
    inline CSS, no JavaScript, no network requests, every string escaped.

    ``doc`` follows the ``report.json`` contract in :mod:`convlens.report`. Raises
    :class:`~convlens.errors.ReportError` when its structure is wrong (a section that is
    not an object, ``figures`` that is not a list, ...).

    Example:
        >>> html = render_html(load_report("tour/"), "tour/")
        >>> html.startswith("<!DOCTYPE html>")
    """
    from convlens import __version__

    if not isinstance(doc, Mapping):
        _expect(doc, dict, "the top level")
    data = dict(doc)
    base = Path(base_dir)
    used: set[str] = set()
    sections = [
        _section(s, i, base, used) for i, s in enumerate(_field(data, "sections", list, "sections"))
    ]
    page = _environment().get_template("report.html")
    return page.render(
        title=_text(data.get("title")) or "convlens report",
        subtitle=_text(data.get("subtitle")),
        created=_text(data.get("created")),
        sections=sections,
        settings=_pairs(data, "settings", "settings"),
        versions=_pairs(data, "versions", "versions"),
        seed=None if data.get("seed") is None else format_value(data["seed"]),
        renderer=f"convlens {__version__}",
    )


def _tour_fix(folder: Path) -> str:
    return f"run `convlens tour --out {shlex.quote(str(folder))}`"


def load_report(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``folder/report.json`` as a dict; a clear :class:`ReportError` when it is absent
    or not a JSON object.

    Example:
        >>> doc = load_report("tour/")
        >>> [s["id"] for s in doc["sections"]]
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"no report folder {str(folder)!r}; {_tour_fix(folder)} to make one")
    path = folder / REPORT_JSON
    if not path.is_file():
        raise ReportError(f"no {REPORT_JSON} in {str(folder)!r}; {_tour_fix(folder)} to make one")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            f"{_tour_fix(folder)} to write it again"
        ) from None
    except UnicodeDecodeError:
        raise ReportError(
            f"{path} is not UTF-8 text; {_tour_fix(folder)} to write it again"
        ) from None
    if not isinstance(doc, dict):
        raise ReportError(
            f"{path} holds a JSON {type(doc).__name__}, not an object; "
            f"{_tour_fix(folder)} to write it again"
        )
    return doc


def write_report(folder: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Build ``report.html`` from ``folder/report.json`` and the figures beside it.

    Written atomically into ``out`` (default: ``folder``). Returns the HTML path.

    Example:
        >>> write_report("tour/")  # tour/report.html from tour/report.json
        PosixPath('tour/report.html')
    """
    folder = Path(folder)
    html = render_html(load_report(folder), folder)
    target = Path(out if out is not None else folder) / REPORT_HTML
    with atomic_open(target, "wb") as fh:
        fh.write(html.encode("utf-8"))
    return target
