"""The report in a real browser: headless Chromium through the DevTools protocol.

Skipped only where no Chromium is found (.ci/run installs Debian's `chromium`). The
screenshot is left in tests/artifacts/ (or $PYTEST_ARTIFACTS) for people to look at.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _synthetic import EVIL_IMG
from PIL import Image

from _browser import artifact_dir, check_report
from convlens.report import write_report

pytestmark = pytest.mark.browser


def test_report_in_chromium(chromium: str, report_dir: Path) -> None:
    html = write_report(report_dir)
    doc = json.loads((report_dir / "report.json").read_text())
    shot = artifact_dir() / "report_synthetic.png"
    shot.unlink(missing_ok=True)

    seen = check_report(html, shot, chromium=chromium)

    titles = [s["title"] for s in doc["sections"]]
    assert seen["headings"] == titles
    assert seen["headings"][1] == f"Training {EVIL_IMG}"  # shown as text, not run as a tag
    assert seen["toc"] == titles
    assert seen["section_ids"] == ["tensor", "training", "pretrained"]
    assert seen["broken_links"] == []
    assert seen["h1"] == [doc["title"]]
    assert seen["scripts"] == 0
    assert len(seen["images"]) == 3, seen["images"]
    for img, name in zip(
        seen["images"], ["tensor_channels.png", "photo.jpg", "training_curves.png"]
    ):
        with Image.open(report_dir / name) as im:
            assert (img["naturalWidth"], img["naturalHeight"]) == im.size, img
        assert img["complete"] and img["naturalWidth"] > 0
    assert seen["placeholders"] == ["figure missing: gone.png no such file"]
    assert seen["console_errors"] == [], seen["console"]
    assert seen["requests"] == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as im:
        assert im.width == 1280 and im.height > 900  # the whole page, not just the viewport
    print(f"browser check in {seen['seconds']} s; screenshot {shot}")


def test_checker_sees_what_goes_wrong(chromium: str, tmp_path: Path) -> None:
    """The checker is not blind: errors, broken images and requests all show up."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>t</title></head><body><main>"
        "<section id='a'><h2>A</h2><img src='missing.png' alt='gone'></section>"
        "<img src='http://127.0.0.1:9/x.png' alt='remote'>"
        "<a href='#nowhere'>x</a>"
        "<script>console.error('boom'); throw new Error('uncaught');</script>"
        "</main></body></html>",
        encoding="utf-8",
    )
    seen = check_report(page, None, chromium=chromium)
    texts = " | ".join(m["text"] for m in seen["console_errors"])
    assert "boom" in texts and "uncaught" in texts
    assert [i["naturalWidth"] for i in seen["images"]] == [0, 0]
    assert "http://127.0.0.1:9/x.png" in seen["requests"]
    assert seen["broken_links"] == ["#nowhere"]
    assert seen["scripts"] == 1
    assert seen["headings"] == ["A"]
    assert seen["screenshot"] is None
