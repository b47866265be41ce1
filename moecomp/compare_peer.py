"""Compare a run's front with a peer a user could run instead (``moecomp compare RUN
--baseline tpe|optuna-nsga2|random|nsga2-default|moead``).

The peer (:mod:`moecomp.baseline.peers`) searches the run's own problem (genes, objectives,
constraints, Evaluator) with the run's evaluation budget (``n_evals`` of search.json) and,
by default, its seed. Its front is the feasible non-dominated set of everything it evaluated;
hypervolume and dominance follow :mod:`moecomp.compare` (objectives divided by the problem's
reference point, pymoo's ``HV``), so the numbers compare with the run's ``hv.csv``.

Written into the run folder: ``peers/<peer>-seed-<s>-budget-<b>/`` (the peer's work, resumed
after an interruption), ``compare_<peer>.csv`` (the peer's front with ``dominated_by_front``),
``compare_<peer>_summary.csv`` / ``.md`` and ``plots/compare_<peer>.png``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moecomp.baseline.peers import PEER_LABELS, check_peer, run_peer
from moecomp.compare import (
    ComparisonResult,
    comparison_info,
    dominated_by,
    draw_comparison,
    run_budget,
    summary_frame,
    summary_markdown,
)
from moecomp.errors import ConfigError
from moecomp.runs import RunFolder, atomic_write_csv, atomic_write_text, metric_info
from moecomp.search.objectives import objective_space
from moecomp.search.problem import build_problem
from moecomp.target import Target, build_target


def peer_files(run: RunFolder, peer: str) -> dict[str, Path]:
    """Where the comparison with ``peer`` is written in ``run``."""
    return {
        "points": run.file(f"compare_{peer}.csv"),
        "summary": run.file(f"compare_{peer}_summary.csv"),
        "markdown": run.file(f"compare_{peer}_summary.md"),
    }


def compare_with_peer(
    run_dir: str | os.PathLike[str],
    peer: str,
    *,
    budget: int | None = None,
    seed: int | None = None,
    target: Target | None = None,
    plot: bool = True,
    progress: bool = False,
    device: str = "auto",
) -> ComparisonResult:
    """Run ``peer`` on the run's problem and write the comparison of the two fronts.

    budget: the peer's evaluations (default: the search's own ``n_evals``); seed: the
    peer's seed (default: the search's). target: the run's Target when the caller has it
    (else built from the run's problem). device: where the Evaluator runs.
    ``ComparisonResult.de`` holds the peer's front (sorted by the first objective).
    """
    check_peer(peer)
    run = RunFolder(run_dir)
    problem = run.problem()
    front = run.front()
    total = run_budget(run) if budget is None else budget
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ConfigError("budget", f"must be a positive integer, got {total!r}")
    seed = problem.search.seed if seed is None else int(seed)
    status = run.status()
    search_evals = int(status.get("n_evals", total))
    search_budget = int(status.get("budget", search_evals))
    if target is None:
        target = build_target(problem, progress=progress)
    built = build_problem(problem, target=target, device=device)
    label = PEER_LABELS[peer]
    folder = run.path / "peers" / f"{peer}-seed-{seed}-budget-{total}"
    with tqdm(total=total, desc=label, unit="eval", disable=not progress) as bar:

        def advance(n: int) -> None:
            bar.update(n - bar.n)

        result = run_peer(built, peer, budget=total, seed=seed, folder=folder, on_evals=advance)

    space = objective_space(problem)
    F_all = space.matrix(result.evaluated)
    idx = result.front(F_all)
    idx = idx[np.argsort(F_all[idx, 0], kind="stable")]
    points = result.evaluated.iloc[idx].reset_index(drop=True)
    F_front = space.matrix(front)
    F_peer = F_all[idx]
    points.insert(0, "peer", peer)
    points["dominated_by_front"] = dominated_by(F_front, F_peer)
    summary = summary_frame(
        F_front,
        F_peer,
        space.ref_point,
        front_evals=search_evals,
        de_evals=result.n_evals,
        front_budget=search_budget,
        de_budget=total,
        label=label,
    )
    files = peer_files(run, peer)
    atomic_write_csv(files["points"], points)
    atomic_write_csv(files["summary"], summary)
    atomic_write_text(
        files["markdown"], summary_markdown(summary, points, space, metric=metric_info(run))
    )
    if plot:
        files["plot"] = draw_comparison(
            comparison_info(front, points, space, label=label),
            run.plots / f"compare_{peer}.png",
            space=space,
            summary=summary,
            title=f"{problem.name}: search front vs {label} (seed {seed})",
        )
    files["peer_run"] = folder
    return ComparisonResult(
        run_dir=run.path, de=points, summary=summary, space=space, files=files
    )
