"""Figures of a run: the info frames they draw (which points are dominated, which are picks,
the picks' genes) and that plot_run writes real PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moecomp.plots import (
    RATIO_FIGURE,
    front_info,
    held_out_info,
    layer_info,
    metric_zoom,
    pick_labels,
    plot_run,
    ratio_info,
    teacher_value,
)
from moecomp.runs import MetricInfo, RunFolder, atomic_write_csv, metric_info, solutions_frame

NAMES = ["hidden.0.weight", "hidden.1.weight", "out.weight"]
ACCURACY = {"name": "accuracy", "ref": "accuracy", "direction": "maximize", "unit": "%",
            "teacher_calibration": 97.0}
# A label-free metric in [0, 1], as a user's sentence encoder might report.
AGREEMENT = {"name": "neighbour agreement", "ref": "encoder.metrics:agreement",
             "direction": "maximize", "unit": "", "teacher_calibration": 1.0}
# A metric to minimise, in the user's own unit.
LATENCY_ERROR = {"name": "error", "ref": "m:error", "direction": "minimize", "unit": "dB",
                 "teacher_calibration": 20.0}


def fake_run(path: Path, problem, metric: dict | None = ACCURACY) -> RunFolder:
    """A run folder of 60 made-up solutions (no model needed): metrics consistent enough
    to draw, front = the non-dominated rows. ``metric``: target.json's entry (None: the
    target has no metric, its columns are NaN)."""
    from moecomp.search.front import nondominated

    rng = np.random.default_rng(0)
    n = 60
    s = rng.uniform(0, 0.95, (n, 3)).round(2)
    b = rng.integers(1, 9, (n, 3))
    density = 1 - s.mean(1)
    bits = b.mean(1).astype(float)
    div = np.exp(-4 * density) * np.exp(-bits) * 20 * rng.lognormal(0, 0.3, n)
    worse = np.clip(0.3 * div, 0.0, 0.9)  # share of the teacher's value lost
    if metric is None:
        value = drop = np.full(n, np.nan)
    else:
        t = metric["teacher_calibration"]
        up = metric["direction"] == "maximize"
        value = t * (1 - worse) if up else t * (1 + worse)
        drop = t - value if up else value - t
    m = {
        "density": density,
        "bits": bits,
        "divergence": div,
        "size_bytes": 1000 + 8000 * density * bits / 8,
        "ratio": 68000 / (1000 + 8000 * density * bits / 8),
        "metric": value,
        "metric_drop": drop,
    }
    df = solutions_frame(np.arange(n), 0, NAMES, s, b, m)
    df["gen"] = np.arange(n) // 20
    run = RunFolder(path)
    run.write_problem(problem)
    run.write_target_info({"divergence": "kl", "metric": metric})
    atomic_write_csv(run.file("evaluated.csv"), df)
    atomic_write_csv(
        run.file("front.csv"),
        df.iloc[nondominated(df[["density", "bits", "divergence"]].to_numpy())],
    )
    atomic_write_csv(
        run.file("hv.csv"),
        pd.DataFrame(
            {
                "gen": [0, 1, 2],
                "n_evals": [20, 40, 60],
                "hv": [0.2, 0.5, 0.6],
                "elapsed_s": [0.1, 0.2, 0.3],
            }
        ),
    )
    run.write_status({"status": "done", "algorithm": "nsga2", "n_evals": n, "hv": 0.6})
    return run


def fake_picks(run: RunFolder, *, held_out: bool = True) -> pd.DataFrame:
    """Picks as moecomp.pick writes them: a re-evaluation on the test split gives each pick
    a slightly worse test value (NaN metric columns where the run has no metric)."""
    front = run.front().sort_values("ratio", ascending=False)
    ids = front["id"].iloc[[0, 1, 1]].tolist()  # the second is chosen by two rules
    picks = run.evaluated().set_index("id").loc[ids].reset_index()
    picks.insert(1, "rule", ["best ratio within drop <= 5", "knee", "weights 1,1,4 (asf)"])
    if held_out:
        spec = run.target_info()["metric"]
        picks["test_divergence"] = picks["divergence"] * 1.2
        if spec is None:
            for c in ("test_metric", "test_drop", "teacher_test_metric"):
                picks[c] = np.nan
        else:
            teacher = spec["teacher_calibration"]
            # 1 % of the teacher's value worse, on the test split
            worse = 0.01 * teacher * (1 if spec["direction"] == "minimize" else -1)
            picks["test_metric"] = picks["metric"] + worse
            picks["test_drop"] = picks["metric_drop"] + abs(worse)
            picks["teacher_test_metric"] = teacher + worse
    return picks


@pytest.fixture
def run(tmp_path, digits_problem) -> RunFolder:
    return fake_run(tmp_path / "run", digits_problem)


@pytest.fixture
def bare_run(tmp_path, digits_problem) -> RunFolder:
    """A run whose target has no metric: it was searched on divergence alone."""
    return fake_run(tmp_path / "bare", digits_problem, metric=None)


def test_pick_labels_merge_rules_of_one_solution_and_drop_bounds():
    picks = pd.DataFrame(
        {
            "id": [3, 7, 7],
            "rule": ["best ratio within drop <= 1", "knee", "weights 1,1,1 (asf)"],
        }
    )
    assert pick_labels(picks) == {3: "#3: best ratio", 7: "#7: knee; weights 1,1,1 (asf)"}
    assert pick_labels(None) == {}


def test_front_info_flags_dominated_points_and_picks(run):
    evaluated, front = run.evaluated(), run.front()
    picks = fake_picks(run)
    info = front_info(evaluated, front, picks)
    assert len(info) == len(evaluated) and info["id"].is_unique
    on_front = set(front["id"])
    assert set(info.loc[~info["dominated"], "id"]) == on_front
    assert (info["status"] == np.where(info["dominated"], "dominated", "Pareto front")).all()
    assert set(info.loc[info["picked"], "id"]) == set(picks["id"])
    assert (info.loc[~info["picked"], "label"] == "").all()
    # Picks come last, so they are drawn on top.
    assert info["picked"].iloc[-2:].all()
    # Without picks nothing is marked.
    assert not front_info(evaluated, front).picked.any()


def test_metric_info_reads_target_json(tmp_path, digits_problem):
    acc = metric_info(fake_run(tmp_path / "a", digits_problem))
    assert acc == MetricInfo("accuracy", "%", "maximize")
    assert (acc.label, acc.drop_label, acc.drop_unit) == (
        "accuracy (%)", "accuracy drop (points)", "points")
    user = metric_info(fake_run(tmp_path / "u", digits_problem, metric=LATENCY_ERROR))
    assert user == MetricInfo("error", "dB", "minimize")
    assert (user.label, user.drop_label, user.percent) == ("error (dB)", "error drop (dB)", False)
    assert metric_info(fake_run(tmp_path / "n", digits_problem, metric=None)) is None


def test_metric_info_of_runs_that_predate_target_json(run, bare_run):
    for r in (run, bare_run):
        r.file("target.json").unlink()
    # Old runs measured accuracy wherever their metric column has values.
    assert metric_info(run) == MetricInfo("accuracy", "%", "maximize")
    assert metric_info(bare_run) is None
    run.write_target_info({"teacher": "MLP"})  # a target.json that does not say
    assert metric_info(run) == MetricInfo("accuracy", "%", "maximize")


def test_teacher_value_follows_the_direction(tmp_path, digits_problem):
    for spec in (ACCURACY, AGREEMENT, LATENCY_ERROR):
        r = fake_run(tmp_path / spec["name"], digits_problem, metric=spec)
        got = teacher_value(r.evaluated(), metric_info(r))
        assert got == pytest.approx(spec["teacher_calibration"])


def test_held_out_info_reads_the_picks_test_values(run, bare_run):
    picks = fake_picks(run)
    held = held_out_info(picks)
    assert held is not None and held["id"].is_unique and len(held) == 2
    assert list(held.columns) == ["id", "ratio", "calibration", "test"]
    assert np.allclose(held["test"], held["calibration"] - 0.97)
    assert held_out_info(fake_picks(run, held_out=False)) is None
    # Without a metric the test values are NaN: nothing to show but the divergence.
    bare = fake_picks(bare_run)
    assert held_out_info(bare, "metric") is None
    div = held_out_info(bare, "divergence")
    assert div is not None and np.allclose(div["test"], div["calibration"] * 1.2)


def test_ratio_info_shows_the_metric_with_its_units(run):
    picks = fake_picks(run)
    points = front_info(run.evaluated(), run.front(), picks)
    info = ratio_info(points, run.evaluated(), picks, metric_info(run))
    assert (info.column, info.name, info.unit) == ("metric", "accuracy", "%")
    assert info.label == "accuracy (%) on the calibration set"
    assert info.teacher == pytest.approx(97.0) and info.teacher_test == pytest.approx(96.03)
    assert info.held_out is not None and len(info.held_out) == 2
    assert info.higher_is_better and not info.log_y


def test_ratio_info_of_a_user_metric_to_minimise(tmp_path, digits_problem):
    r = fake_run(tmp_path / "run", digits_problem, metric=LATENCY_ERROR)
    picks = fake_picks(r)
    points = front_info(r.evaluated(), r.front(), picks)
    info = ratio_info(points, r.evaluated(), picks, metric_info(r))
    assert (info.column, info.name, info.label) == ("metric", "error", "error (dB) on the "
                                                    "calibration set")
    assert info.teacher == pytest.approx(20.0) and info.teacher_test == pytest.approx(20.2)
    assert not info.higher_is_better


def test_ratio_info_without_a_metric_is_ratio_vs_divergence(bare_run):
    picks = fake_picks(bare_run)
    evaluated = bare_run.evaluated()
    points = front_info(evaluated, bare_run.front(), picks)
    info = ratio_info(points, evaluated, picks, None, divergence="kl")
    assert info.column == "divergence" and info.name == "KL divergence"
    assert info.label.startswith("KL divergence (nats) on the calibration set")
    assert info.teacher is None and info.teacher_test is None and info.zoom is None
    assert info.held_out is not None and np.allclose(
        info.held_out["test"], info.held_out["calibration"] * 1.2)
    assert info.log_y  # the made-up divergences span more than two decades
    assert not info.higher_is_better


def test_layer_info_holds_the_picks_genes(run):
    evaluated = run.evaluated()
    picks = fake_picks(run)
    layers = layer_info(picks, evaluated, NAMES)
    assert list(layers.sparsity.columns) == ["hidden.0", "hidden.1", "out"]
    assert layers.sparsity.shape == (2, 3) and layers.bits.shape == (2, 3)
    first = evaluated.set_index("id").loc[int(picks["id"].iloc[0])]
    assert np.allclose(layers.sparsity.iloc[0], [first[f"s:{n}"] for n in NAMES])
    assert layers.bits.iloc[0].tolist() == [int(first[f"b:{n}"]) for n in NAMES]
    assert layers.sparsity.index[1] == f"#{int(picks['id'].iloc[1])}: knee; weights 1,1,4 (asf)"


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plot_run_writes_every_figure(run):
    picks = fake_picks(run)
    paths = plot_run(run.path, picks)
    names = [p.name for p in paths]
    assert names == ["front_pairs.png", RATIO_FIGURE, "pick_layers.png", "hv_history.png"]
    assert RATIO_FIGURE == "ratio_metric.png"
    for p in paths:
        assert p.parent == run.path / "plots"
        assert p.stat().st_size > 20_000  # a real figure, not an empty canvas
        w, h = _png_size(p)
        assert w > 600 and h > 300
    assert not list((run.path / "plots").glob("*.tmp*"))


def test_plot_run_without_a_metric(bare_run):
    paths = plot_run(bare_run.path, fake_picks(bare_run))
    assert [p.name for p in paths] == [
        "front_pairs.png", RATIO_FIGURE, "pick_layers.png", "hv_history.png"]
    assert all(p.stat().st_size > 20_000 for p in paths)


def test_plot_run_reads_picks_csv_and_skips_heatmap_without_picks(run):
    names = [p.name for p in plot_run(run.path)]
    assert "pick_layers.png" not in names and "front_pairs.png" in names
    atomic_write_csv(run.file("picks.csv"), fake_picks(run))
    assert "pick_layers.png" in [p.name for p in plot_run(run.path)]


def test_metric_zoom_band_covers_picks_and_teacher(run):
    evaluated, front = run.evaluated(), run.front()
    info = front_info(evaluated, front)
    assert metric_zoom(info, 97.0) is None  # no picks, no zoom
    # Picks near the teacher, far above the worst solutions: a narrow band.
    top = front.sort_values("metric", ascending=False)["id"].iloc[:2].tolist()
    picks = pd.DataFrame({"id": top, "rule": ["knee", "knee"]})
    info = front_info(evaluated, front, picks)
    held = pd.DataFrame({"id": top, "ratio": 1.0, "calibration": 96.0, "test": [95.0, 94.0]})
    lo, hi = metric_zoom(info, 97.0, held, teacher_test=96.5)
    assert lo < 94.0 and 97.0 < hi <= 100.5  # a percentage: clamped to its range
    assert hi - lo < 0.6 * (info["metric"].max() - info["metric"].min())


def test_metric_zoom_of_a_metric_in_its_own_units(tmp_path, digits_problem):
    """A metric in [0, 1]: no point-sized margin (it would cover the whole range) and no
    clamp to 100."""
    r = fake_run(tmp_path / "run", digits_problem, metric=AGREEMENT)
    evaluated, front = r.evaluated(), r.front()
    top = front.sort_values("metric", ascending=False)["id"].iloc[:2].tolist()
    info = front_info(evaluated, front, pd.DataFrame({"id": top, "rule": ["knee", "knee"]}))
    vals = info.loc[info["picked"], "metric"]
    band = metric_zoom(info, 1.0, percent=False)
    assert band is not None
    lo, hi = band
    assert lo < vals.min() and hi > 1.0 and hi < 1.1
    assert hi - lo < 0.6 * (info["metric"].max() - info["metric"].min())
