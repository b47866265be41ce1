"""merge: merging neighbouring levels never breaks the fidelity tolerance, and a larger
tolerance never ends with fewer merges (a larger file) than a smaller one."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moecomp.apply import QuantizedLayer, apply_layer, apply_plan
from moecomp.errors import ConfigError
from moecomp.merge import Fidelity, infer_groups, merge_bins, merge_path
from moecomp.plan import CompressionPlan, LayerPlan

SHAPES = {"a": (12, 10), "b": (6, 12), "c": (3, 6)}


def ranks_of(w: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(w.abs().flatten())).reshape(w.shape)


def make_layers(
    *, bits: int = 3, sparsity: float = 0.3, shared_k: int | None = None, seed: int = 0
) -> tuple[dict[str, QuantizedLayer], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    weights = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    q = "shared" if shared_k is not None else "uniform"
    plan = CompressionPlan(
        layers={n: LayerPlan(sparsity=sparsity, bits=bits, quantizer=q) for n in SHAPES},
        shared_k=shared_k,
    )
    ranks = {n: ranks_of(w) for n, w in weights.items()}
    return apply_plan(plan, weights, ranks), weights


def weight_error(weights: dict[str, torch.Tensor]) -> Fidelity:
    """Fidelity: squared error of the dequantised weights against the originals (kept only)."""

    def fidelity(layers: dict[str, QuantizedLayer]) -> float:
        total = 0.0
        for n, layer in layers.items():
            total += float(((layer.dequantize() - weights[n])[layer.mask] ** 2).sum())
        return total

    return fidelity


def check_layers(before: dict[str, QuantizedLayer], after: dict[str, QuantizedLayer]) -> None:
    assert list(after) == list(before)
    for n, layer in after.items():
        assert torch.equal(layer.mask, before[n].mask) and layer.shape == before[n].shape
        k = layer.n_levels
        assert bool((layer.codebook[1:] > layer.codebook[:-1]).all()), "sorted, distinct"
        if layer.n_kept:
            assert int(layer.indices.min()) >= 0 and int(layer.indices.max()) < k


@settings(max_examples=30, deadline=None)
@given(
    bits=st.integers(1, 5),
    sparsity=st.floats(0.0, 0.95),
    tolerance=st.floats(0.0, 20.0),
    shared=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_merge_never_exceeds_tolerance(
    bits: int, sparsity: float, tolerance: float, shared: bool, seed: int
) -> None:
    layers, weights = make_layers(
        bits=bits, sparsity=sparsity, shared_k=2**bits if shared else None, seed=seed
    )
    fidelity = weight_error(weights)
    result = merge_bins(layers, fidelity, tolerance=tolerance)
    assert result.baseline == result.fidelity_before == fidelity(layers)
    assert fidelity(result.layers) == result.fidelity_after
    assert result.fidelity_after <= result.baseline + tolerance
    check_layers(layers, result.layers)
    for n in layers:
        assert result.levels_before[n] == layers[n].n_levels
        assert result.levels_after[n] == result.layers[n].n_levels <= layers[n].n_levels
    # contiguous: every level of a group is used by some layer of it
    if shared:
        cbs = [layer.codebook for layer in result.layers.values()]
        assert all(torch.equal(cb, cbs[0]) for cb in cbs)
        used = torch.cat([layer.indices for layer in result.layers.values()]).unique()
        assert used.tolist() == list(range(cbs[0].numel()))
    else:
        for layer in result.layers.values():
            if layer.n_kept:
                assert layer.indices.unique().tolist() == list(range(layer.n_levels))


def test_flat_fidelity_merges_down_to_one_level_and_keeps_the_mean() -> None:
    layers, weights = make_layers(bits=4)
    result = merge_bins(layers, lambda _: 0.0, tolerance=0.0)
    assert all(k == 1 for k in result.levels_after.values())
    assert result.rounds > 0 and result.fidelity_after == 0.0
    for n, layer in result.layers.items():
        # count-weighted merging keeps the sum of the weights: one level = the survivors' mean
        survivors = weights[n][layer.mask].double()
        assert abs(float(layer.codebook[0]) - float(survivors.mean())) < 1e-5
    check_layers(layers, result.layers)


def test_flat_fidelity_takes_the_cheapest_pair_first() -> None:
    layers, _ = make_layers(bits=3)
    only = {"a": layers["a"]}
    result = merge_bins(only, lambda _: 1.0, tolerance=0.0, max_rounds=1)
    assert result.rounds == 1
    cb = only["a"].codebook.double()
    n = torch.bincount(only["a"].indices, minlength=cb.numel()).double()
    cost = n[:-1] * n[1:] / (n[:-1] + n[1:]).clamp(min=1) * (cb[1:] - cb[:-1]) ** 2
    cost[(n[:-1] == 0) | (n[1:] == 0)] = float("inf")  # unused levels are dropped up front
    j = int(torch.argmin(cost))
    assert result.steps[0].level == j - int((n[:j] == 0).sum())
    assert result.steps[0].value == pytest.approx(
        float((n[j] * cb[j] + n[j + 1] * cb[j + 1]) / (n[j] + n[j + 1]))
    )


def test_sensitive_fidelity_stops_immediately() -> None:
    layers, weights = make_layers(bits=2, sparsity=0.0)
    assert all(torch.bincount(layer.indices).min() > 0 for layer in layers.values())
    base = weight_error(weights)
    result = merge_bins(layers, lambda ls: 1e12 * base(ls), tolerance=1e-12)
    assert result.rounds == 0
    assert result.levels_after == result.levels_before
    for n, layer in result.layers.items():
        assert torch.equal(layer.dequantize(), layers[n].dequantize())
    # the input, the grid (every ceil(sqrt(M))-th point of the path) and the points up to
    # the next grid point
    m = result.path_length
    assert m == sum(k - 1 for k in result.levels_before.values())
    step = math.ceil(math.sqrt(m))
    assert result.evaluations <= 1 + (m // step + 2) + (step - 1)


def test_unused_levels_are_dropped_for_free() -> None:
    layer = QuantizedLayer(
        (4,),
        torch.ones(4, dtype=torch.bool),
        torch.tensor([3, 0, 3, 1]),
        torch.tensor([-1.0, 0.0, 0.5, 2.0]),
    )
    result = merge_bins(
        {"x": layer}, lambda ls: 0.0 if ls["x"].n_levels >= 3 else 1.0, tolerance=0.0
    )
    out = result.layers["x"]
    assert out.codebook.tolist() == [-1.0, 0.0, 2.0] and out.indices.tolist() == [2, 0, 2, 1]
    assert torch.equal(out.dequantize(), layer.dequantize())
    assert result.levels_before == {"x": 4} and result.levels_after == {"x": 3}


def test_max_rounds_and_baseline() -> None:
    layers, weights = make_layers(bits=3)
    fid = weight_error(weights)
    result = merge_bins(layers, lambda _: 0.0, tolerance=0.0, max_rounds=2)
    assert result.rounds == 2
    before = fid(layers)
    result = merge_bins(layers, fid, tolerance=0.5, baseline=before + 1.0)
    assert result.fidelity_after <= before + 1.5 and result.baseline == before + 1.0
    with pytest.raises(ConfigError, match="tolerance"):
        merge_bins(layers, fid, tolerance=0.1, baseline=before - 1.0)
    with pytest.raises(ConfigError, match="tolerance"):
        merge_bins(layers, fid, tolerance=-1.0)
    with pytest.raises(ValueError, match="nan"):
        merge_bins(layers, lambda _: float("nan"), tolerance=0.0)


def test_groups() -> None:
    layers, _ = make_layers(bits=3, shared_k=5)
    assert infer_groups(layers) == [("a", "b", "c")]
    separate, _ = make_layers(bits=3)
    assert infer_groups(separate) == [("a",), ("b",), ("c",)]
    result = merge_bins(layers, lambda _: 0.0, tolerance=0.0, groups=[["a", "b", "c"]])
    assert set(result.levels_after.values()) == {1}
    with pytest.raises(ConfigError, match="share"):
        merge_bins(separate, lambda _: 0.0, tolerance=0.0, groups=[["a", "b"]])
    with pytest.raises(ConfigError, match="unknown"):
        merge_bins(separate, lambda _: 0.0, tolerance=0.0, groups=[["z"]])


def test_empty_layer_keeps_one_level() -> None:
    w = torch.randn(3, 3)
    empty = apply_layer(w, ranks_of(w), sparsity=1.0, bits=2)
    result = merge_bins({"e": empty}, lambda _: 0.0, tolerance=0.0)
    assert result.layers["e"].n_levels == 1 and result.layers["e"].n_kept == 0


def noisy_error(weights: dict[str, torch.Tensor], seed: int) -> Fidelity:
    """A fidelity that is not monotone along a path: the weight error plus a deterministic
    jitter of the level counts (as a validation accuracy jitters from merge to merge)."""
    base = weight_error(weights)

    def fidelity(layers: dict[str, QuantizedLayer]) -> float:
        key = tuple(layer.n_levels for layer in layers.values())
        jitter = (hash((seed, key)) % 1000) / 1000.0
        return base(layers) * (1.0 + jitter)

    return fidelity


@settings(max_examples=20, deadline=None)
@given(bits=st.integers(2, 5), sparsity=st.floats(0.0, 0.9), seed=st.integers(0, 1000),
       guided=st.booleans(), tolerances=st.lists(st.floats(0.0, 50.0), min_size=2, max_size=6))
def test_a_larger_tolerance_never_ends_with_fewer_merges(
    bits: int, sparsity: float, seed: int, guided: bool, tolerances: list[float]
) -> None:
    layers, weights = make_layers(bits=bits, sparsity=sparsity, seed=seed)
    fidelity = noisy_error(weights, seed)
    guide = weight_error(weights) if guided else None
    measured = merge_path(layers, guide=guide).measure(fidelity)
    results = [measured.within(t) for t in sorted(tolerances)]
    for r, t in zip(results, sorted(tolerances), strict=True):
        assert r.fidelity_after <= r.fidelity_before + t
        assert fidelity(r.layers) == r.fidelity_after
        check_layers(layers, r.layers)
    for small, large in zip(results, results[1:], strict=False):
        assert large.rounds >= small.rounds
        assert sum(large.levels_after.values()) <= sum(small.levels_after.values())
    # separate calls compute the same path and the same answer
    one = merge_bins(layers, fidelity, tolerance=sorted(tolerances)[-1], guide=guide)
    assert one.rounds == results[-1].rounds
    assert one.levels_after == results[-1].levels_after


def test_every_merge_of_the_path_removes_one_level() -> None:
    layers, _ = make_layers(bits=3)
    path = merge_path(layers)
    total = sum(q.n_levels for q in path.start.values())  # unused levels dropped up front
    assert total <= sum(q.n_levels for q in layers.values())
    assert len(path) == total - len(layers)
    for i in (0, 1, len(path) // 2, len(path)):
        assert sum(q.n_levels for q in path.layers_at(i).values()) == total - i
    assert all(q.n_levels == 1 for q in path.layers_at(len(path)).values())
    with pytest.raises(IndexError):
        path.layers_at(len(path) + 1)


def test_the_guide_decides_which_group_merges_first() -> None:
    layers, weights = make_layers(bits=3)
    error = weight_error(weights)
    k_a = layers["a"].n_levels

    def guide(ls: dict[str, QuantizedLayer]) -> float:  # any merge of "a" is very costly
        return 1e6 * (k_a - ls["a"].n_levels) + error(ls)

    path = merge_path(layers, guide=guide)
    groups = [r.group for r in path.records]
    n_a = path.start["a"].n_levels - 1
    assert groups[-n_a:] == [("a",)] * n_a and ("a",) not in groups[:-n_a]
    # the recorded guide values are the guide at each point of the path
    for i in (1, len(path) // 2, len(path)):
        assert path.records[i - 1].guide == pytest.approx(guide(path.layers_at(i)))
    assert path.guide_evaluations >= len(path)
