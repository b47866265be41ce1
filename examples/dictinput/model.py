"""A two-branch MLP whose forward takes keyword inputs: factory ``model:build``.

``forward(pixels, stats)``: ``pixels`` (n, 64) are the 8x8 digit images in [0, 1], ``stats``
(n, 20) engineered features of the same images (see :func:`data.features`). Each branch has
its own Linear layer; their ReLU outputs are concatenated and two Linear layers give logits
(n, 10). 15.8 k parameters.
"""

from __future__ import annotations

import torch
from torch import nn

N_PIXELS = 64
N_STATS = 20


class TwoBranch(nn.Module):
    """pixels -> 96, stats -> 32, concat -> 64 -> 10 logits (ReLU between layers)."""

    def __init__(self, n_pixels: int = N_PIXELS, n_stats: int = N_STATS, n_classes: int = 10
                 ) -> None:
        super().__init__()
        self.pixels = nn.Linear(n_pixels, 96)
        self.stats = nn.Linear(n_stats, 32)
        self.joint = nn.Linear(96 + 32, 64)
        self.out = nn.Linear(64, n_classes)

    def forward(self, pixels: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.pixels(pixels)), torch.relu(self.stats(stats))], dim=1)
        return self.out(torch.relu(self.joint(h)))


def build() -> TwoBranch:
    """Factory ``model:build``: a fresh, untrained TwoBranch."""
    return TwoBranch()
