"""Feature maps at depth: exact maps on a hand-weighted model, each family's default
early/deep layers, and the figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from collections import OrderedDict
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import convlens
import convlens.plot as cplot
from convlens.analysis.depth import DepthMaps, depth_maps
from convlens.models.zoo import ModelBundle, Preprocess


@pytest.fixture(autouse=True)
def _no_pyplot_figures():
    plt.close("all")
    yield
    assert plt.get_fignums() == []


@pytest.fixture(autouse=True)
def _caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def _hand_weighted() -> ModelBundle:
    """``early`` = (R, -G) per pixel; ``deep`` = 2x2 average pool of ``early``."""
    early = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        early.weight.zero_()
        early.weight[0, 0] = 1.0
        early.weight[1, 1] = -1.0
    model = nn.Sequential(OrderedDict(early=early, deep=nn.AvgPool2d(2)))
    pre = Preprocess(resize=None, crop=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return ModelBundle(model.eval(), "hand", "hand", pre, pretrained=True, source="by hand")


def _image() -> torch.Tensor:
    img = torch.zeros(3, 4, 4)
    img[0, :2] = 1.0  # red top half
    img[1] = 0.5  # green everywhere
    return img


def test_exact_maps_on_a_hand_weighted_model() -> None:
    d = depth_maps(_hand_weighted(), _image(), ["early", "deep"])
    assert d.layers == ("early", "deep") and d.relu
    assert d.shapes == {"early": (2, 4, 4), "deep": (2, 2, 2)}
    # ReLU kills the -G channel, so the mean over 2 channels is R / 2
    expected_early = torch.tensor([[0.5] * 4] * 2 + [[0.0] * 4] * 2)
    torch.testing.assert_close(d.maps["early"], expected_early)
    torch.testing.assert_close(d.maps["deep"], torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    raw = depth_maps(_hand_weighted(), _image(), ["early"], relu=False)
    torch.testing.assert_close(raw.maps["early"], expected_early - 0.25)  # (R - 0.5) / 2
    torch.testing.assert_close(d.image, _image())  # identity preprocessing, back in pixels
    summary = d.to_dict()
    assert summary["model"] == "hand (by hand)"
    assert summary["layers"]["deep"] == {"shape": [2, 2, 2], "min": 0.0, "max": 0.5, "mean": 0.25}


def test_default_layers_resnet_and_random_init_is_named() -> None:
    bundle = convlens.load_model("resnet18", weights=None)
    d = depth_maps(bundle, convlens.sample_image())
    assert d.layers == ("layer1", "layer4")
    assert d.shapes == {"layer1": (64, 56, 56), "layer4": (512, 7, 7)}
    assert d.maps["layer1"].shape == (56, 56) and bool((d.maps["layer4"] >= 0).all())
    assert d.image.shape == (3, 224, 224) and 0 <= float(d.image.min()) <= float(d.image.max()) <= 1
    assert "random init" in d.model
    fig = cplot.depth_comparison(bundle, convlens.sample_image())
    assert isinstance(fig, Figure)
    assert "random init" in fig._suptitle.get_text()  # type: ignore[union-attr]
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == [
        "input 224x224",
        "layer1 (early)\n64 ch, 56x56",
        "layer4 (deep)\n512 ch, 7x7",
    ]


def test_efficientnet_lite0_default_layers_and_figure(tmp_path: Path) -> None:
    bundle = convlens.load_model("efficientnet_lite0")
    fig = cplot.depth_comparison(bundle, convlens.sample_image())
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == [
        "input 224x224",
        "blocks.1 (early)\n24 ch, 56x56",
        "blocks.5 (deep)\n192 ch, 7x7",
    ]
    assert len(fig.axes) == 5  # 3 panels and 2 colour bars
    title = fig._suptitle.get_text()  # type: ignore[union-attr]
    assert title.startswith("efficientnet_lite0 (ImageNet weights") and "ReLU" in title
    # the input panel shows the model's crop in pixel space, not the normalised tensor
    shown = panels[0].images[0].get_array()
    assert shown.shape == (224, 224, 3) and shown.min() >= 0 and shown.max() <= 1
    path = cplot.save_figure(fig, tmp_path / "depth.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_googlenet_and_simple_cnn_defaults() -> None:
    g = convlens.load_model("googlenet", weights=None)
    d = depth_maps(g, torch.rand(3, 240, 240))
    assert d.layers == ("inception3a", "inception4e")
    assert d.shapes == {"inception3a": (256, 28, 28), "inception4e": (832, 14, 14)}
    s = depth_maps(convlens.load_model("simple_cnn"), torch.rand(3, 200, 150))
    assert s.layers == ("bn1", "bn3") and s.shapes["bn3"] == (64, 32, 32)


def test_layers_given_explicitly_three_deep() -> None:
    bundle = convlens.load_model("resnet18", weights=None)
    fig = cplot.depth_comparison(
        bundle, convlens.sample_image(), layers=["layer1", "layer2", "layer4"]
    )
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes if ax.images]
    assert titles == ["input 224x224", "layer1 (early)", "layer2", "layer4 (deep)"]


def test_a_result_is_drawn_as_it_is() -> None:
    d = depth_maps(_hand_weighted(), _image(), ["early", "deep"])
    fig = cplot.depth_comparison(d)
    assert [ax.get_title().split("\n")[0] for ax in fig.axes if ax.images] == [
        "input 4x4",
        "early (early)",
        "deep (deep)",
    ]
    with pytest.raises(ValueError, match="drop image and layers"):
        cplot.depth_comparison(d, _image())


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda b: depth_maps(b, _image(), ["early", "nope"]),
            convlens.LayerNotFoundError,
            "'nope'",
        ),
        (lambda b: depth_maps(b, _image() * 4 - 2), ValueError, "outside \\[0, 1\\]"),
        (lambda b: depth_maps(b, torch.rand(4, 4)), ValueError, "RGB image"),
        (lambda b: depth_maps(b, _image(), []), ValueError, "no layers"),
        (lambda b: depth_maps(b.model, _image()), TypeError, "ModelBundle"),
        (lambda b: cplot.depth_comparison(b), ValueError, "needs an image"),
    ],
)
def test_bad_input_says_the_fix(call, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call(_hand_weighted())


def test_a_layer_without_a_spatial_map_is_refused() -> None:
    bundle = convlens.load_model("simple_cnn")
    with pytest.raises(ValueError, match=r"'fc'.*not a feature map"):
        depth_maps(bundle, torch.rand(3, 64, 64), ["bn1", "fc"])


def test_depth_maps_is_exported() -> None:
    assert convlens.analysis.depth_maps is depth_maps
    assert convlens.analysis.DepthMaps is DepthMaps
