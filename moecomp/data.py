"""Data: the calibration, validation and test splits a target is measured on.

Every source gives :class:`Splits`: ``calibration`` (what the search, relevance, reconstruction
and distillation read; for the built-in data sets, the training images), ``validation`` (where
choices are made) and ``test`` (where results are reported). A split is ``(inputs, labels)``:
inputs a tensor, a tuple (positional arguments) or a dict (keyword arguments) of tensors
sharing the leading sample axis (``moecomp.inputs``), labels a tensor or None.

Sources (``[data]`` of a problem file):

- built-in: scikit-learn's digits (embedded default) and FashionMNIST from IDX files. Their
  validation split is chosen by ``data.validation``: ``holdout`` (training images held out of
  the teacher's training, ``data.holdout`` of them) or ``test-half`` (a seeded half of the
  test split, the other half staying the test split: for a teacher that saw every training
  image). Deterministic functions of ``data.seed``.
- ``data.factory``: a user function returning ``{"calibration": (inputs, labels),
  "validation": ..., "test": ...}``.
- ``data.path``: a file of tensors in that layout: safetensors with keys
  ``<split>.inputs`` (one tensor), ``<split>.inputs.<i>`` (positional), ``<split>.inputs.<name>``
  (keyword) and ``<split>.labels``; or a torch file (read with ``weights_only=True``) holding
  the factory's dict.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moecomp import inputs as inputs_mod
from moecomp.config import DataConfig
from moecomp.errors import DataError
from moecomp.inputs import Inputs

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
    """``inputs`` for ``n`` samples (``moecomp.inputs.Inputs``) and their ``labels`` ``(n,
    ...)`` or None."""

    inputs: Inputs
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return inputs_mod.n_samples(self.inputs)

    def take(self, index: inputs_mod.Index) -> Split:
        """The samples ``index`` (a slice or an index tensor)."""
        return Split(inputs_mod.take(self.inputs, index),
                     None if self.labels is None else self.labels[index])


SPLITS = ("calibration", "validation", "test")


@dataclass(frozen=True)
class Splits:
    """The three splits of a data source; ``name`` says where they come from."""

    name: str
    calibration: Split
    validation: Split
    test: Split

    def __getitem__(self, split: str) -> Split:
        return {"calibration": self.calibration, "validation": self.validation,
                "test": self.test}[split]


def _permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def _holdout_size(holdout: int | None, default: int, n: int) -> int:
    n_val = default if holdout is None else holdout
    if not 1 <= n_val < n:
        raise DataError(f"data.holdout: must be in [1, {n - 1}] for this data set, got {n_val}")
    return n_val


def _test_half(test: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded half of ``test`` (validation) and the other half (test), each in order."""
    perm = _permutation(len(test), seed + 1)
    cut = len(test) // 2
    return test[np.sort(perm[:cut])], test[np.sort(perm[cut:])]


def _check_validation(validation: str) -> None:
    if validation not in VALIDATION_MODES:
        raise DataError(f"data.validation: must be one of {', '.join(VALIDATION_MODES)}, "
                        f"got {validation!r}")


VALIDATION_MODES = ("holdout", "test-half")


def load_digits(*, seed: int = 0, validation: str = "holdout",
                holdout: int | None = None, test_fraction: float = 0.2) -> Splits:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), inputs in [0, 1], shape (n, 64).

    Test: a seeded 20 % of the images. Validation: ``holdout`` images (default 20 % of all)
    held out of the rest, or (``test-half``) a seeded half of the test part.
    """
    from sklearn.datasets import load_digits as _sk_digits

    _check_validation(validation)
    bunch = _sk_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    perm = _permutation(len(y), seed)
    n_test = int(round(len(y) * test_fraction))
    test, rest = perm[:n_test], perm[n_test:]
    if validation == "holdout":
        n_val = _holdout_size(holdout, int(round(len(y) * 0.2)), len(rest))
        cal, val = rest[n_val:], rest[:n_val]
    else:
        cal = rest
        val, test = _test_half(test, seed)

    def part(idx: np.ndarray) -> Split:
        return Split(torch.from_numpy(x[idx]).contiguous(), torch.from_numpy(y[idx]).contiguous())

    return Splits("digits", part(cal), part(val), part(test))


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
                       validation: str = "holdout", holdout: int | None = None) -> Splits:
    """FashionMNIST: 28x28 images in [0, 1] of shape (n, 1, 28, 28), 10 classes.

    ``holdout``: calibration is the official 60,000 training images less ``holdout`` (default
    5,000) held out by ``seed`` for validation; test the official 10,000. ``test-half``:
    calibration all 60,000, validation and test a seeded half each of the official test set.
    """
    _check_validation(validation)
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

    tx, ty = arr["train_x"], arr["train_y"]
    vx, vy = arr["test_x"], arr["test_y"]
    perm = _permutation(len(ty), seed)
    if validation == "holdout":
        n_val = _holdout_size(holdout, 5000, len(ty))
        val_idx, cal_idx = perm[:n_val], perm[n_val:]
        val = Split(images(tx[val_idx]), labels(ty[val_idx]))
        test = Split(images(vx), labels(vy))
    else:
        cal_idx = perm
        v_idx, t_idx = _test_half(np.arange(len(vy)), seed)
        val = Split(images(vx[v_idx]), labels(vy[v_idx]))
        test = Split(images(vx[t_idx]), labels(vy[t_idx]))
    return Splits("fashion-mnist", Split(images(tx[cal_idx]), labels(ty[cal_idx])), val, test)


# --- user data ----------------------------------------------------------------------------------
def splits_from_dict(raw: Any, where: str) -> Splits:
    """:class:`Splits` from a user's ``{"calibration": (inputs, labels), "validation": ...,
    "test": ...}`` (a pair may also be a dict with keys ``inputs`` and ``labels``), checked:
    every split has inputs of one structure sharing the sample axis, labels of the same
    length or None; a DataError naming ``where``, the split and the shapes otherwise."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: must give a dict with keys {', '.join(SPLITS)}; got "
                        f"{type(raw).__name__}")
    missing = [k for k in SPLITS if k not in raw]
    extra = [k for k in raw if k not in SPLITS]
    if missing or extra:
        raise DataError(f"{where}: the dict must have exactly the keys {', '.join(SPLITS)}; "
                        + (f"missing {', '.join(missing)}" if missing else "")
                        + ("; " if missing and extra else "")
                        + (f"unknown {', '.join(map(str, extra))}" if extra else ""))
    parts: dict[str, Split] = {}
    for name in SPLITS:
        item = raw[name]
        w = f"{where}, split {name!r}"
        if isinstance(item, dict) and set(item) <= {"inputs", "labels"} and "inputs" in item:
            item = (item["inputs"], item.get("labels"))
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise DataError(f"{w}: must be a pair (inputs, labels); got "
                            f"{type(item).__name__}" + (f" of length {len(item)}"
                                                        if isinstance(item, tuple | list) else ""))
        x, y = inputs_mod.normalise(item[0]), item[1]
        n = inputs_mod.check(x, w)
        if n == 0:
            raise DataError(f"{w}: has no samples")
        if y is not None:
            if not isinstance(y, torch.Tensor):
                raise DataError(f"{w}: labels must be a tensor or None; got {type(y).__name__}")
            if y.dim() == 0 or int(y.shape[0]) != n:
                raise DataError(f"{w}: {tuple(y.shape)} labels for {n} samples "
                                f"({inputs_mod.describe(x)})")
        parts[name] = Split(x, y)
    first = parts["calibration"]
    for name in SPLITS[1:]:
        a, b = _structure(first.inputs), _structure(parts[name].inputs)
        if a != b:
            raise DataError(f"{where}: split {name!r} has inputs {b}, calibration has {a}; "
                            "every split must call the model the same way")
        if (first.labels is None) != (parts[name].labels is None):
            has = "has" if parts[name].labels is not None else "has no"
            raise DataError(f"{where}: split {name!r} {has} labels but calibration "
                            f"{'has' if first.labels is not None else 'has none'}")
    return Splits(where, parts["calibration"], parts["validation"], parts["test"])


def _structure(x: Inputs) -> str:
    """The calling form of ``x``: one tensor, n positional arguments, or the keywords."""
    if isinstance(x, torch.Tensor):
        return "one tensor"
    if isinstance(x, tuple):
        return f"{len(x)} positional arguments"
    return "keywords " + ", ".join(sorted(x))


def load_tensor_file(path: Path) -> Splits:
    """Splits from a file of tensors (see the module docstring for the layout)."""
    where = f"data.path {path}"
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            flat = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise DataError(f"{where}: not a readable safetensors file ({e})") from None
        return splits_from_dict(_unflatten(flat, where), where)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a non-torch or unsafe file
        raise DataError(f"{where}: cannot read it as a weights-only torch file: {e}") from None
    return splits_from_dict(obj, where)


def _unflatten(flat: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    """``<split>.inputs[.<i>|.<name>]`` and ``<split>.labels`` keys to the factory's dict."""
    out: dict[str, Any] = {}
    for split in SPLITS:
        keys = [k for k in flat if k.split(".")[0] == split]
        labels = flat.get(f"{split}.labels")
        if f"{split}.inputs" in flat:
            x: Any = flat[f"{split}.inputs"]
        else:
            sub = {k[len(split) + len(".inputs."):]: flat[k] for k in keys
                   if k.startswith(f"{split}.inputs.")}
            if not sub:
                raise DataError(f"{where}: no '{split}.inputs' tensor (or "
                                f"'{split}.inputs.<name>' tensors); keys: "
                                f"{', '.join(sorted(flat)) or 'none'}")
            if all(k.isdigit() for k in sub):
                x = tuple(sub[str(i)] for i in range(len(sub)))
            else:
                x = dict(sorted(sub.items()))
        out[split] = (x, labels)
    unknown = [k for k in flat if k.split(".")[0] not in SPLITS]
    if unknown:
        raise DataError(f"{where}: keys must start with {', '.join(SPLITS)}; found "
                        f"{unknown[0]!r}")
    return out


def load_splits(cfg: DataConfig, *, folder: str | None = None) -> Splits:
    """The splits ``[data]`` of a problem file names (``folder``: the problem file's, for
    relative paths and factory modules)."""
    base = Path(folder) if folder is not None else Path(".")

    def resolved(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    source = cfg.source
    if source == "factory":
        from moecomp.factories import call

        assert cfg.factory is not None
        raw = call(cfg.factory, "data.factory", folder=folder)
        return splits_from_dict(raw, f"data.factory {cfg.factory}")
    if source == "file":
        assert cfg.path is not None
        return load_tensor_file(resolved(cfg.path))
    if source == "digits":
        return load_digits(seed=cfg.seed, validation=cfg.validation, holdout=cfg.holdout)
    return load_fashion_mnist(resolved(cfg.path) if cfg.path else None, seed=cfg.seed,
                              validation=cfg.validation, holdout=cfg.holdout)


def calibration_indices(n_pool: int, n: int, *, seed: int) -> torch.Tensor:
    """The first ``n`` of a seeded permutation of the calibration split (n capped at
    n_pool): the samples the search measures on."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_pool, generator=g)[: min(n, n_pool)]
