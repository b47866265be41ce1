"""DaskRunner: chunk order, errors, and the same search result as the in-process runner."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from tunehelpers import DIGITS

from moecomp.config import load_problem
from moecomp.search import LocalRunner, run_search
from moecomp.search.dask_runner import DaskRunner, same_function


class Scale:
    def __init__(self, k: int, table: list[int]) -> None:
        self.k = k
        self.table = table

    def __call__(self, chunk: list[int]) -> list[int]:
        if not chunk:
            raise ValueError("empty chunk")
        return [self.k * x for x in chunk]


def test_same_function_rule():
    table = [1, 2]
    a = Scale(2, table)
    assert same_function(a, a)
    assert same_function(Scale(2, table), a)  # new wrapper around the same objects
    assert not same_function(Scale(3, table), a)  # another setting
    assert not same_function(Scale(2, [1, 2]), a)  # an equal but distinct object
    assert not same_function(a, None)


@pytest.fixture(scope="module")
def dask_runner():
    with DaskRunner(n_workers=2) as runner:
        yield runner


def test_results_in_chunk_order_and_errors_propagate(dask_runner):
    chunks = [[i, i + 1] for i in range(0, 40, 2)]
    fn = Scale(3, [])
    assert dask_runner.map_chunks(fn, chunks) == LocalRunner().map_chunks(fn, chunks)
    assert dask_runner.map_chunks(Scale(3, []), chunks[:2]) == [[0, 3], [6, 9]]
    assert dask_runner.map_chunks(fn, []) == []
    with pytest.raises(ValueError, match="empty chunk"):
        dask_runner.map_chunks(fn, [[1], []])


def test_dask_search_gives_the_in_process_front(tmp_path, dask_runner, digits_ready):
    problem = load_problem(DIGITS)
    # One thread here as on the workers: the float sums of a matrix product may depend on
    # how many threads share it, and the front should not.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kw = {
            "budget": 64,
            "params": {"pop_size": 8, "seed": 3, "chunk_size": 4},
            "progress": False,
            "plots": False,
        }
        local = run_search(problem, tmp_path / "local", **kw)
        remote = run_search(problem, tmp_path / "dask", runner=dask_runner, **kw)
    finally:
        torch.set_num_threads(threads)
    assert remote.n_evals == local.n_evals == 64
    assert remote.hv == pytest.approx(local.hv, rel=1e-9)
    pd.testing.assert_frame_equal(remote.front, local.front, rtol=1e-9)
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "dask" / "evaluated.csv"),
        pd.read_csv(tmp_path / "local" / "evaluated.csv"),
        rtol=1e-9,
    )
