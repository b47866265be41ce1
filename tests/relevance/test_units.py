"""Unit-structured ranks: valid permutations, weak units pruned whole, the cache reused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moecomp.apply import keep_mask
from moecomp.config import RelevanceConfig, build
from moecomp.errors import ConfigError
from moecomp.relevance import SCORERS, cache_path, compute_ranks, is_permutation
from moecomp.relevance.base import scores_to_ranks
from moecomp.relevance.units import structure_ranks, unit_pairs
from moecomp.target import LayerRef


def chain(*shapes: tuple[int, ...]) -> list[LayerRef]:
    return [LayerRef(f"l{i}.weight", f"l{i}", "Linear" if len(s) == 2 else "Conv2d", s)
            for i, s in enumerate(shapes)]


def random_ranks(layers: list[LayerRef], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {r.name: scores_to_ranks(torch.rand(r.shape, generator=gen)) for r in layers}


def test_pairs_follow_linear_conv_and_flatten_shapes():
    layers = chain((6, 1, 5, 5), (16, 6, 5, 5), (120, 256), (84, 120), (10, 84))
    assert unit_pairs(layers) == [(0, 25), (1, 16), (2, 1), (3, 1)]
    assert unit_pairs(chain((30, 20), (7, 31))) == []  # 31 inputs cannot be 30 units


def test_zero_strength_keeps_the_ranks_and_any_strength_gives_permutations():
    layers = chain((6, 1, 5, 5), (16, 6, 5, 5), (120, 256), (84, 120), (10, 84))
    ranks = random_ranks(layers)
    assert structure_ranks(ranks, layers, 0.0) is ranks
    for strength in (0.5, 2.0, 16.0):
        out = structure_ranks(ranks, layers, strength)
        assert all(is_permutation(out[r.name]) and out[r.name].shape == r.shape for r in layers)


def test_the_weakest_unit_goes_whole_in_both_layers():
    layers = chain((8, 50), (5, 8))
    gen = torch.Generator().manual_seed(1)
    # unit 3 is somewhat less relevant in both layers, not the least relevant everywhere
    s0 = torch.rand(8, 50, generator=gen)
    s0[3] *= 0.7
    s1 = torch.rand(5, 8, generator=gen)
    s1[:, 3] *= 0.7
    ranks = {"l0.weight": scores_to_ranks(s0), "l1.weight": scores_to_ranks(s1)}
    plain0 = keep_mask(ranks["l0.weight"], 50 / 400)  # prune one row's worth
    assert plain0[3].any() and (~plain0).any(1).sum() > 1  # scattered over rows
    out = structure_ranks(ranks, layers, 16.0)  # the strongest allowed
    kept0 = keep_mask(out["l0.weight"], 50 / 400)
    kept1 = keep_mask(out["l1.weight"], 5 / 40)
    assert not kept0[3].any() and kept0.sum() == 350
    assert not kept1[:, 3].any() and kept1.sum() == 35


def test_layers_outside_any_pair_keep_their_ranks():
    layers = chain((30, 20), (7, 31), (4, 7))  # 31 inputs cannot be 30 units
    ranks = random_ranks(layers)
    out = structure_ranks(ranks, layers, 2.0)
    assert out["l0.weight"] is ranks["l0.weight"]  # not coupled to anything
    assert not torch.equal(out["l1.weight"], ranks["l1.weight"])  # its 7 units couple to l2
    assert not torch.equal(out["l2.weight"], ranks["l2.weight"])


def test_structure_concentrates_pruning_on_few_units():
    layers = chain((100, 200), (10, 100))
    gen = torch.Generator().manual_seed(2)
    # units differ mildly in how relevant their weights are
    s0 = torch.rand(100, 200, generator=gen) * torch.linspace(0.5, 1.5, 100)[:, None]
    s1 = torch.rand(10, 100, generator=gen) * torch.linspace(0.5, 1.5, 100)[None, :]
    ranks = {"l0.weight": scores_to_ranks(s0), "l1.weight": scores_to_ranks(s1)}

    def empty_rows(r: dict[str, torch.Tensor]) -> int:
        return int((keep_mask(r["l0.weight"], 0.9).sum(1) == 0).sum())

    counts = [empty_rows(structure_ranks(ranks, layers, g)) for g in (0.0, 1.0, 4.0)]
    assert counts[0] < counts[1] < counts[2], counts


def test_cache_is_shared_across_strengths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          tiny) -> None:
    monkeypatch.setenv("MOECOMP_ARTIFACTS", str(tmp_path))
    calls: list[str] = []
    base = SCORERS["magnitude"]

    class Counting(base):  # type: ignore[misc,valid-type]
        def __call__(self, target, layer, *, seed):  # noqa: ANN001, ANN204
            calls.append(layer.name)
            return super().__call__(target, layer, seed=seed)

        @classmethod
        def from_config(cls, cfg, *, progress=False):  # noqa: ANN001, ANN206
            return cls()

    monkeypatch.setitem(SCORERS, "magnitude", Counting)
    plain = compute_ranks(tiny, RelevanceConfig(scorer="magnitude"), progress=False)
    cfg = RelevanceConfig(scorer="magnitude", units=2.0)
    structured = compute_ranks(tiny, cfg, progress=False)
    assert calls == tiny.layer_names  # scored once, the cached ranks structured after
    assert cache_path(tiny, cfg) == cache_path(tiny, RelevanceConfig(scorer="magnitude"))
    assert torch.equal(structured[tiny.layer_names[0]],
                       structure_ranks(plain, tiny.layers, 2.0)[tiny.layer_names[0]])


def test_bad_strength_names_the_field():
    with pytest.raises(ConfigError, match="relevance.units"):
        build(RelevanceConfig, {"units": -1.0}, "relevance")
    assert build(RelevanceConfig, {"units": 2}, "relevance").units == 2.0
