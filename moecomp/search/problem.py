"""The search problems: pymoo ``Problem`` s over compression genes, vectorised over a population.

``CompressionProblem`` (the default): two integer genes per compressible tensor, laid out as
``X = [s_1 .. s_L, b_1 .. b_L]``:

- ``s_l``: sparsity step index in ``0 .. round(s_max_l / step)``; the layer's sparsity is
  ``s_l * step``. ``s_max_l`` is ``genes.sparsity_max``, or the layer's redundancy bound
  (seed 3) when ``genes.redundancy_bound`` is set, whichever is smaller.
- ``b_l``: bits in ``bits_min .. bits_max`` (``2**b_l`` levels for the survivors).

Objectives (minimised): ``3obj`` density, bits, divergence; ``2obj`` size, divergence (from
``Metrics.objectives(mode)``). Constraints ``G <= 0``: ``divergence - max_divergence`` and
``metric_drop - max_metric_drop`` when those are set.

``SharedCodebookProblem`` (seed 2, weight sharing): one gene, the number ``K`` of bins of the
codebook pooled over all layers; every layer is pruned at the fixed ``genes.shared_sparsity``;
objectives size vs divergence (or the metric's drop).

Every evaluation is kept (``take_records``) so the run folder lists all evaluated points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from pymoo.core.problem import Problem

from moecomp.config import ProblemConfig
from moecomp.errors import ConfigError
from moecomp.plan import CompressionPlan, LayerPlan
from moecomp.runs import METRICS
from moecomp.search.runner import LocalRunner, Runner
from moecomp.target import Target


class MetricsLike(Protocol):
    """What ``Evaluator.evaluate`` returns (``moecomp.evaluate.Metrics``); each field ``(n,)``."""

    @property
    def density(self) -> Any: ...
    @property
    def bits(self) -> Any: ...
    @property
    def divergence(self) -> Any: ...
    @property
    def size_bytes(self) -> Any: ...
    @property
    def ratio(self) -> Any: ...
    @property
    def metric(self) -> Any: ...
    @property
    def metric_drop(self) -> Any: ...

    def objectives(self, mode: str) -> Any: ...


class EvaluatorLike(Protocol):
    """The contract of ``moecomp.evaluate.Evaluator`` the search relies on."""

    def evaluate(self, sparsity: np.ndarray, bits: np.ndarray) -> MetricsLike: ...

    def evaluate_plans(self, plans: Sequence[CompressionPlan]) -> MetricsLike: ...


@dataclass(frozen=True)
class EvalRecord:
    """One evaluated batch: genes ``X (n, n_var)`` int, objectives ``F (n, n_obj)``,
    constraints ``G (n, n_ieq)`` (``n_ieq`` may be 0), metrics name -> ``(n,)``."""

    X: np.ndarray
    F: np.ndarray
    G: np.ndarray
    metrics: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.X)


def _numpy(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float64)


def metrics_arrays(m: MetricsLike, mode: str, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(objectives (n, n_obj), metrics name -> (n,))`` as float64 arrays, checked finite."""
    F = _numpy(m.objectives(mode)).reshape(n, -1)
    out = {name: _numpy(getattr(m, name)).reshape(n) for name in METRICS}
    if not np.all(np.isfinite(F)):
        bad = np.flatnonzero(~np.all(np.isfinite(F), axis=1))
        raise FloatingPointError(
            f"the evaluator returned non-finite objectives for rows "
            f"{bad.tolist()[:10]} of a batch of {n}"
        )
    return F, out


class _GenesChunk:
    """Evaluates one chunk of gene matrices: a picklable callable for any runner.

    A chunk is ``(sparsity, bits)``, evaluated by ``evaluator`` (all calibration samples), or
    ``(sparsity, bits, "low")``, evaluated by ``low`` (the first samples only, for screening).
    One callable serves both, so a runner that keeps its function on workers (Dask) sends the
    evaluators once.
    """

    def __init__(self, evaluator: EvaluatorLike, mode: str,
                 low: EvaluatorLike | None = None) -> None:
        self.evaluator = evaluator
        self.mode = mode
        self.low = low

    def __call__(
        self, chunk: tuple[Any, ...]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        sparsity, bits = chunk[0], chunk[1]
        ev = self.evaluator
        if len(chunk) > 2:
            if self.low is None:
                raise RuntimeError("a low-fidelity chunk, but no low-fidelity evaluator")
            ev = self.low
        return metrics_arrays(ev.evaluate(sparsity, bits), self.mode, len(sparsity))


class _PlansChunk:
    """Evaluates one chunk of CompressionPlans (weight-sharing mode)."""

    def __init__(self, evaluator: EvaluatorLike, mode: str) -> None:
        self.evaluator = evaluator
        self.mode = mode

    def __call__(self, plans: list[CompressionPlan]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return metrics_arrays(self.evaluator.evaluate_plans(plans), self.mode, len(plans))


def _concat(
    parts: list[tuple[np.ndarray, dict[str, np.ndarray]]],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    F = np.concatenate([p[0] for p in parts], axis=0)
    metrics = {k: np.concatenate([p[1][k] for p in parts]) for k in METRICS}
    return F, metrics


def constraint_values(config: ProblemConfig, metrics: dict[str, np.ndarray]) -> np.ndarray:
    """``G (n, n_ieq)``, feasible where ``<= 0``: divergence and metric-drop limits."""
    o = config.objectives
    cols = []
    if o.max_divergence is not None:
        cols.append(metrics["divergence"] - o.max_divergence)
    if o.max_metric_drop is not None:
        cols.append(metrics["metric_drop"] - o.max_metric_drop)
    n = len(metrics["divergence"])
    return np.stack(cols, axis=1) if cols else np.zeros((n, 0))


def n_constraints(config: ProblemConfig) -> int:
    o = config.objectives
    return int(o.max_divergence is not None) + int(o.max_metric_drop is not None)


class SearchProblem(Problem):
    """What the run driver needs from a problem, on top of pymoo's ``Problem``.

    config: the ProblemConfig of the current run (``run_search`` sets it: ``base_config`` with
        that run's search overrides). base_config: the config the problem was built with.
    layer_names: compressible tensors, in gene order.
    ref_point: ``(n_obj,)`` raw objective units; HV is taken on ``F / ref_point``.
    compress_dir: ``(n_var,)`` +1 where a larger gene compresses more, -1 where smaller does.
    groups: ``(n_var,)`` the layer each gene belongs to (for layer-wise crossover).
    gene_share: ``(n_var,)`` the share of all compressible weights in each gene's layer.
    objective_labels: axis labels with units, one per objective.
    """

    config: ProblemConfig
    base_config: ProblemConfig
    layer_names: list[str]
    ref_point: np.ndarray
    compress_dir: np.ndarray
    groups: np.ndarray
    gene_share: np.ndarray
    objective_labels: tuple[str, ...]
    runner: Runner

    def __init__(
        self, *, n_var: int, n_obj: int, n_ieq_constr: int, xl: np.ndarray, xu: np.ndarray
    ) -> None:
        super().__init__(
            n_var=n_var,
            n_obj=n_obj,
            n_ieq_constr=n_ieq_constr,
            xl=xl,
            xu=xu,
            vtype=int,
            elementwise=False,
        )
        self._records: list[EvalRecord] = []

    # --- to be provided by subclasses ---------------------------------------------------
    def evaluate_genes(self, X: np.ndarray) -> EvalRecord:
        raise NotImplementedError

    def gene_matrices(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sparsity (n, L) float, bits (n, L) int)`` of genes ``X (n, n_var)``."""
        raise NotImplementedError

    def extra_columns(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Columns of evaluated.csv beyond the per-layer genes (e.g. ``shared_k``)."""
        return {}

    # --- pymoo --------------------------------------------------------------------------
    def _evaluate(self, x: np.ndarray, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        rec = self.evaluate_genes(np.asarray(x))
        self._records.append(rec)
        out["F"] = rec.F
        if self.n_ieq_constr:
            out["G"] = rec.G

    def take_records(self) -> list[EvalRecord]:
        """The evaluations made through pymoo's ``evaluate`` since the last call."""
        recs, self._records = self._records, []
        return recs


@dataclass(frozen=True)
class LayerGenes:
    """The layer-wise gene space. ``s_idx_max (L,)``: highest sparsity step index per layer;
    ``weight_share (L,)``: each layer's share of all compressible weights; ``numel (L,)``
    int64: its number of weights."""

    names: tuple[str, ...]
    step: float
    s_idx_max: np.ndarray
    bits_min: int
    bits_max: int
    weight_share: np.ndarray
    numel: np.ndarray

    @property
    def n_layers(self) -> int:
        return len(self.names)

    @property
    def xl(self) -> np.ndarray:
        return np.concatenate([np.zeros(self.n_layers, int), np.full(self.n_layers, self.bits_min)])

    @property
    def xu(self) -> np.ndarray:
        return np.concatenate([self.s_idx_max.astype(int), np.full(self.n_layers, self.bits_max)])

    @property
    def compress_dir(self) -> np.ndarray:
        return np.concatenate([np.ones(self.n_layers, int), -np.ones(self.n_layers, int)])

    @property
    def groups(self) -> np.ndarray:
        return np.concatenate([np.arange(self.n_layers), np.arange(self.n_layers)])

    def decode(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sparsity (n, L) float in [0, 1), bits (n, L) int)`` of genes ``X (n, 2L)``."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != 2 * self.n_layers:
            raise ValueError(f"genes: expected shape (n, {2 * self.n_layers}), got {X.shape}")
        Xi = np.rint(X).astype(np.int64)
        if np.any(Xi < self.xl) or np.any(Xi > self.xu):
            raise ValueError(
                "genes out of bounds; repair them first (moecomp.search.operators."
                "repair.repair_genes)"
            )
        L = self.n_layers
        return np.round(Xi[:, :L] * self.step, 6), Xi[:, L:]

    def encode(self, sparsity: np.ndarray, bits: np.ndarray) -> np.ndarray:
        """Genes ``(n, 2L)`` of sparsity ``(n, L)`` (rounded to the step) and bits ``(n, L)``."""
        s_idx = np.rint(np.asarray(sparsity, dtype=float) / self.step).astype(np.int64)
        return np.concatenate([s_idx, np.asarray(bits, dtype=np.int64)], axis=1)


def sparsity_index_max(s_max: float, step: float) -> int:
    """``round(s_max / step)``, lowered until ``index * step < 1`` (a tensor keeps a weight)."""
    idx = int(round(s_max / step))
    while idx > 0 and round(idx * step, 6) >= 1.0:
        idx -= 1
    return idx


def layer_genes(
    config: ProblemConfig, target: Target, bounds: dict[str, float] | None = None
) -> LayerGenes:
    """The gene space of ``target`` under ``config.genes``; ``bounds``: per-layer maximum
    sparsity (the redundancy bound) capping ``genes.sparsity_max``."""
    g = config.genes
    s_max = []
    for ref in target.layers:
        cap = g.sparsity_max
        if bounds is not None:
            if ref.name not in bounds:
                raise ConfigError("genes.redundancy_bound", f"no bound for layer {ref.name}")
            cap = min(cap, float(bounds[ref.name]))
        s_max.append(sparsity_index_max(cap, g.sparsity_step))
    numel = np.array([ref.numel for ref in target.layers], dtype=float)
    return LayerGenes(
        names=tuple(target.layer_names),
        step=g.sparsity_step,
        s_idx_max=np.array(s_max, dtype=np.int64),
        bits_min=g.bits_min,
        bits_max=g.bits_max,
        weight_share=numel / numel.sum(),
        numel=numel.astype(np.int64),
    )


def _workers(runner: Any) -> int:
    """How many workers a runner has (``n_workers``; 1 for one without)."""
    return int(getattr(runner, "n_workers", 1) or 1)


def _chunks(n: int, size: int, workers: int = 1) -> list[slice]:
    """Slices of ``n`` individuals, at most ``size`` each, and at least one per worker when
    a runner has several (Dask)."""
    if workers > 1:
        size = min(size, max(1, math.ceil(n / workers)))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _gene_order(X: np.ndarray) -> np.ndarray:
    """The individuals sorted by their genes, first layer's first: key (s0, b0, s1, b1, ...)
    (sparsity genes come first in ``X``, then bits genes). Contiguous chunks of this order
    hold students that share leading layers, so each worker's prefix cache shares their
    activations, as the in-process evaluator's sorted chunks do; the Dask runner sends chunk
    i to the same worker every generation, where its neighbours' prefixes were cached."""
    L = X.shape[1] // 2
    return np.lexsort([X[:, j + L * half] for j in range(L) for half in (0, 1)][::-1])


class CompressionProblem(SearchProblem):
    """Per-layer sparsity and bits, ``2L`` integer genes (see the module docstring).

    config: the resolved ProblemConfig; evaluator: ``moecomp.evaluate.Evaluator`` (or anything
    with its contract); genes: the gene space (``layer_genes``); runner: where chunks of
    ``config.search.chunk_size`` individuals are evaluated (default in-process); ranks: the
    relevance ranks the evaluator uses (for the surrogate's proxies and the low-fidelity
    evaluator; computed again, from the disk cache, when absent).

    The surrogate of ``moecomp.search.surrogate`` needs the evaluator's ``target`` (a real
    :class:`~moecomp.evaluate.Evaluator` has one): without it :attr:`target` is None and the
    search runs without screening.
    """

    def __init__(
        self,
        config: ProblemConfig,
        evaluator: EvaluatorLike,
        genes: LayerGenes,
        *,
        runner: Runner | None = None,
        ranks: dict[str, torch.Tensor] | None = None,
    ) -> None:
        mode = config.objectives.mode
        super().__init__(
            n_var=2 * genes.n_layers,
            n_obj=3 if mode == "3obj" else 2,
            n_ieq_constr=n_constraints(config),
            xl=genes.xl,
            xu=genes.xu,
        )
        self.config = config
        self.base_config = config
        self.evaluator = evaluator
        self.genes = genes
        self.runner = runner if runner is not None else LocalRunner()
        self.layer_names = list(genes.names)
        self.ref_point = np.asarray(config.objectives.ref_point, dtype=np.float64)
        self.compress_dir = genes.compress_dir
        self.groups = genes.groups
        self.gene_share = np.concatenate([genes.weight_share, genes.weight_share])
        from moecomp.search.objectives import objective_space

        self.objective_labels = objective_space(config).labels
        self._ranks = ranks
        self._low: EvaluatorLike | None = None
        self._low_samples = 0

    def gene_matrices(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.genes.decode(X)

    def evaluate_genes(self, X: np.ndarray) -> EvalRecord:
        """Evaluate genes ``X (n, 2L)`` (chunked through the runner)."""
        X = np.rint(np.asarray(X)).astype(np.int64)
        F, metrics = self._map_genes(X)
        return EvalRecord(X=X, F=F, G=constraint_values(self.config, metrics), metrics=metrics)

    # --- what the surrogate and the screening need ---------------------------------------
    @property
    def target(self) -> Target | None:
        """The evaluator's Target, when it has one."""
        t = getattr(self.evaluator, "target", None)
        return t if isinstance(t, Target) else None

    @property
    def n_samples(self) -> int:
        """Calibration samples of a full evaluation (0 without a target)."""
        t = self.target
        return len(t.calib) if t is not None else 0

    def ranks(self) -> dict[str, torch.Tensor]:
        """The relevance ranks (given, or computed from the configured scorer's disk cache)."""
        if self._ranks is None:
            t = self.target
            if t is None:
                raise RuntimeError("no ranks and no target to compute them from")
            self._ranks = layer_ranks(t, self.config)
        return self._ranks

    def set_low_fidelity(self, n_samples: int) -> None:
        """Evaluate low-fidelity chunks on the first ``n_samples`` calibration samples
        (``0 < n_samples < n_samples of a full evaluation``): a second Evaluator on a Target
        whose calibration split is those samples, with the same ranks, quantizer and
        divergence (the divergence's fitted constants stay those of the whole split, so a
        sample's divergence is the same number in both)."""
        t = self.target
        if t is None or not 0 < n_samples < len(t.calib):
            raise ValueError(f"low fidelity needs a target and 0 < n_samples < "
                             f"{self.n_samples}, got {n_samples}")
        if self._low is not None and self._low_samples == n_samples:
            return
        from moecomp.evaluate import Evaluator

        sub = Target(
            teacher=t.teacher, layers=t.layers, calib=t.calib.take(slice(0, n_samples)),
            val=t.val, test=t.test, divergence=t.divergence, metric=t.metric, output=t.output,
            dense_dtype=t.dense_dtype, batch_size=t.batch_size, pool=t.pool,
        )
        sub.divergence = t.divergence
        ev = self.evaluator
        # the layer memo is the full evaluator's: a candidate's compressed layers, built for
        # its low-fidelity evaluation, serve its full one (they do not depend on the samples)
        self._low = Evaluator(
            sub, self.ranks(), quantizer=self.config.genes.quantizer,
            chunk_size=self.config.search.chunk_size, options=getattr(ev, "options", None),
            layers=ev.layers if isinstance(ev, Evaluator) else None,
        )
        self._low_samples = n_samples

    @property
    def low_samples(self) -> int:
        """Samples of a low-fidelity evaluation (0: none set)."""
        return self._low_samples if self._low is not None else 0

    def evaluate_low(self, X: np.ndarray) -> np.ndarray:
        """Divergence ``(n,)`` of genes ``X (n, 2L)`` on the low-fidelity samples."""
        if self._low is None:
            raise RuntimeError("set_low_fidelity first")
        _, metrics = self._map_genes(np.rint(np.asarray(X)).astype(np.int64), low=True)
        return metrics["divergence"]

    def _map_genes(self, X: np.ndarray, *, low: bool = False
                   ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Objectives and metrics of integer genes ``X``, in chunks through the runner (all
        calibration samples, or the low-fidelity ones); with several workers the chunks are
        contiguous runs of the gene-sorted population (``_gene_order``)."""
        workers = _workers(self.runner)
        order = _gene_order(X) if workers > 1 else None
        sparsity, bits = self.genes.decode(X if order is None else X[order])
        tag: tuple[str, ...] = ("low",) if low else ()
        chunks = [(sparsity[s], bits[s], *tag)
                  for s in _chunks(len(X), self.config.search.chunk_size, workers)]
        fn = _GenesChunk(self.evaluator, self.config.objectives.mode, self._low)
        F, metrics = _concat(self.runner.map_chunks(fn, chunks))
        if order is None:
            return F, metrics
        back = np.argsort(order)  # results in the population's order again
        return F[back], {k: v[back] for k, v in metrics.items()}


def shared_bits(k: np.ndarray) -> np.ndarray:
    """Index bits a codebook of ``k`` levels needs: ``ceil(log2 k)``, at least 1."""
    return np.maximum(1, np.ceil(np.log2(np.asarray(k, dtype=float)))).astype(np.int64)


class SharedCodebookProblem(SearchProblem):
    """Seed 2's weight sharing: one gene, the global number of bins ``K``.

    Each individual is a plan where every layer is pruned at ``genes.shared_sparsity`` and
    quantised with the ``shared`` quantizer (one equal-width bin-mean codebook of ``K``
    levels pooled over all layers, ``plan.shared_k = K``). Objectives: size (the ``2obj``
    size of ``Metrics.objectives``) and divergence, or the metric's drop when
    ``genes.shared_fidelity = "metric_drop"``. Labels and HV reference:
    ``moecomp.search.objectives.objective_space``.
    """

    def __init__(
        self,
        config: ProblemConfig,
        evaluator: EvaluatorLike,
        layer_names: Sequence[str],
        *,
        runner: Runner | None = None,
    ) -> None:
        g = config.genes
        super().__init__(
            n_var=1,
            n_obj=2,
            n_ieq_constr=n_constraints(config),
            xl=np.array([g.shared_k_min]),
            xu=np.array([g.shared_k_max]),
        )
        self.config = config
        self.base_config = config
        self.evaluator = evaluator
        self.runner = runner if runner is not None else LocalRunner()
        self.layer_names = list(layer_names)
        from moecomp.search.objectives import objective_space

        space = objective_space(config)
        self.ref_point = space.ref_point
        self.compress_dir = np.array([-1])  # fewer bins: a smaller code
        self.groups = np.array([0])
        self.gene_share = np.array([1.0])
        self.objective_labels = space.labels

    def plans(self, X: np.ndarray) -> list[CompressionPlan]:
        s = round(self.config.genes.shared_sparsity, 6)
        out = []
        for k in np.rint(np.asarray(X)[:, 0]).astype(int):
            lp = LayerPlan(sparsity=s, bits=int(shared_bits(k)), quantizer="shared")
            out.append(CompressionPlan(layers={n: lp for n in self.layer_names}, shared_k=int(k)))
        return out

    def gene_matrices(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, L = len(X), len(self.layer_names)
        sparsity = np.full((n, L), round(self.config.genes.shared_sparsity, 6))
        bits = np.repeat(shared_bits(np.asarray(X)[:, 0])[:, None], L, axis=1)
        return sparsity, bits

    def extra_columns(self, X: np.ndarray) -> dict[str, np.ndarray]:
        return {"shared_k": np.rint(np.asarray(X)[:, 0]).astype(np.int64)}

    def evaluate_genes(self, X: np.ndarray) -> EvalRecord:
        X = np.rint(np.asarray(X)).astype(np.int64).reshape(-1, 1)
        if np.any(X < self.xl) or np.any(X > self.xu):
            raise ValueError(f"K out of bounds {int(self.xl[0])}..{int(self.xu[0])}")
        plans = self.plans(X)
        size = self.config.search.chunk_size
        fn = _PlansChunk(self.evaluator, "2obj")
        F2, metrics = _concat(
            self.runner.map_chunks(
                fn, [plans[s] for s in _chunks(len(plans), size, _workers(self.runner))])
        )
        fid = (
            metrics["metric_drop"]
            if self.config.genes.shared_fidelity == "metric_drop"
            else metrics["divergence"]
        )
        F = np.stack([F2[:, 0], fid], axis=1)
        return EvalRecord(X=X, F=F, G=constraint_values(self.config, metrics), metrics=metrics)


# --- building from a problem file ------------------------------------------------------------
def layer_ranks(
    target: Target, config: ProblemConfig, *, progress: bool = False, device: str = "auto"
) -> dict[str, torch.Tensor]:
    """Relevance ranks of every compressible tensor (rank 0 = pruned first): the configured
    scorer, run on ``device`` and cached on disk (``moecomp.relevance.compute_ranks``)."""
    from moecomp.relevance import compute_ranks

    return compute_ranks(target, config.relevance, progress=progress, device=device)


def build_problem(
    config: ProblemConfig,
    *,
    target: Target | None = None,
    evaluator: EvaluatorLike | None = None,
    runner: Runner | None = None,
    progress: bool = False,
    device: str = "auto",
) -> SearchProblem:
    """The search problem of a problem file: builds the target (teacher, data), the ranks and
    the Evaluator unless given. ``config.search.problem`` picks layer-wise or shared genes.
    device: where relevance, the redundancy bound and the Evaluator run (``auto``: CUDA when
    torch sees one; ``cpu``, ``cuda``, ``cuda:N``); a run-time setting, not the problem's."""
    from moecomp.evaluate.options import EvalOptions, resolve_device

    resolve_device(device, field="device")  # a wrong or missing device fails first
    if target is None:
        from moecomp.target import build_target

        target = build_target(config, progress=progress)
    o = config.objectives
    if target.metric is None and (o.max_metric_drop is not None or (
            config.search.problem == "shared" and config.genes.shared_fidelity == "metric_drop")):
        field = "objectives.max_metric_drop" if o.max_metric_drop is not None else \
            "genes.shared_fidelity"
        raise ConfigError(field, "this target has no metric (no labels and none named in "
                          "objectives.metric): bound or trade the divergence instead")
    ev: EvaluatorLike
    ranks = None
    if evaluator is None:
        from moecomp.evaluate import Evaluator

        ranks = layer_ranks(target, config, progress=progress, device=device)
        # The shared quantizer goes through evaluate_plans; quantizer= serves evaluate().
        ev = Evaluator(
            target,
            ranks,
            quantizer=config.genes.quantizer,
            chunk_size=config.search.chunk_size,
            options=EvalOptions(device=device),
        )
    else:
        ev = evaluator
    if config.search.problem == "shared":
        return SharedCodebookProblem(config, ev, target.layer_names, runner=runner)
    bounds = None
    if config.genes.redundancy_bound:
        from moecomp.relevance import redundancy_bounds

        bounds = redundancy_bounds(target, device=device)
    return CompressionProblem(
        config,
        ev,
        layer_genes(config, target, bounds),
        runner=runner,
        ranks=ranks,
    )
