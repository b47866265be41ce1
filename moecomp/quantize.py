"""Quantizers: map the surviving weights of a tensor to a small codebook of levels.

The stage *apply* of DESIGN.md. Every function is pure and vectorised and works on a 1-D
float32 tensor of survivor values ``(m,)``; it returns ``indices`` (int64 ``(m,)``, the level
of each value) and ``codebook`` (float32 ``(k,)``, the level values, sorted ascending), so
that ``codebook[indices]`` is the quantised tensor.

- ``uniform_quantize``: ``2**bits`` equal-width bins over ``[min, max]``; each level is the
  mean of the values in its bin (seed 2, Khosrowshahli et al.).
- ``kmeans_quantize``: 1-D k-means (Lloyd-Max) on the fine histogram below, seeded from the
  uniform quantizer; never worse in squared error than uniform.
- ``shared_quantize``: the seed-2 global codebook; all layers' survivors are pooled, cut
  into ``k`` equal-width bins, and every layer uses the same bin-mean codebook.

Bins: with ``lo, hi`` the minimum and maximum of the values and ``k`` bins, value ``v`` goes to
bin ``min(floor((v - lo) * k / (hi - lo)), k - 1)``, i.e. ``[edges[j], edges[j+1])`` with the
last bin closed (``edges`` from ``shared_edges``, up to float32 rounding at the edges).

**Fine histogram** (:class:`FineHistogram`): the two single-tensor quantizers work on
``FINE_BINS = 2**16`` such bins (the *fine grid*) and never on the values again: a level's sum
and count are sums over fine bins. Because ``FINE_BINS / 2**bits`` is a power of two, the
uniform bin of a value is exactly its fine bin shifted right by ``16 - bits`` (the same float64
product, scaled by a power of two), so one histogram serves every bit-width; k-means assigns
whole fine bins to levels (by the bin's mean), so its cost per iteration is ``O(k log 2**16)``
whatever the number of values. The histogram's sums are accumulated in the values' order, so
callers that want identical codebooks pass the values in one order (row-major order of the
kept positions, as ``apply`` does, and so does the evaluator).

Degenerate inputs: when the values span no range (``m == 0``, or all values equal) the
codebook has a single level (``0.0`` for ``m == 0``, the common value otherwise) and every
index is 0. Otherwise the codebook has exactly ``k`` levels; a level whose bin holds no value
is set to its bin centre (it is never referenced).

Sums are accumulated in float64 so a level (a bin mean) always lies inside its bin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moecomp.errors import ConfigError

BITS_RANGE = (1, 8)
K_RANGE = (1, 2**16)
FINE_BITS = 16
FINE_BINS = 2**FINE_BITS
"""Bins of the fine grid the single-tensor quantizers work on (2**16: a 8-bit level spans
256 of them)."""


def _check_values(values: torch.Tensor, where: str = "values") -> torch.Tensor:
    """``values`` as a contiguous float32 1-D tensor, or a loud error."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 1:
        raise ValueError(f"{where}: expected a 1-D tensor of survivor values, got {values.dim()}-D")
    if not values.is_floating_point():
        raise TypeError(f"{where}: expected a floating tensor, got {values.dtype}")
    return values.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ConfigError("bits", f"must be an integer in 1..8, got {bits!r}")
    if not BITS_RANGE[0] <= bits <= BITS_RANGE[1]:
        raise ConfigError("bits", f"must be an integer in 1..8, got {bits!r}")
    return bits


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not K_RANGE[0] <= k <= K_RANGE[1]:
        raise ConfigError("k", f"must be an integer in {K_RANGE[0]}..{K_RANGE[1]}, got {k!r}")
    return k


def _degenerate(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One level for values that span no range: ``m == 0`` (level 0.0) or all equal."""
    value = v[:1] if v.numel() else torch.zeros(1, dtype=torch.float32)
    return torch.zeros(v.numel(), dtype=torch.int64), value.clone()


def _range(v: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of non-empty ``v``; min/max propagate nan, so this also checks finiteness."""
    lo_t, hi_t = torch.aminmax(v)
    lo, hi = float(lo_t), float(hi_t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("values contain nan or inf; only finite weights can be quantised")
    return lo, hi


def _equal_width(v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-width bin-mean quantizer with ``k`` bins on checked float32 ``v`` ``(m,)``.

    Returns ``(indices int64 (m,), codebook float32 (k,))``; one level if ``v`` spans no range.
    Used for the pooled codebook, whose ``k`` need not be a power of two.
    """
    if v.numel() == 0:
        return _degenerate(v)
    lo, hi = _range(v)
    if lo == hi:
        return _degenerate(v)
    scale = k / (hi - lo)
    # float64 so that neither ``v - lo`` nor the scale overflows for extreme float32 ranges;
    # (v - lo) >= 0, so truncation towards zero is the floor; the maximum lands at k -> k-1.
    v64 = v.to(torch.float64)
    idx = torch.sub(v64, lo).mul_(scale).to(torch.int64).clamp_(max=k - 1)
    counts = torch.bincount(idx, minlength=k)
    sums = torch.bincount(idx, weights=v64, minlength=k)
    centres = lo + (torch.arange(k, dtype=torch.float64) + 0.5) * ((hi - lo) / k)
    used = counts > 0
    means = sums / counts.clamp(min=1).to(torch.float64)
    codebook = torch.where(used, means, centres).to(torch.float32)
    return idx, codebook


# --- the fine histogram ---------------------------------------------------------------------
@dataclass(frozen=True)
class FineHistogram:
    """Values on the fine grid: ``FINE_BINS`` equal-width bins over ``[lo, hi]``.

    lo, hi: the values' minimum and maximum (``lo == hi``: all values equal, or none).
    bins: int64 ``(nb,)``, the non-empty fine bins, ascending.
    counts: int64 ``(nb,)``, values per bin; sums: float64 ``(nb,)``, their sum.
    """

    lo: float
    hi: float
    bins: np.ndarray
    counts: np.ndarray
    sums: np.ndarray

    @property
    def n(self) -> int:
        """Number of values."""
        return int(self.counts.sum())

    @property
    def degenerate(self) -> bool:
        """Whether the values span no range (one level whatever the bit-width)."""
        return self.n == 0 or self.lo == self.hi

    @property
    def nbytes(self) -> int:
        return int(self.bins.nbytes + self.counts.nbytes + self.sums.nbytes)


def fine_index(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The fine bin of each value, int64 ``(m,)``: ``min(floor((v - lo) * FINE_BINS / (hi -
    lo)), FINE_BINS - 1)`` in float64; values outside ``[lo, hi]`` are clipped to the first
    or last bin (callers give them weight 0). ``hi > lo``."""
    d = values.astype(np.float64)
    d -= lo
    d *= FINE_BINS / (hi - lo)
    np.clip(d, 0.0, FINE_BINS - 1, out=d)
    return d.astype(np.int64)


def fine_histogram_from(index: np.ndarray, values: np.ndarray, lo: float, hi: float,
                        *, mask: np.ndarray | None = None) -> FineHistogram:
    """The histogram of ``values`` (float ``(m,)``) whose fine bins are ``index``; with a bool
    ``mask`` ``(m,)`` only the values where it is True count (the same sums, bit for bit, as
    the selected values alone in the same order)."""
    if mask is not None:
        index, values = np.compress(mask, index), np.compress(mask, values)
    counts = np.bincount(index, minlength=FINE_BINS)
    sums = np.bincount(index, weights=values, minlength=FINE_BINS)
    bins = np.flatnonzero(counts)
    return FineHistogram(lo, hi, bins, counts[bins], sums[bins])


def fine_histogram(values: torch.Tensor) -> tuple[FineHistogram, np.ndarray]:
    """The fine histogram of survivor values ``(m,)`` and each value's fine bin (int64
    ``(m,)``; all 0 when the values span no range)."""
    v = _check_values(values).numpy()
    if v.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return FineHistogram(0.0, 0.0, empty, empty, np.zeros(0)), empty
    lo, hi = _range(torch.from_numpy(v))
    if lo == hi:
        idx = np.zeros(v.size, dtype=np.int64)
        return FineHistogram(lo, hi, np.zeros(1, dtype=np.int64),
                             np.array([v.size], dtype=np.int64),
                             np.array([float(v.astype(np.float64).sum())])), idx
    idx = fine_index(v, lo, hi)
    return fine_histogram_from(idx, v, lo, hi), idx


def _one_level(h: FineHistogram) -> tuple[np.ndarray, np.ndarray]:
    level = np.zeros(h.bins.size, dtype=np.int64)
    return level, np.array([h.lo if h.n else 0.0], dtype=np.float32)


def uniform_levels(h: FineHistogram, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The uniform quantizer on a fine histogram: ``(level int64 (nb,) of each non-empty fine
    bin, codebook float32 (k,))``, ``k = 2**bits`` (one level when degenerate)."""
    k = 2 ** _check_bits(bits)
    if h.degenerate:
        return _one_level(h)
    level = h.bins >> (FINE_BITS - bits)
    counts = np.bincount(level, weights=h.counts, minlength=k)
    sums = np.bincount(level, weights=h.sums, minlength=k)
    centres = h.lo + (np.arange(k, dtype=np.float64) + 0.5) * ((h.hi - h.lo) / k)
    means = np.divide(sums, counts, out=centres.copy(), where=counts > 0)
    return level, means.astype(np.float32)


def _between_sse(mu: np.ndarray, c: np.ndarray, level: np.ndarray, codebook: np.ndarray
                 ) -> float:
    """Squared error of quantising each fine bin's mean ``mu`` (``c`` values) to its level: the
    part of the squared error that depends on the levels (the spread inside the fine bins is
    the same for any assignment of whole bins)."""
    d = mu - codebook.astype(np.float64)[level]
    return float((c * d * d).sum())


def kmeans_levels(h: FineHistogram, bits: int, *, iters: int = 30, tol: float = 1e-7
                  ) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means on a fine histogram: ``(level int64 (nb,) of each non-empty fine bin,
    codebook float32 (k,))``. See :func:`kmeans_quantize`."""
    k = 2 ** _check_bits(bits)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ConfigError("iters", f"must be a non-negative integer, got {iters!r}")
    if not tol >= 0.0:
        raise ConfigError("tol", f"must be a non-negative number, got {tol!r}")
    u_level, u_cb = uniform_levels(h, bits)
    nb = h.bins.size
    if u_cb.size < 2 or iters == 0 or nb < 2:
        return u_level, u_cb
    c = h.counts.astype(np.float64)
    mu = h.sums / c  # each fine bin's mean
    # cut positions need sorted means; rounding can only misorder means within an ulp
    mu_sorted = np.maximum.accumulate(mu)
    zero = np.zeros(1)
    # prefix sums give every cluster's count and sum from its k cut positions
    csum_n = np.concatenate([zero, np.cumsum(c)])
    csum_s = np.concatenate([zero, np.cumsum(h.sums)])
    # and each cluster's spread of bin means (centred on the overall mean: less cancellation)
    dev = mu - float(h.sums.sum()) / float(c.sum())
    csum_d = np.concatenate([zero, np.cumsum(c * dev)])
    csum_q = np.concatenate([zero, np.cumsum(c * dev * dev)])
    centres = u_cb.astype(np.float64)
    cuts_prev: np.ndarray | None = None
    span = h.hi - h.lo
    for _ in range(iters):
        mids = (centres[1:] + centres[:-1]) / 2
        # cluster j: the fine bins whose mean is in [mids[j-1], mids[j])
        cuts = np.concatenate([[0], np.searchsorted(mu_sorted, mids, side="left"), [nb]])
        counts = csum_n[cuts[1:]] - csum_n[cuts[:-1]]
        sums = csum_s[cuts[1:]] - csum_s[cuts[:-1]]
        means = np.divide(sums, counts, out=centres.copy(), where=counts > 0)
        d = csum_d[cuts[1:]] - csum_d[cuts[:-1]]
        sse = csum_q[cuts[1:]] - csum_q[cuts[:-1]] - np.divide(
            d * d, counts, out=np.zeros_like(d), where=counts > 0)
        nxt, relocated = _relocate_empty(means, counts, cuts, mu_sorted, sse)
        stable = cuts_prev is not None and np.array_equal(cuts, cuts_prev)
        moved = float(np.abs(means - centres).max())
        if not relocated and (stable or moved <= tol * span):
            break
        cuts_prev, centres = cuts, nxt
    # (cuts, means) belong together: the codebook holds the means of the clusters cut there
    level = np.repeat(np.arange(k, dtype=np.int64), np.diff(cuts))
    codebook = means.astype(np.float32)
    # Never worse than uniform: kept only when clearly better than the rounding of either
    # error (relative 1e-6, plus a float32 ulp of the largest value per value and the
    # largest spread inside a fine bin), else uniform's result itself.
    km, u = _between_sse(mu, c, level, codebook), _between_sse(mu, c, u_level, u_cb)
    top = max(abs(h.lo), abs(h.hi))
    width = span / FINE_BINS
    slack = 1e-6 * u + float(c.sum()) * ((top * 2.0**-24) ** 2 + 1e-9 * width * width)
    if km < u - slack:
        return level, codebook
    return u_level, u_cb


def _relocate_empty(means: np.ndarray, counts: np.ndarray, cuts: np.ndarray,
                    mu: np.ndarray, sse: np.ndarray) -> tuple[np.ndarray, bool]:
    """Move empty levels onto the farthest fine bin of the worst clusters; returns sorted
    levels. ``means, counts, sse (k,)`` (``sse``: each cluster's squared error of its bins'
    means), ``cuts (k+1,)``; ``mu (nb,)`` the fine bins' means. An empty level contributes
    nothing, so placing it on a bin never raises the squared error."""
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0:
        return means, False
    worst = iter(np.argsort(-sse, kind="stable").tolist())
    centres = means.copy()
    relocated = False
    for e in empty.tolist():
        for j in worst:
            if cuts[j + 1] - cuts[j] < 2:
                continue
            first, last = float(mu[cuts[j]]), float(mu[cuts[j + 1] - 1])
            if first < last:  # a cluster of one distinct bin mean cannot be split
                mean = float(means[j])
                centres[e] = last if last - mean >= mean - first else first
                relocated = True
                break
    return np.sort(centres), relocated


def level_lookup(h: FineHistogram, level: np.ndarray) -> np.ndarray:
    """int64 ``(FINE_BINS,)``: the level of every fine bin (0 for empty ones)."""
    lut = np.zeros(FINE_BINS, dtype=np.int64)
    lut[h.bins] = level
    return lut


def _quantize_fine(values: torch.Tensor, bits: int, kmeans: bool, iters: int, tol: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    bits = _check_bits(bits)
    h, idx = fine_histogram(values)
    if h.degenerate:
        level, codebook = _one_level(h)
        return torch.zeros(idx.size, dtype=torch.int64), torch.from_numpy(codebook)
    if kmeans:
        level, codebook = kmeans_levels(h, bits, iters=iters, tol=tol)
    else:
        level, codebook = uniform_levels(h, bits)
    return torch.from_numpy(level_lookup(h, level)[idx]), torch.from_numpy(codebook)


def uniform_quantize(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-width bin-mean quantizer (seed 2).

    values: float ``(m,)``, the survivors of one tensor (in row-major order of their positions
        for results bit-identical to the evaluator's; any order otherwise).
    bits: 1..8; the codebook has ``2**bits`` levels (one level for degenerate inputs, see the
        module docstring).
    Returns ``(indices int64 (m,), codebook float32 (k,))``; ``codebook[j]`` is the mean of the
    values in bin ``j`` and the codebook is sorted ascending.
    """
    return _quantize_fine(values, bits, False, 0, 0.0)


def kmeans_quantize(
    values: torch.Tensor, bits: int, *, iters: int = 30, tol: float = 1e-7
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means (Lloyd-Max) with ``2**bits`` levels on the fine histogram, seeded from
    ``uniform_quantize``.

    values: float ``(m,)`` (order as for ``uniform_quantize``); bits: 1..8.
    iters: at most this many Lloyd iterations (assign each fine bin, by its mean, to the
        nearest level, then move each level to the mean of its values); stops earlier once the
        assignment is stable or no level moves by more than ``tol * (max - min)``.
    The unit of assignment is a fine bin (``(max - min) / 2**16`` wide), so a value may sit
    one fine bin past the midpoint between two levels; each used level is still the exact
    mean of its values.
    Levels left without values (equal-width bins are often empty, e.g. the gap around 0 that
    magnitude pruning leaves) are moved, for the next iteration, onto the fine bin farthest
    from its level in the clusters of largest squared error, one per cluster; this only ever
    lowers the error. Deterministic.
    The result's squared error is never above uniform's: k-means is kept only when it is
    better by more than float rounding could account for, otherwise the uniform result is
    returned.
    Returns ``(indices int64 (m,), codebook float32 (k,))``, the codebook sorted ascending.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ConfigError("iters", f"must be a non-negative integer, got {iters!r}")
    if not tol >= 0.0:
        raise ConfigError("tol", f"must be a non-negative number, got {tol!r}")
    return _quantize_fine(values, bits, True, iters, tol)


def shared_edges(pooled: torch.Tensor, k: int) -> torch.Tensor:
    """Edges of ``k`` equal-width bins over ``[min, max]`` of ``pooled``.

    pooled: float ``(n,)``, e.g. the survivors of all layers concatenated.
    Returns float64 ``(k+1,)``: ``edges[0] = min``, ``edges[k] = max``; bin ``j`` is
    ``[edges[j], edges[j+1])``, the last one closed. For ``n == 0`` the edges are all 0.
    """
    v = _check_values(pooled, "pooled")
    k = _check_k(k)
    if v.numel() == 0:
        return torch.zeros(k + 1, dtype=torch.float64)
    lo, hi = _range(v)
    edges = lo + torch.arange(k + 1, dtype=torch.float64) * ((hi - lo) / k)
    edges[-1] = hi  # exact, whatever the rounding of the step
    return edges


def shared_quantize(
    values_per_layer: dict[str, torch.Tensor], k: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The seed-2 global codebook: one equal-width bin-mean codebook for all layers.

    values_per_layer: name -> float ``(m_i,)`` survivors of that layer.
    k: number of bins of the pooled codebook (the plan's ``shared_k``).
    All survivors are pooled, cut into ``k`` equal-width bins over the pool's range, and each
    level is the mean of the pooled values in its bin. Returns name -> ``(indices int64
    (m_i,), codebook float32 (k,))`` in the input's order; every layer gets the same codebook
    tensor (one level if the pool spans no range).
    """
    k = _check_k(k)
    checked = {n: _check_values(t, f"values_per_layer[{n!r}]") for n, t in values_per_layer.items()}
    if not checked:
        return {}
    pooled = torch.cat(list(checked.values()))
    idx, codebook = _equal_width(pooled, k)
    sizes = [t.numel() for t in checked.values()]
    return {n: (part, codebook) for n, part in zip(checked, torch.split(idx, sizes), strict=True)}


def quantization_mse(values: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor) -> float:
    """Mean squared error of ``codebook[indices]`` against ``values`` (units: weight**2).

    values: float ``(m,)``; indices: int64 ``(m,)``; codebook: float ``(k,)``. 0.0 when ``m == 0``.
    """
    if values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} differ")
    if values.numel() == 0:
        return 0.0
    diff = values.to(torch.float64) - codebook.to(torch.float64)[indices]
    return float(diff.square().mean())
