"""Runners: where the chunks of a population are evaluated.

The search hands a runner a function and a list of chunks (slices of one generation's
population) and gets the results back in the same order. In-process by default
(:class:`LocalRunner`); a Dask runner (``tune``) sends the chunks to workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

C = TypeVar("C")
R = TypeVar("R")


@runtime_checkable
class Runner(Protocol):
    """Evaluates chunks of a population.

    ``map_chunks(fn, chunks)`` must return ``[fn(c) for c in chunks]``: the same results in
    the same order, however and wherever they are computed. ``fn`` is deterministic, so a
    runner may retry a chunk.
    """

    def map_chunks(self, fn: Callable[[C], R], chunks: Sequence[C]) -> list[R]: ...


class LocalRunner:
    """Evaluates every chunk in this process, one after the other."""

    def map_chunks(self, fn: Callable[[C], R], chunks: Sequence[C]) -> list[R]:
        return [fn(c) for c in chunks]
