"""Data sets: scikit-learn's digits (embedded default) and FashionMNIST from IDX files.

Every loader returns :class:`Splits` with fixed train / validation / test parts: float32
inputs and int64 labels. Splits are deterministic functions of the seed.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moecomp.errors import DataError

FASHION_ENV = "MOECOMP_FASHION_MNIST"
FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
FASHION_HOWTO = (
    "FashionMNIST is read from the IDX .gz files of Debian's package: run "
    "'apt-get update && apt-get install -y dataset-fashion-mnist' (files land in "
    f"{FASHION_DEBIAN}), or set data.path in the problem file or ${FASHION_ENV} to a folder "
    "holding " + ", ".join(FASHION_FILES.values()) + "."
)
# An IDX file bigger than this is refused before it is read (FashionMNIST train is 47 MB raw).
MAX_IDX_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (n, *input_shape) float32
    y: torch.Tensor  # (n,) int64

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Splits:
    name: str
    train: Split
    val: Split
    test: Split
    n_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def _permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def load_digits(*, seed: int = 0, val_fraction: float = 0.2,
                test_fraction: float = 0.2) -> Splits:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), inputs in [0, 1], shape (n, 64)."""
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    perm = _permutation(len(y), seed)
    n_test = int(round(len(y) * test_fraction))
    n_val = int(round(len(y) * val_fraction))
    test, val, train = np.split(perm, [n_test, n_test + n_val])

    def part(idx: np.ndarray) -> Split:
        return Split(torch.from_numpy(x[idx]).contiguous(), torch.from_numpy(y[idx]).contiguous())

    return Splits("digits", part(train), part(val), part(test), 10)


def read_idx(path: Path) -> np.ndarray:
    """Read one gzip-compressed IDX file (uint8 payload) into an array of its declared shape."""
    if not path.is_file():
        raise DataError(f"missing data file {path}. {FASHION_HOWTO}")
    if path.stat().st_size > MAX_IDX_BYTES:
        raise DataError(f"{path} is larger than {MAX_IDX_BYTES} bytes; not an IDX file?")
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(4)
            if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic). "
                                f"{FASHION_HOWTO}")
            ndim = head[3]
            if not 1 <= ndim <= 4:
                raise DataError(f"{path}: IDX header claims {ndim} dimensions")
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            count = int(np.prod(dims, dtype=np.int64))
            if count > MAX_IDX_BYTES:
                raise DataError(f"{path}: IDX header claims {count} elements; refused")
            payload = f.read(count + 1)
    except (OSError, EOFError, zlib.error, struct.error) as e:
        raise DataError(f"{path} is corrupt or truncated ({e}). {FASHION_HOWTO}") from None
    if len(payload) != count:
        raise DataError(f"{path} is corrupt: header says {count} bytes of data, file has "
                        f"{len(payload)}. {FASHION_HOWTO}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def fashion_dir(path: str | os.PathLike[str] | None = None) -> Path:
    if path:
        return Path(path)
    env = os.environ.get(FASHION_ENV)
    return Path(env) if env else FASHION_DEBIAN


def load_fashion_mnist(path: str | os.PathLike[str] | None = None, *, seed: int = 0,
                       n_val: int = 5000) -> Splits:
    """FashionMNIST: 28x28 images in [0, 1] of shape (n, 1, 28, 28), 10 classes.

    Train is the official 60,000 less ``n_val`` held out by ``seed``; test the official 10,000.
    """
    folder = fashion_dir(path)
    if not folder.is_dir():
        raise DataError(f"FashionMNIST folder {folder} does not exist. {FASHION_HOWTO}")
    arr = {k: read_idx(folder / v) for k, v in FASHION_FILES.items()}
    for part in ("train", "test"):
        xs, ys = arr[f"{part}_x"], arr[f"{part}_y"]
        if xs.ndim != 3 or xs.shape[1:] != (28, 28) or ys.ndim != 1 or len(xs) != len(ys):
            raise DataError(f"FashionMNIST {part} files have shapes {xs.shape} and {ys.shape}; "
                            f"expected (n, 28, 28) and (n,). {FASHION_HOWTO}")
        if ys.size and ys.max() > 9:
            raise DataError(f"FashionMNIST {part} labels exceed 9: corrupt file")

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1).contiguous()

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    perm = _permutation(len(arr["train_y"]), seed)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    tx, ty = arr["train_x"], arr["train_y"]
    return Splits(
        "fashion-mnist",
        Split(images(tx[train_idx]), labels(ty[train_idx])),
        Split(images(tx[val_idx]), labels(ty[val_idx])),
        Split(images(arr["test_x"]), labels(arr["test_y"])),
        10,
    )


def load_dataset(name: str, *, path: str | None = None, seed: int = 0) -> Splits:
    if name == "digits":
        return load_digits(seed=seed)
    if name == "fashion-mnist":
        return load_fashion_mnist(path, seed=seed)
    raise DataError(f"unknown data set {name!r}; allowed: digits, fashion-mnist")


def calibration_indices(n_train: int, n: int, *, seed: int) -> torch.Tensor:
    """The first ``n`` of a seeded permutation of the training split (n capped at n_train)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_train, generator=g)[: min(n, n_train)]
