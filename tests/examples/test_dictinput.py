"""examples/dictinput: keyword inputs, factory, data factory and training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def ex(example):
    return {m: example("dictinput", m) for m in ("model", "data", "train")}


def test_splits_are_dicts_of_keyword_inputs(ex):
    d = ex["data"]
    parts = d.splits()
    assert set(parts) == {"calibration", "validation", "test"}
    sizes = {"calibration": d.N_CALIBRATION, "validation": d.N_VALIDATION, "test": d.N_TEST}
    model = ex["model"].build()
    for name, (inputs, labels) in parts.items():
        assert set(inputs) == {"pixels", "stats"}
        n = sizes[name]
        assert inputs["pixels"].shape == (n, 64) and inputs["stats"].shape == (n, 20)
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert model(**inputs).shape == (n, 10)


def test_split_indices_partition(ex):
    idx = ex["data"].split_indices(1797)
    held = np.concatenate([idx["test"], idx["validation"], idx["train"]])
    assert np.array_equal(np.sort(held), np.arange(1797))
    assert np.isin(idx["calibration"], idx["train"]).all()


def test_features_known_answer(ex):
    img = np.zeros((1, 8, 8), dtype=np.float32)
    img[0, :4, :4] = 1.0  # ink in the top-left quadrant only
    f = ex["data"].features(img)[0]
    assert np.allclose(f[:8], [0.5] * 4 + [0.0] * 4)       # row means
    assert np.allclose(f[8:16], [0.5] * 4 + [0.0] * 4)     # column means
    assert np.allclose(f[16:], [1.0, 0.0, 0.0, 0.0])       # quadrant means


def test_teacher_trains_accurately_and_loads(ex, dictinput_teacher):
    model = ex["model"].build()
    model.load_state_dict(load_file(str(dictinput_teacher)), strict=True)
    inputs, labels = ex["data"].splits()["test"]
    assert ex["train"].accuracy(model, inputs, labels) > 90.0
