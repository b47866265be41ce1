"""Reallocation (``search.reallocate``): plans offered to screening each generation,
allocated on the cost tables as the evaluated points have corrected them (the link's per-term
weights), that the model says beat a point of the front in every objective.

Three sources (:func:`dominating_plans`):

* the price grid of :func:`~moecomp.search.operators.allocation.allocation_pool`, with
  kept-weight prices of both signs (a bound on the mean bits is a negative price per kept
  weight);
* :func:`budget_plans`: for the front points holding most volume alone, the least-cost plan
  strictly within each one's exact objectives: the Lagrangian of both bounds (one price per
  bound; a bisection on the kept-weight price for each of a grid of bits prices), then
  exchange moves of one or two layers that keep both bounds;
* :func:`near_plans`: each such front point itself moved just inside its own budget and
  improved by the same exchanges, predicted relative to the point's measured divergence (the
  model's error there, not its absolute error, is what such a plan inherits).

The N of largest predicted hypervolume gain are taken greedily (``screening.hv_greedy``).
"""

from __future__ import annotations

import numpy as np

from moecomp.search.front import contributions
from moecomp.search.operators.allocation import allocation_pool, table_costs
from moecomp.search.problem import LayerGenes
from moecomp.search.screening import hv_greedy, row_keys
from moecomp.search.surrogate import (
    DivergenceTables,
    Link,
    exact_objectives,
    kept_counts,
)

# Budget plans: Lagrange prices on the bits bound tried per front point, each with a
# bisection on the kept-weight price; then exchange moves (one or two layers at a time).
N_BITS_PRICES = 16
N_BISECT = 40
# up to 3 sparsity steps and 2 bits at once: on 4-layer spaces enumerated in full these moves
# end at the optimum for most budgets and within 5 % of it for 90 % (tests/search/
# test_surrogate.py); one step or one bit at a time did not
SHIFTS = tuple((ds, db) for ds in range(-3, 4) for db in range(-2, 3) if (ds, db) != (0, 0))
MAX_EXCHANGES = 60
BUDGET_TARGETS = 24  # dominating_plans: front points given a budget plan, at most
NEAR_EACH = 3  # near_plans: starts per evaluated point (its cheapest ways inside)
# A near plan's prediction relative to its measured neighbour is assumed to err by
# NEAR_SIGMA times the link's (absolute) sigma; it is offered when NEAR_KAPPA such standard
# deviations below it beat the front (the model's point estimate alone never beats the plan
# it came from, which was optimal for the model).
NEAR_SIGMA = 0.5
NEAR_KAPPA = 1.0
CHUNK = 16  # targets solved together (memory: CHUNK * N_BITS_PRICES * L * S * B floats)


def _resources(genes: LayerGenes, mode: str, exact: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For targets with exact objectives ``exact (p, k)``: ``a (L, S, B)`` and ``g (p, L, S,
    B)``, the per-layer shares of the two bounded sums, and their caps ``(p,)``, ``(p,)``; a
    plan beats target ``i`` in its exact objectives iff ``sum_l a < cap_a[i]`` and ``sum_l
    g[i] < cap_g[i]``. ``3obj``: a = kept share (density), g = kept * (b - target's mean
    bits) (the mean-bits bound made linear); ``2obj``: a = kept * b / 32 (size), no g."""
    kept = kept_counts(genes, genes.numel).astype(float) / float(genes.numel.sum())  # (L, S)
    bits = np.arange(genes.bits_min, genes.bits_max + 1, dtype=float)
    if mode == "2obj":
        a = kept[:, :, None] * bits[None, None, :] / 32.0
        return a, np.zeros((len(exact),) + a.shape), exact[:, 0], np.ones(len(exact))
    a = np.broadcast_to(kept[:, :, None], kept.shape + (len(bits),))
    g = kept[None, :, :, None] * (bits[None, None, None, :] - exact[:, 1, None, None, None])
    return a, g, exact[:, 0], np.zeros(len(exact))


def budget_plans(cost: np.ndarray, genes: LayerGenes, exact: np.ndarray, mode: str
                 ) -> np.ndarray:
    """Genes ``(q, 2L)``: for each target ``exact (p, k)`` (exact objectives of front
    points), the plan of least table cost ``cost (L, S, B)`` (inf: not allowed) found that
    beats the target strictly in every exact objective; none where no plan does.

    The Lagrangian of both bounds separates over layers (module docstring); for each of
    ``N_BITS_PRICES`` prices on the bits bound, a bisection finds the least kept price that
    meets the size bound; the cheapest plan meeting both is then improved by exchange moves
    (``SHIFTS``: one layer's sparsity step or bits moved, alone or with another layer's
    move) that keep both bounds, until none lowers the cost. The Lagrangian alone reaches
    only the plans on the lower convex hull; the exchanges reach the budget itself."""
    exact = np.asarray(exact, float).reshape(len(exact), -1)
    L = cost.shape[0]
    parts = [_budget_chunk(cost, genes, exact[i: i + CHUNK], mode)
             for i in range(0, len(exact), CHUNK)]
    return np.concatenate(parts) if parts else np.zeros((0, 2 * L), np.int64)


def near_plans(cost: np.ndarray, genes: LayerGenes, X: np.ndarray, mode: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(plans (q, 2L), origin (q,))``: each plan ``X (p, 2L)`` (evaluated points) moved
    just inside its own exact objectives by each of the ``NEAR_EACH`` cheapest one- or
    two-layer ``SHIFTS`` moves that do it, then improved by :func:`budget_plans`'
    exchanges; ``origin`` indexes the row of ``X`` each came from (rows no move fits in
    are left out). Plans near an evaluated one, where the model's error is mostly the one it
    makes there (:func:`dominating_plans` predicts them relative to it)."""
    X = np.asarray(X, np.int64)
    L = genes.n_layers
    exact = exact_objectives(genes, genes.numel, X, mode)
    a, g, cap_a, cap_g = _resources(genes, mode, exact)
    a = np.ascontiguousarray(a)
    out, origin = [], []
    for i in range(len(X)):
        sb = np.stack([X[i, :L], X[i, L:] - genes.bits_min], axis=1)
        seen: set[bytes] = set()
        for r in range(NEAR_EACH):
            moved = _step(cost, a, g[i], sb, cap_a[i], cap_g[i], improve=False, rank=r)
            if moved is None:
                break
            plan = _exchange(cost, a, g[i], moved, cap_a[i], cap_g[i])
            row = np.concatenate([plan[:, 0], plan[:, 1] + genes.bits_min])
            if row.tobytes() not in seen:
                seen.add(row.tobytes())
                out.append(row)
                origin.append(i)
    return np.asarray(out, np.int64).reshape(-1, 2 * L), np.asarray(origin, np.int64)


def _budget_chunk(cost: np.ndarray, genes: LayerGenes, exact: np.ndarray, mode: str
                  ) -> np.ndarray:
    L, S, B = cost.shape
    a, g, cap_a, cap_g = _resources(genes, mode, exact)
    P = len(exact)
    a3 = np.ascontiguousarray(a)
    out = []
    finite = cost[np.isfinite(cost)]
    top = max(float(finite.max()) if finite.size else 1.0, 1e-9)
    scale = max(float(a.max()), 1e-12)
    mus = np.concatenate([[0.0], np.geomspace(top * 1e-6, top * 1e4, N_BITS_PRICES - 1)])
    if mode == "2obj":
        mus = mus[:1]
    mus = mus / scale
    M = len(mus)
    base = cost[None, None] + mus[None, :, None, None, None] * g[:, None]  # (P, M, L, S, B)
    base = base.reshape(P, M, L, S * B)
    a_flat = a3.reshape(L, S * B)

    def solve(lam: np.ndarray) -> np.ndarray:  # lam (P, M) -> argmin (P, M, L)
        return np.argmin(base + lam[:, :, None, None] * a_flat, axis=3)

    rows = np.arange(L)

    def sums(arg: np.ndarray) -> np.ndarray:  # (..., L) -> (..., ) sum of a
        return a_flat[rows, arg].sum(axis=-1)

    lo = np.full((P, M), np.log(top * 1e-9 / scale))
    hi = np.full((P, M), np.log(top * 1e5 / scale))
    for _ in range(N_BISECT):
        mid = 0.5 * (lo + hi)
        ok = sums(solve(np.exp(mid))) < cap_a[:, None]
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    free = solve(np.zeros((P, M)))
    arg = np.where((sums(free) < cap_a[:, None])[..., None], free, solve(np.exp(hi)))
    g_flat = g.reshape(P, L, S * B)
    for i in range(P):
        gi = g_flat[i]
        A = sums(arg[i])
        G = gi[rows, arg[i]].sum(axis=-1)
        c = cost.reshape(L, S * B)[rows, arg[i]].sum(axis=-1)
        ok = (A < cap_a[i]) & (G < cap_g[i]) & np.isfinite(c)
        if not ok.any():
            continue
        m = int(np.flatnonzero(ok)[np.argmin(c[ok])])
        sb = np.stack(np.divmod(arg[i, m], B), axis=1)  # (L, 2): step, bits index
        sb = _exchange(cost, a3, g[i], sb, cap_a[i], cap_g[i])
        out.append(np.concatenate([sb[:, 0], sb[:, 1] + genes.bits_min]))
    return np.asarray(out, np.int64).reshape(-1, 2 * L)


def _exchange(cost: np.ndarray, a: np.ndarray, g: np.ndarray, sb: np.ndarray,
              cap_a: float, cap_g: float) -> np.ndarray:
    """``sb (L, 2)`` improved by the best single or paired ``SHIFTS`` move that keeps
    ``sum a < cap_a`` and ``sum g < cap_g``, repeated (``MAX_EXCHANGES`` at most)."""
    for _ in range(MAX_EXCHANGES):
        nxt = _step(cost, a, g, sb, cap_a, cap_g, improve=True)
        if nxt is None:
            break
        sb = nxt
    return sb


def _step(cost: np.ndarray, a: np.ndarray, g: np.ndarray, sb: np.ndarray,
          cap_a: float, cap_g: float, *, improve: bool, rank: int = 0) -> np.ndarray | None:
    """The plan ``sb (L, 2)`` after the least-cost single or paired ``SHIFTS`` move that
    leaves ``sum a < cap_a`` and ``sum g < cap_g`` (with ``rank`` k, the k-th least); with
    ``improve``, only a move that lowers the cost. None when there is no such move."""
    L, S, B = cost.shape
    rows = np.arange(L)
    s0, b0 = sb[:, 0], sb[:, 1]
    c0, a0, g0 = cost[rows, s0, b0], a[rows, s0, b0], g[rows, s0, b0]
    slack_a = cap_a - a0.sum()
    slack_g = cap_g - g0.sum()
    lay, ns, nb = [], [], []
    for ds, db in SHIFTS:
        s1, b1 = s0 + ds, b0 + db
        inside = (s1 >= 0) & (s1 < S) & (b1 >= 0) & (b1 < B)
        lay.append(rows[inside])
        ns.append(s1[inside])
        nb.append(b1[inside])
    li, si, bi = np.concatenate(lay), np.concatenate(ns), np.concatenate(nb)
    dc = cost[li, si, bi] - c0[li]
    usable = np.isfinite(dc)
    li, si, bi, dc = li[usable], si[usable], bi[usable], dc[usable]
    da = a[li, si, bi] - a0[li]
    dg = g[li, si, bi] - g0[li]
    tol = 1e-12
    # pairs (first, second); the single move is the pair with a null second move. A pair
    # that lowers the cost has a first move that does (the cheaper of the two).
    first = np.flatnonzero(dc < 0) if improve else np.arange(len(dc))
    dc2 = np.concatenate([dc, [0.0]])
    da2 = np.concatenate([da, [0.0]])
    dg2 = np.concatenate([dg, [0.0]])
    l2 = np.concatenate([li, [-1]])
    fits = ((da[first, None] + da2[None, :] < slack_a - tol)
            & (dg[first, None] + dg2[None, :] < slack_g - tol)
            & (li[first, None] != l2[None, :]))
    tot = np.where(fits, dc[first, None] + dc2[None, :], np.inf).ravel()
    if tot.size <= rank:
        return None
    k = int(np.argpartition(tot, rank)[rank]) if rank else int(np.argmin(tot))
    best = tot[k]
    if not np.isfinite(best) or (improve and not best < -1e-12 * max(1.0, float(np.abs(c0).sum()))):
        return None
    i, j = np.divmod(k, len(dc2))
    i = first[i]
    out = sb.copy()
    out[li[i]] = (si[i], bi[i])
    if j < len(dc):
        out[li[j]] = (si[j], bi[j])
    return out


def dominating_plans(
    n: int,
    tables: DivergenceTables,
    genes: LayerGenes,
    link: Link,
    front: np.ndarray,
    *,
    mode: str,
    ref_point: np.ndarray,
    exclude: np.ndarray | None = None,
    front_X: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to ``n`` genes ``(p, 2L)`` predicted to strictly dominate points of ``front``,
    their predicted divergences ``(p,)`` and which of them are near plans ``(p,)`` bool.

    front: ``(m, k + 1)`` the evaluated front (exact objectives, divergence last, raw units);
    link: the fitted link, whose per-term weights correct the tables before allocating
    (``allocation_pool`` with ``signed`` prices; and, for the ``BUDGET_TARGETS`` front points
    of largest exclusive hypervolume, the least-cost plan within each one's exact
    objectives, ``budget_plans``; with ``front_X (m, 2L)``, the front's genes, also each of
    those points moved just inside its own budget, ``near_plans``, predicted relative to
    it, and judged optimistically: ``NEAR_KAPPA`` standard deviations of
    ``NEAR_SIGMA * link.sigma`` below, the error assumed of a prediction relative to a
    measured neighbour). Candidates: the plans strictly better than some front point in
    every exact objective and in (so) predicted divergence; chosen
    greedily by predicted hypervolume gain over ``front`` (``hv_greedy``, ``ref_point`` raw
    units), so the points that hold most of the front's volume are attacked first and the
    picks spread; rows of ``exclude (e, 2L)`` (evaluated already) never.
    """
    front = np.asarray(front, float)
    L = genes.n_layers
    none = np.zeros((0, 2 * L), np.int64), np.zeros(0), np.zeros(0, bool)
    if n <= 0 or len(front) == 0:
        return none
    w = None if link.theta is None else np.exp(link.theta)
    cost = table_costs(tables, genes, w)
    pool = allocation_pool(tables, genes, mode, weights=w, signed=True)
    # the front points holding most volume alone get a plan within their own budgets
    order = np.argsort(-contributions(front, ref_point), kind="stable")[:BUDGET_TARGETS]
    pool = np.unique(np.concatenate([pool, budget_plans(cost, genes, front[order, :-1], mode)]),
                     axis=0)
    pred = np.exp(link.predict(tables, genes, pool))
    is_near = np.zeros(len(pool), bool)
    if front_X is not None:
        near, origin = near_plans(cost, genes, np.asarray(front_X)[order], mode)
        # predicted relative to the evaluated point each came from: its measured divergence
        # times the model's ratio between the two plans
        x0 = np.asarray(front_X, np.int64)[order][origin]
        ratio = np.exp(link.predict(tables, genes, near) - link.predict(tables, genes, x0))
        keys = set(row_keys(near))
        keep = np.array([k not in keys for k in row_keys(pool)], bool)
        pool = np.concatenate([pool[keep], near])
        pred = np.concatenate([pred[keep], front[order][origin, -1] * ratio])
        is_near = np.concatenate([is_near[keep], np.ones(len(near), bool)])
    if exclude is not None and len(exclude):
        seen = set(row_keys(np.asarray(exclude, np.int64)))
        fresh = np.array([k not in seen for k in row_keys(pool)], bool)
        pool, pred, is_near = pool[fresh], pred[fresh], is_near[fresh]
    if len(pool) == 0:
        return none
    exact = exact_objectives(genes, genes.numel, pool, mode)  # (p, k)
    sigma = min(float(link.sigma), 1.0) * NEAR_SIGMA
    judged = np.where(is_near, pred * np.exp(-NEAR_KAPPA * sigma), pred)
    F = np.column_stack([exact, judged])  # (p, k + 1)
    beats = np.all(F[None, :, :] < front[:, None, :], axis=2).any(axis=0)  # (p,)
    cand = np.flatnonzero(beats)
    picked, _ = hv_greedy(F[cand], front, ref_point, n)
    chosen = cand[picked]
    return pool[chosen], pred[chosen], is_near[chosen]
