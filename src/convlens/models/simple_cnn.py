"""The course's SimpleCNN: three conv blocks, global average pooling, one linear layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SimpleCNN"]


class SimpleCNN(nn.Module):
    """The course's small CNN: ``conv 3->16->32->64`` (3x3, padding 1), each followed by
    BatchNorm, ReLU and a 2x2 max-pool, then global average pooling and a linear layer.

    Module names are the course's: ``conv1 bn1 conv2 bn2 conv3 bn3 pool gap fc``. The one
    ``pool`` module runs three times per forward (``pool#0``, ``pool#1``, ``pool#2`` in
    :func:`convlens.capture`); ReLU is functional, so ``bn1..bn3`` hold the pre-ReLU values
    the course plots. 24,458 parameters for 10 classes.

    Example:
        >>> model = SimpleCNN(num_classes=10)
        >>> model(torch.zeros(2, 3, 128, 128)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2, 2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = self.pool(F.relu(self.bn3(self.conv3(x))))
        x = self.gap(x).flatten(1)
        return self.fc(x)
