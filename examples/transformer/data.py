"""Data factory of the encoder example: ``data:splits``.

Segments of :mod:`corpus` (paragraph pieces of CPython's documentation) are shuffled with
``SEED``; the first ``N_TEST`` are the test split, the next ``N_VALIDATION`` the validation
split, and the rest are the teacher's training text. Calibration is ``N_CALIBRATION`` training
segments drawn with the same seed: the search measures divergence on text the teacher has
seen, validation (where choices are made) and test (where they are reported) on text it has
not. Each split is ``({"input_ids", "attention_mask"}, None)``: no labels.

The vocabulary is rebuilt from the corpus in every process (deterministic for a CPython
version, memoised); both encoders (small and base) use it, so one data factory serves both
problem files. CPython patch releases edit docstrings, which reorders the ids (3.11.2 and
3.11.7 differ from id 10 on): a teacher is only valid under the CPython that trained it.
``train.py`` records the vocabulary's hash in the teacher file; :func:`check_teacher` compares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from corpus import MAX_LEN, pad, segments, vocab, vocab_sha256

N_CALIBRATION = 512
N_VALIDATION = 512
N_TEST = 1024
SEED = 0

Inputs = dict[str, torch.Tensor]


def split_indices(n_segments: int, *, seed: int = SEED) -> dict[str, np.ndarray]:
    """Indices into the segments: ``test``, ``validation`` and ``train`` partition
    ``range(n_segments)``; ``calibration`` is a subset of ``train``."""
    if n_segments < N_TEST + N_VALIDATION + N_CALIBRATION:
        raise ValueError(f"corpus has {n_segments} segments, fewer than the "
                         f"{N_TEST + N_VALIDATION + N_CALIBRATION} the splits need")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_segments)
    test, validation, train = np.split(perm, [N_TEST, N_TEST + N_VALIDATION])
    calibration = rng.choice(train, size=N_CALIBRATION, replace=False)
    return {"test": test, "validation": validation, "train": train,
            "calibration": calibration}


def training_segments(*, seed: int = SEED) -> list[tuple[int, ...]]:
    """The segments the teacher trains on (all but test and validation), unpadded id tuples."""
    segs = segments()
    return [segs[i] for i in split_indices(len(segs), seed=seed)["train"]]


def split_inputs(name: str, *, seed: int = SEED) -> Inputs:
    """One split's inputs: ``input_ids`` int64 (n, MAX_LEN), ``[CLS]`` first, right-padded
    with ``[PAD]``; ``attention_mask`` int64 (n, MAX_LEN), 1 on real tokens."""
    segs = segments()
    idx = split_indices(len(segs), seed=seed)[name]
    ids, mask = pad([segs[i] for i in idx], length=MAX_LEN)
    return {"input_ids": ids, "attention_mask": mask}


def splits() -> dict[str, tuple[Inputs, None]]:
    """Factory ``data:splits``: calibration (512), validation (512) and test (1,024) sequences
    of length ``MAX_LEN`` (48) as keyword inputs of ``Encoder.forward``, labels None."""
    return {name: (split_inputs(name), None) for name in ("calibration", "validation", "test")}


def teacher_vocab_sha256(path: str | Path) -> str | None:
    """The vocabulary hash ``train.py`` stored in a teacher file's metadata (None if absent)."""
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("vocab_sha256")


def check_teacher(path: str | Path) -> None:
    """Raise ValueError if the teacher at ``path`` was trained on another vocabulary than the
    one this data factory builds (another CPython version), whose ids would mean other words."""
    have, want = teacher_vocab_sha256(path), vocab_sha256(vocab())
    if have != want:
        raise ValueError(f"{path} was trained with vocabulary {have} but this CPython's text "
                         f"gives {want}: retrain it with examples/transformer/train.py")
