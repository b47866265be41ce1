"""apply: masks from ranks, per-layer and per-plan quantisation, the student state_dict."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moecomp.apply import (
    QuantizedLayer,
    apply_layer,
    apply_plan,
    keep_mask,
    n_pruned,
    student_state_dict,
)
from moecomp.errors import ConfigError
from moecomp.plan import CompressionPlan, LayerPlan
from moecomp.quantize import kmeans_quantize, shared_quantize, uniform_quantize

SHAPES = st.lists(st.integers(0, 7), min_size=1, max_size=3).map(tuple)
SPARSITY = st.floats(0.0, 0.999)


def magnitude_ranks(w: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(w.abs().flatten())).reshape(w.shape)


def random_weight(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=100, deadline=None)
@given(shape=SHAPES, sparsity=SPARSITY, seed=st.integers(0, 2**16))
def test_keep_mask_keeps_exactly_the_highest_ranked(
    shape: tuple[int, ...], sparsity: float, seed: int
) -> None:
    numel = int(torch.tensor(shape).prod())
    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(numel, generator=g).reshape(shape)
    mask = keep_mask(rank, sparsity)
    assert mask.dtype == torch.bool and mask.shape == rank.shape
    assert int(mask.sum()) == numel - round(sparsity * numel) == numel - n_pruned(numel, sparsity)
    if mask.any() and (~mask).any():
        assert int(rank[mask].min()) > int(rank[~mask].max())


def test_keep_mask_edges() -> None:
    rank = torch.arange(10)
    assert keep_mask(rank, 0.0).all()
    assert not keep_mask(rank, 1.0).any()
    assert keep_mask(rank, 0.25).tolist() == [False] * 2 + [True] * 8  # round(2.5) == 2
    with pytest.raises(ConfigError, match="sparsity"):
        keep_mask(rank, 1.5)
    with pytest.raises(TypeError):
        keep_mask(rank.float(), 0.5)


@settings(max_examples=100, deadline=None)
@given(
    shape=SHAPES,
    sparsity=SPARSITY,
    bits=st.integers(1, 8),
    quantizer=st.sampled_from(["uniform", "kmeans"]),
    seed=st.integers(0, 2**16),
)
def test_apply_layer_properties(
    shape: tuple[int, ...], sparsity: float, bits: int, quantizer: str, seed: int
) -> None:
    w = random_weight(shape, seed)
    rank = magnitude_ranks(w)
    layer = apply_layer(w, rank, sparsity=sparsity, bits=bits, quantizer=quantizer)
    assert layer.shape == shape
    assert torch.equal(layer.mask, keep_mask(rank, sparsity))
    assert layer.n_kept == int(layer.mask.sum())
    assert layer.indices.dtype == torch.int64 and layer.codebook.dtype == torch.float32
    if layer.n_kept:
        assert 0 <= int(layer.indices.min()) and int(layer.indices.max()) < layer.n_levels
    # survivors in row-major order of the kept positions, quantised by the named quantizer
    quantize = uniform_quantize if quantizer == "uniform" else kmeans_quantize
    indices, codebook = quantize(w[layer.mask], bits)
    assert torch.equal(layer.indices, indices) and torch.equal(layer.codebook, codebook)
    dense = layer.dequantize()
    assert dense.shape == shape and dense.dtype == torch.float32
    assert bool((dense[~layer.mask] == 0).all())
    assert torch.equal(dense[layer.mask], layer.codebook[layer.indices])
    if quantizer == "uniform" and layer.n_kept:
        survivors = w[layer.mask]
        width = float(survivors.max() - survivors.min()) / 2**bits
        assert float((dense[layer.mask] - survivors).abs().max()) <= width * (1 + 1e-5) + 1e-7


def test_apply_layer_rejects_bad_input() -> None:
    w = torch.randn(3, 4)
    with pytest.raises(ConfigError, match="quantizer"):
        apply_layer(w, magnitude_ranks(w), sparsity=0.5, bits=2, quantizer="shared")
    with pytest.raises(ValueError, match="shape"):
        apply_layer(w, torch.arange(12), sparsity=0.5, bits=2)
    with pytest.raises(ConfigError, match="bits"):
        apply_layer(w, magnitude_ranks(w), sparsity=0.5, bits=0)


LENET = {"fc1.weight": (30, 78), "fc2.weight": (10, 30), "fc3.weight": (4, 10)}


def lenet_weights() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    weights = {n: random_weight(s, i) for i, (n, s) in enumerate(LENET.items())}
    return weights, {n: magnitude_ranks(w) for n, w in weights.items()}


def test_apply_plan_matches_apply_layer() -> None:
    weights, ranks = lenet_weights()
    plan = CompressionPlan(
        layers={
            "fc3.weight": LayerPlan(sparsity=0.1, bits=2, quantizer="kmeans"),
            "fc1.weight": LayerPlan(sparsity=0.9, bits=4),
            "fc2.weight": LayerPlan(sparsity=0.5, bits=8),
        }
    )
    out = apply_plan(plan, weights, ranks)
    assert list(out) == list(plan.layers)
    for name, lp in plan.layers.items():
        ref = apply_layer(
            weights[name], ranks[name], sparsity=lp.sparsity, bits=lp.bits, quantizer=lp.quantizer
        )
        assert torch.equal(out[name].mask, ref.mask)
        assert torch.equal(out[name].indices, ref.indices)
        assert torch.equal(out[name].codebook, ref.codebook)


def test_apply_plan_shared_codebook() -> None:
    weights, ranks = lenet_weights()
    plan = CompressionPlan(
        layers={
            "fc1.weight": LayerPlan(sparsity=0.8, quantizer="shared"),
            "fc2.weight": LayerPlan(sparsity=0.3, bits=3),
            "fc3.weight": LayerPlan(sparsity=0.0, quantizer="shared"),
        },
        shared_k=6,
    )
    out = apply_plan(plan, weights, ranks)
    assert list(out) == list(plan.layers)
    shared = [out["fc1.weight"], out["fc3.weight"]]
    assert shared[0].codebook is shared[1].codebook and shared[0].n_levels == 6
    survivors = {n: weights[n][keep_mask(ranks[n], plan.layers[n].sparsity)] for n in LENET}
    ref = shared_quantize({n: survivors[n] for n in ("fc1.weight", "fc3.weight")}, 6)
    for name in ("fc1.weight", "fc3.weight"):
        assert torch.equal(out[name].indices, ref[name][0])
        assert torch.equal(out[name].codebook, ref[name][1])
    assert out["fc2.weight"].n_levels == 8
    # the pooled codebook spans both layers' survivors
    pooled = torch.cat([survivors["fc1.weight"], survivors["fc3.weight"]])
    cb = shared[0].codebook
    assert float(cb.min()) >= float(pooled.min()) and float(cb.max()) <= float(pooled.max())


def test_apply_plan_missing_tensor() -> None:
    weights, ranks = lenet_weights()
    plan = CompressionPlan.uniform(["fc1.weight", "conv.weight"], sparsity=0.5, bits=2)
    with pytest.raises(ConfigError, match=r"plan\.layers\.conv\.weight"):
        apply_plan(plan, weights, ranks)
    plan = CompressionPlan.uniform(["fc1.weight"], sparsity=0.5, bits=2)
    with pytest.raises(ConfigError, match="ranks"):
        apply_plan(plan, weights, {})


def test_student_state_dict_loads_and_keeps_the_rest() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    teacher = model.state_dict()
    w = teacher["0.weight"]
    layers = {"0.weight": apply_layer(w, magnitude_ranks(w), sparsity=0.5, bits=2)}
    student = student_state_dict(teacher, layers)
    assert list(student) == list(teacher)
    assert torch.equal(student["0.weight"], layers["0.weight"].dequantize())
    for name in ("0.bias", "2.weight", "2.bias"):
        assert student[name] is teacher[name]
    assert teacher["0.weight"] is w and not torch.equal(w, student["0.weight"])
    model.load_state_dict(student)
    loaded = model.state_dict()["0.weight"]
    assert int((loaded == 0).sum()) == w.numel() - layers["0.weight"].n_kept


def test_student_state_dict_errors() -> None:
    layer = QuantizedLayer(
        (2,), torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.int64), torch.ones(1)
    )
    with pytest.raises(KeyError, match="x"):
        student_state_dict({"y": torch.zeros(2)}, {"x": layer})
    with pytest.raises(ValueError, match="shape"):
        student_state_dict({"x": torch.zeros(3)}, {"x": layer})
    as_double = student_state_dict({"x": torch.zeros(2, dtype=torch.float64)}, {"x": layer})
    assert as_double["x"].dtype == torch.float64 and as_double["x"].tolist() == [1.0, 1.0]
