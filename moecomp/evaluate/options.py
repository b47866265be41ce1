"""Switches and memory bounds of an :class:`~moecomp.evaluate.Evaluator`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from moecomp.errors import ConfigError

CPU_BLOCK_BYTES = 24 * 2**20
"""On the CPU, a batch's stacked weights and outputs stay below this. glibc serves blocks
above 32 MiB with fresh mmap pages every time; smaller ones are recycled, and page faults
would otherwise cost more than batching saves (bench/bench_evaluate.py)."""


@dataclass(frozen=True)
class EvalOptions:
    """Switches and memory bounds of an :class:`Evaluator`.

    memo: keep compressed layers (dequantised weight + coded-size estimate) in an LRU keyed
        by ``(layer, n_pruned, bits, quantizer)``, and the survivors' histograms keyed by
        ``(layer, n_pruned)``; off, every gene is computed from the teacher's weights.
    prefix_cache: for models found to be chains (:mod:`moecomp.evaluate.chain`), share the
        activations of common gene prefixes; off, or for any other model, the whole model is
        one stage.
    batched: ``auto``: run the students of a chunk as one ``torch.vmap``'d forward, except,
        on the CPU, the stages that read a convolution's weight (vmap makes it a grouped
        convolution and max-pooling its variant with indices: LeNet-5 at 0.6x of a loop's
        speed), which run one student at a time; true: vmap whenever it can batch the model;
        false: one forward per student (what the fallback for models vmap cannot trace does
        anyway).
    memo_mb: bound of the layer memo (dequantised weights), MiB.
    survivors_mb: bound of the survivor histograms per ``(layer, n_pruned)`` (shared by every
        bit-width and quantizer; a few KiB to 1.5 MiB each, plus 2 bytes a weight when the
        survivors' range is not the layer's), MiB.
    cache_mb: bound of the activation cache kept across calls (prefixes and outputs), MiB;
        0 keeps nothing across calls.
    memory_mb: bound of the activations held while a chunk is evaluated, MiB; the chunk and
        the batches of a stage shrink so that about this much is live at once.
    trie: ``auto``: each chunk of a chain model runs by the prefix trie or as whole models,
        whichever is estimated cheaper (measured times); ``always``: by the trie.
    device: where students run: ``auto`` (CUDA when present, else the CPU), ``cpu``,
        ``cuda`` or ``cuda:N``. Compressed layers are computed on the CPU (deterministic
        histograms) and moved there; the teacher's outputs are moved there once.
    """

    memo: bool = True
    prefix_cache: bool = True
    batched: bool | str = "auto"
    memo_mb: float = 512.0
    cache_mb: float = 512.0
    memory_mb: float = 2048.0
    survivors_mb: float = 256.0
    trie: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.batched != "auto" and not isinstance(self.batched, bool):
            raise ConfigError("options.batched",
                              f"must be auto, true or false, got {self.batched!r}")
        for name in ("memo", "prefix_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"options.{name}", f"must be true or false, got {getattr(self, name)!r}"
                )
        if self.trie not in ("auto", "always"):
            raise ConfigError("options.trie", f"must be auto or always, got {self.trie!r}")
        check_device(self.device)
        for name in ("memo_mb", "cache_mb", "memory_mb", "survivors_mb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
                raise ConfigError(f"options.{name}", f"must be a finite number >= 0, got {v!r}")


DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
"""What a device setting may say (``EvalOptions.device``, ``--device``)."""


def check_device(name: object, *, field: str = "options.device") -> str:
    """``name`` if it is a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``), else a
    ConfigError naming ``field``. Whether the device exists is :func:`resolve_device`'s."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(field, f"must be {DEVICE_NAMES}, got {name!r}")
    return name


def resolve_device(name: str, *, field: str = "options.device") -> torch.device:
    """The device a setting names: ``auto`` is CUDA when torch sees a GPU, else the CPU;
    asking for CUDA where there is none (or for a GPU index torch does not see) is a
    ConfigError naming ``field``."""
    check_device(name, field=field)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(field, f"{name} asked for, but torch sees no CUDA device here "
                              "(use auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(field, f"{name} asked for, but torch sees "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    return dev
