"""Magnitude relevance: a weight matters as much as its absolute value."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecomp.config import RelevanceConfig
from moecomp.relevance.base import layer_weight
from moecomp.target import LayerRef, Target


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """``|w|`` as float32, the shape of ``w``."""
    return w.detach().abs().float()


@dataclass(frozen=True)
class Magnitude:
    """Scorer ``|w|``; needs no data and ignores the seed."""

    def __call__(self, target: Target, layer: LayerRef, *, seed: int) -> torch.Tensor:
        return magnitude_scores(layer_weight(target, layer))

    @classmethod
    def from_config(cls, cfg: RelevanceConfig, *, progress: bool = False) -> Magnitude:
        return cls()
