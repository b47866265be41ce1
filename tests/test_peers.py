"""Peers (moecomp.baseline.peers): what they evaluate, and that an interrupted peer resumes
without losing its finished evaluations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from moecomp.baseline.peers import GENE_PREFIX, PEERS, run_peer
from moecomp.errors import ConfigError, RunError
from moecomp.search.objectives import objective_space
from moecomp.search.problem import build_problem


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def problem(digits_problem, digits_target):
    cfg = digits_problem.replace("search", pop_size=8)
    return build_problem(cfg, target=digits_target)


def genes(df: pd.DataFrame, n_var: int) -> np.ndarray:
    return df[[f"{GENE_PREFIX}{j}" for j in range(n_var)]].to_numpy(np.int64)


@pytest.mark.parametrize("peer", ["random", "tpe", "optuna-nsga2"])
def test_batch_peers_evaluate_their_budget_within_bounds(problem, peer, tmp_path):
    seen = []
    res = run_peer(problem, peer, budget=21, seed=3, folder=tmp_path / peer,
                   on_evals=seen.append)
    df = res.evaluated
    assert res.n_evals == len(df) == 21 and df["id"].tolist() == list(range(21))
    assert seen[0] == 0 and seen[-1] == 21 and seen == sorted(seen)
    X = genes(df, problem.n_var)
    assert (X >= problem.xl).all() and (X <= problem.xu).all()
    # the rows are what the Evaluator gives for those genes (an oracle: evaluate again)
    rec = problem.evaluate_genes(X[:5])
    space = objective_space(problem.config)
    np.testing.assert_allclose(space.matrix(df.iloc[:5]), rec.F, rtol=1e-6, atol=1e-9)
    # the front is the non-dominated set: no evaluated point dominates a front point
    F = space.matrix(df)
    for i in res.front(F):
        assert not ((F <= F[i]).all(axis=1) & (F < F[i]).any(axis=1)).any()


def test_random_resumes_to_the_same_points(problem, tmp_path, monkeypatch):
    whole = run_peer(problem, "random", budget=24, seed=1, folder=tmp_path / "whole").evaluated
    calls = {"n": 0}
    real = type(problem).evaluate_genes

    def failing(self, X):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # interrupted in the third batch
        return real(self, X)

    monkeypatch.setattr(type(problem), "evaluate_genes", failing)
    with pytest.raises(KeyboardInterrupt):
        run_peer(problem, "random", budget=24, seed=1, folder=tmp_path / "cut")
    kept = pd.read_csv(tmp_path / "cut" / "evaluated.csv")
    assert len(kept) == 16  # two batches of pop_size 8 were finished and kept
    monkeypatch.setattr(type(problem), "evaluate_genes", real)
    resumed = run_peer(problem, "random", budget=24, seed=1, folder=tmp_path / "cut").evaluated
    np.testing.assert_array_equal(genes(resumed, problem.n_var), genes(whole, problem.n_var))


def test_a_smaller_budget_reads_the_first_rows_of_a_larger_run(problem, tmp_path):
    big = run_peer(problem, "random", budget=16, seed=2, folder=tmp_path / "r").evaluated
    small = run_peer(problem, "random", budget=8, seed=2, folder=tmp_path / "r")
    assert small.n_evals == len(small.evaluated) == 8
    pd.testing.assert_frame_equal(small.evaluated, big.iloc[:8])


def test_tpe_resumes_keeping_finished_trials(problem, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = type(problem).evaluate_genes

    def failing(self, X):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, X)

    monkeypatch.setattr(type(problem), "evaluate_genes", failing)
    with pytest.raises(KeyboardInterrupt):
        run_peer(problem, "tpe", budget=30, seed=0, folder=tmp_path / "tpe")
    kept = pd.read_csv(tmp_path / "tpe" / "evaluated.csv")
    assert len(kept) == 20  # two batches of 10
    monkeypatch.setattr(type(problem), "evaluate_genes", real)
    res = run_peer(problem, "tpe", budget=30, seed=0, folder=tmp_path / "tpe")
    assert len(res.evaluated) == 30
    pd.testing.assert_frame_equal(res.evaluated.iloc[:20], kept)


def test_search_peers_run_their_settings(problem, tmp_path):
    import json

    res = run_peer(problem, "nsga2-default", budget=16, seed=0, folder=tmp_path / "nd")
    assert res.n_evals >= 16 and len(res.evaluated) == res.n_evals
    cfg = json.loads((tmp_path / "nd" / "problem.json").read_text())["search"]
    assert (cfg["operators"], cfg["surrogate"], cfg["algorithm"]) == ("default", False, "nsga2")
    again = run_peer(problem, "nsga2-default", budget=16, seed=0, folder=tmp_path / "nd")
    pd.testing.assert_frame_equal(again.evaluated, res.evaluated)  # finished: reused


def test_bad_peer_inputs_are_refused(problem, tmp_path):
    with pytest.raises(ConfigError, match="baseline.*tpe"):
        run_peer(problem, "hillclimb", budget=8, seed=0, folder=tmp_path / "x")
    with pytest.raises(ConfigError, match="budget"):
        run_peer(problem, "random", budget=0, seed=0, folder=tmp_path / "x")
    run_peer(problem, "random", budget=8, seed=0, folder=tmp_path / "r")
    with pytest.raises(RunError, match="another peer run"):
        run_peer(problem, "random", budget=8, seed=5, folder=tmp_path / "r")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a peer"):
        run_peer(problem, "tpe", budget=8, seed=0, folder=tmp_path / "other")
    assert set(PEERS) >= {"tpe", "random", "nsga2-default"}
