"""A surrogate of the divergence: per-layer cost tables, summed, through a fitted link.

The model (issue 12): the divergence of a plan ``x`` is predicted as

    d(x) ~ exp(a) * (base + sum_l cost_l(s_l, b_l)) ** beta

- ``base``: the divergence of the *base* model (every layer at sparsity 0 and ``bits_max``);
- ``cost_l(s, b)``: the divergence added when layer ``l`` alone is at sparsity step ``s`` and
  ``b`` bits, every other layer at the base (a *table* ``(L, n_s, n_b)``);
- ``a, beta``: a link fitted on evaluated points in log space (``beta > 1`` when errors of
  several layers compound, ``< 1`` when they overlap); ``a = 0, beta = 1`` before any fit.

Why additive: for small perturbations the divergence is second order in the output change
(KL's Hessian at the teacher is the Fisher information), and with the block-diagonal
(layer-by-layer) approximation of the Fisher, as in HAWQ and OBS-style mixed-precision
methods, the second-order terms of different layers add. The link absorbs what this
approximation misses at large perturbations.

Tables come from measurements, made cheap: single-layer *ladder* probes (each layer pruned at a
few sparsities at ``bits_max``, and quantised at a few bit widths at sparsity 0), filled in
between by *proxies* computed from the weights alone (no forward):

- pruning: ``cost_l(s, bits_max)`` is interpolated between the ladder points as a power law of
  ``Ep_l(s)``, the share of the layer's squared weight the pruned weights hold (exact, from the
  relevance order), and proportional to it below the first point;
- quantisation: ``Eq_l(s, b)``, the squared error of quantising the survivors of sparsity ``s``
  at ``b`` bits with the problem's quantizer (on a sample of at most ``max_values`` weights),
  mapped to divergence by a power law fitted on the quantisation ladder (``s = 0``); the added
  cost of ``b`` bits at sparsity ``s`` is ``Q(Eq(s, b)) - Q(Eq(s, bits_max))``. The proxy
  carries the interaction: the survivors of a pruned layer are fewer and quantise better.

All functions are pure; arrays are float64 unless said otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moecomp.apply import SINGLE_QUANTIZERS, n_pruned
from moecomp.search.problem import LayerGenes

# Ladder of the single-layer probes: sparsities (capped at each layer's bound, which is always
# added) at bits_max, and the lowest LADDER_BITS bit widths at sparsity 0. Five sparsities
# cover the bend of the pruning curve (kept share 1/2, 1/5, 1/10, 1/20, the bound); four bit
# widths the steep end of the quantisation curve, above which it falls by 4x a bit.
LADDER_SPARSITY = (0.5, 0.8, 0.9, 0.95)
LADDER_BITS = 4
# Quantisation proxy: at most this many weights of a layer (a seeded sample) and this many
# sparsities (kept shares log-spaced from 1 to the layer's bound, dense where the curve bends;
# interpolated between). A search's proxies cost 13 x 8 quantizer calls on 8,192 values per
# layer: 5 s uniform, 15 s k-means for 27 layers on this machine.
MAX_PROXY_VALUES = 8192
PROXY_SPARSITIES = 13
# Floor of a cost or divergence in log space (divergences are >= 0 and may be exactly 0).
TINY = 1e-12
# Range of the fitted exponents (power laws of the proxies, the link): a noisy ladder must not
# turn a table upside down.
EXPONENT_RANGE = (0.25, 4.0)


@dataclass(frozen=True)
class Ladder:
    """Genes ``X (n, 2L)`` of the ladder probes; row 0 is the base model. ``layer (n,)``,
    ``kind (n,)`` (0 pruning, 1 quantisation; -1 for the base) and ``value (n,)`` (the
    sparsity step index or the bits) say what each row changes."""

    X: np.ndarray
    layer: np.ndarray
    kind: np.ndarray
    value: np.ndarray


def ladder_genes(genes: LayerGenes, *, extra_sparsity: tuple[float, ...] = (),
                 extra_bits: tuple[int, ...] = ()) -> Ladder:
    """The ladder probes of ``genes``: the base model, then per layer its pruning points (at
    ``bits_max``) and its quantisation points (at sparsity 0); duplicates dropped.
    ``extra_sparsity`` / ``extra_bits``: more points of every layer (the single-layer probes
    of ``sensitivity.probe_genes``, so the ladder holds them)."""
    L = genes.n_layers
    base = np.concatenate([np.zeros(L, np.int64), np.full(L, genes.bits_max, np.int64)])
    rows, layer, kind, value = [base], [-1], [-1], [0]
    wanted = set(range(genes.bits_min, genes.bits_min + LADDER_BITS)) | {
        int(np.clip(b, genes.bits_min, genes.bits_max)) for b in extra_bits}
    bits = sorted(b for b in wanted if b < genes.bits_max)
    for j in range(L):
        smax = int(genes.s_idx_max[j])
        steps = {min(int(round(s / genes.step)), smax)
                 for s in (*LADDER_SPARSITY, *extra_sparsity)} | {smax}
        for s in sorted(steps - {0}):
            x = base.copy()
            x[j] = s
            rows.append(x)
            layer.append(j)
            kind.append(0)
            value.append(s)
        for b in bits:
            x = base.copy()
            x[L + j] = b
            rows.append(x)
            layer.append(j)
            kind.append(1)
            value.append(b)
    return Ladder(
        X=np.stack(rows).astype(np.int64),
        layer=np.asarray(layer, np.int64),
        kind=np.asarray(kind, np.int64),
        value=np.asarray(value, np.int64),
    )


def _by_rank(weight: torch.Tensor, rank: torch.Tensor) -> np.ndarray:
    """The weights ``(numel,)`` float64 in relevance order (rank 0 first)."""
    w = weight.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    r = rank.detach().reshape(-1).to("cpu")
    out = torch.empty_like(w)
    out[r] = w
    return out.numpy()


def pruning_error(weight: torch.Tensor, rank: torch.Tensor, genes: LayerGenes, layer: int
                  ) -> np.ndarray:
    """``Ep (s_idx_max + 1,)``: share of the layer's squared weight held by the weights that
    sparsity step ``s`` prunes (0 at ``s = 0``, rising to at most 1)."""
    w2 = _by_rank(weight, rank) ** 2
    csum = np.concatenate([[0.0], np.cumsum(w2)])
    total = max(float(csum[-1]), TINY)
    n = w2.size
    steps = np.arange(int(genes.s_idx_max[layer]) + 1)
    pruned = np.array([n_pruned(n, round(float(s) * genes.step, 6)) for s in steps])
    return csum[pruned] / total


def quantization_error(
    weight: torch.Tensor,
    rank: torch.Tensor,
    genes: LayerGenes,
    layer: int,
    *,
    quantizer: str,
    seed: int,
    max_values: int = MAX_PROXY_VALUES,
    n_sparsities: int = PROXY_SPARSITIES,
) -> np.ndarray:
    """``Eq (s_idx_max + 1, n_b)``: squared error of quantising the survivors of sparsity step
    ``s`` at ``bits_min + k`` bits with ``quantizer``, as a share of the layer's squared weight.

    Computed on a seeded sample of at most ``max_values`` weights (pruning a share of the
    sample by its own relevance order), at ``n_sparsities`` steps (kept shares log-spaced)
    and interpolated linearly in log error between them.
    """
    by_rank = _by_rank(weight, rank)
    n = by_rank.size
    if n > max_values:
        pos = np.sort(np.random.default_rng(seed).choice(n, size=max_values, replace=False))
        by_rank = by_rank[pos]
    m = by_rank.size
    total = max(float(np.sum(by_rank**2)), TINY)
    smax = int(genes.s_idx_max[layer])
    kept = np.geomspace(1.0, max(1.0 - smax * genes.step, 1e-3), n_sparsities)
    grid = np.unique(np.clip(np.rint((1.0 - kept) / genes.step), 0, smax).astype(np.int64))
    quant = SINGLE_QUANTIZERS[quantizer]
    bits = np.arange(genes.bits_min, genes.bits_max + 1)
    err = np.zeros((len(grid), len(bits)))
    for i, s in enumerate(grid):
        k = n_pruned(m, round(float(s) * genes.step, 6))
        v = torch.from_numpy(by_rank[min(k, m - 1):].astype(np.float32))
        for j, b in enumerate(bits):
            idx, cb = quant(v, int(b))
            err[i, j] = float(((v.double() - cb.double()[idx]) ** 2).sum()) / total
    logs = np.log(np.maximum(err, TINY))
    steps = np.arange(smax + 1)
    out = np.stack([np.interp(steps, grid, logs[:, j]) for j in range(len(bits))], axis=1)
    return np.exp(out)


def _power_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(log A, beta)`` of ``y ~ A * x ** beta`` by least squares in log space over the
    points with ``x, y > TINY``; beta clipped to ``EXPONENT_RANGE``; beta 1 through the mean
    with one point; ``(log TINY, 1)`` with none."""
    ok = (x > TINY) & (y > TINY)
    lx, ly = np.log(x[ok]), np.log(y[ok])
    if lx.size == 0:
        return float(np.log(TINY)), 1.0
    beta = 1.0
    if lx.size >= 2 and np.ptp(lx) > 1e-9:
        beta = float(np.clip(np.polyfit(lx, ly, 1)[0], *EXPONENT_RANGE))
    return float(np.mean(ly - beta * lx)), beta


def pruning_curve(ep: np.ndarray, steps: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """``cost (s_idx_max + 1,)`` of pruning one layer at every step, from measured ``cost``
    at ``steps`` (ascending, > 0) and the proxy ``ep`` (see :func:`pruning_error`):
    a power law of ``ep`` between neighbouring points, proportional to ``ep`` below the first,
    the last segment's power law beyond the last."""
    ep = np.maximum(np.asarray(ep, float), TINY)
    c = np.maximum(np.asarray(cost, float), TINY)
    c = np.maximum.accumulate(c)  # pruning more never helps in expectation: noise removed
    out = np.empty_like(ep)
    s_all = np.arange(ep.size)
    first = int(steps[0])
    out[: first + 1] = c[0] * ep[: first + 1] / ep[first]
    out[0] = 0.0
    if len(steps) == 1:
        out[first:] = c[0] * ep[first:] / ep[first]
        return out
    le, lc = np.log(ep[steps]), np.log(c)
    for k in range(len(steps) - 1):
        lo, hi = int(steps[k]), int(steps[k + 1])
        seg = s_all[lo: hi + 1]
        de = le[k + 1] - le[k]
        slope = (lc[k + 1] - lc[k]) / de if de > 1e-12 else 0.0
        out[seg] = np.exp(lc[k] + slope * (np.log(ep[seg]) - le[k]))
    last = int(steps[-1])
    if last < ep.size - 1:
        de = le[-1] - le[-2]
        slope = (lc[-1] - lc[-2]) / de if de > 1e-12 else 1.0
        out[last:] = np.exp(lc[-1] + slope * (np.log(ep[last:]) - le[-1]))
    return out


@dataclass(frozen=True)
class DivergenceTables:
    """Per-layer cost tables: ``prune (L, n_s)``, the divergence added by pruning layer ``l``
    alone at sparsity step ``s`` (at ``bits_max``), and ``quant (L, n_s, n_b)``, what
    ``bits_min + k`` bits add to that; ``n_s`` is the largest bound over layers plus one (steps
    beyond a layer's bound repeat its last). ``base``: the base model's divergence."""

    prune: np.ndarray
    quant: np.ndarray
    base: float

    @property
    def cost(self) -> np.ndarray:
        """``(L, n_s, n_b)``: the divergence layer ``l`` alone adds at ``(s, b)``."""
        return self.prune[:, :, None] + self.quant


def build_tables(
    genes: LayerGenes,
    ladder: Ladder,
    divergence: np.ndarray,
    ep: list[np.ndarray],
    eq: list[np.ndarray],
) -> DivergenceTables:
    """Tables from the ladder's measured divergences ``(n,)`` (row 0 the base) and the proxies
    of every layer (``ep[l] (n_s_l,)``, ``eq[l] (n_s_l, n_b)``)."""
    d = np.asarray(divergence, float)
    base = float(max(d[0], 0.0))
    rise = d - d[0]
    L = genes.n_layers
    n_s = int(genes.s_idx_max.max()) + 1
    n_b = genes.bits_max - genes.bits_min + 1
    prune_t = np.zeros((L, n_s))
    quant_t = np.zeros((L, n_s, n_b))
    for j in range(L):
        pr = (ladder.layer == j) & (ladder.kind == 0)
        qr = (ladder.layer == j) & (ladder.kind == 1)
        smax = int(genes.s_idx_max[j])
        if pr.any():
            order = np.argsort(ladder.value[pr])
            prune = pruning_curve(ep[j], ladder.value[pr][order], rise[pr][order])
        else:
            prune = np.zeros(smax + 1)
        e = eq[j]
        if qr.any():
            la, beta = _power_fit(e[0, ladder.value[qr] - genes.bits_min], rise[qr])
        else:
            la, beta = float(np.log(TINY)), 1.0
        q = np.exp(la) * np.maximum(e, TINY) ** beta  # (n_s_l, n_b)
        q = np.maximum(q - q[:, -1:], 0.0)  # relative to bits_max at the same sparsity
        prune_t[j, : smax + 1] = prune
        prune_t[j, smax + 1:] = prune[-1]
        quant_t[j, : smax + 1] = q
        quant_t[j, smax + 1:] = q[-1]
    return DivergenceTables(prune=prune_t, quant=quant_t, base=base)


def features(tables: DivergenceTables, genes: LayerGenes, X: np.ndarray) -> np.ndarray:
    """``(n, 2L)``: per row of genes ``X (n, 2L)``, each layer's pruning cost, then each
    layer's quantisation cost (the terms the additive model sums)."""
    X = np.asarray(X, dtype=np.int64)
    L = genes.n_layers
    rows = np.arange(L)[None, :]
    s = X[:, :L]
    return np.concatenate(
        [tables.prune[rows, s], tables.quant[rows, s, X[:, L:] - genes.bits_min]], axis=1)


def additive(tables: DivergenceTables, genes: LayerGenes, X: np.ndarray,
             weights: np.ndarray | None = None) -> np.ndarray:
    """``base + sum_l w_l cost_l(x_l)`` ``(n,)`` of genes ``X (n, 2L)``; ``weights (2L,)``
    multiply each layer's pruning and quantisation terms (default 1)."""
    A = features(tables, genes, X)
    w = np.ones(A.shape[1]) if weights is None else np.asarray(weights, float)
    return tables.base + A @ w


@dataclass(frozen=True)
class Link:
    """``log d = a + beta * log(base + sum_j w_j A_j)`` with per-term weights ``w = exp(theta)``
    ``(2L,)`` (None: all 1); ``sigma``: the standard deviation of a prediction in log space
    (inf before anything was measured)."""

    a: float = 0.0
    beta: float = 1.0
    sigma: float = float("inf")
    theta: np.ndarray | None = None

    def predict_log(self, s: np.ndarray) -> np.ndarray:
        """Predicted log divergence of additive sums ``s (n,)``."""
        return self.a + self.beta * np.log(np.maximum(np.asarray(s, float), TINY))

    def predict(self, tables: DivergenceTables, genes: LayerGenes, X: np.ndarray
                ) -> np.ndarray:
        """Predicted log divergence ``(n,)`` of genes ``X (n, 2L)``."""
        w = None if self.theta is None else np.exp(self.theta)
        return self.predict_log(additive(tables, genes, X, w))


# Floor of sigma: divergences are means over samples, never exact.
MIN_SIGMA = 0.05
# Priors of the fit: (a, beta) toward (0, 1), worth LINK_RIDGE points; each per-term log
# weight theta toward 0 (the ladder's tables) with a standard deviation of THETA_PRIOR_SD
# (log units: a layer's measured costs are trusted to within a factor of e).
LINK_RIDGE = 1.0
THETA_PRIOR_SD = 1.0


def fit_link(A: np.ndarray, base: float, d: np.ndarray, *, per_term: bool = True) -> Link:
    """The link fitted on the terms ``A (m, 2L)`` of evaluated points (``features``) and their
    measured divergences ``d (m,)``: least squares in log space with ridge priors (see
    ``LINK_RIDGE``, ``THETA_PRIOR_SD``), by Gauss-Newton (``scipy.optimize.least_squares``).
    ``per_term``: fit the per-term weights (else only ``a, beta``). ``sigma`` is the residual
    RMS (at least ``MIN_SIGMA``); no points: the identity with ``sigma`` inf."""
    from scipy.optimize import least_squares

    A = np.asarray(A, float)
    m, k = A.shape
    if m == 0:
        return Link()
    y = np.log(np.maximum(np.asarray(d, float), TINY))
    if per_term:
        # the residual scale without per-term weights turns the prior on theta into units
        # of squared residuals
        first = fit_link(A, base, d, per_term=False)
        scale = first.sigma
    else:
        scale = 1.0
    active = A.max(axis=0) > TINY if per_term else np.zeros(k, bool)
    idx = np.flatnonzero(active)
    Aa = A[:, idx]
    base = float(base) + A[:, ~active].sum(axis=1)  # the terms of fixed weight 1
    r0 = np.sqrt(LINK_RIDGE) * scale
    rt = scale / THETA_PRIOR_SD

    def parts(v: np.ndarray) -> tuple[float, float, np.ndarray]:
        return float(v[0]), float(v[1]), v[2:]

    def resid(v: np.ndarray) -> np.ndarray:
        a, beta, th = parts(v)
        S = np.maximum(base + Aa @ np.exp(th), TINY)
        return np.concatenate([y - a - beta * np.log(S), [r0 * a, r0 * (beta - 1.0)], rt * th])

    def jac(v: np.ndarray) -> np.ndarray:
        a, beta, th = parts(v)
        w = np.exp(th)
        S = np.maximum(base + Aa @ w, TINY)
        J = np.zeros((m + 2 + len(idx), 2 + len(idx)))
        J[:m, 0] = -1.0
        J[:m, 1] = -np.log(S)
        J[:m, 2:] = -beta * Aa * w[None, :] / S[:, None]
        J[m, 0] = r0
        J[m + 1, 1] = r0
        J[m + 2:, 2:] = rt * np.eye(len(idx))
        return J

    lo = np.concatenate([[-np.inf, EXPONENT_RANGE[0]], np.full(len(idx), -5.0)])
    hi = np.concatenate([[np.inf, EXPONENT_RANGE[1]], np.full(len(idx), 5.0)])
    v0 = np.concatenate([[0.0, 1.0], np.zeros(len(idx))])
    sol = least_squares(resid, v0, jac=jac, bounds=(lo, hi), method="trf", max_nfev=50)
    a, beta, th = parts(sol.x)
    theta = np.zeros(k)
    theta[idx] = th
    res = resid(sol.x)[:m]
    sigma = max(float(np.sqrt(np.mean(res**2))), MIN_SIGMA)
    return Link(a=a, beta=beta, sigma=sigma, theta=theta if per_term else None)


def exact_objectives(genes: LayerGenes, numel: np.ndarray, X: np.ndarray, mode: str
                     ) -> np.ndarray:
    """The objectives other than the divergence, exactly as the Evaluator computes them
    (no forward): ``3obj`` ``(n, 2)`` density and kept-weighted mean bits; ``2obj`` ``(n, 1)``
    size = density * bits / 32."""
    X = np.asarray(X, dtype=np.int64)
    L = genes.n_layers
    numel = np.asarray(numel, dtype=np.int64)
    kept = kept_counts(genes, numel)  # (L, n_s)
    k = kept[np.arange(L)[None, :], X[:, :L]].astype(float)  # (n, L)
    b = X[:, L:].astype(float)
    total = float(numel.sum())
    density = k.sum(axis=1) / total
    ksum = k.sum(axis=1)
    bits = np.where(ksum > 0, (k * b).sum(axis=1) / np.maximum(ksum, 1.0), b.mean(axis=1))
    if mode == "2obj":
        return (density * bits / 32.0)[:, None]
    return np.stack([density, bits], axis=1)


def kept_counts(genes: LayerGenes, numel: np.ndarray) -> np.ndarray:
    """``(L, n_s)`` int64: weights layer ``l`` keeps at sparsity step ``s`` (steps beyond its
    bound repeat the bound's count)."""
    L = genes.n_layers
    n_s = int(genes.s_idx_max.max()) + 1
    out = np.zeros((L, n_s), np.int64)
    for j in range(L):
        smax = int(genes.s_idx_max[j])
        n = int(numel[j])
        for s in range(n_s):
            out[j, s] = n - n_pruned(n, round(min(s, smax) * genes.step, 6))
    return out


def changed_layers(genes: LayerGenes, X: np.ndarray) -> np.ndarray:
    """``(n,)`` how many layers of each row of ``X (n, 2L)`` differ from the base model."""
    X = np.asarray(X, dtype=np.int64)
    L = genes.n_layers
    return ((X[:, :L] != 0) | (X[:, L:] != genes.bits_max)).sum(axis=1)


def fit_on_points(tables: DivergenceTables, genes: LayerGenes, X: np.ndarray,
                  divergence: np.ndarray, *, gen: np.ndarray | None = None,
                  per_term: bool = True) -> Link:
    """The link fitted on evaluated genes ``X (n, 2L)`` and their divergences ``(n,)``; rows
    that change one layer or none are left out (the tables reproduce them by construction,
    and would pull the link toward the identity). No rows: the identity, ``sigma`` inf.

    gen: ``(n,)`` the generation of each row; when given, ``sigma`` is at least the RMS error
    of predicting the newest generation's rows from a fit on the older ones (what screening
    that generation would have faced; an in-sample residual flatters a model of ``2L + 2``
    parameters)."""
    X = np.asarray(X, dtype=np.int64)
    d = np.asarray(divergence, float)
    keep = changed_layers(genes, X) >= 2
    if not keep.any():
        return Link()
    A = features(tables, genes, X[keep])
    link = fit_link(A, tables.base, d[keep], per_term=per_term)
    if gen is None:
        return link
    g = np.asarray(gen)[keep]
    new = g == g.max()
    if new.sum() < 3 or (~new).sum() < 3:
        return link
    old = fit_link(A[~new], tables.base, d[keep][~new], per_term=per_term)
    w = None if old.theta is None else np.exp(old.theta)
    pred = old.predict_log(tables.base + A[new] @ (np.ones(A.shape[1]) if w is None else w))
    err = np.log(np.maximum(d[keep][new], TINY)) - pred
    sigma = max(link.sigma, float(np.sqrt(np.mean(err**2))))
    return Link(a=link.a, beta=link.beta, sigma=sigma, theta=link.theta)
