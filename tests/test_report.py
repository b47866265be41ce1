"""The run report: its sections, the optional parts (picks, refined, exports, DE comparison),
the self-contained HTML, and the table helpers."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from moecomp.report import (
    DROP_LEVELS,
    REPORT_HTML,
    markdown_table,
    metric_headers,
    tolerance_levels,
    tolerance_table,
    write_report,
)
from moecomp.runs import MetricInfo, RunFolder, atomic_write_csv, solutions_frame

NAMES = ["hidden.0.weight", "hidden.1.weight", "out.weight"]


@pytest.fixture
def run(tmp_path, digits_problem) -> RunFolder:
    """A run folder of 30 made-up solutions (no model needed), written before target.json
    existed (accuracy in % is then read from its metric column)."""
    rng = np.random.default_rng(1)
    n = 30
    s = rng.uniform(0, 0.9, (n, 3)).round(2)
    b = rng.integers(1, 9, (n, 3))
    density = 1 - s.mean(1)
    bits = b.mean(1).astype(float)
    div = np.exp(-4 * density - bits) * 20
    acc = np.clip(97.0 - 30 * div, 10, 97)
    size = 1000 + 1000 * density * bits
    m = {
        "density": density,
        "bits": bits,
        "divergence": div,
        "size_bytes": size,
        "ratio": 68000 / size,
        "metric": acc,
        "metric_drop": 97.0 - acc,
    }
    df = solutions_frame(np.arange(n), 1, NAMES, s, b, m)
    df = df.rename(columns={"metric": "accuracy", "metric_drop": "acc_drop"})  # old names
    r = RunFolder(tmp_path / "run")
    r.write_problem(digits_problem)
    atomic_write_csv(r.file("evaluated.csv"), df)
    atomic_write_csv(r.file("front.csv"), df.iloc[:25])
    atomic_write_csv(
        r.file("hv.csv"),
        pd.DataFrame(
            {"gen": [0, 1], "n_evals": [10, 30], "hv": [0.25, 0.5123], "elapsed_s": [0.1, 0.2]}
        ),
    )
    r.write_status({"status": "done", "algorithm": "nsga2", "n_evals": n, "elapsed_s": 1.5})
    return r


@pytest.fixture
def bare_run(run) -> RunFolder:
    """The same run for a target without a metric: metric columns NaN, target.json says so."""
    for name in ("evaluated.csv", "front.csv"):
        df = run.table(name)
        df["metric"] = df["metric_drop"] = np.nan
        atomic_write_csv(run.file(name), df)
    run.write_target_info({"divergence": "kl", "metric": None})
    return run


def sections(text: str) -> list[str]:
    return re.findall(r"^## (.+)$", text, flags=re.M)


def test_report_of_a_bare_run(run):
    md_path = write_report(run.path)
    assert md_path == run.path / "report.md"
    text = md_path.read_text()
    assert text.startswith("# moecomp report: digits-mlp")
    assert sections(text) == ["Problem", "Search", "Front", "Picks", "Figures"]
    assert "**Final hypervolume: 0.5123** after 30 evaluations" in text
    assert "No picks yet" in text
    assert "25 non-dominated solutions of 30 evaluated" in text
    # The front table holds the 20 of best ratio, best first.
    front_rows = re.findall(r"^\| (\d+) \| 1 \|", text, flags=re.M)
    best = run.front().sort_values("ratio", ascending=False)["id"].head(20).tolist()
    assert [int(i) for i in front_rows] == best
    assert "| task metric | accuracy (%), higher is better |" in text
    assert "Accuracy and its drop from the teacher (points) are on the calibration set." in text
    assert "| max accuracy drop (points) | id | ratio | density | bits | accuracy (%) | " \
        "accuracy drop (points) |" in text
    assert "| id | gen | density | bits | divergence | size_bytes | ratio | accuracy (%) | " \
        "accuracy drop (points) |" in text
    assert "Compression ratio vs accuracy on the calibration set" in text
    for name in ("front_pairs.png", "ratio_metric.png", "hv_history.png"):
        assert f"(plots/{name})" in text and (run.path / "plots" / name).is_file()


def test_report_with_picks_refined_exports_and_comparison(run):
    front = run.front()
    picks = front.iloc[[0, 3]].copy()
    picks.insert(1, "rule", ["knee", "weights 1,1,4 (asf)"])
    picks["val_metric"], picks["val_drop"] = 95.0, 1.5
    picks["test_metric"], picks["test_drop"] = 94.0, 2.0
    picks["teacher_val_metric"], picks["teacher_test_metric"] = 96.5, 96.0
    atomic_write_csv(run.file("picks.csv"), picks)
    atomic_write_csv(
        run.file("refined.csv"),
        pd.DataFrame(
            [
                {
                    "key": "r1",
                    "parent": str(int(picks["id"].iloc[0])),
                    "finetune_epochs": 2,
                    "levels_before": json.dumps({"a": 8}),
                    "levels_after": json.dumps({"a": 5}),
                    "val_metric": 95.5,
                    "test_metric": 95.1,
                    "file_bytes": 4321,
                    "ratio": 15.7,
                    "path": str(run.path / "refined" / "r1.mcz"),
                }
            ]
        ),
    )
    exp = run.path / "exports" / "r1"
    exp.mkdir(parents=True)
    (exp / "r1.mcz").write_bytes(b"x" * 100)
    (exp / "r1.export.json").write_text(
        json.dumps(
            {
                "key": "r1",
                "mcz": str(exp / "r1.mcz"),
                "file_bytes": 100,
                "ratio": 15.7,
                "val_metric": 95.5,
                "test_metric": 95.1,
                "teacher_test_metric": 96.0,
            }
        )
    )
    (run.path / "compare_summary.md").write_text(
        "# Search front vs Directed Evolution baseline\n\n| method | hv |\n|---|---|\n"
        "| search front | 0.51 |\n| DE baseline | 0.33 |\n\n## DE points\n\nnone\n"
    )
    text = write_report(run.path).read_text()
    assert sections(text) == [
        "Problem",
        "Search",
        "Front",
        "Picks",
        "Refined solutions",
        "Exports",
        "Figures",
        "Comparison with the Directed Evolution baseline",
    ]
    assert "Teacher: validation 96.50 %, test 96.00 %." in text
    assert "| knee |" in text and "| weights 1,1,4 (asf) |" in text
    assert "levels_before" not in text  # JSON blobs are left out of the table
    assert "| r1 |" in text and "`exports/r1/r1.mcz` (100 bytes)" in text
    assert "exports/r1/r1.mcz |" in text  # paths shown relative to the run folder
    assert "### Search front vs Directed Evolution baseline" in text  # headings nested
    assert "| DE baseline | 0.33 |" in text
    assert "(plots/pick_layers.png)" in text


def test_html_is_self_contained(run):
    write_report(run.path)
    html = (run.path / REPORT_HTML).read_text()
    assert html.startswith("<!DOCTYPE html>")
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,iVBOR") for s in srcs)
    assert "<table>" in html and "<h2>Front</h2>" in html


def test_markdown_table_formats_and_escapes():
    df = pd.DataFrame(
        {"id": [3], "rule": ["a|b"], "ratio": [12.345], "val_metric": [np.nan], "flag": [True]}
    )
    lines = markdown_table(df).splitlines()
    assert lines[0] == "| id | rule | ratio | val_metric | flag |"
    assert lines[1] == "|---:|---|---:|---:|---|"
    assert lines[2] == "| 3 | a\\|b | 12.3 | - | yes |"


FRONT = pd.DataFrame(
    {
        "id": [1, 2, 3],
        "ratio": [5.0, 10.0, 20.0],
        "density": [0.5, 0.3, 0.1],
        "bits": [4.0, 3.0, 2.0],
        "divergence": [0.01, 0.1, 1.0],
        "metric": [97.0, 96.0, 80.0],
        "metric_drop": [0.2, 1.5, 17.0],
    }
)


def test_tolerance_table_known_answer():
    t = tolerance_table(FRONT, levels=(0.1, 0.5, 2.0, 20.0))
    assert list(t.columns) == ["max_metric_drop", "id", "ratio", "density", "bits", "metric",
                               "metric_drop"]
    assert t["id"].tolist()[1:] == [1, 2, 3]
    assert t.iloc[0][["id", "ratio"]].isna().all()
    d = tolerance_table(FRONT, levels=(0.05, 0.5), column="divergence")
    assert list(d.columns) == ["max_divergence", "id", "ratio", "density", "bits", "divergence"]
    assert d["id"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="column"):
        tolerance_table(FRONT, column="metric")


def test_tolerance_levels_follow_the_metric():
    col, levels, how = tolerance_levels(FRONT, MetricInfo("accuracy", "%", "maximize"))
    assert (col, levels, how) == ("metric_drop", DROP_LEVELS, "points")
    # A metric of unknown scale, or none: quantiles of the front's own values.
    col, levels, how = tolerance_levels(FRONT, MetricInfo("agreement", "", "maximize"))
    assert col == "metric_drop" and "quantiles" in how
    assert levels == tuple(sorted({float(f"{q:.2g}") for q in np.quantile(
        FRONT["metric_drop"], (0.1, 0.25, 0.5, 0.75, 0.9))}))
    col, levels, how = tolerance_levels(FRONT, None)
    assert col == "divergence" and min(levels) >= 0.01 and max(levels) <= 1.0


def test_metric_headers_name_the_metric_and_its_units():
    h = metric_headers(MetricInfo("accuracy", "%", "maximize"))
    assert h["metric"] == "accuracy (%)" and h["metric_drop"] == "accuracy drop (points)"
    assert h["val_metric"] == "val accuracy (%)" and h["test_drop"] == "test drop (points)"
    assert h["teacher_test_metric"] == "teacher test accuracy (%)"
    u = metric_headers(MetricInfo("neighbour agreement", "", "maximize"))
    assert u["metric_drop"] == "neighbour agreement drop" and u["val_drop"] == "val drop"


def test_report_of_a_run_without_a_metric(bare_run):
    front = bare_run.front()
    picks = front.iloc[[0, 3]].copy()
    picks.insert(1, "rule", ["knee", "best ratio within divergence <= 1"])
    picks["val_divergence"], picks["test_divergence"] = 0.02, 0.03
    for c in ("val_metric", "val_drop", "test_metric", "test_drop", "teacher_val_metric",
              "teacher_test_metric"):
        picks[c] = np.nan
    atomic_write_csv(bare_run.file("picks.csv"), picks)
    text = write_report(bare_run.path).read_text()
    assert sections(text) == ["Problem", "Search", "Front", "Picks", "Figures"]
    assert "accuracy" not in text.lower() and "metric_drop" not in text.split("## Picks")[0]
    assert "| task metric | none: solutions are measured by their divergence alone |" in text
    assert "no task metric: solutions are measured by their KL divergence (nats) alone" in text
    assert "per tolerance on the divergence (levels: the 10%, 25%, 50%, 75%, 90% quantiles" in text
    assert "| max KL divergence (nats) | id | ratio | density | bits | divergence |" in text
    assert "| id | gen | density | bits | divergence | size_bytes | ratio |\n" in text
    assert "| calib divergence | val divergence | test divergence |" in text
    assert "Compression ratio vs divergence on the calibration set" in text
    assert (bare_run.path / "plots" / "ratio_metric.png").is_file()


def test_report_of_a_user_metric(run):
    run.write_target_info({"divergence": "kl", "metric": {
        "name": "neighbour agreement", "ref": "enc.metrics:agreement", "direction": "maximize",
        "unit": "", "teacher_calibration": 97.0}})
    run.write_problem(run.problem().replace("objectives", max_metric_drop=2.0))
    text = write_report(run.path, plots=False).read_text()
    assert "| task metric | neighbour agreement, higher is better |" in text
    assert "| constraints | neighbour agreement drop <= 2 |" in text
    assert "Neighbour agreement and its drop from the teacher are on the calibration set." in text
    assert "per tolerance on the neighbour agreement drop (levels: the 10%" in text
    assert "| max neighbour agreement drop | id |" in text
    assert "accuracy" not in text


def test_cli_report_prints_the_paths(run):
    from typer.testing import CliRunner

    from moecomp.cli import app

    res = CliRunner().invoke(app, ["report", str(run.path), "--no-plots"])
    assert res.exit_code == 0, res.output
    out = res.output.replace("\n", "")
    assert str(run.path / "report.md") in out and str(run.path / REPORT_HTML) in out


def test_report_without_plots_shows_the_figure_of_an_older_run(run):
    (run.path / "plots").mkdir()
    (run.path / "plots" / "ratio_accuracy.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    text = write_report(run.path, plots=False).read_text()
    assert "(plots/ratio_accuracy.png)" in text and "drawn by an earlier moecomp" in text
