"""Local slopes (``search.local``): plans that beat a front point in every objective, chosen on
divergences measured around that point rather than on the cost tables.

Near the front the tables' additive model errs by as much as a dominating plan would gain (on
the 23.4 M-parameter encoder, 3-7 % at 1-bit plans, BENCHMARKS.md "Reallocation"): layers
interact, and at 1-2 bits one more pruned step moves the quantiser's levels too. So for an
*anchor* (a front point) every single move is evaluated for real: each layer one sparsity
step sparser and denser, one bit more and fewer (:func:`probe_moves`). The measured changes
are the anchor's local slopes; a cost table holding them within one step of the anchor and
nothing beyond (:func:`local_costs`) gives, through
:func:`~moecomp.search.operators.reallocation.budget_plans`, the plans of least predicted
divergence strictly inside the anchor's density and bits, and inside them tightened by
``MARGINS`` (:func:`local_plans`). A plan is offered when its prediction (the anchor's
divergence plus the moves' measured changes) is below the anchor's.

Which anchors (:func:`local_offers`): once taken, an anchor is kept (in the checkpoint) until
its moves are measured and its plans offered, even when its own moves beat it; a new one is
the front point of largest exclusive hypervolume not taken before (among the ``ANCHORS``
largest). What was measured is read from the archive, so a resumed search carries on where
it stopped.
"""

from __future__ import annotations

import numpy as np

from moecomp.search.front import contributions
from moecomp.search.operators.reallocation import budget_plans
from moecomp.search.problem import LayerGenes
from moecomp.search.screening import row_keys
from moecomp.search.surrogate import exact_objectives

ANCHORS = 8  # a new anchor is one of the front points of this many largest contributions
# Budgets tried per anchor: its own exact objectives, and its density (3obj) or size (2obj)
# lowered by these shares: plans that beat it by more, should the additive sum of the
# measured moves be optimistic.
MARGINS = (0.0, 0.002, 0.005, 0.01)


def probe_moves(genes: LayerGenes, x: np.ndarray) -> np.ndarray:
    """Genes ``(m, 2L)``: ``x (2L,)`` with one gene moved by one step (each layer's sparsity
    step up and down, its bits up and down), the moves the bounds allow."""
    x = np.asarray(x, np.int64)
    xl, xu = genes.xl, genes.xu
    rows = []
    for j in range(len(x)):
        for d in (1, -1):
            if xl[j] <= x[j] + d <= xu[j]:
                y = x.copy()
                y[j] += d
                rows.append(y)
    return np.asarray(rows, np.int64).reshape(-1, len(x))


def local_costs(genes: LayerGenes, x: np.ndarray, moves: np.ndarray, delta: np.ndarray
                ) -> np.ndarray:
    """Cost table ``(L, S, B)`` around ``x (2L,)``: 0 at each layer's own cell, the measured
    change of divergence ``delta (m,)`` of each single move ``moves (m, 2L)`` at its cell, a
    layer's sparsity and bits moves together at the sum of the two; inf everywhere else
    (beyond one step the slopes say nothing)."""
    x = np.asarray(x, np.int64)
    L = genes.n_layers
    S = int(genes.s_idx_max.max()) + 1
    B = genes.bits_max - genes.bits_min + 1
    cost = np.full((L, S, B), np.inf)
    s0, b0 = x[:L], x[L:] - genes.bits_min
    cost[np.arange(L), s0, b0] = 0.0
    ds: dict[tuple[int, int], float] = {}
    db: dict[tuple[int, int], float] = {}
    for y, d in zip(np.asarray(moves, np.int64), np.asarray(delta, float), strict=True):
        (j,) = np.flatnonzero(y != x)
        (ds if j < L else db)[(int(j) % L, int(y[j] - x[j]))] = float(d)
    for (lay, step), c in ds.items():
        cost[lay, s0[lay] + step, b0[lay]] = c
    for (lay, step), c in db.items():
        cost[lay, s0[lay], b0[lay] + step] = c
        for (l2, s_step), cs in ds.items():
            if l2 == lay:
                cost[lay, s0[lay] + s_step, b0[lay] + step] = c + cs
    return cost


def local_plans(genes: LayerGenes, x: np.ndarray, f_x: float, cost: np.ndarray, mode: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(plans (q, 2L), predicted (q,))``: the least-cost plans of ``cost`` (from
    :func:`local_costs` around ``x``) strictly inside the exact objectives of ``x`` (and of
    ``x`` tightened by ``MARGINS``), predicted at ``f_x`` (its measured divergence) plus their
    cost, those predicted below ``f_x``, distinct."""
    L = genes.n_layers
    ex = exact_objectives(genes, genes.numel, np.asarray(x, np.int64)[None], mode)[0]
    scale = np.ones_like(ex)
    targets = []
    for m in MARGINS:
        scale[0] = 1.0 - m
        targets.append(ex * scale)
    plans = budget_plans(cost, genes, np.asarray(targets), mode)
    if len(plans) == 0:
        return plans, np.zeros(0)
    plans = np.unique(plans, axis=0)
    rows = np.arange(L)
    pred = f_x + cost[rows[None, :], plans[:, :L], plans[:, L:] - genes.bits_min].sum(axis=1)
    keep = pred < f_x
    return plans[keep], pred[keep]


def local_offers(n: int, genes: LayerGenes, X: np.ndarray, divergence: np.ndarray,
                 anchors: np.ndarray, done: np.ndarray, front: np.ndarray,
                 front_F: np.ndarray, ref_point: np.ndarray, mode: str,
                 exclude: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Up to ``n`` genes ``(p, 2L)`` to evaluate in full this generation, whether each is a
    plan (True) or an anchor's move (False), the plans' predicted divergences (NaN for
    moves), and the anchors ``(k', 2L)`` and their ``done (k',)`` flags after this
    generation.

    X ``(e, 2L)`` and divergence ``(e,)``: every point evaluated in full; anchors ``(k,
    2L)``: the points taken as anchors so far, in order, ``done (k,)`` those whose plans were
    all offered (or had none); front: indices of the front in ``X``, front_F their
    objectives and ref_point its reference point (the hypervolume's units). First the plans
    of anchors whose moves are all measured, then the moves of the others, in order; with
    room left, the front point of largest exclusive hypervolume not yet an anchor becomes
    one (and so on). Rows of ``X`` or ``exclude`` are never offered; an anchor stays one
    after it leaves the front (its moves may beat it), so its work is finished.
    """
    X = np.asarray(X, np.int64)
    n_var = 2 * genes.n_layers
    anchors = np.asarray(anchors, np.int64).reshape(-1, n_var)
    done = np.asarray(done, bool).copy()
    if n <= 0 or len(X) == 0:
        return np.zeros((0, n_var), np.int64), np.zeros(0, bool), np.zeros(0), anchors, done
    div = np.asarray(divergence, float)
    at = {k: i for i, k in enumerate(row_keys(X))}
    taken = set(at)
    if exclude is not None and len(exclude):
        taken.update(row_keys(exclude))
    rows: list[np.ndarray] = []
    preds: list[float] = []

    def room() -> int:
        return n - len(rows)

    def plans_of(x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The plans of anchor ``x`` not offered yet; None while moves are unmeasured."""
        moves = probe_moves(genes, x)
        idx = [at.get(k) for k in row_keys(moves)]
        a = at.get(x.tobytes())
        if a is None or any(i is None for i in idx):
            return None
        cost = local_costs(genes, x, moves, div[np.asarray(idx, np.int64)] - div[a])
        P, pred = local_plans(genes, x, float(div[a]), cost, mode)
        fresh = np.array([k not in taken for k in row_keys(P)], bool)
        return P[fresh], pred[fresh]

    def offer_moves(x: np.ndarray) -> None:
        todo = probe_moves(genes, x)
        todo = todo[np.array([k not in taken for k in row_keys(todo)], bool)][: room()]
        taken.update(row_keys(todo))
        rows.extend(todo)
        preds.extend([np.nan] * len(todo))

    waiting = []
    for i in np.flatnonzero(~done):
        if room() <= 0:
            break
        got = plans_of(anchors[i])
        if got is None:
            waiting.append(anchors[i])
            continue
        P, pred = got
        k = min(room(), len(P))
        taken.update(row_keys(P[:k]))
        rows.extend(P[:k])
        preds.extend(pred[:k])
        done[i] = k == len(P)
    for x in waiting:
        if room() > 0:
            offer_moves(x)
    front = np.asarray(front, np.int64)
    if room() > 0 and len(front):
        started = set(row_keys(anchors))
        order = front[np.argsort(-contributions(np.asarray(front_F, float),
                                                np.asarray(ref_point, float)), kind="stable")]
        new = []
        for a in order[:ANCHORS]:
            if room() <= 0:
                break
            if X[a].tobytes() in started:
                continue
            new.append(X[a])
            offer_moves(X[a])
        if new:
            anchors = np.concatenate([anchors, np.asarray(new, np.int64)])
            done = np.concatenate([done, np.zeros(len(new), bool)])
    out = np.asarray(rows, np.int64).reshape(-1, n_var)
    pred_out = np.asarray(preds, float)
    return out, np.isfinite(pred_out), pred_out, anchors, done
