"""EmoNet: our stronger CNN for 48x48 faces, sized for good accuracy per CPU-minute.

Contract: ``EmoNet(num_classes: int, in_chans: int = 1)``; input (N, in_chans, 48, 48).
"""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class EmoNet(nn.Module):
    def __init__(self, num_classes: int, in_chans: int = 1, width: int = 32, dropout: float = 0.3):
        super().__init__()
        self.features = nn.Sequential(
            _block(in_chans, width),  # 48 -> 24
            _block(width, width * 2),  # 24 -> 12
            _block(width * 2, width * 4),  # 12 -> 6
            _block(width * 4, width * 8),  # 6 -> 3
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(width * 8, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))
