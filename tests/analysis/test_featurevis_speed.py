"""Render speed without changed meaning: precision, schedules and the compiled step.

The golden file holds the images that convlens made before precision and schedules
existed (float32, Adam at a constant 0.05), for ``render`` and for the microscope's
batched renders: ``precision="float32", schedule="constant"`` must give them again.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import convlens.device
from convlens.analysis.featurevis import render
from convlens.analysis.featurevis._amp import MixedPrecision
from convlens.analysis.featurevis.schedule import SCHEDULES, Schedule, get_schedule
from convlens.errors import ConvlensError

R = importlib.import_module("convlens.analysis.featurevis.render")
M = importlib.import_module("convlens.microscope")
GOLDEN = Path(__file__).parent / "golden" / "featurevis_constant_float32.json"


def golden_net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
    )
    return _with_statistics(m, m[1], m[4])


def _with_statistics(m: nn.Module, *bns: nn.BatchNorm2d) -> nn.Module:
    """``m`` in eval mode, its BatchNorms given drawn running statistics (so they fold into
    something other than the identity)."""
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def test_float32_constant_schedule_gives_the_images_of_earlier_versions():
    old = json.loads(GOLDEN.read_text())
    r = render(
        golden_net(),
        "3:0-2",
        size=16,
        steps=12,
        seed=3,
        progress=False,
        precision="float32",
        schedule="constant",
    )
    assert r.settings["precision"] == "float32" and r.settings["lr"] == 0.05
    torch.testing.assert_close(r.images.flatten(), torch.tensor(old["render"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        r.final_values, torch.tensor(old["render_values"]), atol=1e-6, rtol=1e-6
    )
    m = golden_net()
    # the golden images were made with Lucid's diversity weight, the default then
    plan = M._plan(m, None, 12, 10, 0.05, 5, 2, 100.0, precision="float32", schedule="constant")
    img, vals, _ = M._render_batch(m, "3", [1, 4], plan, torch.device("cpu"))
    torch.testing.assert_close(img.flatten(), torch.tensor(old["microscope"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(vals, torch.tensor(old["microscope_values"]), atol=1e-6, rtol=1e-6)


def test_the_default_schedule_differs_and_is_recorded():
    a = render(golden_net(), "3:0-1", size=16, steps=8, progress=False, precision="float32")
    b = render(
        golden_net(),
        "3:0-1",
        size=16,
        steps=8,
        progress=False,
        precision="float32",
        schedule="constant",
    )
    assert a.settings["schedule"]["name"] == "cosine" and a.settings["lr"] == SCHEDULES["cosine"].lr
    assert b.settings["schedule"] == {
        "name": "constant",
        "lr": 0.05,
        "warmup": 0.0,
        "decay": "none",
        "final": 1.0,
        "betas": [0.9, 0.999],
    }
    assert not torch.equal(a.images, b.images)


@pytest.mark.skipif(not convlens.device.cpu_has_fast_bfloat16(), reason="no bfloat16 CPU")
def test_auto_is_bfloat16_on_this_cpu():
    r = render(golden_net(), "3:0", size=16, steps=2, progress=False)
    assert r.settings["precision"] == "bfloat16"


def test_bfloat16_renders_raise_the_objective_and_keep_the_seed_contract():
    kw = dict(size=24, steps=20, progress=False, precision="bfloat16", thresholds=(1, 20))
    a = render(golden_net(), "3:0-2", seed=4, **kw)
    b = render(golden_net(), "3:0-2", seed=4, **kw)
    c = render(golden_net(), "3:0-2", seed=5, **kw)
    assert a.settings["precision"] == "bfloat16"
    assert torch.equal(a.images, b.images) and torch.equal(a.values, b.values)
    assert not torch.equal(a.images, c.images)
    assert bool((a.values[-1] > a.values[0]).all())
    # the values are measured in float32: the same number score() gives
    s = R.score(golden_net(), "3:0-2", a.images)
    torch.testing.assert_close(a.final_values, s, atol=1e-5, rtol=1e-5)
    # the image's parameters stay float32 under autocast
    assert a.images.dtype == torch.float32


def test_auto_falls_back_to_float32_on_a_cpu_without_bfloat16(monkeypatch: pytest.MonkeyPatch):
    kw = dict(size=16, steps=4, progress=False, seed=1)
    monkeypatch.setattr(convlens.device, "cpu_has_fast_bfloat16", lambda: False)
    auto = render(golden_net(), "3:0-1", **kw)
    f32 = render(golden_net(), "3:0-1", precision="float32", **kw)
    assert auto.settings["precision"] == "float32"
    assert auto.settings["precision_requested"] == "auto"
    assert torch.equal(auto.images, f32.images)
    monkeypatch.setattr(convlens.device, "cpu_has_fast_bfloat16", lambda: True)
    assert render(golden_net(), "3:0-1", **kw).settings["precision"] == "bfloat16"


def test_a_half_model_runs_in_its_own_dtype_whatever_precision_says():
    net = golden_net().to(torch.bfloat16)
    r = render(net, "3:0", size=16, steps=3, progress=False, precision="float16")
    assert r.settings["precision"] == "bfloat16" and r.settings["dtype"] == "bfloat16"


def test_float16_renders_scale_the_loss_and_raise_the_objective():
    r = render(
        golden_net(),
        "3:0-1",
        size=24,
        steps=12,
        progress=False,
        precision="float16",
        thresholds=(1, 12),
    )
    assert r.settings["precision"] == "float16" and r.settings["loss_scaling"] == "dynamic"
    assert bool((r.values[-1] > r.values[0]).all())


def test_loss_scaling_skips_an_overflowing_step_and_unscales_the_gradients():
    mp = MixedPrecision("float16", torch.device("cpu"), growth=2)
    assert mp.scaling and mp.scale == 2.0**16
    p = torch.ones(3, requires_grad=True)
    ok = mp.backward((p * torch.tensor([1.0, 2.0, 3.0])).sum(), [p])
    assert ok and torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))  # divided back
    p.grad = None
    assert not mp.backward((p * float("inf")).sum(), [p])  # overflow: skipped
    assert mp.scale == 2.0**15 and mp.skipped == 1 and float(p.grad.abs().sum()) == 0
    for _ in range(2):
        p.grad = None
        assert mp.backward(p.sum(), [p])
    assert mp.scale == 2.0**16  # grown back after `growth` good steps
    assert not MixedPrecision("bfloat16", torch.device("cpu")).scaling


def test_bad_precision_and_schedule_names_say_what_is_accepted():
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        render(golden_net(), "3:0", size=16, steps=1, progress=False, precision="fp8")
    with pytest.raises(ValueError, match="constant, cosine"):
        render(golden_net(), "3:0", size=16, steps=1, progress=False, schedule="onecycle")
    with pytest.raises(ValueError, match="fraction"):
        Schedule("x", lr=0.1, warmup=1.5)
    with pytest.raises(ValueError, match="betas"):
        Schedule("x", lr=0.1, betas=(1.0, 0.9))


def test_schedule_rates_by_hand():
    s = Schedule("s", lr=0.2, warmup=0.1, decay="cosine", final=0.05)
    steps = 100  # 10 warm-up steps from 0.1x to the peak
    assert s.rate(0, steps) == pytest.approx(0.02)
    assert s.rate(5, steps) == pytest.approx(0.2 * (0.1 + 0.9 * 0.5))
    assert s.rate(10, steps) == pytest.approx(0.2)
    mid = 10 + (steps - 1 - 10) / 2
    assert s.factor(int(mid), steps) == pytest.approx(
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89))
    )
    assert s.rate(99, steps) == pytest.approx(0.2 * 0.05)
    lin = Schedule("l", lr=1.0, decay="linear", final=0.0)
    assert [lin.rate(i, 5) for i in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert get_schedule("constant").rate(77, 512) == 0.05
    assert get_schedule(lin) is lin


def test_the_schedule_drives_adam_step_by_step():
    """A schedule whose rate reaches 0 at the last step leaves that step's image as it was:
    the rate is set before every step, not once."""
    to_zero = Schedule("to-zero", lr=0.05, decay="linear", final=0.0)
    r = render(
        golden_net(),
        "3:0-1",
        size=16,
        steps=6,
        progress=False,
        precision="float32",
        schedule=to_zero,
        thresholds=(4, 5, 6),
    )
    assert torch.equal(r.snapshots[1], r.snapshots[2])  # step 6 at rate 0
    assert not torch.equal(r.snapshots[0], r.snapshots[1])  # step 5 at 0.01


def test_compiled_step_matches_eager(monkeypatch: pytest.MonkeyPatch):
    """The fx-cut graph (what compile=True runs) gives the eager render's images; the
    compiler itself is swapped for its eager backend here, inductor's compile time is
    what the slow test below pays."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend="eager"))
    kw = dict(size=16, steps=5, progress=False, precision="float32", seed=2)
    eager = render(golden_net(), "3:0-2", **kw)
    comp = render(golden_net(), "3:0-2", compile=True, **kw)
    assert comp.settings["compiled"] is True and eager.settings["compiled"] is False
    torch.testing.assert_close(comp.images, eager.images, atol=1e-5, rtol=0)
    with pytest.raises(ConvlensError, match="redirect_relu"):
        render(golden_net(), "3:0", compile=True, redirect_relu=2, **kw)


@pytest.mark.slow
def test_compiled_step_with_inductor_matches_eager():
    kw = dict(size=16, steps=4, progress=False, precision="float32", seed=2)
    eager = render(golden_net(), "3:0-2", **kw)
    comp = render(golden_net(), "3:0-2", compile=True, **kw)
    torch.testing.assert_close(comp.images, eager.images, atol=1e-4, rtol=0)


def _depthwise_net() -> nn.Module:
    from timm.layers import Conv2dSame

    torch.manual_seed(2)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False),  # Lite0's strided depthwise
        nn.BatchNorm2d(8),
    )
    return _with_statistics(m, m[1], m[4])


def test_strided_depthwise_gradients_are_float32_in_bfloat16_renders_only(
    monkeypatch: pytest.MonkeyPatch,
):
    from convlens.analysis.featurevis import _inputgrad

    calls: list[torch.dtype] = []
    real = _inputgrad._Float32InputGrad.backward

    def spy(ctx: object, g: torch.Tensor) -> object:
        calls.append(g.dtype)
        return real(ctx, g)

    monkeypatch.setattr(_inputgrad._Float32InputGrad, "backward", staticmethod(spy))
    kw = dict(size=32, steps=24, progress=False, thresholds=(1, 24), seed=3)
    a = render(_depthwise_net(), "4:0-3", precision="bfloat16", **kw)
    assert calls and set(calls) == {torch.bfloat16}  # every step, on the bfloat16 gradient
    b = render(_depthwise_net(), "4:0-3", precision="bfloat16", **kw)
    assert torch.equal(a.images, b.images)  # the seed contract holds
    assert bool((a.values[-1] > a.values[0]).all())
    calls.clear()
    f32 = render(_depthwise_net(), "4:0-3", precision="float32", **kw)
    assert calls == []  # float32 runs timm's own module
    assert bool((f32.values[-1] > f32.values[0]).all())
    # the same optimisation, to bfloat16's rounding (a wrong gradient would wander off)
    torch.testing.assert_close(a.values[-1], f32.values[-1], rtol=0.05, atol=0.01)
