import gzip
import os
import struct

import numpy as np
import pytest
import torch

from moecomp.config import DataConfig
from moecomp.data import (
    FASHION_DEBIAN,
    FASHION_FILES,
    load_digits,
    load_fashion_mnist,
    load_splits,
    read_idx,
)
from moecomp.errors import ConfigError, DataError


def test_digits_shapes_dtypes_labels():
    s = load_digits(seed=0)
    assert s.calibration.inputs.shape[1:] == (64,)
    assert len(s.calibration) + len(s.validation) + len(s.test) == 1797
    for part in (s.calibration, s.validation, s.test):
        assert part.inputs.dtype == torch.float32 and part.labels.dtype == torch.int64
        assert 0.0 <= float(part.inputs.min()) and float(part.inputs.max()) <= 1.0
        assert set(part.labels.unique().tolist()) <= set(range(10))


def test_digits_split_is_deterministic_and_disjoint():
    a, b, c = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    assert torch.equal(a.calibration.inputs, b.calibration.inputs)
    assert torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.calibration.inputs, c.calibration.inputs)
    rows = {tuple(r.tolist()) + (int(y),) for part in (a.calibration, a.validation, a.test)
            for r, y in zip(part.inputs, part.labels, strict=True)}
    # the digits set has a handful of duplicate images; splits still cover ~all rows
    assert len(rows) > 1780


def _write_idx(path, arr: np.ndarray) -> None:
    head = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def _fake_fashion(folder, n_train=12, n_test=6):
    rng = np.random.default_rng(0)
    _write_idx(folder / FASHION_FILES["train_x"], rng.integers(0, 256, (n_train, 28, 28)))
    _write_idx(folder / FASHION_FILES["train_y"], rng.integers(0, 10, n_train))
    _write_idx(folder / FASHION_FILES["test_x"], rng.integers(0, 256, (n_test, 28, 28)))
    _write_idx(folder / FASHION_FILES["test_y"], rng.integers(0, 10, n_test))


def test_fashion_loader_on_small_idx_files(tmp_path):
    _fake_fashion(tmp_path)
    s = load_fashion_mnist(tmp_path, seed=0, holdout=4)
    assert s.calibration.inputs.shape == (8, 1, 28, 28)
    assert s.validation.inputs.shape == (4, 1, 28, 28)
    assert s.test.inputs.shape == (6, 1, 28, 28)
    raw = read_idx(tmp_path / FASHION_FILES["test_x"])
    assert torch.allclose(s.test.inputs[:, 0], torch.from_numpy(raw.astype(np.float32) / 255))


def test_fashion_path_from_environment(tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    monkeypatch.setenv("MOECOMP_FASHION_MNIST", str(tmp_path))
    assert len(load_splits(DataConfig(dataset="fashion-mnist", holdout=4)).test) == 6


def test_missing_folder_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_missing_file_says_how_to_install(tmp_path):
    _fake_fashion(tmp_path)
    os.remove(tmp_path / FASHION_FILES["test_y"])
    with pytest.raises(DataError, match="missing data file.*dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "not_gzip", "bad_magic", "wrong_count"])
def test_corrupt_file_is_refused(tmp_path, damage):
    _fake_fashion(tmp_path)
    p = tmp_path / FASHION_FILES["train_x"]
    if damage == "truncate":
        p.write_bytes(p.read_bytes()[:-40])
    elif damage == "not_gzip":
        p.write_bytes(b"this is not gzip data at all")
    elif damage == "bad_magic":
        with gzip.open(p, "wb") as f:
            f.write(bytes([0, 0, 9, 3]) + b"\x00" * 64)
    else:
        with gzip.open(p, "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 100, 28, 28) + b"\x00" * 500)
    with pytest.raises(DataError):
        load_fashion_mnist(tmp_path)


def test_unknown_dataset():
    from moecomp.config import problem_from_dict

    with pytest.raises(ConfigError, match="data.dataset.*'digits', 'fashion-mnist'"):
        problem_from_dict({"name": "x", "model": {"zoo": "lenet300"},
                           "data": {"dataset": "cifar"}})


_REAL = FASHION_DEBIAN / FASHION_FILES["train_x"]


@pytest.mark.skipif(not _REAL.exists() and not os.environ.get("CI"),
                    reason="Debian package dataset-fashion-mnist not installed (CI installs it)")
def test_real_fashion_mnist_files():
    s = load_fashion_mnist(seed=0)
    assert s.calibration.inputs.shape == (55000, 1, 28, 28)
    assert s.validation.inputs.shape == (5000, 1, 28, 28)
    assert s.test.inputs.shape == (10000, 1, 28, 28)
    assert s.calibration.inputs.dtype == torch.float32 and s.test.labels.dtype == torch.int64
    assert float(s.calibration.inputs.min()) == 0.0 and float(s.calibration.inputs.max()) == 1.0
    for part in (s.calibration, s.validation, s.test):
        assert set(part.labels.unique().tolist()) == set(range(10))
    # the official test set is balanced: 1,000 per class
    assert torch.bincount(s.test.labels).tolist() == [1000] * 10
    again = load_fashion_mnist(seed=0)
    assert torch.equal(s.validation.labels, again.validation.labels)


@pytest.mark.parametrize("seed", [0, 5])
def test_digits_validation_modes(seed):
    hold = load_digits(seed=seed)
    half = load_digits(seed=seed, validation="test-half")
    # test-half: calibration holds every non-test image, validation and test split the test
    assert len(half.calibration) == len(hold.calibration) + len(hold.validation)
    assert len(half.validation) + len(half.test) == len(hold.test)
    rows = {tuple(r.tolist()) for r in hold.test.inputs}
    assert all(tuple(r.tolist()) in rows for r in half.validation.inputs)
    assert all(tuple(r.tolist()) in rows for r in half.test.inputs)
    v = {tuple(r.tolist()) for r in half.validation.inputs}
    assert not v & {tuple(r.tolist()) for r in half.test.inputs}
    assert len(load_digits(seed=seed, holdout=100).validation) == 100


def test_fashion_validation_modes_on_small_files(tmp_path):
    _fake_fashion(tmp_path, n_train=12, n_test=6)
    half = load_fashion_mnist(tmp_path, validation="test-half")
    assert len(half.calibration) == 12 and len(half.validation) == 3 and len(half.test) == 3
    both = torch.cat([half.validation.inputs, half.test.inputs])
    assert torch.equal(both.sum(), load_fashion_mnist(tmp_path, holdout=4).test.inputs.sum())
    with pytest.raises(DataError, match=r"data.holdout: must be in \[1, 11\]"):
        load_fashion_mnist(tmp_path, holdout=12)
