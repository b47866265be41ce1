"""Contract of every scorer, and the known answers of magnitude and Taylor."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from moecomp.config import RelevanceConfig
from moecomp.relevance import (
    SCORERS,
    DirectedEvolution,
    Magnitude,
    Scorer,
    Taylor,
    is_permutation,
    perturbed_weights,
    scores_to_ranks,
)
from moecomp.target import Target

# Every registered scorer (DE lighter than its defaults, to stay fast), plus the variants
# a problem file or a caller can select.
LIGHT: dict[str, dict[str, Any]] = {"directed": {"generations": 3, "population": 8}}
VARIANTS: dict[str, Scorer] = {
    name: cls(**LIGHT.get(name, {})) for name, cls in SCORERS.items()
} | {
    "taylor-noise": Taylor(loss="noise"),
    "taylor-prune": Taylor(loss="prune"),
    "directed-activation": DirectedEvolution(prior="activation", generations=3, population=8),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_scorer_contract(name: str, tiny: Target) -> None:
    scorer = VARIANTS[name]
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    for ref in tiny.layers:
        a = scorer(tiny, ref, seed=3)
        assert tuple(a.shape) == ref.shape and a.is_floating_point()
        assert not torch.isnan(a).any()
        ranks = scores_to_ranks(a)
        assert ranks.dtype == torch.int64 and tuple(ranks.shape) == ref.shape
        assert is_permutation(ranks)
        assert torch.equal(scorer(tiny, ref, seed=3), a), "not deterministic for a seed"
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "scorer changed the teacher"


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scorers_build_from_config(name: str) -> None:
    cfg = RelevanceConfig(scorer=name, generations=2, population=4)  # type: ignore[arg-type]
    scorer = SCORERS[name].from_config(cfg)
    assert callable(scorer)


def test_scores_to_ranks_breaks_ties_by_flat_index() -> None:
    ranks = scores_to_ranks(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    assert ranks.tolist() == [[1, 2], [0, 3]]
    with pytest.raises(ValueError, match="NaN"):
        scores_to_ranks(torch.tensor([0.0, float("nan")]))


def test_is_permutation() -> None:
    assert is_permutation(torch.tensor([[2, 0], [1, 3]]))
    assert not is_permutation(torch.tensor([0, 0, 2]))
    assert not is_permutation(torch.tensor([0, 1, 3]))
    assert not is_permutation(torch.tensor([0.0, 1.0]))


def test_magnitude_known_answer(make_tiny) -> None:
    tg = make_tiny(n_in=2, hidden=2, n_out=2)
    with torch.no_grad():
        tg.teacher.get_parameter("0.weight").copy_(torch.tensor([[-3.0, 1.0], [2.0, -0.5]]))
    ref = tg.layers[0]
    scores = Magnitude()(tg, ref, seed=0)
    assert scores.tolist() == [[3.0, 1.0], [2.0, 0.5]]
    assert scores_to_ranks(scores).tolist() == [[3, 1], [2, 0]]


def _taylor_oracle(
    tg: Target,
    layer_name: str,
    weights: dict[str, torch.Tensor],
    loss_kind: str,
    batch: int,
    n: int,
) -> torch.Tensor:
    """|w_teacher * dL/dw| per batch, summed / batches, with plain autograd on a model copy."""
    model = copy.deepcopy(tg.teacher)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    w_teacher = tg.weights()[layer_name]
    total = torch.zeros_like(w_teacher)
    batches = 0
    for i in range(0, n, batch):
        j = min(i + batch, n)
        p = params[layer_name]
        p.requires_grad_(True)
        p.grad = None
        out = model(tg.calib.inputs[i:j])
        if loss_kind == "task":
            assert tg.calib.labels is not None
            loss = torch.nn.functional.cross_entropy(out, tg.calib.labels[i:j])
        else:
            lt = torch.log_softmax(tg.teacher_out[i:j], -1)
            ls = torch.log_softmax(out, -1)
            loss = (lt.exp() * (lt - ls)).sum(-1).mean()
        loss.backward()
        assert p.grad is not None
        total += (w_teacher * p.grad).abs()
        batches += 1
    return total / batches


@pytest.mark.parametrize("loss", ["task", "noise", "prune"])
def test_taylor_matches_autograd(loss: str, tiny: Target) -> None:
    scorer = Taylor(loss=loss, calibration=50, batch_size=16)  # type: ignore[arg-type]
    weights = perturbed_weights(
        tiny,
        scorer.loss,
        noise_scale=scorer.noise_scale,
        prune_fraction=scorer.prune_fraction,
        seed=7,
    )
    for ref in tiny.layers:
        want = _taylor_oracle(tiny, ref.name, weights, loss, 16, 50)
        got = scorer(tiny, ref, seed=7)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_perturbed_students(tiny: Target) -> None:
    w = tiny.weights()
    pruned = perturbed_weights(tiny, "prune", noise_scale=0.1, prune_fraction=0.5, seed=0)
    for name, t in pruned.items():
        zero = t == 0
        assert int(zero.sum()) == round(0.5 * t.numel())
        assert w[name][zero].abs().max() <= w[name][~zero].abs().min()
    noisy = perturbed_weights(tiny, "noise", noise_scale=0.1, prune_fraction=0.5, seed=0)
    for name, t in noisy.items():
        rel = (t - w[name]).std() / w[name].std()
        assert 0.03 < float(rel) < 0.3
    same = perturbed_weights(tiny, "task", noise_scale=0.1, prune_fraction=0.5, seed=0)
    assert all(torch.equal(same[k], w[k]) for k in w)


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="relevance.taylor_loss"):
        Taylor(loss="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="relevance.population"):
        DirectedEvolution(population=1)
    with pytest.raises(ValueError, match="relevance.prior"):
        DirectedEvolution(prior="nope")  # type: ignore[arg-type]
