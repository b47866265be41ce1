"""Screening: which of many mated candidates are worth a real evaluation.

Every objective but the divergence is known exactly without a forward (density, bits, size:
arithmetic on the genes, ``surrogate.exact_objectives``); the divergence is predicted, in log
space, with a standard deviation (the surrogate's, or the low-fidelity measurement's). A
candidate can enter the front of the points evaluated so far only if its divergence lies below
every front point that is at least as good in the exact objectives: its *gap*

    gap = predicted log divergence - log(min divergence of those front points)

must be negative (it is ``-inf`` where no front point is that good: nothing bars it). With
an optimism of ``kappa`` standard deviations, candidates whose gap is below ``kappa * sigma``
are *promising*; among them, those of largest optimistic hypervolume improvement are taken
first (lazy greedy: each pick joins the front before the next is scored, so picks spread).
When fewer than ``n_min`` are promising, the least hopeless (smallest gap) fill up, so the
search keeps learning where the model is pessimistic.

Pure functions on arrays; objectives are minimised and in raw units (divided by the problem's
reference point only for the hypervolume).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from pymoo.indicators.hv import HV


def entry_gap(exact: np.ndarray, log_div: np.ndarray, front: np.ndarray) -> np.ndarray:
    """``gap (n,)`` of candidates with exact objectives ``exact (n, k)`` and predicted log
    divergence ``log_div (n,)`` against ``front (m, k + 1)`` (exact objectives, divergence
    last): ``log_div - log(d*)`` where ``d*`` is the smallest divergence of the front points
    weakly better in every exact objective; ``-inf`` where there is none."""
    exact = np.asarray(exact, float)
    front = np.asarray(front, float)
    n = exact.shape[0]
    if len(front) == 0 or n == 0:
        return np.full(n, -np.inf)
    better = np.all(front[None, :, :-1] <= exact[:, None, :] + 1e-12, axis=2)  # (n, m)
    dmin = np.where(better, front[None, :, -1], np.inf).min(axis=1)
    with np.errstate(divide="ignore"):
        ld = np.log(np.maximum(dmin, 1e-300))
    return np.where(np.isfinite(dmin), np.asarray(log_div, float) - ld, -np.inf)


def hv_greedy(
    F: np.ndarray, front: np.ndarray, ref_point: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` rows of ``F (c, n_obj)`` picked one at a time by the largest hypervolume
    improvement over ``front (m, n_obj)`` plus the rows picked before (objectives divided by
    ``ref_point``, reference all ones; lazy greedy: improvements only shrink as the set grows).
    Returns ``(picked indices, their improvements)`` in pick order; rows that improve nothing
    are never picked."""
    ref = np.asarray(ref_point, float)
    Fn = np.asarray(F, float) / ref
    base = np.asarray(front, float).reshape(-1, len(ref)) / ref
    base = base[np.all(base < 1.0, axis=1)]
    hv = HV(ref_point=np.ones(len(ref)))
    current = float(hv(base)) if len(base) else 0.0
    inside = np.flatnonzero(np.all(Fn < 1.0, axis=1))
    # an upper bound: the volume the point dominates alone
    heap = [(-float(np.prod(1.0 - Fn[i])), int(i)) for i in inside]
    heapq.heapify(heap)
    fresh: dict[int, int] = {}  # row -> number of picks when its value was computed
    picked: list[int] = []
    gains: list[float] = []
    chosen = base
    while heap and len(picked) < n:
        neg, i = heapq.heappop(heap)
        if fresh.get(i) != len(picked):
            gain = float(hv(np.vstack([chosen, Fn[i: i + 1]]))) - current
            fresh[i] = len(picked)
            if gain > 1e-15:
                heapq.heappush(heap, (-gain, i))
            continue
        gain = -neg
        if gain <= 1e-15:
            break
        picked.append(i)
        gains.append(gain)
        chosen = np.vstack([chosen, Fn[i: i + 1]])
        current += gain
    return np.asarray(picked, np.int64), np.asarray(gains, float)


def select(
    exact: np.ndarray,
    log_div: np.ndarray,
    sigma: np.ndarray | float,
    front: np.ndarray,
    ref_point: np.ndarray,
    *,
    n_max: int,
    n_min: int,
    kappa: float,
    max_divergence: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates to evaluate, in order of choice, and whether each was promising.

    exact: ``(n, k)`` exact objectives; log_div: ``(n,)`` predicted log divergence; sigma:
    its standard deviation (a number or ``(n,)``); front: ``(m, k + 1)`` the feasible front
    evaluated so far; ref_point: ``(k + 1,)``; n_max / n_min: at most / at least this many
    (fewer only when there are fewer candidates); kappa: optimism in standard deviations;
    max_divergence: the problem's limit (a candidate optimistically above it is hopeless).
    Returns ``(indices (p,), promising (p,) bool)``.
    """
    exact = np.asarray(exact, float)
    log_div = np.asarray(log_div, float)
    n = len(log_div)
    sig = np.broadcast_to(np.asarray(sigma, float), (n,))
    optimistic = log_div - kappa * sig
    gap = entry_gap(exact, optimistic, front)
    hopeful = gap < 0.0
    if max_divergence is not None:
        hopeful &= np.exp(optimistic) <= max_divergence
    F_opt = np.column_stack([exact, np.exp(optimistic)])
    cand = np.flatnonzero(hopeful)
    order, _ = hv_greedy(F_opt[cand], front, ref_point, n_max)
    picked = cand[order]
    # promising but outside the reference box, or tied out by the greedy: next by gap
    rest = np.setdiff1d(cand, picked)
    rest = rest[np.argsort(gap[rest], kind="stable")]
    take = list(picked) + list(rest[: max(0, n_max - len(picked))])
    promising = [True] * len(take)
    if len(take) < n_min:
        others = np.setdiff1d(np.arange(n), np.asarray(take, np.int64))
        others = others[np.argsort(gap[others], kind="stable")]
        extra = list(others[: n_min - len(take)])
        take += extra
        promising += [False] * len(extra)
    return np.asarray(take, np.int64), np.asarray(promising, bool)


# --- the state of a screened search ----------------------------------------------------------
# Optimism of the screens, in standard deviations of their log-divergence predictions: a
# candidate one standard deviation better than predicted would enter the front.
KAPPA = 1.0
# Candidates measured at low fidelity per generation, in population sizes (the surrogate's
# best guesses; the full evaluations are then chosen among them).
LOW_FACTOR = 1
# Fit a weight per table term (each layer's pruning and quantisation cost), not only the
# link's (a, beta): the ladder's single-layer costs misjudge layers that interact.
PER_TERM = True
# At least this share of pop_size gets a full evaluation each generation (the least hopeless
# candidates when fewer are promising): the model keeps learning where it is pessimistic.
MIN_SHARE = 0.1
# Standard deviation (log) of a low-fidelity prediction before pairs of low and full
# evaluations of the same genes measured it, and the pairs needed to trust the measurement.
LOW_SIGMA_PRIOR = 0.5
MIN_PAIRS = 8
# Fewest samples a low-fidelity evaluation runs on (a mean over fewer is mostly noise).
MIN_LOW_SAMPLES = 16
LADDER, CANDIDATE, TARGETED, NEAR, LOCAL_MOVE, LOCAL = 0, 1, 2, 3, 4, 5
KIND_LABELS = {LADDER: "ladder", CANDIDATE: "candidate", TARGETED: "targeted", NEAR: "near",
               LOCAL_MOVE: "local move", LOCAL: "local"}


def low_fidelity_samples(n_samples: int, share: float) -> int:
    """Samples of a low-fidelity evaluation: ``round(share * n_samples)``, at least
    ``MIN_LOW_SAMPLES``; 0 (none) when ``share`` is 0 or that leaves less than half saved."""
    if share <= 0.0 or n_samples <= 0:
        return 0
    m = max(MIN_LOW_SAMPLES, int(round(share * n_samples)))
    return m if 2 * m <= n_samples else 0


@dataclass
class ScreenRecords:
    """Everything screening looked at, in order: the ladder probes (``kind`` ``LADDER``),
    every mated candidate (``CANDIDATE``) and the plans allocated to dominate front points
    (``TARGETED``; ``NEAR``: those moved from a front point, ``reallocation.near_plans``);
    the moves around front points and plans on their measured slopes (``LOCAL_MOVE``,
    ``LOCAL``: ``operators.local``, always evaluated in full).
    ``X (n, n_var)`` int64 genes; ``gen (n,)``;
    ``low (n,)``: the divergence on the low-fidelity samples (NaN: not evaluated so);
    ``predicted (n,)``: the surrogate's divergence at screening time (NaN for the ladder);
    ``full (n,)`` bool: the candidate got a full evaluation."""

    X: np.ndarray
    gen: np.ndarray
    kind: np.ndarray
    low: np.ndarray
    predicted: np.ndarray
    full: np.ndarray

    @classmethod
    def empty(cls, n_var: int) -> ScreenRecords:
        return cls(np.zeros((0, n_var), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                   np.zeros(0), np.zeros(0), np.zeros(0, bool))

    def __len__(self) -> int:
        return len(self.X)

    @property
    def n_low(self) -> int:
        """Low-fidelity evaluations made."""
        return int(np.isfinite(self.low).sum())

    def add(self, X: np.ndarray, gen: int, kind: int | np.ndarray, *, low: np.ndarray,
            predicted: np.ndarray, full: np.ndarray) -> np.ndarray:
        """Append rows (every argument ``(n,)`` or ``(n, n_var)``, ``kind`` one for all or
        per row); returns their ids."""
        start = len(self)
        n = len(X)
        self.X = np.concatenate([self.X, np.asarray(X, np.int64).reshape(n, -1)])
        self.gen = np.concatenate([self.gen, np.full(n, gen, np.int64)])
        self.kind = np.concatenate([self.kind, np.broadcast_to(np.asarray(kind, np.int64), (n,))])
        self.low = np.concatenate([self.low, np.asarray(low, float)])
        self.predicted = np.concatenate([self.predicted, np.asarray(predicted, float)])
        self.full = np.concatenate([self.full, np.asarray(full, bool)])
        return np.arange(start, len(self))


def row_keys(X: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in np.ascontiguousarray(np.asarray(X, np.int64))]


def low_offset(rec: ScreenRecords, X_full: np.ndarray, d_full: np.ndarray
               ) -> tuple[float, float, int]:
    """``(offset, sigma, pairs)``: mean and RMS spread of ``log d_full - log d_low`` over the
    genes evaluated at both fidelities, each shrunk toward ``(0, LOW_SIGMA_PRIOR)`` as if by
    one pseudo-pair and ``MIN_PAIRS`` pseudo-pairs respectively."""
    ok = np.isfinite(rec.low)
    if not ok.any() or len(X_full) == 0:
        return 0.0, LOW_SIGMA_PRIOR, 0
    full = dict(zip(row_keys(X_full), np.asarray(d_full, float), strict=True))
    pairs = [(full[k], d) for k, d in zip(row_keys(rec.X[ok]), rec.low[ok], strict=True)
             if k in full]
    if not pairs:
        return 0.0, LOW_SIGMA_PRIOR, 0
    a = np.asarray(pairs, float)
    r = np.log(np.maximum(a[:, 0], 1e-12)) - np.log(np.maximum(a[:, 1], 1e-12))
    k = len(r)
    offset = float(r.sum() / (k + 1.0))
    spread = float(np.sqrt((np.sum((r - offset) ** 2) + MIN_PAIRS * LOW_SIGMA_PRIOR**2)
                           / (k + MIN_PAIRS)))
    return offset, max(spread, 0.05), k


def combine(mu_a: np.ndarray, sd_a: np.ndarray | float, mu_b: np.ndarray,
            sd_b: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Precision-weighted mean and standard deviation of two independent predictions."""
    wa = 1.0 / np.square(sd_a)
    wb = 1.0 / np.square(sd_b)
    mu = (np.asarray(mu_a) * wa + np.asarray(mu_b) * wb) / (wa + wb)
    return mu, np.sqrt(1.0 / (wa + wb)) * np.ones_like(mu)
