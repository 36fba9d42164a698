"""Fixtures shared by the model tests: private torch / Hugging Face caches (nothing reads or
writes ~/.cache) and a folder served over HTTP on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _local_http import serve_folder


@pytest.fixture(autouse=True)
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Empty torch and Hugging Face caches, so nothing reads or writes ~/.cache."""
    import huggingface_hub.constants as hf

    torch_home, hf_cache = tmp_path / "torch", tmp_path / "hf"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return {"torch": torch_home, "hf": hf_cache}


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    with serve_folder(root) as base:
        yield root, base
