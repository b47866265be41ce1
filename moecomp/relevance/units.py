"""Unit-structured ranks: let whole hidden units go first (``relevance.units``).

A scorer ranks single weights, so the masks it gives are scattered: at 94 % sparsity nearly
every hidden unit keeps a few inputs and a few outputs, and the coded positions (about
5 bits per survivor) cost more than the survivors' values. Dropping whole units instead
leaves denser rows in fewer units, whose masks code for less (``codec.masks``), and frees
the next layer's columns of the dropped units.

For two consecutive compressible tensors ``A`` (``out`` rows) and ``B`` whose input
dimension is ``out * g`` (a Linear after a Linear, ``g = 1``; a Conv2d after a Conv2d, ``g``
= kernel size; a Linear after a flattened Conv2d, ``g`` = spatial positions, channel-major)
each unit ``i`` gets an importance: the mean rank percentile of its row in ``A`` and of its
``g``-column group in ``B``. With ``v[i]`` the unit's percentile among the ``out`` units, a
weight's score becomes its own rank percentile times ``v[i] ** strength`` in both tensors,
and the ranks are re-derived from those scores. ``strength = 0`` keeps the scorer's ranks;
larger values prune weak units more wholly. The last tensor's rows (the outputs) are never
structured. The layers are assumed to form a chain in ``target.layers`` order (the zoo
models do); for other models the ranks stay valid permutations, only the coupling may be
meaningless.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moecomp.relevance.base import scores_to_ranks
from moecomp.target import LayerRef


def _percentile(x: torch.Tensor) -> torch.Tensor:
    """``(rank + 1) / n`` of each entry of 1-D ``x`` (float64, in (0, 1])."""
    order = torch.argsort(x, stable=True)
    p = torch.empty_like(x, dtype=torch.float64)
    p[order] = torch.arange(1, x.numel() + 1, dtype=torch.float64) / x.numel()
    return p


def unit_pairs(layers: Sequence[LayerRef]) -> list[tuple[int, int]]:
    """``(index of A, group size g)`` for every consecutive pair whose shapes couple."""
    pairs = []
    for k in range(len(layers) - 1):
        a, b = layers[k], layers[k + 1]
        if len(a.shape) < 2 or len(b.shape) < 2:
            continue
        out, b_in = a.shape[0], math.prod(b.shape[1:])
        if out >= 2 and b_in % out == 0:
            pairs.append((k, b_in // out))
    return pairs


def structure_ranks(ranks: dict[str, torch.Tensor], layers: Sequence[LayerRef],
                    strength: float) -> dict[str, torch.Tensor]:
    """The ranks with weak units' weights moved toward the front (see the module doc)."""
    if strength == 0:
        return ranks
    pct = {ref.name: (ranks[ref.name].double() + 1) / ref.numel for ref in layers}
    factor: dict[str, torch.Tensor] = {}  # only the layers some unit touches
    for k, g in unit_pairs(layers):
        a, b = layers[k], layers[k + 1]
        out = a.shape[0]
        rows = pct[a.name].reshape(out, -1).mean(1)
        cols = pct[b.name].reshape(b.shape[0], out, g).mean((0, 2))
        v = _percentile(rows + cols) ** strength
        fa = factor.get(a.name, torch.ones(a.shape, dtype=torch.float64))
        factor[a.name] = fa * v.reshape(out, *([1] * (len(a.shape) - 1)))
        fb = factor.get(b.name, torch.ones(b.shape, dtype=torch.float64))
        factor[b.name] = (fb.reshape(b.shape[0], out, g) * v.reshape(1, out, 1)).reshape(b.shape)
    return {ref.name: scores_to_ranks(pct[ref.name] * factor[ref.name]).contiguous()
            if ref.name in factor else ranks[ref.name] for ref in layers}
