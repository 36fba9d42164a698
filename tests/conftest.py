"""Shared fixtures: tiny models, RNG hygiene, the gpu marker, and ../shared/data."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_rng_leak():
    """Tests must not depend on, or leak, the global RNG state."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


@pytest.fixture
def exact_cuda():
    """Full float32 on the GPU (no TF32 convolutions/matmuls), so CUDA results can be
    compared with the CPU's at float32 round-off."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network use: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary for browser tests (tests/_browser.py); skips where there is none."""
    from _browser import CHROMIUM_NAMES, find_chromium

    found = find_chromium()
    if found is None:
        pytest.skip(
            f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)} and $CONVLENS_CHROMIUM); "
            "install it with `apt-get install chromium`, as .ci/run does"
        )
    return found
