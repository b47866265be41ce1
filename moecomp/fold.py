"""Fold BatchNorm into the Conv/Linear before it, where that is exact (``layers.fold_batchnorm``).

A BatchNorm in eval mode is a per-channel affine map ``y = (x - mean) * s + beta`` with ``s =
gamma / sqrt(var + eps)``. When its input is exactly the output of a Conv (or of a Linear
with a ``(n, features)`` output) and nothing else reads that output, the map folds into the
layer: ``W' = W * s`` (per output channel) and ``b' = (b - mean) * s + beta``. The teacher
moecomp compresses is then the folded model: the BatchNorm is replaced by a
:class:`FoldedBatchNorm` (an ``nn.Identity`` that says where it went), a layer that had no
bias gets one, and the BatchNorm's tensors are no longer stored (neither searched nor
written to files).

Which BatchNorms read which layer is found on one forward pass of a few samples
(:func:`trace_forward`): module hooks record every call's input and output autograd nodes,
and the autograd graph says how often each node is read. A fold is taken only when

- the BatchNorm is in eval mode with running statistics, and it and the layer run once;
- the BatchNorm's input is the layer's output node itself (no view, no in-place change in
  between) and that node is read once (by the BatchNorm);
- the layer's weight is not shared with another module;

and the folded model's outputs must equal the original's on those samples to float
tolerance (PyTorch is the oracle): otherwise the folds are tried one at a time and only the
exact ones kept. Nothing is folded silently wrong; a model with nothing to fold comes back
as it was.

Decoded files of a folded target load into the folded model: :func:`apply_folds` turns a
freshly built model (e.g. the user's factory) into it from the record :func:`folds_of`
gives, which export writes into the ``.mcz`` header (``meta.folded``).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch
from torch import nn

from moecomp import inputs as inputs_mod
from moecomp import outputs
from moecomp.inputs import Inputs

FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers a BatchNorm can fold into (weight's dim 0 = output channels)."""

CHECK_SAMPLES = 64
"""Samples the folded model is compared with the original on."""

RTOL = 1e-4
"""Folded outputs must lie within ``RTOL`` x the largest output magnitude of the original's
(float32 rounding of the folded weights; measured errors are ~1e-7 relative)."""


# --- one forward pass, traced --------------------------------------------------------------

@dataclass
class ModuleCall:
    """One call of a module: its first tensor input and its output (detached), with their
    autograd nodes (``grad_fn``) and version counters at call time."""

    name: str
    module: nn.Module
    input: torch.Tensor | None = None
    in_node: Any = None
    in_version: int = -1
    output: torch.Tensor | None = None
    out_node: Any = None
    out_version: int = -1


@dataclass
class ForwardTrace:
    """A forward pass: ``calls`` per module name (in call order), ``order`` the names of
    every call in call order, ``reads`` how many times each autograd node is read (by other
    nodes, or as an output of the model)."""

    calls: dict[str, list[ModuleCall]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    reads: Counter[Any] = field(default_factory=Counter)

    def once(self, name: str) -> ModuleCall | None:
        """The module's call if it ran exactly once, else None."""
        calls = self.calls.get(name, [])
        return calls[0] if len(calls) == 1 else None

    def producer(self, node: Any) -> ModuleCall | None:
        """The call whose output node is ``node``."""
        if node is None:
            return None
        for calls in self.calls.values():
            for c in calls:
                if c.out_node is node:
                    return c
        return None


def _first_tensor(args: Any) -> torch.Tensor | None:
    if isinstance(args, torch.Tensor):
        return args
    if isinstance(args, tuple | list):
        for a in args:
            if isinstance(a, torch.Tensor):
                return a
    return None


def trace_forward(model: nn.Module, inputs: Inputs) -> tuple[ForwardTrace, Any]:
    """Run ``model`` on ``inputs`` once with gradients recorded (every floating parameter
    temporarily requires grad; restored after) and module hooks on every submodule.
    Returns the trace and the model's output (detached)."""
    trace = ForwardTrace()
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    handles = []

    def pre(mod: nn.Module, args: Any) -> None:
        name = names.get(id(mod), "")
        x = _first_tensor(args)
        call = ModuleCall(name, mod)
        if x is not None:
            call.input, call.in_node, call.in_version = x.detach(), x.grad_fn, x._version
        trace.calls.setdefault(name, []).append(call)
        trace.order.append(name)

    def post(mod: nn.Module, args: Any, out: Any) -> None:
        call = trace.calls[names.get(id(mod), "")][-1]
        y = out if isinstance(out, torch.Tensor) else None
        if y is not None:
            call.output, call.out_node, call.out_version = y.detach(), y.grad_fn, y._version

    seen: set[int] = set()
    for m in model.modules():
        if id(m) in seen or m is model:
            continue
        seen.add(id(m))
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    flags = {id(p): p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
        with torch.enable_grad():
            out = inputs_mod.call(model, inputs)
        roots = [t.grad_fn for t in outputs.tensors(out) if t.grad_fn is not None]
        trace.reads.update(roots)
        stack, visited = list(roots), set()
        while stack:
            node = stack.pop()
            if node in visited:
                continue
            visited.add(node)
            for nxt, _ in node.next_functions:
                if nxt is not None:
                    trace.reads[nxt] += 1
                    stack.append(nxt)
        detached = outputs.detach(out)
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    return trace, detached


def shared_weights(model: nn.Module) -> set[str]:
    """Names of modules whose ``weight`` another module also holds (tied)."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def close(a: Any, b: Any, *, rtol: float = RTOL) -> bool:
    """Whether outputs ``b`` equal ``a`` to float tolerance: every tensor within ``rtol`` x the
    largest magnitude of its counterpart in ``a`` (same structure, shapes and dtypes)."""
    ta, tb = outputs.tensors(a), outputs.tensors(b)
    if len(ta) != len(tb):
        return False
    for u, v in zip(ta, tb, strict=True):
        if u.shape != v.shape or u.dtype != v.dtype:
            return False
        if not u.is_floating_point():
            if not torch.equal(u, v):
                return False
            continue
        scale = float(u.abs().max()) if u.numel() else 0.0
        if not bool(((u - v).abs() <= rtol * max(scale, 1e-30)).all()):
            return False
    return True


# --- folding -------------------------------------------------------------------------------

class FoldedBatchNorm(nn.Identity):
    """Where a BatchNorm was: it now lives in the weight and bias of module ``into``; passes
    its input through unchanged."""

    def __init__(self, into: str, num_features: int, *, bias_added: bool) -> None:
        super().__init__()
        self.into = into
        self.num_features = num_features
        self.bias_added = bias_added

    def extra_repr(self) -> str:
        return f"{self.num_features}, folded into {self.into!r}"


@dataclass(frozen=True)
class Fold:
    """A BatchNorm (module name ``norm``) folded into the layer ``into``; ``bias_added``: the
    layer had no bias and got one."""

    norm: str
    into: str
    bias_added: bool

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "into": self.into, "bias_added": self.bias_added}


def _is_bn(m: nn.Module) -> TypeGuard[nn.modules.batchnorm._BatchNorm]:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)


def find_folds(model: nn.Module, inputs: Inputs) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` module names of every fold the structure allows (see the module
    doc), in call order; values are not checked here."""
    trace, _ = trace_forward(model, inputs)
    tied = shared_weights(model)
    mods = dict(model.named_modules())
    pairs = []
    for name in dict.fromkeys(trace.order):
        bn = mods.get(name)
        if bn is None or not _is_bn(bn) or bn.training or bn.running_mean is None \
                or bn.running_var is None:
            continue
        call = trace.once(name)
        if call is None or call.in_node is None:
            continue
        prod = trace.producer(call.in_node)
        if prod is None or trace.once(prod.name) is not prod:
            continue
        layer = prod.module
        if not isinstance(layer, FOLDABLE) or prod.name in tied:
            continue
        if trace.reads[call.in_node] != 1 or prod.out_version != call.in_version:
            continue
        out = prod.output
        assert out is not None
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if isinstance(layer, nn.Linear) and out.dim() != 2:
            continue  # BatchNorm1d's channel axis is 1: a Linear's features only for 2-D
        if out.dim() < 2 or out.shape[1] != channels or bn.num_features != channels:
            continue
        pairs.append((prod.name, name))
    return pairs


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, last = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, last, new)


def _fold_one(model: nn.Module, layer_name: str, bn_name: str) -> Fold:
    """Fold BatchNorm ``bn_name`` into ``layer_name`` of ``model`` in place (float64 maths,
    results in the layer's dtype)."""
    layer = model.get_submodule(layer_name)
    bn = model.get_submodule(bn_name)
    assert isinstance(layer, FOLDABLE) and _is_bn(bn)
    assert isinstance(bn.running_mean, torch.Tensor) and isinstance(bn.running_var, torch.Tensor)
    w = layer.weight
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    s = gamma / torch.sqrt(var + bn.eps)
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
    bias_added = layer.bias is None
    with torch.no_grad():
        w.copy_((w.double() * s.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
        new_b = ((b - mean) * s + beta).to(w.dtype)
        if bias_added:
            layer.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)
        else:
            assert layer.bias is not None
            layer.bias.copy_(new_b)
    _set_module(model, bn_name, FoldedBatchNorm(layer_name, bn.num_features,
                                                bias_added=bias_added))
    return Fold(bn_name, layer_name, bias_added)


def _runs_close(original: nn.Module, folded: nn.Module, inputs: Inputs, want: Any) -> bool:
    try:
        with torch.no_grad():
            got = inputs_mod.call(folded, inputs)
    except Exception:  # a forward that reads the BatchNorm elsewhere: not foldable
        return False
    return close(want, got)


def fold_batchnorm(model: nn.Module, inputs: Inputs) -> tuple[nn.Module, list[Fold]]:
    """A copy of ``model`` (eval mode) with every BatchNorm folded that folds exactly, and the
    folds; ``(model, [])`` itself when there is none. ``inputs``: a few samples the model
    takes (the first :data:`CHECK_SAMPLES` are used). A BatchNorm in training mode is left
    alone (its output depends on the batch); the Target's teacher is in eval mode."""
    if not any(_is_bn(m) for m in model.modules()):
        return model, []
    few = inputs_mod.head(inputs, CHECK_SAMPLES)
    pairs = find_folds(model, few)
    if not pairs:
        return model, []
    with torch.no_grad():
        want = outputs.detach(inputs_mod.call(model, few))
    folded = copy.deepcopy(model)
    folds = [_fold_one(folded, a, b) for a, b in pairs]
    if _runs_close(model, folded, few, want):
        return folded, folds
    keep = []  # some fold is not exact: keep those that are, one at a time
    folded = copy.deepcopy(model)
    for a, b in pairs:
        trial = copy.deepcopy(folded)
        fold = _fold_one(trial, a, b)
        if _runs_close(model, trial, few, want):
            folded = trial
            keep.append(fold)
    return (folded, keep) if keep else (model, [])


def folds_of(model: nn.Module) -> list[dict[str, Any]]:
    """The record of a folded model's folds (what export writes as ``meta.folded``)."""
    return [Fold(name, m.into, m.bias_added).to_dict() for name, m in model.named_modules()
            if isinstance(m, FoldedBatchNorm)]


def apply_folds(model: nn.Module, folds: list[dict[str, Any]]) -> nn.Module:
    """Give a freshly built ``model`` the folded structure of the record ``folds``
    (:func:`folds_of`, a file's ``meta.folded``), in place: each BatchNorm named becomes a
    :class:`FoldedBatchNorm` and a layer that gets a bias gets a zero one. Values are not
    folded: load the decoded state dict next (``moecomp.target.load_state``). Returns
    ``model``."""
    for f in folds:
        layer = model.get_submodule(f["into"])
        bn = model.get_submodule(f["norm"])
        if not isinstance(layer, FOLDABLE) or not _is_bn(bn):
            raise ValueError(f"fold {f}: {f['into']} is {type(layer).__name__} and "
                             f"{f['norm']} is {type(bn).__name__}; expected a Conv/Linear and "
                             "a BatchNorm (is this the model the file was made from?)")
        if f["bias_added"]:
            n = layer.weight.shape[0]
            layer.bias = nn.Parameter(torch.zeros(n, dtype=layer.weight.dtype,
                                                  device=layer.weight.device))
        _set_module(model, f["norm"], FoldedBatchNorm(f["into"], bn.num_features,
                                                      bias_added=f["bias_added"]))
    return model
