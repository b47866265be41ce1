"""apply(plan): turn a CompressionPlan into pruned, quantised layers.

The stage *apply* of DESIGN.md: pure, vectorised functions. A mask is the plan's share of
least-relevant weights (a rank compare); the survivors are quantised to a small codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedLayer:
    """One compressed tensor: what the codec stores and what the student uses.

    shape: the tensor's shape.
    mask: bool tensor of ``shape``; True where a weight survives.
    indices: int64 ``(n_kept,)``; level index of each survivor, in row-major order of the
        kept positions.
    codebook: float32 ``(k,)``; the level values.
    """

    shape: tuple[int, ...]
    mask: torch.Tensor
    indices: torch.Tensor
    codebook: torch.Tensor

    @property
    def n_kept(self) -> int:
        return int(self.indices.numel())

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def dequantize(self) -> torch.Tensor:
        """float32 tensor of ``shape``: ``codebook[indices]`` at the mask, exact 0 elsewhere."""
        out = torch.zeros(self.numel, dtype=torch.float32)
        out[self.mask.reshape(-1)] = self.codebook[self.indices]
        return out.reshape(self.shape)
