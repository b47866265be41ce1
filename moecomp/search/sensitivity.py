"""Layer sensitivity: how much divergence one step of each gene toward compression costs.

``sensitivity (n_var,)`` is the *marginal divergence* of a gene: the divergence added by one
step toward compression (one sparsity step up, one bit down), divided by the layer's share of
all compressible weights, so that genes compare per unit of the compression objectives (a
tiny last layer pruned hard saves little and risks much). Only its order matters to the
operators, which use its normalised rank.

It is measured once by probes (one layer pruned at a probe sparsity, or quantised at a probe
bit width, every other layer intact: sparsity 0, ``bits_max``) and refreshed during the
search from the evaluated points by a log-linear fit.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from moecomp.search.problem import LayerGenes

# Floor of a sensitivity: probes that moved the divergence by nothing still rank by size.
_TINY = 1e-12


def probe_genes(genes: LayerGenes, *, probe_sparsity: float, probe_bits: int) -> np.ndarray:
    """Genes ``(2L + 1, 2L)`` of the probes: row 0 the intact model (sparsity 0,
    ``bits_max``); row ``1 + l`` prunes layer ``l`` at ``probe_sparsity`` (capped at its
    bound); row ``1 + L + l`` quantises layer ``l`` at ``probe_bits`` (clipped to the bits
    range)."""
    L = genes.n_layers
    base = np.concatenate([np.zeros(L, np.int64), np.full(L, genes.bits_max, np.int64)])
    X = np.tile(base, (2 * L + 1, 1))
    s_idx = np.minimum(int(round(probe_sparsity / genes.step)), genes.s_idx_max)
    b = int(np.clip(probe_bits, genes.bits_min, genes.bits_max))
    for layer in range(L):
        X[1 + layer, layer] = s_idx[layer]
        X[1 + L + layer, L + layer] = b
    return X


def sensitivity_from_probes(genes: LayerGenes, X: np.ndarray, divergence: np.ndarray) -> np.ndarray:
    """Sensitivity ``(2L,)`` from the probes ``X (2L + 1, 2L)`` of ``probe_genes`` and their
    divergences ``(2L + 1,)``."""
    L = genes.n_layers
    d = np.asarray(divergence, dtype=float)
    base = d[0]
    steps = np.concatenate(
        [
            X[1 + np.arange(L), np.arange(L)],
            genes.bits_max - X[1 + L + np.arange(L), L + np.arange(L)],
        ]
    )
    rise = np.maximum(d[1:] - base, 0.0)
    share = np.concatenate([genes.weight_share, genes.weight_share])
    sens = np.where(steps > 0, rise / np.maximum(steps, 1), 0.0) / share
    return np.maximum(sens, _TINY)


def compression_steps(
    X: np.ndarray, xl: np.ndarray, xu: np.ndarray, compress_dir: np.ndarray
) -> np.ndarray:
    """Steps ``(n, n_var)`` each gene has moved from its least-compressed end."""
    X = np.asarray(X, dtype=float)
    return np.where(compress_dir > 0, X - xl, xu - X)


def refresh_sensitivity(
    prior: np.ndarray,
    X: np.ndarray,
    divergence: np.ndarray,
    *,
    xl: np.ndarray,
    xu: np.ndarray,
    compress_dir: np.ndarray,
    weight_share: np.ndarray,
    ridge: float = 1e-2,
) -> np.ndarray:
    """Sensitivity ``(n_var,)`` refreshed from evaluated points.

    prior: ``(n_var,)`` the probe sensitivity; X: ``(m, n_var)`` recent evaluated genes;
    divergence: ``(m,)`` theirs; weight_share: ``(n_var,)`` the share of all compressible
    weights held by each gene's layer. Fits ``log divergence ~ b + sum_j c_j * steps_j`` (ridge on
    standardised steps): ``c_j`` is the relative divergence change per step near the
    evaluated points, and ``median(divergence) * c_j / share_j`` the marginal divergence.
    Returned: the geometric mean of prior and fit (each scaled to mean 1), so the probes keep
    anchoring the order while the fit adapts it to where the population is. Genes that do not
    vary in ``X`` keep the prior. With fewer than ``2 * n_var + 2`` points: the prior.
    """
    prior = np.asarray(prior, dtype=float)
    m, n_var = np.asarray(X).shape
    if m < 2 * n_var + 2:
        return prior.copy()
    z = compression_steps(X, xl, xu, compress_dir)
    y = np.log(np.maximum(np.asarray(divergence, dtype=float), 1e-9))
    mu, sd = z.mean(axis=0), z.std(axis=0)
    varies = sd > 0
    if not varies.any():
        return prior.copy()
    Z = (z[:, varies] - mu[varies]) / sd[varies]
    A = Z.T @ Z + ridge * m * np.eye(Z.shape[1])
    c = np.linalg.solve(A, Z.T @ (y - y.mean())) / sd[varies]
    fit = np.full(n_var, np.nan)
    fit[varies] = np.exp(np.median(y)) * np.maximum(c, 0.0) / weight_share[varies]
    p = prior / prior.mean()
    f_ok = fit[varies]
    f = np.maximum(f_ok / max(f_ok.mean(), _TINY), _TINY) if f_ok.mean() > 0 else None
    out = p.copy()
    if f is not None:
        out[varies] = np.sqrt(p[varies] * f)
    return np.maximum(out, _TINY)


def sensitivity_rank(
    sensitivity: np.ndarray | None, n_var: int, kinds: np.ndarray | None = None
) -> np.ndarray:
    """Normalised rank ``(n_var,)`` in [0, 1]: 0 the least sensitive gene, 1 the most; ties
    share their average rank; 0.5 where unknown (None), where all are equal, or for a gene
    alone in its kind.

    kinds: ``(n_var,)`` labels; genes are ranked only against genes of the same kind (the
    sparsity genes among themselves, the bits genes among themselves: one step of a bits gene
    costs far more than one 1 % step of sparsity, and ranking them together would always
    relax bits and always prune).
    """
    if sensitivity is None or n_var < 2:
        return np.full(n_var, 0.5)
    s = np.asarray(sensitivity, dtype=float)
    if s.shape != (n_var,):
        raise ValueError(f"sensitivity: expected shape ({n_var},), got {s.shape}")
    labels = np.zeros(n_var, dtype=np.int64) if kinds is None else np.asarray(kinds)
    out = np.full(n_var, 0.5)
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        sk = s[idx]
        if len(idx) > 1 and not np.all(sk == sk[0]):
            out[idx] = (rankdata(sk, method="average") - 1.0) / (len(idx) - 1)
    return out
