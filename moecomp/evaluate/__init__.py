"""Evaluate: the hot path. Objectives and metrics of a whole population of plans.

- :mod:`~moecomp.evaluate.evaluator`: :class:`Evaluator` and :class:`Metrics`, the public
  contract (``docs/architecture.md``);
- :mod:`~moecomp.evaluate.layers`: the layer memo (compressed layers by gene);
- :mod:`~moecomp.evaluate.students`: running students (batching, vmap, prefix cache);
- :mod:`~moecomp.evaluate.chain`: a model's chain stages, found automatically;
- :mod:`~moecomp.evaluate.size`: the coded-size model of a ``.mcz`` file.
"""

from moecomp.evaluate.chain import Chain, Stage, find_chain
from moecomp.evaluate.evaluator import EVAL_QUANTIZERS, OBJECTIVE_MODES, Evaluator, Metrics
from moecomp.evaluate.options import CPU_BLOCK_BYTES, EvalOptions, resolve_device
from moecomp.evaluate.size import (
    CODEBOOK_HEADER_BYTES,
    FILE_HEADER_BYTES,
    HISTOGRAM_ZSTD_SHARE,
    PLAN_BYTES_PER_LAYER,
    STREAM_HEADER_BYTES,
    TENSOR_HEADER_BYTES,
    codebook_bytes,
    dense_coded_bytes,
    fixed_coded_bytes,
    histogram_bytes,
    layer_coded_bytes,
    mask_coded_bytes,
    order0_bits,
    stream_bytes,
)

__all__ = [
    "CODEBOOK_HEADER_BYTES", "CPU_BLOCK_BYTES", "EVAL_QUANTIZERS", "FILE_HEADER_BYTES",
    "HISTOGRAM_ZSTD_SHARE", "OBJECTIVE_MODES", "PLAN_BYTES_PER_LAYER",
    "STREAM_HEADER_BYTES", "TENSOR_HEADER_BYTES", "Chain", "EvalOptions", "Evaluator", "Metrics",
    "Stage",
    "codebook_bytes", "dense_coded_bytes", "fixed_coded_bytes", "histogram_bytes",
    "find_chain", "layer_coded_bytes", "mask_coded_bytes", "order0_bits", "resolve_device",
    "stream_bytes",
]
