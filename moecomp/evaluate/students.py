"""Running students: the calibration forward of a population of compressed models.

The students of a population chunk run as batched forwards, ``torch.vmap`` over
``torch.func.functional_call`` with stacked weights (a batched matmul / grouped convolution).
This works for any ``nn.Module``; a model vmap cannot trace falls back to one forward per
student, with one warning. On the CPU, stages that read a convolution's weight run one
student at a time (``EvalOptions.batched = "auto"``): under vmap a convolution becomes a
grouped one and max-pooling its slower variant with indices, and LeNet-5 ran at 0.6x of the
loop's speed.

**Prefix cache**: when the model is a chain (:mod:`moecomp.evaluate.chain` finds the stages
automatically: the embedding, each transformer block, the head; each layer of an MLP or a
LeNet), students that share the genes of the layers of the first k stages share those stages'
activations. A chunk is sorted by genes and evaluated as a trie, one level per stage;
activations are also kept across calls in a bounded LRU keyed by the prefix genes, so a
converging population recomputes only the stages where it differs.

**Whole-model path**: the model as one stage, run on the calibration samples in batches of
``target.batch_size``. Any model that is not a chain takes it. A chain model takes it for a
chunk whose students share too little for the trie to pay (a cold random population): the
choice compares the stage forwards each path needs, weighted by the measured time per
student of each stage and of the whole model (running means; before the first measurement,
by the stages' share of one probe forward).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from moecomp import inputs as inputs_mod
from moecomp import outputs as outputs_mod
from moecomp.evaluate.chain import ReplayStage, Stage, allclose, check_chain, find_chain
from moecomp.evaluate.layers import LRU, Gene, storage, tensor_bytes
from moecomp.evaluate.options import CPU_BLOCK_BYTES, EvalOptions
from moecomp.target import Target

WeightsFn = Callable[[int, list[Gene]], torch.Tensor]
"""``weights(j, genes) -> (G, *shape)``: dense student weights of layer ``j`` per gene."""

__all__ = ["Stage", "StudentRunner", "WeightsFn"]


@dataclass
class _Plan:
    """Stages of one way to run students, with what the trie needs about them.

    reads[k]: layer indices whose student weights stage ``k`` gets; owns[k]: the layers whose
    genes key level ``k`` of the trie (first read there); fixed[k]: every other tensor the
    stage reads. cost[k] models the seconds of a call of stage ``k`` for ``G`` students.
    """

    name: str
    stages: list[Stage]
    reads: list[list[int]]
    owns: list[list[int]]
    fixed: list[dict[str, torch.Tensor]]
    vmap: bool = False
    # per stage: run a batch as one vmapped call (True) or one student after another
    batch: list[bool] = field(default_factory=list)
    out_bytes: list[int] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    cost: list[_CallCost] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        return all(c.n > 0 for c in self.cost)

    @property
    def gene_order(self) -> list[int]:
        """Layers in stage order: sorting genes in this order groups shared prefixes."""
        return [j for lay in self.owns for j in lay]


class _CallCost:
    """Seconds of a stage call for ``G`` students, ``a + b * G``: a least-squares fit of the
    calls seen (older ones weigh less), ``a`` taken from a probe call while the calls seen
    had too few distinct ``G`` to tell ``a`` from ``b``."""

    def __init__(self, probe_s: float) -> None:
        self.probe_s = probe_s
        self.n = 0
        self.s = np.zeros(5)  # decayed sums of 1, G, G^2, t, G t

    def add(self, G: int, t: float) -> None:
        self.s = 0.9 * self.s + np.array([1.0, G, G * G, t, G * t])
        self.n += 1

    def __call__(self, G: int) -> float:
        w, sg, sgg, st, sgt = (float(v) for v in self.s)
        if self.n == 0:
            return float("nan")
        var = sgg / w - (sg / w) ** 2
        if var > 0.25:
            b = (sgt / w - sg / w * st / w) / var
            a = st / w - b * sg / w
            if a >= 0 and b >= 0:
                return a + b * G
        a = min(self.probe_s, st / w)
        return a + max(0.0, st / w - a) / max(sg / w, 1.0) * G


class StudentRunner:
    """Divergence and metric of populations of students of one target.

    model: the teacher on the evaluation device; tensors: its parameters and buffers as
    students start from (same device); weights: the layer memo's ``weights``; chunk_size:
    students formed at once (bounded further by ``options.memory_mb``).
    """

    def __init__(self, target: Target, model: nn.Module, tensors: dict[str, torch.Tensor],
                 weights: WeightsFn, *, options: EvalOptions, chunk_size: int,
                 device: torch.device) -> None:
        self.target = target
        self.options = options
        self.chunk_size = chunk_size
        self.device = device
        self._model = model
        self._weights = weights
        self._tensors = tensors
        self._names = target.layer_names
        self._index = {n: i for i, n in enumerate(self._names)}
        self._x = inputs_mod.to(target.calib.inputs, device)
        self._teacher_out = outputs_mod.map_tensors(target.teacher_out, lambda t: t.to(device))
        self._acts: LRU[tuple[Any, ...], Any] = LRU(options.cache_mb * 2**20, storage)
        self.timing: dict[str, float] = {"forward": 0.0, "weights": 0.0, "measure": 0.0}
        self.chunks: dict[str, int] = {"chain": 0, "whole": 0}
        self._setup()

    @property
    def path(self) -> str:
        """How students run: ``chain`` (prefix cache) or ``generic``, then ``+vmap`` (every
        stage batched), ``+loop`` (one student at a time) or ``+vmap+loop`` (some stages)."""
        plan = self._chain or self._whole
        how = "loop"
        if plan.vmap:
            how = "vmap" if all(plan.batch) else "vmap+loop" if any(plan.batch) else "loop"
        return f"{'chain' if self._chain else 'generic'}+{how}"

    def info(self) -> dict[str, int]:
        return {"cache_hits": self._acts.hits, "cache_misses": self._acts.misses,
                "cache_entries": len(self._acts)} | {f"chunks_{k}": v
                                                     for k, v in self.chunks.items()}

    def clear(self) -> None:
        self._acts.clear()

    def measure(self, genes: list[tuple[Gene, ...]]) -> tuple[np.ndarray, np.ndarray]:
        """Mean divergence and metric ``(n,)`` of the students of ``genes`` (metric NaN
        without one), evaluated in chunks sorted by genes so that prefixes are shared."""
        n = len(genes)
        plan = self._chain or self._whole
        budget = self.options.memory_mb * 2**20
        # A chunk holds the activations of up to ``chunk`` students at two levels at once.
        held = [inputs_mod.nbytes(self._x), *plan.out_bytes]
        two_levels = max(a + b for a, b in zip(held, held[1:], strict=False))
        chunk = max(1, min(self.chunk_size, int(budget // two_levels)))
        order = sorted(range(n), key=lambda i: tuple(genes[i][j] for j in plan.gene_order))
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
    def _setup(self) -> None:
        target = self.target
        whole = Stage(tuple(self._tensors), _FunctionalModel(
            self._model, target.output, target.batch_size))
        self._whole = self._make_plan("whole", [whole])
        self._chain: _Plan | None = None
        self.chain_reason = "the prefix cache is off (options.prefix_cache)"
        if self.options.prefix_cache:
            found = find_chain(self._model, self._x, self._tensors, self._names,
                               output=target.output, batch_size=target.batch_size)
            self.chain_reason = found.reason
            if found.stages is not None:
                problem = check_chain(found.stages, self._model, self._x, self._tensors,
                                      self._names, target.output)
                if problem is None:
                    self._chain = self._make_plan("chain", found.stages)
                else:
                    self.chain_reason = f"{found.reason}, refused: {problem}"
        for plan in (self._whole, self._chain):
            if plan is not None:
                plan.vmap = self.options.batched is not False and self._probe_vmap(plan)
                self._batch_all_samples(plan)
                plan.out_bytes, plan.peak_bytes, probe_s = self._measure_stages(plan)
                plan.batch = [plan.vmap and not self._loops(plan, k)
                              for k in range(len(plan.stages))]
                if plan.vmap:  # a batched stage's fixed cost is a vmapped call's
                    probe_s = [v if b else t for v, t, b in
                               zip(self._time_vmap(plan), probe_s, plan.batch, strict=True)]
                plan.cost = [_CallCost(t) for t in probe_s]

    def _make_plan(self, name: str, stages: list[Stage]) -> _Plan:
        reads = [[self._index[n] for n in (st.reads if st.reads is not None else st.params)
                  if n in self._index] for st in stages]
        owns: list[list[int]] = []
        seen: set[int] = set()
        for lay in reads:
            owns.append([j for j in lay if j not in seen])
            seen.update(lay)
        fixed = [{n: self._tensors[n] for n in st.params
                  if n not in {self._names[j] for j in reads[k]}}
                 for k, st in enumerate(stages)]
        return _Plan(name, stages, reads, owns, fixed)

    def _batch_all_samples(self, plan: _Plan) -> None:
        """Stages run all calibration samples in one batch when one student's peak on them
        stays within an eighth of ``options.memory_mb`` (per-batch calls and joins cost more
        than they save on small models); else in batches of ``target.batch_size``."""
        n = inputs_mod.n_samples(self._x)
        if n <= self.target.batch_size:
            return
        _, peak, _ = self._measure_stages(plan, time_it=False)
        full = max(peak) * n / min(n, self.target.batch_size)
        if full <= self.options.memory_mb * 2**20 / 8:
            plan.stages = [Stage(st.params, dataclasses.replace(st.fn, batch_size=n), st.reads)
                           if isinstance(st.fn, ReplayStage | _FunctionalModel) else st
                           for st in plan.stages]

    def _probe_vmap(self, plan: _Plan) -> bool:
        """Whether the stages run under ``torch.vmap``: tried once on a few inputs against
        the unbatched result; any failure means one forward per student (with a warning)."""
        x = inputs_mod.head(self._x, 4)
        try:
            with torch.no_grad():
                y_ref, y_vm = x, x
                for k, st in enumerate(plan.stages):
                    w = {self._names[j]: self._tensors[self._names[j]] for j in plan.reads[k]}
                    y_ref = st.fn(y_ref, {**plan.fixed[k], **w})
                    wb = {n: torch.stack([t, t]) for n, t in w.items()}
                    y_vm = self._run_vmap(plan, k, y_vm, k > 0, wb, 2)
            ok = all(allclose(_row(y_vm, i), y_ref) for i in range(2))
            problem = "" if ok else "batched outputs differ from unbatched ones"
        # vmap raises several exception types for operations it cannot batch (RuntimeError,
        # NotImplementedError, ValueError from user code); any of them means "cannot batch".
        except Exception as e:
            ok, problem = False, f"{type(e).__name__}: {e}"
        if not ok and plan.name == "whole":
            warnings.warn(
                f"{type(self.target.teacher).__name__}: torch.vmap cannot batch this "
                f"model ({problem}); evaluating one student at a time",
                RuntimeWarning,
                stacklevel=5,
            )
        return ok

    def _loops(self, plan: _Plan, k: int) -> bool:
        """Whether stage ``k`` runs one student at a time although vmap can batch it: with
        ``batched = "auto"`` on the CPU, a stage that reads a convolution's weight (more than
        two dimensions). vmap makes such a convolution a grouped one and max-pooling its
        variant with indices over all students' activations at once: LeNet-5 ran at 0.6x
        of the loop's speed (docs/decisions.md)."""
        if self.options.batched != "auto" or self.device.type != "cpu":
            return False
        return any(self._tensors[self._names[j]].dim() > 2 for j in plan.reads[k])

    def _time_vmap(self, plan: _Plan) -> list[float]:
        """Seconds of one vmapped call of each stage for 2 students on a few inputs (the
        second of two calls)."""
        x = inputs_mod.head(self._x, 4)
        secs = []
        with torch.no_grad():
            y: Any = x
            for k, _ in enumerate(plan.stages):
                w = {self._names[j]: self._tensors[self._names[j]] for j in plan.reads[k]}
                wb = {n: torch.stack([t, t]) for n, t in w.items()}
                self._run_vmap(plan, k, y, k > 0, wb, 2)
                t0 = time.perf_counter()
                y = self._run_vmap(plan, k, y, k > 0, wb, 2)
                secs.append(time.perf_counter() - t0)
        return secs

    def _measure_stages(self, plan: _Plan, *, time_it: bool = True
                        ) -> tuple[list[int], list[int], list[float]]:
        """Per stage, for one student and all calibration inputs: the bytes of the stage's
        output, an estimate of its peak (3 x the largest of its input, its output and any
        module output seen by hooks, for the intermediates live at once), and the seconds of
        one call on the few inputs (the second of two). Measured on a few inputs and
        scaled."""
        n_small = min(4, inputs_mod.n_samples(self._x))
        x = inputs_mod.head(self._x, n_small)
        K = len(plan.stages)
        out_b, peak_b, secs = [0] * K, [0] * K, [0.0] * K
        largest = 0

        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            nonlocal largest
            largest = max(largest, _nbytes(out))

        with torch.no_grad():
            y = x
            for k, st in enumerate(plan.stages):
                p = {n: self._tensors[n] for n in st.params}
                fn = st.fn
                if time_it:
                    fn(y, p)  # warm-up
                    t0 = time.perf_counter()
                    fn(y, p)
                    secs[k] = time.perf_counter() - t0
                largest = _nbytes(y)
                handles = [m.register_forward_hook(hook) for m in self._model.modules()]
                try:
                    y = fn(y, p)
                finally:
                    for h in handles:
                        h.remove()
                out_b[k] = _nbytes(y)
                peak_b[k] = 3 * max(largest, out_b[k])
        n = inputs_mod.n_samples(self._x)
        scale = n / n_small
        # stages run the samples in batches: the peak is one batch's
        batch = getattr(plan.stages[0].fn, "batch_size", self.target.batch_size)
        peak_scale = min(n, batch) / n_small
        return ([max(1, int(b * scale)) for b in out_b],
                [max(1, int(b * peak_scale)) for b in peak_b], secs)

    # --- a chunk ------------------------------------------------------------------------
    def _trie(self, plan: _Plan, genes: list[tuple[Gene, ...]]
              ) -> tuple[list[list[int]], list[list[int]], list[list[int]],
                         list[list[tuple[Any, ...]]]]:
        """The trie of ``genes`` over ``plan``'s stages: per level, each student's node, each
        node's parent, a student of each node (its genes stand for the node's), and each
        node's cache key."""
        P, K = len(genes), len(plan.stages)
        node_of = [0] * P
        keys: list[tuple[Any, ...]] = [()]
        nodes: list[list[int]] = []
        parents: list[list[int]] = []
        reps: list[list[int]] = []
        cache_keys: list[list[tuple[Any, ...]]] = []
        for k in range(K):
            lay = plan.owns[k]
            child: dict[tuple[int, tuple[Gene, ...]], int] = {}
            new_keys: list[tuple[Any, ...]] = []
            par: list[int] = []
            rep: list[int] = []
            for i in range(P):
                key = (node_of[i], tuple(genes[i][j] for j in lay))
                u = child.get(key)
                if u is None:
                    u = child[key] = len(new_keys)
                    new_keys.append(keys[key[0]] + key[1])
                    par.append(key[0])
                    rep.append(i)
                node_of[i] = u
            nodes.append(list(node_of))
            parents.append(par)
            reps.append(rep)
            keys = new_keys
            if k == K - 1:  # outputs: keyed by the genes in layer order, whatever the plan
                cache_keys.append([("out", genes[r]) for r in rep])
            else:
                cache_keys.append([(plan.name, k, p) for p in new_keys])
        return nodes, parents, reps, cache_keys

    def _needed(self, plan: _Plan, parents: list[list[int]],
                cache_keys: list[list[tuple[Any, ...]]], *, peek: bool = False
                ) -> tuple[list[dict[int, Any]], list[list[int]]]:
        """Cache hits and the nodes to compute per level: a node is computed only when a
        node below it is (from the outputs up), and looked up only then (``peek``: without
        counting or refreshing the entries, for a cost estimate)."""
        K = len(plan.stages)
        hits: list[dict[int, Any]] = [{} for _ in range(K)]
        need: list[list[int]] = [[] for _ in range(K)]
        wanted = set(range(len(cache_keys[-1])))
        for k in range(K - 1, -1, -1):
            up: set[int] = set()
            for u in sorted(wanted):
                key = cache_keys[k][u]
                hit = self._acts.peek(key) if peek else self._acts.get(key)
                if hit is None:
                    need[k].append(u)
                    if k > 0:
                        up.add(parents[k][u])
                else:
                    hits[k][u] = hit
            wanted = up
        return hits, need

    def _cost(self, plan: _Plan, need: list[list[int]], parents: list[list[int]]) -> float:
        """Estimated seconds to compute the nodes ``need`` in the batches ``_batches``
        makes (measured plans only)."""
        return sum(plan.cost[k](len(batch)) for k, nd in enumerate(need)
                   for batch in self._batches(plan, k, nd, parents[k]))

    def _choose(self, tries: dict[str, Any]) -> _Plan:
        """The plan for a chunk: once both have run, the cheaper estimate (the chain wins
        ties: it also fills the prefix cache for the next generation); before, the chain
        when its trie shares at least a third of the stage work, else the whole model."""
        chain, whole = self._chain, self._whole
        if chain is None:
            return whole
        if self.options.trie == "always":
            return chain
        need_c, need_w = tries["chain"][2], tries["whole"][2]
        if chain.measured and whole.measured:
            c = self._cost(chain, need_c, tries["chain"][0][1])
            w = self._cost(whole, need_w, tries["whole"][0][1])
            return chain if c <= 1.05 * w else whole
        work = sum(len(nd) for nd in need_c) / max(1, len(need_c) * len(need_w[0]))
        if work <= 2 / 3:
            return chain
        # little sharing: the whole model, unless it is measured and the chain is not
        return chain if whole.measured and not chain.measured else whole

    def _evaluate_chunk(self, genes: list[tuple[Gene, ...]]) -> tuple[np.ndarray, np.ndarray]:
        """Divergence and metric ``(P,)`` of one chunk, by the chain's trie or the whole
        model, whichever is estimated to cost less."""
        tries = {}
        for p in (self._chain, self._whole):
            if p is not None:
                trie = self._trie(p, genes)
                tries[p.name] = (trie, *self._needed(p, trie[1], trie[3], peek=True))
        plan = self._choose(tries)
        self.chunks[plan.name] += 1
        nodes, parents, reps, cache_keys = tries[plan.name][0]
        hits, need = self._needed(plan, parents, cache_keys)
        acts: list[tuple[Any, int] | None] = [(_Whole(self._x), 0)]
        for k in range(len(plan.stages)):
            new_acts: list[tuple[Any, int] | None] = [None] * len(reps[k])
            for u, hit in hits[k].items():
                new_acts[u] = (_unsqueeze(hit), 0)
            for batch in self._batches(plan, k, need[k], parents[k]):
                xs = []
                for u in batch:
                    a = acts[parents[k][u]]
                    assert a is not None  # a needed node's parent is computed or cached
                    xs.append(a)
                t0 = time.perf_counter()
                block = self._run_stage(plan, k, xs, [genes[reps[k][u]] for u in batch])
                plan.cost[k].add(len(batch), time.perf_counter() - t0)
                for r, u in enumerate(batch):
                    new_acts[u] = (block, r)
                    self._acts.put(cache_keys[k][u], _row(block, r))
            acts = new_acts
        t0 = time.perf_counter()
        final = [a for a in acts if a is not None]
        assert len(final) == len(acts)
        outputs, batched = _gather(final)
        if not batched:  # one node: give it its student axis
            outputs = _unsqueeze(outputs)
        target = self.target
        d = target.divergence.batched(self._teacher_out, outputs).double().mean(-1)
        d_np = d.detach().to("cpu", torch.float64).numpy().reshape(-1)
        if target.metric is not None:
            cpu = outputs_mod.map_tensors(outputs, lambda t: t.cpu())
            a_np = target.metric.batched(target.teacher_out, cpu, target.calib.labels)
        else:
            a_np = np.full(len(final), np.nan)
        self.timing["measure"] += time.perf_counter() - t0
        last = nodes[-1]
        return d_np[last], a_np[last]

    def _batches(self, plan: _Plan, k: int, missing: list[int], parents: list[int]
                 ) -> list[list[int]]:
        """Split the nodes to compute at stage ``k`` into batches of at most the memory bound:
        runs of siblings (one parent: their input is shared, not copied) are packed whole
        into batches while they fit, a run longer than a batch is split; a batch of several
        runs stacks their inputs (a copy, cheaper than one more call)."""
        step = 1
        if plan.vmap:
            bound = self.options.memory_mb * 2**20 // plan.peak_bytes[k]
            if self.device.type == "cpu":
                per_node = plan.out_bytes[k] + sum(
                    tensor_bytes(self._tensors[self._names[j]]) for j in plan.reads[k]
                )
                bound = min(bound, CPU_BLOCK_BYTES // per_node)
            step = max(1, min(self.chunk_size, int(bound)))
        runs: list[list[int]] = []
        for u in missing:
            if runs and parents[runs[-1][-1]] == parents[u]:
                runs[-1].append(u)
            else:
                runs.append([u])
        out: list[list[int]] = []
        cur: list[int] = []
        for run in runs:
            if len(run) >= step:  # a long run alone: its batches share one input
                out += [run[i : i + step] for i in range(0, len(run), step)]
                continue
            if len(cur) + len(run) > step:
                out.append(cur)
                cur = []
            cur += run
        if cur:
            out.append(cur)
        return out

    def _run_stage(self, plan: _Plan, k: int, xs: list[tuple[Any, int]],
                   rows: list[tuple[Gene, ...]]) -> Any:
        """Stage ``k`` for ``G`` students: their inputs ``xs`` (``(block, row)``) and their
        genes ``rows``. Returns ``(G, *out)``."""
        fn, fixed = plan.stages[k].fn, plan.fixed[k]
        G = len(rows)
        t0 = time.perf_counter()
        wb = {self._names[j]: self._weights(j, [g[j] for g in rows]) for j in plan.reads[k]}
        t1 = time.perf_counter()
        self.timing["weights"] += t1 - t0
        if G == 1:  # also every call without vmap: _batches makes batches of one then
            blk, row = xs[0]
            y = _unsqueeze(fn(_row(blk, row), {**fixed, **{n: w[0] for n, w in wb.items()}}))
        elif plan.batch[k]:
            x, x_batched = _gather(xs)
            y = self._run_vmap(plan, k, x, x_batched, wb, G)
        else:  # one student after another (a convolution on the CPU: _loops)
            ys = [fn(_row(blk, row), {**fixed, **{n: w[i] for n, w in wb.items()}})
                  for i, (blk, row) in enumerate(xs)]
            y = (torch.stack(ys) if isinstance(ys[0], torch.Tensor)
                 else outputs_mod.cat([_unsqueeze(v) for v in ys]))
        self.timing["forward"] += time.perf_counter() - t1
        return y

    def _run_vmap(self, plan: _Plan, k: int, x: Any, x_batched: bool,
                  wb: dict[str, torch.Tensor], G: int) -> Any:
        """Stage ``k`` for ``G`` students under ``torch.vmap``: stacked weights ``wb`` (name ->
        ``(G, *shape)``), input ``x`` shared (or ``(G, ...)`` when ``x_batched``)."""
        fn, fixed = plan.stages[k].fn, plan.fixed[k]
        if not wb:  # a stage with no compressible layer
            if not x_batched:
                y = fn(x, fixed)
                return outputs_mod.map_tensors(y, lambda t: t.unsqueeze(0).expand(G, *t.shape))
            with _quiet_fallback():
                return torch.vmap(lambda xi: fn(xi, fixed))(x)

        def one(xi: Any, w: dict[str, torch.Tensor]) -> Any:
            return fn(xi, {**fixed, **w})

        with _quiet_fallback():
            return torch.vmap(one, in_dims=(0 if x_batched else None, 0))(x, wb)


# torch's warning when vmap runs an operation without a batching rule (CPU attention,
# F.scaled_dot_product_attention, is one) one student at a time inside the batched call.
_FALLBACK_WARNING = "There is a performance drop because we have not yet implemented the batching"


@contextlib.contextmanager
def _quiet_fallback() -> Iterator[None]:
    """Hide torch's per-operation vmap fallback warning ("please file us an issue"): the
    fallback computes the same outputs, and for attention on the CPU it runs at the speed of
    the per-student loop while the model's other operations stay batched (measured on
    4 students x 64 sequences x 8 heads x 48 tokens: fallback 34 ms, loop 32 ms, the math
    backend under vmap 62 ms), so there is nothing for the user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FALLBACK_WARNING, category=UserWarning)
        yield


def device_model(teacher: nn.Module, device: torch.device) -> nn.Module:
    """The teacher on ``device``: itself when its tensors are there already, else a copy."""
    tensors = [*teacher.parameters(), *teacher.buffers()]
    if all(t.device == device for t in tensors):
        return teacher
    return copy.deepcopy(teacher).to(device)


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
