from __future__ import annotations

import pytest
import torch

from convlens.analysis.activations import channel_stats, mean_map, normalize_maps


def test_mean_map_with_and_without_relu():
    act = torch.tensor([[[1.0, -1.0]], [[3.0, -3.0]]])  # [C=2, H=1, W=2]
    torch.testing.assert_close(mean_map(act), torch.tensor([[2.0, -2.0]]))
    torch.testing.assert_close(mean_map(act, relu=True), torch.tensor([[2.0, 0.0]]))
    assert mean_map(act.unsqueeze(0).repeat(3, 1, 1, 1)).shape == (3, 1, 2)
    with pytest.raises(ValueError):
        mean_map(torch.zeros(4))


def test_normalize_maps_each_channel_to_its_own_range():
    act = torch.tensor([[[2.0, 4.0, 3.0]], [[-10.0, 10.0, 0.0]], [[5.0, 5.0, 5.0]]])
    n = normalize_maps(act)
    torch.testing.assert_close(n[0], torch.tensor([[0.0, 1.0, 0.5]]))
    torch.testing.assert_close(n[1], torch.tensor([[0.0, 1.0, 0.5]]))
    torch.testing.assert_close(n[2], torch.zeros(1, 3))  # constant: nothing to show
    assert normalize_maps(act.unsqueeze(0)).shape == act.shape


def test_channel_stats_values():
    act = torch.tensor([[[1.0, -1.0], [3.0, 1.0]], [[0.0, 0.0], [0.0, 2.0]]])
    s = channel_stats(act)
    torch.testing.assert_close(s.mean, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(s.max, torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(s.fraction_active, torch.tensor([0.75, 0.25]))
    assert s.top_channels(1) == [0]
    assert s.top_channels(1, by="fraction_active") == [0]
    assert s.to_dict()["max"] == [3.0, 2.0]
    with pytest.raises(ValueError):
        s.top_channels(1, by="median")


def test_batches_and_linear_outputs_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="pick one image"):
        channel_stats(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="no spatial map"):
        normalize_maps(torch.zeros(1, 10))
