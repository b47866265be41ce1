"""What a relevance scorer is, and how its scores become ranks.

A scorer answers, for one compressible tensor of a :class:`~moecomp.target.Target`, how
relevant each weight is: a float tensor of the weight's shape, higher = more relevant.
Ranks (the contract of ``docs/architecture.md``) are an ``int64`` permutation of
``0..numel-1`` of the weight's shape, rank 0 the *least* relevant weight (pruned first).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from moecomp import outputs
from moecomp.errors import ConfigError
from moecomp.inputs import Inputs
from moecomp.target import LayerRef, Target


class Scorer(Protocol):
    """``scorer(target, layer, *, seed) -> scores``: float, ``layer.shape``, higher = keep."""

    def __call__(self, target: Target, layer: LayerRef, *, seed: int) -> torch.Tensor: ...


def scores_to_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Ranks of ``scores`` (any shape): int64 of the same shape, a permutation of
    ``0..numel-1``; rank 0 is the lowest score, ties go to the lower flat index first.

    NaN scores are an error (they have no order).
    """
    if not scores.is_floating_point():
        scores = scores.double()
    if bool(torch.isnan(scores).any()):
        raise ValueError("relevance scores contain NaN; the scorer failed on this layer")
    flat = scores.detach().reshape(-1)
    order = torch.argsort(flat, stable=True)  # stable: equal scores keep flat-index order
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(flat.numel(), dtype=order.dtype, device=order.device)
    return ranks.reshape(scores.shape).cpu()


def is_permutation(ranks: torch.Tensor) -> bool:
    """Whether ``ranks`` holds every integer of ``0..numel-1`` exactly once."""
    if ranks.dtype != torch.int64:
        return False
    flat = ranks.reshape(-1)
    n = flat.numel()
    if n == 0:
        return True
    if int(flat.min()) < 0 or int(flat.max()) >= n:
        return False
    return bool((torch.bincount(flat, minlength=n) == 1).all())


def order_to_scores(order: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Scores (float64, ``shape``) that rank the flat indices in ``order`` from least to most
    relevant: ``order[0]`` gets score 0, ``order[-1]`` the highest. ``order`` must be a
    permutation of ``0..numel-1``."""
    n = order.numel()
    scores = torch.empty(n, dtype=torch.float64)
    scores[order] = torch.arange(n, dtype=torch.float64)
    return scores.reshape(shape)


def calibration_slice(target: Target, n: int) -> tuple[Inputs, torch.Tensor | None, Any]:
    """The first ``n`` calibration inputs, their labels (or None) and teacher outputs."""
    n = min(n, len(target.calib))
    part = target.calib.take(slice(0, n))
    return part.inputs, part.labels, outputs.take(target.teacher_out, slice(0, n))


def layer_weight(target: Target, layer: LayerRef) -> torch.Tensor:
    """The teacher's tensor of ``layer`` (a detached view)."""
    return dict(target.teacher.named_parameters())[layer.name].detach()


def task_loss(target: Target, out: Any, y: torch.Tensor | None) -> torch.Tensor:
    """The task loss of outputs ``out`` (mean over samples): cross-entropy on the labels
    ``y`` for classifiers (the teacher's own top-1 when there are no labels), mean squared
    error to floating labels ``y`` otherwise. A target with neither has no task loss: a
    ConfigError says which scorer settings work without one."""
    pred = outputs.default_part(out)
    if target.task == "classification":
        if y is None:
            with torch.no_grad():
                y = pred.argmax(-1)
        return torch.nn.functional.cross_entropy(pred.flatten(0, -2), y.reshape(-1))
    if y is not None and y.is_floating_point() and y.numel() == pred.numel():
        return torch.nn.functional.mse_loss(pred, y.to(pred.dtype).reshape(pred.shape))
    raise ConfigError("relevance", f"this target has no task loss (metric "
                      f"{target.metric_name!r}, labels "
                      f"{'none' if y is None else tuple(y.shape)}): use relevance.taylor_loss "
                      "= 'noise' or 'prune', or the magnitude or directed scorer")
