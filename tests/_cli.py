"""Shared helpers for tests of the ``convlens`` command line (imported as ``from _cli
import run``, like ``_browser``): run a command in-process, and check its outputs and
one-line errors."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result
from PIL import Image

from convlens.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args: str) -> Result:
    """``convlens ARGS...`` in this process; exceptions propagate (a traceback fails)."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()


def assert_wrote(result: Result, paths: list[Path]) -> None:
    lines = result.stdout.splitlines()
    for p in paths:
        assert f"wrote {p}" in lines, f"{p} not named in:\n{result.stdout}"


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """Exit status 2 and exactly one stderr line, ``convlens: error: ...``, holding every
    fragment; returns that line."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}"
    err_lines = result.stderr.splitlines()
    assert len(err_lines) == 1, result.stderr
    line = err_lines[0]
    assert line.startswith("convlens: error: "), line
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in line, f"{f!r} not in {line!r}"
    return line


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
