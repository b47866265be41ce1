"""Data factory of the conv-net example: ``data:splits`` (FashionMNIST from IDX files).

The official 60,000 training images are shuffled with ``SEED``: the first ``N_VALIDATION``
are held out as the validation split (the teacher never trains on them), the rest train the
teacher, and ``N_CALIBRATION`` of those (same seed) are the calibration split. The test split
is the official 10,000 test images. Inputs are float32 (n, 1, 28, 28) in [0, 1], labels
int64 (n,) in 0..9.

The IDX files are read with moecomp's reader from ``$MOECOMP_FASHION_MNIST`` or Debian's
``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from moecomp.data import FASHION_FILES, fashion_dir, read_idx

N_CALIBRATION = 2048
N_VALIDATION = 2000
SEED = 0

Split = tuple[torch.Tensor, torch.Tensor]


@lru_cache(maxsize=1)
def _arrays() -> dict[str, np.ndarray]:
    folder = fashion_dir()
    return {k: read_idx(folder / name) for k, name in FASHION_FILES.items()}


def _images(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1).contiguous()


def _labels(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.int64))


def split_indices(n_train: int, *, seed: int = SEED) -> dict[str, np.ndarray]:
    """Indices into the official training images: ``validation`` and ``train`` partition
    ``range(n_train)``; ``calibration`` is a subset of ``train``."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_train)
    validation, train = perm[:N_VALIDATION], perm[N_VALIDATION:]
    calibration = rng.choice(train, size=N_CALIBRATION, replace=False)
    return {"validation": validation, "train": train, "calibration": calibration}


def training_set(*, seed: int = SEED) -> Split:
    """The teacher's training images and labels: the 58,000 not held out for validation."""
    a = _arrays()
    idx = split_indices(len(a["train_y"]), seed=seed)["train"]
    return _images(a["train_x"][idx]), _labels(a["train_y"][idx])


def splits() -> dict[str, Split]:
    """Factory ``data:splits``: calibration (2,048 training images), validation (2,000
    held-out training images) and test (the official 10,000), each (images, labels)."""
    a = _arrays()
    idx = split_indices(len(a["train_y"]))
    out = {name: (_images(a["train_x"][idx[name]]), _labels(a["train_y"][idx[name]]))
           for name in ("calibration", "validation")}
    out["test"] = (_images(a["test_x"]), _labels(a["test_y"]))
    return out
