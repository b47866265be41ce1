"""examples/convbn: factory, data factory and training, without moecomp's user-model API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn


@pytest.fixture(scope="module")
def ex(example):
    return {m: example("convbn", m) for m in ("net", "data", "train")}


@pytest.fixture(scope="module")
def parts(ex):
    return ex["data"].splits()


def test_factory_is_a_small_conv_net_with_batchnorm(ex):
    model = ex["net"].build()
    n = sum(p.numel() for p in model.parameters())
    assert 90_000 <= n <= 110_000
    kinds = {type(m) for m in model.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.Linear} <= kinds
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)


def test_splits_structure_and_sizes(ex, parts):
    d = ex["data"]
    assert set(parts) == {"calibration", "validation", "test"}
    sizes = {"calibration": d.N_CALIBRATION, "validation": d.N_VALIDATION, "test": 10_000}
    for name, (x, y) in parts.items():
        assert x.shape == (sizes[name], 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (sizes[name],) and y.dtype == torch.int64
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert set(y.unique().tolist()) == set(range(10))


def test_validation_is_held_out_from_training(ex):
    idx = ex["data"].split_indices(60_000)
    assert len(np.intersect1d(idx["validation"], idx["train"])) == 0
    assert len(idx["validation"]) + len(idx["train"]) == 60_000
    assert np.isin(idx["calibration"], idx["train"]).all()
    assert len(np.unique(idx["calibration"])) == len(idx["calibration"])
    again = ex["data"].split_indices(60_000)
    assert all(np.array_equal(idx[k], again[k]) for k in idx)


def test_training_reduces_loss_and_is_seeded(ex, parts):
    tr = ex["train"]
    x, y = parts["validation"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = ex["net"].build().eval()
    model, record = tr.train(tr.TrainConfig(steps=40), log=False, evaluate=False)
    with torch.no_grad():
        before = nn.functional.cross_entropy(untrained(x), y)
        after = nn.functional.cross_entropy(model(x), y)
    assert float(after) < float(before) - 0.5
    assert record["steps_done"] == 40
    again, _ = tr.train(tr.TrainConfig(steps=3), log=False, evaluate=False)
    twice, _ = tr.train(tr.TrainConfig(steps=3), log=False, evaluate=False)
    for (k, a), b in zip(again.state_dict().items(), twice.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_ensure_teacher_trains_once_and_loads(ex, tmp_path):
    path = ex["train"].ensure_teacher(tmp_path / "t" / "teacher.safetensors", steps=5)
    stamp = path.stat().st_mtime_ns
    assert ex["train"].ensure_teacher(path, steps=5).stat().st_mtime_ns == stamp
    model = ex["net"].build()
    model.load_state_dict(load_file(str(path)), strict=True)
    assert (path.parent / "train.json").is_file()
