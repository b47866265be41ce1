"""Fixtures of the search tests: the digits problem and its target (session-wide, from
tests/conftest.py) and one Evaluator shared by every test of this folder; each test builds
its own (cheap) pymoo problem around them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from moecomp.search import CompressionProblem, SharedCodebookProblem
from moecomp.search.problem import layer_genes, layer_ranks


@pytest.fixture(scope="session")
def digits_ranks(digits_problem, digits_target):
    return layer_ranks(digits_target, digits_problem)


@pytest.fixture(scope="session")
def digits_evaluator(digits_problem, digits_target, digits_ranks):
    from moecomp.evaluate import Evaluator

    return Evaluator(
        digits_target,
        digits_ranks,
        quantizer="uniform",
        chunk_size=digits_problem.search.chunk_size,
    )


@pytest.fixture
def make_problem(
    digits_problem, digits_target, digits_evaluator
) -> Callable[..., CompressionProblem | SharedCodebookProblem]:
    """``make_problem(search=..., objectives=..., genes=...)``: a fresh problem over the shared
    Evaluator, with fields of those config sections changed."""

    def make(**sections: dict[str, Any]) -> CompressionProblem | SharedCodebookProblem:
        cfg = digits_problem
        for section, changes in sections.items():
            cfg = cfg.replace(section, **changes)
        if cfg.search.problem == "shared":
            return SharedCodebookProblem(cfg, digits_evaluator, digits_target.layer_names)
        return CompressionProblem(cfg, digits_evaluator, layer_genes(cfg, digits_target))

    return make


@pytest.fixture
def screened_genes() -> Callable[[CompressionProblem, Any], Any]:
    """``screened_genes(problem, df)``: genes ``(n, 2L)`` of the rows of a run's
    screened.csv or evaluated.csv ``df``."""

    def genes(problem: CompressionProblem, df: Any) -> Any:
        s_cols = [f"s:{n}" for n in problem.layer_names]
        b_cols = [f"b:{n}" for n in problem.layer_names]
        return problem.genes.encode(df[s_cols].to_numpy(),
                                    df[b_cols].to_numpy()).reshape(len(df), -1)

    return genes
