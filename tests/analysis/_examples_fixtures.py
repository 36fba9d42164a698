"""Tiny models and seeded datasets for the dataset-examples tests, and the brute force
they are checked against (every map captured at once, sorted in Python)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from convlens import capture


class Tiny(nn.Module):
    """conv (3->4) -> ReLU -> maxpool 2 -> conv (4->6) -> gap -> fc (6->3)."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.conv2(x)
        return self.fc(self.gap(x).flatten(1))


def tiny_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def tiny_data(n: int = 37, size: int = 12, seed: int = 1, classes: int = 3) -> list[Any]:
    """``n`` seeded (image, label) pairs; images 20 and 30 are copies of image 5, so their
    scores tie exactly (ties must go to the lower index)."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 3, size, size, generator=g)
    xs[5] *= 3  # a strong image, so its copies reach the top-k of many channels
    for dup in (20, 30):
        if dup < n:
            xs[dup] = xs[5]
    labels = torch.randint(0, classes, (n,), generator=g)
    return [(xs[i], int(labels[i])) for i in range(n)]


def brute_force(
    model: nn.Module,
    data: list[Any],
    layer: str,
    k: int,
    reduce: str = "max",
    batch_size: int = 8,
) -> dict[str, Any]:
    """Capture every map and compute what dataset_examples must return. The maps are taken
    in batches of ``batch_size`` rows, a short last one padded with copies, as the pass
    runs them: a BLAS may round a row differently in batches of other sizes."""
    x = torch.stack([d[0] for d in data])
    labels = [d[1] for d in data]
    parts = []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        short = batch_size - len(xb)
        if short:
            xb = torch.cat([xb, xb[-1:].expand(short, *xb.shape[1:])])
        parts.append(capture(model, xb, [layer])[layer][: batch_size - short])
    out = torch.cat(parts)
    flat = out.flatten(2).numpy() if out.ndim == 4 else out.numpy()[:, :, None]
    w = out.shape[-1] if out.ndim == 4 else 1
    n, c, _ = flat.shape
    result: dict[str, Any] = {"top": [], "bottom": [], "stats": [], "class_means": []}
    for ch in range(c):
        maps = flat[:, ch]
        scores = (
            maps.max(axis=1)
            if reduce == "max"
            else torch.from_numpy(maps).mean(dim=1).numpy()  # torch's float32 mean, as the pass
        )
        pos = maps.argmax(axis=1)  # numpy: the first maximum
        rows = [
            (float(scores[i]), i, int(pos[i]) // w, int(pos[i]) % w, labels[i]) for i in range(n)
        ]
        top = sorted(rows, key=lambda r: (-r[0], r[1]))[:k]
        bottom = sorted(rows, key=lambda r: (r[0], r[1]))[:k]
        result["top"].append(top)
        result["bottom"].append(bottom)
        s64 = scores.astype(np.float64)
        result["stats"].append(
            (
                n,
                float(s64.mean()),
                float(s64.std()),
                float(scores.min()),
                float(scores.max()),
                float((maps > 0).sum()) / maps.size,
            )
        )
        means = []
        for cls in range(max(labels) + 1):
            sel = [s64[i] for i in range(n) if labels[i] == cls]
            means.append(sum(sel) / len(sel) if sel else math.nan)
        result["class_means"].append(means)
    return result
