"""Shared fixtures. Teachers and rank caches go to one temporary folder per test session
(so tests never write into the checkout and worker processes share what was trained)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Tiny tensors: one thread is faster than two, and worker subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Idle OpenMP threads sleep instead of spinning: spinning stalls everything on a busy 2-core box.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_SESSION_ARTIFACTS = Path(tempfile.mkdtemp(prefix="moecomp-test-artifacts-"))
os.environ.setdefault("MOECOMP_ARTIFACTS", str(_SESSION_ARTIFACTS))

import torch  # noqa: E402  (after OMP_NUM_THREADS is set)

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def digits_problem():
    from moecomp.config import load_problem

    return load_problem(REPO / "problems" / "digits-mlp.toml")


@pytest.fixture(scope="session")
def digits_target(digits_problem):
    """The digits MLP target (teacher trained once per session, ~2 s)."""
    from moecomp.target import build_target

    return build_target(digits_problem, progress=False)
