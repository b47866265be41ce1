"""The three worked examples through the whole command line, as a user runs them: search ->
pick -> refine -> export (safetensors + ONNX) -> decode -> inspect -> compare -> report, each
through ``moecomp.cli.main`` in-process (exit codes, printed lines), at a tiny budget.

Each test copies its example's folder into ``tmp_path`` (the factories are imported from the
problem file's folder, as for a user's project) and points the copied problem file at the
session's trained teacher. Where the example's splits are too big for a fast test (10,000
FashionMNIST test images; 2,048 token sequences of 48), a small factory module written next to
them (``smallsplits.py``) calls the example's own data factory and keeps the first samples of
each split (and, for the encoder, sequences of at most 16 tokens, cut to 16 columns). The
decoded file is then loaded into a fresh model of the example's own factory and measured here,
with plain torch, against the teacher: its divergence and metric must be the ones export
reported."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from moecomp.codec import read_mcz
from moecomp.factories import call, resolve
from moecomp.fold import apply_folds
from moecomp.target import load_state

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def ok(cli: Callable[..., tuple[int, str, str]], *args: str) -> str:
    """``moecomp ARGS`` through the ``cli`` fixture (tests/conftest.py): exit 0, its output."""
    code, stdout, stderr = cli(*args)
    out = stdout + stderr
    assert code == 0, f"moecomp {' '.join(args)} exited {code}:\n{out}"
    return out


SMALL_SPLITS = '''"""The example's splits (data:splits), each cut to its first samples."""
import data

SIZES = {sizes!r}
LENGTH = {length!r}  # keyword inputs: sequences of at most LENGTH tokens, cut to LENGTH


def cut(inputs, n):
    if isinstance(inputs, dict):
        keep = inputs["attention_mask"].sum(1) <= LENGTH if LENGTH else slice(None)
        return {{k: v[keep][:n, :LENGTH] for k, v in inputs.items()}}
    return inputs[:n]


def splits():
    return {{k: (cut(x, SIZES[k]), None if y is None else y[:SIZES[k]])
            for k, (x, y) in data.splits().items()}}
'''


def project(example: str, tmp_path: Path, teacher: Path, *, budget: int, pop_size: int,
            calibration: int, sizes: dict[str, int] | None = None,
            length: int | None = None) -> Path:
    """The example's folder copied into ``tmp_path``, its problem file pointed at ``teacher``
    and shrunk to ``budget`` evaluations of ``pop_size`` on ``calibration`` samples; with
    ``sizes``, the data factory is ``smallsplits:splits`` (:data:`SMALL_SPLITS`)."""
    folder = tmp_path / example
    shutil.copytree(EXAMPLES / example, folder,
                    ignore=shutil.ignore_patterns("__pycache__", "problem-*.toml"))
    problem = folder / "problem.toml"
    text = problem.read_text()
    edits = [(r'(?m)^weights = ".*?"', f'weights = "{teacher}"'),
             (r"(?m)^budget = \d+", f"budget = {budget}"),
             (r"(?m)^pop_size = \d+", f"pop_size = {pop_size}"),
             (r"(?m)^\[data\]\n", f"[data]\ncalibration = {calibration}\n")]
    if sizes is not None:
        (folder / "smallsplits.py").write_text(SMALL_SPLITS.format(sizes=sizes, length=length))
        edits.append((r'(?m)^factory = "data:splits"', 'factory = "smallsplits:splits"'))
    for pattern, new in edits:
        text, n = re.subn(pattern, new, text)
        assert n == 1, pattern
    problem.write_text(text)
    return problem


def factory(problem: Path, ref: str) -> Any:
    """The copied project's factory ``ref`` called, imported from its folder as moecomp does."""
    return call(ref, "test", folder=problem.parent)


def run_path(cli: Callable[..., tuple[int, str, str]], problem: Path, *, pick: list[str],
             refine: list[str]) -> dict[str, Any]:
    """search, pick, refine, export, decode, inspect, compare, report on ``problem``; returns
    the run folder, the printed outputs and the exported files. compare runs the DE baseline
    at one target sparsity with the least budget it accepts (9 evaluations per layer)."""
    run = problem.parent / "runs" / "r1"
    out: dict[str, Any] = {"run": run}
    out["search"] = ok(cli, "search", str(problem), "--out", str(run), "--no-progress")
    front = pd.read_csv(run / "front.csv")
    assert len(front) >= 1 and (front["divergence"] >= 0).all()

    out["pick"] = ok(cli, "pick", str(run), *pick, "--no-plots")
    picks = pd.read_csv(run / "picks.csv")
    assert {"val_divergence", "test_divergence"} <= set(picks.columns)
    sid = str(int(picks["id"].iloc[0]))

    out["refine"] = ok(cli, "refine", str(run), "--solution", sid, *refine)
    refined = pd.read_csv(run / "refined.csv")
    assert refined["parent"].astype(str).iloc[-1] == sid
    key = str(refined["key"].iloc[-1])
    assert (run / "refined" / f"{key}.mcz").is_file()

    mcz = problem.parent / "exp" / f"{key}.mcz"
    out["export"] = ok(cli, "export", str(run), "--solution", key, "--out", str(mcz),
                       "--safetensors", "--onnx")
    assert "decoded file reproduces the solution's outputs exactly" in out["export"]
    for suffix in (".mcz", ".safetensors", ".onnx", ".plan.json"):
        assert mcz.with_name(mcz.stem + suffix).is_file(), suffix
    out["exported"] = json.loads(mcz.with_name(mcz.stem + ".export.json").read_text())
    assert out["exported"]["ratio"] > 1.0
    out["onnx_inputs"] = [i.name for i in onnx.load(str(mcz.with_suffix(".onnx"))).graph.input]

    decoded = problem.parent / "decoded.safetensors"
    ok(cli, "decode", str(mcz), "--out", str(decoded))
    out["decoded"] = load_file(str(decoded))
    # the dense file export wrote and the one decode wrote hold the same tensors
    dense = load_file(str(mcz.with_suffix(".safetensors")))
    for name, t in out["decoded"].items():
        assert torch.equal(t.to(dense[name].dtype), dense[name]), name
    out["meta"] = read_mcz(mcz).meta
    out["inspect"] = ok(cli, "inspect", str(mcz))

    n_layers = sum(c.startswith("s:") for c in front.columns)
    out["compare"] = ok(cli, "compare", str(run), "--budget", str(9 * n_layers),
                        "--targets", "0.5", "--no-progress", "--no-plot")
    ok(cli, "report", str(run), "--no-plots")
    out["report"] = (run / "report.md").read_text()
    return out


def student(model: torch.nn.Module, result: dict[str, Any]) -> torch.nn.Module:
    """``model`` (fresh from the example's factory) with the decoded weights: BatchNorm folded
    as the file records first, then the state loaded (ties filled)."""
    apply_folds(model, result["meta"]["folded"])
    load_state(model, result["decoded"])
    return model.eval()


def batched(model: torch.nn.Module, inputs: Any, batch: int = 1024) -> torch.Tensor:
    """The model's outputs on ``inputs`` (a tensor or a dict of keyword tensors)."""
    n = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)
    parts = []
    with torch.no_grad():
        for i in range(0, n, batch):
            if isinstance(inputs, dict):
                parts.append(model(**{k: v[i:i + batch] for k, v in inputs.items()}))
            else:
                parts.append(model(inputs[i:i + batch]))
    return torch.cat(parts)


def mean_kl(t: torch.Tensor, s: torch.Tensor) -> float:
    """Mean KL(teacher || student) of the softmax, in nats: torch's own ``kl_div``."""
    return float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                          reduction="batchmean"))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(-1) == labels).float().mean())


def teacher_and_student(problem: Path, model_ref: str, teacher: Path,
                        result: dict[str, Any]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The example's teacher and the decoded student, each a fresh model of its factory."""
    t = factory(problem, model_ref)
    t.load_state_dict(load_file(str(teacher)))
    return t.eval(), student(factory(problem, model_ref), result)


def test_convbn_through_the_cli(cli, tmp_path, convbn_teacher):
    problem = project("convbn", tmp_path, convbn_teacher, budget=48, pop_size=8,
                      calibration=128,
                      sizes={"calibration": 512, "validation": 1000, "test": 1000})
    r = run_path(cli, problem, pick=["--knee", "--max-knees", "1"],
                 refine=["--reconstruct", "--calibration", "128", "--merge-bins",
                         "--tolerance", "0.5"])
    assert "accuracy" in r["pick"] and "accuracy val" in r["refine"]
    assert r["onnx_inputs"] == ["input"]
    # every BatchNorm was folded into its convolution (which had no bias): no BatchNorm
    # tensor is stored, and the decoded state loads into the folded model only
    assert len(r["meta"]["folded"]) == 3 and all(f["bias_added"] for f in r["meta"]["folded"])
    assert not any("running_mean" in k for k in r["decoded"])

    teacher, decoded = teacher_and_student(problem, "net:build", convbn_teacher, r)
    x, y = factory(problem, "smallsplits:splits")["test"]
    assert len(y) == 1000
    t, s = batched(teacher, x), batched(decoded, x)
    exp = r["exported"]
    assert mean_kl(t, s) == pytest.approx(exp["test_divergence"], rel=1e-3, abs=1e-6)
    assert accuracy(s, y) == pytest.approx(exp["test_metric"], abs=0.11)
    assert accuracy(t, y) == pytest.approx(exp["teacher_test_metric"], abs=0.11)
    assert "accuracy" in r["report"].lower()


def test_dictinput_through_the_cli(cli, tmp_path, dictinput_teacher):
    problem = project("dictinput", tmp_path, dictinput_teacher, budget=48, pop_size=8,
                      calibration=256)
    r = run_path(cli, problem, pick=["--max-drop", "5"],
                 refine=["--finetune-epochs", "1", "--calibration", "256"])
    assert "accuracy" in r["pick"] and "accuracy" in r["compare"].lower()
    assert r["onnx_inputs"] == ["pixels", "stats"]
    assert r["meta"]["folded"] == []

    teacher, decoded = teacher_and_student(problem, "model:build", dictinput_teacher, r)
    inputs, labels = factory(problem, "data:splits")["test"]
    t, s = batched(teacher, inputs), batched(decoded, inputs)
    exp = r["exported"]
    assert mean_kl(t, s) == pytest.approx(exp["test_divergence"], rel=1e-3, abs=1e-6)
    assert accuracy(s, labels) == pytest.approx(exp["test_metric"], abs=0.3)


# The teacher's training (set-up, ~1 CPU minute) counts against the item's time limit too;
# on a busy 2-core machine the two took 260 s, close to the default 300.
@pytest.mark.timeout(600)
def test_transformer_through_the_cli(cli, tmp_path, transformer_teacher):
    problem = project("transformer", tmp_path, transformer_teacher, budget=32, pop_size=8,
                      calibration=32, sizes={"calibration": 48, "validation": 48, "test": 48},
                      length=16)
    r = run_path(cli, problem, pick=["--max-divergence", "0.5"],
                 refine=["--finetune-epochs", "1"])
    # the label-free metric names every table; accuracy appears nowhere
    assert "neighbour agreement; drops from the teacher" in r["pick"]
    assert "neighbour agreement val" in r["refine"] and "divergence val" in r["refine"]
    assert "neighbour agreement" in r["compare"]
    assert "neighbour agreement" in r["report"] and "accuracy" not in r["report"].lower()
    assert r["onnx_inputs"] == ["input_ids", "attention_mask"]
    info = json.loads((r["run"] / "target.json").read_text())
    assert info["labels"] is False and info["divergence"] == "cosine"
    # token and position embeddings are compressed like the Linear layers
    front = pd.read_csv(r["run"] / "front.csv")
    assert {"s:tok.weight", "s:pos.weight"} <= set(front.columns)

    teacher, decoded = teacher_and_student(problem, "encoder:small", transformer_teacher, r)
    inputs, labels = factory(problem, "smallsplits:splits")["test"]
    assert labels is None and inputs["input_ids"].shape == (48, 16)
    t, s = batched(teacher, inputs), batched(decoded, inputs)
    exp = r["exported"]
    div = float((1 - F.cosine_similarity(t, s, dim=-1)).mean())
    assert div == pytest.approx(exp["test_divergence"], rel=1e-3, abs=1e-6)
    agreement = resolve("metrics:neighbour_agreement", "test", folder=problem.parent)
    assert agreement(t, s, None) == pytest.approx(exp["test_metric"], abs=1e-6)
    assert exp["teacher_test_metric"] == 100.0
