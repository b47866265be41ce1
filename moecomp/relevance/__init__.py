"""Relevance: for every compressible tensor, an order of its weights from least to most
relevant (stage 2 of shared/DESIGN.md), and the redundancy bound of each layer (seed 3).

``SCORERS`` maps the names a problem file uses (``relevance.scorer``) to scorer classes;
an instance is a :class:`Scorer`. :func:`compute_ranks` runs the configured one over a
target and caches the ranks on disk.
"""

from moecomp.relevance.base import Scorer, is_permutation, scores_to_ranks
from moecomp.relevance.cache import cache_key, cache_path, compute_ranks, load_ranks
from moecomp.relevance.directed import DirectedEvolution, evolve_order, evolve_set
from moecomp.relevance.magnitude import Magnitude, magnitude_scores
from moecomp.relevance.redundancy import (
    effective_rank,
    layer_gradients,
    redundancy_bounds,
    sparsity_bound,
)
from moecomp.relevance.registry import SCORERS, ScorerClass
from moecomp.relevance.taylor import Taylor, perturbed_weights

__all__ = [
    "SCORERS",
    "DirectedEvolution",
    "Magnitude",
    "Scorer",
    "ScorerClass",
    "Taylor",
    "cache_key",
    "cache_path",
    "compute_ranks",
    "effective_rank",
    "evolve_order",
    "evolve_set",
    "is_permutation",
    "layer_gradients",
    "load_ranks",
    "magnitude_scores",
    "perturbed_weights",
    "redundancy_bounds",
    "scores_to_ranks",
    "sparsity_bound",
]
