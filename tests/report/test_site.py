"""write_site: the microscope's static site from a synthetic microscope.json (no model).

Two layers of three channels, small PNGs at the paths the document names; attributions on
four units, one unit without renders, one image that is null, a layer named like a script
tag, a class named like a tag and a file name with both quotes. The checks read the pages
with html.parser, the browser test opens them in headless Chromium.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image

from _browser import artifact_dir, check_report
from _html import parse
from convlens.errors import ReportError
from convlens.report.site import CSP, SITE_CSS, write_site

EVIL = "<script>alert(1)</script>"
EVIL_DIR = "2-_script_alert_1___script_"
FIRST_DIR = "0-conv1 #?%&"  # a folder name that needs percent-encoding in a URL
TAG_CLASS = "<b>x</b>"
QUOTED = "a\"b'c.png"
CLASSES = ["circle", TAG_CLASS, "square"]
VIEWS = ("index.html", "by-selectivity.html", "by-mean.html")


# ---------------------------------------------------------------------------- the document


def _png(path: Path, size: tuple[int, int], shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade, 255 - shade, 90)).save(path)


def _examples(folder: str, channel: int, side: str, n: int, base: float) -> list[dict[str, Any]]:
    out = []
    for r in range(n):
        score = base - r / 3 if side == "top" else -base + r / 7
        out.append(
            {
                "rank": r,
                "index": 10 * channel + r,
                "score": score,
                "y": r,
                "x": 2 * r,
                "label": CLASSES[(channel + r) % 3],
                "path": f"img/{side}-{r}.jpg",
                "box": [0, 5 + r, 1, 6 + r],
                "crop": f"{folder}/e-cd34/{channel:04d}-{side}-{r}.png",
                "full": f"{folder}/e-cd34/{channel:04d}-{side}-{r}-full.png",
            }
        )
    return out


def _unit(folder: str, channel: int, mean: float, selectivity: float | None) -> dict[str, Any]:
    r = f"{folder}/r-ab12/{channel:04d}"
    return {
        "channel": channel,
        "page": f"{folder}/{channel:04d}.html",
        "stats": {
            "count": 240,
            "mean": mean,
            "std": 0.1 + 0.2 + channel,  # 0.30000000000000004 + c: needs every digit
            "min": -1 / 3,
            "max": 3.2 + channel / 7,
            "active": 0.43,
        },
        "selectivity": None
        if selectivity is None
        else {"index": selectivity, "top_class": CLASSES[channel % 3]},
        "histogram": {
            "edges": [-1.0, -0.1, 0.0, 0.25, 1 / 3, 2.0, 3.5],
            "counts": [3, 0, 120, 80, 30, 7],
            "scale": "symlog",
        },
        "renders": {
            "channel": {
                "image": f"{r}-channel.png",
                "value": 3.1 + channel / 9,
                "objective": f"channel(x, {channel})",
            },
            "neuron": {
                "image": f"{r}-neuron.png",
                "value": 5.0,
                "objective": f"neuron(x, {channel}) at y=4, x=4",
            },
            "negative": {
                "image": f"{r}-negative.png",
                "value": -2.0 / 3,
                "objective": f"-channel(x, {channel})",
            },
            "diversity": [
                {"image": f"{r}-diversity-{i}.png", "value": 2.9 - i / 11} for i in range(2)
            ],
        },
        "top": _examples(folder, channel, "top", 3, 4.2 + channel),
        "bottom": _examples(folder, channel, "bottom", 3, 1.5),
        "top_classes": [{"class": TAG_CLASS, "count": 2}, {"class": "circle", "count": 1}],
        "connected": None,
        "connected_why": "the first layer has no layer before it",
    }


def _attribution(folder: str, channel: int, n: int) -> dict[str, Any]:
    """A unit's attributions of its top ``n`` examples, as the engine writes them."""
    return {
        "method": "input_x_gradient",
        "steps": None,
        "baseline": None,
        "target": "the unit's value at the example's arg-max position (its y, x)",
        "about": f"input × gradient of {EVIL}",
        "scale": 0.1 + 0.2 + channel,
        "colour_scale": "the 99.5th percentile of |map| over the unit's crops",
        "top": [
            {
                "rank": r,
                "index": 10 * channel + r,
                "image": f"{folder}/a-ef56/{channel:04d}-top-{r}.png",
                "box": [0, 5 + r, 1, 6 + r],
                "sum": 1 / 3 - r,
                "positive": 2.5,
                "negative": -2 / 3 - r,
                "inside": None if r == 2 else 1 - r / 7,
            }
            for r in range(n)
        ],
    }


def synthetic_doc() -> dict[str, Any]:
    """Two layers of three channels, units listed out of channel order."""
    first = FIRST_DIR
    # means: a tie between channels 0 and 2; selectivities all different
    conv1 = [
        _unit(first, 2, 0.5, 0.1),
        _unit(first, 0, 0.5, 0.7),
        _unit(first, 1, 0.9, 0.3),
    ]
    evil = [
        _unit(EVIL_DIR, 0, -0.25, None),
        _unit(EVIL_DIR, 1, 1.75, 0.2),
        _unit(EVIL_DIR, 2, 0.0, 0.9),
    ]
    for u in conv1:  # attributions under the folder that needs percent-encoding
        u["attribution"] = _attribution(first, u["channel"], 3)
    evil[2]["attribution"] = _attribution(EVIL_DIR, 2, 3)
    evil[1]["attribution_why"] = "attributions were not computed in this run"
    # renders checked against the dataset: below, above, below with no ratio (a top
    # example at or under 0), and a reduction named like a tag (escaped)
    for u, (render, top) in zip(conv1, [(1.5, 3.0), (4.5, 3.0), (-0.5, -0.25)]):
        u["render_vs_dataset"] = {
            "render": render,
            "top_example": top,
            "ratio": render / top if top > 0 else None,
            "below": render < top,
            "reduce": "max",
            "top_index": 10 * u["channel"],
        }
        u["renders"]["channel"]["png_value"] = 3.0
        for j, d in enumerate(u["renders"]["diversity"]):
            d["png_value"] = 2.0 + j / 3
            d["relative"] = d["png_value"] / 3.0
    evil[1]["render_vs_dataset"] = {
        "render": 0.1 + 0.2,
        "top_example": 1.0,
        "ratio": 0.1 + 0.2,
        "below": True,
        "reduce": EVIL,
        "top_index": 11,
    }
    evil[0]["renders"] = None  # renders absent: the page says so
    evil[2]["render_vs_dataset_why"] = f"the render check is missing {EVIL}"
    evil[1]["top"][1]["crop"] = None  # one image not computed
    evil[1]["top"][1]["why"] = "the crop fell outside the image"
    evil[2]["top"][0]["crop"] = f"{EVIL_DIR}/e-cd34/{QUOTED}"
    evil[2]["top"][0]["path"] = f"img/{QUOTED}"
    evil[2]["top"][0]["label"] = TAG_CLASS
    for u in evil:
        u["connected"] = [
            {
                "layer": "conv1",
                "channel": c,
                "strength": 0.81 - c / 13,
                "page": f"{first}/{c:04d}.html",
            }
            for c in (1, 0)
        ]
        u["connected_why"] = None
    return {
        "format": 1,
        "title": "convlens microscope",
        "created": "2026-12-01T20:00:00+00:00",
        "model": {"name": "tiny_cnn", "description": f"a test model {EVIL}", "parameters": 4652008},
        "dataset": {
            "name": "shapes (val)",
            "size": 240,
            "labelled": True,
            "classes": CLASSES,
            "skipped": 0,
        },
        "settings": {"k": 3, "steps": 16, "size": 8, "lr": 0.05, "device": "cpu", "quick": True},
        "versions": {"convlens": "0.1.0", "torch": "2.x"},
        "stages": {"dataset pass": 12.3, "renders": 40.1, "examples": 3.2, "pages": 0.8},
        "notes": [f"a note with {EVIL}"],
        "layers": [
            {
                "name": "conv1",
                "dir": first,
                "shape": [3, 8, 8],
                "channels": 3,
                "receptive_field": {
                    "size": [3, 3],
                    "stride": [1, 1],
                    "bounded": True,
                    "reason": None,
                },
                "connections": {"from": None, "why": "the first layer"},
                "units": conv1,
            },
            {
                "name": EVIL,
                "dir": EVIL_DIR,
                "shape": [3],
                "channels": 3,
                "receptive_field": None,
                "connections": {"from": "conv1", "why": None},
                "units": evil,
            },
        ],
    }


def _image_paths(doc: dict[str, Any]) -> list[str]:
    paths = []
    for layer in doc["layers"]:
        for u in layer["units"]:
            r = u["renders"]
            if r:
                paths += [r[k]["image"] for k in ("channel", "neuron", "negative")]
                paths += [d["image"] for d in r["diversity"]]
            for e in u["top"] + u["bottom"]:
                paths += [e["crop"], e["full"]]
            paths += [a["image"] for a in (u.get("attribution") or {}).get("top", [])]
    return [p for p in paths if p is not None]


def write_images(doc: dict[str, Any], out: Path) -> list[Path]:
    """A small PNG at every image path the document names (renders 8x8, crops 6x6, fulls 16x12)."""
    files = []
    for i, rel in enumerate(_image_paths(doc)):
        crop = "/e-" in rel or "/a-" in rel
        size = (16, 12) if rel.endswith("-full.png") else (6, 6) if crop else (8, 8)
        _png(out / rel, size, (37 * i) % 256)
        files.append(out / rel)
    return files


@pytest.fixture
def site(tmp_path: Path) -> tuple[dict[str, Any], Path, list[Path]]:
    out = tmp_path / "micro"
    doc = synthetic_doc()
    write_images(doc, out)
    (out / "microscope.json").write_text(json.dumps(doc, indent=2))
    pages = write_site(json.loads((out / "microscope.json").read_text()), out)
    return doc, out, pages


# ---------------------------------------------------------------------------- parsing


def data_values(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for _, attrs in parse(path):
        if "data-key" in attrs:
            found.setdefault(attrs["data-key"], []).append(attrs["data-value"])
    return found


def same_number(raw: str, expected: Any) -> bool:
    if expected is None:
        return raw == "null"
    if isinstance(expected, int):
        return raw == str(expected)
    return float(raw) == expected and raw == repr(float(expected))


def expected_values(unit: dict[str, Any]) -> dict[str, Any]:
    """Every number a unit page must carry, by data-key."""
    want = {f"stats.{k}": v for k, v in unit["stats"].items()}
    if unit["selectivity"] is not None:
        want["selectivity.index"] = unit["selectivity"]["index"]
    if unit["renders"] is not None:
        for kind in ("channel", "neuron", "negative"):
            want[f"renders.{kind}.value"] = unit["renders"][kind]["value"]
        for i, d in enumerate(unit["renders"]["diversity"]):
            want[f"renders.diversity.{i}.value"] = d["value"]
            if "relative" in d:
                want[f"renders.diversity.{i}.relative"] = d["relative"]
    if unit.get("render_vs_dataset"):
        for key in ("render", "top_example", "ratio"):
            want[f"render_vs_dataset.{key}"] = unit["render_vs_dataset"][key]
    for side in ("top", "bottom"):
        for i, e in enumerate(unit[side]):
            want[f"{side}.{i}.score"] = e["score"]
    for i, c in enumerate(unit["connected"] or []):
        want[f"connected.{i}.strength"] = c["strength"]
    if unit.get("attribution"):
        want["attribution.scale"] = unit["attribution"]["scale"]
        for i, a in enumerate(unit["attribution"]["top"]):
            want[f"attribution.top.{i}.sum"] = a["sum"]
            want[f"attribution.top.{i}.inside"] = a["inside"]
    for i, c in enumerate(unit["histogram"]["counts"]):
        want[f"histogram.counts.{i}"] = c
    return want


def layer_pages(out: Path, layer: dict[str, Any]) -> list[Path]:
    return [out / layer["dir"] / v for v in VIEWS]


# ---------------------------------------------------------------------------- tests


def test_every_page_is_written(site: tuple[dict[str, Any], Path, list[Path]]) -> None:
    doc, out, pages = site
    want = [out / "index.html"]
    for layer in doc["layers"]:
        want += layer_pages(out, layer)
        want += [out / u["page"] for u in sorted(layer["units"], key=lambda u: u["channel"])]
    assert pages == want
    assert all(p.is_file() for p in pages)
    assert (out / SITE_CSS).is_file()


def test_every_link_resolves_inside_the_site(
    site: tuple[dict[str, Any], Path, list[Path]],
) -> None:
    _, out, pages = site
    root = out.resolve()
    checked = 0
    for page in pages:
        tags = parse(page)
        ids = {a["id"] for _, a in tags if "id" in a}
        for tag, attrs in tags:
            for name in ("href", "src"):
                if name not in attrs:
                    continue
                url = urlsplit(attrs[name])
                assert not url.scheme and not url.netloc, (page, attrs[name])
                if not url.path:  # "#section" on the same page
                    assert url.fragment in ids, (page, attrs[name])
                    continue
                target = (page.parent / unquote(url.path)).resolve()
                assert target.is_file(), (page, tag, attrs[name])
                assert target.is_relative_to(root), (page, attrs[name])
                checked += 1
    assert checked > 100


def test_no_script_no_network_and_the_csp(site: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out, pages = site
    for path in [*pages, out / SITE_CSS]:
        text = path.read_text(encoding="utf-8")
        assert "<script" not in text.lower(), path
        assert not re.search(r"https?:", text), path
        assert " style=" not in text and "<style" not in text, path  # the CSP forbids inline CSS
        assert "@import" not in text and "url(" not in text, path
    for page in pages:
        metas = [a for t, a in parse(page) if t == "meta" and "http-equiv" in a]
        assert metas == [{"http-equiv": "Content-Security-Policy", "content": CSP}]
        assert "script-src" not in CSP and "default-src 'none'" in CSP


def test_unit_pages_carry_the_exact_numbers(
    site: tuple[dict[str, Any], Path, list[Path]],
) -> None:
    doc, out, _ = site
    for layer in doc["layers"]:
        for unit in layer["units"]:
            page = out / unit["page"]
            found = data_values(page)
            want = expected_values(unit)
            for key, value in want.items():
                assert key in found, (page.name, key)
                assert len(found[key]) == 1, (page.name, key, found[key])
                assert same_number(found[key][0], value), (page.name, key, found[key], value)
            edges = unit["histogram"]["edges"]
            ticks = {k: v for k, v in found.items() if k.startswith("histogram.edges.")}
            assert ticks and ticks.keys() >= {
                "histogram.edges.0",
                f"histogram.edges.{len(edges) - 1}",
            }
            for key, (raw,) in ticks.items():
                assert same_number(raw, edges[int(key.rsplit(".", 1)[1])]), key
            assert set(found) == set(want) | set(ticks), set(found) ^ set(want)
    # the 17th digit is there: 0.1 + 0.2 is not 0.3
    first = data_values(out / FIRST_DIR / "0000.html")
    assert first["stats.std"] == ["0.30000000000000004"]
    assert first["stats.min"] == [repr(-1 / 3)]


def test_layer_grids_show_the_means(site: tuple[dict[str, Any], Path, list[Path]]) -> None:
    doc, out, _ = site
    for layer in doc["layers"]:
        means = [
            repr(u["stats"]["mean"]) for u in sorted(layer["units"], key=lambda u: u["channel"])
        ]
        assert data_values(out / layer["dir"] / "index.html")["stats.mean"] == means


def test_layer_grids_mark_the_renders_below_their_top_example(
    site: tuple[dict[str, Any], Path, list[Path]],
) -> None:
    doc, out, _ = site
    for layer in doc["layers"]:
        checked = [u for u in layer["units"] if u.get("render_vs_dataset")]
        below = {u["channel"] for u in checked if u["render_vs_dataset"]["below"]}
        for view in VIEWS:
            page = out / layer["dir"] / view
            marked = {
                int(a["data-channel"])
                for t, a in parse(page)
                if t == "a" and "data-channel" in a and "below" in a["class"].split()
            }
            assert marked == below, (page, marked)
            text = page.read_text(encoding="utf-8")
            assert (f"of {len(checked)} channels: the render drives" in text) == bool(checked)
            if checked:
                assert data_values(page)["render_vs_dataset.below"] == [str(len(below))]
    for u in doc["layers"][0]["units"]:  # below, above, and below with no ratio
        text = (out / u["page"]).read_text(encoding="utf-8")
        assert ("below its top example" in text) == u["render_vs_dataset"]["below"]
    missing = (out / EVIL_DIR / "0002.html").read_text(encoding="utf-8")
    assert "not measured (the render check is missing &lt;script&gt;" in missing


def test_prev_and_next_follow_channel_order(
    site: tuple[dict[str, Any], Path, list[Path]],
) -> None:
    doc, out, _ = site
    for layer in doc["layers"]:
        units = sorted(layer["units"], key=lambda u: u["channel"])
        for i, unit in enumerate(units):
            page = out / unit["page"]
            rel = {a["rel"]: a["href"] for t, a in parse(page) if t == "a" and "rel" in a}
            if i == 0:
                assert "prev" not in rel, page
            else:
                assert (page.parent / unquote(rel["prev"])).resolve() == (
                    out / units[i - 1]["page"]
                ).resolve()
            if i == len(units) - 1:
                assert "next" not in rel, page
            else:
                assert (page.parent / unquote(rel["next"])).resolve() == (
                    out / units[i + 1]["page"]
                ).resolve()
            assert (page.parent / unquote(rel["up"])).resolve() == (
                out / layer["dir"] / "index.html"
            ).resolve()


def _cells(page: Path) -> list[int]:
    """The channels of a grid's cells, in the order shown, checked against their links."""
    channels = []
    for tag, attrs in parse(page):
        if tag == "a" and "cell" in attrs.get("class", "").split():
            channel = int(attrs["data-channel"])
            assert unquote(attrs["href"]) == f"{channel:04d}.html"
            channels.append(channel)
    return channels


def test_the_three_views_are_sorted(site: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out, _ = site
    by_index, by_sel, by_mean = (_cells(p) for p in layer_pages(out, {"dir": FIRST_DIR}))
    assert by_index == [0, 1, 2]
    assert by_sel == [0, 1, 2]  # 0.7, 0.3, 0.1
    assert by_mean == [1, 0, 2]  # 0.9, then the tie at 0.5 by index
    by_index, by_sel, by_mean = (_cells(p) for p in layer_pages(out, {"dir": EVIL_DIR}))
    assert by_index == [0, 1, 2]
    assert by_sel == [2, 1, 0]  # 0.9, 0.2, then channel 0 without selectivity
    assert by_mean == [1, 2, 0]  # 1.75, 0.0, -0.25
    for page in layer_pages(out, {"dir": EVIL_DIR}):
        tabs = [a for t, a in parse(page) if t == "a" and "aria-current" in a]
        assert [unquote(a["href"]) for a in tabs] == [
            "index.html",
            page.name,
        ]  # the layer, this view


def test_stages_and_their_total(tmp_path: Path) -> None:
    doc = synthetic_doc()
    stages = doc["stages"]
    out = tmp_path / "sum"
    write_site(doc, out)
    values = [a["data-value"] for t, a in parse(out / "index.html") if "data-value" in a]
    assert values == [repr(v) for v in stages.values()] + [repr(sum(stages.values()))]
    doc["stages"] = {**stages, "total": 60.5}  # the run's wall time, as the engine writes it
    out = tmp_path / "given"
    write_site(doc, out)
    values = [a["data-value"] for t, a in parse(out / "index.html") if "data-value" in a]
    assert values == [repr(v) for v in stages.values()] + ["60.5"]
    assert "1 min 00 s" in (out / "index.html").read_text()  # 60.5 s, rounded (to even)


def test_a_layer_with_some_channels_says_so(tmp_path: Path) -> None:
    doc = synthetic_doc()
    doc["layers"][0]["channels"] = 64
    write_site(doc, tmp_path)
    assert "3 of 64 channels shown" in (tmp_path / FIRST_DIR / "index.html").read_text()
    assert "3 of 64 shown" in (tmp_path / "index.html").read_text()


def test_unlabelled_data_sorts_by_index(tmp_path: Path) -> None:
    doc = synthetic_doc()
    doc["dataset"].update(labelled=False, classes=None)
    for layer in doc["layers"]:
        for u in layer["units"]:
            u["selectivity"] = u["top_classes"] = None
    write_images(doc, tmp_path)
    write_site(doc, tmp_path)
    page = tmp_path / FIRST_DIR / "by-selectivity.html"
    assert _cells(page) == [0, 1, 2]
    assert "unlabelled" in page.read_text()
    unit = (tmp_path / FIRST_DIR / "0001.html").read_text()
    assert "selectivity.index" not in unit and "none (unlabelled data)" in unit


def test_every_name_is_escaped(site: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out, pages = site
    texts = {p: p.read_text(encoding="utf-8") for p in pages}
    for page, text in texts.items():
        assert "<script>alert(1)" not in text, page
        assert TAG_CLASS not in text, page
        assert QUOTED not in text, page
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert escaped in texts[out / "index.html"]
    for page in [*layer_pages(out, {"dir": EVIL_DIR}), out / EVIL_DIR / "0001.html"]:
        assert f"<h1><code>{escaped}</code>" in texts[page], page
        assert f"<title>{escaped}" in texts[page], page
    assert "&lt;b&gt;x&lt;/b&gt;" in texts[out / "index.html"]  # the class list
    unit = texts[out / EVIL_DIR / "0002.html"]
    assert "&lt;b&gt;x&lt;/b&gt;" in unit  # a label and a top class
    assert "img/a&#34;b&#39;c.png" in unit  # the example's path, shown as text
    srcs = [a["src"] for t, a in parse(out / EVIL_DIR / "0002.html") if t == "img"]
    assert "e-cd34/a%22b%27c.png" in srcs  # the file, linked percent-encoded


def test_missing_renders_and_images_show_boxes(
    site: tuple[dict[str, Any], Path, list[Path]],
) -> None:
    _, out, _ = site
    no_renders = out / EVIL_DIR / "0000.html"
    text = no_renders.read_text()
    assert "No feature visualizations for this channel" in text
    assert not [a for t, a in parse(no_renders) if t == "img" and "r-ab12" in a["src"]]
    one_missing = out / EVIL_DIR / "0001.html"
    boxes = [a for t, a in parse(one_missing) if t == "span" and "noimg" in a.get("class", "")]
    assert [b["title"] for b in boxes] == ["the crop fell outside the image"]
    grid = out / EVIL_DIR / "index.html"
    boxes = [a["title"] for t, a in parse(grid) if t == "span" and "noimg" in a.get("class", "")]
    assert boxes == ["no renders", "the crop fell outside the image"]


def test_attributions_show_their_scale_and_shares(
    site: tuple[dict[str, Any], Path, list[Path]],
) -> None:
    _, out, _ = site
    page = out / FIRST_DIR / "0001.html"
    text = page.read_text()
    assert "What in this crop drives the unit" in text
    assert "input × gradient of &lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "−1.3" in text and "+1.3" in text  # the symmetric scale, 0.1 + 0.2 + 1
    assert "positive in crop" in text and "100.0%" in text and "85.7%" in text
    srcs = [a["src"] for t, a in parse(page) if t == "img" and "a-ef56" in a["src"]]
    assert srcs == [f"a-ef56/0001-top-{r}.png" for r in range(3)]
    assert [a for t, a in parse(page) if t == "span" and a.get("class") == "diverging"]
    missing = (out / EVIL_DIR / "0001.html").read_text()
    assert "No attributions for this channel: attributions were not computed" in missing
    assert (
        "No attributions for this channel: none in microscope.json"
        in (out / EVIL_DIR / "0000.html").read_text()
    )


def test_an_image_missing_on_disk_or_outside_is_a_box(tmp_path: Path) -> None:
    doc = synthetic_doc()
    write_images(doc, tmp_path)
    unit = doc["layers"][0]["units"][1]  # channel 0
    os.unlink(tmp_path / unit["renders"]["neuron"]["image"])
    unit["renders"]["negative"]["image"] = "../outside.png"
    unit["bottom"][0]["crop"] = "/etc/passwd"
    write_site(doc, tmp_path)
    page = tmp_path / FIRST_DIR / "0000.html"
    boxes = [a["title"] for t, a in parse(page) if t == "span" and "noimg" in a.get("class", "")]
    assert boxes == [
        f"file missing: {FIRST_DIR}/r-ab12/0000-neuron.png",
        "not a path inside the site: ../outside.png",
        "not a path inside the site: /etc/passwd",
    ]


def test_writes_are_atomic_and_repeatable(site: tuple[dict[str, Any], Path, list[Path]]) -> None:
    doc, out, pages = site
    files = {p for p in out.rglob("*") if p.is_file()}
    images = {out / p for p in _image_paths(doc)}
    assert files == set(pages) | images | {out / SITE_CSS, out / "microscope.json"}
    assert not [p for p in files if p.name.startswith(".") or p.name.endswith(".tmp")]
    before = {p: p.read_bytes() for p in pages}
    assert write_site(doc, out) == pages
    assert {p: p.read_bytes() for p in pages} == before  # the same document, the same bytes
    # a run that differs only in when and how fast it ran changes the index page alone
    again = {**doc, "created": "2027-01-01T00:00:00+00:00", "stages": {"renders": 1.5}}
    write_site(again, out)
    changed = {p for p in pages if p.read_bytes() != before[p]}
    assert changed == {out / "index.html"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["layers"][0]["units"][0].update(page="../0002.html"), "inside the site"),
        (lambda d: d["layers"][0]["units"][0].update(page="/tmp/x.html"), "inside the site"),
        (lambda d: d["layers"][0].update(dir=""), "folder inside the site"),
        (lambda d: d["layers"][1].update(dir=FIRST_DIR), "both written to"),
        (lambda d: d["layers"][0]["units"][0].update(page="index.html"), "both written to"),
        (lambda d: d["layers"][0]["units"][0].update(channel=0), "both channel 0"),
        (lambda d: d.update(layers={}), "layers must be a list"),
        (lambda d: d.update(format=2), "format 2"),
    ],
)
def test_a_wrong_document_is_refused_before_writing(
    tmp_path: Path, change: Any, message: str
) -> None:
    doc = copy.deepcopy(synthetic_doc())
    change(doc)
    with pytest.raises(ReportError, match=message):
        write_site(doc, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- in a browser


@pytest.mark.browser
def test_site_in_chromium(chromium: str, site: tuple[dict[str, Any], Path, list[Path]]) -> None:
    _, out, _ = site
    root = out.resolve()
    shots = artifact_dir()
    for name, page in [
        ("index", out / "index.html"),
        ("layer", out / EVIL_DIR / "by-mean.html"),
        ("encoded", out / FIRST_DIR / "0001.html"),  # images under "0-conv1 #?%&/"
        ("unit", out / EVIL_DIR / "0001.html"),
    ]:
        shot = shots / f"site_{name}.png"
        seen = check_report(page, shot, chromium=chromium)
        n_img = sum(1 for t, _ in parse(page) if t == "img")
        assert len(seen["images"]) == n_img, seen["images"]
        for img in seen["images"]:
            assert img["complete"] and img["naturalWidth"] > 0, (name, img)
        assert seen["scripts"] == 0
        assert seen["console_errors"] == [], (name, seen["console"])
        # check_report leaves the network on; the CSP is what refuses: nothing may be asked
        # for but the site's own files
        assert seen["requests"], name  # at least the style sheet
        for url in seen["requests"]:
            assert url.startswith("file://"), (name, url)
            target = Path(unquote(urlsplit(url).path)).resolve()
            assert target.is_relative_to(root) and target.is_file(), (name, url)
        assert any(u.endswith("/style.css") for u in seen["requests"]), seen["requests"]
        if name == "layer":
            assert seen["title"].startswith(EVIL)  # shown as text, not run
