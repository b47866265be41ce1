"""Hierarchical pruning made physical: units and filters nobody reads leave the dense model.

The third seed (Zhou et al.) prunes layer-wise first, then filter-wise; in moecomp the search
chooses each layer's sparsity and unit-structured ranks (``relevance.units``) prune weak
hidden units whole. A masked model still computes those units as zeros at full size. This
module removes them: the dense export gets smaller matrices (the next layer's inputs too),
so its safetensors, its ONNX graph and its latency shrink, with the masked model's outputs.

A *coupling* is a producer layer ``A`` (Linear or Conv, groups 1) whose output reaches one
consumer layer ``B`` only, through elementwise activations, views (a flatten) and, after a
Conv, spatial pooling; found on one traced forward pass (``moecomp.fold.trace_forward``:
every node on the way read once, nothing else reads ``A``'s output). Unit ``i`` of ``A``
feeds ``g`` input columns of ``B`` (1 for Linear-Linear and Conv-Conv channels, the spatial
positions for a flattened Conv before a Linear). Unit ``i`` is removable when

- ``B``'s columns of unit ``i`` are all zero (its output goes nowhere), or
- ``A``'s row ``i`` is all zero: the unit then outputs a constant ``c`` (``act(bias_i)``,
  measured on the trace and required exactly constant), whose contribution ``c * sum(B's
  columns)`` moves into ``B``'s bias first (a Linear, or a Conv without padding, whose
  every output position reads ``c`` the same way; ``c = 0`` needs nothing).

Removal takes ``A``'s row and bias entry and ``B``'s columns (one unit is always kept). The
shrunk model's outputs must equal the masked model's to float tolerance on the traced
samples (PyTorch as the oracle); a coupling whose removal does not is left whole (e.g. a
forward that hard-codes a size), so nothing is removed silently wrong.

Loading: :class:`Structured` records the kept units and the new parameter shapes;
:func:`resize` turns a freshly built model (the original class) into one of those shapes, so
the shrunk safetensors loads into it (``moecomp export --structured`` writes both, and an
ONNX of the shrunk model with ``--onnx``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moecomp import inputs as inputs_mod
from moecomp import outputs
from moecomp.finetune import top_mask
from moecomp.fold import ForwardTrace, ModuleCall, close, shared_weights, trace_forward
from moecomp.inputs import Inputs

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

CHECK_SAMPLES = 64
"""Samples the shrunk model is traced and compared on."""

ELEMENTWISE = frozenset({
    "ReluBackward0", "ReluBackward1", "ThresholdBackward0", "TanhBackward0",
    "SigmoidBackward0", "GeluBackward0", "LeakyReluBackward0", "LeakyReluBackward1",
    "SiluBackward0", "EluBackward0", "EluBackward1", "HardtanhBackward0", "HardtanhBackward1",
    "SoftplusBackward0", "HardswishBackward0", "HardsigmoidBackward0", "MishBackward0",
    "ClampBackward1", "ClampMinBackward0", "ClampMaxBackward0", "CloneBackward0",
    "ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0",
})
"""Autograd nodes that act on each unit alone (or only re-view the tensor)."""

SPATIAL = frozenset({
    "MaxPool1DWithIndicesBackward0", "MaxPool2DWithIndicesBackward0",
    "MaxPool3DWithIndicesBackward0", "AvgPool2DBackward0", "AvgPool3DBackward0",
    "AdaptiveMaxPool2DBackward0", "AdaptiveMaxPool3DBackward0",
})
"""Pooling over the spatial axes: per channel, so allowed after a Conv producer."""

SCALED = frozenset({"MulBackward0", "DivBackward0"})
"""Allowed when the other operand is a single number (``_saved_other`` of one element)."""


@dataclass(frozen=True)
class Coupling:
    """Producer module ``producer`` whose units feed ``group`` input columns each of
    ``consumer`` and nothing else."""

    producer: str
    consumer: str
    group: int


@dataclass(frozen=True)
class Structured:
    """What :func:`shrink` removed. ``kept``: per producer module, the indices (of the
    original units) that stay; ``shapes``: the new shape of every parameter whose shape
    changed; ``couplings``: the couplings found (removal applied where ``kept`` has the
    producer); ``params_before``/``params_after``: parameter counts."""

    kept: dict[str, list[int]]
    shapes: dict[str, list[int]]
    couplings: list[Coupling]
    params_before: int
    params_after: int

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "shapes": self.shapes,
                "couplings": [c.__dict__ for c in self.couplings],
                "params_before": self.params_before, "params_after": self.params_after}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Structured:
        return cls({k: [int(i) for i in v] for k, v in d["kept"].items()},
                   {k: [int(i) for i in v] for k, v in d["shapes"].items()},
                   [Coupling(**c) for c in d["couplings"]], int(d["params_before"]),
                   int(d["params_after"]))


def _n_units(m: nn.Module) -> int:
    return int(m.weight.shape[0])  # type: ignore[index, union-attr]


def _plain(m: nn.Module) -> bool:
    """A Linear, or a Conv with groups 1 (not transposed)."""
    return isinstance(m, LAYERS) and getattr(m, "groups", 1) == 1


def _path_ok(node: Any, trace: ForwardTrace, conv: bool) -> bool:
    """A node on the way from producer to consumer: unit-wise, read once, one tensor input."""
    name = type(node).__name__
    if trace.reads[node] != 1:
        return False
    if name in SCALED:
        other = getattr(node, "_saved_other", None)
        if not isinstance(other, torch.Tensor) or other.numel() != 1:
            return False
    elif name not in ELEMENTWISE and not (conv and name in SPATIAL):
        return False
    return len([n for n, _ in node.next_functions if n is not None]) == 1


def find_couplings(model: nn.Module, inputs: Inputs) -> list[Coupling]:
    """Every coupling of ``model`` (see the module doc), in call order of the consumers."""
    trace, _ = trace_forward(model, inputs)
    tied = shared_weights(model)
    by_out: dict[Any, ModuleCall] = {}
    for name in trace.order:
        c = trace.once(name)
        if c is not None and c.out_node is not None and isinstance(c.module, LAYERS):
            by_out[c.out_node] = c
    found = []
    for name in dict.fromkeys(trace.order):
        b = trace.once(name)
        if b is None or not _plain(b.module) or name in tied or b.in_node is None:
            continue
        node, path = b.in_node, list[Any]()
        while node is not None and node not in by_out and len(path) < 64:
            path.append(node)
            nxt = [n for n, _ in node.next_functions if n is not None]
            node = nxt[0] if len(nxt) == 1 else None
        a = by_out.get(node)
        if a is None or not _plain(a.module) or a.name in tied or a.name == name:
            continue
        conv = not isinstance(a.module, nn.Linear)
        if trace.reads[a.out_node] != 1 or not all(_path_ok(n, trace, conv) for n in path):
            continue
        out, x = a.output, b.input
        assert out is not None and x is not None
        units = _n_units(a.module)
        if isinstance(a.module, nn.Linear):
            if not isinstance(b.module, nn.Linear) or x.shape[-1] != units or \
                    out.shape[-1] != units:
                continue
            group = 1
        elif isinstance(b.module, nn.Linear):
            if x.dim() != 2 or x.shape[1] % units:
                continue
            group = x.shape[1] // units
        else:
            if x.dim() != out.dim() or x.shape[1] != units:
                continue
            group = 1
        found.append(Coupling(a.name, name, group))
    return found


def _columns(b: nn.Module, units: int) -> torch.Tensor:
    """``B``'s weight as ``(out, units, columns per unit)`` (a view of its storage)."""
    w = b.weight
    assert isinstance(w, torch.Tensor)
    return w.detach().view(w.shape[0], units, -1)


def _read(b: nn.Module, units: int) -> torch.Tensor:
    """Bool ``(units,)``: whether ``B`` has a nonzero weight on the unit's columns."""
    return read_units(_columns(b, units).ne(0), units)


def _unit_values(x: torch.Tensor, b: nn.Module, units: int, i: int) -> torch.Tensor:
    """Every value ``B``'s input ``x`` holds for unit ``i`` (1-D)."""
    if isinstance(b, nn.Linear):
        return x.reshape(-1, units, x.shape[-1] // units)[:, i].reshape(-1)
    return x[:, i].reshape(-1)


def _no_padding(b: nn.Module) -> bool:
    """A Linear, or a Conv with zero padding (every output position reads a constant input
    channel the same way)."""
    if isinstance(b, nn.Linear):
        return True
    pad: Any = getattr(b, "padding", 0)
    return not isinstance(pad, str) and all(int(p) == 0 for p in pad)


def _move_constants(model: nn.Module, c: Coupling, inputs: Inputs) -> None:
    """Dead units of ``c.producer`` (all-zero rows) whose columns in ``c.consumer`` are not
    zero: their constant output moves into the consumer's bias and the columns become zero
    (in place; outputs unchanged up to rounding). Units whose output is not exactly constant
    on ``inputs``, or whose constant cannot move (no bias, a padded Conv), stay."""
    a, b = model.get_submodule(c.producer), model.get_submodule(c.consumer)
    units = _n_units(a)
    w_a = a.weight
    assert isinstance(w_a, torch.Tensor)
    dead = w_a.detach().reshape(units, -1).eq(0).all(1)
    todo = (dead & _read(b, units)).nonzero().flatten().tolist()
    if not todo:
        return
    trace, _ = trace_forward(model, inputs)
    call = trace.once(c.consumer)
    assert call is not None and call.input is not None
    bias = b.bias
    cols = _columns(b, units)
    with torch.no_grad():
        for i in todo:
            v = _unit_values(call.input, b, units, i)
            const = float(v[0])
            if not bool((v == v[0]).all()):
                continue
            if const != 0.0:
                if not isinstance(bias, torch.Tensor) or not _no_padding(b):
                    continue
                bias.add_((cols[:, i].double().sum(1) * const).to(bias.dtype))
            cols[:, i].zero_()


def _remove(model: nn.Module, c: Coupling, keep: torch.Tensor) -> None:
    """Take the rows ``keep`` of the producer and their columns of the consumer (in place)."""
    a, b = model.get_submodule(c.producer), model.get_submodule(c.consumer)
    units = _n_units(a)

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.detach().clone().contiguous(), requires_grad=t.requires_grad)

    with torch.no_grad():
        a.weight = param(a.weight[keep])  # type: ignore[index]
        if a.bias is not None:
            a.bias = param(a.bias[keep])  # type: ignore[index]
        w = b.weight
        assert isinstance(w, torch.Tensor)
        if isinstance(b, nn.Linear):
            cols = (keep[:, None] * c.group + torch.arange(c.group)[None, :]).reshape(-1)
            b.weight = param(w[:, cols])
        else:
            b.weight = param(w.reshape(w.shape[0], units, *w.shape[2:])[:, keep])
    _sync(a)
    _sync(b)


def _sync(m: nn.Module) -> None:
    """A module's size attributes from its weight's shape."""
    w = m.weight
    assert isinstance(w, torch.Tensor)
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = int(w.shape[0]), int(w.shape[1])
    elif isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        m.out_channels, m.in_channels = int(w.shape[0]), int(w.shape[1]) * int(m.groups)


def _n_params(model: nn.Module) -> int:
    return sum(int(p.numel()) for p in model.parameters())


def shrink(model: nn.Module, inputs: Inputs) -> tuple[nn.Module, Structured]:
    """A copy of ``model`` (typically a decoded, masked student) with every removable unit
    removed (see the module doc), and the record. ``inputs``: samples the model takes (the
    first :data:`CHECK_SAMPLES` are traced and compared on). The copy's outputs equal
    ``model``'s to float tolerance on them (``moecomp.fold.close``)."""
    few = inputs_mod.head(inputs, CHECK_SAMPLES)
    with torch.no_grad():
        want = outputs.detach(inputs_mod.call(model, few))
    work = copy.deepcopy(model)
    couplings = find_couplings(work, few)
    for c in couplings:
        _move_constants(work, c, few)
    plans = []
    for c in couplings:
        a, b = work.get_submodule(c.producer), work.get_submodule(c.consumer)
        units = _n_units(a)
        read = _read(b, units)
        if bool(read.all()):
            continue
        if not bool(read.any()):
            read[0] = True  # keep one unit: a layer of no units is no model
        plans.append((c, read.nonzero().flatten()))

    def attempt(base: nn.Module, chosen: list[tuple[Coupling, torch.Tensor]]
                ) -> nn.Module | None:
        trial = copy.deepcopy(base)
        try:
            for c, keep in chosen:
                _remove(trial, c, keep)
            with torch.no_grad():
                got = inputs_mod.call(trial, few)
        except (RuntimeError, ValueError, IndexError):  # a forward that hard-codes a size
            return None
        return trial if close(want, got) else None

    kept_plans = plans
    result = attempt(work, plans)
    if result is None:  # some removal is not exact: keep the couplings that are, one by one
        result, kept_plans = work, []
        for p in plans:
            trial = attempt(result, [p])
            if trial is not None:
                result = trial
                kept_plans.append(p)
    before = {n: list(p.shape) for n, p in model.named_parameters()}
    shapes = {n: list(p.shape) for n, p in result.named_parameters()
              if before.get(n) != list(p.shape)}
    record = Structured({c.producer: keep.tolist() for c, keep in kept_plans}, shapes,
                        couplings, _n_params(model), _n_params(result))
    return result.eval(), record


def resize(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Give a freshly built ``model`` (the original class) the parameter shapes ``shapes``
    (:attr:`Structured.shapes`, a structured export's JSON), in place, with zero values and
    the modules' size attributes to match; load the shrunk state dict next. Returns
    ``model``."""
    params = dict(model.named_parameters())
    for name, shape in shapes.items():
        if name not in params:
            raise ValueError(f"{name}: not a parameter of {type(model).__name__} (is this the "
                             "model the structured export was made from?)")
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        old = params[name]
        if len(shape) != old.dim() or math.prod(shape) > old.numel():
            raise ValueError(f"{name}: shape {shape} does not shrink {list(old.shape)}")
        setattr(mod, attr, nn.Parameter(torch.zeros(shape, dtype=old.dtype, device=old.device),
                                        requires_grad=old.requires_grad))
        if attr == "weight":
            _sync(mod)
    return model


# --- masks that spend no survivor on a unit that cannot matter -----------------------------

def read_units(consumer: torch.Tensor, units: int) -> torch.Tensor:
    """Bool ``(units,)``: whether the consumer's mask (bool, its weight's shape) keeps a
    survivor on each producer unit's columns."""
    return consumer.reshape(consumer.shape[0], units, -1).any(2).any(0)


def wasted_units(masks: dict[str, torch.Tensor], pairs: list[tuple[str, str]]
                 ) -> dict[tuple[str, str], torch.Tensor]:
    """Per coupled pair ``(A, B)`` of compressed tensors (keys of ``masks``: bool, in the
    weights' shapes), bool ``(units,)``: the units of ``A`` that cannot matter, those whose
    row in ``A`` keeps no survivor (a constant output) or whose columns in ``B`` keep none
    (an output nobody reads)."""
    out = {}
    for a, b in pairs:
        units = masks[a].shape[0]
        computed = masks[a].reshape(units, -1).any(1)
        out[(a, b)] = ~(computed & read_units(masks[b], units))
    return out


def repair_masks(masks: dict[str, torch.Tensor], pairs: list[tuple[str, str]],
                 scores: dict[str, torch.Tensor], *, rounds: int = 64
                 ) -> tuple[dict[str, torch.Tensor], int]:
    """Move the survivors a unit that cannot matter holds (:func:`wasted_units`: in ``A``
    the rows, in ``B`` the columns of those units) to the positions of highest ``scores``
    among units that do; every tensor keeps its number of survivors. Removing survivors
    can leave more units wasted, so this repeats until nothing moves (at most ``rounds``
    times); a tensor without enough room among useful units is left as it is. Survivors
    are only added to useful units, so no unit becomes useful by the repair.

    masks: bool, in the weights' shapes; pairs: ``(A, B)`` names of coupled tensors
    (:func:`find_couplings` of their modules); scores: same shapes, larger is kept first.
    Returns the repaired masks (new tensors) and how many survivors moved."""
    out = {k: m.clone() for k, m in masks.items()}
    counts = {k: int(m.sum()) for k, m in out.items()}
    moved = 0
    for _ in range(rounds):
        allowed = {k: torch.ones_like(m) for k, m in out.items()}
        for (a, b), wasted in wasted_units(out, pairs).items():
            useful = ~wasted
            units = useful.numel()
            rows = allowed[a].view(units, -1)
            rows &= useful.view(-1, 1)
            cols = allowed[b].view(allowed[b].shape[0], units, -1)
            cols &= useful.view(1, -1, 1)
        changed = False
        for k, ok in allowed.items():
            if bool(ok.all()) or int(ok.sum()) < counts[k]:
                continue
            keep = out[k] & ok
            need = counts[k] - int(keep.sum())
            if need == 0:
                continue
            free = torch.where(ok & ~keep, scores[k].float(),
                               torch.full_like(scores[k], -math.inf, dtype=torch.float32))
            out[k] = keep | top_mask(free, need)
            moved += need
            changed = True
        if not changed:
            break
    return out, moved


def coupled_tensors(model: nn.Module, inputs: Inputs, names: list[str]
                    ) -> list[tuple[str, str]]:
    """The ``(A, B)`` weight names among ``names`` whose modules form a coupling of
    ``model`` (:func:`find_couplings`, traced on ``inputs``)."""
    have = set(names)
    return [(f"{c.producer}.weight", f"{c.consumer}.weight")
            for c in find_couplings(model, inputs)
            if f"{c.producer}.weight" in have and f"{c.consumer}.weight" in have]
