"""pymoo algorithms for the search, built from a SearchConfig.

``operators = "de"``: sensitivity-seeded sampling (or random when ``sampling = "random"``),
layer-wise crossover, directed mutation, repair to bounds. ``operators = "default"``: what
pymoo's documentation uses for integer problems: ``IntegerRandomSampling``, SBX and PM
(``eta = 3``) on floats rounded by ``RoundingRepair``; only ``crossover_prob`` is taken
from the config.

Algorithms: NSGA-II (default), NSGA-III and MOEA/D with Das-Dennis reference directions
(``get_reference_directions``; the most that fit in ``pop_size``), SPEA2, AGE-MOEA (needs
numba). MOEA/D is pymoo's ``ParallelMOEAD``: it asks for a whole generation at once, which
the checkpointing ask-and-tell loop needs (the sequential MOEAD keeps a generator, which
cannot be saved).
"""

from __future__ import annotations

import math

import numpy as np
from pymoo.core.algorithm import Algorithm
from pymoo.core.crossover import Crossover
from pymoo.core.mutation import Mutation
from pymoo.core.sampling import Sampling
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.operators.sampling.rnd import IntegerRandomSampling
from pymoo.util.ref_dirs import get_reference_directions

from moecomp.config import SearchConfig
from moecomp.errors import ConfigError
from moecomp.search.operators import (
    BoundsRepair,
    DirectedMutation,
    LayerwiseCrossover,
    SensitivitySampling,
)
from moecomp.search.problem import SearchProblem

ALGORITHMS = ("nsga2", "nsga3", "spea2", "moead", "age")


def operators(
    cfg: SearchConfig, problem: SearchProblem, sensitivity: np.ndarray | None
) -> tuple[Sampling, Crossover, Mutation]:
    """``(sampling, crossover, mutation)`` for ``cfg.operators``; fresh instances each call."""
    if cfg.operators == "default":
        return (
            IntegerRandomSampling(),
            SBX(prob=cfg.crossover_prob, eta=3.0, vtype=float, repair=RoundingRepair()),
            PM(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
        )
    sampling: Sampling
    if cfg.sampling == "sensitivity":
        sampling = SensitivitySampling(
            sensitivity,
            problem.compress_dir,
            random_share=cfg.random_share,
            extreme_share=cfg.extreme_share,
        )
    else:
        sampling = IntegerRandomSampling()
    crossover = LayerwiseCrossover(problem.groups, prob=cfg.crossover_prob)
    mutation = DirectedMutation(
        sensitivity,
        problem.compress_dir,
        prob=cfg.mutation_prob,
        strength=cfg.mutation_strength,
        directedness=cfg.directed_strength,
        weight_share=problem.gene_share,
    )
    return sampling, crossover, mutation


def reference_directions(n_obj: int, pop_size: int) -> np.ndarray:
    """Das-Dennis directions ``(m, n_obj)``, the largest set with ``m <= pop_size``."""
    p = 1
    while math.comb(p + 1 + n_obj - 1, n_obj - 1) <= pop_size:
        p += 1
    return np.asarray(get_reference_directions("das-dennis", n_obj, n_partitions=p))


def make_algorithm(
    cfg: SearchConfig, problem: SearchProblem, sensitivity: np.ndarray | None = None
) -> Algorithm:
    """A fresh pymoo algorithm for ``cfg.algorithm`` (not set up yet)."""
    sampling, crossover, mutation = operators(cfg, problem, sensitivity)
    common = {
        "sampling": sampling,
        "crossover": crossover,
        "mutation": mutation,
        "repair": BoundsRepair(),
        "seed": cfg.seed,
    }
    name = cfg.algorithm
    if name == "nsga2":
        from pymoo.algorithms.moo.nsga2 import NSGA2

        return NSGA2(pop_size=cfg.pop_size, eliminate_duplicates=True, **common)
    if name == "nsga3":
        from pymoo.algorithms.moo.nsga3 import NSGA3

        return NSGA3(
            ref_dirs=reference_directions(problem.n_obj, cfg.pop_size),
            pop_size=cfg.pop_size,
            eliminate_duplicates=True,
            **common,
        )
    if name == "spea2":
        from pymoo.algorithms.moo.spea2 import SPEA2, SPEA2Survival

        # pymoo's default survival is one instance shared by every SPEA2 of the process, and
        # it keeps normalisation points: two searches in one process would disturb each other
        return SPEA2(
            pop_size=cfg.pop_size,
            eliminate_duplicates=True,
            survival=SPEA2Survival(normalize=True),
            **common,
        )
    if name == "moead":
        if problem.n_ieq_constr:
            raise ConfigError(
                "search.algorithm",
                "moead does not support constraints "
                "(objectives.max_*); use nsga2, nsga3, spea2 or age",
            )
        from pymoo.algorithms.moo.moead import ParallelMOEAD

        ref_dirs = reference_directions(problem.n_obj, cfg.pop_size)
        return ParallelMOEAD(
            ref_dirs, n_neighbors=min(15, len(ref_dirs)), prob_neighbor_mating=0.7, **common
        )
    if name == "age":
        try:
            from pymoo.algorithms.moo.age import AGEMOEA
        except Exception as e:  # pymoo raises a bare Exception when numba is missing
            raise ConfigError(
                "search.algorithm", f"'age' (AGE-MOEA) is not available: {e}"
            ) from None
        return AGEMOEA(pop_size=cfg.pop_size, eliminate_duplicates=True, **common)
    raise ConfigError("search.algorithm", f"must be one of {', '.join(ALGORITHMS)}, got {name!r}")
