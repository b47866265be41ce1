"""examples/python_api.py: the Python API path (make_target -> run_search -> RunContext ->
pick -> export_solution -> decode) at a tiny budget."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model

from moecomp.codec import read_mcz
from moecomp.fold import apply_folds

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "python_api.py"


@pytest.fixture(scope="module")
def api():
    spec = importlib.util.spec_from_file_location("moecomp_example_python_api", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_exported_file_decodes_into_a_model_close_to_the_teacher(api, tmp_path):
    r = api.main(tmp_path / "run", budget=48, pop_size=8)
    res = r["result"]
    assert res.mcz.is_file() and res.ratio > 2.0
    # the decoded model is exactly the one export measured on the test split
    assert r["student_accuracy"] == pytest.approx(res.test_metric, abs=1e-4)
    assert r["kl"] == pytest.approx(res.test_divergence, rel=1e-4, abs=1e-7)
    assert r["teacher_accuracy"] == pytest.approx(res.teacher_test_metric, abs=1e-4)
    # ... and close to the teacher: a trained teacher (> 90 %) survives compression
    assert r["teacher_accuracy"] > 90.0 and r["student_accuracy"] > 80.0
    assert 0.0 <= r["kl"] < 0.5
    # the BatchNorm was folded into the first Linear; the dense safetensors loads into the
    # folded model and holds the decoded weights
    folded = read_mcz(res.mcz).meta["folded"]
    assert folded == [{"norm": "1", "into": "0", "bias_added": False}]
    dense = apply_folds(api.build(), folded)
    load_model(dense, str(res.safetensors))
    for name, t in r["student"].state_dict().items():
        assert torch.equal(dense.state_dict()[name], t), name

