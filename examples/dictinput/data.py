"""Data factory of the dict-input example: ``data:splits`` (scikit-learn's digits).

The 1,797 8x8 digit images are shuffled with ``SEED``: ``N_TEST`` are the test split,
``N_VALIDATION`` the validation split, the rest train the teacher and ``N_CALIBRATION`` of
those are the calibration split. Each split is ``({"pixels", "stats"}, labels)``: keyword
inputs of ``TwoBranch.forward`` and int64 labels (n,) in 0..9.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

N_CALIBRATION = 512
N_VALIDATION = 360
N_TEST = 360
SEED = 0

Inputs = dict[str, torch.Tensor]


def features(images: np.ndarray) -> np.ndarray:
    """Engineered features (n, 20) float32 of images (n, 8, 8) in [0, 1]: the 8 row means,
    the 8 column means and the 4 quadrant means (top-left, top-right, bottom-left,
    bottom-right): where the ink is, which the pixel branch must otherwise learn."""
    q = images.reshape(-1, 2, 4, 2, 4).mean(axis=(2, 4)).reshape(-1, 4)
    return np.concatenate([images.mean(axis=2), images.mean(axis=1), q], axis=1).astype(
        np.float32)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (np.asarray(bunch.images, dtype=np.float32) / 16.0,
            np.asarray(bunch.target, dtype=np.int64))


def split_indices(n: int, *, seed: int = SEED) -> dict[str, np.ndarray]:
    """``test``, ``validation`` and ``train`` partition ``range(n)``; ``calibration`` is a
    subset of ``train``."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    test, validation, train = np.split(perm, [N_TEST, N_TEST + N_VALIDATION])
    calibration = rng.choice(train, size=N_CALIBRATION, replace=False)
    return {"test": test, "validation": validation, "train": train,
            "calibration": calibration}


def part(name: str, *, seed: int = SEED) -> tuple[Inputs, torch.Tensor]:
    """One split (``train`` too, for training) as (``{"pixels": (n, 64), "stats": (n, 20)}``,
    labels (n,))."""
    images, labels = _digits()
    idx = split_indices(len(labels), seed=seed)[name]
    inputs = {"pixels": torch.from_numpy(images[idx].reshape(-1, 64)).contiguous(),
              "stats": torch.from_numpy(features(images[idx]))}
    return inputs, torch.from_numpy(labels[idx])


def splits() -> dict[str, tuple[Inputs, torch.Tensor]]:
    """Factory ``data:splits``: calibration (512), validation (360), test (360)."""
    return {name: part(name) for name in ("calibration", "validation", "test")}
