"""The whole command-line path on a user's model: two keyword inputs, a pooled embedding out,
no labels, a user divergence and a label-free metric, factories next to the problem file.
Every command runs through ``moecomp.cli.main`` as a user's shell would (exit codes, one-line
errors)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import onnx
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, load_model

USERPKG = Path(__file__).parent / "userpkg"

PROBLEM = """name = "user-encoder"
[model]
factory = "usermodels:encoder"
[data]
factory = "userdata:token_splits"
batch_size = 16
[layers]
types = ["Linear", "Embedding"]
[objectives]
divergence = "userdata:one_minus_cos"
output = "pooled"
metric = "userdata:neighbour_agreement"
metric_name = "neighbour agreement"
metric_unit = "%"
[search]
pop_size = 12
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("proj")
    for f in USERPKG.glob("*.py"):
        shutil.copy(f, folder)
    (folder / "problem.toml").write_text(PROBLEM)
    return folder


@pytest.fixture(scope="module")
def searched(project):
    """A search on the user problem (run directly: the cli fixtures are per test)."""
    from moecomp.search import run_search

    run = project / "runs" / "r1"
    run_search(project / "problem.toml", run, budget=96, progress=False, plots=False)
    return run


def test_search_records_what_the_target_is(searched):
    info = json.loads((searched / "target.json").read_text())
    assert info["metric"]["name"] == "neighbour agreement" and info["labels"] is False
    assert info["inputs"].startswith("'input_ids' (1, 8) int64, 'attention_mask'")
    assert info["divergence"] == "userdata:one_minus_cos" and info["output"] == "pooled"
    problem = json.loads((searched / "problem.json").read_text())
    assert problem["model"]["factory"] == "usermodels:encoder"
    assert Path(problem["folder"]) == searched.parents[1]
    front = pd.read_csv(searched / "front.csv")
    assert front["metric"].between(0, 100).all() and (front["metric_drop"] >= 0).all()


def test_pick_refine_export_decode_inspect(searched, cli_out, tmp_path):
    code, out = cli_out("pick", str(searched), "--max-drop", "25", "--no-plots")
    assert code == 0, out
    assert "neighbour agreement; drops from the teacher" in out
    picks = pd.read_csv(searched / "picks.csv")
    sid = str(int(picks["id"].iloc[0]))
    assert {"val_divergence", "val_metric", "test_metric"} <= set(picks.columns)

    # reconstruction and distillation with the user's divergence; no labels anywhere
    code, out = cli_out("refine", str(searched), "--solution", sid, "--reconstruct",
                    "--calibration", "32", "--finetune-epochs", "1", "--no-merge-bins")
    assert code == 0, out
    assert "neighbour agreement val" in out and "divergence val" in out
    refined = pd.read_csv(searched / "refined.csv")
    assert refined["parent"].astype(str).iloc[-1] == sid
    key = refined["key"].iloc[-1]

    mcz = tmp_path / "exp" / f"{key}.mcz"
    code, out = cli_out("export", str(searched), "--solution", key, "--out", str(mcz),
                    "--safetensors", "--onnx")
    assert code == 0, out
    assert "decoded file reproduces the solution's outputs exactly" in out
    graph = onnx.load(str(mcz.with_suffix(".onnx"))).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["pooled"]

    sys.path.insert(0, str(searched.parents[1]))
    try:
        import usermodels
    finally:
        sys.path.pop(0)
    dense = usermodels.TinyEncoder()
    load_model(dense, str(mcz.with_suffix(".safetensors")))

    out_st = tmp_path / "decoded.safetensors"
    code, out = cli_out("decode", str(mcz), "--out", str(out_st))
    assert code == 0, out
    decoded = load_file(str(out_st))
    for name, t in dense.state_dict().items():
        assert torch.equal(decoded[name].to(t.dtype), t), name
    code, out = cli_out("inspect", str(mcz))
    assert code == 0 and "tok.weight" in out


def test_compare_and_report_read_the_users_metric(searched, cli_out):
    code, out = cli_out("compare", str(searched), "--budget", "120", "--targets",
                    "0.5,0.8", "--no-progress", "--no-plot")
    assert code == 0, out
    assert "neighbour agreement" in out
    code, out = cli_out("report", str(searched), "--no-plots")
    assert code == 0, out
    text = (searched / "report.md").read_text()
    assert "neighbour agreement" in text and "accuracy" not in text.lower()


def test_a_run_whose_factory_is_gone_says_so(searched, cli_out, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(searched.parents[1], moved)
    (moved / "usermodels.py").rename(moved / "gone.py")
    problem = json.loads((moved / "runs" / "r1" / "problem.json").read_text())
    problem["folder"] = str(moved)
    (moved / "runs" / "r1" / "problem.json").write_text(json.dumps(problem))
    code, out = cli_out("export", str(moved / "runs" / "r1"), "--solution", "0")
    assert code == 2
    assert out.strip().count("\n") == 0, out
    assert "model.factory" in out and "'usermodels'" in out and "PYTHONPATH" in out


def test_a_changed_teacher_is_refused(searched, cli_out, tmp_path):
    moved = tmp_path / "changed"
    shutil.copytree(searched.parents[1], moved)
    src = (moved / "usermodels.py").read_text()
    (moved / "usermodels.py").write_text(src.replace("_seeded(TinyEncoder(), 0)",
                                                     "_seeded(TinyEncoder(), 9)"))
    problem = json.loads((moved / "runs" / "r1" / "problem.json").read_text())
    problem["folder"] = str(moved)
    (moved / "runs" / "r1" / "problem.json").write_text(json.dumps(problem))
    code, out = cli_out("pick", str(moved / "runs" / "r1"), "--knee", "--no-plots")
    assert code == 2 and "is not the one this run searched" in out, out
