"""Baselines the search is compared against (stage 11, Compare, of shared/DESIGN.md).

- :mod:`moecomp.baseline.directed_evolution`: the single-objective Directed Evolution of
  seed 1 (Franca-Neto, 2022) on DEAP, one target sparsity per run.
"""

from moecomp.baseline.directed_evolution import (
    DEConfig,
    DEResult,
    LayerRecord,
    apportion,
    run_directed_evolution,
    select_bits,
)

__all__ = [
    "DEConfig",
    "DEResult",
    "LayerRecord",
    "apportion",
    "run_directed_evolution",
    "select_bits",
]
