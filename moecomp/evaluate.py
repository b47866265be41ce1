"""Evaluate: the hot path. Objectives and metrics of a whole population of plans.

An :class:`Evaluator` binds a :class:`~moecomp.target.Target` and its relevance ranks and turns
gene matrices (or :class:`~moecomp.plan.CompressionPlan` s) into :class:`Metrics`. The result
equals, to float tolerance, the naive computation per individual: copy the teacher, load
``student_state_dict(apply_plan(plan))``, forward the calibration inputs, take the divergence.
It is faster because work that individuals share is done once:

- **Teacher outputs** are computed once (``target.teacher_out``).
- **Layer memo**: a compressed layer depends only on ``(layer, n_pruned, bits, quantizer)``,
  so its dequantised weight and its coded-size estimate are kept in a bounded LRU.
- **Batched students**: the students of a population chunk run as one batched forward,
  ``torch.vmap`` over ``torch.func.functional_call`` with stacked weights (a batched matmul
  / grouped convolution). This works for any ``nn.Module``; a model vmap cannot trace falls
  back to one forward per student, with one warning.
- **Prefix cache**: for models registered in :data:`STAGES` (a chain of stages, one
  compressible layer each: the zoo's MLP, LeNet-300-100 and LeNet-5), students that share the
  genes of the first k layers share those layers' activations. A chunk is sorted by genes
  and evaluated as a trie, one level per stage; activations are also kept across calls in a
  bounded LRU keyed by the prefix genes, so a converging population recomputes only the
  layers where it differs.

Coded size is an *estimate* of the bytes of the ``.mcz`` file ``moecomp.codec`` writes (its ANS
coder lands within about 1 % of the order-0 entropy), computed without coding anything: per
compressed tensor, the positions of the survivors at the order-0 entropy of the keep mask
(``numel * H2(density)`` bits) or, when cheaper, at the ideal code length of the codec's
``ans_mask`` model of that very mask (row counts and column history, ``codec.masks``; one
estimate per layer and pruned count, cached), the level indices at the order-0 entropy of
their histogram (or raw bytes when cheaper, as the codec would choose), the histogram the
decoder needs, the float32 codebook (base64 in the header), and constants per stream, tensor
and file for the JSON header, all as they cost once the codec has zstd-compressed the header;
every other tensor of the state dict (biases, buffers) is stored as it is, in the problem's
``layers.dense_dtype`` (2 bytes per element for float16). See :func:`layer_coded_bytes`;
``bench/bench_evaluate.py`` compares the estimate with real files (within a few percent:
the codec's zstd can beat the order-0 entropy on structured masks, and header lengths vary).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moecomp import inputs as inputs_mod
from moecomp import outputs as outputs_mod
from moecomp.apply import n_pruned
from moecomp.codec.masks import estimate_mask_bytes, grid_of, worth_trying
from moecomp.codec.streams import choose_freqs, table_bytes
from moecomp.errors import ConfigError
from moecomp.plan import BITS_RANGE, CompressionPlan
from moecomp.quantize import kmeans_quantize, shared_quantize, uniform_quantize
from moecomp.target import Target
from moecomp.zoo import MLP, LeNet5, LeNet300

OBJECTIVE_MODES = ("3obj", "2obj")
EVAL_QUANTIZERS = ("uniform", "kmeans")
"""Quantizers of ``Evaluator(quantizer=...)``; plans may also use ``shared`` (see
``evaluate_plans``)."""

CPU_BLOCK_BYTES = 24 * 2**20
"""On the CPU, a batch's stacked weights and outputs stay below this. glibc serves blocks
above 32 MiB with fresh mmap pages every time; smaller ones are recycled, and page faults
would otherwise cost more than batching saves (bench/bench_evaluate.py)."""

# --- coded-size model (bytes); constants estimate the .mcz container's JSON header ----------
# The codec stores the header zstd-compressed: the constants are what each part adds to the
# compressed header, fitted on the real files of runs/*/bench (LeNet-300-100, LeNet-5) and
# random digits-MLP plans: the header part lands within 90 bytes (under 1 % of the file).
FILE_HEADER_BYTES = 310
"""The 16-byte prefix, the header's fixed keys and meta, and zstd's cost of learning the keys
that later tensors repeat."""
PLAN_BYTES_PER_LAYER = 30
"""The plan kept in the header: name, sparsity, bits and quantizer of each layer."""
TENSOR_HEADER_BYTES = 15
"""Per tensor in the header: name, kind, shape, dtype (and n_kept, n_levels)."""
STREAM_HEADER_BYTES = 14
"""Per coded stream in the header: name, coder, n, alphabet, offset, length, CRC."""
CODEBOOK_HEADER_BYTES = 15
"""Per codebook in the header besides its 4 bytes a level: its key and quotes."""
HISTOGRAM_ZSTD_SHARE = 0.5
"""Share of its JSON length an ANS histogram takes in the compressed header (0.35-0.62)."""


# --- metrics ----------------------------------------------------------------------------
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


# --- coded-size estimate (pure) -----------------------------------------------------------
def order0_bits(counts: np.ndarray) -> float:
    """Order-0 entropy in bits of a whole stream with histogram ``counts: (alphabet,)``."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    total = float(c.sum())
    if total <= 0:
        return 0.0
    return float(-(c * np.log2(c / total)).sum())


def histogram_bytes(counts: np.ndarray) -> int:
    """Bytes of a stream's histogram as the codec stores it (``{"freqs":[...]}`` in JSON):
    the codec's own choice of table (``codec.streams.choose_freqs``), so the estimate
    follows the file format."""
    return table_bytes(choose_freqs(counts)) + len('{"freqs":}')


def stream_bytes(counts: np.ndarray, *, raw_bytes_per_symbol: int) -> int:
    """Estimated payload + model bytes of one stream of symbols with histogram ``counts``.

    0 for an empty or single-valued stream (the codec's ``const`` coder); otherwise the
    cheaper of ANS (order-0 entropy plus the stored histogram) and raw bytes, as the codec
    chooses.
    """
    c = np.asarray(counts, dtype=np.int64)
    n = int(c.sum())
    if int((c > 0).sum()) <= 1:
        return 0
    payload, table = math.ceil(order0_bits(c) / 8.0), histogram_bytes(c)
    raw = n * raw_bytes_per_symbol
    # The codec weighs the histogram at its JSON length when it picks a coder, but the file
    # stores it in the compressed header.
    if payload + table > raw:
        return raw
    return payload + math.ceil(HISTOGRAM_ZSTD_SHARE * table)


def mask_coded_bytes(mask: np.ndarray) -> int | None:
    """Estimated bytes of a 2-D keep mask under the codec's ``ans_mask`` coder (payload plus
    its header entry as it costs once compressed), or None where the codec would not try it
    (``worth_trying``: a shape it refuses, or a mask too close to i.i.d.)."""
    if not worth_trying(mask):
        return None
    est = estimate_mask_bytes(mask)
    if est is None:
        return None
    payload, model = est
    return payload + math.ceil(HISTOGRAM_ZSTD_SHARE * model)


def layer_coded_bytes(numel: int, level_counts: np.ndarray, n_levels: int, *,
                      mask_bytes: int | None = None) -> int:
    """Estimated bytes of one compressed tensor in a ``.mcz`` file.

    numel: weights of the tensor; level_counts: ``(n_levels,)`` how many survivors use each
    codebook level (their sum is the number kept); n_levels: codebook size ``k``.
    Positions: a stream of ``numel`` keep/drop flags at the order-0 entropy ``numel *
    H2(density)``, or ``mask_bytes`` (``mask_coded_bytes`` of the actual mask) when given and
    cheaper, as the codec keeps the cheaper coder; indices: a stream of ``n_kept`` level
    indices; plus the float32 codebook and headers.
    """
    kept = int(np.asarray(level_counts).sum())
    positions = stream_bytes(np.array([numel - kept, kept]), raw_bytes_per_symbol=1)
    if mask_bytes is not None and 0 < kept < numel:
        positions = min(positions, mask_bytes)
    indices = stream_bytes(level_counts, raw_bytes_per_symbol=1 if n_levels <= 256 else 2)
    return (
        positions
        + indices
        + codebook_bytes(n_levels)
        + TENSOR_HEADER_BYTES
        + 2 * STREAM_HEADER_BYTES
    )


def codebook_bytes(n_levels: int) -> int:
    """The float32 codebook in the compressed header: base64 of ``4 * n_levels`` bytes, which
    zstd's entropy coding brings back to about the float bits, plus the key and quotes."""
    return 4 * n_levels + CODEBOOK_HEADER_BYTES


def dense_coded_bytes(nbytes: int) -> int:
    """Estimated bytes of a tensor stored uncompressed (``nbytes`` raw bytes) in a .mcz."""
    return nbytes + TENSOR_HEADER_BYTES + STREAM_HEADER_BYTES


def fixed_coded_bytes(dense_nbytes: Sequence[int], n_layers: int) -> int:
    """Estimated bytes of a .mcz besides its compressed tensors: the file header, the plan of
    ``n_layers`` layers and the tensors stored as they are (raw sizes ``dense_nbytes``)."""
    return (
        FILE_HEADER_BYTES
        + PLAN_BYTES_PER_LAYER * n_layers
        + sum(dense_coded_bytes(b) for b in dense_nbytes)
    )


# --- stages: how a chain model splits into one stage per layer ---------------------------------
@dataclass(frozen=True)
class Stage:
    """One step of a chain model for one student.

    params: names (as in ``named_parameters``/``named_buffers``) of every tensor ``fn`` reads.
    fn: ``fn(x, params) -> y``; ``x`` the previous stage's output for the calibration inputs
        (the inputs themselves for the first stage), ``params`` name -> tensor for ``params``.
        Written for one student; the evaluator batches it with ``torch.vmap``.
    """

    params: tuple[str, ...]
    fn: Callable[[Any, dict[str, torch.Tensor]], Any]


@dataclass(frozen=True)
class _LinearFn:
    weight: str
    bias: str | None
    relu: bool

    def __call__(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        y = F.linear(x.flatten(1), p[self.weight], p[self.bias] if self.bias else None)
        return y.relu_() if self.relu else y  # in place: y is new, and fresh memory costs


@dataclass(frozen=True)
class _ConvPoolFn:
    weight: str
    bias: str | None
    pool: int

    def __call__(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        y = F.conv2d(x, p[self.weight], p[self.bias] if self.bias else None)
        return F.max_pool2d(y, self.pool)


def _linear_stage(module: nn.Module, prefix: str, *, relu: bool) -> Stage:
    bias = f"{prefix}.bias" if getattr(module, "bias", None) is not None else None
    names = (f"{prefix}.weight",) + ((bias,) if bias else ())
    return Stage(names, _LinearFn(f"{prefix}.weight", bias, relu))


def _conv_pool_stage(module: nn.Module, prefix: str, pool: int) -> Stage:
    bias = f"{prefix}.bias" if getattr(module, "bias", None) is not None else None
    names = (f"{prefix}.weight",) + ((bias,) if bias else ())
    return Stage(names, _ConvPoolFn(f"{prefix}.weight", bias, pool))


def _mlp_stages(m: nn.Module) -> list[Stage]:
    assert isinstance(m, MLP)
    out = [_linear_stage(layer, f"hidden.{i}", relu=True) for i, layer in enumerate(m.hidden)]
    return out + [_linear_stage(m.out, "out", relu=False)]


def _lenet300_stages(m: nn.Module) -> list[Stage]:
    assert isinstance(m, LeNet300)
    return [
        _linear_stage(m.fc1, "fc1", relu=True),
        _linear_stage(m.fc2, "fc2", relu=True),
        _linear_stage(m.fc3, "fc3", relu=False),
    ]


def _lenet5_stages(m: nn.Module) -> list[Stage]:
    assert isinstance(m, LeNet5)
    return [
        _conv_pool_stage(m.conv1, "conv1", 2),
        _conv_pool_stage(m.conv2, "conv2", 2),
        _linear_stage(m.fc1, "fc1", relu=True),
        _linear_stage(m.fc2, "fc2", relu=False),
    ]


STAGES: dict[type[nn.Module], Callable[[nn.Module], list[Stage]]] = {
    MLP: _mlp_stages,
    LeNet300: _lenet300_stages,
    LeNet5: _lenet5_stages,
}
"""Opt-in registry of chain models: exact class -> ``stages(model)``. A model whose class is
registered here gets the prefix cache; the split is checked against the model's own forward
on a few inputs when an Evaluator is built (a mismatch falls back to the generic path with a
warning). Subclasses are not matched: they may override ``forward``."""


# --- options and caches -------------------------------------------------------------------
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


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _LRU(Generic[K, V]):
    """A dict bounded by the memory its values hold, least recently used evicted first.

    ``measure(value) -> (block, nbytes)``: the memory block a value lives in and its size.
    Values may share a block (rows of one batch output): a block counts once, and its bytes
    are released when its last value is evicted, so ``used`` is the memory really held.
    """

    def __init__(self, capacity: float, measure: Callable[[V], tuple[Hashable, int]]) -> None:
        self.capacity = capacity
        self._measure = measure
        self._data: OrderedDict[K, tuple[V, Hashable]] = OrderedDict()
        self._blocks: dict[Hashable, list[int]] = {}  # block -> [values in it, nbytes]
        self.used = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        item = self._data.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._data.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V) -> None:
        block, nbytes = self._measure(value)
        if nbytes > self.capacity:
            return
        if key in self._data:
            self._release(self._data.pop(key)[1])
        self._data[key] = (value, block)
        entry = self._blocks.get(block)
        if entry is None:
            self._blocks[block] = [1, nbytes]
            self.used += nbytes
        else:
            entry[0] += 1
        while self.used > self.capacity:
            _, (_, old) = self._data.popitem(last=False)
            self._release(old)

    def _release(self, block: Hashable) -> None:
        entry = self._blocks[block]
        entry[0] -= 1
        if entry[0] == 0:
            self.used -= entry[1]
            del self._blocks[block]

    def clear(self) -> None:
        self._data.clear()
        self._blocks.clear()
        self.used = 0

    def __len__(self) -> int:
        return len(self._data)


def _storage(t: Any) -> tuple[Hashable, int]:
    """The memory block of a tensor (its storage, shared by views) and its bytes; for a
    structured output, the blocks of all its tensors together."""
    if not isinstance(t, torch.Tensor):
        parts = [_storage(x) for x in outputs_mod.tensors(t)]
        return tuple(b for b, _ in parts), sum(n for _, n in parts)
    st = t.untyped_storage()
    return (t.device, st.data_ptr()), st.nbytes()


@dataclass(frozen=True)
class _LayerEntry:
    """A compressed layer as the evaluator needs it: the dense student weight (teacher's
    dtype and device; row ``row`` of ``block``, the weights computed in one batch), how many
    weights survive and the estimated coded bytes."""

    block: torch.Tensor
    row: int
    n_kept: int
    coded_bytes: int

    @property
    def weight(self) -> torch.Tensor:
        return self.block[self.row]


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# A layer's gene: (quantizer, n_pruned, bits or shared K, shared group). The shared group is
# ((layer, n_pruned), ...) of every layer pooled with it, () for single-tensor quantizers: a
# pooled codebook depends on all of them, so they are all part of each member's gene.
Gene = tuple[str, int, int, tuple[tuple[int, int], ...]]
_QUANTIZE: dict[str, Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = {
    "uniform": uniform_quantize,
    "kmeans": kmeans_quantize,
}


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
        self._shapes = [tuple(ref.shape) for ref in target.layers]
        self._mask_cache: dict[tuple[int, int], int | None] = {}
        self._total = float(sum(self._numel))
        self._x = target.calib.inputs

        tensors = {n: p.detach() for n, p in target.teacher.named_parameters()}
        tensors.update({n: b.detach() for n, b in target.teacher.named_buffers()})
        self._tensors = target.round_dense(tensors)
        self._by_rank_w: list[torch.Tensor] = []
        self._by_rank_pos: list[torch.Tensor] = []
        for ref in target.layers:
            r = ranks.get(ref.name)
            if r is None:
                raise ConfigError(
                    "ranks",
                    f"no rank tensor for layer {ref.name!r}; needed for "
                    f"every layer of target.layers: {', '.join(self._names)}",
                )
            if tuple(r.shape) != ref.shape or r.dtype != torch.int64:
                raise ConfigError(
                    f"ranks.{ref.name}",
                    f"must be an int64 tensor of shape {ref.shape}, got {r.dtype} {tuple(r.shape)}",
                )
            flat = r.reshape(-1).cpu()
            if ref.numel and (
                int(flat.min()) < 0
                or int(flat.max()) >= ref.numel
                or not bool((torch.bincount(flat, minlength=ref.numel) == 1).all())
            ):
                raise ConfigError(
                    f"ranks.{ref.name}", f"must be a permutation of 0..{ref.numel - 1}"
                )
            # Weights sorted by rank: the survivors of any sparsity are a suffix (a slice).
            order = torch.empty(ref.numel, dtype=torch.int64)
            order[flat] = torch.arange(ref.numel)
            w = tensors[ref.name].reshape(-1).to(device="cpu", dtype=torch.float32)
            self._by_rank_w.append(w[order].contiguous())
            self._by_rank_pos.append(order)

        state = target.state_dict()
        self._fp32_bytes = 4.0 * sum(v.numel() for v in state.values() if v.is_floating_point())
        dense = target.dense_torch_dtype
        self._fixed_bytes = float(
            fixed_coded_bytes(
                [_tensor_bytes(v.to(dense) if v.is_floating_point() else v)
                 for n, v in state.items() if n not in self._index],
                len(self._names),
            )
        )

        self._teacher_metric = target.teacher_metric("calibration")

        self._memo: _LRU[tuple[int, Gene], _LayerEntry] = _LRU(
            self.options.memo_mb * 2**20 if self.options.memo else 0, lambda e: _storage(e.block)
        )
        # sizes are tiny and needed even when activations come from the prefix cache
        self._stats: _LRU[tuple[int, Gene], tuple[int, int]] = _LRU(
            2_000_000, lambda _: (object(), 1)
        )
        self._acts: _LRU[tuple[int, tuple[Gene, ...]], Any] = _LRU(
            self.options.cache_mb * 2**20, _storage
        )
        self._setup_stages()

    # --- public -----------------------------------------------------------------------
    @property
    def path(self) -> str:
        """How students run: ``chain`` (prefix cache) or ``generic``, ``+vmap`` or ``+loop``."""
        return f"{'chain' if self._chain else 'generic'}+{'vmap' if self._vmap else 'loop'}"

    @property
    def teacher_metric(self) -> float:
        """The teacher's metric on the calibration samples (NaN without a metric)."""
        return self._teacher_metric

    def cache_info(self) -> dict[str, int]:
        """Hits, misses and entries of the layer memo and the activation cache."""
        return {
            "memo_hits": self._memo.hits,
            "memo_misses": self._memo.misses,
            "memo_entries": len(self._memo),
            "cache_hits": self._acts.hits,
            "cache_misses": self._acts.misses,
            "cache_entries": len(self._acts),
        }

    def clear_caches(self) -> None:
        self._memo.clear()
        self._stats.clear()
        self._acts.clear()
        self._mask_cache.clear()

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
        return self._evaluate_genes(genes)

    # --- set-up -------------------------------------------------------------------------
    def _setup_stages(self) -> None:
        teacher = self.target.teacher
        self._chain = False
        stages: list[Stage] | None = None
        factory = STAGES.get(type(teacher))
        if self.options.prefix_cache and factory is not None and \
                isinstance(self._x, torch.Tensor) and self.target.output is None:
            stages = factory(teacher)
            problem = self._check_stages(stages)
            if problem is None:
                self._chain = True
            else:
                warnings.warn(
                    f"{type(teacher).__name__}: the registered stage split does not "
                    f"reproduce the model ({problem}); evaluating without the prefix "
                    "cache",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if not self._chain:
            stages = [Stage(tuple(self._tensors), _FunctionalModel(
                teacher, self.target.output, self.target.batch_size))]
        assert stages is not None
        self._stages = stages
        self._stage_layers = [
            [self._index[n] for n in st.params if n in self._index] for st in stages
        ]
        self._fixed = [
            {n: self._tensors[n] for n in st.params if n not in self._index} for st in stages
        ]
        # genes are compared in stage order so that a sort groups shared prefixes
        self._gene_order = [j for lay in self._stage_layers for j in lay]
        self._vmap = self.options.batched and self._probe_vmap()
        self._out_bytes, self._peak_bytes = self._measure_node_bytes()

    def _check_stages(self, stages: list[Stage]) -> str | None:
        """Why ``stages`` do not split the teacher, or None when they do."""
        missing = [n for st in stages for n in st.params if n not in self._tensors]
        if missing:
            return f"unknown tensors {', '.join(missing)}"
        used = [n for st in stages for n in st.params if n in self._index]
        if sorted(used) != sorted(self._names):
            return "each compressible layer must be read by exactly one stage"
        x = inputs_mod.head(self._x, 8)
        with torch.no_grad():
            y = x
            for st in stages:
                y = st.fn(y, {n: self._tensors[n] for n in st.params})
            # the reference runs on the same tensors (dense ones rounded to their dtype)
            ref = inputs_mod.functional(self.target.teacher, self._tensors, x)
        if not _allclose(y, ref):
            return "outputs differ from the model's forward"
        return None

    def _probe_vmap(self) -> bool:
        """Whether the stages run under ``torch.vmap``: tried once on a few inputs against
        the unbatched result; any failure means one forward per student (with a warning)."""
        x = inputs_mod.head(self._x, 4)
        try:
            with torch.no_grad():
                y_ref, y_vm = x, x
                for k, st in enumerate(self._stages):
                    w = {
                        self._names[j]: self._tensors[self._names[j]] for j in self._stage_layers[k]
                    }
                    y_ref = st.fn(y_ref, {**self._fixed[k], **w})
                    wb = {n: torch.stack([t, t]) for n, t in w.items()}
                    y_vm = self._run_vmap(k, y_vm, k > 0, wb, 2)
            ok = all(_allclose(_row(y_vm, i), y_ref) for i in range(2))
            problem = "" if ok else "batched outputs differ from unbatched ones"
        # vmap raises several exception types for operations it cannot batch (RuntimeError,
        # NotImplementedError, ValueError from user code); any of them means "cannot batch".
        except Exception as e:
            ok, problem = False, f"{type(e).__name__}: {e}"
        if not ok:
            warnings.warn(
                f"{type(self.target.teacher).__name__}: torch.vmap cannot batch this "
                f"model ({problem}); evaluating one student at a time",
                RuntimeWarning,
                stacklevel=4,
            )
        return ok

    def _measure_node_bytes(self) -> tuple[list[int], list[int]]:
        """Per stage, for one student and all calibration inputs: the bytes of the stage's
        output, and an estimate of its peak (3 x the largest of its input, its output and any
        module output seen by hooks, for the intermediates live at once). Measured on a few
        inputs and scaled."""
        n_small = min(4, inputs_mod.n_samples(self._x))
        x = inputs_mod.head(self._x, n_small)
        out_b = [0] * len(self._stages)
        peak_b = [0] * len(self._stages)
        largest = 0

        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            nonlocal largest
            largest = max(largest, _nbytes(out))

        handles = [m.register_forward_hook(hook) for m in self.target.teacher.modules()]
        try:
            with torch.no_grad():
                y = x
                for k, st in enumerate(self._stages):
                    largest = _nbytes(y)
                    y = st.fn(y, {n: self._tensors[n] for n in st.params})
                    out_b[k] = _nbytes(y)
                    peak_b[k] = 3 * max(largest, out_b[k])
        finally:
            for h in handles:
                h.remove()
        n = inputs_mod.n_samples(self._x)
        scale = n / n_small
        # the whole-model stage runs the samples in batches: its peak is one batch's
        peak_scale = scale if self._chain else min(n, self.target.batch_size) / n_small
        return ([max(1, int(b * scale)) for b in out_b],
                [max(1, int(b * peak_scale)) for b in peak_b])

    # --- the hot path ---------------------------------------------------------------------
    def _evaluate_genes(self, genes: list[tuple[Gene, ...]]) -> Metrics:
        n = len(genes)
        if n == 0:
            return _empty_metrics()
        budget = self.options.memory_mb * 2**20
        # A chunk holds the activations of up to ``chunk`` students at two levels at once.
        held = [inputs_mod.nbytes(self._x), *self._out_bytes]
        two_levels = max(a + b for a, b in zip(held, held[1:], strict=False))
        chunk = max(1, min(self.chunk_size, int(budget // two_levels)))
        order = sorted(range(n), key=lambda i: tuple(genes[i][j] for j in self._gene_order))
        div = np.empty(n)
        acc = np.full(n, np.nan)
        with torch.no_grad():
            for c in range(0, n, chunk):
                idx = order[c : c + chunk]
                d, a = self._evaluate_chunk([genes[i] for i in idx])
                div[idx] = d
                acc[idx] = a
        density, bits, size = self._sizes(genes)
        self.n_evals += n
        metric = self.target.metric
        drop = metric.drop(self._teacher_metric, acc) if metric is not None else acc
        return Metrics(
            density=density,
            bits=bits,
            divergence=div,
            size_bytes=size,
            ratio=self._fp32_bytes / size,
            metric=acc,
            metric_drop=drop,
        )

    def _evaluate_chunk(self, genes: list[tuple[Gene, ...]]) -> tuple[np.ndarray, np.ndarray]:
        """Divergence and metric ``(P,)`` of one chunk, evaluated as a trie over stages.

        A node of level ``k`` is a distinct gene prefix up to stage ``k``; its activation is
        kept as ``(block, row)``, row ``row`` of a batch output ``block`` (so that the next
        stage can batch over consecutive rows without copying them).
        """
        P = len(genes)
        node_of = [0] * P
        prefix: list[tuple[Gene, ...]] = [()]
        acts: list[tuple[Any, int]] = [(_Whole(self._x), 0)]
        for k in range(len(self._stages)):
            lay = self._stage_layers[k]
            child: dict[tuple[int, tuple[Gene, ...]], int] = {}
            new_prefix: list[tuple[Gene, ...]] = []
            parents: list[int] = []
            for i in range(P):
                key = (node_of[i], tuple(genes[i][j] for j in lay))
                u = child.get(key)
                if u is None:
                    u = child[key] = len(new_prefix)
                    new_prefix.append(prefix[key[0]] + key[1])
                    parents.append(key[0])
                node_of[i] = u
            new_acts: list[tuple[Any, int] | None] = [None] * len(new_prefix)
            missing = []
            for u, p in enumerate(new_prefix):
                hit = self._acts.get((k, p))
                if hit is None:
                    missing.append(u)
                else:
                    new_acts[u] = (_unsqueeze(hit), 0)
            for batch in self._batches(k, missing, parents):
                block = self._run_stage(
                    k,
                    [acts[parents[u]] for u in batch],
                    [new_prefix[u][len(new_prefix[u]) - len(lay) :] for u in batch],
                )
                for r, u in enumerate(batch):
                    new_acts[u] = (block, r)
                    self._acts.put((k, new_prefix[u]), _row(block, r))
            acts = [a for a in new_acts if a is not None]
            assert len(acts) == len(new_prefix)
            prefix = new_prefix
        outputs, batched = _gather(acts)
        if not batched:  # one node: give it its student axis
            outputs = _unsqueeze(outputs)
        target = self.target
        d = target.divergence.batched(target.teacher_out, outputs).double().mean(-1)
        d_np = d.detach().to("cpu", torch.float64).numpy().reshape(-1)
        if target.metric is not None:
            a_np = target.metric.batched(target.teacher_out, outputs, target.calib.labels)
        else:
            a_np = np.full(len(acts), np.nan)
        return d_np[node_of], a_np[node_of]

    def _batches(self, k: int, missing: list[int], parents: list[int]) -> list[list[int]]:
        """Split the nodes to compute at stage ``k`` into batches of at most the memory bound:
        siblings (runs of one parent) share their input, so each run is a batch of its own;
        the single children of distinct parents are batched together."""
        step = 1
        if self._vmap:
            bound = self.options.memory_mb * 2**20 // self._peak_bytes[k]
            if inputs_mod.device_of(self._x).type == "cpu":
                per_node = self._out_bytes[k] + sum(
                    _tensor_bytes(self._tensors[self._names[j]]) for j in self._stage_layers[k]
                )
                bound = min(bound, CPU_BLOCK_BYTES // per_node)
            step = max(1, min(self.chunk_size, int(bound)))
        out: list[list[int]] = []
        singles: list[int] = []
        s = 0
        while s < len(missing):
            e = s + 1
            while e < len(missing) and parents[missing[e]] == parents[missing[s]]:
                e += 1
            if e - s == 1:
                singles.append(missing[s])
            else:
                out += [missing[i : min(i + step, e)] for i in range(s, e, step)]
            s = e
        out += [singles[i : i + step] for i in range(0, len(singles), step)]
        return out

    def _run_stage(
        self, k: int, xs: list[tuple[Any, int]], stage_genes: list[tuple[Gene, ...]]
    ) -> Any:
        """Stage ``k`` for ``G`` students: their inputs ``xs`` (``(block, row)``) and the genes
        of the stage's layers. Returns ``(G, *out)``."""
        lay = self._stage_layers[k]
        fn, fixed = self._stages[k].fn, self._fixed[k]
        G = len(stage_genes)
        wb = {
            self._names[j]: self._weights(j, [g[r] for g in stage_genes]) for r, j in enumerate(lay)
        }
        if G == 1:  # also every call without vmap: _batches makes batches of one then
            blk, row = xs[0]
            return _unsqueeze(fn(_row(blk, row), {**fixed, **{n: w[0] for n, w in wb.items()}}))
        x, x_batched = _gather(xs)
        return self._run_vmap(k, x, x_batched, wb, G)

    def _run_vmap(
        self, k: int, x: Any, x_batched: bool, wb: dict[str, torch.Tensor], G: int
    ) -> Any:
        """Stage ``k`` for ``G`` students under ``torch.vmap``: stacked weights ``wb`` (name ->
        ``(G, *shape)``), input ``x`` shared (or ``(G, ...)`` when ``x_batched``)."""
        fn, fixed = self._stages[k].fn, self._fixed[k]
        if not wb:  # a stage with no compressible layer
            if not x_batched:
                y = fn(x, fixed)
                return outputs_mod.map_tensors(y, lambda t: t.unsqueeze(0).expand(G, *t.shape))
            return torch.vmap(lambda xi: fn(xi, fixed))(x)

        def one(xi: Any, w: dict[str, torch.Tensor]) -> Any:
            return fn(xi, {**fixed, **w})

        return torch.vmap(one, in_dims=(0 if x_batched else None, 0))(x, wb)

    # --- layers ---------------------------------------------------------------------------
    def _weights(self, j: int, genes: list[Gene]) -> torch.Tensor:
        """Dense student weights of layer ``j`` for each gene, ``(G, *shape)``.

        Memo hits that are consecutive rows of one block are returned as a view; otherwise
        the result is a new block, into which misses are computed (and memoised as rows of
        it) and hits and repeated genes are copied.
        """
        hits = [self._memo.get((j, g)) for g in genes]
        if all(h is not None for h in hits):
            return _stack([(h.block, h.row) for h in hits if h is not None])
        ref = self._tensors[self._names[j]]
        block = torch.empty((len(genes), *ref.shape), dtype=ref.dtype, device=ref.device)
        first: dict[Gene, int] = {}
        for r, (g, h) in enumerate(zip(genes, hits, strict=True)):
            if h is not None:
                block[r].copy_(h.weight)
            elif g in first:
                block[r].copy_(block[first[g]])
            elif g[0] == "shared":  # computed with its whole group, which memoises them all
                first[g] = r
                block[r].copy_(self._compute_shared(g)[j].weight)
            else:
                first[g] = r
                self._remember((j, g), self._compute_entry(j, g, block, r))
        return block

    def _remember(self, key: tuple[int, Gene], e: _LayerEntry) -> None:
        self._memo.put(key, e)
        self._stats.put(key, (e.n_kept, e.coded_bytes))

    def _layer_stats(self, j: int, gene: Gene) -> tuple[int, int]:
        st = self._stats.get((j, gene))
        if st is None:
            self._weights(j, [gene])
            st = self._stats.get((j, gene))
            assert st is not None  # just computed and remembered
        return st

    def _finish(
        self,
        j: int,
        pruned: int,
        indices: torch.Tensor,
        codebook: torch.Tensor,
        block: torch.Tensor,
        row: int,
    ) -> _LayerEntry:
        """Write the dense student weight into ``block[row]`` and estimate the coded size."""
        numel = self._numel[j]
        dst = block[row]
        cpu32 = dst.device.type == "cpu" and dst.dtype == torch.float32
        flat = dst.view(-1) if cpu32 else torch.empty(numel, dtype=torch.float32)
        flat.zero_()
        flat[self._by_rank_pos[j][pruned:]] = codebook[indices]
        if not cpu32:
            dst.copy_(flat.view(dst.shape))
        counts = torch.bincount(indices, minlength=codebook.numel()).numpy()
        size = layer_coded_bytes(numel, counts, int(codebook.numel()),
                                 mask_bytes=self._mask_bytes(j, pruned))
        return _LayerEntry(block, row, int(indices.numel()), size)

    def _mask_bytes(self, j: int, pruned: int) -> int | None:
        """``mask_coded_bytes`` of layer ``j``'s mask with ``pruned`` weights pruned, once."""
        key = (j, pruned)
        if key not in self._mask_cache:
            grid = grid_of(tuple(self._shapes[j]))
            if grid is None:
                self._mask_cache[key] = None
            else:
                mask = np.zeros(self._numel[j], dtype=bool)
                mask[self._by_rank_pos[j][pruned:].cpu().numpy()] = True
                self._mask_cache[key] = mask_coded_bytes(mask.reshape(grid))
        return self._mask_cache[key]

    def _compute_entry(self, j: int, gene: Gene, block: torch.Tensor, row: int) -> _LayerEntry:
        quantizer, pruned, bits, _ = gene
        values = self._by_rank_w[j][pruned:]
        indices, codebook = _QUANTIZE[quantizer](values, bits)
        return self._finish(j, pruned, indices, codebook, block, row)

    def _compute_shared(self, gene: Gene) -> dict[int, _LayerEntry]:
        """Every layer of a pooled (``shared``) group at once; each is also memoised."""
        _, _, k, group = gene
        values = {str(jj): self._by_rank_w[jj][p:] for jj, p in group}
        coded = shared_quantize(values, k)
        out = {}
        for jj, p in group:
            ref = self._tensors[self._names[jj]]
            block = torch.empty((1, *ref.shape), dtype=ref.dtype, device=ref.device)
            out[jj] = self._finish(jj, p, *coded[str(jj)], block, 0)
            self._remember((jj, _gene_for(jj, gene)), out[jj])
        return out

    def _sizes(self, genes: list[tuple[Gene, ...]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Density, bits and coded size ``(n,)`` from the per-layer statistics."""
        n, L = len(genes), len(self._names)
        kept = np.empty((n, L))
        bits = np.empty((n, L))
        coded = np.empty((n, L))
        for i, row in enumerate(genes):
            for j, g in enumerate(row):
                kept[i, j], coded[i, j] = self._layer_stats(j, g)
                bits[i, j] = g[2] if g[0] != "shared" else max(1, math.ceil(math.log2(g[2])))
        total_kept = kept.sum(1)
        mean_bits = np.where(
            total_kept > 0, (kept * bits).sum(1) / np.maximum(total_kept, 1), bits.mean(1)
        )
        size = coded.sum(1) + self._fixed_bytes
        return total_kept / self._total, mean_bits, size


class _Whole:
    """The calibration inputs as the one parent of every stage-0 node (``_row`` gives them
    back whole): inputs of any structure, shared by all students."""

    def __init__(self, inputs: inputs_mod.Inputs) -> None:
        self.inputs = inputs


def _row(block: Any, r: int | slice) -> Any:
    """Row ``r`` of a batch output (any structure with a leading student axis)."""
    if isinstance(block, _Whole):
        return block.inputs
    if isinstance(block, torch.Tensor):
        return block[r]
    return outputs_mod.take(block, r)


def _unsqueeze(y: Any) -> Any:
    """``y`` with a leading student axis of one."""
    if isinstance(y, torch.Tensor):
        return y.unsqueeze(0)
    return outputs_mod.map_tensors(y, lambda t: t.unsqueeze(0))


def _nbytes(obj: Any) -> int:
    """Bytes held by the tensors of ``obj`` (a tensor, inputs or a structured output)."""
    if isinstance(obj, torch.Tensor):
        return _tensor_bytes(obj)
    return sum(_tensor_bytes(t) for t in outputs_mod.tensors(obj))


def _allclose(a: Any, b: Any) -> bool:
    """Whether two outputs of one structure agree to float tolerance."""
    ta, tb = outputs_mod.tensors(a), outputs_mod.tensors(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and torch.allclose(x, y, rtol=1e-4, atol=1e-5)
        for x, y in zip(ta, tb, strict=True))


def _gather(xs: list[tuple[Any, int]]) -> tuple[Any, bool]:
    """One input for a batch from rows ``(block, row)``: the row itself if all are the same
    (``batched=False``), a slice if they are consecutive rows of one block, else a stack."""
    b0, r0 = xs[0]
    if all(b is b0 and r == r0 for b, r in xs):
        return _row(b0, r0), False
    if all(b is b0 and r == r0 + i for i, (b, r) in enumerate(xs)):
        return _row(b0, slice(r0, r0 + len(xs))), True
    rows = [_row(b, r) for b, r in xs]
    if isinstance(rows[0], torch.Tensor):
        return torch.stack(rows), True
    return outputs_mod.cat([_unsqueeze(y) for y in rows]), True


def _stack(xs: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """``(G, ...)`` from rows ``(block, row)``, without a copy where ``_gather`` manages."""
    x, batched = _gather(xs)
    return x if batched else x.unsqueeze(0).expand(len(xs), *x.shape)


def _gene_for(j: int, gene: Gene) -> Gene:
    """The gene of layer ``j`` of a shared group, given any member's gene (same K, group)."""
    _, _, k, group = gene
    return ("shared", dict(group)[j], k, group)


@dataclass(frozen=True)
class _FunctionalModel:
    """The whole model as one stage: ``functional_call`` with the given tensors on inputs of
    any structure, in batches of ``batch_size`` samples, narrowed to ``output``."""

    model: nn.Module
    output: str | None = None
    batch_size: int = 1 << 30

    def __call__(self, x: inputs_mod.Inputs, p: dict[str, torch.Tensor]) -> Any:
        parts = [outputs_mod.select(inputs_mod.functional(self.model, p, b), self.output)
                 for _, b in inputs_mod.batches(x, self.batch_size)]
        return parts[0] if len(parts) == 1 else outputs_mod.cat(parts)
