"""render_html: escaping everywhere, embedded figures, placeholders, no network, formatting."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from _synthetic import EVIL, EVIL_IMG, synthetic_report
from PIL import Image

from convlens.errors import ConvlensError, ReportError
from convlens.report import format_value, render_html

ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
ALLOWED_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "link",
    "style",
    "body",
    "header",
    "h1",
    "h2",
    "h3",
    "p",
    "nav",
    "ol",
    "ul",
    "li",
    "a",
    "span",
    "main",
    "section",
    "div",
    "strong",
    "code",
    "figure",
    "img",
    "figcaption",
    "small",
    "br",
    "table",
    "caption",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "dl",
    "dt",
    "dd",
    "footer",
}


class _Tags(HTMLParser):
    """Every start tag with its attributes, as the browser's parser would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    parser.close()
    return parser.tags


def evil_doc() -> dict[str, Any]:
    """The attack string in every place a string can go."""
    return {
        "title": EVIL,
        "subtitle": EVIL,
        "created": EVIL,
        "settings": {EVIL: EVIL},
        "versions": {"convlens": EVIL},
        "seed": EVIL,
        "sections": [
            {
                "id": EVIL,
                "title": EVIL,
                "status": EVIL,
                "intro": EVIL,
                "figures": [{"file": EVIL, "caption": EVIL}, {"file": "ok.png", "caption": EVIL}],
                "tables": [{"caption": EVIL, "columns": [EVIL], "rows": [[EVIL], [EVIL_IMG]]}],
                "numbers": {EVIL: EVIL},
                "notes": [EVIL, '" onmouseover="alert(1)'],
                "missing": {"reason": EVIL, "fix": EVIL},
            }
        ],
    }


def png(path: Path, size: tuple[int, int] = (20, 10)) -> bytes:
    Image.new("RGB", size, (10, 200, 30)).save(path)
    return path.read_bytes()


def test_every_string_is_escaped(tmp_path: Path) -> None:
    png(tmp_path / "ok.png")
    html = render_html(evil_doc(), tmp_path)
    assert "<script" not in html.lower()
    assert "<img src=x" not in html and "onerror" not in html.replace("onerror=console", "")
    # title, subtitle, created x2, settings k+v, versions, seed, toc, h2, badge x2, intro,
    # placeholder name x2, two captions, table caption, column, cell, numbers k+v, note,
    # reason, fix: at least one escaped copy for each
    assert html.count(ESCAPED) >= 25
    for fragment in (
        f"<h1>{ESCAPED}</h1>",
        f"<h2>{ESCAPED}</h2>",
        f"<caption>{ESCAPED}</caption>",
        f'<th scope="col">{ESCAPED}</th>',
        f"<td>{ESCAPED}</td>",
        f"<dt>{ESCAPED}</dt><dd>{ESCAPED}</dd>",
        f"<li>{ESCAPED}</li>",
        f"<figcaption>{ESCAPED}</figcaption>",
        f'<code class="fix">{ESCAPED}</code>',
        f"figure missing: {ESCAPED}",
        f'alt="{ESCAPED}"',
    ):
        assert fragment in html, fragment
    assert "&lt;img src=x onerror=console.error(&#39;xss&#39;)&gt;" in html
    assert "&#34; onmouseover=&#34;alert(1)" in html


def test_only_known_tags_and_no_event_handlers(tmp_path: Path) -> None:
    png(tmp_path / "ok.png")
    found = tags(render_html(evil_doc(), tmp_path))
    assert {t for t, _ in found} <= ALLOWED_TAGS
    for tag, attrs in found:
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
        assert tag != "img" or attrs["src"].startswith("data:image/png;base64,")  # type: ignore[union-attr]


def test_ids_are_sanitised_and_unique(tmp_path: Path) -> None:
    doc = {
        "sections": [
            {"id": EVIL, "title": "a"},
            {"id": EVIL, "title": "b"},
            {"id": "contents", "title": "c"},
            {"title": "Only a title"},
            {"id": '"><x', "title": "e"},
        ]
    }
    found = tags(render_html(doc, tmp_path))
    ids = [a["id"] for t, a in found if t == "section"]
    assert ids == [
        "script-alert-1-script",
        "script-alert-1-script-2",
        "contents-section",
        "Only-a-title",
        "x",
    ]
    all_ids = [a["id"] for _, a in found if "id" in a]
    assert len(all_ids) == len(set(all_ids))
    hrefs = [a["href"] for t, a in found if t == "a"]
    assert hrefs == [f"#{i}" for i in ids]
    for i in all_ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", i or ""), i


def test_figures_are_data_uris_with_the_files_bytes(report_dir: Path) -> None:
    import json

    html = render_html(json.loads((report_dir / "report.json").read_text()), report_dir)
    srcs = [a["src"] for t, a in tags(html) if t == "img"]
    assert len(srcs) == 3
    png_uri, jpeg_uri, curves_uri = srcs  # document order
    assert png_uri.startswith("data:image/png;base64,")  # type: ignore[union-attr]
    assert (
        base64.b64decode(png_uri.split(",", 1)[1])
        == (  # type: ignore[union-attr]
            report_dir / "tensor_channels.png"
        ).read_bytes()
    )
    assert jpeg_uri.startswith("data:image/jpeg;base64,")  # type: ignore[union-attr]
    assert base64.b64decode(jpeg_uri.split(",", 1)[1]) == (report_dir / "photo.jpg").read_bytes()  # type: ignore[union-attr]
    assert base64.b64decode(curves_uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"  # type: ignore[union-attr]
    img = next(a for t, a in tags(html) if t == "img")
    assert (img["width"], img["height"]) == ("96", "64")


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("gone.png", None, "no such file"),
        ("text.png", b"not an image at all", "not a PNG or JPEG file"),
        ("bad.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "unreadable image"),
        ("truncated.png", "half", "unreadable image"),
        ("../outside.png", "png", "outside the report folder"),
        ("/etc/passwd", None, "outside the report folder"),
        ("https://example.com/x.png", None, "no such file"),
        ("", None, "no file named"),
        ("sub", "dir", "no such file"),
    ],
)
def test_unusable_figure_becomes_a_placeholder(
    tmp_path: Path, name: str, content: bytes | str | None, problem: str
) -> None:
    folder = tmp_path / "tour"
    folder.mkdir()
    whole = png(tmp_path / "whole.png", (300, 200))
    if content == "half":
        (folder / name).write_bytes(whole[: len(whole) // 2])
    elif content == "png":
        png(folder / name)
    elif content == "dir":
        (folder / name).mkdir()
    elif isinstance(content, bytes):
        (folder / name).write_bytes(content)
    doc = {"sections": [{"id": "s", "title": "S", "figures": [{"file": name, "caption": "cap"}]}]}
    html = render_html(doc, folder)
    assert "<img" not in html
    shown = name or "(no file named)"
    assert f"figure missing: {shown}<br><small>{problem}" in html
    assert "<figcaption>cap</figcaption>" in html


def test_no_network_references(report_dir: Path) -> None:
    import json

    doc = json.loads((report_dir / "report.json").read_text())
    doc["sections"][0]["figures"].append({"file": "http://example.com/a.png", "caption": "x"})
    doc["sections"][0]["notes"] = ["see https://example.com for more"]  # text, not a link
    html = render_html(doc, report_dir)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    for tag, attrs in tags(html):
        for key in ("src", "href"):
            if key in attrs:
                assert attrs[key].startswith(("data:", "#")), (tag, attrs)  # type: ignore[union-attr]
    assert "<script" not in html and "@import" not in html and "url(" not in html
    assert "default-src 'none'; img-src data:" in html  # CSP forbids any request


def test_sections_badges_and_footer(report_dir: Path) -> None:
    import json

    html = render_html(json.loads((report_dir / "report.json").read_text()), report_dir)
    assert '<section id="pretrained" class="section status-missing">' in html
    assert '<span class="badge badge-missing">missing</span>' in html
    assert "<strong>Not run:</strong> resnet18&#39;s weights are not on disk" in html
    assert '<code class="fix">convlens tour --model resnet18 --out tour/</code>' in html
    assert '<section id="tensor" class="section status-done">' in html
    assert html.count('class="missing"') == 1
    assert '<p class="intro">A colour image is three grids of numbers.</p>' in html
    assert '<p class="intro">One per channel.</p>' in html
    assert '<th scope="col" class="num">accuracy</th>' in html
    assert '<td class="num">0.9123</td>' in html
    assert "<dt>shape</dt><dd>3, 64, 96</dd>" in html
    footer = html[html.index("<footer") :]
    assert "Seed <code>0</code>" in footer
    assert "<dt>quick</dt><dd>yes</dd>" in footer and "<dt>lr</dt><dd>0.001</dd>" in footer
    assert "<dt>torch</dt><dd>2.x</dd>" in footer


def test_failed_section() -> None:
    doc = {
        "sections": [
            {"id": "a", "title": "A", "status": "failed", "missing": {"reason": "boom", "fix": "x"}}
        ]
    }
    html = render_html(doc, ".")
    assert '<span class="badge badge-failed">failed</span>' in html
    assert "<strong>Failed:</strong> boom" in html


def test_minimal_document_renders() -> None:
    html = render_html({}, ".")
    assert "<title>convlens report</title>" in html
    assert "<nav" not in html


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ([], "the top level must be an object"),
        ({"sections": {}}, "sections must be a list"),
        ({"sections": ["tensor"]}, "sections[0] must be an object"),
        ({"sections": [{"figures": {"file": "a.png"}}]}, "sections[0].figures must be a list"),
        ({"sections": [{"tables": [[1, 2]]}]}, "sections[0].tables[0] must be an object"),
        ({"sections": [{"numbers": [1]}]}, "sections[0].numbers must be an object"),
        ({"settings": "quick"}, "settings must be an object"),
    ],
)
def test_bad_structure_is_a_clear_error(doc: Any, where: str) -> None:
    with pytest.raises(ReportError, match=re.escape(where)) as e:
        render_html(doc, ".")
    assert isinstance(e.value, ConvlensError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.912345, "0.9123"),
        (123.456, "123.5"),
        (-0.5, "-0.5"),
        (0.0, "0"),
        (1.0, "1"),
        (0.001, "0.001"),
        (1e-7, "1e-07"),
        (12345.6, "12,346"),
        (9999.7, "10,000"),
        (2.5e20, "2.5e+20"),
        (float("nan"), "NaN"),
        (float("-inf"), "−∞"),
        (3, "3"),
        (15000, "15,000"),
        (True, "yes"),
        (False, "no"),
        (None, "–"),
        ("bn1", "bn1"),
        ([3, 224, 224], "3, 224, 224"),
        ([[1, 2], [3, 4]], "[1, 2], [3, 4]"),
        ({"a": 0.25, "b": None}, "a: 0.25; b: –"),
    ],
)
def test_format_value(value: Any, text: str) -> None:
    assert format_value(value) == text


def test_synthetic_report_is_the_contract(tmp_path: Path) -> None:
    """The fixture's document has every key of the contract (it doubles as its example)."""
    doc = synthetic_report(tmp_path)
    assert set(doc) == {"title", "subtitle", "created", "settings", "versions", "seed", "sections"}
    keys = set().union(*(s.keys() for s in doc["sections"]))
    assert keys == {
        "id",
        "title",
        "status",
        "intro",
        "figures",
        "tables",
        "numbers",
        "notes",
        "missing",
    }


def test_import_does_not_pull_in_matplotlib() -> None:
    code = "import sys, convlens.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_links_are_relative_encoded_and_checked(tmp_path: Path) -> None:
    doc = synthetic_report(tmp_path)
    doc["sections"][0]["links"] = [
        {"href": "microscope/index.html", "text": "the full site"},
        {"href": f"odd dir/{EVIL}.html", "text": EVIL},
    ]
    html = render_html(doc, tmp_path)
    assert '<a href="microscope/index.html">the full site</a>' in html
    assert "odd%20dir/%3Cscript%3Ealert%281%29%3C/script%3E.html" in html
    assert EVIL not in html
    for bad in ("https://example.com/x", "/etc/passwd", "../up.html", "a/../../b", "file:x"):
        doc["sections"][0]["links"] = [{"href": bad}]
        with pytest.raises(ValueError, match="relative"):
            render_html(doc, tmp_path)
