"""What a relevance scorer is, and how its scores become ranks.

A scorer answers, for one compressible tensor of a :class:`~moecomp.target.Target`, how
relevant each weight is: a float tensor of the weight's shape, higher = more relevant.
Ranks (the contract of ``docs/architecture.md``) are an ``int64`` permutation of
``0..numel-1`` of the weight's shape, rank 0 the *least* relevant weight (pruned first).
"""

from __future__ import annotations

from typing import Protocol

import torch

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


def calibration_slice(
    target: Target, n: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The first ``n`` calibration inputs, their labels (or None) and teacher outputs."""
    n = min(n, int(target.calib_x.shape[0]))
    y = None if target.calib_y is None else target.calib_y[:n]
    return target.calib_x[:n], y, target.teacher_out[:n]


def layer_weight(target: Target, layer: LayerRef) -> torch.Tensor:
    """The teacher's tensor of ``layer`` (a detached view)."""
    return dict(target.teacher.named_parameters())[layer.name].detach()


def task_loss(target: Target, out: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """The task loss of outputs ``out: (n, ...)`` (mean over samples): cross-entropy on the
    labels ``y`` for classifiers (the teacher's own top-1 when there are no labels), mean
    squared error to ``y`` for regressions (which need labels)."""
    if target.task == "classification":
        if y is None:
            with torch.no_grad():
                y = out.argmax(-1)
        return torch.nn.functional.cross_entropy(out, y)
    if y is None:
        raise ValueError(
            "the task loss of a regression needs calibration labels (target.calib_y is None)"
        )
    return torch.nn.functional.mse_loss(out, y.to(out.dtype).reshape(out.shape))
