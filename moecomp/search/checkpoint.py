"""Checkpoints of a running search, as data only: one safetensors file.

The file holds numeric arrays (safetensors tensors: the archive of evaluated points, the
hypervolume history, the packed numbers of the algorithm's state) and one JSON document in
the safetensors metadata (format version, problem fingerprint, library versions, counters,
the random generator's state). Loading parses JSON and copies arrays; nothing in a checkpoint
is code, so a run folder from someone else cannot run anything through it. The pymoo
algorithm is rebuilt from the problem config and its state put back
(``moecomp.search.pymoo_state``).

A checkpoint is checked before it is used: the format, the problem fingerprint and the pymoo
version (the state is pymoo's internals) must match, and every key and array shape is
validated; anything else is a RunError naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pymoo
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

import moecomp
from moecomp.atomic import replace_atomically
from moecomp.errors import RunError

FORMAT = "moecomp-search-checkpoint"
VERSION = 2
_META_KEY = "moecomp"


def fingerprint(config: dict[str, Any]) -> str:
    """A short stable hash of a resolved problem config (as ``ProblemConfig.to_dict``)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def header(fp: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "problem": fp,
        "moecomp": moecomp.__version__,
        "pymoo": pymoo.__version__,
    }


def save_checkpoint(
    path: Path, doc: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *, fp: str
) -> None:
    """Write ``doc`` (JSON-able) and ``arrays`` (numeric) atomically: temporary file, fsync,
    rename. ``doc`` must not use the header's keys."""
    meta = {**header(fp), "state": dict(doc)}
    blob = save(
        {k: np.ascontiguousarray(v) for k, v in arrays.items()},
        metadata={_META_KEY: json.dumps(meta, allow_nan=True)},
    )
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())

    replace_atomically(path, write)


def read_header(path: Path) -> dict[str, Any]:
    """The JSON document of a checkpoint (header keys and ``state``), or a RunError if the
    file is not one of ours."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{path} is not a moecomp search checkpoint ({e}); refusing it") from None
    raw = meta.get(_META_KEY)
    try:
        head = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        head = None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise RunError(f"{path} is not a moecomp search checkpoint; refusing it")
    return head


class Checkpoint:
    """A loaded checkpoint: ``state`` (the JSON document) and ``arrays``; the accessors
    raise a RunError naming the key when it is missing or of the wrong kind."""

    def __init__(self, path: Path, state: dict[str, Any], arrays: dict[str, np.ndarray]):
        self.path = path
        self.state = state
        self.arrays = arrays

    def value(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self.state:
            raise RunError(f"{self.path}: checkpoint lacks {key!r}; start a new run")
        v = self.state[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
            raise RunError(f"{self.path}: checkpoint entry {key!r} is malformed")
        return v

    def array(
        self, key: str, *, kinds: str, shape: tuple[int | None, ...]
    ) -> np.ndarray:
        """Array ``key`` of a dtype kind in ``kinds`` (numpy kind letters, e.g. ``"iu"``) and
        ``shape`` (``None`` = any length on that axis)."""
        if key not in self.arrays:
            raise RunError(f"{self.path}: checkpoint lacks array {key!r}; start a new run")
        a = self.arrays[key]
        if (
            a.dtype.kind not in kinds
            or a.ndim != len(shape)
            or any(w is not None and g != w for g, w in zip(a.shape, shape, strict=True))
        ):
            raise RunError(
                f"{self.path}: checkpoint array {key!r} is {a.dtype}{list(a.shape)}, "
                f"expected kind {kinds!r} and shape {list(shape)}"
            )
        return a


def load_checkpoint(path: Path, *, fp: str) -> Checkpoint:
    """The checkpoint at ``path``, refused (RunError) unless the header says: this format and
    version, the same problem fingerprint and the same pymoo version."""
    head = read_header(path)
    want = header(fp)
    if head.get("version") != VERSION:
        raise RunError(
            f"{path}: checkpoint version {head.get('version')!r}, this moecomp reads "
            f"{VERSION}; start a new run"
        )
    if head.get("problem") != fp:
        raise RunError(
            f"{path}: checkpoint of another problem config ({head.get('problem')}, "
            f"this run is {fp}); refusing to resume"
        )
    if head.get("pymoo") != want["pymoo"]:
        raise RunError(
            f"{path}: written with pymoo {head.get('pymoo')}, this is "
            f"{want['pymoo']}; a checkpoint only resumes under the same pymoo"
        )
    state = head.get("state")
    if not isinstance(state, dict):
        raise RunError(f"{path}: checkpoint holds no search state")
    try:
        with safe_open(str(path), framework="numpy") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{path}: corrupt checkpoint ({e})") from None
    return Checkpoint(path, state, arrays)
