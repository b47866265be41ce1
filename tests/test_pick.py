"""Pick rules on hand-made fronts with known answers, and the re-evaluation of picks on the
held-out splits of a tiny real run folder (Evaluator metrics, digits MLP)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from moecomp.errors import ConfigError, RunError
from moecomp.metric import builtin_accuracy
from moecomp.pick import (
    NoFeasibleSolution,
    by_constraints,
    by_weights,
    choose,
    holdout_fidelity,
    knee,
    normalise,
    pick,
)


# --- hand-made fronts -----------------------------------------------------------------------
def l_front() -> np.ndarray:
    """A convex 2-D front made of a steep segment (0, 1) -> (0.1, 0.1) and a flat one
    (0.1, 0.1) -> (1, 0): its knee is the corner (0.1, 0.1), row 5."""
    a = np.linspace(0.0, 0.1, 6)
    b = np.linspace(0.1, 1.0, 10)[1:]
    return np.vstack([np.column_stack([a, 1 - 9 * a]), np.column_stack([b, 0.1 - (b - 0.1) / 9])])


def metric_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": [10, 11, 12, 13, 14],
            "density": [0.9, 0.5, 0.3, 0.2, 0.1],
            "bits": [8.0, 4.0, 3.0, 2.0, 1.0],
            "divergence": [0.001, 0.01, 0.05, 0.2, 1.0],
            "ratio": [4.4, 15.0, 30.0, 60.0, 200.0],
            "metric": [97.0, 96.9, 96.0, 93.0, 40.0],
            "metric_drop": [0.0, 0.1, 1.0, 4.0, 57.0],
        }
    )


def test_normalise_spans_unit_box_and_maps_constant_objective_to_zero():
    F = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [2.0, 5.0, 3.0]])
    Fn = normalise(F)
    assert np.allclose(Fn[:, 0], [0, 1, 0.5]) and np.allclose(Fn[:, 1], 0)
    assert np.allclose(Fn[:, 2], [0, 1, 0.5])


def test_knee_of_convex_l_front_is_the_corner():
    F = l_front()
    assert knee(F).tolist() == [5]
    # Units do not matter: F is normalised first.
    assert knee(F * np.array([1000.0, 0.001])).tolist() == [5]
    # Row order does not matter.
    perm = np.random.default_rng(0).permutation(len(F))
    assert perm[knee(F[perm])].tolist() == [5]


def test_knee_of_tiny_or_duplicated_front():
    assert knee(np.array([[0.0, 1.0], [1.0, 0.0]])).size == 0
    F = l_front()
    dup = np.vstack([F, F[[5, 5]]])  # duplicates do not break pymoo's division
    assert knee(dup).tolist() == [5]


def test_knee_leaves_global_warning_filters_alone():
    import warnings

    before = list(warnings.filters)
    knee(l_front())
    assert warnings.filters == before


@pytest.mark.parametrize("method", ["asf", "pseudo"])
def test_weights_on_one_objective_pick_its_minimum(method):
    F = l_front()
    assert by_weights(F, (1, 0), method=method) == int(np.argmin(F[:, 0]))
    assert by_weights(F, (0, 1), method=method) == int(np.argmin(F[:, 1]))
    # Only proportions matter.
    assert by_weights(F, (5, 0), method=method) == by_weights(F, (1, 0), method=method)


def test_asf_equal_weights_pick_the_knee_of_a_symmetric_front():
    # On the L front normalised to the unit box, max(f1, f2) is smallest at the corner.
    assert by_weights(l_front(), (1, 1)) == 5


def test_weights_three_objectives_known_answer():
    F = metric_frame()[["density", "bits", "divergence"]].to_numpy()
    # Divergence alone: the first row; density and bits only: the last.
    assert by_weights(F, (0, 0, 1)) == 0
    assert by_weights(F, (1, 1, 0)) == 4


def test_weights_are_validated():
    F = l_front()
    with pytest.raises(ConfigError, match="weights: needs 2 numbers"):
        by_weights(F, (1, 1, 1))
    with pytest.raises(ConfigError, match="weights"):
        by_weights(F, (-1, 1))
    with pytest.raises(ConfigError, match="weights"):
        by_weights(F, (0, 0))
    with pytest.raises(ConfigError, match="method"):
        by_weights(F, (1, 1), method="topsis")


def test_constraints_filter_exactly_and_sort_by_ratio():
    df = metric_frame()
    out = by_constraints(df, max_drop=1.0)
    assert out["id"].tolist() == [12, 11, 10]  # drop 1.0 is allowed (<=), best ratio first
    assert by_constraints(df, min_ratio=30)["id"].tolist() == [14, 13, 12]
    assert by_constraints(df, max_divergence=0.05, min_ratio=15)["id"].tolist() == [12, 11]
    assert by_constraints(df)["id"].tolist() == [14, 13, 12, 11, 10]


def test_infeasible_bound_names_the_rule_and_best_value():
    df = metric_frame()
    with pytest.raises(NoFeasibleSolution, match=r"max_drop.*metric_drop = 0.1 \(solution 11\)"):
        by_constraints(df.iloc[1:], max_drop=0.05)
    with pytest.raises(NoFeasibleSolution, match=r"min_ratio.*best available is ratio = 200"):
        by_constraints(df, min_ratio=500)
    # Each bound alone is feasible, together they are not.
    with pytest.raises(NoFeasibleSolution, match="together.*best ratio is 30"):
        by_constraints(df, max_drop=1.0, min_ratio=50)


def test_choose_rules_and_default():
    df = metric_frame()
    out = choose(df, max_drop=1.0)
    assert out[["id", "rule"]].values.tolist() == [[12, "best ratio within drop <= 1"]]
    out = choose(df, weights=(0, 0, 1))
    assert out["id"].tolist() == [10] and out["rule"].iloc[0] == "weights 0,0,1 (asf)"
    # Bounds restrict where weights look.
    out = choose(df, max_drop=1.0, weights=(1, 1, 0), method="pseudo")
    assert out["id"].tolist() == [12, 12]
    assert out["rule"].tolist()[1] == "weights 1,1,0 (pseudo) within drop <= 1"
    # No rule: knee points (if any) and equal ASF weights.
    default = choose(df)
    assert default["rule"].iloc[-1] == "weights 1,1,1 (asf)"
    assert list(default.columns[:2]) == ["id", "rule"]


def test_choose_knee_uses_given_objectives_and_caps_count():
    F = l_front()
    df = pd.DataFrame(
        {
            "id": np.arange(len(F)) + 100,
            "f1": F[:, 0],
            "f2": F[:, 1],
            "ratio": 1 / (F[:, 0] + 0.01),
            "divergence": F[:, 1],
            "metric_drop": 0.0,
        }
    )
    out = choose(df, objectives=lambda d: d[["f1", "f2"]].to_numpy(), knee_point=True)
    assert out["id"].tolist() == [105] and out["rule"].tolist() == ["knee"]
    with pytest.raises(ConfigError, match="max_knees"):
        choose(df, objectives=lambda d: d[["f1", "f2"]].to_numpy(), knee_point=True, max_knees=0)


def test_knee_rule_without_knee_is_a_clear_error():
    df = metric_frame().iloc[:2]
    with pytest.raises(NoFeasibleSolution, match="knee: no point"):
        choose(df, knee_point=True)


# --- a tiny real run folder -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, digits_problem, digits_target):
    """A run folder written by hand (runs.py helpers) from a few plans whose metrics the
    Evaluator computed: problem.json, evaluated.csv, front.csv, hv.csv, search.json."""
    from moecomp.evaluate import Evaluator
    from moecomp.relevance import compute_ranks
    from moecomp.runs import RunFolder, atomic_write_csv, solutions_frame
    from moecomp.search.front import nondominated

    ranks = compute_ranks(digits_target, digits_problem.relevance, progress=False)
    names = digits_target.layer_names
    s = np.array(
        [
            [0.0, 0.0, 0.0],
            [0.5, 0.5, 0.2],
            [0.7, 0.6, 0.3],
            [0.8, 0.8, 0.5],
            [0.9, 0.9, 0.6],
            [0.95, 0.95, 0.8],
            [0.6, 0.6, 0.2],
            [0.3, 0.2, 0.1],
        ]
    )
    b = np.array(
        [[8, 8, 8], [4, 4, 6], [3, 3, 4], [3, 2, 4], [2, 2, 3], [1, 1, 2], [8, 8, 8], [2, 2, 2]]
    )
    m = Evaluator(digits_target, ranks).evaluate(s, b)
    metrics = {
        k: getattr(m, k)
        for k in ("density", "bits", "divergence", "size_bytes", "ratio", "metric", "metric_drop")
    }
    df = solutions_frame(np.arange(len(s)), 0, names, s, b, metrics)
    run = RunFolder(tmp_path_factory.mktemp("run") / "tiny")
    run.write_problem(digits_problem)
    atomic_write_csv(run.file("evaluated.csv"), df)
    front = nondominated(df[["density", "bits", "divergence"]].to_numpy())
    atomic_write_csv(run.file("front.csv"), df.iloc[front])
    atomic_write_csv(
        run.file("hv.csv"),
        pd.DataFrame({"gen": [0, 1], "n_evals": [4, 8], "hv": [0.3, 0.4], "elapsed_s": [0.1, 0.2]}),
    )
    run.write_status({"status": "done", "algorithm": "nsga2", "n_evals": len(df)})
    return run, ranks


def test_pick_reevaluates_on_val_and_test(tiny_run, digits_target):
    from moecomp.evaluate import Evaluator
    from moecomp.target import Target

    run, ranks = tiny_run
    picks = pick(run.path, max_drop=5.0, weights=(1, 1, 1))
    assert (run.path / "picks.csv").is_file()
    saved = pd.read_csv(run.path / "picks.csv")
    saved = saved[saved["pick"] == picks["pick"].iloc[0]]
    assert saved["id"].tolist() == picks["id"].tolist()
    head = [
        "pick",
        "id",
        "rule",
        "bounds_on",
        "gen",
        "density",
        "bits",
        "divergence",
        "size_bytes",
        "ratio",
        "metric",
        "metric_drop",
        "val_divergence",
        "val_metric",
        "val_drop",
        "test_divergence",
        "test_metric",
        "test_drop",
    ]
    assert list(saved.columns[: len(head)]) == head
    assert any(c.startswith("s:") for c in saved.columns)
    assert (picks["bounds_on"] == "validation").all()
    assert "val drop <= 5" in picks["rule"].iloc[0]

    # Oracle: the Evaluator's metrics with the test split as its "calibration" data.
    t = digits_target
    assert t.test is not None and t.val is not None
    for split, col in ((t.test, "test"), (t.val, "val")):
        on_split = Target(teacher=t.teacher, layers=t.layers, calib=split,
                          metric=builtin_accuracy())
        plans = [run.plan(int(i)) for i in picks["id"]]
        m = Evaluator(on_split, ranks).evaluate_plans(plans)
        assert np.allclose(picks[f"{col}_metric"], m.metric)
        assert np.allclose(picks[f"{col}_drop"], m.metric_drop)
        assert np.allclose(picks[f"{col}_divergence"], m.divergence, rtol=1e-4)

    # the bound is on validation: the best ratio among the front's validation drops <= 5
    front = run.front()
    on_val = front.assign(**holdout_fidelity(t, ranks, [run.plan(int(i)) for i in front["id"]])
                          [["val_drop", "val_divergence"]].to_dict("list"))
    best = by_constraints(on_val, max_drop=5.0, split="validation")["id"].iloc[0]
    assert picks["id"].iloc[0] == best and picks["val_drop"].iloc[0] <= 5.0


def _fresh_copy(run, target, tmp_path, monkeypatch):  # noqa: ANN001, ANN202
    """A copy of ``run`` without picks or validation cache, its RunContext on ``target``,
    and the list of split names ``target.fidelity`` is called with from now on."""
    import shutil

    from moecomp.solution import RunContext

    folder = tmp_path / "run"
    shutil.copytree(run.path, folder)
    for name in ("picks.csv", "validation.csv"):
        (folder / name).unlink(missing_ok=True)
    calls: list[str] = []
    measure = target.fidelity

    def counted(model, name):  # noqa: ANN001, ANN202
        calls.append(name)
        return measure(model, name)

    monkeypatch.setattr(target, "fidelity", counted)
    return folder, RunContext(folder, target=target), calls


def test_pick_bounds_on_validation_are_cached_and_picks_are_appended(tiny_run, digits_target,
                                                                     tmp_path, monkeypatch):
    run, _ = tiny_run
    folder, ctx, calls = _fresh_copy(run, digits_target, tmp_path, monkeypatch)
    first = pick(ctx, max_drop=2.0)
    cache = pd.read_csv(folder / "validation.csv")
    n_front = len(run.front())
    # "best ratio within" alone measures the front best ratio first, only until one fits
    assert 1 <= len(cache) <= n_front and set(first["id"]) <= set(cache["id"])
    assert (cache["val_samples"] == len(digits_target.val)).all()
    measured = calls.count("validation")
    assert measured == len(cache) + len(first)  # the front's solutions, then the pick

    calls.clear()
    second = pick(ctx, max_drop=2.0, knee=True)  # knee needs every feasible solution
    cache2 = pd.read_csv(folder / "validation.csv")
    assert len(cache2) == n_front and cache2["id"].is_unique
    assert calls.count("validation") == n_front - len(cache) + len(second)

    calls.clear()
    third = pick(ctx, max_drop=2.0)
    assert calls.count("validation") == len(third)  # only the re-evaluation of the pick
    assert third["id"].tolist() == first["id"].tolist()

    # a cached value is what the bound reads
    cache2.loc[cache2["id"] == cache2["id"].iloc[0], "val_drop"] = -1.0
    top = int(run.front().sort_values("ratio", ascending=False)["id"].iloc[0])
    cache2.loc[cache2["id"] == top, "val_drop"] = -1.0
    cache2.to_csv(folder / "validation.csv", index=False)
    fourth = pick(ctx, max_drop=0.0, reevaluate=False)
    assert fourth["id"].iloc[0] == top

    saved = pd.read_csv(folder / "picks.csv")
    assert saved["pick"].drop_duplicates().tolist() == [1, 2, 3, 4]
    assert saved[saved["pick"] == 1]["id"].tolist() == first["id"].tolist()
    assert (saved["bounds_on"] == "validation").all()


def test_validation_cache_of_other_students_is_measured_again(tiny_run, digits_target,
                                                              tmp_path, monkeypatch):
    """A validation.csv whose rows describe other students (the quantizers changed since it
    was written, or it predates fingerprints) is not trusted: everything asked is measured
    again and the file rewritten; an intact cache is read without a forward."""
    from moecomp.pick import validation_measures

    run, _ = tiny_run
    folder, ctx, calls = _fresh_copy(run, digits_target, tmp_path, monkeypatch)
    ids = run.front()["id"].astype(int).tolist()[:4]
    fresh = validation_measures(ctx, ids)
    assert len(calls) == len(ids)
    cache = pd.read_csv(folder / "validation.csv", dtype={"student": str})
    assert cache["student"].str.fullmatch(r"s[0-9a-f]{16}").all()
    assert cache["student"].nunique() == len(ids)  # different plans, different students

    calls.clear()
    again = validation_measures(ctx, ids)
    assert calls == [] and again.equals(fresh)

    for stale in ("s" + "0" * 16, None):  # another student's fingerprint; an old file without any
        damaged = cache.assign(val_drop=-99.0)
        damaged = damaged.drop(columns="student") if stale is None else \
            damaged.assign(student=stale)
        damaged.to_csv(folder / "validation.csv", index=False)
        calls.clear()
        measured = validation_measures(ctx, ids)
        assert len(calls) == len(ids)
        assert (measured["val_drop"] > -99.0).all()
        assert measured["val_drop"].tolist() == fresh["val_drop"].tolist()


def test_pick_without_reevaluation_has_no_holdout_columns(tiny_run):
    run, _ = tiny_run
    picks = pick(run.path, weights=(0, 0, 1), reevaluate=False)
    assert "val_metric" not in picks.columns and "test_metric" not in picks.columns
    assert picks["divergence"].iloc[0] == run.front()["divergence"].min()


def test_pick_notices_a_rebuild_that_differs_from_the_search(tiny_run, tmp_path):
    import shutil

    run, _ = tiny_run
    copy = tmp_path / "tampered"
    shutil.copytree(run.path, copy)
    front = pd.read_csv(copy / "front.csv")
    front["divergence"] = front["divergence"] * 1.5 + 0.01  # not what the plan gives
    front.to_csv(copy / "front.csv", index=False)
    with pytest.raises(RunError, match="calibration divergence"):
        pick(copy, weights=(1, 1, 1))


def test_holdout_fidelity_of_the_dense_8bit_plan_is_near_the_teacher(tiny_run, digits_target):
    from moecomp.plan import CompressionPlan
    from moecomp.train import accuracy

    _, ranks = tiny_run
    plan = CompressionPlan.uniform(digits_target.layer_names, sparsity=0.0, bits=8)
    out = holdout_fidelity(digits_target, ranks, [plan])
    assert digits_target.test is not None
    assert out["teacher_test_metric"].iloc[0] == pytest.approx(
        accuracy(digits_target.teacher, digits_target.test))
    assert abs(out["test_drop"].iloc[0]) <= 1.0
    assert 0 <= out["test_divergence"].iloc[0] < 0.01
    # The teacher itself was not modified.
    w = dict(digits_target.teacher.named_parameters())[digits_target.layer_names[0]]
    assert torch.unique(w).numel() > 256


def test_cli_pick_prints_table_and_paths(tiny_run):
    from typer.testing import CliRunner

    from moecomp.cli import app

    run, _ = tiny_run
    res = CliRunner().invoke(
        app, ["pick", str(run.path), "--weights", "0,0,1", "--no-reevaluate", "--no-plots"]
    )
    assert res.exit_code == 0, res.output
    best = int(run.front().sort_values("divergence")["id"].iloc[0])
    assert "weights 0,0,1" in res.output and f"{best}" in res.output
    assert str(run.path / "picks.csv") in res.output.replace("\n", "")
    assert "val = the full validation split" in " ".join(res.output.split())


def test_cli_pick_bad_weights_and_infeasible_bounds_are_errors(tiny_run):
    from typer.testing import CliRunner

    from moecomp.cli import app

    run, _ = tiny_run
    res = CliRunner().invoke(app, ["pick", str(run.path), "--weights", "1,x"])
    assert isinstance(res.exception, ConfigError)
    res = CliRunner().invoke(app, ["pick", str(run.path), "--min-ratio", "1e9"])
    assert isinstance(res.exception, NoFeasibleSolution)
    assert "min_ratio" in str(res.exception)


def test_pick_weights_must_match_the_runs_objectives(tiny_run):
    run, _ = tiny_run
    with pytest.raises(ConfigError, match=r"one per objective of this run \(density, bits"):
        pick(run.path, weights=(1, 1), reevaluate=False)


def test_knee_ignores_dominated_rows():
    F = l_front()
    worse = F[[2, 8]] + 0.05  # dominated by rows 2 and 8
    assert knee(np.vstack([F, worse])).tolist() == [5]
