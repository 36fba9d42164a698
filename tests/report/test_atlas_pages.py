"""write_atlas_site: the activation atlas's pages from a synthetic atlas.json (no model).

Two zoom levels (2 x 2 and 4 x 4, the 4 x 4 one the index) and one class atlas, tiny PNGs
at the paths the document names, one icon missing on disk, a model, layer and class named
like tags, a label with both quotes, unit links that climb out of the atlas folder (the
microscope's pages beside it). The checks read the pages with html.parser; the browser
test opens two of them in headless Chromium, offline.
"""

from __future__ import annotations

import copy
import itertools
import posixpath
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import pytest
from PIL import Image

from _browser import artifact_dir, check_report
from _html import parse
from convlens.errors import ConvlensError, ReportError
from convlens.report import write_atlas_site
from convlens.report.atlas import atlas_href

EVIL = "<script>alert(1)</script>"
QUOTES = "\"&'"
TAG_CLASS = "<b>tench</b>"
MISSING_ICON = "icons/g4/r02-c01.png"


def _png(path: Path, shade: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (shade, 255 - shade, 90)).save(path)


def _cell(
    prefix: str, icons: str, row: int, col: int, count: int, unit: bool = True
) -> dict[str, Any]:
    name = f"r{row:02d}-c{col:02d}"
    return {
        "row": row,
        "col": col,
        "count": count,
        "icon": f"{icons}/{name}.png",
        "page": f"{prefix}/{name}.html",
        "objective": 1.5 + row / 3 + col,
        "top_channels": [
            {"channel": 7, "weight": 0.5, "unit": "../0007.html" if unit else None},
            {"channel": 2, "weight": -0.25, "unit": None},
        ],
        "labels": [[TAG_CLASS, count - 1], [QUOTES, 1]],
        "predicted": [["church", count]],
        "crops": [
            {
                "image": f"crops/s{row:02d}{col:02d}.png",
                "index": 10 * row + col,
                "position": [row, col],
                "label": QUOTES,
            }
        ],
    }


def synthetic_doc() -> dict[str, Any]:
    """atlas.json's content: levels 2 and 4 (4 is settings.grid), one class atlas."""
    coarse = [_cell("cells/g2", "icons/g2", r, c, 3 + 4 * r + c) for r, c in [(0, 0), (1, 1)]]
    fine_at = [(0, 0), (0, 1), (1, 1), (2, 1), (3, 3), (1, 0)]
    fine = [
        _cell("cells/g4", "icons/g4", r, c, n, unit=k % 2 == 0)
        for k, ((r, c), n) in enumerate(zip(fine_at, [3, 9, 27, 4, 81, 9]))
    ]
    klass = [_cell("classes/000", "icons/c000", r, c, 5 + r) for r, c in [(0, 1), (1, 1)]]
    return {
        "format": 1,
        "title": f"Activation atlas of {EVIL} {QUOTES}",
        "model": EVIL,
        "layer": QUOTES,
        "channels": 16,
        "settings": {"samples_per_image": 1, "grid": 4, "levels": [2, 4], "whiten": True},
        "samples": {"count": 1234, "images": 617, "file": "samples.safetensors"},
        "layout": {
            "method": "umap",
            "n_neighbors": 20,
            "min_dist": 0.01,
            "metric": "cosine",
            "random_state": 0,
            "neighbour_agreement": 0.625,
            "chance": 0.125,
        },
        "levels": [
            {"grid": 4, "page": "index.html", "cells": fine},
            {"grid": 2, "page": "level-2.html", "cells": coarse},
        ],
        "class_atlases": [
            {
                "name": TAG_CLASS,
                "label": 0,
                "page": "classes/000.html",
                "samples": 11,
                "grid": 2,
                "cells": klass,
            }
        ],
        "parent": {"href": "../index.html", "text": f"microscope {EVIL}"},
        "timing": {"pass": 12.5, "layout": 3.25, "icons": 80.0, "pages": 0.5},
    }


def _images(doc: dict[str, Any]) -> list[str]:
    atlases = doc["levels"] + doc["class_atlases"]
    icons = [c["icon"] for a in atlases for c in a["cells"]]
    crops = [e["image"] for a in atlases for c in a["cells"] for e in c["crops"]]
    return icons + crops


@pytest.fixture
def atlas(tmp_path: Path) -> tuple[dict[str, Any], Path, list[Path]]:
    doc = synthetic_doc()
    out = tmp_path / "micro" / "atlas"
    for k, image in enumerate(_images(doc)):
        if image != MISSING_ICON:
            _png(out / image, 20 * k % 256)
    # the pages the atlas links outside itself (the microscope's, written by its stage)
    for page in ("index.html", "0007.html"):
        (tmp_path / "micro" / page).write_text("<!DOCTYPE html><title>m</title>")
    return doc, out, write_atlas_site(doc, out)


def _pages(doc: dict[str, Any]) -> list[str]:
    atlases = doc["levels"] + doc["class_atlases"]
    return [a["page"] for a in atlases] + [c["page"] for a in atlases for c in a["cells"]]


# ---------------------------------------------------------------------------- links


@pytest.mark.parametrize(
    ("target", "page", "href"),
    [
        ("icons/g20/r03-c07.png", "cells/g20/r03-c07.html", "../../icons/g20/r03-c07.png"),
        ("cells/g20/r03-c08.html", "cells/g20/r03-c07.html", "r03-c08.html"),
        ("index.html", "cells/g20/r03-c07.html", "../../index.html"),
        ("classes/003/r01-c02.html", "classes/003.html", "003/r01-c02.html"),
        ("classes/003.html", "classes/003/r01-c02.html", "../003.html"),
        ("cells/g20/x.html", "index.html", "cells/g20/x.html"),
        ("../0007.html", "index.html", "../0007.html"),
        ("../0007.html", "cells/g20/r03-c07.html", "../../../0007.html"),
        ("../../m/a b#?.html", "classes/003.html", "../../../m/a%20b%23%3F.html"),
        ("../layer/0007.html", "cells/g2/a.html", "../../../layer/0007.html"),
        ("icons/a b/#1.png", "index.html", "icons/a%20b/%231.png"),
        ("icons/x%y?.png", "cells/g2/a.html", "../../icons/x%25y%3F.png"),
        ("icons/./g2/../g4/a.png", "index.html", "icons/g4/a.png"),
        (".", "cells/g2/a.html", "../../"),
    ],
)
def test_atlas_href(target: str, page: str, href: str) -> None:
    assert atlas_href(target, page) == href
    # the href, resolved against the page's URL, names the target
    resolved = urlsplit(urljoin("http://h/a/o/" + page, href)).path
    assert unquote(resolved) == posixpath.normpath("/a/o/" + target) + (
        "/" if target == "." else ""
    )


@pytest.mark.parametrize("target", ["/etc/passwd", "http://example.com/x.png", "javascript:x", ""])
def test_atlas_href_refuses_what_is_not_a_relative_path(target: str) -> None:
    with pytest.raises(ReportError, match=r"relative|empty"):
        atlas_href(target, "index.html")


# ---------------------------------------------------------------------------- the pages


def test_every_page_is_written_and_every_link_resolves(
    atlas: tuple[dict[str, Any], Path, list[Path]],
) -> None:
    doc, out, written = atlas
    expected = [out / p for p in _pages(doc)]
    # the index first, then the other level, the class atlas, the cells
    assert written[0] == out / "index.html"
    assert written[1] == out / "level-2.html"
    assert written[2] == out / "classes" / "000.html"
    assert sorted(written) == sorted(expected)
    assert (out / "style.css").is_file()
    placeholders = 0
    for page in written:
        text = page.read_text(encoding="utf-8")
        assert "<script" not in text.lower(), page
        assert "style=" not in text, page  # the CSP forbids inline style
        for tag, attrs in parse(page):
            if tag == "img":
                assert (page.parent / unquote(attrs["src"])).resolve().is_file(), (page, attrs)
            if tag == "a" or tag == "link":
                href = attrs["href"]
                assert not re.match(r"^[a-z]+:|^/", href), (page, href)
                path = unquote(href.split("#")[0])
                if path:
                    assert (page.parent / path).resolve().is_file(), (page, href)
            if tag == "span" and "missing" in attrs.get("class", "").split():
                placeholders += 1
                assert attrs["title"] == f"file missing: {MISSING_ICON}"
    # the missing icon: a placeholder on its level's page and on its own cell page
    assert placeholders == 2
    cell_page = out / "cells" / "g4" / "r02-c01.html"
    assert not [a for t, a in parse(cell_page) if t == "img" and "r02-c01" in a["src"]]
    assert ">missing<" in cell_page.read_text(encoding="utf-8")


def test_hostile_names_are_escaped(atlas: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out, written = atlas
    for page in written:
        text = page.read_text(encoding="utf-8")
        assert EVIL not in text and "<b>tench" not in text, page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text, page  # the model, everywhere
    cell = (out / "cells" / "g4" / "r00-c01.html").read_text(encoding="utf-8")
    assert "&lt;b&gt;tench&lt;/b&gt;" in cell  # the label histogram
    assert "&#34;&amp;&#39;" in cell  # the layer and a crop's label
    klass = (out / "classes" / "000.html").read_text(encoding="utf-8")
    assert "<h1>Class atlas: &lt;b&gt;tench&lt;/b&gt;</h1>" in klass


def test_index_shows_the_run(atlas: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out, _ = atlas
    page = out / "index.html"
    text = page.read_text(encoding="utf-8")
    values = {a["data-key"]: a.get("data-value") for _, a in parse(page) if "data-key" in a}
    assert values["layout.neighbour_agreement"] == "0.625"
    assert values["layout.chance"] == "0.125"
    assert "62.5%" in text and "12.5%" in text and "×5.0" in text
    assert values["timing.icons"] == "80.0"
    assert "1 min 36 s" in text  # the total of the four stages
    assert "1,234" in text and "617" in text  # samples, images
    assert "Carter et al." in text and "UMAP" in text
    assert '<th scope="row">samples_per_image</th>' in text
    # links to every zoom level (this one marked) and to the class atlas
    tabs = [a for t, a in parse(page) if t == "a" and "data-grid" in a]
    assert [(a["href"], "aria-current" in a) for a in tabs] == [
        ("level-2.html", False),
        ("index.html", True),
    ]
    assert any(t == "a" and a.get("href") == "classes/000.html" for t, a in parse(page))


def test_agreement_absent_is_said(tmp_path: Path) -> None:
    doc = synthetic_doc()
    doc["layout"]["neighbour_agreement"] = doc["layout"]["chance"] = None
    write_atlas_site(doc, tmp_path)
    text = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "not measured" in text and "layout.chance" not in text


def test_lattice_positions_and_shading(atlas: tuple[dict[str, Any], Path, list[Path]]) -> None:
    doc, out, _ = atlas
    css = (out / "style.css").read_text(encoding="utf-8")
    for level in [*doc["levels"], *doc["class_atlases"]]:
        page = out / level["page"]
        icons = [a for t, a in parse(page) if t == "a" and "icon" in a.get("class", "").split()]
        placed = {
            (int(a["data-row"]), int(a["data-col"])): a for a in icons
        }  # every cell once, at its row/col, linking to its page
        assert set(placed) == {(c["row"], c["col"]) for c in level["cells"]}
        for c in level["cells"]:
            a = placed[c["row"], c["col"]]
            classes = a["class"].split()
            assert f"ar{c['row']}" in classes and f"ac{c['col']}" in classes
            assert a["title"].startswith(f"{c['count']} samples")
            assert unquote(a["href"]) == atlas_href(c["page"], level["page"])
        # the CSS puts .arN on grid row N + 1 and .acN on column N + 1
        for c in level["cells"]:
            assert f".ar{c['row']} {{ grid-row: {c['row'] + 1}; }}" in css
            assert f".ac{c['col']} {{ grid-column: {c['col'] + 1}; }}" in css
        # the shading never decreases with the count, and the fullest cell is opaque
        shades = sorted((int(a["data-count"]), int(a["data-opacity"])) for a in icons)
        for (n1, o1), (n2, o2) in itertools.pairwise(shades):
            assert o1 <= o2 and (n1 == n2 or o1 < o2), shades
            assert f".o{o1} {{ opacity: {o1 / 100}; }}" in css
        assert shades[-1][1] == 100
        fullest = max(icons, key=lambda a: int(a["data-count"]))
        assert "o100" in fullest["class"].split()
    assert ".t4 { grid-template-columns: repeat(4, minmax(0, 1fr));" in css


def test_cell_page(atlas: tuple[dict[str, Any], Path, list[Path]]) -> None:
    doc, out, _ = atlas
    page = out / "cells" / "g4" / "r01-c01.html"
    tags = parse(page)
    text = page.read_text(encoding="utf-8")
    values = {a["data-key"]: a.get("data-value") for _, a in tags if "data-key" in a}
    cell = next(c for c in doc["levels"][0]["cells"] if (c["row"], c["col"]) == (1, 1))
    assert values["count"] == "27" and values["objective"] == repr(cell["objective"])
    # the neighbours that exist: up (0, 1), left (1, 0), down (2, 1); right (1, 2) does not
    dirs = {a["data-dir"]: a["href"] for t, a in tags if t == "a" and "data-dir" in a}
    assert dirs == {"up": "r00-c01.html", "left": "r01-c00.html", "down": "r02-c01.html"}
    assert any(
        t == "a" and a.get("rel") == "up" and a["href"] == "../../index.html" for t, a in tags
    )
    # the unit link climbs out of cells/g4/ and out of the atlas folder
    units = [a["href"] for t, a in tags if t == "a" and a.get("href", "").endswith("0007.html")]
    assert units == ["../../../0007.html"]
    assert "channel 2</td>" in text  # no unit: no link
    assert "image 11" in text and "y 1, x 1" in text
    assert [a["class"] for t, a in tags if t == "span" and a.get("class", "").startswith("w")] == [
        "w100",  # label bars: 26 and 1 of 26
        "w4",
        "w100",  # predicted
        "w100",  # channel weights: |0.5| and |-0.25|
        "w50",
    ]
    # a class atlas's cell: neighbours within the class atlas, link back to it
    ctags = parse(out / "classes" / "000" / "r00-c01.html")
    assert {a["data-dir"]: a["href"] for t, a in ctags if "data-dir" in a} == {
        "down": "r01-c01.html"
    }
    assert any(a.get("rel") == "up" and a["href"] == "../000.html" for _, a in ctags)


def test_the_same_document_gives_the_same_bytes(
    atlas: tuple[dict[str, Any], Path, list[Path]],
) -> None:
    doc, out, written = atlas
    before = {p: p.read_bytes() for p in [*written, out / "style.css"]}
    assert write_atlas_site(copy.deepcopy(doc), out) == written
    assert {p: p.read_bytes() for p in before} == before
    files = {p for p in out.rglob("*") if p.is_file()}
    assert not [p for p in files if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_a_minimal_document(tmp_path: Path) -> None:
    """Only what the schema requires: no class atlases, parent, layout, timing or labels;
    an icon that is null, an empty level."""
    cell = {"row": 1, "col": 0, "count": 0, "icon": None, "page": "cells/g2/r01-c00.html"}
    doc = {
        "levels": [
            {"grid": 2, "page": "index.html", "cells": [cell]},
            {"grid": 8, "page": "level-8.html", "cells": []},
        ]
    }
    written = write_atlas_site(doc, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "index.html",
        "level-8.html",
        "cells/g2/r01-c00.html",
    ]
    index = parse(tmp_path / "index.html")
    assert [a["title"] for t, a in index if "missing" in a.get("class", "").split()] == [
        "not rendered"
    ]
    assert not [a for t, a in index if a.get("rel") == "up"]  # no parent
    text = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "not measured" in text and "Class atlases" not in text
    assert "No cell of this 8 × 8 grid" in (tmp_path / "level-8.html").read_text(encoding="utf-8")
    page = (tmp_path / "cells" / "g2" / "r01-c00.html").read_text(encoding="utf-8")
    assert "None (unlabelled data)" in page and "No crops" in page
    assert "No channel weights" in page


# ---------------------------------------------------------------------------- bad documents


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("levels"), "levels is missing"),
        (
            lambda d: d["levels"][0]["cells"][2].pop("row"),
            r"levels\[0\]\.cells\[2\]\.row is missing",
        ),
        (
            lambda d: d["levels"][0]["cells"][0].update(col=4),
            r"cells\[0\]\.col must be an integer 0\.\.3",
        ),
        (lambda d: d["levels"][1]["cells"][1].update(row=0, col=0), "both at row 0, col 0"),
        (lambda d: d["levels"][0].update(page="level-4.html"), 'no level has page "index.html"'),
        (
            lambda d: d["levels"][1].update(page="../x.html"),
            r"levels\[1\]\.page must be an \.html path",
        ),
        (
            lambda d: d["levels"][1]["cells"][0].update(page="index.html"),
            "both written to 'index.html'",
        ),
        (lambda d: d["class_atlases"][0].pop("cells"), r"class_atlases\[0\]\.cells is missing"),
        (
            lambda d: d["levels"][0]["cells"][0].update(labels=[["a"]]),
            r"labels\[0\] must be \[name, count\]",
        ),
        (
            lambda d: d["levels"][0]["cells"][0]["top_channels"][0].update(unit="http://x/y"),
            r"top_channels\[0\]\.unit",
        ),
        (lambda d: d["parent"].update(href="/abs"), r"parent\.href"),
        (lambda d: d["parent"].update(href=None), r"parent\.href"),
        (lambda d: d.update(levels={}), "levels must be a list"),
        (lambda d: d.update(levels=[]), "levels is empty"),
        (lambda d: d.update(layout=[1]), "layout must be an object"),
        (lambda d: d.update(format=2), "format 2"),
    ],
)
def test_a_malformed_document_is_refused_before_writing(
    tmp_path: Path, change: Any, message: str
) -> None:
    doc = copy.deepcopy(synthetic_doc())
    change(doc)
    with pytest.raises(ConvlensError, match=message) as e:
        write_atlas_site(doc, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- in a browser

# Each icon's box in the page: the test checks the CSS put it in its row and column.
_BOXES = """[...document.querySelectorAll('a.icon')].map((a) => {
  const r = a.getBoundingClientRect();
  return {row: +a.dataset.row, col: +a.dataset.col, x: r.x, y: r.y, w: r.width,
          opacity: +getComputedStyle(a).opacity, count: +a.dataset.count};
})"""


@pytest.mark.browser
def test_atlas_in_chromium(chromium: str, atlas: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out, _ = atlas
    root = out.parent.resolve()  # the atlas and the microscope pages beside it
    for name, page in [("index", out / "index.html"), ("cell", out / "cells/g4/r01-c01.html")]:
        seen = check_report(
            page,
            artifact_dir() / f"atlas_{name}.png",
            chromium=chromium,
            offline=True,
            collect=_BOXES,
        )
        n_img = sum(1 for t, _ in parse(page) if t == "img")
        assert n_img and len(seen["images"]) == n_img, seen["images"]
        for img in seen["images"]:
            assert img["complete"] and img["naturalWidth"] > 0, (name, img)
        assert seen["scripts"] == 0
        assert seen["console_errors"] == [], (name, seen["console"])
        assert seen["failed"] == [], seen["failed"]
        for url in seen["requests"]:
            assert url.startswith("file://"), (name, url)
            assert Path(unquote(urlsplit(url).path)).resolve().is_relative_to(root)
        assert any(u.endswith("/style.css") for u in seen["requests"])
        if name == "index":
            assert seen["title"].startswith(f"4 × 4 · Activation atlas of {EVIL}")
            boxes = seen["collected"]
            assert len(boxes) == 6
            w = boxes[0]["w"]
            assert w > 20
            x0 = min(b["x"] - b["col"] * w for b in boxes)
            y0 = min(b["y"] - b["row"] * w for b in boxes)
            for b in boxes:  # each icon in its column and row (1 px gaps)
                assert abs(b["x"] - (x0 + b["col"] * w)) <= 4 * (b["col"] + 1), b
                assert abs(b["y"] - (y0 + b["row"] * w)) <= 4 * (b["row"] + 1), b
            shades = sorted((b["count"], b["opacity"]) for b in boxes)
            assert [o for _, o in shades] == sorted(o for _, o in shades)
            assert shades[-1][1] == 1 and shades[0][1] < 0.6
