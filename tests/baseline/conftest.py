"""Fixtures of the baseline tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The toy networks here are tiny: intra-op threads only add synchronisation, which on a
    busy CI machine costs 30x the arithmetic. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
