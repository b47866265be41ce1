"""Sensitivity-seeded sampling: the first population, spread along the likely front.

Three kinds of individuals:

- *seeded* (most): an aggressiveness ``a_k ~ U(0, 1)`` per individual and kind of gene
  (sparsity genes, bits genes: drawn apart, so the seeds cover the 2-D front of density,
  bits and divergence rather than one curve through it); gene ``j`` moves a share
  ``a_k ** gamma_j`` of its range toward compression, with ``gamma_j`` from 0.5 for the least
  sensitive gene of its kind to 2 for the most sensitive (insensitive layers are compressed
  harder), plus a little noise;
- *extreme*: every gene at the same share ``t`` of its range, ``t`` evenly spaced in [0, 1]
  (the intact model and the most compressed one are the ends);
- *random*: uniform over the bounds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling

from moecomp.search.sensitivity import sensitivity_rank

# Noise of a seeded gene, as a share of its range: breaks ties between individuals of similar
# aggressiveness without undoing the ordering by sensitivity.
_JITTER = 0.05


def _from_steps(
    z: np.ndarray, xl: np.ndarray, xu: np.ndarray, compress_dir: np.ndarray
) -> np.ndarray:
    return np.where(compress_dir > 0, xl + z, xu - z).astype(np.int64)


def sensitivity_sampling(
    n: int,
    xl: np.ndarray,
    xu: np.ndarray,
    sensitivity: np.ndarray | None,
    compress_dir: np.ndarray,
    rng: np.random.Generator,
    *,
    random_share: float = 0.2,
    extreme_share: float = 0.1,
) -> np.ndarray:
    """``n`` individuals, int64 ``(n, n_var)`` within ``[xl, xu]`` (see the module docstring).

    sensitivity: ``(n_var,)`` marginal divergence per gene (None: all alike).
    compress_dir: ``(n_var,)`` +1 where a larger value compresses more, -1 otherwise.
    random_share, extreme_share: shares of random and extreme individuals (rounded).
    Rows come in the order seeded, extreme, random.
    """
    xl = np.asarray(xl, dtype=np.int64)
    xu = np.asarray(xu, dtype=np.int64)
    cdir = np.asarray(compress_dir, dtype=np.int64)
    n_var = len(xl)
    span = (xu - xl).astype(float)
    n_rand = int(round(n * random_share))
    n_ext = min(int(round(n * extreme_share)), n - n_rand)
    n_seed = n - n_rand - n_ext

    r = sensitivity_rank(sensitivity, n_var, cdir)
    gamma = 2.0 ** (2.0 * r - 1.0)
    _, kind = np.unique(cdir, return_inverse=True)
    a = rng.random((n_seed, int(kind.max()) + 1))[:, kind]
    noise = rng.normal(0.0, _JITTER, size=(n_seed, n_var))
    t_seed = np.clip(a ** gamma[None, :] + noise, 0.0, 1.0)

    t_ext = np.linspace(0.0, 1.0, n_ext)[:, None] * np.ones((1, n_var))
    z = np.rint(np.concatenate([t_seed, t_ext]) * span).astype(np.int64)
    designed = _from_steps(z, xl, xu, cdir)

    rand = rng.integers(xl, xu + 1, size=(n_rand, n_var))
    return np.concatenate([designed, rand]).astype(np.int64)


class SensitivitySampling(Sampling):
    """pymoo ``Sampling`` binding :func:`sensitivity_sampling`'s parameters."""

    def __init__(
        self,
        sensitivity: np.ndarray | None,
        compress_dir: np.ndarray,
        *,
        random_share: float = 0.2,
        extreme_share: float = 0.1,
    ) -> None:
        super().__init__()
        self.sensitivity = None if sensitivity is None else np.asarray(sensitivity, float)
        self.compress_dir = np.asarray(compress_dir, dtype=np.int64)
        self.random_share = float(random_share)
        self.extreme_share = float(extreme_share)

    def _do(
        self,
        problem: Problem,
        n_samples: int,
        *args: Any,
        random_state: np.random.Generator | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        if random_state is None:
            raise ValueError("SensitivitySampling needs the algorithm's random_state")
        return sensitivity_sampling(
            n_samples,
            problem.xl,
            problem.xu,
            self.sensitivity,
            self.compress_dir,
            random_state,
            random_share=self.random_share,
            extreme_share=self.extreme_share,
        )
