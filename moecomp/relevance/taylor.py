"""First-order Taylor relevance: ``|w * dL/dw|``, the loss change a first-order expansion
predicts when the weight is zeroed, accumulated over calibration batches.

The loss ``L`` is selectable:

- ``"task"``: the task loss (cross-entropy on the calibration labels) of the teacher itself.
- ``"noise"``: the teacher-student divergence of a student that is the teacher with Gaussian
  noise (``noise_scale`` times each compressible tensor's standard deviation) added to every
  compressible tensor. The divergence of the teacher from itself is at its minimum, where
  the gradient is zero, so a perturbed student is what gives the gradient a direction.
- ``"prune"``: the same, with a student whose compressible tensors are magnitude pruned at
  ``prune_fraction``.

The score is summed per batch in absolute value (``sum_b |w * g_b|`` / number of batches),
so gradients of opposite sign on different batches do not cancel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from moecomp import inputs as inputs_mod
from moecomp import outputs
from moecomp.config import RelevanceConfig
from moecomp.errors import ConfigError
from moecomp.relevance.base import calibration_slice, task_loss
from moecomp.target import LayerRef, Target

TaylorLoss = Literal["task", "noise", "prune"]


def perturbed_weights(
    target: Target, kind: TaylorLoss, *, noise_scale: float, prune_fraction: float, seed: int
) -> dict[str, torch.Tensor]:
    """The compressible tensors of the student the Taylor loss is measured on.

    ``"task"``: the teacher's own; ``"noise"``: plus ``N(0, (noise_scale * std(w))^2)`` drawn
    from ``seed`` in ``target.layers`` order; ``"prune"``: the smallest ``prune_fraction`` of
    each tensor by magnitude set to zero (ties by flat index).
    """
    weights = target.weights()
    if kind == "task":
        return weights
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for ref in target.layers:
        w = weights[ref.name]
        if kind == "noise":
            # drawn on the CPU: the same noise whatever device the teacher is on
            noise = torch.randn(w.shape, generator=gen, dtype=w.dtype).to(w.device)
            out[ref.name] = w + noise_scale * w.float().std().to(w.dtype) * noise
        else:
            flat = w.reshape(-1)
            n_zero = int(round(prune_fraction * flat.numel()))
            order = torch.argsort(flat.abs(), stable=True)
            pruned = flat.clone()
            pruned[order[:n_zero]] = 0
            out[ref.name] = pruned.reshape(w.shape)
    return out


@dataclass(frozen=True)
class Taylor:
    """Scorer ``|w * dL/dw|`` (see the module docstring for the losses)."""

    loss: TaylorLoss = "task"
    calibration: int = 256  # first n calibration inputs
    batch_size: int = 64
    noise_scale: float = 0.1  # "noise": std of the noise relative to each tensor's std
    prune_fraction: float = 0.5  # "prune": share of each tensor zeroed in the student

    def __post_init__(self) -> None:
        if self.loss not in get_args(TaylorLoss):
            raise ConfigError(
                "relevance.taylor_loss",
                f"must be one of {', '.join(map(repr, get_args(TaylorLoss)))}, got {self.loss!r}",
            )
        for name, value, lo in (
            ("calibration", self.calibration, 1),
            ("batch_size", self.batch_size, 1),
        ):
            if value < lo:
                raise ConfigError(f"relevance.{name}", f"must be >= {lo}, got {value}")
        if not self.noise_scale > 0:
            raise ConfigError("relevance.noise_scale", f"must be > 0, got {self.noise_scale}")
        if not 0 < self.prune_fraction < 1:
            raise ConfigError(
                "relevance.prune_fraction", f"must be in (0, 1), got {self.prune_fraction}"
            )

    @classmethod
    def from_config(cls, cfg: RelevanceConfig, *, progress: bool = False) -> Taylor:
        return cls(loss=cfg.taylor_loss, calibration=cfg.calibration)

    def __call__(self, target: Target, layer: LayerRef, *, seed: int) -> torch.Tensor:
        x, y, t = calibration_slice(target, self.calibration)
        state = target.state_dict()
        state |= perturbed_weights(
            target,
            self.loss,
            noise_scale=self.noise_scale,
            prune_fraction=self.prune_fraction,
            seed=seed,
        )
        w_teacher = target.weights()[layer.name].float()
        total = torch.zeros_like(w_teacher)
        n_batches = 0
        for i, xb in inputs_mod.batches(x, self.batch_size):
            w = state[layer.name].clone().requires_grad_(True)
            out = outputs.select(
                inputs_mod.functional(target.teacher, state | {layer.name: w}, xb), target.output
            )
            if self.loss == "task":
                loss = task_loss(target, out, None if y is None else y[i : i + self.batch_size])
            else:
                tb = outputs.take(t, slice(i, i + self.batch_size))
                loss = target.divergence(tb, out).mean()
            (grad,) = torch.autograd.grad(loss, w)
            total += (w_teacher * grad.float()).abs()
            n_batches += 1
        return total / n_batches
