"""The chain structure of any model, found automatically: the stages of the prefix cache.

A model is a *chain* at a module call ``c`` when, at the moment ``c`` starts, the only value
that depends on the compressible weights and is still needed later is ``c``'s first
positional argument ``a`` (a tensor, batch-first), and ``a`` is used after that only inside
``c``. Everything else still needed (the inputs, an attention mask computed from them,
parameters and buffers) does not depend on any compressible weight. Then a student's output
is ``suffix(prefix(inputs))`` where ``prefix`` computes ``a`` and ``suffix`` continues from it,
and students that share the genes of the layers in ``prefix`` share ``a``.

How it is found (:func:`find_chain`): the teacher runs once on a few calibration samples under
a ``TorchFunctionMode`` that records every tensor operation (which tensors it reads and
writes) and forward hooks that record every module call. From that trace, for every module
call, which tensors are live across its start and which of them depend on a compressible
weight (taint propagated from the weights through every operation) tell whether it is a
boundary. Between the first uses of consecutive compressible layers the earliest valid
boundary is taken, so each stage holds the layers first used in it (typically: the embedding,
one stage per transformer block, the head; or one per layer of an MLP or LeNet).

How a stage runs (:class:`ReplayStage`): the whole model is called (``functional_call`` with
the student's tensors) on the calibration inputs; every outermost module call that completed
before the stage's start boundary and returned something that depends on a compressible
weight is replaced by a stand-in that returns zeros of the right shape (so the work before
the boundary is skipped; the little code between module calls runs on the zeros and its
results are dead by construction; calls whose outputs depend on no compressible weight, such
as a mask built from the inputs, run as they are); at the start boundary the first argument is
replaced by the previous stage's output; at the next boundary the first argument is captured
and the forward is abandoned (an exception that derives from ``BaseException``, which user
``except Exception`` blocks do not catch). Samples run in batches of ``target.batch_size``.

When it applies, exactly: the model is called as a Python ``nn.Module`` whose forward is the
same sequence of module calls and tensor operations for the probe samples as for all others
(no data-dependent control flow between boundaries); the boundary modules and the modules
replaced by stand-ins are each called once per forward; the boundary argument and the
stand-ins' outputs have the sample axis first (their other dimensions do not depend on the
number of samples, or grow in proportion to it); at least two stages hold compressible layers.
The split is accepted only if, on a few calibration samples, it reproduces the model's own
output both with the teacher's weights and with a perturbed student (half of every
compressible tensor zeroed), so a stage that reads a weight it is not given is caught.
Otherwise the model runs as one stage (no prefix cache) and ``reason`` says why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from moecomp import inputs as inputs_mod
from moecomp import outputs as outputs_mod

PROBE = 4
"""Calibration samples the chain is traced and checked on (a second run on ``PROBE - 1``
tells which dimensions are the sample axis)."""


@dataclass(frozen=True)
class Stage:
    """One step of a chain model for one student.

    params: names (as in ``named_parameters``/``named_buffers``) of every tensor ``fn`` reads.
    fn: ``fn(x, params) -> y``; ``x`` the previous stage's output for the calibration inputs
        (the inputs themselves for the first stage), ``params`` name -> tensor for ``params``.
        Written for one student; the evaluator batches it with ``torch.vmap``.
    reads: the compressible layers (names) whose student weights ``fn`` needs; None: every
        compressible layer among ``params``.
    """

    params: tuple[str, ...]
    fn: Callable[[Any, dict[str, torch.Tensor]], Any]
    reads: tuple[str, ...] | None = None


class _Halt(BaseException):
    """Abandons a forward at the next stage's boundary, carrying its first argument. A
    ``BaseException`` so that a model's ``except Exception`` does not swallow it."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__("stage boundary reached")
        self.value = value


# --- tracing ---------------------------------------------------------------------------------
@dataclass
class _Call:
    module: nn.Module
    name: str
    start: int  # position of the first operation inside the call
    opened: int  # order of the call's start among all calls' starts and ends
    end: int = -1  # position after the last operation inside the call
    closed: int = -1  # order of its end (see ``opened``)
    arg: torch.Tensor | None = None  # first positional argument, when a tensor
    out: Any = None


@dataclass
class _Trace:
    calls: list[_Call] = field(default_factory=list)
    produced: dict[int, int] = field(default_factory=dict)  # tensor id -> position
    used: dict[int, list[int]] = field(default_factory=dict)  # tensor id -> positions
    dependent: set[int] = field(default_factory=set)  # ids that depend on compressible weights
    keep: list[Any] = field(default_factory=list)  # every tensor seen: ids stay unique
    pos: int = 0
    events: int = 0


class _Tracer(TorchFunctionMode):
    """Records, per tensor operation, the tensors it reads and the tensors it returns, and
    propagates dependence on the compressible weights."""

    def __init__(self, trace: _Trace) -> None:
        super().__init__()
        self.t = trace

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        t = self.t
        pos = t.pos
        t.pos += 1
        ins = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        outs = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
        dep = False
        for x in ins:
            t.used.setdefault(id(x), []).append(pos)
            dep = dep or id(x) in t.dependent
        t.keep.append((ins, outs))
        for y in outs:
            t.produced.setdefault(id(y), pos)
            if dep:
                t.dependent.add(id(y))
        if dep:  # in-place writes into an argument (``out=`` included)
            for x in ins:
                if any(x is y for y in outs):
                    t.dependent.add(id(x))
        return out


def _trace(model: nn.Module, x: inputs_mod.Inputs, weights: Sequence[torch.Tensor],
           output: str | None) -> _Trace:
    """Run ``model`` on ``x`` recording operations and module calls (see :class:`_Trace`)."""
    t = _Trace()
    t.dependent = {id(w) for w in weights}
    names = {id(m): n for n, m in model.named_modules()}
    open_calls: dict[int, list[_Call]] = {}

    def pre(m: nn.Module, args: tuple[Any, ...]) -> None:
        c = _Call(m, names.get(id(m), "?"), t.pos, t.events,
                  arg=args[0] if args and isinstance(args[0], torch.Tensor) else None)
        t.events += 1
        t.calls.append(c)
        open_calls.setdefault(id(m), []).append(c)

    def post(m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        c = open_calls[id(m)].pop()
        c.end, c.closed, c.out = t.pos, t.events, out
        t.events += 1

    handles = []
    for m in model.modules():
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.no_grad(), _Tracer(t):
            # layout=False: a channels-last copy up front would read every convolution's
            # weight before the forward does, and the trace places layers by first reads
            out = outputs_mod.select(inputs_mod.call(model, x, layout=False), output)
    finally:
        for h in handles:
            h.remove()
    for y in outputs_mod.tensors(out):  # the output is read after everything
        t.used.setdefault(id(y), []).append(t.pos)
    t.keep.append(out)
    return t


def _call_outputs(model: nn.Module, x: inputs_mod.Inputs) -> dict[int, list[Any]]:
    """Per module (by id), the outputs and first arguments of its calls on ``x``."""
    seen: dict[int, list[Any]] = {}

    def pre(m: nn.Module, args: tuple[Any, ...]) -> None:
        seen.setdefault(id(m), []).append(
            [args[0] if args and isinstance(args[0], torch.Tensor) else None, None])

    def post(m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        for rec in reversed(seen[id(m)]):
            if rec[1] is None:
                rec[1] = out
                break

    handles = []
    for m in model.modules():
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.no_grad():
            inputs_mod.call(model, x, layout=False)
    finally:
        for h in handles:
            h.remove()
    return seen


# --- stand-ins, boundaries and replays -------------------------------------------------------
def _scaling(a: tuple[int, ...], b: tuple[int, ...], na: int, nb: int
             ) -> tuple[tuple[int, bool], ...] | None:
    """How a shape depends on the number of samples, from shapes ``a`` (``na`` samples) and
    ``b`` (``nb``): per dimension ``(size per sample, True)`` or ``(size, False)``."""
    if len(a) != len(b):
        return None
    out = []
    for da, db in zip(a, b, strict=True):
        if da == db:
            out.append((da, False))
        elif da * nb == db * na and da % na == 0:
            out.append((da // na, True))
        else:
            return None
    return tuple(out)


@dataclass(frozen=True)
class _StandIn:
    """Zeros shaped like the outputs of a module's calls, for any number of samples."""

    templates: tuple[Any, ...]  # per call, the output on the probe, as a structure
    shapes: tuple[tuple[tuple[tuple[int, bool], ...], ...], ...]  # per call, per tensor

    def __call__(self, call: int, n: int, device: torch.device) -> Any:
        it = iter(self.shapes[call])

        def zeros(t: torch.Tensor) -> torch.Tensor:
            shape = [d * n if per else d for d, per in next(it)]
            return torch.zeros((), dtype=t.dtype, device=device).expand(shape)

        return outputs_mod.map_tensors(self.templates[call], zeros)


class _Counted:
    """A stand-in's zeros for its successive calls within one forward."""

    def __init__(self, stand_in: _StandIn, n: int, device: torch.device) -> None:
        self.stand_in, self.n, self.device, self.calls = stand_in, n, device, 0

    def __call__(self) -> Any:
        self.calls += 1
        return self.stand_in(self.calls - 1, self.n, self.device)


@contextlib.contextmanager
def _patched(stand_ins: Mapping[nn.Module, Callable[[], Any]], start: nn.Module | None,
             value: torch.Tensor | None, stop: nn.Module | None) -> Iterator[None]:
    """While active: the ``stand_ins`` modules return their stand-in instead of running;
    ``start`` runs with its first argument replaced by ``value``; ``stop`` halts the forward
    with its first argument (:class:`_Halt`)."""
    patched: list[tuple[nn.Module, Any]] = []

    def patch(m: nn.Module, fn: Callable[..., Any]) -> None:
        patched.append((m, m.__dict__.get("forward")))
        m.forward = fn  # type: ignore[method-assign]

    try:
        for m, make in stand_ins.items():
            patch(m, lambda *_a, _make=make, **_k: _make())
        if start is not None:
            orig = start.forward

            def substituted(*args: Any, **kwargs: Any) -> Any:
                return orig(value, *args[1:], **kwargs)

            patch(start, substituted)
        if stop is not None:
            def halt(*args: Any, **_kwargs: Any) -> Any:
                raise _Halt(args[0])

            patch(stop, halt)
        yield
    finally:
        for m, old in reversed(patched):
            if old is None:
                del m.forward
            else:
                m.forward = old  # type: ignore[method-assign]


@dataclass(frozen=True)
class ReplayStage:
    """Stage ``fn`` of a chain (see the module docstring): the model from boundary ``start``
    (None: the inputs) to boundary ``stop`` (None: the output), on the calibration inputs in
    batches."""

    model: nn.Module
    inputs: inputs_mod.Inputs
    batch_size: int
    output: str | None
    start: nn.Module | None
    stop: nn.Module | None
    stand_ins: tuple[tuple[nn.Module, _StandIn], ...] = ()

    def __call__(self, x: Any, params: dict[str, torch.Tensor]) -> Any:
        parts = []
        device = inputs_mod.device_of(self.inputs)
        # the first stage gets the inputs; later ones the previous stage's output for the
        # first samples of the inputs (all of them, or a probe's few)
        inputs = x if self.start is None else inputs_mod.head(self.inputs, int(x.shape[0]))
        for s, batch in inputs_mod.batches(inputs, self.batch_size):
            n = inputs_mod.n_samples(batch)
            value = x[s : s + n] if self.start is not None else None
            fakes = {m: _Counted(si, n, device) for m, si in self.stand_ins}
            with _patched(fakes, self.start, value, self.stop):
                try:
                    out = inputs_mod.functional(self.model, params, batch)
                except _Halt as h:
                    parts.append(h.value)
                    continue
            if self.stop is not None:
                raise RuntimeError("the forward ended without reaching the stage boundary")
            parts.append(outputs_mod.select(out, self.output))
        return parts[0] if len(parts) == 1 else outputs_mod.cat(parts)


@dataclass(frozen=True)
class Chain:
    """The result of :func:`find_chain`: the stages (None when the model is no chain) and
    why not, or the boundaries found."""

    stages: list[Stage] | None
    reason: str


def find_chain(model: nn.Module, inputs: inputs_mod.Inputs, tensors: dict[str, torch.Tensor],
               layers: list[str], *, output: str | None, batch_size: int) -> Chain:
    """Split ``model`` into replay stages at its chain boundaries (module docstring).

    inputs: the calibration inputs (all samples; the stages run on them);
    tensors: every parameter and buffer as the students start from (name -> tensor);
    layers: the names of the compressible tensors (keys of ``tensors``).
    """
    n = inputs_mod.n_samples(inputs)
    if n < PROBE:
        return Chain(None, f"fewer than {PROBE} calibration samples")
    params = dict(model.named_parameters())
    weights = [params[n] for n in layers if n in params]
    if len(weights) != len(layers):
        return Chain(None, "a compressible tensor is not a parameter of the model")
    x4, x3 = inputs_mod.head(inputs, PROBE), inputs_mod.head(inputs, PROBE - 1)
    try:
        trace = _trace(model, x4, weights, output)
        small = _call_outputs(model, x3)
    except Exception as e:  # a model the trace cannot follow: no chain, said why
        return Chain(None, f"tracing failed ({type(e).__name__}: {e})")
    calls = trace.calls
    n_calls: dict[int, int] = {}
    for c in calls:
        n_calls[id(c.module)] = n_calls.get(id(c.module), 0) + 1
    # first use of each layer: the first operation that reads its weight
    first_use = {}
    for name, w in zip(layers, weights, strict=True):
        # a weight the forward never reads changes nothing: the first stage takes it
        first_use[name] = min(trace.used.get(id(w), [0]))
    order = sorted(layers, key=lambda nm: first_use[nm])

    def stand_ins_before(b: _Call) -> list[_Call]:
        """The outermost calls that completed before call ``b`` started and whose output
        depends on a compressible weight (the others run as they are: what they compute
        for later is the same for every student)."""
        done = [c for c in calls if 0 <= c.closed < b.opened]
        outer = [c for c in done
                 if not any(o.opened < c.opened and c.closed < o.closed for o in done)]
        return [c for c in outer
                if any(id(y) in trace.dependent for y in outputs_mod.tensors(c.out))]

    def valid(c: _Call) -> list[_Call] | None:
        """The stand-ins of boundary ``c`` when it is one, else None."""
        a = c.arg
        if a is None or n_calls[id(c.module)] != 1 or a.dim() == 0 or a.shape[0] != PROBE:
            return None
        if id(a) not in trace.dependent:
            return None
        rec3 = small.get(id(c.module))
        if not rec3 or rec3[0][0] is None or rec3[0][0].shape[0] != PROBE - 1:
            return None
        t = c.start
        fakes = stand_ins_before(c)
        inside = [(f.start, f.end) for f in fakes]
        for tid, uses in trace.used.items():
            p = trace.produced.get(tid, -1)
            if p < 0 or p >= t or max(uses) < t:
                continue  # there before the forward (inputs, tensors), produced after, dead
            if tid == id(a):
                if any(u >= t and not c.start <= u < c.end for u in uses):
                    return None
                continue
            if tid in trace.dependent:
                return None
            if any(s <= p < e for s, e in inside):
                return None  # produced inside a call that the stand-ins skip
        for f in fakes:  # a module called again later would be skipped there too
            if any(o.module is f.module and o.closed > c.opened for o in calls):
                return None
        return fakes

    boundaries: list[tuple[_Call, list[_Call]]] = []
    for prev, nxt in zip(order, order[1:], strict=False):
        lo, hi = first_use[prev], first_use[nxt]
        if boundaries and boundaries[-1][0].start > lo:
            continue  # already split after prev
        for c in sorted((c for c in calls if lo < c.start <= hi), key=lambda c: c.start):
            fakes = valid(c)
            if fakes is not None:
                boundaries.append((c, fakes))
                break
    if not boundaries:
        return Chain(None, "no module call is a chain boundary")

    # stand-in shapes from the two probes, per call of the module
    stand_in: dict[int, _StandIn] = {}
    for _, fakes in boundaries:
        for f in fakes:
            if id(f.module) in stand_in:
                continue
            mine = [c for c in calls if c.module is f.module]
            rec3 = small.get(id(f.module), [])
            if len(rec3) != len(mine) or any(r[1] is None for r in rec3):
                return Chain(None, f"{f.name} is not called alike on fewer samples")
            templates, shapes = [], []
            for c, (_, out3) in zip(mine, rec3, strict=True):
                t4, t3 = outputs_mod.tensors(c.out), outputs_mod.tensors(out3)
                if len(t4) != len(t3):
                    return Chain(None, f"{f.name}'s output changes structure with the "
                                 "samples")
                per_call = []
                for a4, a3 in zip(t4, t3, strict=True):
                    sc = _scaling(tuple(a4.shape), tuple(a3.shape), PROBE, PROBE - 1)
                    if sc is None:
                        return Chain(None, f"{f.name}'s output shape does not follow the "
                                     "samples")
                    per_call.append(sc)
                templates.append(c.out)
                shapes.append(tuple(per_call))
            stand_in[id(f.module)] = _StandIn(tuple(templates), tuple(shapes))

    # stages: [start, stop) between consecutive boundaries
    edges: list[tuple[_Call, list[_Call]] | None] = [None, *boundaries, None]
    stages: list[Stage] = []
    names = tuple(tensors)
    positions = [0] + [b.start for b, _ in boundaries] + [trace.pos + 1]
    for k in range(len(edges) - 1):
        start, stop = edges[k], edges[k + 1]
        lo, hi = positions[k], positions[k + 1]
        reads = tuple(nm for nm, w in zip(layers, weights, strict=True)
                      if any(lo <= u < hi for u in trace.used.get(id(w), [0])))
        fn = ReplayStage(
            model, inputs, batch_size, output,
            start[0].module if start else None,
            stop[0].module if stop else None,
            tuple((f.module, stand_in[id(f.module)]) for f in start[1]) if start else (),
        )
        stages.append(Stage(names, fn, reads))
    owners = [sum(1 for nm in layers if positions[k] <= first_use[nm] < positions[k + 1])
              for k in range(len(stages))]
    if sum(1 for o in owners if o) < 2:
        return Chain(None, "fewer than two stages hold compressible layers")
    where = ", ".join(b.name for b, _ in boundaries)
    return Chain(stages, f"{len(stages)} stages, boundaries before {where}")


def check_chain(stages: list[Stage], model: nn.Module, inputs: inputs_mod.Inputs,
                tensors: dict[str, torch.Tensor], layers: list[str],
                output: str | None) -> str | None:
    """Why the stages do not reproduce the model on a few samples, or None when they do:
    with the teacher's tensors and with a perturbed student (half of every compressible
    tensor zeroed by a fixed pattern), each stage given the student weights of its
    ``reads`` only."""
    x = inputs_mod.head(inputs, PROBE)
    g = torch.Generator().manual_seed(0)
    student = dict(tensors)
    for nm in layers:
        w = tensors[nm]
        keep = torch.rand(w.shape, generator=g) < 0.5
        student[nm] = torch.where(keep.to(w.device), w, torch.zeros((), dtype=w.dtype,
                                                                     device=w.device))
    for label, weights in (("the teacher", tensors), ("a perturbed student", student)):
        with torch.no_grad():
            ref = outputs_mod.select(inputs_mod.functional(model, weights, x), output)
            y: Any = x
            for st in stages:
                reads = set(st.reads) if st.reads is not None else set(layers)
                p = {nm: (weights[nm] if nm in reads else tensors[nm]) for nm in st.params}
                y = st.fn(y, p)
        if not allclose(y, ref):
            return f"outputs differ from the model's forward for {label}"
    return None


def allclose(a: Any, b: Any) -> bool:
    """Whether two outputs of one structure agree to float tolerance."""
    ta, tb = outputs_mod.tensors(a), outputs_mod.tensors(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and torch.allclose(x, y, rtol=1e-4, atol=1e-5)
        for x, y in zip(ta, tb, strict=True))
