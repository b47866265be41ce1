"""The DEAP Directed Evolution baseline on toy targets small enough to check by brute force."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from moecomp.apply import apply_layer, apply_plan, student_state_dict
from moecomp.baseline import DEConfig, apportion, run_directed_evolution, select_bits
from moecomp.data import Split
from moecomp.divergence import Divergence
from moecomp.errors import ConfigError
from moecomp.relevance.base import is_permutation
from moecomp.target import Target, select_layers


def divergence(t, s, kind):
    """Mean divergence over the samples (per student when ``s`` has a leading axis)."""
    d = kind if isinstance(kind, Divergence) else Divergence(kind)
    return d.batched(t, s).mean(-1) if s.dim() > t.dim() else d(t, s).mean()


# Layer 0 of the toy sees 6 inputs; inputs 0 and 1 are always zero, so the 16 weights of
# columns 0 and 1 of its (8, 6) weight cannot change any output: provably irrelevant.
IRRELEVANT = {row * 6 + col for row in range(8) for col in (0, 1)}


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    with torch.no_grad():
        w = model[0].weight
        # large magnitudes: pruning by magnitude would keep exactly these
        w[:, :2] = 3.0 * torch.sign(w[:, :2])
    return model


def _toy_inputs() -> torch.Tensor:
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    x[:, :2] = 0.0
    return x


@pytest.fixture
def first_layer_target() -> Target:
    model = _toy_model()
    return Target(model, select_layers(model, include=["0.weight"]), Split(_toy_inputs()))


@pytest.fixture
def two_layer_target() -> Target:
    model = _toy_model()
    return Target(model, select_layers(model), Split(_toy_inputs()))


def _divergence_of_state(target: Target, state: dict[str, torch.Tensor]) -> float:
    """The oracle: the plain model forward with a state dict (no vmap, no DE code)."""
    with torch.no_grad():
        out = torch.func.functional_call(target.teacher, state, (target.calib.inputs,))
    return float(divergence(target.teacher_out, out, target.divergence))


# --- the evolution -----------------------------------------------------------------------------


def test_irrelevant_weights_are_zeroed_first(first_layer_target):
    k = 8  # half of the irrelevant weights
    res = run_directed_evolution(
        first_layer_target,
        k / 48,
        budget=400,
        config=DEConfig(population=12, generations=6, seed=0),
    )
    rank = res.ranks["0.weight"]
    assert is_permutation(rank)
    zeroed = set(torch.nonzero(rank.reshape(-1) < k).reshape(-1).tolist())
    assert len(zeroed) == k
    assert zeroed <= IRRELEVANT
    (rec,) = res.layers
    assert rec.n_pruned == k
    assert rec.divergence_pruned == pytest.approx(0.0, abs=1e-9)
    # magnitude pruning would have zeroed relevant weights and moved the student
    w = first_layer_target.weights()["0.weight"].reshape(-1)
    assert not set(torch.argsort(w.abs())[:k].tolist()) & IRRELEVANT


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 0.95])
def test_target_sparsity_is_reached_exactly(two_layer_target, sparsity):
    res = run_directed_evolution(two_layer_target, sparsity, budget=40, config=DEConfig(seed=2))
    n_total = 48 + 32
    want = round(sparsity * n_total)
    assert sum(r.n_pruned for r in res.layers) == want
    assert res.sparsity == want / n_total
    layers = apply_plan(res.plan, two_layer_target.weights(), res.ranks)
    kept = sum(int(q.mask.sum()) for q in layers.values())
    assert kept == n_total - want
    for ref, rec in zip(two_layer_target.layers, res.layers, strict=True):
        assert is_permutation(res.ranks[ref.name])
        assert int(layers[ref.name].mask.sum()) == ref.numel - rec.n_pruned >= 1
        # the zeroed weights hold the lowest ranks
        assert bool((res.ranks[ref.name][~layers[ref.name].mask] < rec.n_pruned).all())


def test_apportion_is_exact_and_proportional():
    assert apportion(0, [10, 20]) == [0, 0]
    assert apportion(15, [10, 20]) == [5, 10]
    assert apportion(5, [3, 3, 3]) == [2, 2, 1]  # ties go to the earlier layer
    parts = apportion(9_990, [640, 8192, 8192])
    assert sum(parts) == 9_990
    assert all(p <= n - 1 for p, n in zip(parts, [640, 8192, 8192], strict=True))
    assert apportion(17, [2, 8, 10]) == [1, 7, 9]  # every layer keeps one weight
    with pytest.raises(ValueError):
        apportion(18, [2, 8, 10])


def test_select_bits_takes_the_fewest_within_tolerance():
    d = {1: 9.0, 2: 2.0, 3: 1.2, 4: 1.04, 5: 1.01, 6: 1.0, 7: 1.0, 8: 1.0}
    calls: list[int] = []

    def div(b: int) -> float:
        calls.append(b)
        return d[b]

    bits, tried = select_bits(div, 1.0, rel_tol=0.05, abs_tol=0.0)
    assert bits == 4 and calls == [1, 2, 3, 4] and tried == {b: d[b] for b in calls}
    assert select_bits(d.__getitem__, 1.0, rel_tol=0.0, abs_tol=1.5)[0] == 2
    # nothing acceptable: the smallest divergence, fewer bits on ties
    bits, tried = select_bits(d.__getitem__, 0.1, rel_tol=0.0, abs_tol=0.0)
    assert bits == 6 and len(tried) == 8


def test_bits_match_a_brute_force_loop(two_layer_target):
    t = two_layer_target
    cfg = DEConfig(rel_tol=0.5, abs_tol=1e-4, seed=4)
    res = run_directed_evolution(t, 0.5, budget=120, config=cfg)
    weights = t.weights()
    state = t.state_dict()
    chosen = []
    for j, (ref, rec) in enumerate(zip(t.layers, res.layers, strict=True)):
        lp = res.plan.layers[ref.name]

        def with_layer(w: torch.Tensor, j: int = j, name: str = ref.name):
            done = {
                r.name: apply_layer(
                    weights[r.name],
                    res.ranks[r.name],
                    sparsity=res.plan.layers[r.name].sparsity,
                    bits=res.plan.layers[r.name].bits,
                )
                for r in t.layers[:j]
            }
            return student_state_dict(state, done) | {name: w}

        mask = apply_layer(weights[ref.name], res.ranks[ref.name], sparsity=lp.sparsity, bits=8)
        pruned = weights[ref.name] * mask.mask
        d0 = _divergence_of_state(t, with_layer(pruned))
        assert rec.divergence_pruned == pytest.approx(d0, rel=1e-4, abs=1e-7)
        brute = {}
        for b in range(1, 9):
            q = apply_layer(weights[ref.name], res.ranks[ref.name], sparsity=lp.sparsity, bits=b)
            brute[b] = _divergence_of_state(t, with_layer(q.dequantize()))
        limit = d0 + cfg.abs_tol + cfg.rel_tol * d0
        eps = 1e-6  # the DE's batched forward and this oracle differ by float rounding
        assert brute[lp.bits] <= limit + eps
        assert all(brute[b] > limit - eps for b in range(1, lp.bits))
        assert rec.bits == lp.bits and rec.within_tolerance
        chosen.append(lp.bits)
    assert max(chosen) > 1, "the tolerance should make this test choose more than 1 bit"


def test_evaluation_budget_is_respected(two_layer_target):
    counted = [0]
    kl = Divergence("kl")

    def counting(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        counted[0] += 1  # a user divergence is called once per student
        return kl(t, s)

    two_layer_target.divergence = Divergence("counting", fn=counting)
    for budget in (18, 25, 60, 200):
        counted[0] = 0
        res = run_directed_evolution(two_layer_target, 0.6, budget=budget, config=DEConfig())
        assert counted[0] == res.n_evals <= budget
        assert sum(r.evals for r in res.layers) == res.n_evals
    with pytest.raises(ConfigError, match="budget"):
        run_directed_evolution(two_layer_target, 0.6, budget=17)


def test_result_matches_the_evaluator(two_layer_target):
    from moecomp.evaluate import Evaluator

    res = run_directed_evolution(two_layer_target, 0.7, budget=60, config=DEConfig(seed=1))
    m = Evaluator(two_layer_target, res.ranks, quantizer="uniform").evaluate_plans([res.plan])
    assert float(m.divergence[0]) == pytest.approx(res.divergence, rel=1e-4, abs=1e-7)
    assert float(m.density[0]) == pytest.approx(1.0 - res.sparsity)


def test_reproducible_by_seed_and_global_random_untouched(two_layer_target):
    random.seed(1234)
    np.random.seed(1234)
    py_state, np_state = random.getstate(), np.random.get_state()
    cfg = DEConfig(population=6, generations=2, seed=7)
    a = run_directed_evolution(two_layer_target, 0.6, budget=80, config=cfg)
    assert random.getstate() == py_state
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), np_state, strict=True))
    b = run_directed_evolution(two_layer_target, 0.6, budget=80, config=cfg)
    assert a.plan.to_dict() == b.plan.to_dict()
    assert a.n_evals == b.n_evals and a.divergence == b.divergence
    for name in a.ranks:
        assert torch.equal(a.ranks[name], b.ranks[name])


def test_bad_settings_name_the_field(two_layer_target):
    with pytest.raises(ConfigError, match="de.population"):
        DEConfig(population=0)
    with pytest.raises(ConfigError, match="de.mut_prob"):
        DEConfig(mut_prob=1.5)
    with pytest.raises(ConfigError, match="sparsity"):
        run_directed_evolution(two_layer_target, 1.0, budget=40)
