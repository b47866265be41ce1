"""Search (stage 6): pymoo problems over per-layer sparsity and bits, DE-style operators, and
the run driver (budget, hypervolume, progress, checkpoint and resume)."""

from moecomp.search.problem import (
    CompressionProblem,
    EvalRecord,
    SearchProblem,
    SharedCodebookProblem,
    build_problem,
)
from moecomp.search.run import SearchResult, run_search
from moecomp.search.runner import LocalRunner, Runner

__all__ = [
    "CompressionProblem",
    "EvalRecord",
    "LocalRunner",
    "Runner",
    "SearchProblem",
    "SearchResult",
    "SharedCodebookProblem",
    "build_problem",
    "run_search",
]
