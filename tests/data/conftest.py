"""Fixtures shared by the data tests: a private $CONVLENS_HOME and a fake Imagenette archive."""

from __future__ import annotations

from pathlib import Path

import pytest
from _imagenette_fakes import imagenette_archive


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every data test writes under its own tmp folder, never ~/.cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("CONVLENS_HOME", str(home))
    return home


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """A small Imagenette-shaped .tgz (10 WordNet-id classes, tiny JPEGs)."""
    return imagenette_archive(tmp_path / "made")
