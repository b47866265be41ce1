"""Running students: the calibration forward of a population of compressed models.

The students of a population chunk run as one batched forward, ``torch.vmap`` over
``torch.func.functional_call`` with stacked weights (a batched matmul / grouped convolution).
This works for any ``nn.Module``; a model vmap cannot trace falls back to one forward per
student, with one warning.

**Prefix cache**: for models registered in :data:`STAGES` (a chain of stages, one
compressible layer each: the zoo's MLP, LeNet-300-100 and LeNet-5), students that share the
genes of the first k layers share those layers' activations. A chunk is sorted by genes and
evaluated as a trie, one level per stage; activations are also kept across calls in a bounded
LRU keyed by the prefix genes, so a converging population recomputes only the layers where it
differs. Any other model is one stage: the whole model, run on the calibration samples in
batches of ``target.batch_size``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moecomp import inputs as inputs_mod
from moecomp import outputs as outputs_mod
from moecomp.evaluate.layers import LRU, Gene, storage, tensor_bytes
from moecomp.evaluate.options import CPU_BLOCK_BYTES, EvalOptions
from moecomp.target import Target
from moecomp.zoo import MLP, LeNet5, LeNet300

WeightsFn = Callable[[int, list[Gene]], torch.Tensor]
"""``weights(j, genes) -> (G, *shape)``: dense student weights of layer ``j`` per gene."""


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


class StudentRunner:
    """Divergence and metric of populations of students of one target.

    tensors: the teacher's parameters and buffers as students start from; weights: the
    layer memo's ``weights``; chunk_size: students formed at once (bounded further by
    ``options.memory_mb``).
    """

    def __init__(self, target: Target, tensors: dict[str, torch.Tensor], weights: WeightsFn,
                 *, options: EvalOptions, chunk_size: int) -> None:
        self.target = target
        self.options = options
        self.chunk_size = chunk_size
        self._weights = weights
        self._tensors = tensors
        self._names = target.layer_names
        self._index = {n: i for i, n in enumerate(self._names)}
        self._x = target.calib.inputs
        self._acts: LRU[tuple[int, tuple[Gene, ...]], Any] = LRU(
            options.cache_mb * 2**20, storage
        )
        self._setup_stages()

    @property
    def path(self) -> str:
        """How students run: ``chain`` (prefix cache) or ``generic``, ``+vmap`` or ``+loop``."""
        return f"{'chain' if self._chain else 'generic'}+{'vmap' if self._vmap else 'loop'}"

    def info(self) -> dict[str, int]:
        return {"cache_hits": self._acts.hits, "cache_misses": self._acts.misses,
                "cache_entries": len(self._acts)}

    def clear(self) -> None:
        self._acts.clear()

    def measure(self, genes: list[tuple[Gene, ...]]) -> tuple[np.ndarray, np.ndarray]:
        """Mean divergence and metric ``(n,)`` of the students of ``genes`` (metric NaN
        without one), evaluated in chunks sorted by genes so that prefixes are shared."""
        n = len(genes)
        budget = self.options.memory_mb * 2**20
        # A chunk holds the activations of up to ``chunk`` students at two levels at once.
        held = [inputs_mod.nbytes(self._x), *self._out_bytes]
        two_levels = max(a + b for a, b in zip(held, held[1:], strict=False))
        chunk = max(1, min(self.chunk_size, int(budget // two_levels)))
        order = sorted(range(n), key=lambda i: tuple(genes[i][j] for j in self._gene_order))
        div = np.empty(n)
        met = np.full(n, np.nan)
        with torch.no_grad():
            for c in range(0, n, chunk):
                idx = order[c : c + chunk]
                d, a = self._evaluate_chunk([genes[i] for i in idx])
                div[idx] = d
                met[idx] = a
        return div, met

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
                    tensor_bytes(self._tensors[self._names[j]]) for j in self._stage_layers[k]
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
        return tensor_bytes(obj)
    return sum(tensor_bytes(t) for t in outputs_mod.tensors(obj))


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
