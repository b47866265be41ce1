"""A small conv net with BatchNorm for FashionMNIST: factory ``net:build``.

Three conv-BN-ReLU-maxpool blocks (16, 32, 64 channels of 3x3) take a (n, 1, 28, 28) image to
(n, 64, 3, 3); two Linear layers (576 -> 128 -> 10) give logits (n, 10). 98.6 k parameters;
the convolutions have no bias because the BatchNorm after each one adds its own shift.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv (same padding) -> BatchNorm -> ReLU -> 2x2 max-pool: halves height and width."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(), nn.MaxPool2d(2))


class ConvBN(nn.Module):
    """FashionMNIST classifier: images (n, 1, 28, 28) in [0, 1] -> logits (n, 10)."""

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64), hidden: int = 128,
                 n_classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(conv_block(1, c1), conv_block(c1, c2), conv_block(c2, c3))
        self.fc1 = nn.Linear(c3 * 3 * 3, hidden)   # 28 -> 14 -> 7 -> 3 after three pools
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def build() -> ConvBN:
    """Factory ``net:build``: a fresh, untrained ConvBN (weights come from the problem file)."""
    return ConvBN()
