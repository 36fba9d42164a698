"""Adebayo's model-parameter randomization test: units, the randomized copy (the user's
weights bit-identical), Spearman against scipy, the cascade, and known answers."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torchvision
from scipy.stats import spearmanr
from torch import nn

from convlens.analysis.attribution.result import Attribution
from convlens.analysis.attribution.sanity import (
    Sanity,
    randomization_units,
    randomized_copy,
    sanity,
    spearman,
)

# the module (the package's attribute of the same name is the function)
sanity_mod = sys.modules["convlens.analysis.attribution.sanity"]


class Net(nn.Module):
    """conv -> bn -> relu -> (Sequential: conv, relu) -> pool -> fc, registered out of
    forward order (fc first), with a parameter no reset_parameters() covers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.scale = Scale(4)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = self.scale(self.body(h))
        return self.fc(self.pool(h).flatten(1))


class Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, n).view(1, n, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def trained_net(seed: int = 0) -> Net:
    """A Net whose every tensor differs from a fresh init (BatchNorm statistics included)."""
    torch.manual_seed(seed)
    net = Net()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        net.bn.running_mean.copy_(torch.randn(3, generator=g) * 0.2)
        net.bn.running_var.copy_(torch.rand(3, generator=g) + 0.5)
        net.bn.num_batches_tracked.fill_(7)
    return net.eval()


def snapshot(net: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    return {k: (v.detach().clone(), v.data_ptr()) for k, v in net.state_dict().items()}


def unchanged(net: nn.Module, before: dict[str, tuple[torch.Tensor, int]]) -> bool:
    now = net.state_dict()
    return set(now) == set(before) and all(
        torch.equal(now[k], v) and now[k].data_ptr() == ptr for k, (v, ptr) in before.items()
    )


# ------------------------------------------------------------------------ units


def test_resnet18_units_top_down():
    want = ["fc"] + [f"layer{i}.{j}" for i in (4, 3, 2, 1) for j in (1, 0)] + ["bn1", "conv1"]
    net = torchvision.models.resnet18()
    assert randomization_units(net) == want
    assert randomization_units(net, torch.rand(1, 3, 32, 32)) == want


def test_units_follow_the_forward_order_when_given_an_input():
    net = trained_net()
    # registration order reversed: pool has no parameters and is left out
    assert randomization_units(net) == ["scale", "body.0", "bn", "conv", "fc"]
    # forward order reversed: conv, bn, body.0, scale, fc
    assert randomization_units(net, torch.rand(2, 3, 3)) == ["fc", "scale", "body.0", "bn", "conv"]


def test_a_lone_wrapper_is_expanded_and_unused_units_are_left_out():
    class WithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)
            self.aux = nn.Linear(3, 3)  # never called
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean(dim=(2, 3)))

    wrapped = nn.Sequential(WithAux(), nn.Softmax(dim=1))
    assert randomization_units(wrapped) == ["0.fc", "0.aux", "0.conv"]
    assert randomization_units(wrapped, torch.rand(1, 2, 4, 4)) == ["0.fc", "0.conv"]


# ------------------------------------------------------------------------ the copy


def test_randomized_copy_leaves_the_users_tensors_bit_identical_and_changes_the_listed_units():
    net = trained_net()
    net.train()
    before = snapshot(net)
    hook = net.fc.register_forward_hook(lambda *a: None)
    copy = randomized_copy(net, ["bn", "scale", "body.0"], seed=0)
    assert unchanged(net, before)
    assert net.training and list(net.fc._forward_hooks) == [hook.id]
    hook.remove()
    old, new = net.state_dict(), copy.state_dict()
    listed = ("bn.", "scale.", "body.0.")
    for k in old:
        if k.startswith(listed):
            assert not torch.equal(old[k], new[k]), k
            assert new[k].data_ptr() != old[k].data_ptr(), k
        else:  # shared, not copied
            assert new[k].data_ptr() == old[k].data_ptr(), k
    # BatchNorm: reset_parameters() resets the statistics and the affine parameters
    assert torch.equal(copy.bn.running_mean, torch.zeros(3))
    assert torch.equal(copy.bn.running_var, torch.ones(3))
    assert int(copy.bn.num_batches_tracked) == 0 and int(net.bn.num_batches_tracked) == 7
    assert torch.equal(copy.bn.weight, torch.ones(3))
    # no reset_parameters(): a normal draw with the old mean and std (no NaN left)
    assert torch.isfinite(copy.scale.gamma).all()
    assert not any(p.requires_grad for p in copy.parameters())
    with torch.no_grad():
        assert torch.isfinite(copy.eval()(torch.rand(2, 2, 5, 5))).all()


def test_randomized_copy_is_seeded_per_unit():
    net = trained_net()
    state = torch.random.get_rng_state()
    a = randomized_copy(net, ["fc"], seed=1)
    b = randomized_copy(net, ["fc", "conv"], seed=1)
    c = randomized_copy(net, ["fc"], seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.fc.weight, b.fc.weight)  # a unit's values do not depend on the others
    assert not torch.equal(a.fc.weight, c.fc.weight)
    assert torch.equal(a.conv.weight, net.conv.weight)
    assert not torch.equal(b.conv.weight, net.conv.weight)
    # the draw is the module's own initializer: Linear's bound is 1 / sqrt(fan_in)
    assert float(a.fc.weight.abs().max()) <= 1 / math.sqrt(4)


def test_randomized_copy_keeps_dtype_and_refuses_unknown_units():
    net = trained_net().to(torch.float64)
    copy = randomized_copy(net, ["conv"], seed=0)
    assert copy.conv.weight.dtype == torch.float64
    assert copy.bn.running_mean.dtype == torch.float64
    with pytest.raises(ValueError, match="randomization_units"):
        randomized_copy(net, ["nope"], seed=0)


# ------------------------------------------------------------------------ spearman


def test_spearman_matches_scipy_with_ties_and_signs():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (4, 6, 7), generator=g).float()  # many ties
    b = torch.randint(0, 4, (4, 6, 7), generator=g).float() - 2.0
    b[1] = -a[1]  # a perfectly reversed image
    b[2] = a[2] + 0.1 * torch.randn(6, 7, generator=g)
    got = spearman(a, b)
    want = [spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy())[0] for i in range(4)]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert float(got[1]) == pytest.approx(-1.0)
    got_abs = spearman(b.abs(), a.abs())
    want_abs = [
        spearmanr(np.abs(b[i].flatten().numpy()), np.abs(a[i].flatten().numpy()))[0]
        for i in range(4)
    ]
    np.testing.assert_allclose(got_abs.numpy(), want_abs, atol=1e-6)


def test_spearman_is_rank_based_and_nan_for_a_constant_map():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 10.0, 100.0, 1000.0], [1.0, 2.0, 3.0, 4.0]])
    got = spearman(a, b)
    assert float(got[0]) == 1.0 and math.isnan(float(got[1]))
    with pytest.raises(ValueError, match="same images"):
        spearman(a, b[:1])


# ------------------------------------------------------------------------ sanity


def input_method(real):
    """attribute() with an extra method, "input", whose map is the input's channel sum:
    the same whatever the weights."""

    def fake(model, x, target, method, **kw):
        if method != "input":
            return real(model, x, target, method, **kw)
        t = target if target is not None else ["0"] * len(x)
        return Attribution(
            map=x.sum(1),
            score=torch.zeros(len(x)),
            target=tuple(map(str, t)),
            method="input",
            input=x,
        )

    return fake


def test_a_weight_independent_map_stays_and_saliency_drops_once_the_top_unit_is_randomized(
    monkeypatch,
):
    monkeypatch.setattr(sanity_mod, "_attribute", input_method(sanity_mod._attribute))
    net = trained_net()
    before = snapshot(net)
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    s = sanity(net, x, methods=("saliency", "input"), seed=0)
    assert isinstance(s, Sanity)
    assert s.units == ("fc", "scale", "body.0", "bn", "conv")
    assert s.correlation["input"].shape == (5, 3)
    assert torch.equal(s.correlation["input"], torch.ones(5, 3))
    assert torch.equal(s.abs_correlation["input"], torch.ones(5, 3))
    # saliency is the gradient: a new fc changes it at once
    assert (s.correlation["saliency"][0] < 0.999).all()
    assert (s.abs_correlation["saliency"][0] < 0.999).all()
    # maps: the original first, then one per unit; the original is the model's own
    assert s.maps["saliency"].shape == (6, 3, 6, 6)
    from convlens.analysis.attribution import attribute

    assert torch.allclose(s.maps["saliency"][0], attribute(net, x, method="saliency").map)
    # the target is the original model's top-1, fixed before randomizing
    with torch.no_grad():
        top = net(x).argmax(1).tolist()
    assert s.target == tuple(str(t) for t in top)
    assert unchanged(net, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_the_cascade_randomizes_units_up_to_k_and_the_targets_stay_fixed(monkeypatch):
    chosen: list[list[str]] = []
    targets: list[object] = []
    real_copy = sanity_mod.randomized_copy

    def recording_copy(model, units, seed=0):
        chosen.append(list(units))
        return real_copy(model, units, seed)

    def fake(model, x, target, method, **kw):
        targets.append(target)
        t = ["2"] * len(x) if target is None else target
        return Attribution(
            map=x.sum(1), score=torch.zeros(len(x)), target=tuple(t), method=method, input=x
        )

    monkeypatch.setattr(sanity_mod, "randomized_copy", recording_copy)
    monkeypatch.setattr(sanity_mod, "_attribute", fake)
    net = trained_net()
    x = torch.rand(1, 2, 5, 5)
    s = sanity(net, x, methods=("a", "b"))
    u = list(s.units)
    assert chosen == [u[: k + 1] for k in range(len(u))]
    assert targets[0] is None and all(t == ["2"] for t in targets[1:])
    assert len(targets) == 2 * (len(u) + 1)
    chosen.clear()
    s = sanity(net, x, methods=("a",), cascade=False, units=["fc", "conv"])
    assert chosen == [["fc"], ["conv"]] and s.units == ("fc", "conv") and not s.cascade


def test_steps_go_to_integrated_gradients_only_and_a_cam_keeps_its_layer(monkeypatch):
    seen: list[tuple[str, dict]] = []

    def fake(model, x, target, method, **kw):
        seen.append((method, kw))
        return Attribution(
            map=x.sum(1),
            score=torch.zeros(len(x)),
            target=("0",) * len(x),
            method=method,
            input=x,
            layer="body.0" if method == "gradcam" else None,
        )

    monkeypatch.setattr(sanity_mod, "_attribute", fake)
    s = sanity(
        trained_net(),
        torch.rand(2, 5, 5),
        methods=("integrated_gradients", "gradcam"),
        steps=7,
        units=["fc", "conv"],
    )
    assert len(seen) == 6
    ig = [kw for m, kw in seen if m == "integrated_gradients"]
    cam = [kw for m, kw in seen if m == "gradcam"]
    assert all(kw["steps"] == 7 and "layer" not in kw for kw in ig)
    assert all("steps" not in kw for kw in cam)
    # the original chooses its layer; every randomized copy is read at the same one
    assert "layer" not in cam[0] and all(kw["layer"] == "body.0" for kw in cam[1:])
    assert s.settings["layers"] == {"gradcam": "body.0"}


def test_layer_baseline_and_samples_reach_the_methods_that_take_them(monkeypatch):
    seen: list[tuple[str, dict]] = []

    def fake(model, x, target, method, **kw):
        seen.append((method, kw))
        return Attribution(
            map=x.sum(1),
            score=torch.zeros(len(x)),
            target=("0",) * len(x),
            method=method,
            input=x,
            layer=kw.get("layer"),
        )

    monkeypatch.setattr(sanity_mod, "_attribute", fake)
    s = sanity(
        trained_net(),
        torch.rand(2, 5, 5),
        methods=("integrated_gradients", "saliency", "gradcam"),
        units=["fc"],
        layer="conv",
        baseline="blur",
        samples=3,
        seed=5,
    )
    by = {
        m: [kw for n, kw in seen if n == m] for m in ("integrated_gradients", "saliency", "gradcam")
    }
    assert all(kw["baseline"] == "blur" and kw["samples"] == 3 for kw in by["integrated_gradients"])
    assert all(kw["samples"] == 3 and kw["seed"] == 5 for kw in by["saliency"])
    assert all("baseline" not in kw for kw in by["saliency"] + by["gradcam"])
    assert all(kw["layer"] == "conv" and "samples" not in kw for kw in by["gradcam"])
    assert s.settings["layers"] == {"gradcam": "conv"}
    assert (s.settings["baseline"], s.settings["samples"]) == ("blur", 3)


def test_sanity_with_the_real_methods_end_to_end():
    net = trained_net()
    net.body.train()
    calls: list[int] = []
    hook = net.conv.register_forward_hook(lambda *a: calls.append(1))
    before = snapshot(net)
    x = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    s = sanity(net, x, 1, steps=4, units=["fc", "body.0"])
    assert [m.training for m in net.modules()] == [False] * 4 + [True] * 3 + [False] * 2
    assert list(net.conv._forward_hooks) == [hook.id]
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    hook.remove()
    assert s.methods == ("saliency", "integrated_gradients", "guided_backprop", "gradcam")
    assert s.target == ("1", "1")
    for m in s.methods:
        assert s.correlation[m].shape == (2, 2)
        assert s.maps[m].shape == (3, 2, 6, 6)
        assert torch.isfinite(s.maps[m]).all()
    assert unchanged(net, before)
    d = s.to_dict()
    assert d["units"] == ["fc", "body.0"] and len(d["correlation"]["saliency"]["mean"]) == 2
    r = repr(s)
    assert "\n" not in r and r.startswith("Sanity(methods=")


def test_sanity_validates_with_one_line_errors():
    net = trained_net()
    x = torch.rand(1, 2, 5, 5)
    with pytest.raises(ValueError, match="twice"):
        sanity(net, x, methods=("saliency", "saliency"))
    with pytest.raises(ValueError, match="non-empty"):
        sanity(net, x, methods=())
    with pytest.raises(ValueError, match="unknown unit"):
        sanity(net, x, methods=("saliency",), units=["nope"])
    with pytest.raises(ValueError, match="steps must be"):
        sanity(net, x, steps=0)
