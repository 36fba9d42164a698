from __future__ import annotations

import json
import math

import pytest
import torch
import torchvision
from torch import nn

from convlens import occlude
from convlens.analysis.occlusion import IMAGENET_MEAN, IMAGENET_STD, apply_fill, box_at_resolution


class BoxBlurNet(nn.Module):
    """conv 3->1, 3x3, every weight 1/27 (padding 1), then a 2x2 max-pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / 27.0)

    def forward(self, x):
        return self.pool(self.conv(x))


def test_inside_fraction_golden_on_hand_weighted_net():
    x = torch.ones(3, 8, 8)
    r = occlude(BoxBlurNet(), x, box=(3, 5, 3, 5), layers=["conv", "pool"])
    conv = r.layers["conv"]
    # Each occluded pixel lowers the 9 outputs around it by 3/27 = 1/9: the change is the
    # 2x2 box convolved with a 3x3 of ones (corners 1, edges 2, inside 4) / 9. Total 4*9/9,
    # inside the box 4*4/9, so inside_fraction = 16/36 = 4/9.
    expected = torch.zeros(8, 8)
    expected[2:6, 2:6] = (
        torch.tensor([[1, 2, 2, 1], [2, 4, 4, 2], [2, 4, 4, 2], [1, 2, 2, 1]], dtype=torch.float32)
        / 9
    )
    torch.testing.assert_close(conv.diff, expected)
    assert conv.inside_fraction == pytest.approx(4 / 9)
    assert conv.area_fraction == pytest.approx(4 / 64)
    assert conv.box == (3, 5, 3, 5)
    # After the 2x2 max-pool: every 2x2 block around the box keeps its untouched maximum
    # minus 1/9 (e.g. block rows 2-3, cols 2-3 has max 1 - 1/9), and those 4 blocks are
    # exactly the box at 4x4 resolution: rows/cols floor(3/2)=1 .. ceil(5/2)=3.
    pool = r.layers["pool"]
    exp_pool = torch.zeros(4, 4)
    exp_pool[1:3, 1:3] = 1 / 9
    torch.testing.assert_close(pool.diff, exp_pool)
    assert pool.box == (1, 3, 1, 3)
    assert pool.inside_fraction == pytest.approx(1.0)
    assert pool.area_fraction == pytest.approx(0.25)


def test_identity_network_keeps_all_change_inside():
    net = nn.Sequential(nn.Identity())
    r = occlude(net, torch.rand(3, 20, 30) + 0.1, box=(2, 9, 5, 17), layers=["0"])
    assert r.inside_fraction["0"] == pytest.approx(1.0)
    assert r.area_fraction["0"] == pytest.approx(7 * 12 / 600)


def test_no_change_gives_nan_and_null_in_json(tmp_path):
    net = nn.Sequential(nn.Identity())
    r = occlude(net, torch.zeros(3, 8, 8), box=(0, 4, 0, 4), layers=["0"])
    assert math.isnan(r.inside_fraction["0"])
    data = json.loads(r.save(tmp_path).read_text())
    assert data["layers"]["0"]["inside_fraction"] is None
    assert data["layers"]["0"]["area_fraction"] == 0.25
    assert data["versions"]["torch"] == torch.__version__


def test_box_at_resolution():
    assert box_at_resolution((30, 90, 40, 110), (224, 224), (112, 112)) == (15, 45, 20, 55)
    assert box_at_resolution((30, 90, 40, 110), (224, 224), (7, 7)) == (0, 3, 1, 4)
    assert box_at_resolution((0, 1, 0, 1), (224, 224), (7, 7)) == (0, 1, 0, 1)  # never empty
    assert box_at_resolution((223, 224, 223, 224), (224, 224), (1, 1)) == (0, 1, 0, 1)


@pytest.mark.parametrize("box", [(10, 5, 0, 4), (0, 300, 0, 4), (-1, 4, 0, 4), (0, 4, 0)])
def test_invalid_boxes(box):
    with pytest.raises(ValueError, match="box"):
        occlude(nn.Sequential(nn.Identity()), torch.rand(3, 16, 16), box=box, layers=["0"])


def test_fills():
    x = torch.randn(3, 16, 16)
    box = (4, 10, 2, 8)
    inside = (slice(None), slice(4, 10), slice(2, 8))
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[4:10, 2:8] = False
    for fill in ("zero", "black", "mean", "blur"):
        y = apply_fill(x, box, fill)
        assert torch.equal(y[:, outside], x[:, outside]), fill
    assert torch.equal(apply_fill(x, box, "zero")[inside], torch.zeros(3, 6, 6))
    black = apply_fill(x, box, "black")[inside]
    for c in range(3):
        # true black: un-normalising gives 0
        assert black[c] * IMAGENET_STD[c] + IMAGENET_MEAN[c] == pytest.approx(
            torch.zeros(6, 6), abs=1e-6
        )
    mean = apply_fill(x, box, "mean")[inside]
    torch.testing.assert_close(mean, x.mean(dim=(1, 2))[:, None, None].expand(3, 6, 6))
    blur = apply_fill(x, box, "blur", blur_sigma=2.0)[inside]
    assert blur.std() < x[inside].std()  # smoothed
    assert apply_fill(x, box, "blur")[inside].std() < blur.std()  # default sigma 8 > 16 px image
    with pytest.raises(ValueError, match="unknown fill"):
        apply_fill(x, box, "white")  # type: ignore[arg-type]
    assert not torch.equal(x[inside], torch.zeros(3, 6, 6))  # input untouched


def test_resnet18_early_layer_keeps_change_in_the_box():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(3, 224, 224)
    r = occlude(model, x, box=(30, 90, 40, 110), layers=["bn1", "layer4"])
    bn1 = r.layers["bn1"]
    assert bn1.box == (15, 45, 20, 55) and bn1.shape == (64, 112, 112)
    assert bn1.inside_fraction > 0.8 and bn1.inside_fraction > 8 * bn1.area_fraction
    l4 = r.layers["layer4"]
    assert l4.area_fraction < l4.inside_fraction < bn1.inside_fraction
    orig, occ = r.display_images()
    assert orig.min() >= 0 and occ.max() <= 1


def test_linear_layer_is_rejected():
    model = torchvision.models.resnet18()
    with pytest.raises(ValueError, match="not a feature map"):
        occlude(model, torch.randn(3, 64, 64), box=(0, 8, 0, 8), layers=["fc"])


def test_batch_input_is_rejected():
    with pytest.raises(ValueError, match="one image"):
        occlude(nn.Sequential(nn.Identity()), torch.rand(2, 3, 8, 8), (0, 2, 0, 2), ["0"])
