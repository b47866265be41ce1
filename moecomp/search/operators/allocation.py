"""Allocation: a first population built from the surrogate's per-layer cost tables.

As mixed-precision tools allocate bits under a size budget, each plan here minimises the
predicted divergence ``sum_l cost_l(s_l, b_l)`` (``moecomp.search.surrogate``) for a price of
the weights kept and of the bits they hold. With prices ``lam`` (per kept weight) and ``mu``
(per kept weight-bit), both as shares of all compressible weights, the Lagrangian

    sum_l [ cost_l(s_l, b_l) + lam * kept_l(s_l) / N + mu * kept_l(s_l) * b_l / N ]

separates over layers: each layer takes its own best ``(s, b)`` for those prices, so a whole
grid of prices costs one vectorised ``argmin`` per price pair. Every plan found is optimal for
the additive model under its own size budget (density ``sum kept / N`` and total bits
``sum kept * b / N``; the points of the lower convex hull of the predicted front). ``2obj``
prices the bits alone (size is ``density * bits / 32``); ``3obj`` both, on a grid.

From that pool, the plans of largest predicted hypervolume are chosen (greedily, so they
spread along the predicted front), with the divergence predicted through the surrogate's link.
The rest of the first population comes from another sampling (diversity the model cannot
judge).

During the search, ``moecomp.search.operators.reallocation`` allocates again on the tables
as the evaluated points have corrected them (``search.reallocate``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pymoo.core.problem import Problem
from pymoo.core.sampling import Sampling

from moecomp.search.problem import LayerGenes
from moecomp.search.screening import hv_greedy
from moecomp.search.surrogate import (
    DivergenceTables,
    Link,
    additive,
    exact_objectives,
    kept_counts,
)

# Price grid: this many prices per axis, log-spaced over 10 decades round the table's costs
# (plus a zero price). 40 x 40 pairs gave pools of 300-600 distinct plans on 3-layer nets.
N_PRICES = 40
N_PRICES_2OBJ = 400


def table_costs(tables: DivergenceTables, genes: LayerGenes,
                weights: np.ndarray | None = None) -> np.ndarray:
    """``(L, S, B)`` predicted cost of each layer's (step, bits), each layer's pruning and
    quantisation terms times ``weights (2L,)`` when given; inf beyond a layer's step bound."""
    if weights is None:
        cost = np.asarray(tables.cost, float)
    else:
        w = np.asarray(weights, float)
        L = genes.n_layers
        cost = (tables.prune * w[:L, None])[:, :, None] + tables.quant * w[L:, None, None]
    valid = np.arange(cost.shape[1])[None, :] <= genes.s_idx_max[:, None]
    return np.where(valid[:, :, None], cost, np.inf)


def allocation_pool(tables: DivergenceTables, genes: LayerGenes, mode: str, *,
                    weights: np.ndarray | None = None, signed: bool = False) -> np.ndarray:
    """Distinct genes ``(p, 2L)`` int64 that minimise the Lagrangian above for a grid of
    prices (``mode`` "3obj": kept weights and kept bits priced; "2obj": kept bits).

    weights: ``(2L,)`` multipliers of each layer's pruning and quantisation costs (a fitted
    link's ``exp(theta)``; default 1). signed: in ``3obj``, kept weights are also priced
    negatively. A bound on the mean bits ``b*`` prices ``kept * (b - b*)``, i.e. a negative
    price per kept weight: keeping more weights at few bits lowers the mean, and those plans
    of the three-objective front are found only so."""
    C = table_costs(tables, genes, weights)
    L, S, B = C.shape
    kept = kept_counts(genes, genes.numel).astype(float) / float(genes.numel.sum())  # (L, S)
    bits = np.arange(genes.bits_min, genes.bits_max + 1, dtype=float)
    finite = C[np.isfinite(C)]
    top = max(float(finite.max()) if finite.size else 1.0, 1e-9)
    n = N_PRICES if mode == "3obj" else N_PRICES_2OBJ
    prices = np.concatenate([[0.0], np.geomspace(top * 1e-7, top * 1e3, n)])
    lams = prices if mode == "3obj" else np.array([0.0])
    if signed and mode == "3obj":
        lams = np.concatenate([-prices[:0:-1], prices])
    kb = kept[:, :, None] * bits[None, None, :]  # (L, S, B)
    out = []
    for lam in lams:
        obj = C[None] + lam * kept[None, :, :, None] + prices[:, None, None, None] * kb[None]
        arg = obj.reshape(len(prices), L, S * B).argmin(axis=2)  # (n_prices, L)
        s, b = np.divmod(arg, B)
        out.append(np.concatenate([s, b + genes.bits_min], axis=1))
    return np.unique(np.concatenate(out), axis=0).astype(np.int64)


def allocation_plans(
    n: int,
    tables: DivergenceTables,
    genes: LayerGenes,
    *,
    mode: str,
    ref_point: np.ndarray,
    link: Link | None = None,
) -> np.ndarray:
    """Up to ``n`` genes ``(p, 2L)`` from :func:`allocation_pool`, chosen by greedy predicted
    hypervolume (``ref_point`` raw units, divergence through ``link``)."""
    pool = allocation_pool(tables, genes, mode)
    link = link if link is not None else Link()
    pred = np.exp(link.predict_log(additive(tables, genes, pool)))
    F = np.column_stack([exact_objectives(genes, genes.numel, pool, mode), pred])
    picked, _ = hv_greedy(F, np.zeros((0, F.shape[1])), ref_point, n)
    return pool[picked]


class AllocationSampling(Sampling):
    """pymoo ``Sampling``: ``round(share * n)`` plans of :func:`allocation_plans` first, then
    ``rest`` (another Sampling) for the others (and for any the pool could not fill).

    tables, genes, mode, ref_point, link: as :func:`allocation_plans`.
    """

    def __init__(
        self,
        tables: DivergenceTables,
        genes: LayerGenes,
        rest: Sampling,
        *,
        mode: str,
        ref_point: np.ndarray,
        share: float = 0.5,
        link: Link | None = None,
    ) -> None:
        super().__init__()
        self.tables = tables
        self.genes = genes
        self.rest = rest
        self.mode = mode
        self.ref_point = np.asarray(ref_point, float)
        self.share = float(share)
        self.link = link

    def _do(
        self,
        problem: Problem,
        n_samples: int,
        *args: Any,
        random_state: np.random.Generator | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        if random_state is None:
            raise ValueError("AllocationSampling needs the algorithm's random_state")
        k = min(n_samples, int(round(self.share * n_samples)))
        alloc = allocation_plans(
            k, self.tables, self.genes, mode=self.mode, ref_point=self.ref_point,
            link=self.link,
        ) if k > 0 else np.zeros((0, problem.n_var), np.int64)
        m = n_samples - len(alloc)
        other = self.rest.do(problem, m, random_state=random_state).get("X") if m > 0 else \
            np.zeros((0, problem.n_var))
        return np.concatenate([alloc, np.rint(other).astype(np.int64)]).astype(np.int64)
