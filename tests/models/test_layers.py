from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from convlens import LayerNotFoundError, list_layers
from convlens.models import SimpleCNN, evaluating, find_layers
from convlens.models.layers import parse_layer, trace_calls


def test_list_layers_simple_cnn_shapes_and_calls():
    infos = list_layers(SimpleCNN(), (1, 3, 128, 128))
    by = {i.name: i for i in infos}
    assert [i.name for i in infos] == [
        "conv1",
        "bn1",
        "conv2",
        "bn2",
        "conv3",
        "bn3",
        "pool",
        "gap",
        "fc",
    ]
    assert by["conv1"].output_shape == (1, 16, 128, 128)
    assert by["bn3"].output_shape == (1, 64, 32, 32)
    assert by["pool"].calls == 3
    assert by["pool"].output_shapes == ((1, 16, 64, 64), (1, 32, 32, 32), (1, 64, 16, 16))
    assert by["fc"].output_shape == (1, 10) and by["fc"].params == 650
    assert by["conv1"].type == "Conv2d"
    assert by["conv1"].to_dict()["output_shape"] == [1, 16, 128, 128]


def test_list_layers_resnet18_nested_names():
    infos = {i.name: i for i in list_layers(torchvision.models.resnet18())}
    assert infos["layer4.1.conv2"].output_shape == (1, 512, 7, 7)
    assert infos["layer1.0.relu"].calls == 2
    assert infos["relu"].calls == 1
    assert infos["layer4"].depth == 1 and infos["layer4.1.conv2"].depth == 3


def test_list_layers_leaves_model_untouched():
    model = SimpleCNN()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    list_layers(model, (2, 3, 32, 32))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


class DataDependent(nn.Module):
    """Control flow on tensor values: the meta device cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        if float(y.sum()) > -1e9:
            y = self.relu(self.relu(y))
        return y


def test_trace_falls_back_to_a_real_forward():
    model = DataDependent()
    calls = trace_calls(model, (1, 3, 6, 6))
    assert calls["conv"] == [(1, 2, 4, 4)]
    assert calls["relu"] == [(1, 2, 4, 4), (1, 2, 4, 4)]
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_parse_layer():
    assert parse_layer("pool#2") == ("pool", 2)
    assert parse_layer(" layer4.1 ") == ("layer4.1", None)
    with pytest.raises(ValueError, match="channel"):
        parse_layer("layer4:3")


def test_find_layers_suggestions():
    with pytest.raises(LayerNotFoundError) as e:
        find_layers(SimpleCNN(), ["bn_1"])
    assert e.value.suggestions[0] == "bn1"
    with pytest.raises(LayerNotFoundError) as e:
        find_layers(torchvision.models.resnet18(), ["Layer1"])
    assert e.value.suggestions[0] == "layer1"
    with pytest.raises(ValueError, match="no layer names"):
        find_layers(SimpleCNN(), [])


def test_evaluating_restores_even_on_error():
    model = SimpleCNN()
    model.train()
    model.fc.eval()
    with pytest.raises(ZeroDivisionError), evaluating(model):
        assert not model.training and not model.bn1.training
        1 / 0  # noqa: B018
    assert model.training and model.bn1.training and not model.fc.training
