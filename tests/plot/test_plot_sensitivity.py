"""convlens.plot.sensitivity: the map over the image, without pyplot."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import convlens
import convlens.plot as cplot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result() -> convlens.SensitivityResult:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = convlens.SimpleCNN(num_classes=4).eval()
    x = torch.randn(3, 48, 40, generator=torch.Generator().manual_seed(0))
    return convlens.sensitivity(net, x, 1, window=16, stride=12, mean=(0.5,) * 3, std=(0.25,) * 3)


def test_figure_has_three_panels_and_no_pyplot(result, tmp_path) -> None:
    plt.close("all")
    fig = cplot.sensitivity(result)
    assert isinstance(fig, Figure)
    assert plt.get_fignums() == []
    titles = [ax.get_title() for ax in fig.axes]
    assert any("target 1" in t for t in titles)
    assert any("exact" in t and "window 16x16" in t for t in titles)
    assert any("per window position (4x3)" in t for t in titles)
    path = cplot.save_figure(fig, tmp_path / "s.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_image_argument_tensor_or_pil(result) -> None:
    img = torch.rand(3, 48, 40)
    cplot.sensitivity(result, img)
    cplot.sensitivity(result, Image.new("RGB", (80, 96), (10, 200, 30)))  # stretched to fit
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        cplot.sensitivity(result, torch.rand(5, 48, 40))
    with pytest.raises(TypeError, match="SensitivityResult"):
        cplot.sensitivity(object())  # type: ignore[arg-type]


def test_approximate_is_labelled() -> None:
    torch.manual_seed(0)
    net = convlens.SimpleCNN(num_classes=4).eval()
    r = convlens.sensitivity(net, torch.randn(3, 32, 32), 0, window=8, stride=8, approximate=0.5)
    titles = " ".join(ax.get_title() for ax in cplot.sensitivity(r).axes)
    assert "APPROXIMATE" in titles
