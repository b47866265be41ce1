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


def test_workers_are_counted_when_the_clients_cached_info_has_none(dask_runner, monkeypatch):
    # the client refreshes scheduler_info() in the background with no per-worker entries;
    # a search that read workers from it once split a population by zero workers (CI, stop 24)
    monkeypatch.setattr(type(dask_runner.client), "scheduler_info",
                        lambda self, *a, **k: {"workers": {}})
    assert dask_runner.n_workers == 2
    chunks = [[i] for i in range(5)]
    assert dask_runner.map_chunks(Scale(2, []), chunks) == [[2 * i] for i in range(5)]


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


class CountingRunner(LocalRunner):
    """In-process, but says it has workers: records how many chunks each call gets."""

    n_workers = 3

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []  # (individuals, chunks)

    def map_chunks(self, fn, chunks):
        out = super().map_chunks(fn, chunks)
        self.calls.append((sum(len(r[0]) for r in out), len(chunks)))
        return out


def test_a_runner_with_workers_gets_a_chunk_per_worker(tmp_path, digits_ready):
    """chunk_size 64 would put a population of 8 in one chunk: one worker busy, the others
    idle; a runner with n_workers gets at least that many chunks (one per individual at
    most), and the search is the in-process one."""
    problem = load_problem(DIGITS)
    runner = CountingRunner()
    kw = {"budget": 32, "params": {"pop_size": 8, "seed": 1}, "progress": False, "plots": False}
    counted = run_search(problem, tmp_path / "counted", runner=runner, **kw)
    assert runner.calls
    for n, chunks in runner.calls:
        assert chunks == min(3, n)
    local = run_search(problem, tmp_path / "local", **kw)
    assert counted.n_evals == local.n_evals == 32
    pd.testing.assert_frame_equal(counted.front, local.front, rtol=1e-9)


def test_search_cli_evaluates_on_dask_workers(cli, tmp_path, digits_ready, monkeypatch):
    chunks: list[int] = []
    map_chunks = DaskRunner.map_chunks

    def counted(self, fn, cs):
        chunks.append(len(cs))
        return map_chunks(self, fn, cs)

    monkeypatch.setattr(DaskRunner, "map_chunks", counted)
    code, out, err = cli("search", str(DIGITS), "--out", str(tmp_path / "run"), "--budget", "24",
                         "--pop-size", "8", "--no-progress", "--dask-workers", "2")
    assert code == 0, err
    assert "24 evaluations" in out
    assert chunks and max(chunks) == 2  # the populations went to both workers


def _installed() -> list[str]:
    from moecomp.search import dask_runner

    return list(dask_runner._INSTALLED)


def test_each_worker_holds_only_the_latest_function_from_the_client(dask_runner):
    """The function reaches every worker through a plugin (from the client, never copied
    from worker to worker mid-task) and replaces the previous one there."""
    assert dask_runner.map_chunks(Scale(2, []), [[1], [2], [3]]) == [[2], [4], [6]]
    first = dask_runner._token
    assert dask_runner.map_chunks(Scale(5, []), [[1], [2]]) == [[5], [10]]
    assert dask_runner._token != first
    held = dask_runner.client.run(_installed)
    assert len(held) == dask_runner.n_workers == 2
    assert all(tokens == [dask_runner._token] for tokens in held.values())


def test_local_workers_start_without_dasks_malloc_trim_threshold(dask_runner):
    """Dask's MALLOC_TRIM_THRESHOLD_ freezes glibc's mmap threshold (every large tensor a
    fresh mmap): the local cluster's workers start without it, with one thread each."""
    import os

    env = dask_runner.client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                                          os.environ.get("OMP_NUM_THREADS")))
    assert set(env.values()) == {(None, "1")}


def test_an_unreachable_scheduler_is_a_one_line_error(cli, monkeypatch, tmp_path):
    from moecomp.search import dask_runner

    def unreachable(address, n_workers=2):
        raise OSError(f"Timed out trying to connect to {address} after 30 s")

    monkeypatch.setattr(dask_runner, "DaskRunner", unreachable)
    code, _, err = cli("search", str(DIGITS), "--out", str(tmp_path / "run"),
                       "--dask-scheduler", "tcp://127.0.0.1:1")
    assert code != 0
    assert err.strip().splitlines() == [
        "error: --dask-scheduler: cannot reach tcp://127.0.0.1:1: Timed out trying to "
        "connect to tcp://127.0.0.1:1 after 30 s"]
    assert not (tmp_path / "run").exists()
