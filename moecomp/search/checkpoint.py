"""Checkpoints of a running search: the algorithm, its random state and the run's archive.

Format: a magic line, then one JSON header line (format version, problem fingerprint, library
versions), then a pickle of the state (the C pickler; dill where pymoo's state needs it).

Pickle runs code when loaded, so it is acceptable here ONLY because a checkpoint is written by
this module, by this process, into the user's own run folder; the header is checked *before*
anything is unpickled, so a foreign or stale file (another program's pickle, another problem,
another pymoo) is refused with a clear error. Never resume from a run folder you did not
create.

The problem object (teacher, data, evaluator) is not pickled: it is replaced by a reference
on save and by the live problem on load.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import dill
import pymoo

import moecomp
from moecomp.errors import RunError

MAGIC = b"MOECOMP-SEARCH-CHECKPOINT\n"
FORMAT = 1
_PROBLEM_REF = "moecomp.search.problem"


def fingerprint(config: dict[str, Any]) -> str:
    """A short stable hash of a resolved problem config (as ``ProblemConfig.to_dict``)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class _Pickler(pickle.Pickler):
    """The C pickler (fast); the problem object becomes a persistent reference."""

    def __init__(self, file: io.BytesIO, problem: object) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._problem = problem

    def persistent_id(self, obj: object) -> str | None:
        return _PROBLEM_REF if obj is self._problem else None


class _DillPickler(dill.Pickler):  # type: ignore[misc]
    """dill, for states the C pickler cannot handle (pymoo keeps some decorated closures,
    e.g. NSGA-III's tournament comparison); pure Python, so several times slower."""

    def __init__(self, file: io.BytesIO, problem: object) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._problem = problem

    def persistent_id(self, obj: object) -> str | None:
        return _PROBLEM_REF if obj is self._problem else None


class _Unpickler(dill.Unpickler):  # type: ignore[misc]
    """Reads both: dill's unpickler also loads what the C pickler wrote."""

    def __init__(self, file: io.BytesIO, problem: object) -> None:
        super().__init__(file)
        self._problem = problem

    def persistent_load(self, pid: str) -> object:
        if pid != _PROBLEM_REF:
            raise RunError(f"checkpoint refers to an unknown object {pid!r}")
        return self._problem


def _dumps(state: dict[str, Any], problem: object) -> bytes:
    buf = io.BytesIO()
    try:
        _Pickler(buf, problem).dump(state)
    except (pickle.PicklingError, AttributeError, TypeError):
        buf = io.BytesIO()
        _DillPickler(buf, problem).dump(state)
    return buf.getvalue()


def header(fp: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "problem": fp,
        "moecomp": moecomp.__version__,
        "pymoo": pymoo.__version__,
        "dill": dill.__version__,
    }


def save_checkpoint(path: Path, state: dict[str, Any], *, problem: object, fp: str) -> None:
    """Write ``state`` atomically (temporary file, fsync, rename); ``problem`` is left out."""
    payload = _dumps(state, problem)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(json.dumps(header(fp)).encode() + b"\n")
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a checkpoint, or a RunError if the file is not one of ours."""
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise RunError(
                f"{path} is not a moecomp search checkpoint (bad magic); refusing to load it"
            )
        line = f.readline(65536)
    try:
        head = json.loads(line)
    except json.JSONDecodeError:
        raise RunError(f"{path}: corrupt checkpoint header") from None
    if not isinstance(head, dict):
        raise RunError(f"{path}: corrupt checkpoint header")
    return head


def load_checkpoint(path: Path, *, problem: object, fp: str) -> dict[str, Any]:
    """The state saved by :func:`save_checkpoint`, with the live ``problem`` put back.

    Refused (RunError) unless the header says: this format, the same problem fingerprint and
    the same pymoo version (the pickled algorithm is pymoo's internals)."""
    head = read_header(path)
    want = header(fp)
    if head.get("format") != FORMAT:
        raise RunError(
            f"{path}: checkpoint format {head.get('format')!r}, this moecomp reads "
            f"{FORMAT}; start a new run"
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
    with open(path, "rb") as f:
        f.read(len(MAGIC))
        f.readline(65536)
        payload = f.read()
    state = _Unpickler(io.BytesIO(payload), problem).load()
    if not isinstance(state, dict):
        raise RunError(f"{path}: checkpoint holds no search state")
    return state
