"""The Evaluator: objectives and metrics of whole populations of compression plans.

An :class:`Evaluator` binds a :class:`~moecomp.target.Target` and its relevance ranks and turns
gene matrices (or :class:`~moecomp.plan.CompressionPlan` s) into :class:`Metrics`. The result
equals, to float tolerance, the naive computation per individual: copy the teacher, load
``student_state_dict(apply_plan(plan))``, forward the calibration inputs, take the divergence.
It is faster because work that individuals share is done once: the teacher's outputs
(``target.teacher_out``), compressed layers (:mod:`moecomp.evaluate.layers`), batched students
and shared prefixes (:mod:`moecomp.evaluate.students`); sizes come from the coded-size model
(:mod:`moecomp.evaluate.size`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from moecomp.apply import n_pruned
from moecomp.errors import ConfigError
from moecomp.evaluate.layers import Gene, LayerBank, tensor_bytes
from moecomp.evaluate.options import EvalOptions, resolve_device
from moecomp.evaluate.size import fixed_coded_bytes
from moecomp.evaluate.students import StudentRunner, device_model
from moecomp.plan import BITS_RANGE, CompressionPlan
from moecomp.target import Target

OBJECTIVE_MODES = ("3obj", "2obj")
EVAL_QUANTIZERS = ("uniform", "kmeans")
"""Quantizers of ``Evaluator(quantizer=...)``; plans may also use ``shared`` (see
``evaluate_plans``)."""


@dataclass(frozen=True)
class Metrics:
    """Per-solution results of one evaluation, each a float64 array of shape ``(n,)``.

    density: kept weights / compressible weights, in [0, 1] (minimised).
    bits: kept-weighted mean bit-width of the surviving weights, in [1, 8] (minimised); the
        unweighted mean of the genes when a solution keeps no weight at all. A layer with the
        ``shared`` quantizer counts ``ceil(log2(shared_k))`` bits.
    divergence: mean per-sample teacher-student divergence (``target.divergence``) on the
        calibration samples (minimised; KL in nats, NMSE unitless, 1 - cosine, or the
        user's).
    size_bytes: estimated coded size of the whole model (see the module docstring).
    ratio: float32 bytes of all floating tensors of the model / ``size_bytes``.
    metric: the target's task metric (``target.metric``, e.g. top-1 accuracy in %) on the
        calibration samples; NaN where the target has none.
    metric_drop: how much worse than the teacher's on the same samples, in the metric's
        units (points for accuracy; positive = worse; NaN likewise).
    """

    density: np.ndarray
    bits: np.ndarray
    divergence: np.ndarray
    size_bytes: np.ndarray
    ratio: np.ndarray
    metric: np.ndarray
    metric_drop: np.ndarray

    def __len__(self) -> int:
        return int(self.density.shape[0])

    def objectives(self, mode: str = "3obj") -> np.ndarray:
        """Objective matrix ``F: (n, n_obj)``, all minimised.

        ``3obj``: density, bits, divergence. ``2obj``: size = density * bits / 32 (the share
        of the fp32 weight bits left, before entropy coding), divergence.
        """
        if mode == "3obj":
            cols = [self.density, self.bits, self.divergence]
        elif mode == "2obj":
            cols = [self.density * self.bits / 32.0, self.divergence]
        else:
            raise ConfigError("mode", f"must be one of {', '.join(OBJECTIVE_MODES)}; got {mode!r}")
        return np.stack(cols, axis=1).astype(np.float64, copy=False)

    def to_dict(self) -> dict[str, np.ndarray]:
        """Field name -> ``(n,)`` array, in the column order of a run's ``evaluated.csv``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def concat(parts: Sequence[Metrics]) -> Metrics:
        """The metrics of several evaluations, one after the other."""
        if not parts:
            return _empty_metrics()
        return Metrics(
            **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Metrics)}
        )


def _empty_metrics() -> Metrics:
    return Metrics(**{f.name: np.zeros(0, dtype=np.float64) for f in fields(Metrics)})


def _check_matrix(a: Any, name: str, n_rows: int | None, n_cols: int, allowed: str) -> np.ndarray:
    """``a`` as a float64 ``(n_rows, n_cols)`` array of finite values, or a ConfigError."""
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(name, f"must be a numeric (n, {n_cols}) array of {allowed}") from None
    if arr.ndim != 2 or arr.shape[1] != n_cols:
        raise ConfigError(
            name,
            f"must have shape (n, {n_cols}), one column per layer of "
            f"target.layers; got shape {arr.shape}",
        )
    if n_rows is not None and arr.shape[0] != n_rows:
        raise ConfigError(name, f"must have {n_rows} rows like sparsity, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise ConfigError(name, f"must hold {allowed}; found nan or inf")
    return arr


class Evaluator:
    """Metrics of populations of compression plans for one target.

    target: the teacher, its compressible layers and calibration data.
    ranks: name -> int64 rank tensor of each layer's shape (rank 0 pruned first).
    quantizer: ``uniform`` or ``kmeans``, used by ``evaluate``.
    chunk_size: students formed at once (bounded further by ``options.memory_mb``).
    options: memo, prefix cache, batching and memory bounds (:class:`EvalOptions`).
    layers: the layer memo of another Evaluator of the same teacher, layers, ranks and device
    (one on a subset of these calibration samples: the search's low-fidelity evaluations), so
    a plan's compressed layers are built once for both; None: a memo of its own.
    Not thread-safe (its caches are shared state).
    """

    def __init__(
        self,
        target: Target,
        ranks: dict[str, torch.Tensor],
        *,
        quantizer: str = "uniform",
        chunk_size: int = 64,
        options: EvalOptions | None = None,
        layers: LayerBank | None = None,
    ) -> None:
        if quantizer not in EVAL_QUANTIZERS:
            raise ConfigError(
                "quantizer",
                f"must be one of {', '.join(EVAL_QUANTIZERS)}; got "
                f"{quantizer!r} (plans using 'shared' go through evaluate_plans)",
            )
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError("chunk_size", f"must be an integer >= 1, got {chunk_size!r}")
        self.target = target
        self.quantizer = quantizer
        self.chunk_size = chunk_size
        self.options = options if options is not None else EvalOptions()
        self.n_evals = 0
        self._names = target.layer_names
        self._index = {n: i for i, n in enumerate(self._names)}
        self._numel = [ref.numel for ref in target.layers]

        self.device = resolve_device(self.options.device)
        model = device_model(target.teacher, self.device)
        tensors = {n: p.detach() for n, p in model.named_parameters()}
        tensors.update({n: b.detach() for n, b in model.named_buffers()})
        tensors = target.round_dense(tensors)
        memo = self.options.memo
        if layers is not None:
            if layers.device != self.device or layers.names != list(self._names):
                raise ValueError("layers: a layer memo of another device or other layers")
            self._layers = layers
        else:
            self._layers = LayerBank(target, ranks, tensors,
                                     memo_mb=self.options.memo_mb if memo else 0.0,
                                     survivors_mb=self.options.survivors_mb if memo else 0.0,
                                     device=self.device)

        state = target.state_dict()
        self._fp32_bytes = 4.0 * sum(v.numel() for v in state.values() if v.is_floating_point())
        dense = target.dense_torch_dtype
        self._fixed_bytes = float(
            fixed_coded_bytes(
                [tensor_bytes(v.to(dense) if v.is_floating_point() else v)
                 for n, v in state.items() if n not in self._index],
                len(self._names),
            )
        )
        self._teacher_metric = target.teacher_metric("calibration")
        self._students = StudentRunner(target, model, tensors, self._layers.weights,
                                       options=self.options, chunk_size=chunk_size,
                                       device=self.device)
        self._sizes_s = 0.0
        self._total_s = 0.0

    # --- public -----------------------------------------------------------------------
    @property
    def path(self) -> str:
        """How students run: ``chain`` (prefix cache) or ``generic``, ``+vmap`` or ``+loop``."""
        return self._students.path

    @property
    def chain(self) -> str:
        """Whether the model was found to be a chain, and its boundaries or why not
        (:mod:`moecomp.evaluate.chain`)."""
        return self._students.chain_reason

    def timings(self) -> dict[str, float]:
        """Seconds spent by ``evaluate`` calls so far: ``total``; ``forward`` (the students'
        stage forwards); ``weights`` (dense student weights: quantizers, k-means, memo,
        copies); ``sizes`` (coded-size estimate, for layers whose weights were not built);
        ``measure`` (divergence and metric); ``other`` (the rest: trie, sorting, checks).
        Everything but ``forward`` is the per-evaluation overhead."""
        t = dict(self._students.timing)
        t["sizes"] = self._sizes_s
        t["total"] = self._total_s
        t["other"] = max(0.0, self._total_s - sum(v for k, v in t.items() if k != "total"))
        return t

    def reset_timings(self) -> None:
        for k in self._students.timing:
            self._students.timing[k] = 0.0
        self._sizes_s = self._total_s = 0.0

    @property
    def teacher_metric(self) -> float:
        """The teacher's metric on the calibration samples (NaN without a metric)."""
        return self._teacher_metric

    @property
    def layers(self) -> LayerBank:
        """The layer memo (to share with an Evaluator on a subset of the samples)."""
        return self._layers

    def cache_info(self) -> dict[str, int]:
        """Hits, misses and entries of the layer memo and the activation cache."""
        return self._layers.info() | self._students.info()

    def clear_caches(self) -> None:
        self._layers.clear()
        self._students.clear()

    def evaluate(self, sparsity: Any, bits: Any) -> Metrics:
        """Metrics of ``n`` solutions given as gene matrices.

        sparsity: ``(n, L)`` floats in [0, 1), the share pruned per layer of ``target.layers``.
        bits: ``(n, L)`` integers 1..8 (integral floats are accepted).
        """
        L = len(self._names)
        s = _check_matrix(sparsity, "sparsity", None, L, "values in [0, 1)")
        b = _check_matrix(bits, "bits", s.shape[0], L, "integers in 1..8")
        if ((s < 0) | (s >= 1)).any():
            bad = s[(s < 0) | (s >= 1)][0]
            raise ConfigError("sparsity", f"must be in [0, 1), got {bad!r}")
        if (b != np.round(b)).any() or ((b < BITS_RANGE[0]) | (b > BITS_RANGE[1])).any():
            bad = b[(b != np.round(b)) | (b < BITS_RANGE[0]) | (b > BITS_RANGE[1])][0]
            raise ConfigError("bits", f"must be integers in 1..8, got {bad!r}")
        q = self.quantizer
        genes: list[tuple[Gene, ...]] = [
            tuple(
                (q, n_pruned(self._numel[j], float(s[i, j])), int(b[i, j]), ())
                for j in range(len(self._names))
            )
            for i in range(s.shape[0])
        ]
        return self._evaluate_genes(genes)

    def evaluate_plans(self, plans: Sequence[CompressionPlan]) -> Metrics:
        """Metrics of ``CompressionPlan`` s; each must name exactly the layers of the target.

        Layers may use any quantizer of the plan, ``shared`` (pooled codebook of
        ``plan.shared_k`` levels) included.
        """
        return self._evaluate_genes(self._plan_genes(plans))

    def _plan_genes(self, plans: Sequence[CompressionPlan]) -> list[tuple[Gene, ...]]:
        genes: list[tuple[Gene, ...]] = []
        want = set(self._names)
        for p, plan in enumerate(plans):
            if not isinstance(plan, CompressionPlan):
                raise ConfigError(
                    f"plans[{p}]", f"must be a CompressionPlan, got {type(plan).__name__}"
                )
            if set(plan.layers) != want:
                raise ConfigError(
                    f"plans[{p}].layers",
                    f"must name exactly the target's layers "
                    f"{', '.join(self._names)}; got {', '.join(plan.layers)}",
                )
            pruned = [
                n_pruned(self._numel[j], plan.layers[name].sparsity)
                for j, name in enumerate(self._names)
            ]
            group = tuple(
                (j, pruned[j])
                for j, name in enumerate(self._names)
                if plan.layers[name].quantizer == "shared"
            )
            row: list[Gene] = []
            for j, name in enumerate(self._names):
                lp = plan.layers[name]
                if lp.quantizer == "shared":
                    assert plan.shared_k is not None  # CompressionPlan validates this
                    row.append(("shared", pruned[j], plan.shared_k, group))
                else:
                    row.append((lp.quantizer, pruned[j], lp.bits, ()))
            genes.append(tuple(row))
        return genes

    def layer_weights(self, plan: CompressionPlan) -> dict[str, torch.Tensor]:
        """The dense student weights the evaluator runs for ``plan`` (name -> tensor of the
        layer's shape, on the evaluation device): bit for bit those of
        ``student_state_dict(apply_plan(plan, ...))``."""
        (row,) = self._plan_genes([plan])
        return {name: self._layers.weights(j, [row[j]])[0]
                for j, name in enumerate(self._names)}

    def _evaluate_genes(self, genes: list[tuple[Gene, ...]]) -> Metrics:
        n = len(genes)
        if n == 0:
            return _empty_metrics()
        t0 = time.perf_counter()
        div, met = self._students.measure(genes)
        t1 = time.perf_counter()
        density, bits, size = self._layers.sizes(genes, self._fixed_bytes)
        t2 = time.perf_counter()
        self._sizes_s += t2 - t1
        self._total_s += t2 - t0
        self.n_evals += n
        metric = self.target.metric
        drop = metric.drop(self._teacher_metric, met) if metric is not None else met
        return Metrics(
            density=density,
            bits=bits,
            divergence=div,
            size_bytes=size,
            ratio=self._fp32_bytes / size,
            metric=met,
            metric_drop=drop,
        )
