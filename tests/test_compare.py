"""Compare: dominance and hypervolume maths, and the DE comparison on a small run folder."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pandas as pd
import pytest
import torch
from pymoo.indicators.hv import HV
from typer.testing import CliRunner

from moecomp.baseline import DEConfig
from moecomp.compare import (
    DE_FILE,
    DE_LABEL,
    FRONT_LABEL,
    SUMMARY_FILE,
    SUMMARY_MD,
    compare_with_de,
    comparison_info,
    de_table,
    dominance_counts,
    dominated_by,
    load_comparison,
    objective_space,
    summary_frame,
    summary_markdown,
)
from moecomp.errors import ConfigError, RunError
from moecomp.runs import MetricInfo, RunFolder, atomic_write_csv, solutions_frame


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small networks: intra-op threads only add synchronisation, which on a busy CI machine
    costs many times the arithmetic. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- dominance and hypervolume ---------------------------------------------------------------


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


def test_dominance_counts_on_hand_made_fronts():
    F_a = np.array([[1.0, 1.0], [2.0, 0.5]])
    F_b = np.array([[1.5, 1.5], [0.5, 3.0], [2.0, 0.5]])
    # a0 dominates b0; b1 is incomparable to both; b2 equals a1 (equal points do not dominate)
    assert dominance_counts(F_a, F_b) == (1, 0)
    assert dominance_counts(F_b, F_a) == (0, 1)
    assert dominated_by(F_a, F_b).tolist() == [True, False, False]
    # weak dominance: equal in two objectives, better in one
    assert dominance_counts(np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 2.0, 4.0]])) == (1, 0)
    # both directions at once, and a point dominated by several counts once
    F_c = np.array([[0.0, 0.0], [3.0, 3.0]])
    F_d = np.array([[1.0, 1.0], [2.0, 2.0]])
    assert dominance_counts(F_c, F_d) == (2, 1)
    assert dominance_counts(np.zeros((0, 2)), F_d) == (0, 0)
    assert dominance_counts(F_c, np.zeros((0, 2))) == (0, 0)
    with pytest.raises(ValueError):
        dominance_counts(F_c, np.ones((1, 3)))


def test_dominance_counts_match_a_loop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        F_a = rng.integers(0, 4, size=(rng.integers(1, 8), 3)).astype(float)
        F_b = rng.integers(0, 4, size=(rng.integers(1, 8), 3)).astype(float)
        want_ab = sum(any(_dominates(a, b) for a in F_a) for b in F_b)
        want_ba = sum(any(_dominates(b, a) for b in F_b) for a in F_a)
        assert dominance_counts(F_a, F_b) == (want_ab, want_ba)


def test_hypervolume_is_pymoos_on_normalised_objectives():
    ref = np.array([1.0, 8.0, 1.0])
    rng = np.random.default_rng(1)
    F_front = rng.random((12, 3)) * ref
    F_de = rng.random((4, 3)) * ref * 1.2  # some beyond the reference: they contribute 0
    s = summary_frame(
        F_front, F_de, ref, front_evals=100, de_evals=90, front_budget=100, de_budget=100
    )
    oracle = HV(ref_point=np.ones(3))
    assert s.loc[0, "hv"] == pytest.approx(oracle(F_front / ref))
    assert s.loc[1, "hv"] == pytest.approx(oracle(F_de / ref))
    # by hand: one point at half the reference in 2-D covers a quarter
    s2 = summary_frame(
        np.array([[0.5, 4.0]]),
        np.zeros((0, 2)),
        np.array([1.0, 8.0]),
        front_evals=1,
        de_evals=0,
        front_budget=1,
        de_budget=1,
    )
    assert s2.loc[0, "hv"] == pytest.approx(0.25) and s2.loc[1, "hv"] == 0.0
    assert s.loc[0, "dominates"] == s.loc[1, "dominated"]
    assert list(s["method"]) == [FRONT_LABEL, DE_LABEL]


def test_objective_space_follows_the_problem(digits_problem):
    sp = objective_space(digits_problem)
    assert sp.names == ("density", "bits", "divergence")
    assert sp.ref_point.tolist() == [1.0, 8.0, 1.0]
    two = digits_problem.replace("objectives", mode="2obj", ref_point=(0.25, 2.0))
    sp2 = objective_space(two)
    df = pd.DataFrame({"density": [0.5], "bits": [4.0], "divergence": [0.1]})
    assert sp2.names == ("size", "divergence")
    assert sp2.matrix(df).tolist() == [[0.0625, 0.1]]
    shared = digits_problem.replace("search", problem="shared")
    assert objective_space(shared).ref_point.tolist() == [1.0, 1.0]


# --- tables -----------------------------------------------------------------------------------


DE_POINTS = pd.DataFrame(
    {
        "target_sparsity": [0.5, 0.9],
        "sparsity": [0.5, 0.9],
        "evals": [30, 30],
        "density": [0.5, 0.1],
        "bits": [4.0, 2.0],
        "divergence": [0.01, 0.5],
        "ratio": [12.0, 60.0],
        "metric": [96.5, 80.25],
        "metric_drop": [0.5, 16.75],
        "feasible": [True, True],
        "dominated_by_front": [True, False],
    }
)


def test_de_table_names_the_metric_or_leaves_it_out():
    acc = de_table(DE_POINTS, metric=MetricInfo("accuracy", "%", "maximize"))
    assert list(acc.columns[-4:]) == ["accuracy (%)", "accuracy drop (points)", "feasible",
                                      "dominated_by_front"]
    assert acc["accuracy (%)"].tolist() == [96.5, 80.25]
    user = de_table(DE_POINTS, metric=MetricInfo("agreement", "", "maximize"))
    assert "agreement" in user.columns and "agreement drop" in user.columns
    bare = de_table(DE_POINTS.assign(metric=np.nan, metric_drop=np.nan), metric=None)
    assert not {"metric", "metric_drop"} & set(bare.columns)
    assert "divergence" in bare.columns


def test_summary_markdown_says_what_the_points_are_measured_by(digits_problem):
    space = objective_space(digits_problem)
    summary = summary_frame(np.array([[0.5, 4.0, 0.01]]), np.array([[0.5, 4.0, 0.02]]),
                            space.ref_point, front_evals=60, de_evals=60, front_budget=60,
                            de_budget=60)
    acc = summary_markdown(summary, DE_POINTS, space,
                           metric=MetricInfo("accuracy", "%", "maximize"))
    assert "Task metric: accuracy (%)" in acc
    assert "| 0.50 | 0.5000 | 30 | 0.5000 | 4.00 | 0.01 | 12.0 | 96.50 | 0.50 | True | True |" \
        in acc
    user = summary_markdown(summary, DE_POINTS, space,
                            metric=MetricInfo("agreement", "", "maximize"))
    assert "| 80.25 | 16.75 |" in user  # no scale known: significant digits, not decimals
    bare = summary_markdown(summary, DE_POINTS.assign(metric=np.nan, metric_drop=np.nan), space,
                            metric=None)
    assert "No task metric" in bare and "| nan |" not in bare
    assert "| target_sparsity | sparsity | evals | density | bits | divergence | ratio | " \
        "feasible | dominated_by_front |" in bare


# --- a small run folder -----------------------------------------------------------------------


def _fake_run(tmp_path, problem, target, *, n_evals: int = 60) -> RunFolder:
    """A run folder as the search writes it, from a grid of uniform plans (the comparison
    does not care how the front was found)."""
    from moecomp.evaluate import Evaluator
    from moecomp.relevance.base import scores_to_ranks
    from moecomp.search.front import nondominated
    from moecomp.solution import target_info

    ranks = {n: scores_to_ranks(w.abs()) for n, w in target.weights().items()}
    names = target.layer_names
    grid = list(itertools.product((0.2, 0.5, 0.8, 0.9), (2, 4, 8)))
    S = np.array([[s] * len(names) for s, _ in grid])
    B = np.array([[b] * len(names) for _, b in grid])
    m = Evaluator(target, ranks).evaluate(S, B)
    df = solutions_frame(np.arange(len(grid)), 0, names, S, B, m.to_dict())
    run = RunFolder(tmp_path / "run")
    run.write_problem(problem)
    run.write_target_info(target_info(target))
    atomic_write_csv(run.file("evaluated.csv"), df)
    atomic_write_csv(run.file("front.csv"), df.iloc[nondominated(m.objectives("3obj"))])
    run.write_status({"status": "done", "budget": n_evals, "n_evals": n_evals})
    return run


@pytest.fixture
def small_run(tmp_path, digits_problem, digits_target) -> RunFolder:
    return _fake_run(tmp_path, digits_problem, digits_target)


def test_compare_writes_a_consistent_comparison(small_run, digits_target):
    res = compare_with_de(small_run.path, targets=(0.9, 0.5), target=digits_target)
    de = pd.read_csv(small_run.file(DE_FILE))
    summary = pd.read_csv(small_run.file(SUMMARY_FILE))
    assert de["target_sparsity"].tolist() == [0.5, 0.9]  # sorted
    # the run's 60 evaluations, split over two targets
    assert (de["budget"] == 30).all() and (de["evals"] <= 30).all()
    n_total = sum(ref.numel for ref in digits_target.layers)
    for t, s, dens in zip(de["target_sparsity"], de["sparsity"], de["density"], strict=True):
        assert s * n_total == pytest.approx(round(t * n_total))
        assert dens == pytest.approx(1.0 - s)
    # the Evaluator's divergence is the one the evolution measured
    np.testing.assert_allclose(de["divergence"], de["de_divergence"], rtol=1e-4, atol=1e-7)
    assert {f"s:{n}" for n in digits_target.layer_names} <= set(de.columns)

    space = objective_space(small_run.problem())
    F_front = space.matrix(small_run.front())
    F_de = space.matrix(de)
    front_dom, de_dom = dominance_counts(F_front, F_de)
    assert summary.loc[0, "dominates"] == front_dom == de["dominated_by_front"].sum()
    assert summary.loc[1, "dominates"] == de_dom
    oracle = HV(ref_point=np.ones(3))
    assert summary.loc[0, "hv"] == pytest.approx(oracle(F_front / space.ref_point))
    assert summary.loc[1, "hv"] == pytest.approx(oracle(F_de / space.ref_point))
    assert summary["evaluations"].tolist() == [60, int(de["evals"].sum())]
    assert summary["budget"].tolist() == [60, 60]

    assert res.hv_front == pytest.approx(summary.loc[0, "hv"])
    assert res.front_dominates_de == front_dom and res.de_dominates_front == de_dom
    md = small_run.file(SUMMARY_MD).read_text()
    assert "| DE baseline |" in md
    assert "Task metric: accuracy (%)" in md and "| accuracy (%) | accuracy drop (points) |" in md
    png = small_run.path / "plots" / "compare_de.png"
    assert png.is_file() and png.stat().st_size > 10_000

    again = load_comparison(small_run.path)
    pd.testing.assert_frame_equal(again.summary, summary)
    info = comparison_info(small_run.front(), again.de, again.space)
    assert (info["method"] == DE_LABEL).sum() == 2
    assert info.loc[info["method"] == DE_LABEL, "label"].tolist() == ["50% sparse", "90% sparse"]


def test_compare_refuses_too_small_budgets_and_missing_counts(small_run, digits_target):
    with pytest.raises(ConfigError, match="budget"):
        compare_with_de(small_run.path, targets=(0.5, 0.9), budget=40, target=digits_target)
    with pytest.raises(ConfigError, match="targets"):
        compare_with_de(small_run.path, targets=(0.5, 1.0), target=digits_target)
    small_run.write_status({"status": "done"})
    with pytest.raises(RunError, match="n_evals"):
        compare_with_de(small_run.path, targets=(0.5,), target=digits_target)


def test_cli_prints_the_table(small_run):
    from moecomp.cli import app

    out = CliRunner().invoke(
        app,
        [
            "compare",
            str(small_run.path),
            "--baseline",
            "de",
            "--targets",
            "0.6",
            "--budget",
            "27",
            "--no-plot",
            "--no-progress",
        ],
    )
    assert out.exit_code == 0, out.output
    assert "DE baseline" in out.output and "search front" in out.output
    assert "hypervolume" in out.output and "60%" in out.output
    # every header whole in an 80-column terminal; the metric named below the table
    headers = r"target\s+evals\s+density\s+bits\s+divergence\s+ratio\s+metric\s+drop\s+dominated\s"
    assert re.search(headers, out.output)
    assert "metric: accuracy (%); drop: from the teacher's in points" in out.output
    assert pd.read_csv(small_run.file(DE_FILE))["target_sparsity"].tolist() == [0.6]
    bad = CliRunner().invoke(app, ["compare", str(small_run.path), "--baseline", "magnitude"])
    assert bad.exit_code != 0 and isinstance(bad.exception, ConfigError)


@pytest.mark.slow  # starts a Jupyter kernel
def test_notebook_runs_on_a_run_folder(small_run, digits_target, monkeypatch, repo):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    compare_with_de(
        small_run.path, targets=(0.5, 0.9), target=digits_target, plot=True, config=DEConfig(seed=0)
    )
    monkeypatch.setenv("MOECOMP_RUN", str(small_run.path))
    nb = nbformat.read(repo / "notebooks" / "compare_de.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(repo)}}
    ).execute()
    text = "".join(
        str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    assert "DE baseline" in text


def test_infeasible_de_points_are_listed_but_not_counted(tmp_path, digits_problem, digits_target):
    constrained = digits_problem.replace("objectives", max_divergence=0.5)
    run = _fake_run(tmp_path, constrained, digits_target)
    res = compare_with_de(run.path, targets=(0.5, 0.95), target=digits_target)
    assert res.de["feasible"].tolist() == [True, False]  # 95 % sparse is far beyond 0.5 nats
    assert not res.de["dominated_by_front"].iloc[1]
    assert res.summary.loc[1, "points"] == 1
    space = objective_space(constrained)
    want = HV(ref_point=np.ones(3))(space.matrix(res.de.iloc[:1]) / space.ref_point)
    assert res.hv_de == pytest.approx(want)
    assert (run.path / "plots" / "compare_de.png").is_file()


# --- peers ------------------------------------------------------------------------------------


def test_compare_with_a_peer_writes_a_consistent_comparison(small_run, digits_target):
    from moecomp.compare_peer import compare_with_peer, peer_files

    res = compare_with_peer(small_run.path, "random", budget=24, target=digits_target)
    files = peer_files(small_run, "random")
    points = pd.read_csv(files["points"])
    summary = pd.read_csv(files["summary"])
    assert summary["method"].tolist() == [FRONT_LABEL, "random genes"]
    assert summary["evaluations"].tolist() == [60, 24] and summary["budget"].tolist() == [60, 24]
    space = objective_space(small_run.problem())
    F_front, F_peer = space.matrix(small_run.front()), space.matrix(points)
    # the peer's front is the non-dominated set of all it evaluated (read from its folder)
    evaluated = pd.read_csv(res.files["peer_run"] / "evaluated.csv")
    assert len(evaluated) == 24
    F_all = space.matrix(evaluated)
    assert not dominated_by(F_all, F_peer).any() and len(points) == summary.loc[1, "points"]
    oracle = HV(ref_point=np.ones(3))
    assert res.hv_de == pytest.approx(oracle(F_all / space.ref_point))
    assert res.hv_front == pytest.approx(oracle(F_front / space.ref_point))
    front_dom, peer_dom = dominance_counts(F_front, F_peer)
    assert (res.front_dominates_de, res.de_dominates_front) == (front_dom, peer_dom)
    assert points["dominated_by_front"].sum() == front_dom
    assert "# Search front vs the random genes peer" in files["markdown"].read_text()
    png = small_run.path / "plots" / "compare_random.png"
    assert png.is_file() and png.stat().st_size > 10_000
    # the DE comparison's files are untouched by a peer's
    assert not small_run.file(DE_FILE).exists()


def test_cli_compares_with_a_peer(small_run):
    from moecomp.cli import app

    out = CliRunner().invoke(
        app,
        ["compare", str(small_run.path), "--baseline", "tpe", "--budget", "20", "--no-plot",
         "--no-progress"],
    )
    assert out.exit_code == 0, out.output
    assert "Optuna TPE" in out.output and "hypervolume" in out.output
    assert "front points" in out.output
    bad = CliRunner().invoke(
        app, ["compare", str(small_run.path), "--baseline", "tpe", "--targets", "0.5"]
    )
    assert bad.exit_code != 0 and "--targets" in str(bad.exception)
