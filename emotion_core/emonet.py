"""EmoNet: our CNN for 48x48 faces, sized for accuracy per CPU-minute.

``EmoNet(num_classes: int, in_chans: int = 1)``; input (N, in_chans, 48, 48).

Design (measured on 2 Zen 4 cores, forward+backward, batch 128; see bench/train_bench.py):
- VGG-style stages of 3x3 conv -> batch norm -> ReLU, two convs per stage, 2x2 max pooling
  between stages: 48 -> 24 -> 12 -> 6 -> 3. Widths double as the resolution halves
  (32, 64, 128, 256), so every conv costs about the same (~21 M MACs) and the compute sits
  where FER's cues are (mouth, eyes, brows at 12x12 and 6x6).
- Global average pooling, dropout, one linear head: 1.2 M parameters, no large dense layer to
  overfit 20k faces.
- Plain convolutions, no depthwise/grouped ones: on CPU, oneDNN runs dense 3x3 convs in
  channels_last and bf16 at high efficiency, while depthwise convs are memory-bound and slower
  per FLOP. With bf16 autocast (AVX512-BF16) it trains at about 400 images/s on 2 cores, ~36
  epochs of FER2013 in 30 minutes.
- Kaiming init for convs; otherwise kept plain so weights from other VGG-style nets map easily.

On fp32-only CPUs (no bf16) this width buys too few epochs in a 30-minute budget (9-14 here);
the registry's ``emonet_s`` (one conv in the 48/24-px stages, half the widths: 16/32/64/128) gets
43-53 and is the most accurate model at that budget (README, issue #13 section).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class EmoNet(nn.Module):
    """``widths``/``depths`` per stage (each stage ends with 2x2 max pooling)."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        dropout: float = 0.3,
    ):
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError("widths and depths need one entry per stage")
        layers: list[nn.Module] = []
        cin = in_chans
        for width, depth in zip(widths, depths):
            for _ in range(depth):
                layers += _conv_bn_relu(cin, width)
                cin = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))
