"""Switches and memory bounds of an :class:`~moecomp.evaluate.Evaluator`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moecomp.errors import ConfigError

CPU_BLOCK_BYTES = 24 * 2**20
"""On the CPU, a batch's stacked weights and outputs stay below this. glibc serves blocks
above 32 MiB with fresh mmap pages every time; smaller ones are recycled, and page faults
would otherwise cost more than batching saves (bench/bench_evaluate.py)."""


@dataclass(frozen=True)
class EvalOptions:
    """Switches and memory bounds of an :class:`Evaluator`.

    memo: keep compressed layers (dequantised weight + coded-size estimate) in an LRU keyed
        by ``(layer, n_pruned, bits, quantizer)``.
    prefix_cache: for registered chain models (:data:`STAGES`), share the activations of
        common gene prefixes; off, or for any other model, the whole model is one stage.
    batched: run the students of a chunk as one ``torch.vmap``'d forward; off, one forward
        per student (what the fallback for models vmap cannot trace does anyway).
    memo_mb: bound of the layer memo (dequantised weights), MiB.
    cache_mb: bound of the activation cache kept across calls (prefixes and outputs), MiB;
        0 keeps nothing across calls.
    memory_mb: bound of the activations held while a chunk is evaluated, MiB; the chunk and
        the batches of a stage shrink so that about this much is live at once.
    """

    memo: bool = True
    prefix_cache: bool = True
    batched: bool = True
    memo_mb: float = 512.0
    cache_mb: float = 512.0
    memory_mb: float = 2048.0

    def __post_init__(self) -> None:
        for name in ("memo", "prefix_cache", "batched"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"options.{name}", f"must be true or false, got {getattr(self, name)!r}"
                )
        for name in ("memo_mb", "cache_mb", "memory_mb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
                raise ConfigError(f"options.{name}", f"must be a finite number >= 0, got {v!r}")
