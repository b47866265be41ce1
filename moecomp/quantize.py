"""Quantizers: map the surviving weights of a tensor to a small codebook of levels.

The stage *apply* of DESIGN.md. Every function is pure and vectorised and works on a 1-D
float32 tensor of survivor values ``(m,)``; it returns ``indices`` (int64 ``(m,)``, the level
of each value) and ``codebook`` (float32 ``(k,)``, the level values, sorted ascending), so
that ``codebook[indices]`` is the quantised tensor.

- ``uniform_quantize``: ``2**bits`` equal-width bins over ``[min, max]``; each level is the
  mean of the values in its bin (seed 2, Khosrowshahli et al.).
- ``kmeans_quantize``: 1-D k-means (Lloyd-Max) seeded from the uniform quantizer; never worse
  in squared error than uniform.
- ``shared_quantize``: the seed-2 global codebook; all layers' survivors are pooled, cut
  into ``k`` equal-width bins, and every layer uses the same bin-mean codebook.

Bins: with ``lo, hi`` the minimum and maximum of the values and ``k`` bins, value ``v`` goes to
bin ``min(floor((v - lo) * k / (hi - lo)), k - 1)``, i.e. ``[edges[j], edges[j+1])`` with the
last bin closed (``edges`` from ``shared_edges``, up to float32 rounding at the edges).

Degenerate inputs: when the values span no range (``m == 0``, or all values equal) the
codebook has a single level (``0.0`` for ``m == 0``, the common value otherwise) and every
index is 0. Otherwise the codebook has exactly ``k`` levels; a level whose bin holds no value
is set to its bin centre (it is never referenced).

Sums are accumulated in float64 so a level (a bin mean) always lies inside its bin.
"""

from __future__ import annotations

import math

import torch

from moecomp.errors import ConfigError

BITS_RANGE = (1, 8)
K_RANGE = (1, 2**16)


def _check_values(values: torch.Tensor, where: str = "values") -> torch.Tensor:
    """``values`` as a contiguous float32 1-D tensor, or a loud error."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 1:
        raise ValueError(f"{where}: expected a 1-D tensor of survivor values, got {values.dim()}-D")
    if not values.is_floating_point():
        raise TypeError(f"{where}: expected a floating tensor, got {values.dtype}")
    return values.detach().to(torch.float32).contiguous()


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


def uniform_quantize(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-width bin-mean quantizer (seed 2).

    values: float ``(m,)``, the survivors of one tensor (any order).
    bits: 1..8; the codebook has ``2**bits`` levels (one level for degenerate inputs, see the
        module docstring).
    Returns ``(indices int64 (m,), codebook float32 (k,))``; ``codebook[j]`` is the mean of the
    values in bin ``j`` and the codebook is sorted ascending.
    """
    v = _check_values(values)
    return _equal_width(v, 2 ** _check_bits(bits))


def kmeans_quantize(
    values: torch.Tensor, bits: int, *, iters: int = 30, tol: float = 1e-7
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means (Lloyd-Max) with ``2**bits`` levels, seeded from ``uniform_quantize``.

    values: float ``(m,)``; bits: 1..8.
    iters: at most this many Lloyd iterations (assign each value to its nearest level, then
        move each level to the mean of its values); stops earlier once the assignment is
        stable or no level moves by more than ``tol * (max - min)``.
    Levels left without values (equal-width bins are often empty, e.g. the gap around 0 that
    magnitude pruning leaves) are moved, for the next iteration, onto the value farthest
    from its level in the clusters of largest squared error, one per cluster; this only ever
    lowers the error. Deterministic.
    The result's mean squared error is never above uniform's (should float rounding ever
    make it so, the uniform result is returned).
    Returns ``(indices int64 (m,), codebook float32 (k,))``: codebook sorted ascending, each
    used level the mean of its values, each value at its nearest level when converged.
    """
    v = _check_values(values)
    k = 2 ** _check_bits(bits)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ConfigError("iters", f"must be a non-negative integer, got {iters!r}")
    if not tol >= 0.0:
        raise ConfigError("tol", f"must be a non-negative number, got {tol!r}")
    u_idx, u_cb = _equal_width(v, k)
    if u_cb.numel() < 2 or iters == 0:
        return u_idx, u_cb
    lo, hi = _range(v)
    sorted_v = torch.sort(v).values.to(torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    # prefix sums give every cluster's sum (and squared sum) from its k cut positions.
    csum = torch.cat([zero, torch.cumsum(sorted_v, 0)])
    csum2 = torch.cat([zero, torch.cumsum(sorted_v.square(), 0)])
    m = sorted_v.numel()
    centres = u_cb.to(torch.float64)
    cuts_prev: torch.Tensor | None = None
    for _ in range(iters):
        mids = (centres[1:] + centres[:-1]) / 2
        # cluster j: sorted values in [cuts[j], cuts[j+1]), i.e. mids[j-1] <= v < mids[j]
        inner = torch.searchsorted(sorted_v, mids, side="left")
        cuts = torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), m)])
        counts = cuts[1:] - cuts[:-1]
        sums = csum[cuts[1:]] - csum[cuts[:-1]]
        means = torch.where(counts > 0, sums / counts.clamp(min=1).to(torch.float64), centres)
        sumsq = csum2[cuts[1:]] - csum2[cuts[:-1]]
        nxt, relocated = _relocate_empty(means, counts, sums, sumsq, cuts, sorted_v)
        stable = cuts_prev is not None and torch.equal(cuts, cuts_prev)
        moved = float((means - centres).abs().max())
        if not relocated and (stable or moved <= tol * (hi - lo)):
            break
        cuts_prev, centres = cuts, nxt
    # (mids, means) belong together: the codebook holds the means of the clusters cut by mids
    idx = torch.searchsorted(mids, v.to(torch.float64), side="right")
    codebook = means.to(torch.float32)
    if quantization_mse(v, idx, codebook) > quantization_mse(v, u_idx, u_cb):
        return u_idx, u_cb
    return idx, codebook


def _relocate_empty(
    means: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    sumsq: torch.Tensor,
    cuts: torch.Tensor,
    sorted_v: torch.Tensor,
) -> tuple[torch.Tensor, bool]:
    """Move empty levels onto the farthest value of the worst clusters; returns sorted levels.

    All tensors float64/int64 ``(k,)`` except ``cuts (k+1,)`` and ``sorted_v (m,)``. An empty
    level contributes nothing, so placing it on a value never raises the squared error.
    """
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return means, False
    n = counts.to(torch.float64)
    sse = torch.where(counts > 1, sumsq - sums.square() / n.clamp(min=1), 0.0)
    worst = iter(torch.argsort(sse, descending=True, stable=True).tolist())
    centres = means.clone()
    relocated = False
    for e in empty:
        for j in worst:
            if int(counts[j]) < 2:
                continue
            first, last = float(sorted_v[cuts[j]]), float(sorted_v[cuts[j + 1] - 1])
            if first < last:  # a cluster of one distinct value cannot be split
                mean = float(means[j])
                centres[e] = last if last - mean >= mean - first else first
                relocated = True
                break
    return torch.sort(centres).values, relocated


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
