"""Redundancy bound (seed 3): effective ranks of stacked per-batch gradients."""

from __future__ import annotations

import pytest
import torch

from moecomp.relevance import effective_rank, layer_gradients, redundancy_bounds, sparsity_bound
from moecomp.target import Target


def test_effective_rank_known_answers() -> None:
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0]), 0.99) == 1
    assert effective_rank(torch.ones(4), 0.99) == 4
    assert effective_rank(torch.ones(4), 0.5) == 2
    assert effective_rank(torch.ones(4), 1.0) == 4
    assert effective_rank(torch.tensor([0.1, 3.0, 4.0]), 0.9) == 2  # order does not matter
    assert effective_rank(torch.zeros(3), 0.99) == 0
    with pytest.raises(ValueError, match="energy"):
        effective_rank(torch.ones(2), 0.0)


def test_sparsity_bound_known_answers() -> None:
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(16, 6, 5, generator=gen)
    assert sparsity_bound(full, 0.999) == 0.0  # full-rank gradients: nothing redundant
    u = torch.randn(6, 1, generator=gen)
    v = torch.randn(1, 5, generator=gen)
    rank_one = torch.randn(16, 1, 1, generator=gen) * (u @ v)  # (16, 6, 5), all along u v^T
    assert sparsity_bound(rank_one, 0.99) == pytest.approx(1 - 1 / 30)
    assert sparsity_bound(torch.zeros(4, 3, 3)) == 0.99  # clipped


def test_bounds_in_range_and_named(tiny: Target) -> None:
    bounds = redundancy_bounds(tiny, batches=8)
    assert list(bounds) == tiny.layer_names
    assert all(0.0 <= b <= 0.99 for b in bounds.values())
    grads = layer_gradients(tiny, batches=8)
    assert [tuple(g.shape) for g in grads.values()] == [(8, *ref.shape) for ref in tiny.layers]


def test_inputs_in_a_plane_give_a_high_bound(make_tiny) -> None:  # noqa: ANN001
    """The first layer only ever sees a 2-D subspace of its 16 inputs: at most 2 columns'
    worth of its weights matter, so the bound is at least 1 - 2/16."""
    gen = torch.Generator().manual_seed(0)
    plane = torch.randn(2, 16, generator=gen)
    x = torch.randn(256, 2, generator=gen) @ plane
    tg = make_tiny(n_in=16, hidden=12, n_out=4, x=x)
    bounds = redundancy_bounds(tg, batches=32)
    first, second = tg.layer_names
    assert bounds[first] >= 1 - 2 / 16
    assert bounds[second] < bounds[first]
    full = make_tiny(n_in=16, hidden=12, n_out=4, n=256)
    assert redundancy_bounds(full, batches=32)[full.layer_names[0]] < 0.5


def test_bound_matches_direct_gradients(tiny: Target) -> None:
    """layer_gradients agrees with plain autograd on one batch."""
    grads = layer_gradients(tiny, batches=1)
    model = tiny.teacher
    w = model.get_parameter("0.weight")
    w.requires_grad_(True)
    try:
        assert tiny.calib.labels is not None
        loss = torch.nn.functional.cross_entropy(model(tiny.calib.inputs), tiny.calib.labels)
        (g,) = torch.autograd.grad(loss, w)
    finally:
        w.requires_grad_(False)
    torch.testing.assert_close(grads[tiny.layer_names[0]][0], g)
