"""Benchmark of tuning: hypervolume of the search with the problem's default parameters
against the best parameters of an Optuna study, at the same evaluation budget and seeds.
Prints Markdown for BENCHMARKS.md.

Run: ``.venv/bin/python bench/bench_tune.py [--study studies/tune-fashion-lenet300.toml]
[--budget 2000] [--seeds 1 2 3] [--params-from FILE] [--tune-trials 12] [--tune-budget B]
[--threads 2] [--out runs/bench-tune]``

Tuned parameters come from ``--params-from`` (a study file, a ``best_params.json`` or an
SQLite file), else from a small study run here first: the study file's space, sampler and
pruner with ``--tune-trials`` trials of ``--tune-budget`` evaluations each (default: the
comparison's ``--budget``, as parameters tuned at one budget may not suit another), stored under
``--out`` with its own name (so the study file's own storage is left alone). Trials search with
the study's seeds (``budget.seed`` and ``budget.seeds``); the comparison uses the study's
held-out seeds by default (``[holdout] seeds``), so the tuned parameters are not judged on
the seeds they were picked on. ``moecomp study --report`` makes the same comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from moecomp.config import ProblemConfig
from moecomp.search import build_problem, run_search
from moecomp.search.problem import SearchProblem
from moecomp.tune import best_params, load_study_config, run_study
from moecomp.tune.config import StudyConfig


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.1f} / {b:.1f} / {c:.1f}"


def search_hv(
    problem: SearchProblem, budget: int, seed: int, params: dict[str, Any]
) -> tuple[float, float]:
    """Final HV and seconds of one search (the run folder is thrown away). ``params`` must
    name every search field: a shared SearchProblem keeps the last run's settings."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        r = run_search(
            problem,
            Path(tmp) / "run",
            budget=budget,
            progress=False,
            plots=False,
            params={**params, "seed": seed},
        )
    return r.hv, time.perf_counter() - t0


def small_study(cfg: StudyConfig, *, trials: int, budget: int, out: Path) -> StudyConfig:
    """The study file's space, sampler and pruner; fewer, cheaper trials; stored in ``out``."""
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name}-bench-{budget}",
        n_trials=trials,
        storage=None,
        output=str(out.resolve()),
        budget=dataclasses.replace(cfg.budget, evaluations=budget),
    )


def tuned_params(args: argparse.Namespace, cfg: StudyConfig) -> tuple[dict[str, Any], str]:
    if args.params_from:
        return best_params(args.params_from), f"best trial of `{args.params_from}`"
    small = small_study(cfg, trials=args.tune_trials, budget=args.tune_budget, out=Path(args.out))
    t0 = time.perf_counter()
    study = run_study(small, progress=not args.quiet)
    secs = time.perf_counter() - t0
    states = [t.state.name for t in study.trials]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states)))
    return best_params(study), (
        f"best of a {args.tune_trials}-trial study at {args.tune_budget:,} evaluations per "
        f"trial (space, sampler and pruner of `{args.study}`; {counts}; {secs:.0f} s; "
        f"storage {small.storage_url})"
    )


def sd(x: list[float]) -> float:
    return statistics.stdev(x) if len(x) > 1 else 0.0


def fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="studies/tune-fashion-lenet300.toml")
    ap.add_argument("--budget", type=int, default=2000, help="evaluations per search")
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="comparison seeds (default: the study's held-out seeds, none a trial seed)",
    )
    ap.add_argument(
        "--params-from",
        default=None,
        help="study file / best_params.json / .db with the tuned parameters",
    )
    ap.add_argument("--tune-trials", type=int, default=12)
    ap.add_argument(
        "--tune-budget",
        type=int,
        default=None,
        help="evaluations per tuning trial (default: --budget)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the 2-core target)")
    ap.add_argument("--out", default="runs/bench-tune", help="where the small study goes")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()
    if args.tune_budget is None:
        args.tune_budget = args.budget
    torch.set_num_threads(args.threads)
    cfg = load_study_config(args.study)
    problem_cfg: ProblemConfig = cfg.load_problem()
    if args.seeds is None:
        args.seeds = list(cfg.holdout_seeds(problem_cfg))

    header = [
        "# Tuning benchmark\n",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, torch threads "
        f"{torch.get_num_threads()}, {platform.platform()}; load average at start {load()} "
        "(shared with other work)",
        f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"pymoo {version('pymoo')}, optuna {version('optuna')}",
        f"- problem: {problem_cfg.name} ({cfg.problem_path.name}), "
        f"{problem_cfg.data.calibration} calibration images, objectives "
        f"{problem_cfg.objectives.mode}, ref point {list(problem_cfg.objectives.ref_point)}",
    ]
    params, source = tuned_params(args, cfg)
    header.append(f"- tuned parameters: {source}")
    print("\n".join(header) + "\n")

    defaults = dataclasses.asdict(problem_cfg.search)
    fixed = {k: v for k, v in defaults.items() if k not in ("budget", "seed")}
    print("| parameter | default (problem file) | tuned |")
    print("| --- | --- | --- |")
    for k, v in params.items():
        print(f"| {k} | {fmt(defaults[k])} | {fmt(v)} |")
    print()

    problem = build_problem(problem_cfg)
    print(f"## Hypervolume at {args.budget:,} evaluations per search\n")
    print("| seed | default HV | tuned HV | tuned - default | default s | tuned s |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for seed in args.seeds:
        d_hv, d_s = search_hv(problem, args.budget, seed, fixed)
        t_hv, t_s = search_hv(problem, args.budget, seed, {**fixed, **params})
        rows.append((d_hv, t_hv))
        print(
            f"| {seed} | {d_hv:.4f} | {t_hv:.4f} | {t_hv - d_hv:+.4f} | {d_s:.0f} | {t_s:.0f} |",
            flush=True,
        )
    d, t = [r[0] for r in rows], [r[1] for r in rows]
    print(
        f"| mean ± sd | {statistics.mean(d):.4f} ± {sd(d):.4f} | "
        f"{statistics.mean(t):.4f} ± {sd(t):.4f} | "
        f"{statistics.mean(t) - statistics.mean(d):+.4f} | | |"
    )
    wins = sum(b > a for a, b in rows)
    print(f"\nTuned parameters give the higher HV on {wins} of {len(rows)} seeds.")


if __name__ == "__main__":
    main()
