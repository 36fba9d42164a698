"""BatchNorm folding for renders: equal outputs, the user's model untouched, safe fallback."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from convlens.analysis.featurevis import objectives as obj
from convlens.analysis.featurevis import render
from convlens.analysis.featurevis._fold import fold_batchnorm
from convlens.analysis.featurevis.render import _fold_checked
from convlens.models import load_model


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def test_folded_resnet18_gives_the_same_outputs_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 64, 64)
    folded, n = fold_batchnorm(model, x[:1])
    assert n == 20  # bn1, two per basic block, three downsample BatchNorms
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20


def test_timm_batchnorm_act_keeps_its_activation():
    bundle = load_model("efficientnet_lite0")
    x = torch.rand(1, 3, 96, 96)
    folded, n = fold_batchnorm(bundle.model, x)
    assert n == 49  # every BatchNormAct2d, also after timm's Conv2dSame
    assert folded.get_submodule("blocks.4.0.bn1.act") is not None  # names kept
    with torch.no_grad():
        assert torch.allclose(folded(x), bundle.model(x), atol=1e-3, rtol=1e-3)


def test_keep_leaves_a_read_convolution_unfolded():
    net = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    assert fold_batchnorm(net, torch.rand(1, 3, 8, 8), keep={"0"}) is None
    folded, n = fold_batchnorm(net, torch.rand(1, 3, 8, 8))
    assert n == 1 and isinstance(folded[1], nn.Identity)


class SkipFromConv(nn.Module):
    """The conv output feeds the BatchNorm and a skip: folding would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.out = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.out(self.bn(y) + y)


def test_unequal_copy_falls_back_to_the_model():
    model = randomize_bn(SkipFromConv())
    x = torch.rand(1, 3, 16, 16)
    assert fold_batchnorm(model, x) is not None  # the pair is found ...
    net, n = _fold_checked(model, obj.channel("out", 0), x, channels_last=True)
    assert net is model and n == 0  # ... but the check refuses the copy
    r = render(model, "out:0", size=16, steps=3, progress=False)
    assert r.settings["folded_batchnorms"] == 0


def test_render_with_and_without_folding_agree():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18())
    kw = dict(size=32, steps=4, transforms="none", progress=False, precision="float32")
    a = render(model, "layer1:0-1", **kw)
    b = render(model, "layer1:0-1", fold_bn=False, **kw)
    assert a.settings["folded_batchnorms"] == 20 and b.settings["folded_batchnorms"] == 0
    assert torch.allclose(a.images, b.images, atol=1e-3)
    assert torch.allclose(a.values, b.values, rtol=1e-3, atol=1e-3)
