from __future__ import annotations

import pytest
import torch

from convlens.models import SimpleCNN


def test_course_parameter_count_and_names():
    model = SimpleCNN(num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 24_458
    names = [n for n, _ in model.named_children()]
    assert names == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "pool", "gap", "fc"]


def test_architecture_details():
    model = SimpleCNN()
    for conv, (cin, cout) in zip(
        [model.conv1, model.conv2, model.conv3], [(3, 16), (16, 32), (32, 64)]
    ):
        assert (conv.in_channels, conv.out_channels) == (cin, cout)
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    assert model.pool.kernel_size == 2 and model.pool.stride == 2
    assert model.fc.in_features == 64


def test_forward_shapes_and_other_class_counts():
    model = SimpleCNN(num_classes=5).eval()
    assert model(torch.zeros(3, 3, 128, 128)).shape == (3, 5)
    assert model(torch.zeros(1, 3, 37, 50)).shape == (1, 5)  # any size: global average pool
    assert sum(p.numel() for p in model.parameters()) == 24_458 - 650 + 325
    with pytest.raises(ValueError):
        SimpleCNN(num_classes=0)


def test_forward_matches_the_course_formula():
    model = SimpleCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    import torch.nn.functional as F

    h = x
    for conv, bn in [(model.conv1, model.bn1), (model.conv2, model.bn2), (model.conv3, model.bn3)]:
        h = F.max_pool2d(F.relu(bn(conv(h))), 2)
    expected = model.fc(h.mean(dim=(2, 3)))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
