"""Figures of a run: the info frames they draw (which points are dominated, which are picks,
the picks' genes) and that plot_run writes real PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moecomp.plots import (
    front_info,
    held_out_info,
    layer_info,
    pick_labels,
    plot_run,
    teacher_accuracy,
)
from moecomp.runs import RunFolder, atomic_write_csv, solutions_frame

NAMES = ["hidden.0.weight", "hidden.1.weight", "out.weight"]


def fake_run(path: Path, problem) -> RunFolder:
    """A run folder of 60 made-up solutions (no model needed): metrics consistent enough
    to draw, front = the non-dominated rows."""
    from moecomp.search.front import nondominated

    rng = np.random.default_rng(0)
    n = 60
    s = rng.uniform(0, 0.95, (n, 3)).round(2)
    b = rng.integers(1, 9, (n, 3))
    density = 1 - s.mean(1)
    bits = b.mean(1).astype(float)
    div = np.exp(-4 * density) * np.exp(-bits) * 20 * rng.lognormal(0, 0.3, n)
    acc = np.clip(97.0 - 30 * div, 10, 97)
    m = {
        "density": density,
        "bits": bits,
        "divergence": div,
        "size_bytes": 1000 + 8000 * density * bits / 8,
        "ratio": 68000 / (1000 + 8000 * density * bits / 8),
        "accuracy": acc,
        "acc_drop": 97.0 - acc,
    }
    df = solutions_frame(np.arange(n), 0, NAMES, s, b, m)
    df["gen"] = np.arange(n) // 20
    run = RunFolder(path)
    run.write_problem(problem)
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
    front = run.front().sort_values("ratio", ascending=False)
    ids = front["id"].iloc[[0, 1, 1]].tolist()  # the second is chosen by two rules
    picks = run.evaluated().set_index("id").loc[ids].reset_index()
    picks.insert(1, "rule", ["best ratio within acc_drop <= 5", "knee", "weights 1,1,4 (asf)"])
    if held_out:
        picks["test_acc"] = picks["accuracy"] - 1.0
        picks["teacher_test_acc"] = 96.0
    return picks


@pytest.fixture
def run(tmp_path, digits_problem) -> RunFolder:
    return fake_run(tmp_path / "run", digits_problem)


def test_pick_labels_merge_rules_of_one_solution_and_drop_bounds():
    picks = pd.DataFrame(
        {
            "id": [3, 7, 7],
            "rule": ["best ratio within acc_drop <= 1", "knee", "weights 1,1,1 (asf)"],
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


def test_teacher_accuracy_and_held_out_info(run):
    assert teacher_accuracy(run.evaluated()) == pytest.approx(97.0)
    picks = fake_picks(run)
    held = held_out_info(picks)
    assert held is not None and held["id"].is_unique and len(held) == 2
    assert held_out_info(fake_picks(run, held_out=False)) is None


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
    assert names == ["front_pairs.png", "ratio_accuracy.png", "pick_layers.png", "hv_history.png"]
    for p in paths:
        assert p.parent == run.path / "plots"
        assert p.stat().st_size > 20_000  # a real figure, not an empty canvas
        w, h = _png_size(p)
        assert w > 600 and h > 300
    assert not list((run.path / "plots").glob("*.tmp*"))


def test_plot_run_reads_picks_csv_and_skips_heatmap_without_picks(run):
    names = [p.name for p in plot_run(run.path)]
    assert "pick_layers.png" not in names and "front_pairs.png" in names
    atomic_write_csv(run.file("picks.csv"), fake_picks(run))
    assert "pick_layers.png" in [p.name for p in plot_run(run.path)]


def test_accuracy_zoom_band_covers_picks_and_teacher(run):
    from moecomp.plots import accuracy_zoom

    evaluated, front = run.evaluated(), run.front()
    info = front_info(evaluated, front)
    assert accuracy_zoom(info, 97.0) is None  # no picks, no zoom
    # Picks near the teacher, far above the worst solutions: a narrow band.
    top = front.sort_values("accuracy", ascending=False)["id"].iloc[:2].tolist()
    picks = pd.DataFrame({"id": top, "rule": ["knee", "knee"]})
    info = front_info(evaluated, front, picks)
    held = pd.DataFrame(
        {
            "id": top,
            "ratio": 1.0,
            "accuracy": 96.0,
            "test_acc": [95.0, 94.0],
            "teacher_test_acc": 96.5,
        }
    )
    lo, hi = accuracy_zoom(info, 97.0, held)
    assert lo < 94.0 and 97.0 < hi <= 100.5
    assert hi - lo < 0.6 * (info["accuracy"].max() - info["accuracy"].min())
