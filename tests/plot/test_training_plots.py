from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from convlens.plot import confusion, curves, filters_before_after, predictions

HISTORY = [
    {"epoch": 1, "train_loss": 2.0, "train_accuracy": 0.3, "val_loss": 1.8, "val_accuracy": 0.4},
    {"epoch": 2, "train_loss": 1.5, "train_accuracy": 0.5, "val_loss": 1.6, "val_accuracy": 0.45},
    {"epoch": 3, "train_loss": 1.2, "train_accuracy": 0.6},  # validate="last" leaves gaps
]


def test_curves_plot_the_history():
    fig = curves(HISTORY)
    assert isinstance(fig, Figure)
    loss_ax, acc_ax = fig.axes
    train_line, val_line = loss_ax.get_lines()
    assert list(train_line.get_ydata()) == [2.0, 1.5, 1.2]
    assert list(val_line.get_xdata()) == [1, 2] and list(val_line.get_ydata()) == [1.8, 1.6]
    assert list(acc_ax.get_lines()[1].get_ydata()) == [40.0, 45.0]
    with pytest.raises(ValueError, match="empty"):
        curves([])


def test_filters_before_after_tiles_are_normalised_per_filter():
    before = torch.randn(16, 3, 3, 3)
    after = before * 10 + 5  # an affine change: the same picture after per-filter scaling
    fig = filters_before_after(before, after)
    images = [ax.get_images()[0].get_array() for ax in fig.axes if ax.get_images()]
    assert len(images) == 32
    for i in range(16):
        a, b = np.asarray(images[i]), np.asarray(images[16 + i])
        assert a.shape == (3, 3, 3) and a.min() == pytest.approx(0) and a.max() == pytest.approx(1)
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="RGB"):
        filters_before_after(torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3))


def test_confusion_is_row_normalised_with_counts():
    m = torch.tensor([[3, 1], [0, 4]])
    fig = confusion(m, ["a", "b"])
    data = np.asarray(fig.axes[0].get_images()[0].get_array())
    np.testing.assert_allclose(data, [[0.75, 0.25], [0.0, 1.0]])
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["1", "3", "4"]
    with pytest.raises(ValueError):
        confusion(m, ["a"])


def test_predictions_colour_right_and_wrong():
    imgs = torch.rand(3, 3, 8, 8)
    fig = predictions(imgs, [0, 1, 1], [0, 0, 1], ["cat", "dog"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert titles[1] == "pred: cat\ntrue: dog"
    colours = [ax.title.get_color() for ax in fig.axes if ax.get_images()]
    assert colours[0] == colours[2] != colours[1]
    with pytest.raises(ValueError):
        predictions(imgs, [0], [0, 1, 1], ["cat", "dog"])
