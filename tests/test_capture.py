from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import convlens
from convlens import LayerNotFoundError, capture
from convlens.models import SimpleCNN


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


class Boom(nn.Module):
    """conv -> relu -> a layer that always raises."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        raise RuntimeError("broken forward")


class Swallower(nn.Module):
    """A model that swallows every Exception from its body (as some wrappers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.calls_b = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:  # noqa: SIM105 -- the point is a bare try/except Exception
            x = self.a(x)
        except Exception:
            pass
        if x.device.type != "meta":  # capture's shape trace runs on the meta device
            self.calls_b += 1
        return self.b(x)


def test_bn_output_keeps_negative_values_under_inplace_relu():
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 64, 64)
    acts = capture(model, x, ["bn1"])
    assert acts["bn1"].min() < 0  # resnet's ReLU(inplace=True) would zero them
    model.eval()
    with torch.no_grad():
        expected = model.bn1(model.conv1(x))
    torch.testing.assert_close(acts["bn1"], expected)


def test_outputs_are_detached_cpu_copies():
    model = SimpleCNN()
    x = torch.rand(2, 3, 32, 32)
    acts = capture(model, x, ["conv1", "fc"])
    assert acts["conv1"].device.type == "cpu"
    assert not acts["conv1"].requires_grad
    assert acts["fc"].shape == (2, 10)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(acts["fc"], model(x))


def test_three_dimensional_input_becomes_a_batch_of_one():
    acts = capture(SimpleCNN(), torch.rand(3, 32, 32), "conv1")
    assert acts["conv1"].shape == (1, 16, 32, 32)


def test_hooks_removed_and_flags_restored_when_forward_raises():
    model = Boom()
    model.train()
    model.bn.eval()  # a mixed state must come back exactly
    with pytest.raises(RuntimeError, match="broken forward"):
        capture(model, torch.rand(1, 3, 8, 8), ["conv", "bn"], stop_early=False)
    assert _hook_count(model) == 0
    assert model.training and model.conv.training and not model.bn.training


def test_training_flags_restored_after_success_and_eval_used_inside():
    model = SimpleCNN()
    model.train()
    model.bn2.eval()
    seen = {}

    def record(m, i, o):
        seen["training"] = m.training

    model.bn1.register_forward_hook(record)
    capture(model, torch.rand(2, 3, 16, 16), ["bn1"])
    assert seen["training"] is False  # BatchNorm ran with running statistics
    assert model.training and model.bn1.training and not model.bn2.training
    # running stats untouched: eval mode does not update them
    assert torch.equal(model.bn1.running_mean, torch.zeros(16))


def test_hooks_removed_when_a_name_is_unknown():
    model = SimpleCNN()
    with pytest.raises(LayerNotFoundError):
        capture(model, torch.rand(1, 3, 16, 16), ["bn1", "bn4"])
    assert _hook_count(model) == 0


def test_unknown_layer_lists_close_names():
    model = torchvision.models.resnet18()
    with pytest.raises(LayerNotFoundError) as e:
        capture(model, torch.rand(1, 3, 32, 32), ["layer5"])
    assert isinstance(e.value, KeyError)
    msg = str(e.value)
    assert "'layer5'" in msg and "'layer4'" in msg
    assert not msg.startswith('"')  # not KeyError's quoted repr


def test_module_called_several_times_gets_numbered_keys():
    model = SimpleCNN()
    x = torch.rand(1, 3, 32, 32)
    for stop in (True, False):
        acts = capture(model, x, ["pool"], stop_early=stop)
        assert list(acts) == ["pool#0", "pool#1", "pool#2"]
        assert [tuple(v.shape) for v in acts.values()] == [
            (1, 16, 16, 16),
            (1, 32, 8, 8),
            (1, 64, 4, 4),
        ]
    one = capture(model, x, ["pool#1"])
    assert list(one) == ["pool#1"]
    torch.testing.assert_close(one["pool#1"], acts["pool#1"])
    with pytest.raises(ValueError, match="runs 3 time"):
        capture(model, x, ["pool#3"])


def test_resnet_block_relu_called_twice_with_and_without_stop_early():
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 64, 64)
    a = capture(model, x, ["layer1.0.relu"], stop_early=True)
    b = capture(model, x, ["layer1.0.relu"], stop_early=False)
    assert list(a) == list(b) == ["layer1.0.relu#0", "layer1.0.relu#1"]
    for k in a:
        torch.testing.assert_close(a[k], b[k])


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.early = nn.Conv2d(3, 4, 3, padding=1)
        self.late = nn.Conv2d(4, 4, 3, padding=1)
        self.late_runs = 0
        self.late.register_forward_pre_hook(self._count)

    def _count(self, _module, inputs):
        if inputs[0].device.type != "meta":  # capture's shape trace runs on the meta device
            self.late_runs += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(F.relu(self.early(x)))


def test_stop_early_computes_nothing_after_the_deepest_layer():
    model = Counting()
    x = torch.rand(1, 3, 8, 8)
    early = capture(model, x, ["early"], stop_early=True)
    assert model.late_runs == 0
    full = capture(model, x, ["early"], stop_early=False)
    assert model.late_runs == 1
    torch.testing.assert_close(early["early"], full["early"])
    # our own hook is gone, the user's pre-hook stays
    assert len(model.late._forward_pre_hooks) == 1
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_stop_early_is_not_swallowed_by_model_except_clauses():
    model = Swallower()
    capture(model, torch.rand(1, 3, 4, 4), ["a"])
    assert model.calls_b == 0


def test_same_result_with_and_without_stop_early_on_resnet():
    model = torchvision.models.resnet18()
    x = torch.randn(2, 3, 64, 64)
    names = ["layer2", "bn1", "layer1.1.conv2"]
    a = capture(model, x, names, stop_early=True)
    b = capture(model, x, names, stop_early=False)
    assert list(a) == names
    for k in names:
        torch.testing.assert_close(a[k], b[k])


def test_registered_but_unused_layer_is_an_error():
    model = Boom()
    model.forward = lambda x: model.conv(x)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="did not run"):
        capture(model, torch.rand(1, 3, 8, 8), ["conv", "head"])
    assert _hook_count(model) == 0


def test_non_tensor_output_is_a_clear_error():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return self.pair(x)[0]

    with pytest.raises(TypeError, match="'pair' returns tuple"):
        capture(Net(), torch.rand(1, 3, 4, 4), ["pair"])


def test_data_parallel_is_unwrapped():
    model = SimpleCNN()
    wrapped = nn.DataParallel(model)
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(
        capture(wrapped, x, ["bn1"])["bn1"], capture(model, x, ["bn1"])["bn1"]
    )


def test_comma_separated_string_and_public_reexport():
    acts = convlens.capture(SimpleCNN(), torch.rand(1, 3, 16, 16), "bn1, bn2")
    assert list(acts) == ["bn1", "bn2"]


def test_channel_syntax_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="selects a channel"):
        capture(SimpleCNN(), torch.rand(1, 3, 16, 16), ["bn1:3"])


@pytest.mark.gpu
def test_capture_on_cuda_matches_cpu(exact_cuda):
    model = torchvision.models.resnet18()
    x = torch.randn(2, 3, 64, 64)
    cpu = capture(model, x, ["bn1", "layer3"], device="cpu")
    gpu = capture(model, x, ["bn1", "layer3"], device="cuda")
    assert next(model.parameters()).device.type == "cuda"
    for k in cpu:
        assert gpu[k].device.type == "cpu"
        torch.testing.assert_close(gpu[k], cpu[k], atol=1e-4, rtol=1e-4)
