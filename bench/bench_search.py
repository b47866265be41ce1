"""Benchmark of the search: (a) hypervolume at an equal evaluation budget, (b) wall time of a
5,000-evaluation search. Prints Markdown for BENCHMARKS.md.

Run: ``.venv/bin/python bench/bench_search.py [--budget 1000] [--seeds 0 1 2]
[--wall-budget 5000] [--skip-hv] [--skip-wall] [--threads 2]``

(a) Methods, all on the same genes (per layer: sparsity step index and bits) and the same
Evaluator, each given exactly ``--budget`` evaluations per seed:

- ``nsga2-de``: moecomp's search, NSGA-II with the DE operators (sensitivity-seeded sampling,
  layer-wise crossover, directed mutation; the probes count toward the budget);
- ``nsga2-default``: NSGA-II with pymoo's integer defaults (random sampling, SBX + PM with
  rounding);
- ``moead-de``: MOEA/D (pymoo's ParallelMOEAD, Das-Dennis directions) with the DE operators;
- ``optuna-nsga2``: Optuna's ``NSGAIISampler`` (population = the problem's pop_size), ask/tell
  one generation at a time;
- ``optuna-tpe``: Optuna's multi-objective ``TPESampler`` (``constant_liar``), ask/tell in
  batches of 10 (one trial at a time would cost ten times the evaluator's per-call overhead
  for the same evaluations);
- ``random``: uniform integer genes.

HV: of all evaluated points (their non-dominated front), objectives divided by the problem's
reference point, reference all ones, pymoo's ``HV``: the same number ``run_search`` reports.

(b) ``moecomp search`` as the user runs it (plots, checkpoints, csv every generation), with
torch limited to ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from moecomp.config import ProblemConfig, load_problem
from moecomp.search import build_problem, run_search
from moecomp.search.front import hypervolume, nondominated
from moecomp.search.problem import SearchProblem
from moecomp.target import build_target

METHODS = ("nsga2-de", "nsga2-default", "moead-de", "optuna-nsga2", "optuna-tpe", "random")
TPE_BATCH = 10


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.1f} / {b:.1f} / {c:.1f}"


def front_hv(F: np.ndarray, problem: SearchProblem) -> float:
    return hypervolume(F[nondominated(F)], problem.ref_point)


def via_run_search(
    problem: SearchProblem, budget: int, seed: int, operators: str, algorithm: str = "nsga2"
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        r = run_search(
            problem,
            Path(tmp) / "run",
            budget=budget,
            progress=False,
            plots=False,
            params={"seed": seed, "operators": operators, "algorithm": algorithm},
        )
    return r.hv


def via_optuna(problem: SearchProblem, budget: int, seed: int, sampler_name: str) -> float:
    import optuna
    from optuna.distributions import BaseDistribution, IntDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pop = problem.config.search.pop_size
    if sampler_name == "nsga2":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.NSGAIISampler(
            population_size=pop, seed=seed
        )
        batch = pop
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        batch = TPE_BATCH
    study = optuna.create_study(directions=["minimize"] * problem.n_obj, sampler=sampler)
    dists: dict[str, BaseDistribution] = {
        f"g{j}": IntDistribution(int(problem.xl[j]), int(problem.xu[j]))
        for j in range(problem.n_var)
    }
    Fs = []
    n = 0
    while n < budget:
        k = min(batch, budget - n)
        trials = [study.ask(dists) for _ in range(k)]
        X = np.array([[t.params[f"g{j}"] for j in range(problem.n_var)] for t in trials])
        rec = problem.evaluate_genes(X)
        for t, f in zip(trials, rec.F, strict=True):
            study.tell(t, [float(v) for v in f])
        Fs.append(rec.F)
        n += k
    return front_hv(np.concatenate(Fs), problem)


def via_random(problem: SearchProblem, budget: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    pop = problem.config.search.pop_size
    Fs, n = [], 0
    while n < budget:
        k = min(pop, budget - n)
        X = rng.integers(problem.xl, problem.xu + 1, size=(k, problem.n_var))
        Fs.append(problem.evaluate_genes(X).F)
        n += k
    return front_hv(np.concatenate(Fs), problem)


def method_fn(name: str) -> Callable[[SearchProblem, int, int], float]:
    return {
        "nsga2-de": lambda p, b, s: via_run_search(p, b, s, "de"),
        "nsga2-default": lambda p, b, s: via_run_search(p, b, s, "default"),
        "moead-de": lambda p, b, s: via_run_search(p, b, s, "de", "moead"),
        "optuna-nsga2": lambda p, b, s: via_optuna(p, b, s, "nsga2"),
        "optuna-tpe": lambda p, b, s: via_optuna(p, b, s, "tpe"),
        "random": via_random,
    }[name]


def bench_hv(cfg: ProblemConfig, budget: int, seeds: list[int], methods: list[str]) -> list[str]:
    target = build_target(cfg, progress=False)
    problem = build_problem(cfg, target=target)
    rows = []
    for m in methods:
        hvs, secs = [], []
        for s in seeds:
            t0 = time.perf_counter()
            hvs.append(method_fn(m)(problem, budget, s))
            secs.append(time.perf_counter() - t0)
            print(f"  {m} seed {s}: HV {hvs[-1]:.4f} in {secs[-1]:.1f} s", file=sys.stderr)
        sd = statistics.stdev(hvs) if len(hvs) > 1 else 0.0
        rows.append(
            f"| {m} | "
            + " | ".join(f"{h:.4f}" for h in hvs)
            + f" | **{statistics.mean(hvs):.4f}** ± {sd:.4f} | {statistics.mean(secs):.0f} |"
        )
    head = (
        "| method | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean ± sd | wall s / run |\n|"
        + " --- |" * (len(seeds) + 3)
    )
    return [head, *rows]


def bench_wall(cfg: ProblemConfig, budget: int) -> list[str]:
    t0, c0 = time.perf_counter(), time.process_time()
    load0 = load()
    with tempfile.TemporaryDirectory() as tmp:
        problem = build_problem(cfg)
        t_build = time.perf_counter() - t0
        r = run_search(problem, Path(tmp) / "run", budget=budget, progress=False)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        plots = sorted(p.name for p in (Path(tmp) / "run" / "plots").iterdir())
    return [
        "| what | value |",
        "| --- | --- |",
        f"| evaluations | {r.n_evals:,} in {r.n_gen} generations (pop {cfg.search.pop_size}) |",
        f"| calibration images | {cfg.data.calibration:,} |",
        f"| build (data, teacher, ranks, Evaluator) | {t_build:.1f} s |",
        f"| search wall time (build included) | **{wall:.0f} s** ({wall / 60:.1f} min) |",
        f"| process CPU time | {cpu:.0f} s |",
        f"| evaluations per wall second | {r.n_evals / (wall - t_build):.1f} |",
        f"| final HV | {r.hv:.4f} (front of {len(r.front)}) |",
        f"| plots written | {', '.join(plots)} |",
        f"| load average (1/5/15 min) before / after | {load0} / {load()} |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="problems/fashion-lenet300.toml")
    ap.add_argument("--budget", type=int, default=1000, help="(a) evaluations per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--wall-budget", type=int, default=5000, help="(b) evaluations")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the 2-core target)")
    ap.add_argument("--skip-hv", action="store_true")
    ap.add_argument("--skip-wall", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_problem(args.problem)

    print("# Search benchmark\n")
    print(f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`")
    print(
        f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch threads {torch.get_num_threads()}, {platform.platform()}; "
        f"load average at start {load()} (shared with other work)"
    )
    print(f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}")
    print(
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"pymoo {version('pymoo')}, optuna {version('optuna')}"
    )
    print(
        f"- problem: {cfg.name} ({args.problem}), {cfg.data.calibration} calibration images, "
        f"objectives {cfg.objectives.mode}, ref point {list(cfg.objectives.ref_point)}\n"
    )
    if not args.skip_hv:
        print(
            f"## (a) Hypervolume at {args.budget:,} evaluations per run "
            f"(pop {cfg.search.pop_size})\n"
        )
        for line in bench_hv(cfg, args.budget, args.seeds, args.methods):
            print(line)
        print()
    if not args.skip_wall:
        print(f"## (b) Wall time of a {args.wall_budget:,}-evaluation search\n")
        wall_cfg = cfg.replace("search", budget=args.wall_budget)
        for line in bench_wall(wall_cfg, args.wall_budget):
            print(line)
        print()


if __name__ == "__main__":
    main()
