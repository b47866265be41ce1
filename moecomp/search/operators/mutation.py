"""Directed mutation (Directed Evolution, seed 1): compress where it is cheap, relax where not.

Besides small random moves (exploration), a directed move takes compression away from a layer
whose marginal divergence is large and gives it to one whose marginal divergence is small, at
about the same size. ``directedness`` is the chance of that move. Marginal divergence is
either one ranking for every child (``sensitivity``: the single-layer probes, refreshed from
the evaluated points) or each child's own (``local``: :func:`local_marginals`, the surrogate's
cost tables at the child's genes: what one more step of compression adds per bit saved).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from pymoo.core.mutation import Mutation
from pymoo.core.problem import Problem

from moecomp.search.sensitivity import sensitivity_rank

if TYPE_CHECKING:
    from moecomp.search.problem import LayerGenes
    from moecomp.search.surrogate import DivergenceTables


def max_steps(xl: np.ndarray, xu: np.ndarray, strength: int) -> np.ndarray:
    """Largest move ``(n_var,)`` per gene: ``strength`` steps for the widest gene, scaled by
    each gene's range (so a bits gene with 8 values moves by 1, a sparsity gene with 99 by up
    to ``strength``), at least 1."""
    span = (np.asarray(xu) - np.asarray(xl)).astype(float)
    widest = max(float(span.max()), 1.0)
    return np.maximum(1, np.rint(strength * span / widest)).astype(np.int64)


def local_marginals(tables: DivergenceTables, genes: LayerGenes, X: np.ndarray) -> np.ndarray:
    """``(n, 2L)``: for each row of genes ``X (n, 2L)``, what one more step of compression of
    each gene adds to the divergence by the surrogate's tables (pruning one more sparsity step
    at the layer's bits; one bit less at its sparsity), per weight bit it saves (the layer's
    weight share times the bits or the kept share the step removes). ``inf`` where the gene
    is at its compression bound (nothing to save: never the cheap one)."""
    X = np.asarray(X, dtype=np.int64)
    L = genes.n_layers
    rows = np.arange(L)[None, :]
    s, b = X[:, :L], X[:, L:] - genes.bits_min
    n_s = tables.prune.shape[1]
    cost = tables.cost
    now = cost[rows, s, b]
    s_up = np.minimum(s + 1, np.minimum(genes.s_idx_max[None, :], n_s - 1))
    b_down = np.maximum(b - 1, 0)
    share = np.asarray(genes.weight_share, float)[None, :]
    kept = np.maximum(1.0 - s * genes.step, 0.0)
    save_s = share * genes.step * (b + genes.bits_min) * (s_up > s)
    save_b = share * kept * (b_down < b)
    with np.errstate(divide="ignore", invalid="ignore"):
        m_s = np.where(save_s > 0, np.maximum(cost[rows, s_up, b] - now, 0.0) / save_s, np.inf)
        m_b = np.where(save_b > 0, np.maximum(cost[rows, s, b_down] - now, 0.0) / save_b,
                       np.inf)
    return np.concatenate([m_s, m_b], axis=1)


def row_ranks(marginal: np.ndarray, kind_of: np.ndarray) -> np.ndarray:
    """``(n, n_var)`` in [0, 1]: each gene's rank by ``marginal (n, n_var)`` among the genes of
    its kind in its row (0 the cheapest, 1 the dearest; ties by position)."""
    M = np.asarray(marginal, float)
    r = np.zeros_like(M)
    for k in np.unique(kind_of):
        cols = np.flatnonzero(kind_of == k)
        order = np.argsort(np.argsort(M[:, cols], axis=1, kind="stable"), axis=1)
        r[:, cols] = order / max(len(cols) - 1, 1)
    return r


def _pick(rng_gumbel: np.ndarray, weight: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Per row, one column drawn with probability proportional to ``weight`` (``(n_var,)``, or
    ``(n, n_var)`` one per row) among the ``allowed`` ones (Gumbel-max on given noise
    ``(n, n_var)``); -1 where none is allowed."""
    w = np.asarray(weight, float)
    score = np.where(allowed, np.log(w if w.ndim == 2 else w[None, :]) + rng_gumbel, -np.inf)
    pick = np.argmax(score, axis=1)
    return np.where(np.isfinite(score.max(axis=1)), pick, -1)


def directed_mutation(
    X: np.ndarray,
    xl: np.ndarray,
    xu: np.ndarray,
    sensitivity: np.ndarray | None,
    prob: float,
    strength: int,
    directedness: float,
    rng: np.random.Generator,
    *,
    compress_dir: np.ndarray | None = None,
    weight_share: np.ndarray | None = None,
    local: np.ndarray | None = None,
) -> np.ndarray:
    """Mutated copy (int64 ``(n, n_var)``) of genes ``X (n, n_var)`` within ``[xl, xu]``.

    Two moves:

    - *explore*: each gene, with chance ``prob`` (at least one gene per row), moves up to
      ``max_steps`` steps in a random direction;
    - *directed* (with chance ``directedness`` per row): a rebalancing pair within one kind of
      gene (sparsity genes, or bits genes): a gene of small marginal divergence (drawn with
      weight ``1 - r``, ``r`` its sensitivity rank in its kind) moves toward compression and a
      gene of large marginal divergence (weight ``r``) moves back, by as many steps as keep
      the compression about equal (steps scaled by the layers' weight shares, at most
      ``max_steps``). The child
      trades divergence where it is expensive for compression where it is cheap, at about the
      same size: toward the front, not along it (NSGA-II's selection handles the trade-off).

    So insensitive genes move toward compression more often than back, sensitive ones back
    more often than toward compression.

    sensitivity: ``(n_var,)`` marginal divergence per gene (None: unknown, no directed move).
    strength: largest move in steps of the widest gene (see :func:`max_steps`).
    compress_dir: ``(n_var,)`` +1 where a larger value compresses more, -1 where a smaller
        one does (also the kinds); default ``[sparsity..., bits...]`` (+1 then -1).
    weight_share: ``(n_var,)`` share of all compressible weights in each gene's layer (None:
        equal shares).
    local: ``(n, n_var)`` each row's own marginal divergence per gene (e.g.
        :func:`local_marginals` of ``X``): ranks per row instead of ``sensitivity``'s.
    A move that would leave the bounds goes the other way instead (then clipped). Every draw
    has a fixed shape, so the same ``rng`` state gives the same result.
    """
    X = np.rint(np.asarray(X, dtype=float)).astype(np.int64)
    n, n_var = X.shape
    xl = np.asarray(xl, dtype=np.int64)
    xu = np.asarray(xu, dtype=np.int64)
    if compress_dir is None:
        if n_var % 2:
            raise ValueError("compress_dir is needed for an odd number of genes")
        compress_dir = np.concatenate([np.ones(n_var // 2), -np.ones(n_var // 2)])
    cdir = np.asarray(compress_dir, dtype=np.int64)
    share = np.ones(n_var) if weight_share is None else np.asarray(weight_share, dtype=float)
    top = max_steps(xl, xu, strength)

    # explore
    mutate = rng.random((n, n_var)) < prob
    forced = np.asarray(rng.integers(0, n_var, size=n))
    none = ~mutate.any(axis=1)
    mutate[none, forced[none]] = True
    sign = np.where(rng.random((n, n_var)) < 0.5, 1, -1)
    step = rng.integers(1, top + 1, size=(n, n_var))
    move = np.where(mutate, sign * step, 0)
    cand = X + move
    cand = np.where((cand < xl) | (cand > xu), X - move, cand)
    Y = np.clip(cand, xl, xu)

    # directed: one rebalancing pair per chosen row
    do_pair = rng.random(n) < directedness
    kinds, kind_of = np.unique(cdir, return_inverse=True)
    kind = np.asarray(rng.integers(0, len(kinds), size=n))
    g_low = rng.gumbel(size=(n, n_var))
    g_high = rng.gumbel(size=(n, n_var))
    u = np.asarray(rng.random(n))
    if (sensitivity is None and local is None) or directedness <= 0.0:
        return Y
    if local is not None:
        r = row_ranks(local, kind_of)
    else:
        assert sensitivity is not None
        r = sensitivity_rank(sensitivity, n_var, cdir)
    in_kind = kind_of[None, :] == kind[:, None]
    a = _pick(g_low, 1.0 - r + 1e-3, in_kind)
    b = _pick(g_high, r + 1e-3, in_kind & (np.arange(n_var)[None, :] != a[:, None]))
    rows = np.flatnonzero(do_pair & (a >= 0) & (b >= 0))
    a, b = a[rows], b[rows]
    step_a = 1 + np.floor(u[rows] * top[a]).astype(np.int64)
    step_b = np.clip(np.rint(step_a * share[a] / share[b]), 1, top[b]).astype(np.int64)
    Y[rows, a] = np.clip(Y[rows, a] + cdir[a] * step_a, xl[a], xu[a])
    Y[rows, b] = np.clip(Y[rows, b] - cdir[b] * step_b, xl[b], xu[b])
    return Y


class DirectedMutation(Mutation):
    """pymoo ``Mutation`` binding :func:`directed_mutation`'s parameters.

    ``sensitivity`` is state: the search refreshes it from the evaluated points after every
    generation (it is checkpointed with the algorithm). ``local``: when set (by the search,
    from the surrogate's tables; not checkpointed, set again on resume), each child's own
    marginals ``(n, n_var)`` of its genes direct its move instead. Every offspring is
    mutated; ``prob`` is the per-gene chance.
    """

    def __init__(
        self,
        sensitivity: np.ndarray | None,
        compress_dir: np.ndarray,
        *,
        prob: float = 0.3,
        strength: int = 25,
        directedness: float = 0.7,
        weight_share: np.ndarray | None = None,
    ) -> None:
        super().__init__(prob=1.0)
        self.weight_share = None if weight_share is None else np.asarray(weight_share, float)
        self.sensitivity = None if sensitivity is None else np.asarray(sensitivity, float)
        self.compress_dir = np.asarray(compress_dir, dtype=np.int64)
        self.gene_prob = float(prob)
        self.strength = int(strength)
        self.directedness = float(directedness)
        self.local: Callable[[np.ndarray], np.ndarray] | None = None

    def _do(
        self,
        problem: Problem,
        X: np.ndarray,
        *args: Any,
        random_state: np.random.Generator | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        if random_state is None:
            raise ValueError("DirectedMutation needs the algorithm's random_state")
        return directed_mutation(
            X,
            problem.xl,
            problem.xu,
            self.sensitivity,
            self.gene_prob,
            self.strength,
            self.directedness,
            random_state,
            compress_dir=self.compress_dir,
            weight_share=self.weight_share,
            local=None if self.local is None else self.local(
                np.rint(np.asarray(X, float)).astype(np.int64)),
        )
