"""Fixtures of the tune tests: a fake search for the fast wiring tests, and a digits problem
whose teacher and ranks are prepared once so that worker processes only read them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tunehelpers import DIGITS, fake_search, patch_fake_search


@pytest.fixture
def fake_search_patch(monkeypatch):
    patch_fake_search(monkeypatch)
    return fake_search


# --- the real digits problem, prepared once ------------------------------------------------


@pytest.fixture(scope="session")
def digits_ready(tmp_path_factory) -> Path:
    """Run one tiny search so the digits teacher and its relevance ranks sit in
    $MOECOMP_ARTIFACTS before several worker processes start (no training race)."""
    from moecomp.config import load_problem
    from moecomp.search import run_search

    out = tmp_path_factory.mktemp("warm")
    run_search(load_problem(DIGITS), out / "run", budget=16, params={"pop_size": 8}, progress=False)
    return Path(os.environ["MOECOMP_ARTIFACTS"])
