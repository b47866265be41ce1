"""Quantizers: bin-mean oracle, k-means against a naive Lloyd loop, shared codebook."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from moecomp.errors import ConfigError
from moecomp.quantize import (
    FINE_BINS,
    _equal_width,
    fine_histogram,
    fine_histogram_from,
    fine_index,
    kmeans_levels,
    kmeans_quantize,
    quantization_mse,
    shared_edges,
    shared_quantize,
    uniform_quantize,
)

FINITE32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
VALUES = arrays(np.float32, st.integers(0, 60), elements=FINITE32).map(torch.from_numpy)
# values on a coarse grid: many ties and repeated values
GRID = arrays(np.float32, st.integers(0, 60), elements=st.integers(-4, 4).map(lambda i: i / 4)).map(
    torch.from_numpy
)


def naive_bins(values: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """Oracle: equal-width bins by a plain loop over [min, max], level = bin mean."""
    vs = [float(v) for v in values]
    lo, hi = min(vs), max(vs)
    width = (hi - lo) / k
    idx = [min(int((v - lo) / width), k - 1) for v in vs]
    levels = []
    for j in range(k):
        members = [v for v, i in zip(vs, idx, strict=True) if i == j]
        levels.append(sum(members) / len(members) if members else lo + (j + 0.5) * width)
    return idx, levels


def check_common(values: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor) -> None:
    assert indices.dtype == torch.int64 and indices.shape == values.shape
    assert codebook.dtype == torch.float32 and codebook.dim() == 1 and codebook.numel() >= 1
    if indices.numel():
        assert 0 <= int(indices.min()) and int(indices.max()) < codebook.numel()
    assert bool((codebook[1:] >= codebook[:-1]).all()), "codebook must be sorted"


def check_bin_means(values: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor) -> None:
    """Each used level is the mean of its values (float64 oracle, float32 tolerance)."""
    v = values.double().numpy()
    scale = max(1.0, float(np.abs(v).max())) if v.size else 1.0
    for j in range(codebook.numel()):
        members = v[indices.numpy() == j]
        if members.size:
            assert abs(float(codebook[j]) - members.mean()) <= 1e-6 * scale


@settings(max_examples=150, deadline=None)
@given(values=st.one_of(VALUES, GRID), bits=st.integers(1, 8))
def test_uniform_levels_are_bin_means_and_bins_are_equal_width(
    values: torch.Tensor, bits: int
) -> None:
    indices, codebook = uniform_quantize(values, bits)
    check_common(values, indices, codebook)
    check_bin_means(values, indices, codebook)
    k = 2**bits
    if values.numel() == 0:
        assert codebook.tolist() == [0.0]
        return
    if float(values.min()) == float(values.max()):
        assert codebook.tolist() == [float(values[0])] and not bool(indices.any())
        return
    assert codebook.numel() == k
    edges = shared_edges(values, k)
    assert edges.shape == (k + 1,)
    assert float(edges[0]) == float(values.min()) and float(edges[-1]) == float(values.max())
    slack = 1e-9 * float(edges[-1] - edges[0])
    v = values.double()
    assert bool((v >= edges[indices] - slack).all()) and bool(
        (v <= edges[indices + 1] + slack).all()
    )
    # every level, used or not, lies inside its bin
    assert bool((codebook.double() >= edges[:-1] - slack).all())
    assert bool((codebook.double() <= edges[1:] + slack).all())


def test_uniform_matches_naive_loop_oracle() -> None:
    g = torch.Generator().manual_seed(3)
    values = torch.randn(200, generator=g)
    for bits in (1, 2, 3, 5):
        indices, codebook = uniform_quantize(values, bits)
        idx, levels = naive_bins(values, 2**bits)
        assert indices.tolist() == idx
        assert np.allclose(codebook.numpy(), levels, rtol=1e-6, atol=1e-7)


def test_uniform_known_answer() -> None:
    indices, codebook = uniform_quantize(torch.tensor([0.0, 1.0, 2.0, 3.0]), 1)
    assert indices.tolist() == [0, 0, 1, 1]
    assert codebook.tolist() == [0.5, 2.5]
    # empty middle bins get their centres: bins of width 0.75 over [0, 3]
    indices, codebook = uniform_quantize(torch.tensor([0.0, 3.0]), 2)
    assert indices.tolist() == [0, 3]
    assert codebook.tolist() == [0.0, 1.125, 1.875, 3.0]


def test_degenerate_inputs() -> None:
    indices, codebook = uniform_quantize(torch.zeros(0), 4)
    assert indices.shape == (0,) and indices.dtype == torch.int64 and codebook.tolist() == [0.0]
    indices, codebook = uniform_quantize(torch.tensor([0.25]), 8)
    assert indices.tolist() == [0] and codebook.tolist() == [0.25]
    indices, codebook = kmeans_quantize(torch.full((7,), -2.0), 3)
    assert indices.tolist() == [0] * 7 and codebook.tolist() == [-2.0]


def test_extreme_float32_range_does_not_overflow() -> None:
    big = float(np.finfo(np.float32).max)
    values = torch.tensor([-big, 0.0, big], dtype=torch.float32)
    indices, codebook = uniform_quantize(values, 1)
    assert indices.tolist() == [0, 1, 1]
    assert torch.isfinite(codebook).all()


def test_bad_inputs_raise() -> None:
    with pytest.raises(ConfigError, match="bits"):
        uniform_quantize(torch.ones(3), 0)
    with pytest.raises(ConfigError, match="bits"):
        kmeans_quantize(torch.ones(3), 9)
    with pytest.raises(ValueError, match="1-D"):
        uniform_quantize(torch.ones(2, 2), 2)
    with pytest.raises(ValueError, match="nan"):
        uniform_quantize(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="nan"):
        uniform_quantize(torch.tensor([1.0, float("inf")]), 2)
    with pytest.raises(TypeError):
        uniform_quantize(torch.arange(3), 2)
    with pytest.raises(ConfigError, match="k"):
        shared_quantize({"a": torch.ones(3)}, 0)


@settings(max_examples=150, deadline=None)
@given(values=st.one_of(VALUES, GRID), bits=st.integers(1, 8))
def test_kmeans_never_worse_than_uniform(values: torch.Tensor, bits: int) -> None:
    indices, codebook = kmeans_quantize(values, bits)
    check_common(values, indices, codebook)
    u_idx, u_cb = uniform_quantize(values, bits)
    assert quantization_mse(values, indices, codebook) <= quantization_mse(values, u_idx, u_cb)
    again = kmeans_quantize(values, bits)
    assert torch.equal(again[0], indices) and torch.equal(again[1], codebook)


def naive_lloyd(values: np.ndarray, centres: np.ndarray, iters: int) -> np.ndarray:
    """Oracle: textbook Lloyd with argmin assignment and the documented relocation rule.

    Empty levels move onto the farthest value of the clusters of largest squared error.
    """
    c = centres.astype(np.float64)
    prev, means = None, c
    for _ in range(iters):
        assign = np.abs(values[:, None] - c[None, :]).argmin(axis=1)
        means = c.copy()
        for j in range(c.size):
            if (assign == j).any():
                means[j] = values[assign == j].mean()
        sse = [
            ((values[assign == j] - means[j]) ** 2).sum() if (assign == j).sum() > 1 else 0.0
            for j in range(c.size)
        ]
        worst = iter(sorted(range(c.size), key=lambda j: -sse[j]))
        nxt, relocated = means.copy(), False
        for e in [j for j in range(c.size) if not (assign == j).any()]:
            for j in worst:
                members = values[assign == j]
                if members.size > 1 and members.min() < members.max():
                    far = members.max() - means[j] >= means[j] - members.min()
                    nxt[e] = members.max() if far else members.min()
                    relocated = True
                    break
        if not relocated and prev is not None and (assign == prev).all():
            break
        prev, c = assign, np.sort(nxt)
    return means


def test_kmeans_matches_naive_lloyd() -> None:
    g = torch.Generator().manual_seed(0)
    # two lobes with a gap (like magnitude-pruned weights): uniform bins in the gap are empty
    values = torch.cat([torch.randn(300, generator=g) * 0.1, torch.randn(100, generator=g) + 3])
    for bits in (1, 2, 3, 4):
        indices, codebook = kmeans_quantize(values, bits, iters=500, tol=0.0)
        _, u_cb = uniform_quantize(values, bits)
        oracle = naive_lloyd(values.double().numpy(), u_cb.numpy(), 500)
        assert np.allclose(codebook.numpy(), oracle, rtol=1e-5, atol=1e-6)
        check_bin_means(values, indices, codebook)
        assert torch.bincount(indices, minlength=2**bits).min() > 0, "no level left empty"
        # converged: each value sits at its nearest level
        dist = (values[:, None] - codebook[None, :]).abs()
        assert torch.allclose(dist.gather(1, indices[:, None]).squeeze(1), dist.min(1).values)


def test_kmeans_beats_uniform_on_skewed_data() -> None:
    g = torch.Generator().manual_seed(1)
    values = torch.cat([torch.randn(1000, generator=g) * 0.01, torch.tensor([5.0])])
    u = quantization_mse(values, *uniform_quantize(values, 2))
    km = quantization_mse(values, *kmeans_quantize(values, 2))
    assert km < 0.5 * u


def test_shared_quantize_pools_layers() -> None:
    g = torch.Generator().manual_seed(2)
    per_layer = {"a": torch.randn(50, generator=g), "b": 3 * torch.randn(20, generator=g)}
    per_layer["c"] = torch.zeros(0)
    out = shared_quantize(per_layer, 5)
    assert list(out) == ["a", "b", "c"]
    codebooks = [cb for _, cb in out.values()]
    assert all(cb is codebooks[0] for cb in codebooks) and codebooks[0].numel() == 5
    pooled = torch.cat(list(per_layer.values()))
    p_idx, p_cb = naive_bins(pooled, 5)
    assert np.allclose(codebooks[0].numpy(), p_cb, rtol=1e-6, atol=1e-7)
    assert torch.cat([i for i, _ in out.values()]).tolist() == p_idx
    for name, (idx, _) in out.items():
        assert idx.shape == per_layer[name].shape
    assert shared_quantize({}, 4) == {}
    only_empty = shared_quantize({"a": torch.zeros(0)}, 4)
    assert only_empty["a"][1].tolist() == [0.0]


def test_shared_edges() -> None:
    edges = shared_edges(torch.tensor([-1.0, 3.0, 0.0]), 4)
    assert edges.tolist() == [-1.0, 0.0, 1.0, 2.0, 3.0]
    assert shared_edges(torch.zeros(0), 3).tolist() == [0.0] * 4


def test_quantization_mse_known_answer() -> None:
    values = torch.tensor([0.0, 1.0, 4.0])
    assert quantization_mse(values, torch.tensor([0, 0, 1]), torch.tensor([0.5, 4.0])) == 0.5 / 3
    assert quantization_mse(torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(1)) == 0


# --- the fine histogram ------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(values=st.one_of(VALUES, GRID), bits=st.integers(1, 8))
def test_uniform_bins_are_the_fine_bins_shifted(values: torch.Tensor, bits: int) -> None:
    """The uniform bin of every value is its fine bin >> (16 - bits): exactly the bins of the
    direct equal-width computation, and the levels agree to float rounding."""
    idx, cb = uniform_quantize(values, bits)
    ref_idx, ref_cb = _equal_width(values.float().contiguous(), 2**bits)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(cb, ref_cb, rtol=1e-6, atol=0)


def test_masked_histogram_is_the_selected_values_histogram_bit_for_bit() -> None:
    """The evaluator's histogram over the whole tensor with a mask equals apply's histogram of
    the survivors alone: same bins, counts, and float64 sums to the last bit."""
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(50_000, generator=g) * 0.05).numpy()
    mask = torch.rand(50_000, generator=g).numpy() < 0.3
    v = w[mask]
    lo, hi = float(v.min()), float(v.max())
    full = fine_histogram_from(fine_index(w, lo, hi), w, lo, hi, mask=mask)
    alone, idx = fine_histogram(torch.from_numpy(v))
    assert (alone.lo, alone.hi) == (lo, hi)
    assert np.array_equal(full.bins, alone.bins) and np.array_equal(full.counts, alone.counts)
    assert np.array_equal(full.sums, alone.sums)
    assert idx.max() == FINE_BINS - 1 and idx.min() == 0


def test_one_histogram_serves_every_bit_width() -> None:
    g = torch.Generator().manual_seed(5)
    values = torch.cat([torch.randn(3000, generator=g) * 0.02, torch.randn(50, generator=g)])
    h, idx = fine_histogram(values)
    for bits in (1, 3, 8):
        level, codebook = kmeans_levels(h, bits)
        lut = np.zeros(FINE_BINS, dtype=np.int64)
        lut[h.bins] = level
        k_idx, k_cb = kmeans_quantize(values, bits)
        assert np.array_equal(lut[idx], k_idx.numpy()) and np.array_equal(codebook, k_cb.numpy())


def test_kmeans_on_many_values_is_as_good_as_lloyd_on_the_values() -> None:
    """Lloyd on fine bins lands within 0.5 % of textbook Lloyd on the values themselves (33k
    magnitude-pruned weights: two lobes and a gap), and well below uniform."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(60_000, generator=g) * 0.05
    values = w[w.abs() > 0.03]
    for bits in (2, 3):
        km = quantization_mse(values, *kmeans_quantize(values, bits))
        u = quantization_mse(values, *uniform_quantize(values, bits))
        _, u_cb = uniform_quantize(values, bits)
        v = values.double().numpy()
        levels = naive_lloyd(v, u_cb.numpy(), 30)
        assign = np.abs(v[:, None] - levels[None, :]).argmin(1)
        exact = float(((v - levels[assign]) ** 2).mean())
        assert km <= exact * 1.005 and km < 0.8 * u
