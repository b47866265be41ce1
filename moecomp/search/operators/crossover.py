"""Layer-wise crossover: each child takes every layer's genes from one of its two parents.

A layer's (sparsity, bits) pair is kept together: the two are tuned against each other
(a layer pruned hard tolerates fewer bits), so splitting them mostly breaks good pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pymoo.core.crossover import Crossover
from pymoo.core.problem import Problem


def layerwise_crossover(X: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Children ``(2, n_matings, n_var)`` of parents ``X (2, n_matings, n_var)``.

    groups: ``(n_var,)`` int, the layer of each gene (genes of one layer move together).
    For each mating and layer, a fair coin decides whether child 0 takes that layer from
    parent 0 or parent 1; child 1 takes the other parent's layer.
    """
    X = np.asarray(X)
    if X.ndim != 3 or X.shape[0] != 2:
        raise ValueError(f"parents: expected shape (2, n_matings, n_var), got {X.shape}")
    groups = np.asarray(groups, dtype=np.int64)
    n_groups = int(groups.max()) + 1
    take_first = rng.random((X.shape[1], n_groups)) < 0.5
    mask = take_first[:, groups]
    a, b = X[0], X[1]
    return np.stack([np.where(mask, a, b), np.where(mask, b, a)])


class LayerwiseCrossover(Crossover):
    """pymoo ``Crossover`` (2 parents, 2 children) binding :func:`layerwise_crossover`.

    groups: ``(n_var,)`` layer of each gene; prob: chance a mating crosses at all (parents are
    copied otherwise).
    """

    def __init__(self, groups: np.ndarray, *, prob: float = 0.9) -> None:
        super().__init__(2, 2, prob=prob)
        self.groups = np.asarray(groups, dtype=np.int64)

    def _do(
        self,
        problem: Problem,
        X: np.ndarray,
        *args: Any,
        random_state: np.random.Generator | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        if random_state is None:
            raise ValueError("LayerwiseCrossover needs the algorithm's random_state")
        return layerwise_crossover(X, self.groups, random_state)
