"""Fixtures of the report tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from _synthetic import synthetic_report


@pytest.fixture
def report_dir(tmp_path: Path) -> Path:
    """A tour-shaped folder: report.json, three figures (one missing), one missing section."""
    folder = tmp_path / "tour"
    synthetic_report(folder)
    return folder
