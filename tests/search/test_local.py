"""search.local (moecomp.search.operators.local): an anchor's single moves, the cost table of
their measured changes, and the plans on it, against a divergence whose layers add up (so the
measured slopes are exact within one step) and every plan within that step enumerated."""

import itertools

import numpy as np
import pandas as pd
import pytest

from moecomp.search import run_search, screening
from moecomp.search import surrogate as sg
from moecomp.search.front import nondominated
from moecomp.search.operators.local import (
    local_costs,
    local_offers,
    local_plans,
    probe_moves,
)
from moecomp.search.problem import LayerGenes


def _space(seed):
    """Four layers of unequal sizes, ten sparsity steps, bits 1-4, and a divergence that is a
    sum over layers of a sparsity term and a bits term, at random and not monotone (as at 1-2
    bits, where pruning one more step can move the quantiser's levels for the better)."""
    numel = np.array([3000, 800, 12000, 200], np.int64)
    g = LayerGenes(names=("a", "b", "c", "d"), step=0.1, s_idx_max=np.full(4, 9), bits_min=1,
                   bits_max=4, weight_share=numel / numel.sum(), numel=numel)
    rng = np.random.default_rng(seed)
    P = np.cumsum(rng.normal(0.3, 0.5, (4, 10)), axis=1)
    Q = np.cumsum(rng.normal(-0.5, 0.4, (4, 4)), axis=1)

    def divergence(X):
        X = np.atleast_2d(X)
        rows = np.arange(4)
        return 10.0 + P[rows, X[:, :4]].sum(1) + Q[rows, X[:, 4:] - 1].sum(1)

    return g, divergence


def _within_one_step(g, x):
    """Every plan with each gene of ``x`` moved by at most one step (bounds kept)."""
    opts = [[v + d for d in (-1, 0, 1) if g.xl[j] <= v + d <= g.xu[j]] for j, v in enumerate(x)]
    return np.array(list(itertools.product(*opts)), np.int64)


def test_probe_moves_are_every_single_step_the_bounds_allow():
    g, _ = _space(0)
    for x in (np.array([0, 9, 4, 5, 1, 4, 2, 3]), np.array([3, 3, 3, 3, 2, 2, 2, 2])):
        M = probe_moves(g, x)
        diff = M - x
        assert np.all(np.abs(diff).sum(axis=1) == 1)  # one gene, one step
        assert np.all((M >= g.xl) & (M <= g.xu))
        want = sum(int(v + 1 <= g.xu[j]) + int(v - 1 >= g.xl[j]) for j, v in enumerate(x))
        assert len(np.unique(M, axis=0)) == len(M) == want


@pytest.mark.parametrize("mode", ["3obj", "2obj"])
def test_local_plans_are_predicted_exactly_and_beat_the_anchor_when_a_plan_can(mode):
    """On a divergence whose layers add up, the measured moves predict every plan within one
    step exactly; each plan offered is strictly inside the anchor's exact objectives and
    below its divergence; one is offered for every anchor some plan within one step beats,
    and the best offered is the best there is in most cases."""
    found = optimal = beatable = 0
    for seed in range(12):
        g, div = _space(seed)
        rng = np.random.default_rng(100 + seed)
        x = np.concatenate([rng.integers(1, 9, 4), rng.integers(2, 4, 4)])
        moves = probe_moves(g, x)
        cost = local_costs(g, x, moves, div(moves) - div(x)[0])
        plans, pred = local_plans(g, x, float(div(x)[0]), cost, mode)
        np.testing.assert_allclose(pred, div(plans))
        e_x = sg.exact_objectives(g, g.numel, x[None], mode)[0]
        assert np.all(sg.exact_objectives(g, g.numel, plans, mode) < e_x)
        assert np.all(pred < div(x)[0])
        # brute force over every plan within one step
        W = _within_one_step(g, x)
        inside = np.all(sg.exact_objectives(g, g.numel, W, mode) < e_x, axis=1)
        better = inside & (div(W) < div(x)[0])
        if better.any():
            beatable += 1
            assert len(plans) > 0, seed
            found += 1
            optimal += bool(np.isclose(pred.min(), div(W[inside]).min()))
        else:
            assert len(plans) == 0
    assert beatable >= 6
    assert optimal >= found - 1  # 12 of 12 in both modes when written


def _offers(g, div, X, n, anchors, done, mode):
    """One generation of local_offers on an archive ``X`` (its front by ``div``)."""
    F = np.column_stack([sg.exact_objectives(g, g.numel, X, mode), div(X)])
    front = nondominated(F)
    ref = F.max(axis=0) * 1.1 + 1.0
    rows, is_plan, pred, anchors, done = local_offers(
        n, g, X, div(X), anchors, done, front, F[front], ref, mode)
    return rows, is_plan, pred, anchors, done


def test_an_anchor_is_measured_then_its_plans_offered_and_nothing_twice():
    g, div = _space(3)
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.integers(0, 10, (20, 4)), rng.integers(1, 5, (20, 4))], axis=1)
    X = np.unique(X, axis=0)
    anchors, done = np.zeros((0, 8), np.int64), np.zeros(0, bool)
    seen = set(screening.row_keys(X))
    plans_seen = 0
    first = None
    for _ in range(12):
        rows, is_plan, pred, anchors, done = _offers(g, div, X, 5, anchors, done, "3obj")
        assert len(rows) <= 5
        keys = screening.row_keys(rows)
        assert not seen.intersection(keys) and len(set(keys)) == len(keys)  # nothing twice
        seen.update(keys)
        if first is None:
            first = anchors[0].copy()
            n_moves = len(probe_moves(g, first))
        # plans only once their anchor's moves are all in the archive
        measured = set(screening.row_keys(X))
        complete = [a for a in anchors
                    if set(screening.row_keys(probe_moves(g, a))) <= measured]
        for r, p in zip(rows[is_plan], pred[is_plan], strict=True):
            plans_seen += 1
            assert any(np.abs(r - a).max() <= 1 for a in complete)
            assert p == pytest.approx(div(r)[0])  # within one step of its anchor: exact
        np.testing.assert_array_equal(np.isnan(pred), ~is_plan)
        X = np.concatenate([X, rows])
    assert np.array_equal(anchors[0], first)  # kept, whatever the front did
    assert done[0] and len(anchors) >= 2
    moves = set(screening.row_keys(probe_moves(g, first)))
    assert moves <= set(screening.row_keys(X)) and n_moves == len(moves)
    assert plans_seen > 0


@pytest.mark.parametrize("surrogate", [True, False])
def test_a_search_with_local_evaluates_its_moves_and_plans_in_full(
        tmp_path, make_problem, screened_genes, surrogate):
    """``search.local``: the anchors' moves and plans are listed in screened.csv, all
    evaluated in full (rows of evaluated.csv), at most ``local`` per generation; with the
    surrogate (screened offspring) and without (every offspring evaluated)."""
    p = make_problem()
    r = run_search(p, tmp_path / "run", budget=200, progress=False, plots=False,
                   params={"pop_size": 16, "local": 8, "surrogate": surrogate})
    ev = r.evaluated()
    sc = pd.read_csv(tmp_path / "run" / "screened.csv")
    lo = sc[sc["kind"].isin(["local move", "local"])]
    assert (lo["kind"] == "local move").any() and lo["full"].all()
    assert lo.groupby("gen").size().max() <= 8
    assert lo["predicted_divergence"].isna().eq(lo["kind"] == "local move").all()
    full = set(screening.row_keys(screened_genes(p, ev)))
    assert set(screening.row_keys(screened_genes(p, lo))) <= full
