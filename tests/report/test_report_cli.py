"""write_report and `convlens report DIR`: the round trip, atomic writes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _cli import assert_one_line_error, no_temp_files, run
from convlens.errors import ReportError
from convlens.report import load_report, render_html, write_report


def test_cli_round_trip(report_dir: Path) -> None:
    result = run("report", str(report_dir))
    assert result.exit_code == 0, result.output
    html_path = report_dir / "report.html"
    assert result.stdout.splitlines() == [f"wrote {html_path}"]
    html = html_path.read_text(encoding="utf-8")
    assert html == render_html(load_report(report_dir), report_dir)
    assert html.startswith("<!DOCTYPE html>") and "<h2>The image as a tensor</h2>" in html
    assert no_temp_files(report_dir)


def test_rebuild_replaces_the_page(report_dir: Path) -> None:
    write_report(report_dir)
    doc = json.loads((report_dir / "report.json").read_text())
    doc["title"] = "second run"
    (report_dir / "report.json").write_text(json.dumps(doc))
    path = write_report(report_dir)
    assert path == report_dir / "report.html"
    assert "<h1>second run</h1>" in path.read_text(encoding="utf-8")
    assert no_temp_files(report_dir)


def test_out_writes_elsewhere(report_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "share"
    result = run("report", str(report_dir), "--out", str(elsewhere))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"wrote {elsewhere / 'report.html'}"]
    assert not (report_dir / "report.html").exists()
    assert "data:image/png;base64," in (elsewhere / "report.html").read_text(encoding="utf-8")


def test_missing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "nowhere"
    assert_one_line_error(
        run("report", str(folder)), "no report folder", f"convlens tour --out {folder}"
    )


def test_folder_without_report_json(tmp_path: Path) -> None:
    assert_one_line_error(run("report", str(tmp_path)), "no report.json in", "convlens tour --out")
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"title": "x", ', "is not valid JSON (line 1, column"),
        ("", "is not valid JSON"),
        (b"\xff\xfe{}", "is not UTF-8 text"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"sections": "tensor"}', "sections must be a list"),
    ],
)
def test_bad_report_json(tmp_path: Path, content: str | bytes, fragment: str) -> None:
    path = tmp_path / "report.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    line = assert_one_line_error(run("report", str(tmp_path)), fragment)
    if "sections" not in fragment:
        assert str(path) in line and "convlens tour --out" in line
    assert not (tmp_path / "report.html").exists()
    with pytest.raises(ReportError, match=r"report\.json"):
        write_report(tmp_path)


def test_fix_quotes_an_awkward_folder_name(tmp_path: Path) -> None:
    folder = tmp_path / "my tour"
    folder.mkdir()
    with pytest.raises(ReportError, match=r"convlens tour --out '.*/my tour'`"):
        write_report(folder)


def test_help_names_the_command() -> None:
    result = run("report", "--help")
    assert result.exit_code == 0
    assert "Rebuild DIR/report.html" in result.stdout
