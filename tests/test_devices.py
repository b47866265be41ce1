"""``--device``: one setting (auto, cpu, cuda, cuda:N) for relevance, evaluation,
reconstruction and fine-tuning. On the CPU, ``auto`` and ``cpu`` give byte-identical run
files; CUDA asked for where torch sees none is a one-line error; the CUDA checks run where
torch sees a GPU."""

from __future__ import annotations

import pickle

import pytest
import torch

from moecomp.codec import read_mcz
from moecomp.errors import ConfigError
from moecomp.evaluate.options import EvalOptions, check_device, resolve_device
from moecomp.refine import refine
from moecomp.search import run_search

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device here")


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "CPU", "cuda:x", 0, None])
def test_a_bad_device_setting_names_the_field_and_the_allowed_values(bad):
    with pytest.raises(ConfigError, match=r"--device: must be auto, cpu, cuda or cuda:N"):
        check_device(bad, field="--device")
    with pytest.raises(ConfigError, match=r"options\.device"):
        EvalOptions(device=bad)  # type: ignore[arg-type]


def test_auto_is_cuda_when_present_else_the_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")


def test_cuda_without_cuda_names_the_field(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device: cuda:1 asked for, but torch sees no CUDA"):
        resolve_device("cuda:1", field="device")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("command", ["search", "study", "refine", "compress"])
def test_cli_device_cuda_without_cuda_is_one_line(cli, one_line_error, monkeypatch, tmp_path,
                                                  repo, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    problem = str(repo / "problems" / "digits-mlp.toml")
    args = {
        "search": ["search", problem, "--out", str(tmp_path / "r")],
        "study": ["study", str(tmp_path / "study.toml")],
        "refine": ["refine", str(tmp_path), "--solution", "1", "--merge-bins"],
        "compress": ["compress", problem, "--max-drop", "1", "--out", str(tmp_path / "c")],
    }[command]
    code, _, err = cli(*args, "--device", "cuda")
    one_line_error(code, err, "--device", "torch sees no CUDA device")
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()
    code, _, err = cli(*args, "--device", "tpu")
    one_line_error(code, err, "--device", "must be auto, cpu, cuda or cuda:N")


def _search(tmp_path, name, digits_problem, digits_target, device):
    out = tmp_path / name
    run_search(digits_problem, out, budget=40, params={"seed": 3, "pop_size": 8},
               progress=False, plots=False, target=digits_target, device=device)
    return out


def test_cpu_and_auto_give_byte_identical_runs_on_the_cpu(tmp_path, monkeypatch,
                                                           digits_problem, digits_target):
    # on a GPU machine "auto" would be CUDA: hide it, so this test runs everywhere
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a = _search(tmp_path, "cpu", digits_problem, digits_target, "cpu")
    b = _search(tmp_path, "auto", digits_problem, digits_target, "auto")
    for name in ("evaluated.csv", "front.csv", "screened.csv", "problem.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert '"device": "cpu"' in (b / "search.json").read_text()


def test_a_device_view_of_a_target_moves_teacher_and_data_only(digits_target):
    t = digits_target
    assert t.on_device("cpu") is t
    view = t.on_device("meta")  # a device with no data: checks the plumbing on any machine
    assert view is t.on_device("meta") and view is not t
    assert all(p.device.type == "meta" for p in view.teacher.parameters())
    assert all(p.device.type == "cpu" for p in t.teacher.parameters())
    assert view.calib.inputs.device.type == "meta" and view.teacher_out.device.type == "meta"
    assert view.val is not None and view.val.labels is not None
    assert view.val.labels.device.type == "meta"
    assert view.layers is t.layers and view.divergence == t.divergence
    assert t.calib.inputs.device.type == "cpu" and t.teacher_out.device.type == "cpu"
    assert "_views" not in pickle.loads(pickle.dumps(t)).__dict__


@needs_cuda
def test_a_cuda_search_runs_and_matches_the_cpu_layout(tmp_path, digits_problem,
                                                       digits_target):
    a = _search(tmp_path, "cpu", digits_problem, digits_target, "cpu")
    b = _search(tmp_path, "cuda", digits_problem, digits_target, "cuda")
    import pandas as pd

    ea, eb = pd.read_csv(a / "evaluated.csv"), pd.read_csv(b / "evaluated.csv")
    assert list(ea.columns) == list(eb.columns) and len(ea) == len(eb)
    # sums round differently on the GPU; where the two searches evaluated the same genes the
    # objectives agree closely
    genes = [c for c in ea.columns if c.startswith(("s:", "b:"))]
    both = ea.merge(eb, on=genes, suffixes=("_cpu", "_cuda"))
    assert len(both) > 0
    assert torch.allclose(torch.tensor(both["divergence_cpu"].to_numpy()),
                          torch.tensor(both["divergence_cuda"].to_numpy()),
                          rtol=1e-3, atol=1e-6)
    assert '"device": "cuda' in (b / "search.json").read_text()


@needs_cuda
def test_refine_on_cuda_writes_the_cpu_layout(run_ctx):
    kw = dict(reconstruct=True, finetune_epochs=1, merge=True, calibration=256,
              progress=False)
    on_cpu = refine(run_ctx, 1, device="cpu", **kw)
    on_gpu = refine(run_ctx, 1, device="cuda", **kw)
    a, b = read_mcz(on_cpu.path), read_mcz(on_gpu.path)
    assert a.state_dict.keys() == b.state_dict.keys()
    for k, v in a.state_dict.items():
        w = b.state_dict[k]
        assert w.device.type == "cpu" and w.dtype == v.dtype and w.shape == v.shape, k
    assert [o.step for o in on_cpu.steps] == [o.step for o in on_gpu.steps]
    assert on_gpu.val_metric == pytest.approx(on_cpu.val_metric, abs=2.0)
