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


@pytest.fixture(scope="module")
def run_ctx(tmp_path_factory, digits_problem, digits_target):
    """A small hand-made run folder of three digits solutions."""
    import numpy as np

    from moecomp.runs import METRICS, RunFolder, atomic_write_csv, solutions_frame
    from moecomp.solution import RunContext

    run = RunFolder(tmp_path_factory.mktemp("run"))
    run.write_problem(digits_problem)
    names = digits_target.layer_names
    s = np.array([[0.5, 0.5, 0.3], [0.8, 0.7, 0.5], [0.9, 0.9, 0.6]])
    b = np.array([[4, 4, 6], [3, 3, 4], [2, 2, 3]])
    df = solutions_frame(np.arange(3), 0, names, s, b, {m: np.zeros(3) for m in METRICS})
    atomic_write_csv(run.file("evaluated.csv"), df)
    atomic_write_csv(run.file("front.csv"), df)
    ctx = RunContext(run)
    ctx.target = digits_target  # reuse the session's teacher (cached_property slot)
    return ctx


@pytest.fixture
def cli(monkeypatch, capsys):
    """``cli(*args) -> (exit code, stdout, stderr)``: ``moecomp ARGS`` run in-process as the
    console script runs it (``moecomp.cli.main``, which turns errors into one line)."""
    import sys

    from moecomp.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["moecomp", *args])
        with pytest.raises(SystemExit) as e:
            main()
        captured = capsys.readouterr()
        code = e.value.code if isinstance(e.value.code, int) else 1
        return code, captured.out, captured.err

    return run


@pytest.fixture
def cli_out(cli):
    """``cli_out(*args) -> (exit code, stdout + stderr)``: the ``cli`` fixture, with
    everything printed in one string."""

    def run(*args: str) -> tuple[int, str]:
        code, out, err = cli(*args)
        return code, out + err

    return run


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2 and one ``error: ...`` line holding every needle, no traceback."""
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


@pytest.fixture
def one_line_error():
    return assert_one_line_error
