"""Tiny targets for the relevance tests: a random MLP on random inputs (milliseconds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moecomp.data import Split
from moecomp.metric import builtin_accuracy
from moecomp.target import Target, select_layers


def tiny_target(
    *,
    n_in: int = 12,
    hidden: int = 10,
    n_out: int = 4,
    n: int = 64,
    seed: int = 0,
    x: torch.Tensor | None = None,
) -> Target:
    """A 2-layer ReLU MLP (random weights from ``seed``) on ``n`` random inputs, labelled by
    a random rule so the task loss has gradients."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    if x is None:
        x = torch.randn(n, n_in, generator=gen)
    y = torch.randint(n_out, (x.shape[0],), generator=gen)
    return Target(teacher=model, layers=select_layers(model), calib=Split(x, y),
                  metric=builtin_accuracy())


@pytest.fixture
def tiny() -> Target:
    return tiny_target()


@pytest.fixture
def make_tiny():  # noqa: ANN201  (returns the builder above; test modules are not a package)
    return tiny_target
