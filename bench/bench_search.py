"""Benchmark of the search: (a) hypervolume at an equal evaluation budget, (b) wall time of a
5,000-evaluation search. Prints Markdown for BENCHMARKS.md.

Run: ``.venv/bin/python bench/bench_search.py [--budget 1000] [--seeds 0 1 2]
[--wall-budget 5000] [--skip-hv] [--skip-wall] [--surrogate] [--threads 2]``

(a) Methods, all on the same genes (per layer: sparsity step index and bits) and the same
Evaluator, each given exactly ``--budget`` evaluations per seed:

- ``nsga2-de``: moecomp's search, NSGA-II with the DE operators and the surrogate (ladder probes
  at low fidelity, allocation-seeded first population, screened offspring; low-fidelity
  evaluations count toward the budget at their share of the samples);
- ``nsga2-de-plain``: the same without the surrogate (sensitivity-seeded sampling, layer-wise
  crossover, directed mutation; the single-layer probes count toward the budget);
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

(c) ``--surrogate``: the search with the surrogate (``search.surrogate = true``, the default:
ladder probes at low fidelity, allocation-seeded first population, screened offspring) against
the plain search (``surrogate = false``: the single-layer probes in full, sensitivity-seeded
sampling, every offspring evaluated), both NSGA-II with the DE operators, one after the other
per seed in one process. Per seed: HV at 1/8, 1/4, 1/2 and all of ``--budget`` (the budget
counts full evaluations plus low-fidelity ones at their share of the samples: hv.csv's
``n_evals``), and HV at equal wall-clock time (1/4, 1/2 and all of the plain run's time, read
from hv.csv's ``elapsed_s``); medians over the seeds and the median of the per-seed ratios.
Then what the issue asks of the first population and the front: the single-layer probes
(``search.sensitivity.probe_genes``, the intact model left out) evaluated in full outside the
budget (the surrogate's run measured them at low fidelity only); how many of them a member of
the first population dominates or matches (equal density and bits, lower divergence); and how
many front points dominate a probe, and a member of the first population (also: better in
every objective), i.e. where the search went beyond its starting points (the issue asks for
three or more).
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
import pandas as pd
import torch

from moecomp.config import ProblemConfig, load_problem
from moecomp.search import build_problem, run_search
from moecomp.search.front import hypervolume, nondominated
from moecomp.search.problem import CompressionProblem, SearchProblem
from moecomp.target import build_target

METHODS = ("nsga2-de", "nsga2-de-plain", "nsga2-default", "moead-de", "optuna-nsga2",
           "optuna-tpe", "random")
TPE_BATCH = 10


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.1f} / {b:.1f} / {c:.1f}"


def front_hv(F: np.ndarray, problem: SearchProblem) -> float:
    return hypervolume(F[nondominated(F)], problem.ref_point)


def via_run_search(
    problem: SearchProblem, budget: int, seed: int, operators: str, algorithm: str = "nsga2",
    surrogate: bool = True,
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        r = run_search(
            problem,
            Path(tmp) / "run",
            budget=budget,
            progress=False,
            plots=False,
            params={"seed": seed, "operators": operators, "algorithm": algorithm,
                    "surrogate": surrogate},
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
        "nsga2-de-plain": lambda p, b, s: via_run_search(p, b, s, "de", surrogate=False),
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


def _hv_at(hv: pd.DataFrame, col: str, x: float) -> float:
    """HV of the last hv.csv row with ``col <= x`` (0 before the first)."""
    rows = hv[hv[col] <= x + 1e-9]
    return float(rows["hv"].iloc[-1]) if len(rows) else 0.0


def _dominated_or_matched(A: np.ndarray, f: np.ndarray) -> bool:
    """Some row of ``A (n, k)`` dominates ``f (k,)``, or equals it but for a lower divergence
    (the last column)."""
    le = np.all(A <= f + 1e-12, axis=1)
    return bool(np.any(le & np.any(A < f - 1e-12, axis=1)))


def _n_dominating(front: np.ndarray, others: np.ndarray, *, strict: bool = False) -> int:
    """Rows of ``front`` that dominate at least one row of ``others`` (``strict``: better in
    every objective)."""
    le = np.all(front[:, None, :] <= others[None, :, :], axis=2)
    lt = np.all if strict else np.any
    better = lt(front[:, None, :] < others[None, :, :], axis=2)
    return int(np.sum(np.any(le & better, axis=1)))


def bench_surrogate(cfg: ProblemConfig, budget: int, seeds: list[int]) -> list[str]:
    from moecomp.search.sensitivity import probe_genes

    target = build_target(cfg, progress=False)
    problem = build_problem(cfg, target=target)
    obj = ["density", "bits", "divergence"] if problem.n_obj == 3 else None
    fracs = (0.125, 0.25, 0.5, 1.0)
    tfracs = (0.25, 0.5, 1.0)
    rows: dict[str, list[list[float]]] = {"surrogate": [], "plain": []}
    checks: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in seeds:
            hv: dict[str, pd.DataFrame] = {}
            runs: dict[str, Path] = {}
            for name, on in (("plain", False), ("surrogate", True)):
                out = Path(tmp) / f"{name}-{s}"
                t0 = time.perf_counter()
                r = run_search(problem, out, budget=budget, progress=False, plots=False,
                               params={"seed": s, "surrogate": on})
                wall = time.perf_counter() - t0
                hv[name], runs[name] = r.hv_history, out
                print(f"  {name} seed {s}: HV {r.hv:.4f}, {len(r.evaluated())} full "
                      f"evaluations, {wall:.0f} s", file=sys.stderr)
            t_plain = float(hv["plain"]["elapsed_s"].iloc[-1])
            for name in ("plain", "surrogate"):
                rows[name].append(
                    [_hv_at(hv[name], "n_evals", f * budget) for f in fracs]
                    + [_hv_at(hv[name], "elapsed_s", f * t_plain) for f in tfracs]
                    + [float(hv[name]["elapsed_s"].iloc[-1])])
            # the first population against the probes, all measured in full
            sc = problem.config.search
            assert isinstance(problem, CompressionProblem)
            Xp = probe_genes(problem.genes, probe_sparsity=sc.probe_sparsity,
                             probe_bits=sc.probe_bits)
            Fp = problem.evaluate_genes(Xp).F
            ev = pd.read_csv(runs["surrogate"] / "evaluated.csv")
            front = pd.read_csv(runs["surrogate"] / "front.csv")
            cols = obj if obj is not None else ["size", "divergence"]
            if obj is None:
                for df in (ev, front):
                    df["size"] = df["density"] * df["bits"] / 32.0
            F1 = ev[ev["gen"] == ev["gen"].min()][cols].to_numpy()
            Ff = front[cols].to_numpy()
            beaten = sum(_dominated_or_matched(F1, f) for f in Fp[1:])
            checks.append(
                f"| {s} | {beaten} of {len(Fp) - 1} | {_n_dominating(Ff, Fp[1:])} | "
                f"{_n_dominating(Ff, F1)} | {_n_dominating(Ff, F1, strict=True)} | "
                f"{len(Ff)} |")
    head = ("| run | " + " | ".join(f"HV @ {f:g} budget" for f in fracs) + " | "
            + " | ".join(f"HV @ {f:g} plain time" for f in tfracs) + " | wall s |")
    lines = [head, "|" + " --- |" * (len(fracs) + len(tfracs) + 2)]
    for name in ("plain", "surrogate"):
        for s, v in zip(seeds, rows[name], strict=True):
            lines.append(f"| {name} seed {s} | " + " | ".join(f"{x:.4f}" for x in v[:-1])
                       + f" | {v[-1]:.0f} |")
    med = {k: np.median(np.asarray(v), axis=0) for k, v in rows.items()}
    for name in ("plain", "surrogate"):
        lines.append(f"| **{name} median** | " + " | ".join(f"{x:.4f}" for x in med[name][:-1])
                   + f" | {med[name][-1]:.0f} |")
    ratio = np.median(np.asarray(rows["surrogate"])[:, :-1]
                      / np.maximum(np.asarray(rows["plain"])[:, :-1], 1e-12), axis=0)
    lines.append("| median ratio surrogate / plain | " + " | ".join(f"{x:.3f}" for x in ratio)
               + " | |")
    lines += ["", "| seed | probes beaten by the first population | front points "
              "dominating a probe | ... a member of the first population | ... strictly (better "
              "in every objective) | front size |",
            "| --- | --- | --- | --- | --- |", *checks]
    return lines


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
    ap.add_argument("--surrogate", action="store_true",
                    help="(c) only: the surrogate against the plain search")
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
    if args.surrogate:
        print(f"## (c) Surrogate against the plain search, budget {args.budget:,} "
              f"(pop {cfg.search.pop_size})\n")
        for line in bench_surrogate(cfg, args.budget, args.seeds):
            print(line)
        print()
        return
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
