"""render and score on tiny models: reproducible, clean (hooks, modes, flags), early stop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convlens
from convlens.analysis.featurevis import objectives as obj
from convlens.analysis.featurevis import render, score
from convlens.analysis.featurevis.render import _RedirectedReLUGrad


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.bn(self.conv2(self.relu1(self.conv1(x)))))
        return self.fc(self.pool(x).flatten(1))


class Boom(nn.Module):
    """Raises when called on real data: anything after the deepest objective layer must
    not run. (On the meta device, where the layer-call trace runs, it pools.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "meta":
            return x.mean((2, 3), keepdim=True)
        raise AssertionError("the forward should have stopped before this module")


FAST = dict(size=24, steps=6, progress=False)


def no_hooks(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


def test_render_raises_the_objective_and_reports_per_image_values():
    model = Tiny()
    r = render(model, "conv2:0-3", size=24, steps=30, lr=0.05, thresholds=(1, 30), progress=False)
    assert r.images.shape == (4, 3, 24, 24)
    assert float(r.images.min()) >= 0 and float(r.images.max()) <= 1
    assert r.values.shape == (2, 4) and r.thresholds == (1, 30)
    assert (r.values[-1] > r.values[0]).all()
    assert r.snapshots.shape == (2, 4, 3, 24, 24)
    assert torch.equal(r.snapshots[-1], r.images)
    assert r.trace.shape == (30, 4)
    assert len(r.times) == 2 and 0 < r.times[0] <= r.times[1]
    # render's values are score's on the final images: no transforms
    assert torch.allclose(score(model, "conv2:0-3", r.images), r.final_values, atol=1e-5)
    d = r.to_dict()
    assert d["settings"]["batch"] == 4 and d["settings"]["seed"] == 0
    assert len(d["values"]) == 2 and len(d["values"][0]) == 4


def test_same_seed_same_images_other_seed_differs():
    a = render(Tiny(), "conv2:1", seed=3, **FAST)
    b = render(Tiny(), "conv2:1", seed=3, **FAST)
    c = render(Tiny(), "conv2:1", seed=4, **FAST)
    assert torch.equal(a.images, b.images)
    assert not torch.allclose(a.images, c.images)


def test_threshold_snapshots_equal_shorter_renders():
    # With a constant rate a snapshot at step 3 is a 3-step render; the default cosine
    # schedule is stretched over the steps, so its step 3 of 8 is not.
    kw = dict(size=24, progress=False, schedule="constant", precision="float32")
    long = render(Tiny(), "conv2:2", steps=8, thresholds=(3,), **kw)
    short = render(Tiny(), "conv2:2", steps=3, **kw)
    assert torch.equal(long.snapshots[0], short.images)
    long = render(Tiny(), "conv2:2", steps=8, thresholds=(3,), **{**kw, "schedule": "cosine"})
    assert not torch.equal(long.snapshots[0], short.images)


def test_forward_stops_after_the_deepest_layer():
    model = Tiny()
    model.pool = Boom()  # type: ignore[assignment]
    r = render(model, obj.channel("conv1", 0) + obj.channel("bn", 1), **FAST)
    assert r.images.shape == (1, 3, 24, 24)
    with pytest.raises(AssertionError, match="should have stopped"):
        render(model, obj.class_logit(0), **FAST)  # the output needs the whole forward
    assert no_hooks(model)


def test_model_left_as_it_was():
    model = Tiny().train()
    model.conv1.requires_grad_(False)
    model.bn.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    r = render(model, "relu2:0", redirect_relu=3, **FAST)
    assert r.images.shape[0] == 1
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats untouched too
    assert all(p.grad is None for p in model.parameters())
    assert no_hooks(model)


def test_a_forward_that_raises_leaves_no_hooks_and_restores_everything():
    class Fails(nn.Module):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            Fails.calls += 1
            if Fails.calls == 3:
                raise RuntimeError("broken module")
            return x

    model = Tiny().train()
    model.relu1 = Fails()  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="broken module"):
        render(model, "conv2:0", redirect_relu=10, **FAST)
    assert no_hooks(model)
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_batch_and_argument_errors():
    with pytest.raises(ValueError, match="use batch=4"):
        render(Tiny(), "conv2:0-3", batch=2, **FAST)
    with pytest.raises(convlens.LayerNotFoundError, match="conv2"):
        render(Tiny(), "conv3:0", **FAST)
    with pytest.raises(ValueError, match="channel 8 of layer 'conv2' does not exist"):
        render(Tiny(), "conv2:8", **FAST)
    with pytest.raises(ValueError, match="thresholds"):
        render(Tiny(), "conv2:0", size=24, steps=5, thresholds=(9,), progress=False)
    with pytest.raises(ValueError, match="transforms"):
        render(Tiny(), "conv2:0", transforms="wobbly", **FAST)
    with pytest.raises(TypeError, match="ModelBundle"):
        render("resnet18", "conv2:0", **FAST)


def test_batch_renders_several_independent_images():
    r = render(Tiny(), "conv2:5", batch=3, **FAST)
    assert r.images.shape == (3, 3, 24, 24)
    assert not torch.equal(r.images[0], r.images[1])  # different random starts


def test_penalties_and_transforms_none_and_preprocess():
    o = obj.channel("conv2", 0) - 1e-3 * obj.total_variation() + 0.1 * obj.diversity("conv2")
    r = render(Tiny(), o, batch=2, transforms="none", preprocess=None, **FAST)
    assert r.settings["transforms"] == "none" and r.settings["preprocess"] == "none"
    r2 = render(Tiny(), "conv2:0", preprocess=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), **FAST)
    assert "0.25" in r2.settings["preprocess"]


def test_upsample_to_the_bundle_input_size():
    bundle = convlens.load_model("simple_cnn")  # input 128 px
    seen: list[tuple[int, ...]] = []
    h = bundle.model.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    try:
        render(bundle, "conv1:0", size=32, steps=2, progress=False)
    finally:
        h.remove()
    assert all(s[-1] == 128 for s in seen)
    seen.clear()
    h = bundle.model.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    try:
        render(bundle, "conv1:0", size=32, steps=2, upsample=False, progress=False)
    finally:
        h.remove()
    assert all(s[-1] < 64 for s in seen)


def test_redirected_relu_gradient():
    # All outputs dead: the ReLU gradient is zero, the redirected one lets through the
    # gradient that raises the units (negative loss gradient) and blocks the rest.
    out = torch.zeros(2, 3)
    out.requires_grad_(True)
    y = _RedirectedReLUGrad.apply(out, float("inf"))
    grad = torch.tensor([[-1.0, 2.0, -3.0], [1.0, 1.0, 1.0]])
    y.backward(grad)
    assert torch.equal(out.grad, torch.tensor([[-1.0, 0.0, -3.0], [0.0, 0.0, 0.0]]))
    # Where some ReLU gradient gets through, it is the plain ReLU gradient.
    out2 = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    _RedirectedReLUGrad.apply(out2, float("inf")).backward(torch.tensor([[-1.0, 2.0, -3.0]]))
    assert torch.equal(out2.grad, torch.tensor([[0.0, 2.0, 0.0]]))


def test_class_logit_render_raises_that_logit():
    r = render(Tiny(), "output:3", size=24, steps=20, thresholds=(1,), progress=False)
    assert r.values[-1, 0] > r.values[0, 0]


@pytest.mark.gpu
def test_render_on_cuda_matches_cpu(exact_cuda):
    cpu = render(Tiny(), "conv2:0-1", size=24, steps=5, transforms="none", progress=False)
    gpu = render(Tiny().cuda(), "conv2:0-1", size=24, steps=5, transforms="none", progress=False)
    assert gpu.settings["device"].startswith("cuda")
    assert torch.allclose(cpu.images, gpu.images, atol=1e-4)
    std = render(Tiny().cuda(), "conv2:0-1", size=24, steps=5, progress=False)
    assert torch.isfinite(std.values).all()
