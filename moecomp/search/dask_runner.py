"""A runner that evaluates population chunks on Dask workers (``distributed``).

By default it starts a :class:`distributed.LocalCluster` of worker *processes* with one
thread each (the evaluation is PyTorch on the CPU: processes avoid the GIL and one thread per
worker avoids oversubscribing the cores torch already uses); with ``address`` it joins a
running scheduler, e.g. one started by ``dask scheduler`` and ``dask worker`` on other
machines. Results come back in chunk order, as :class:`moecomp.search.runner.Runner` asks.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import dask
from distributed import Client, LocalCluster, WorkerPlugin

from moecomp.factories import user_folders

C = TypeVar("C")
R = TypeVar("R")


def same_function(a: Callable[[Any], Any], b: Callable[[Any], Any] | None) -> bool:
    """Whether ``a`` computes what ``b`` does, so the workers' copy of ``b`` can serve.

    True when they are the same object or equal (a bound method of the same object), or
    instances of one class whose attributes are the same objects (a search wraps the same
    evaluator in a new small callable every generation). The runner contract makes ``fn``
    deterministic, so the workers' copy, and the caches it filled, give the same results.
    """
    if b is None:
        return False
    if a is b or a == b:
        return True
    if type(a) is not type(b) or not hasattr(a, "__dict__") or not hasattr(b, "__dict__"):
        return False
    va, vb = vars(a), vars(b)
    if va.keys() != vb.keys():
        return False
    return all(
        x is y or (isinstance(x, str | int | float | bool) and type(x) is type(y) and x == y)
        for x, y in ((va[k], vb[k]) for k in va)
    )


class _ImportPaths(WorkerPlugin):
    """Puts the problem folders user factories were imported from on a worker's
    ``sys.path``, so that it can unpickle the teacher and the user's measures. Workers on
    other machines need those folders at the same paths (or the modules on PYTHONPATH)."""

    def __init__(self, folders: Sequence[str]) -> None:
        self.folders = list(folders)

    def setup(self, worker: Any) -> None:
        for f in self.folders:
            if f not in sys.path:
                sys.path.append(f)


ENVIRON = "distributed.nanny.pre-spawn-environ"


def worker_environ() -> dict[str, Any]:
    """Dask's environment for new worker processes without ``MALLOC_TRIM_THRESHOLD_``.

    Dask sets it (65536) to return memory to the OS sooner; setting it also freezes glibc's
    mmap threshold at 128 KiB, so every large tensor a forward allocates is a fresh mmap
    with its page faults: LeNet-5's evaluation ran at half the speed of a plain process on
    each worker. The thread counts Dask sets (one per worker) are kept."""
    env = dict(dask.config.get(ENVIRON, default={}) or {})
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    return env


def _memory() -> dict[str, int]:
    import psutil

    rss = int(psutil.Process().memory_info().rss)
    try:
        import resource

        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except ImportError:  # not on this OS
        peak = rss
    return {"rss": rss, "peak": max(peak, rss)}


# On a worker: the functions installed by _Install, by token (only the latest is kept).
_INSTALLED: dict[str, Callable[[Any], Any]] = {}


class _Install(WorkerPlugin):
    """Puts ``fn`` on every worker, present and future, under ``token``: each worker gets
    it from the client, pickled once in a quiet moment, never from another worker. (A
    scattered object may be copied from worker to worker, e.g. when Dask's memory manager
    drops replicas, and the copy is pickled there while a task runs it: the evaluator's
    chain stages patch the model's modules for the length of a forward, so such a copy
    could carry a patch; a search on LeNet-5 failed and hung that way.)"""

    def __init__(self, token: str, fn: Callable[[Any], Any]) -> None:
        self.token = token
        self.fn = fn

    def setup(self, worker: Any) -> None:
        _INSTALLED.clear()
        _INSTALLED[self.token] = self.fn


def _call(chunk: Any, *, token: str) -> Any:
    """Runs on a worker: the function installed under ``token``, not re-sent per chunk."""
    fn = _INSTALLED.get(token)
    if fn is None:
        raise RuntimeError(f"no function {token} on this worker (it joined while the "
                           "function was being installed?)")
    return fn(chunk)


class DaskRunner:
    """Evaluates chunks on a Dask cluster; a context manager that closes what it started.

    address: a scheduler address (``tcp://host:8786``); None starts a LocalCluster of
    ``n_workers`` processes, one thread each, no dashboard.
    """

    def __init__(self, address: str | None = None, n_workers: int = 2) -> None:
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        self.address = address
        self._cluster: LocalCluster | None = None
        if address is None:
            with dask.config.set({ENVIRON: worker_environ()}):
                self._cluster = LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                )
            self._client = Client(self._cluster)
        else:
            self._client = Client(address)
        # The last function installed on the workers and its token there: a search calls
        # map_chunks with the same evaluator every generation, and the evaluator holds the
        # teacher and calibration data (and fills memo caches on the workers), which should
        # cross the network once, not per chunk or generation.
        self._fn: Callable[[Any], Any] | None = None
        self._token: str | None = None
        self._folders: list[str] = []

    @property
    def client(self) -> Client:
        return self._client

    @property
    def n_workers(self) -> int:
        """Workers the scheduler has now: a search splits each population into at least
        this many chunks."""
        return len(self._workers())

    def _workers(self) -> list[str]:
        """The workers' addresses, asked of the scheduler now. Not ``scheduler_info()``: the
        client refreshes that cache in the background without per-worker entries, so its
        ``"workers"`` may read empty while every worker is up."""
        return sorted(self._client.nthreads())

    def worker_memory(self) -> dict[str, dict[str, int]]:
        """Each worker process's resident memory now and its peak so far, bytes: ``{address:
        {"rss": ..., "peak": ...}}`` (peak where the OS reports it, else the current)."""
        return dict(self._client.run(_memory))

    def _remote(self, fn: Callable[[Any], Any]) -> str:
        """The token of ``fn`` on the workers, installing it first when it is new."""
        folders = user_folders()
        if folders != self._folders:
            self._client.register_plugin(_ImportPaths(folders), name="moecomp-import-paths")
            self._folders = folders
        if self._token is None or not same_function(fn, self._fn):
            self._fn = fn
            self._token = uuid.uuid4().hex
            self._client.register_plugin(_Install(self._token, fn), name="moecomp-function")
        return self._token

    def map_chunks(self, fn: Callable[[C], R], chunks: Sequence[C]) -> list[R]:
        """``[fn(c) for c in chunks]``, computed on the workers; a worker's error re-raises."""
        if len(chunks) == 0:
            return []
        token = self._remote(fn)
        # chunk i to the same worker every call (a preference: others may take it), so a
        # worker sees the same region of gene-sorted populations (problem._gene_order) and
        # its prefix cache the neighbours' activations
        workers = self._workers()
        futures = [self._client.submit(_call, c, token=token, pure=False,
                                       workers=[workers[i % len(workers)]] if workers else None,
                                       allow_other_workers=bool(workers))
                   for i, c in enumerate(chunks)]
        try:
            return list(self._client.gather(futures))
        finally:
            for f in futures:
                f.release()

    def close(self) -> None:
        """Close the client and, if this runner started it, the local cluster."""
        self._fn = None
        self._token = None
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def __enter__(self) -> DaskRunner:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.address or "LocalCluster"
        return f"DaskRunner({where}, workers={self.n_workers})"
