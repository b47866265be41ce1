"""Repair: genes back onto the integer grid inside their bounds."""

from __future__ import annotations

from typing import Any

import numpy as np
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair


def repair_genes(X: np.ndarray, xl: np.ndarray, xu: np.ndarray) -> np.ndarray:
    """Round ``X (n, n_var)`` to the nearest integers and clip to ``[xl, xu]`` (``(n_var,)``
    each); returns int64 ``(n, n_var)``."""
    return np.clip(np.rint(np.asarray(X, dtype=float)), xl, xu).astype(np.int64)


class BoundsRepair(Repair):
    """pymoo ``Repair`` binding :func:`repair_genes` to the problem's bounds."""

    def _do(self, problem: Problem, X: np.ndarray, **kwargs: Any) -> np.ndarray:
        return repair_genes(X, problem.xl, problem.xu)
