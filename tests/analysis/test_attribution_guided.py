"""Guided backpropagation through a TorchFunctionMode: every ReLU-family call, no model edits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.nn.modules.module as module_globals
from torch import nn

from convlens.analysis.attribution.guided import GuidedStats, guided_relus
from convlens.models import SimpleCNN
from convlens.models.forms import HOOK_TABLES

# ----------------------------------------------------------------------------- helpers


class _ClampGrad(torch.autograd.Function):
    """Identity forward; backward lets only positive gradients through. Put on a ReLU
    module's *output* (a forward hook), the module's own backward then multiplies by its
    derivative: relu(grad) * derivative, the guided rule, computed independently."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(min=0)


_RELU_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.Threshold)


def reference_guided(model: nn.Module, x: torch.Tensor, score: Callable[[Any], torch.Tensor]):
    """Guided gradient by forward hooks on the ReLU modules (the model must have no
    functional ReLU); hooks removed afterwards."""
    handles = [
        m.register_forward_hook(lambda _m, _i, out: _ClampGrad.apply(out))
        for m in model.modules()
        if isinstance(m, _RELU_MODULES)
    ]
    try:
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(score(model(x)), x)
    finally:
        for h in handles:
            h.remove()
    return g


def input_grad(model: nn.Module, x: torch.Tensor, score: Callable[[Any], torch.Tensor]):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(score(model(x)), x)
    return g


def guided_grad(model: nn.Module, x: torch.Tensor, score: Callable[[Any], torch.Tensor]):
    with guided_relus() as stats:
        g = input_grad(model, x, score)
    return g, stats


def hook_snapshot(model: nn.Module) -> list[tuple[str, str, list[int]]]:
    return [
        (name, table, list(getattr(m, table, {})))
        for name, m in model.named_modules()
        for table in HOOK_TABLES
    ]


def global_hooks() -> dict[str, int]:
    return {
        n: len(getattr(module_globals, n))
        for n in dir(module_globals)
        if n.startswith("_global_") and n.endswith("hooks")
    }


def mode_depth() -> int:
    return int(torch._C._len_torch_function_stack())


# ------------------------------------------------------------- closed form, every ReLU form


class HandNet(nn.Module):
    """2 -> 3 -> 2 -> 1, no biases, the activation after each hidden layer.

    x = (1, 2): z1 = W1 x = (1, 2, -1), so unit 3 of layer 1 is off; z2 = W2 relu(z1) =
    (1, 1), both on; out = w3 . relu(z2) = 2 - 1 = 1.

    Plain:  dz2 = w3 = (2, -1); dh1 = W2^T dz2 = (7, -3, -1); dz1 = (7, -3, 0);
            dx = W1^T dz1 = (7, -3).
    Guided: dz2 = relu(2, -1) = (2, 0); dh1 = W2^T (2, 0) = (6, -2, 2);
            dz1 = relu(6, -2, 2) * (1, 1, 0) = (6, 0, 0); dx = W1^T dz1 = (6, 0).
    (Unit 3 of layer 1 has a positive gradient but is off; unit 2 is on but its gradient
    is negative: both are cut. Deconvnet, relu(grad) alone, would give (8, -2).)
    """

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3, bias=False)
        self.fc2 = nn.Linear(3, 2, bias=False)
        self.fc3 = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
            self.fc2.weight.copy_(torch.tensor([[3.0, -1.0, 1.0], [-1.0, 1.0, 3.0]]))
            self.fc3.weight.copy_(torch.tensor([[2.0, -1.0]]))
        self.act = act  # a module is registered (and reused: it runs twice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


HAND_X = torch.tensor([[1.0, 2.0]])
HAND_PLAIN = torch.tensor([[7.0, -3.0]])
HAND_GUIDED = torch.tensor([[6.0, 0.0]])


def _returns_input(f: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation applied for its side effect only: the caller keeps using its input."""

    def act(t: torch.Tensor) -> torch.Tensor:
        f(t)
        return t

    return act


RELU_FORMS: list[tuple[str, Any, str]] = [
    ("F.relu", F.relu, "F.relu"),
    ("F.relu-inplace", lambda t: F.relu(t, inplace=True), "F.relu"),
    ("F.relu-inplace-return-ignored", _returns_input(lambda t: F.relu(t, inplace=True)), "F.relu"),
    ("F.relu_", F.relu_, "torch.relu_"),
    ("torch.relu", torch.relu, "torch.relu"),
    ("torch.relu-keyword", lambda t: torch.relu(input=t), "torch.relu"),
    ("torch.relu_", torch.relu_, "torch.relu_"),
    ("torch.relu_-return-ignored", _returns_input(torch.relu_), "torch.relu_"),
    ("Tensor.relu", lambda t: t.relu(), "Tensor.relu"),
    ("Tensor.relu_", lambda t: t.relu_(), "Tensor.relu_"),
    ("Tensor.relu_-return-ignored", _returns_input(lambda t: t.relu_()), "Tensor.relu_"),
    ("nn.ReLU-reused", nn.ReLU(), "F.relu"),
    ("nn.ReLU-inplace-reused", nn.ReLU(inplace=True), "F.relu"),
    ("F.threshold", lambda t: F.threshold(t, 0.0, 0.0), "F.threshold"),
    ("nn.Threshold-inplace", nn.Threshold(0.0, 0.0, inplace=True), "F.threshold"),
    ("F.leaky_relu-slope-0", lambda t: F.leaky_relu(t, 0.0), "F.leaky_relu"),
    ("nn.Hardtanh-0-100", nn.Hardtanh(0.0, 100.0), "F.hardtanh"),
    ("aten.relu", torch.ops.aten.relu.default, "aten.relu"),
    ("aten.relu_", torch.ops.aten.relu_, "aten.relu_"),
]


@pytest.mark.parametrize(
    "act, kind", [(a, k) for _, a, k in RELU_FORMS], ids=[i for i, _, _ in RELU_FORMS]
)
def test_closed_form_guided_gradient_for_every_relu_form(act, kind):
    model = HandNet(act)
    assert torch.equal(input_grad(model, HAND_X, lambda y: y.sum()), HAND_PLAIN)
    with guided_relus() as stats:
        x = HAND_X.clone().requires_grad_(True)
        out = model(x)
        (g,) = torch.autograd.grad(out.sum(), x)
    assert out.item() == 1.0  # the forward is the activation's
    assert torch.equal(g, HAND_GUIDED)
    assert stats.calls == 2 and stats.kinds == {kind: 2}
    # Outside the block the gradient is plain again.
    assert torch.equal(input_grad(model, HAND_X, lambda y: y.sum()), HAND_PLAIN)


def test_closed_form_matches_the_hook_reference():
    model = HandNet(nn.ReLU())
    assert torch.equal(reference_guided(model, HAND_X, lambda y: y.sum()), HAND_GUIDED)


def test_torch_func_grad_and_vmap():
    model = HandNet(nn.ReLU(inplace=True))

    def f(x: torch.Tensor) -> torch.Tensor:
        return model(x).sum()

    with guided_relus() as stats:
        per_image = torch.func.vmap(torch.func.grad(f))(HAND_X.expand(3, 2))
    assert torch.equal(per_image.detach(), HAND_GUIDED.expand(3, 2))
    assert stats.calls == 2


# ---------------------------------------------------- ReLU6, hardtanh, LeakyReLU, threshold

VALUES = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 5.0, 6.0, 7.0])
WEIGHTS = torch.tensor([1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 1.0, 2.0])
# Per rule, by hand: the local derivative at VALUES, then guided = relu(WEIGHTS) * it.
DERIVATIVE = {
    "relu6": [0, 0, 0, 1, 1, 1, 0, 0],  # 0 < x < 6 (both ends excluded)
    "hardtanh(-2,3)": [0, 1, 1, 1, 1, 0, 0, 0],
    "hardtanh": [0, 0, 1, 1, 0, 0, 0, 0],  # -1 < x < 1
    "leaky(0.2)": [0.2, 0.2, 0.2, 1, 1, 1, 1, 1],  # 1 where x > 0, the slope elsewhere
    "threshold(1,-5)": [0, 0, 0, 0, 1, 1, 1, 1],  # x > 1
}
GUIDED = {
    "relu6": [0, 0, 0, 0, 3, 0, 0, 0],
    "hardtanh(-2,3)": [0, 0, 2, 0, 3, 0, 0, 0],
    "hardtanh": [0, 0, 2, 0, 0, 0, 0, 0],
    "leaky(0.2)": [0.2, 0, 0.4, 0, 3, 0, 1, 2],
    "threshold(1,-5)": [0, 0, 0, 0, 3, 0, 1, 2],
}
RULE_FORMS: list[tuple[str, str, Any, str]] = [
    ("F.relu6", "relu6", F.relu6, "F.relu6"),
    ("F.relu6-inplace", "relu6", lambda t: F.relu6(t, inplace=True), "F.relu6"),
    ("nn.ReLU6", "relu6", nn.ReLU6(), "F.hardtanh"),
    ("nn.ReLU6-inplace", "relu6", nn.ReLU6(inplace=True), "F.hardtanh"),
    ("_nn.relu6_", "relu6", _returns_input(torch._C._nn.relu6_), "torch._C._nn.relu6_"),
    ("aten.relu6", "relu6", torch.ops.aten.relu6, "aten.relu6"),
    ("F.hardtanh", "hardtanh(-2,3)", lambda t: F.hardtanh(t, -2.0, 3.0), "F.hardtanh"),
    (
        "F.hardtanh-kw-inplace",
        "hardtanh(-2,3)",
        lambda t: F.hardtanh(t, min_val=-2.0, max_val=3.0, inplace=True),
        "F.hardtanh",
    ),
    (
        "F.hardtanh_",
        "hardtanh(-2,3)",
        _returns_input(lambda t: F.hardtanh_(t, -2.0, 3.0)),
        "F.hardtanh_",
    ),
    ("nn.Hardtanh", "hardtanh(-2,3)", nn.Hardtanh(-2.0, 3.0), "F.hardtanh"),
    ("nn.Hardtanh-default", "hardtanh", nn.Hardtanh(), "F.hardtanh"),
    ("F.leaky_relu", "leaky(0.2)", lambda t: F.leaky_relu(t, 0.2), "F.leaky_relu"),
    ("nn.LeakyReLU", "leaky(0.2)", nn.LeakyReLU(0.2), "F.leaky_relu"),
    ("nn.LeakyReLU-inplace", "leaky(0.2)", nn.LeakyReLU(0.2, inplace=True), "F.leaky_relu"),
    ("F.leaky_relu_", "leaky(0.2)", lambda t: F.leaky_relu_(t, 0.2), "F.leaky_relu_"),
    (
        "_nn.leaky_relu",
        "leaky(0.2)",
        lambda t: torch._C._nn.leaky_relu(t, 0.2),
        "torch._C._nn.leaky_relu",
    ),
    ("F.threshold", "threshold(1,-5)", lambda t: F.threshold(t, 1.0, -5.0), "F.threshold"),
    ("nn.Threshold-inplace", "threshold(1,-5)", nn.Threshold(1.0, -5.0, True), "F.threshold"),
    (
        "torch.threshold_",
        "threshold(1,-5)",
        _returns_input(lambda t: torch.threshold_(t, 1.0, -5.0)),
        "torch.threshold_",
    ),
]


@pytest.mark.parametrize(
    "rule, act, kind", [r[1:] for r in RULE_FORMS], ids=[r[0] for r in RULE_FORMS]
)
def test_relu6_hardtanh_leaky_threshold_rules(rule, act, kind):
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        x = VALUES.clone().requires_grad_(True)
        out = act(x * 1)  # a non-leaf input, so in-place forms are allowed
        (g,) = torch.autograd.grad((out * WEIGHTS).sum(), x)
        return out.detach(), g

    plain_out, plain = run()
    # The hand table is PyTorch's own derivative: the plain gradient is WEIGHTS * it.
    assert torch.allclose(plain, WEIGHTS * torch.tensor(DERIVATIVE[rule]))
    with guided_relus() as stats:
        out, guided = run()
    assert torch.equal(out, plain_out)  # the same forward, bit for bit
    assert torch.allclose(guided, torch.tensor(GUIDED[rule], dtype=torch.float32))
    assert stats.calls == 1 and stats.kinds == {kind: 1}


def test_hardtanh_argument_checks_still_run():
    x = VALUES.clone().requires_grad_(True)
    with guided_relus(), pytest.raises(ValueError, match="min_val cannot be greater"):
        F.hardtanh(x * 1, 2.0, 1.0)


# ------------------------------------------------------------------- in-place semantics


@pytest.mark.parametrize(
    "inplace",
    [torch.relu_, lambda t: t.relu_(), F.relu_, lambda t: F.relu(t, inplace=True), nn.ReLU(True)],
    ids=["torch.relu_", "Tensor.relu_", "F.relu_", "F.relu-inplace", "nn.ReLU-inplace"],
)
def test_inplace_forms_write_the_input_and_return_it(inplace):
    x = torch.tensor([-2.0, 1.0, 3.0], requires_grad=True)
    w = torch.tensor([5.0, -4.0, 2.0])
    with guided_relus() as stats:
        z = x * 1
        version = z._version
        out = inplace(z)
        assert out is z  # the returned tensor is the input, holding the activation
        assert torch.equal(z, torch.tensor([0.0, 1.0, 3.0]))
        assert z._version > version  # really written, as the real op does
        (z * w).sum().backward()  # through the input: the return value ignored
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 2.0]))  # plain would be (0, -4, 2)
    assert stats.calls == 1


def test_no_grad_runs_plain_and_counts_nothing():
    x = torch.tensor([-2.0, 1.0, 3.0], requires_grad=True)
    with guided_relus() as stats, torch.no_grad():
        out = F.relu(x)
        z = x.clone()
        back = z.relu_()
    assert torch.equal(out, torch.tensor([0.0, 1.0, 3.0])) and out.grad_fn is None
    assert back is z and torch.equal(z, out)
    assert stats.calls == 0 and not stats.kinds


def test_input_without_grad_runs_plain():
    with guided_relus() as stats:
        out = F.relu(torch.tensor([-1.0, 2.0]))
    assert torch.equal(out, torch.tensor([0.0, 2.0])) and stats.calls == 0


# ------------------------------------------------- SimpleCNN (functional) vs a module twin


class ModuleTwin(nn.Module):
    """SimpleCNN with one ``nn.ReLU`` module, reused by all three blocks."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2, 2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)
        self.relu = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.pool(self.relu(self.bn3(self.conv3(x))))
        return self.fc(self.gap(x).flatten(1))


@pytest.fixture
def cnn_and_twins() -> tuple[SimpleCNN, ModuleTwin, ModuleTwin, torch.Tensor]:
    gen = torch.Generator().manual_seed(18)
    model = SimpleCNN(num_classes=10)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            n = bn.num_features
            bn.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            bn.weight.copy_(0.5 + torch.rand(n, generator=gen))
            bn.bias.copy_(0.2 * torch.randn(n, generator=gen))
    model.eval()
    twins = []
    for inplace in (True, False):
        twin = ModuleTwin(inplace)
        twin.load_state_dict(model.state_dict())
        twins.append(twin.eval())
    x = torch.randn(2, 3, 16, 16, generator=gen)
    return model, twins[0], twins[1], x


def _logit3(y: torch.Tensor) -> torch.Tensor:
    return y[:, 3].sum()


def test_simple_cnn_functional_relu_equals_module_twin_and_reference(cnn_and_twins):
    model, twin_inplace, twin, x = cnn_and_twins
    guided, stats = guided_grad(model, x, _logit3)
    twin_guided, twin_stats = guided_grad(twin_inplace, x, _logit3)
    reference = reference_guided(twin, x, _logit3)
    assert stats.kinds == {"F.relu": 3} and twin_stats.kinds == {"F.relu": 3}
    torch.testing.assert_close(guided, twin_guided, rtol=0, atol=0)
    torch.testing.assert_close(guided, reference, rtol=1e-6, atol=1e-7)
    plain = input_grad(model, x, _logit3)
    assert (guided - plain).abs().max() > 0.1 * plain.abs().max()  # it really differs
    # The forward inside the block is the model's, bit for bit.
    with guided_relus():
        assert torch.equal(model(x), model.eval()(x))
    with torch.no_grad():
        assert torch.equal(model(x), twin_inplace(x))


def test_capture_style_hooks_that_return_a_clone(cnn_and_twins):
    model, twin_inplace, twin, x = cnn_and_twins
    expected = reference_guided(twin, x, _logit3)

    def clone(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
        return out.clone()  # what a capture hook that replaces the output returns

    handles = [model.bn1.register_forward_hook(clone), model.bn3.register_forward_hook(clone)]
    handles += [twin_inplace.relu.register_forward_hook(clone)]  # the reused, in-place ReLU
    handles += [twin_inplace.conv2.register_forward_hook(clone)]
    try:
        before = hook_snapshot(model) + hook_snapshot(twin_inplace)
        for m in (model, twin_inplace):
            guided, stats = guided_grad(m, x, _logit3)
            assert stats.calls == 3
            torch.testing.assert_close(guided, expected, rtol=1e-6, atol=1e-7)
        assert hook_snapshot(model) + hook_snapshot(twin_inplace) == before  # the user's, untouched
    finally:
        for h in handles:
            h.remove()


def test_convlens_capture_inside_the_block(cnn_and_twins):
    from convlens.capture import capture

    model, _, _, x = cnn_and_twins
    outside = capture(model, x, ["bn2", "fc"])
    with guided_relus():
        inside = capture(model, x, ["bn2", "fc"])
    assert outside.keys() == inside.keys()
    for k in outside:
        assert torch.equal(outside[k], inside[k])


# ------------------------------------------------------------------------ no ReLU at all


class NoRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 6),
            nn.SiLU(), nn.Linear(6, 6), nn.ELU(), nn.Linear(6, 6), nn.PReLU(), nn.Linear(6, 2),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


def test_model_without_relu_family_gets_the_plain_gradient():
    model = NoRelu()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    guided, stats = guided_grad(model, x, lambda y: y[:, 1].sum())
    assert stats.calls == 0 and not stats.kinds
    assert torch.equal(guided, input_grad(model, x, lambda y: y[:, 1].sum()))


# ------------------------------------------------------------------- the model untouched


def _state(model: nn.Module) -> tuple[Any, ...]:
    return (
        [(n, id(m), type(m), m.training) for n, m in model.named_modules()],
        [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
        hook_snapshot(model),
        global_hooks(),
        mode_depth(),
    )


@pytest.mark.parametrize("raises", [False, True], ids=["normal-exit", "exception"])
def test_model_untouched_and_nothing_left_behind(cnn_and_twins, raises):
    model, twin_inplace, _, x = cnn_and_twins
    model.train()  # a flag to keep
    twin_inplace.fc.weight.requires_grad_(False)  # and a requires_grad to keep
    before = [_state(m) for m in (model, twin_inplace)]
    assert all(not tables for _, _, tables in hook_snapshot(model))
    depth = mode_depth()

    class Boom(Exception):
        pass

    try:
        with guided_relus() as stats:
            for m in (model, twin_inplace):
                xi = x.clone().requires_grad_(True)
                torch.autograd.grad(m(xi)[:, 0].sum(), xi)
            assert mode_depth() == depth + 1
            if raises:
                raise Boom
    except Boom:
        assert raises
    assert isinstance(stats, GuidedStats) and stats.calls == 6
    after = [_state(m) for m in (model, twin_inplace)]
    assert after == before
    assert mode_depth() == depth
    assert all(not tables for _, _, tables in hook_snapshot(model))
    # And ReLUs are plain again.
    xr = torch.tensor([1.0, -1.0], requires_grad=True)
    (g,) = torch.autograd.grad((F.relu(xr) * -1).sum(), xr)
    assert torch.equal(g, torch.tensor([-1.0, 0.0]))


# ----------------------------------------------------------------- timm's BatchNormAct2d


def test_timm_efficientnet_lite0_relu6_in_batchnormact():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    relu6 = [m for m in model.modules() if isinstance(m, nn.ReLU6)]
    assert relu6 and any(isinstance(m, BatchNormAct2d) for m in model.modules())
    assert all(m.inplace for m in relu6)  # in place, inside BatchNormAct2d's forward
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    before = _state(model)

    def score(y: torch.Tensor) -> torch.Tensor:
        return y[:, 7].sum()

    guided, stats = guided_grad(model, x, score)
    assert stats.calls == len(relu6) and stats.kinds == {"F.hardtanh": len(relu6)}
    torch.testing.assert_close(guided, reference_guided(model, x, score), rtol=1e-5, atol=1e-6)
    plain = input_grad(model, x, score)
    assert (guided - plain).abs().max() > 0.1 * plain.abs().max()
    assert _state(model) == before
