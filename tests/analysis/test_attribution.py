"""convlens.attribute: the gradient family against closed forms, integrated gradients'
completeness, targets, batching, model forms and hygiene."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convlens
from convlens.analysis.attribution import METHODS, Attribution, _core, attribute
from convlens.analysis.attribution.gradients import ig_points
from convlens.errors import LayerNotFoundError
from convlens.models.forms import HOOK_TABLES

# ------------------------------------------------------------------ tiny models


class Cubic(nn.Module):
    """f(x)[c] = (c + 1) * sum(x ** 3): the gradient is 3 (c + 1) x^2, IG is (c + 1) x^3."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x**3).flatten(1).sum(dim=1, keepdim=True)
        return s * self.scale


class Linear2(nn.Module):
    """A 1x1 conv then a linear head, hand weighted: f(x)[k] = sum_c v[k,c] * mean(W_c x)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1, bias=False)
        self.head = nn.Linear(3, 2, bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(
                torch.tensor([[1.0, -1.0], [0.5, 2.0], [-3.0, 0.0]]).view(3, 2, 1, 1)
            )
            self.head.weight.copy_(torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.0, 1.0]]))
            self.head.bias.copy_(torch.tensor([0.3, -0.2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 3, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def tiny(seed: int = 0, **kw: int) -> TinyCNN:
    torch.manual_seed(seed)
    net = TinyCNN(**kw)
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.2, 0.2)
        net.bn1.running_var.uniform_(0.5, 1.5)
    return net.eval()


def plain_grad(net: nn.Module, x: torch.Tensor, cls: int) -> torch.Tensor:
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(xr)[:, cls].sum(), xr)
    return g


# ------------------------------------------------------------------ closed forms


def test_saliency_and_input_x_gradient_of_a_hand_weighted_model() -> None:
    net = Linear2().eval()
    x = torch.randn(2, 2, 3, 4)
    a = attribute(net, x, 0, method="saliency")
    # d f0 / d x[c, i, j] = sum_k v[0, k] W[k, c] / (H W)
    v = torch.tensor([1.0, 2.0, 0.5])
    W = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-3.0, 0.0]])
    per_channel = (v @ W) / 12  # [c]: (1 + 1 - 1.5, -1 + 4 + 0) / 12
    assert torch.allclose(per_channel, torch.tensor([0.5, 3.0]) / 12)
    expect = per_channel.view(1, 2, 1, 1).expand(2, 2, 3, 4)
    assert a.pixels is not None
    torch.testing.assert_close(a.pixels, expect)
    torch.testing.assert_close(a.map, expect.sum(dim=1))
    b = attribute(net, x, 0, method="input_x_gradient")
    torch.testing.assert_close(b.pixels, x * expect)
    torch.testing.assert_close(b.score, net(x)[:, 0].detach())
    assert a.delta is None and b.delta is None


def test_integrated_gradients_of_a_cubic_are_exact_with_gauss_legendre() -> None:
    net = Cubic()
    x = torch.randn(3, 1, 2, 2)
    for cls in (0, 1):
        a = attribute(net, x, cls, method="integrated_gradients", steps=2)  # exact for degree 3
        torch.testing.assert_close(a.pixels, (cls + 1) * x**3, rtol=1e-5, atol=1e-6)
        assert a.delta is not None and float(a.delta.abs().max()) < 1e-5
        assert a.steps == 2


def test_the_trapezoid_rule_matches_its_hand_sum() -> None:
    net = Cubic()
    x = torch.randn(1, 1, 2, 2)
    n = 5
    a = attribute(net, x, 0, method="integrated_gradients", steps=n, rule="riemann_trapezoid")
    h = 1 / (n - 1)
    integral = h * (sum((k * h) ** 2 for k in range(n)) - 0.5 * (0.0 + 1.0))  # of alpha^2
    torch.testing.assert_close(a.pixels, 3 * integral * x**3, rtol=1e-5, atol=1e-6)
    # the trapezoid overestimates the integral of alpha^2 (1/3): the error is the delta
    assert integral > 1 / 3
    torch.testing.assert_close(
        a.delta, (3 * integral - 1) * (x**3).sum().view(1), rtol=1e-4, atol=1e-6
    )


def test_ig_points_are_captums() -> None:
    a, w = ig_points(4)
    assert abs(float(w.sum()) - 1) < 1e-12 and bool(((a > 0) & (a < 1)).all())
    # Gauss-Legendre integrates alpha^7 exactly with 4 nodes
    assert abs(float((w * a**7).sum()) - 1 / 8) < 1e-12
    a, w = ig_points(3, "riemann_trapezoid")
    assert a.tolist() == [0.0, 0.5, 1.0] and w.tolist() == [0.25, 0.5, 0.25]
    with pytest.raises(ValueError, match="unknown integration rule"):
        ig_points(3, "simpson")


# ------------------------------------------------------------------ a trained SimpleCNN


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """SimpleCNN trained for a few steps to tell vertical from horizontal stripes."""
    g = torch.Generator().manual_seed(0)
    n = 64
    phase = torch.randint(0, 4, (n,), generator=g)
    idx = torch.arange(32)
    imgs, labels = [], []
    for i in range(n):
        stripe = ((idx + phase[i]) // 4 % 2).float()
        img = stripe.view(1, 32).expand(32, 32) if i % 2 else stripe.view(32, 1).expand(32, 32)
        imgs.append((img - 0.5).expand(3, 32, 32) + 0.1 * torch.randn(3, 32, 32, generator=g))
        labels.append(i % 2)
    x, y = torch.stack(imgs), torch.tensor(labels)
    torch.manual_seed(0)
    net = convlens.SimpleCNN(num_classes=2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    assert float((net(x).argmax(1) == y).float().mean()) > 0.9
    net.zero_grad(set_to_none=True)
    return net


def test_integrated_gradients_completeness_on_a_trained_simple_cnn(trained: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    a = attribute(trained, x, 1, method="integrated_gradients", steps=32, tolerance=0.01)
    assert a.delta is not None and a.steps is not None and a.steps >= 32
    base = trained(torch.zeros(1, 3, 32, 32))[0, 1]
    change = trained(x)[:, 1] - base
    assert bool((a.delta.abs() <= 0.01 * change.abs()).all())
    # completeness: the attribution sums to f(x) - f(0) up to delta
    torch.testing.assert_close(
        a.map.double().sum(dim=(1, 2)), (change.detach() + a.delta).double(), rtol=1e-4, atol=1e-4
    )
    assert a.settings["steps"] == a.steps and a.settings["tolerance"] == 0.01
    # more steps never make the error larger here: tolerance doubled from 32
    assert math.log2(a.steps / 32).is_integer()


# ------------------------------------------------------------------ targets


def test_targets_class_list_top1_units_and_callables() -> None:
    net = tiny()
    x = torch.randn(3, 3, 8, 8)
    top = net(x).argmax(1)
    a = attribute(net, x, method="saliency")
    assert a.target == tuple(str(int(c)) for c in top)
    for i in range(3):
        torch.testing.assert_close(a.pixels[i], plain_grad(net, x[i : i + 1], int(top[i]))[0])
    b = attribute(net, x, [0, 2, 1], method="saliency")
    torch.testing.assert_close(b.pixels[1], plain_grad(net, x[1:2], 2)[0])
    # a channel's mean, a neuron, per image neurons, and a callable
    xr = x.clone().requires_grad_(True)
    acts = {}
    h = net.conv2.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o.clone()))
    net(xr)
    h.remove()
    (g_ch,) = torch.autograd.grad(acts["a"][:, 5].mean(dim=(1, 2)).sum(), xr, retain_graph=True)
    c = attribute(net, x, "conv2:5", method="saliency")
    torch.testing.assert_close(c.pixels, g_ch)
    torch.testing.assert_close(c.score, acts["a"][:, 5].mean(dim=(1, 2)).detach())
    (g_n,) = torch.autograd.grad(acts["a"][:, 5, 2, 3].sum(), xr, retain_graph=True)
    d = attribute(net, x, "conv2:5@2,3", method="saliency")
    torch.testing.assert_close(d.pixels, g_n)
    e = attribute(net, x, ["conv2:1@0,0", "conv2:5@2,3", "conv2:7@7,7"], method="saliency")
    (g0,) = torch.autograd.grad(acts["a"][0, 1, 0, 0], xr, retain_graph=True)
    (g2,) = torch.autograd.grad(acts["a"][2, 7, 7, 7], xr, retain_graph=True)
    torch.testing.assert_close(e.pixels[0], g0[0])
    torch.testing.assert_close(e.pixels[1], g_n[1])
    torch.testing.assert_close(e.pixels[2], g2[2])
    f = attribute(net, x, lambda out: out[:, 0] - out[:, 1], method="saliency")
    torch.testing.assert_close(f.pixels, plain_grad(net, x, 0) - plain_grad(net, x, 1))
    assert f.target == ("callable",) * 3


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (7, "target class 7 is out of range: the model has 3 classes"),
        ("conv2:8", "target channel 8 is out of range: layer 'conv2' has 8 channels"),
        ("conv2:1@8,0", r"neuron position \(8, 0\) is outside the 8x8 map of layer 'conv2'"),
        ([0, 1], "2 targets for 3 image"),
        ("conv2", "expected a class index"),
        (["conv1:0", "conv2:0", "conv2:0"], "must all be classes or all read the same layer"),
    ],
)
def test_bad_targets_say_what_is_wrong(target: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        attribute(tiny(), torch.randn(3, 3, 8, 8), target, method="saliency")


def test_unknown_names_list_close_ones() -> None:
    net = tiny()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"unknown method 'gradcm'.*'gradcam'"):
        attribute(net, x, 0, method="gradcm")
    with pytest.raises(LayerNotFoundError, match="conv2"):
        attribute(net, x, "conv3:0", method="saliency")
    with pytest.raises(LayerNotFoundError, match="conv2"):
        attribute(net, x, 0, method="gradcam", layer="conv9")
    with pytest.raises(ValueError, match="needs a convolutional layer"):
        attribute(
            nn.Sequential(nn.Flatten(), nn.Linear(12, 2)),
            torch.randn(1, 3, 2, 2),
            0,
            method="gradcam",
        )
    with pytest.raises(ValueError, match="SmoothGrad"):
        attribute(net, x, 0, method="gradcam", samples=4)
    with pytest.raises(ValueError, match=r"unknown baseline 'blurr'.*'blur'"):
        attribute(net, x, 0, baseline="blurr")


# ------------------------------------------------------------------ SmoothGrad, baselines


def test_smoothgrad_is_seeded_and_averages_noisy_gradients() -> None:
    net = Cubic()
    x = torch.randn(2, 1, 3, 3)
    a = attribute(net, x, 0, method="saliency", samples=4, sigma=0.2, seed=3)
    b = attribute(net, x, 0, method="saliency", samples=4, sigma=0.2, seed=3, batch=3)
    torch.testing.assert_close(a.pixels, b.pixels)
    c = attribute(net, x, 0, method="saliency", samples=4, sigma=0.2, seed=4)
    assert not torch.allclose(a.pixels, c.pixels)
    # by hand: the mean over the same noise of 3 (x + n)^2
    from convlens.analysis.attribution.gradients import noise_for

    expect = sum(3 * (x + noise_for(x, s, 0.2, 3)) ** 2 for s in range(4)) / 4
    torch.testing.assert_close(a.pixels, expect)
    # sigma 0: the plain gradient
    d = attribute(net, x, 0, method="saliency", samples=2, sigma=0.0)
    torch.testing.assert_close(d.pixels, 3 * x**2)


def test_integrated_gradients_with_noise_and_baselines() -> None:
    net = Cubic()
    x = torch.randn(1, 1, 2, 2)
    base = torch.full((1, 2, 2), 0.5)
    a = attribute(net, x, 0, method="integrated_gradients", steps=2, baseline=base)
    torch.testing.assert_close(a.pixels, x**3 - 0.5**3, rtol=1e-5, atol=1e-6)
    n = attribute(net, x, 0, method="integrated_gradients", steps=2, samples=3, sigma=0.1)
    from convlens.analysis.attribution.gradients import noise_for

    expect = sum((x + noise_for(x, s, 0.1, 0)) ** 3 for s in range(3)) / 3
    torch.testing.assert_close(n.pixels, expect, rtol=1e-5, atol=1e-6)
    assert float(n.delta.abs().max()) < 1e-5  # completeness against the noisy inputs
    u1 = attribute(net, x, 0, method="integrated_gradients", steps=2, baseline="uniform", seed=1)
    u2 = attribute(net, x, 0, method="integrated_gradients", steps=2, baseline="uniform", seed=1)
    torch.testing.assert_close(u1.pixels, u2.pixels)
    with pytest.raises(ValueError, match="does not broadcast"):
        attribute(net, x, 0, baseline=torch.zeros(3, 5, 5))


# ------------------------------------------------------------------ batching and memory


def test_auto_batch_under_a_memory_cap_gives_the_same_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    net = tiny()
    x = torch.randn(3, 3, 8, 8)
    whole = attribute(net, x, 1, method="integrated_gradients", steps=16, batch=48)
    sizes: list[int] = []
    real = _core.auto_rows

    def spy(rows: int, per_row: float, device: torch.device, *, memory: int | None = None) -> int:
        got = real(rows, per_row, device, memory=memory)
        sizes.append(got)
        return got

    monkeypatch.setattr(
        _core,
        "available_memory",
        lambda device: int(3 * _core.row_bytes(net, (3, 8, 8), torch.float32) / _core.MEMORY_SHARE),
    )
    monkeypatch.setattr(_core, "auto_rows", spy)
    capped = attribute(net, x, 1, method="integrated_gradients", steps=16)
    assert sizes and max(sizes) <= 3
    torch.testing.assert_close(capped.pixels, whole.pixels, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(capped.delta, whole.delta, rtol=1e-3, atol=1e-6)


def test_auto_rows_fits_the_share_and_evens_out() -> None:
    cpu = torch.device("cpu")
    # 400 rows at most 32 a batch: 13 batches, evened out to 31 rows
    assert _core.CPU_MAX_ROWS == 32
    assert _core.auto_rows(400, 100.0, cpu, memory=10**9) == 31
    assert _core.auto_rows(10, 1e9, cpu, memory=10**9) == 1
    assert _core.auto_rows(7, 1.0, cpu, memory=10**9) == 7
    assert _core.available_memory(cpu) > 0


# ------------------------------------------------------------------ hygiene


def _hook_state(net: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    return [
        (name, table, tuple(getattr(m, table).keys()))
        for name, m in net.named_modules()
        for table in HOOK_TABLES
        if getattr(m, table, None)
    ]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "occlusion"])
def test_every_method_leaves_the_model_as_it_found_it(method: str) -> None:
    net = tiny().train()
    net.conv2.eval()  # a mixed state must come back as it was
    calls: list[int] = []
    handle = net.conv1.register_forward_hook(lambda m, i, o: calls.append(1))
    net.fc.weight.requires_grad_(False)
    net.conv1.weight.grad = torch.full_like(net.conv1.weight, 7.0)
    before = _hook_state(net)
    modes = {n: m.training for n, m in net.named_modules()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in net.named_buffers()}
    a = attribute(net, torch.randn(2, 3, 8, 8), 1, method=method, steps=4, batch=2)
    assert a.map.shape == (2, 8, 8)
    assert calls, "the user's hook runs in the forwards"
    assert _hook_state(net) == before
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert all(torch.equal(p, params[n]) for n, p in net.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in net.named_buffers())
    assert torch.equal(net.conv1.weight.grad, torch.full_like(net.conv1.weight, 7.0))
    assert all(p.grad is None for n, p in net.named_parameters() if n != "conv1.weight")
    handle.remove()


class Raises(TinyCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if x.shape[0] > 1:
            raise RuntimeError("boom")
        return y


@pytest.mark.parametrize(
    "method", ["saliency", "integrated_gradients", "guided_backprop", "gradcam", "scorecam"]
)
def test_a_forward_that_raises_leaves_nothing_behind(method: str) -> None:
    torch.manual_seed(0)
    net = Raises().train()
    before = _hook_state(net)
    with pytest.raises(RuntimeError, match="boom"):
        attribute(net, torch.randn(2, 3, 8, 8), 0, method=method, steps=2, batch=2)
    assert _hook_state(net) == before
    assert all(m.training for m in net.modules())
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    # and the guided mode is gone: F.relu is plain again
    x = torch.randn(4, requires_grad=True)
    (g,) = torch.autograd.grad((F.relu(x) * -1).sum(), x)
    assert torch.equal(g, -(x > 0).float())


# ------------------------------------------------------------------ model forms


class DictOut(TinyCNN):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"features": self.conv1(x), "logits": super().forward(x)}


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "gradcam", "scorecam"])
def test_dict_compiled_wrapped_and_half_models_match_the_eager_one(method: str) -> None:
    net = tiny()
    x = torch.randn(2, 3, 8, 8)
    ref = attribute(net, x, 1, method=method, steps=8)
    d = DictOut()
    d.load_state_dict(net.state_dict())
    d.eval()
    got = attribute(d, x, 1, method=method, steps=8, output="logits")
    torch.testing.assert_close(got.map, ref.map, rtol=1e-4, atol=1e-6)
    assert got.settings["output"] == "logits"
    got = attribute(d, x, 1, method=method, steps=8)  # the only 2-d tensor
    torch.testing.assert_close(got.map, ref.map, rtol=1e-4, atol=1e-6)
    wrapped = torch.compile(nn.DataParallel(net))
    torch.testing.assert_close(attribute(wrapped, x, 1, method=method, steps=8).map, ref.map)
    half = tiny().to(torch.bfloat16)
    h = attribute(half, x, 1, method=method, steps=8)
    assert h.map.dtype == torch.float32 and h.settings["dtype"] == "bfloat16"
    scale = float(ref.map.abs().max())
    assert float((h.map - ref.map).abs().max()) < 0.1 * scale


@pytest.mark.parametrize("channels", [1, 4])
def test_one_and_four_channel_inputs(channels: int) -> None:
    net = tiny(channels=channels)
    x = torch.randn(2, channels, 8, 8)
    a = attribute(net, x, 0, method="integrated_gradients", steps=8)
    assert a.pixels is not None and a.pixels.shape == (2, channels, 8, 8)
    torch.testing.assert_close(a.map, a.pixels.sum(dim=1))


def test_a_bundle_preprocesses_and_names_the_labels() -> None:
    bundle = convlens.load_model("simple_cnn", weights=None)
    img = convlens.sample_image()
    from torchvision.transforms.functional import to_pil_image

    a = attribute(bundle, to_pil_image(img), 3, method="saliency")  # a PIL image: preprocessed
    assert a.input.shape == (1, 3, 128, 128) and a.mean is not None
    b = attribute(bundle, bundle.preprocess(img), 3, method="saliency")  # a tensor: normalised
    torch.testing.assert_close(a.map, b.map, rtol=1e-3, atol=1e-5)
    assert a.model_name == bundle.description
    assert a.display_images().min() >= 0 and a.display_images().max() <= 1


def test_save_and_load_round_trip(tmp_path: object) -> None:
    net = tiny()
    a = attribute(net, torch.randn(2, 3, 8, 8), [0, 2], method="integrated_gradients", steps=4)
    a.save(tmp_path)  # type: ignore[arg-type]
    b = Attribution.load(tmp_path)  # type: ignore[arg-type]
    for name in ("map", "pixels", "score", "delta", "input"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (b.method, b.target, b.steps, b.settings["rule"]) == (
        a.method,
        a.target,
        a.steps,
        "gausslegendre",
    )
    assert "max|delta|" in repr(b)


def test_normalize_gives_the_display_scaling() -> None:
    net = tiny()
    x = torch.randn(2, 3, 8, 8)
    raw = attribute(net, x, 0, method="gradcam")
    shown = attribute(net, x, 0, method="gradcam", normalize=True)
    assert float(shown.map.min()) >= 0 and float(shown.map.max()) <= 1
    assert shown.settings["normalize"] is True
    assert bool((raw.map < 0).any()), "signed by default"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attribute(net, x, 0, method="saliency")


def test_occlusion_is_sensitivity() -> None:
    net = tiny()
    x = torch.randn(2, 3, 8, 8)
    a = attribute(net, x, [0, 1], method="occlusion", window=4, stride=2)
    for i in range(2):
        r = convlens.sensitivity(net, x[i], i, window=4, stride=2)
        torch.testing.assert_close(a.map[i], r.attribution)
        assert abs(float(a.score[i]) - r.score) < 1e-6
    with pytest.raises(ValueError, match="not neurons or callables"):
        attribute(net, x, "conv2:0@1,1", method="occlusion")


def test_ordered_dict_of_layers_resolves_names() -> None:
    net = nn.Sequential(
        OrderedDict(
            [
                ("conv", nn.Conv2d(3, 4, 3)),
                ("act", nn.ReLU()),
                ("pool", nn.AdaptiveAvgPool2d(1)),
                ("flat", nn.Flatten()),
                ("fc", nn.Linear(4, 2)),
            ]
        )
    ).eval()
    a = attribute(net, torch.randn(1, 3, 6, 6), 1, method="gradcam")
    assert a.layer == "conv" and a.layer_map is not None and a.layer_map.shape == (1, 4, 4)


def test_torchscript_takes_class_targets_and_refuses_hooks_in_one_line() -> None:
    net = tiny()
    x = torch.randn(2, 3, 8, 8)
    scripted = torch.jit.script(net)
    for method in ("saliency", "input_x_gradient", "integrated_gradients"):
        a = attribute(scripted, x, 1, method=method, steps=8)
        b = attribute(net, x, 1, method=method, steps=8)
        torch.testing.assert_close(a.map, b.map, rtol=1e-4, atol=1e-6)
    for method, target in (
        ("gradcam", 1),
        ("scorecam", 1),
        ("guided_backprop", 1),
        ("saliency", "conv2:1"),
    ):
        with pytest.raises(convlens.ConvlensError, match="TorchScript") as e:
            attribute(scripted, x, target, method=method)
        assert "\n" not in str(e.value) and "eager" in str(e.value)
