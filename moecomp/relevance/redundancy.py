"""Redundancy bound (seed 3; Zhou et al., arXiv 2206.03596): how much of a layer the loss
does not use, from the rank of its gradients, as an upper bound for its sparsity gene.

For a layer with weight ``W: (out, in)`` (Conv: ``in`` = in_channels * kernel size), the
gradient of the task loss on each of ``B`` calibration batches is a matrix ``G_b: (out, in)``.
Stacked vertically, ``[G_1; ...; G_B]: (B*out, in)``, their row space is the set of input
directions the loss ever moves the layer along; stacked horizontally,
``[G_1 | ... | G_B]: (out, B*in)``, their column space the output directions. With ``r_in``
and ``r_out`` the *effective ranks* of the two stacks (the fewest singular values holding
``energy`` of the squared Frobenius norm), the layer acts on an ``r_out x r_in`` subspace,
and a weight supported on ``r_out`` rows and ``r_in`` columns can reproduce it there. The
bound is

    s_max = clip(1 - (r_in * r_out) / (in * out), 0, 0.99)

so a layer whose inputs live in a 2-D subspace gets ``s_max >= 1 - 2 / in``, and a layer
with full-rank gradients gets 0. The row space cannot hold more directions than there are
calibration samples, so use at least ``in`` samples (all of ``target.calib_x`` by default).
"""

from __future__ import annotations

import torch

from moecomp import inputs as inputs_mod
from moecomp import outputs
from moecomp.relevance.base import task_loss
from moecomp.target import Target

MAX_BOUND = 0.99


def effective_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Fewest leading singular values (any order given) whose squares sum to at least
    ``energy`` (in (0, 1]) of all squares; 0 for a zero matrix."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    sq = singular_values.double().pow(2).sort(descending=True).values
    total = float(sq.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(sq, 0) / total
    # the 1e-12 keeps energy=1 from failing on the rounding of the last partial sum
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype))) + 1


def sparsity_bound(grads: torch.Tensor, energy: float = 0.99) -> float:
    """``clip(1 - r_in * r_out / (in * out), 0, 0.99)`` for per-batch gradients
    ``grads: (B, out, *in)`` (see the module docstring)."""
    b, n_out = int(grads.shape[0]), int(grads.shape[1])
    g = grads.reshape(b, n_out, -1).double()
    n_in = int(g.shape[2])
    rows = g.reshape(b * n_out, n_in)
    cols = g.permute(1, 0, 2).reshape(n_out, b * n_in)
    r_in = effective_rank(torch.linalg.svdvals(rows), energy)
    r_out = effective_rank(torch.linalg.svdvals(cols), energy)
    bound = 1.0 - (r_in * r_out) / (n_in * n_out)
    return min(max(bound, 0.0), MAX_BOUND)


def layer_gradients(
    target: Target, *, batches: int = 32, calibration: int | None = None
) -> dict[str, torch.Tensor]:
    """Per-batch gradients of the task loss, ``(B, *shape)`` per layer of ``target.layers``
    (on the CPU), on the first ``calibration`` inputs (all by default) cut into ``batches``
    batches; the forwards run where the target is (:meth:`Target.on_device`)."""
    part = target.calib if calibration is None else target.calib.take(slice(0, calibration))
    x, y = part.inputs, part.labels
    n = len(part)
    b = max(1, min(batches, n))
    bounds = torch.linspace(0, n, b + 1).round().long().tolist()
    state = target.state_dict()
    names = target.layer_names
    out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        ws = {name: state[name].clone().requires_grad_(True) for name in names}
        pred = outputs.select(inputs_mod.functional(target.teacher, state | ws,
                                                    inputs_mod.take(x, slice(lo, hi))),
                              target.output)
        loss = task_loss(target, pred, None if y is None else y[lo:hi])
        grads = torch.autograd.grad(loss, [ws[name] for name in names])
        for name, g in zip(names, grads, strict=True):
            out[name].append(g.detach().cpu())  # the SVDs run on the CPU, whatever the device
    return {name: torch.stack(gs) for name, gs in out.items()}


def redundancy_bounds(
    target: Target, *, energy: float = 0.99, batches: int = 32, calibration: int | None = None,
    device: str = "auto",
) -> dict[str, float]:
    """Per-layer maximum sparsity in [0, 0.99] from the gradient-rank analysis, keyed by
    layer name in ``target.layers`` order. device: where the gradients are computed (a
    device setting, ``moecomp.evaluate.options``); the ranks are taken on the CPU."""
    from moecomp.evaluate.options import resolve_device

    target = target.on_device(resolve_device(device, field="device"))
    grads = layer_gradients(target, batches=batches, calibration=calibration)
    return {name: sparsity_bound(g, energy) for name, g in grads.items()}
