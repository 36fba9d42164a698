from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convlens
from convlens import LayerNotFoundError, SensitivityResult, sensitivity
from convlens.analysis.sensitivity import attribution_from_map, parse_target, window_starts


class OnesConvNet(nn.Module):
    """conv 1->1 3x3, every weight 1 (padding 1), ReLU, global mean, then two logits:
    +mean and -mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))

    def forward(self, x):
        return self.fc(self.gap(self.relu(self.conv(x))).flatten(1))


class LinearNet(nn.Module):
    """score = sum(w * x): a window's drop is the sum of w * (x - fill) over its pixels."""

    def __init__(self, c: int, h: int, w: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(1, c, h, w, generator=g))

    def forward(self, x):
        return (x * self.w).flatten(1).sum(dim=1, keepdim=True)


def _no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


# ------------------------------------------------------------------ hand-computed


@pytest.mark.parametrize("method", ["incremental", "naive"])
def test_map_equals_hand_computed_values(method):
    # On a 6x6 image of ones, the 3x3 ones-conv output at (i, j) counts the in-image
    # pixels around it, so the sum of the map is sum over pixels of a_r * a_c with
    # a = [2, 3, 3, 3, 3, 2] (neighbours within the image along one axis), i.e. 16^2.
    # A 2x2 window at rows 2i..2i+1, columns 2j..2j+1 removes p_i * p_j of it, with
    # p = [5, 6, 5] the sums of a over the window's rows (and columns). Score = mean.
    net = OnesConvNet()
    x = torch.ones(1, 6, 6)
    r = _no_warnings(sensitivity, net, x, 0, window=2, stride=2, method=method)
    p = torch.tensor([5.0, 6.0, 5.0])
    expected = torch.outer(p, p) / 36
    assert r.method == method and r.exact
    assert r.score == pytest.approx(256 / 36)
    torch.testing.assert_close(r.map, expected)
    # The second logit is minus the first: the drops change sign.
    r1 = _no_warnings(sensitivity, net, x, 1, window=2, stride=2, method=method)
    torch.testing.assert_close(r1.map, -expected)
    # The channel mean of the conv layer is the same number as logit 0.
    rc = _no_warnings(sensitivity, net, x, "conv:0", window=2, stride=2, method=method)
    torch.testing.assert_close(rc.map, expected)
    # Windows do not overlap: each pixel's attribution is its window's drop.
    torch.testing.assert_close(
        rc.attribution, expected.repeat_interleave(2, 0).repeat_interleave(2, 1)
    )
    assert r.occluded_scores[1, 1] == pytest.approx(256 / 36 - 1)


def test_overlapping_windows_average_in_the_attribution():
    # Windows 4 px at stride 2 on 6 px: starts 0 and 2; rows 2-3 lie in both.
    net = OnesConvNet()
    x = torch.zeros(1, 6, 6)
    x[0, 0, 0] = 1.0  # one bright pixel: only windows over it, or within the conv's reach
    r = _no_warnings(sensitivity, net, x, 0, window=4, stride=2)
    # conv of one pixel at (0, 0) spreads 1 over its 4 in-image neighbours; the mean is 4/36.
    # Only windows covering pixel (0, 0), i.e. starting at row 0 and column 0, remove it.
    torch.testing.assert_close(r.map, torch.tensor([[4 / 36, 0.0], [0.0, 0.0]]))
    a = r.attribution
    assert a[0, 0] == pytest.approx(4 / 36)  # one window covers it
    assert a[2, 0] == pytest.approx(2 / 36)  # two windows (rows 0-3 and 2-5), mean of 4/36, 0
    assert a[2, 2] == pytest.approx(1 / 36)  # four windows, one with the drop
    assert a[5, 5] == pytest.approx(0.0)


# ------------------------------------------------------------------ Captum's placement


def test_window_starts_as_captum_places_them():
    assert window_starts(224, 32, 16) == list(range(0, 193, 16))  # 13 windows
    assert window_starts(70, 32, 16) == [0, 16, 32, 48]  # the last one cut to 48..70
    assert window_starts(5, 2, 2) == [0, 2, 4]
    assert window_starts(32, 32, 100) == [0]  # one window covers it all: any stride
    for size, win, stride in [(11, 4, 3), (9, 3, 2), (17, 5, 5), (8, 8, 1), (13, 6, 4)]:
        n = math.ceil((size - win) / stride) + 1  # Captum's shift count
        assert window_starts(size, win, stride) == [i * stride for i in range(n)]
        assert window_starts(size, win, stride)[-1] + win >= size


def _captum_attribution(net, x, window, stride, baseline):
    """Captum's Occlusion, written out: masks placed by F.pad of a window of ones (a
    negative pad cuts a window at the border), drop = f(x) - f(ablated), each pixel the
    sum of its windows' drops over their count."""
    H, W = x.shape[-2:]
    ny = math.ceil((H - window[0]) / stride[0]) + 1
    nx = math.ceil((W - window[1]) / stride[1]) + 1
    total = torch.zeros(H, W, dtype=torch.float64)
    count = torch.zeros(H, W, dtype=torch.float64)
    with torch.no_grad():
        f0 = net(x[None])[0, 0].double()
        for i in range(ny):
            for j in range(nx):
                y0, x0 = i * stride[0], j * stride[1]
                pads = (x0, W - window[1] - x0, y0, H - window[0] - y0)
                mask = F.pad(torch.ones(window), pads)
                ablated = x * (1 - mask) + baseline * mask
                drop = f0 - net(ablated[None])[0, 0].double()
                total += drop * mask
                count += mask
    return (total / count).float()


@pytest.mark.parametrize("method", ["incremental", "naive"])
@pytest.mark.parametrize(
    ("size", "window", "stride"), [((11, 9), (4, 3), (3, 2)), ((10, 10), (4, 4), (4, 4))]
)
def test_border_windows_and_attribution_match_captums_definition(size, window, stride, method):
    H, W = size
    net = LinearNet(2, H, W)
    x = torch.randn(2, H, W, generator=torch.Generator().manual_seed(1))
    r = _no_warnings(sensitivity, net, x, 0, window=window, stride=stride, method=method)
    ys = window_starts(H, window[0], stride[0])
    xs = window_starts(W, window[1], stride[1])
    assert r.ys == tuple(ys) and r.xs == tuple(xs)
    assert ys[-1] + window[0] > H  # the last row of windows is cut by the border
    # The drop of a linear score is the window's own w * x, cut at the border.
    with torch.no_grad():
        wx = (net.w[0] * x).sum(dim=0)
    expected = torch.tensor(
        [[float(wx[y : y + window[0], x0 : x0 + window[1]].sum()) for x0 in xs] for y in ys]
    )
    torch.testing.assert_close(r.map, expected, atol=1e-5, rtol=1e-5)
    captum = _captum_attribution(net, x, window, stride, torch.zeros_like(x))
    torch.testing.assert_close(r.attribution, captum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        attribution_from_map(r.map, ys, xs, window, (H, W)), r.attribution, atol=0, rtol=0
    )


# ------------------------------------------------------------------ exact = naive loop


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def _naive_loop(model, x, score, window, stride):
    """The plain sliding-window evaluation, one forward per window."""
    H, W = x.shape[-2:]
    ys, xs = window_starts(H, window, stride), window_starts(W, window, stride)
    with torch.no_grad():
        s0 = score(model(x[None]))[0]
        rows = []
        for y in ys:
            row = []
            for x0 in xs:
                xo = x.clone()
                xo[:, y : y + window, x0 : x0 + window] = 0
                row.append(float(s0 - score(model(xo[None]))[0]))
            rows.append(row)
    return torch.tensor(rows)


def test_resnet18_exact_method_matches_a_naive_loop(resnet18):
    x = torch.randn(3, 76, 76, generator=torch.Generator().manual_seed(2))
    r = _no_warnings(sensitivity, resnet18, x, 7, window=24, stride=16, batch_size=5)
    assert r.method == "incremental" and r.exact
    assert r.map.shape == (5, 5)  # starts 0, 16, 32, 48, 64: the last cut to 12 px
    expected = _naive_loop(resnet18, x, lambda out: out[:, 7], 24, 16)
    assert float((r.map - expected).abs().max()) < 1e-4
    assert float(expected.abs().max()) > 1e-3  # the comparison is not vacuous


def test_resnet18_layer_target_matches_naive(resnet18):
    x = torch.randn(3, 80, 72, generator=torch.Generator().manual_seed(3))
    a = _no_warnings(sensitivity, resnet18, x, "layer2:0", window=20, stride=12)
    b = _no_warnings(sensitivity, resnet18, x, "layer2:0", window=20, stride=12, method="naive")
    assert a.method == "incremental" and b.method == "naive"
    assert float((a.map - b.map).abs().max()) < 1e-5
    assert float(a.map.abs().max()) > 1e-4
    assert a.score == pytest.approx(b.score, abs=1e-6)


def test_bottleneck_and_grouped_resnet_exact():
    # Bottleneck blocks (1x1, 3x3, 1x1, downsample) with grouped 3x3 convs, ResNeXt style.
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    net = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5, groups=2, width_per_group=16).eval()
    x = torch.randn(3, 64, 56, generator=torch.Generator().manual_seed(12))
    a = _no_warnings(sensitivity, net, x, 4, window=16, stride=12)
    b = _no_warnings(sensitivity, net, x, 4, window=16, stride=12, method="naive")
    assert a.method == "incremental"
    assert float((a.map - b.map).abs().max()) < 1e-5
    assert float(b.map.abs().max()) > 1e-4


class TFSame(nn.Module):
    """timm's TF-"same" layers: the padding depends on the input size, and is uneven
    (more at the bottom and right) for stride 2 on these sizes."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import Conv2dSame
        from timm.layers.pool2d_same import MaxPool2dSame

        self.conv1 = Conv2dSame(3, 8, 3, stride=2)
        self.pool = MaxPool2dSame(3, stride=2)
        self.conv2 = Conv2dSame(8, 8, 4, stride=1)  # even kernel: uneven padding at stride 1
        self.conv3 = Conv2dSame(8, 8, 3, stride=2, groups=8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.conv3(torch.relu(self.conv2(x))) + 0.5
        return self.fc(x.mean(dim=(2, 3)))


def test_same_padding_golden_values():
    from convlens.analysis._incremental import _same_padding

    # total = max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0); the top gets total // 2
    assert _same_padding(224, 3, 2, 1) == 0  # total 1, all of it at the bottom
    assert _same_padding(17, 3, 2, 1) == 1  # total 2
    assert _same_padding(9, 4, 1, 1) == 1  # total 3: 1 at the top, 2 at the bottom
    assert _same_padding(10, 5, 1, 2) == 4  # dilated: total 8
    assert _same_padding(8, 1, 2, 1) == 0


@pytest.mark.parametrize("size", [(37, 41), (40, 40)])
def test_tf_same_padding_layers_are_incremental_and_exact(size):
    torch.manual_seed(0)
    net = TFSame().eval()
    x = torch.randn(3, *size, generator=torch.Generator().manual_seed(5))
    a = _no_warnings(sensitivity, net, x, 1, window=9, stride=5)
    b = _no_warnings(sensitivity, net, x, 1, window=9, stride=5, method="naive")
    assert a.method == "incremental"
    assert float((a.map - b.map).abs().max()) < 1e-5
    assert float(b.map.abs().max()) > 1e-4


def test_efficientnet_lite0_runs_incrementally_and_exactly():
    # timm's Lite0 uses Conv2dSame, which fx cannot trace into: it stays a leaf.
    torch.manual_seed(0)
    bundle = convlens.load_model("efficientnet_lite0", weights=None)
    x = torch.randn(3, 96, 96, generator=torch.Generator().manual_seed(6))
    kw = {"window": 32, "stride": 32}
    a = _no_warnings(sensitivity, bundle.model, x, 7, **kw)
    b = _no_warnings(sensitivity, bundle.model, x, 7, method="naive", **kw)
    assert a.method == "incremental"
    assert float((a.map - b.map).abs().max()) < 1e-5
    assert float(b.map.abs().max()) > 1e-5


class StdConv(nn.Conv2d):
    """A convolution with its own forward (weight standardisation, as timm's StdConv2d)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class WithStdConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.std = StdConv(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.std(torch.relu(self.conv1(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("fill", ["zero", "mean", "blur", "black"])
def test_fills_incremental_equals_naive(fill):
    torch.manual_seed(0)
    net = convlens.SimpleCNN(num_classes=4).eval()
    x = torch.randn(3, 40, 40, generator=torch.Generator().manual_seed(4))
    kw = {"window": 12, "stride": 8, "fill": fill, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2)}
    a = _no_warnings(sensitivity, net, x, 2, **kw)
    b = _no_warnings(sensitivity, net, x, 2, method="naive", **kw)
    assert float((a.map - b.map).abs().max()) < 1e-5
    assert float(a.map.abs().max()) > 0


def test_fill_values_reach_the_model():
    # A linear score sees exactly what replaced the window.
    H = W = 8
    net = LinearNet(3, H, W)
    x = torch.rand(3, H, W, generator=torch.Generator().manual_seed(5))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    black = torch.tensor([-m / s for m, s in zip(mean, std)]).view(3, 1, 1)
    for fill, value in [("zero", torch.zeros(3, 1, 1)), ("black", black),
                        ("mean", x.mean(dim=(1, 2), keepdim=True))]:  # fmt: skip
        r = sensitivity(net, x, 0, window=4, stride=4, fill=fill, mean=mean, std=std)
        with torch.no_grad():
            d = (net.w[0] * (x - value))[:, 4:8, 0:4].sum()
        assert float(r.map[1, 0]) == pytest.approx(float(d), abs=1e-5)


def test_batch_sizes_and_window_parallel_agree(resnet18):
    # 49 windows: one at a time, all in one batch (split across the CPU threads, one part
    # per thread), and automatic batches give the same map.
    x = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    maps = [
        sensitivity(resnet18, x, 1, window=16, stride=8, batch_size=b).map for b in (1, 49, "auto")
    ]
    assert torch.get_num_threads() == threads
    for m in maps[1:]:
        assert float((m - maps[0]).abs().max()) < 1e-5


# ------------------------------------------------------------------ fallbacks


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x)
        if h.sum() > 1e9:
            h = h * 0
        return self.fc(h.mean(dim=(2, 3)))


class WithUpsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2.0, mode="bilinear")
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv2(self.up(self.down(torch.relu(self.conv1(x)))))
        return self.fc(h.mean(dim=(2, 3)))


def test_untraceable_model_falls_back_with_one_notice():
    net = Branchy().eval()
    x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(7))
    with pytest.warns(UserWarning, match="cannot trace") as rec:
        r = sensitivity(net, x, 0, window=8, stride=4)
    assert len(rec) == 1 and len(str(rec[0].message).splitlines()) == 1
    assert r.method == "naive"
    ref = sensitivity(net, x, 0, window=8, stride=4, method="naive")
    torch.testing.assert_close(r.map, ref.map)


@pytest.mark.parametrize(
    ("make", "size", "target", "window", "match"),
    [
        (lambda: WithUpsample(), 24, 1, 8, r"cannot bound.*up"),
        # a conv subclass with its own forward is not misread as a plain conv
        (lambda: WithStdConv(), 20, 0, 6, r"cannot bound.*std \(StdConv\)"),
    ],
    ids=["upsample", "conv-subclass"],
)
def test_module_it_cannot_bound_is_recomputed_in_full_with_a_notice(
    make, size, target, window, match
):
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(3, size, size, generator=torch.Generator().manual_seed(8))
    with pytest.warns(UserWarning, match=match) as rec:
        r = sensitivity(net, x, target, window=window, stride=4)
    assert len(rec) == 1 and len(str(rec[0].message).splitlines()) == 1
    assert r.method == "incremental"
    ref = sensitivity(net, x, target, window=window, stride=4, method="naive")
    assert float((r.map - ref.map).abs().max()) < 1e-5


class Flippy(nn.Module):
    """A forward that reads a plain attribute: torch.fx bakes it into the trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        self.double = False

    def forward(self, x):
        h = self.conv(x)
        if self.double:
            h = torch.relu(h) * 2
        return self.fc(h.mean(dim=(2, 3)))


def test_a_kept_trace_that_went_stale_is_retraced():
    torch.manual_seed(0)
    net = Flippy().eval()
    x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(13))
    first = _no_warnings(sensitivity, net, x, 0, window=8, stride=4)
    net.double = True  # the kept trace no longer matches the model's forward
    second = _no_warnings(sensitivity, net, x, 0, window=8, stride=4)
    ref = sensitivity(net, x, 0, window=8, stride=4, method="naive")
    assert second.method == "incremental"
    assert float((second.map - ref.map).abs().max()) < 1e-6
    assert float((second.map - first.map).abs().max()) > 1e-4


def test_approximate_is_labelled_and_close_on_resnet(resnet18):
    x = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(9))
    exact = sensitivity(resnet18, x, 3, window=16, stride=16)
    approx = sensitivity(resnet18, x, 3, window=16, stride=16, approximate=0.5)
    assert exact.exact and not approx.exact
    assert approx.settings["approximate"] == 0.5
    assert approx.to_dict()["exact"] is False
    assert torch.isfinite(approx.map).all()
    assert approx.score == exact.score


# ------------------------------------------------------------------ hygiene


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_modes_restored_and_no_hooks_left(resnet18):
    model = torchvision.models.resnet18()
    model.train()
    model.layer1[0].bn1.eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    x = torch.randn(3, 48, 48, generator=torch.Generator().manual_seed(10))
    for method in ("incremental", "naive"):
        sensitivity(model, x, "layer1:3", window=16, stride=16, method=method)
        assert [m.training for m in model.modules()] == flags
        assert _hooks(model) == 0
    with pytest.raises(ValueError, match="64 channels"):
        sensitivity(model, x, "layer1:99", window=16, stride=16)
    assert [m.training for m in model.modules()] == flags
    assert _hooks(model) == 0
    # BatchNorm statistics untouched (eval mode throughout)
    assert float(model.bn1.running_mean.abs().max()) == 0.0


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("spec", ["layer2:", "layer2:x", "banana", ":3", "layer2:-1", "", "3.5"])
def test_bad_target_spec_says_what_is_expected(spec):
    with pytest.raises(ValueError, match=r"class index .* or 'layer:channel'"):
        parse_target(spec)


def test_bad_targets(resnet18):
    x = torch.randn(3, 32, 32)
    with pytest.raises(ValueError, match="class index"):
        sensitivity(resnet18, x, "layer2", window=16)
    with pytest.raises(TypeError, match="class index"):
        sensitivity(resnet18, x, 3.0, window=16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1000 classes"):
        sensitivity(resnet18, x, 1000, window=16)
    with pytest.raises(ValueError, match="negative"):
        sensitivity(resnet18, x, -1, window=16)


def test_unknown_layer_lists_close_matches(resnet18):
    with pytest.raises(LayerNotFoundError, match=r"'layer5'.*closest names.*'layer4'"):
        sensitivity(resnet18, torch.randn(3, 32, 32), "layer5:0", window=16)


def test_window_larger_than_the_image(resnet18):
    with pytest.raises(ValueError, match=r"window 48x48 is larger than the input \(32x40"):
        sensitivity(resnet18, torch.randn(3, 32, 40), 0, window=48)
    with pytest.raises(ValueError, match="window 8x50"):
        sensitivity(resnet18, torch.randn(3, 32, 40), 0, window=(8, 50))


def test_other_bad_settings(resnet18):
    x = torch.randn(3, 32, 32)
    with pytest.raises(ValueError, match="stride 20 is larger than the window 16"):
        sensitivity(resnet18, x, 0, window=16, stride=20)
    with pytest.raises(ValueError, match="needs the input normalisation"):
        sensitivity(resnet18, x, 0, window=16, fill="black")
    with pytest.raises(ValueError, match="unknown fill"):
        sensitivity(resnet18, x, 0, window=16, fill="grey")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="approximate must be in"):
        sensitivity(resnet18, x, 0, window=16, approximate=0)
    with pytest.raises(ValueError, match="batch_size"):
        sensitivity(resnet18, x, 0, window=16, batch_size=0)
    with pytest.raises(ValueError, match="one image"):
        sensitivity(resnet18, torch.randn(2, 3, 32, 32), 0, window=16)
    with pytest.raises(ValueError, match="runs 3 times"):
        sensitivity(convlens.SimpleCNN(), torch.randn(3, 32, 32), "pool:0", window=16)


def test_repeated_module_by_call():
    torch.manual_seed(0)
    net = convlens.SimpleCNN().eval()
    x = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(11))
    a = _no_warnings(sensitivity, net, x, "pool#1:2", window=8, stride=8)
    b = _no_warnings(sensitivity, net, x, "pool#1:2", window=8, stride=8, method="naive")
    torch.testing.assert_close(a.map, b.map, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ bundle and result


def test_bundle_normalisation_labels_and_json(tmp_path):
    bundle = convlens.load_model("simple_cnn", weights=None)
    img = convlens.sample_image(48)
    r = _no_warnings(
        sensitivity, bundle, bundle.preprocess(img), 0, window=32, stride=32, fill="black"
    )
    assert isinstance(r, SensitivityResult)
    assert r.mean == tuple(bundle.normalize[0])
    assert r.model_name == bundle.description
    shown = r.display_image()
    assert shown.shape == r.input.shape and 0 <= float(shown.min()) <= float(shown.max()) <= 1
    data = json.loads(r.save(tmp_path).read_text())
    assert data["map"] == r.map.tolist()
    assert data["window"] == [32, 32] and data["stride"] == [32, 32]
    assert data["fill"] == "black" and data["method"] == "incremental" and data["exact"]
    assert data["window_tops"] == list(r.ys)
    assert data["versions"]["torch"] == torch.__version__
    assert data["largest_drop"]["drop"] == pytest.approx(float(r.map.max()))
