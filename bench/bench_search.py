"""Benchmark of the search: (a) hypervolume at an equal evaluation budget, (b) wall time of a
5,000-evaluation search. Prints Markdown for BENCHMARKS.md.

Run: ``.venv/bin/python bench/bench_search.py [--problem P] [--at 1000 5000] [--seeds 0 1 2 3 4]
[--methods ...] [--jobs 2] [--results FILE.jsonl] [--skip-wall] [--wall-budget 5000]``, or (c)
only: ``[--problem P] --surrogate [--at 500 2000] [--jobs 2] [--keep DIR] [--miss-sample 300]``

(a) Methods, all on the same genes (per layer: sparsity step index and bits) and the same
Evaluator, each run once per seed with the largest budget of ``--at`` in its own process with
one torch thread (``--jobs`` at a time); HV at each budget of ``--at`` is that of the feasible
points evaluated within it (low-fidelity evaluations charged as in (c) below):

- ``moecomp``: the search as the problem file sets it (the shipped default: NSGA-II, the DE
  operators, the surrogate: ladder probes at low fidelity, allocation-seeded first population,
  screened offspring);
- ``moecomp-plain``: the same without the surrogate (single-layer probes in full,
  sensitivity-seeded sampling, every offspring evaluated);
- the peers of ``moecomp compare --baseline`` (:mod:`moecomp.baseline.peers`): ``tpe``
  (Optuna's multi-objective TPE, batches of 10), ``optuna-nsga2``, ``random``,
  ``nsga2-default`` (pymoo's NSGA-II with its integer defaults, no surrogate), ``moead``
  (MOEA/D with the DE operators and the surrogate);
- ``de``: the single-objective Directed Evolution at the five target sparsities of
  ``moecomp compare`` (each budget split equally over them; run once per budget);
- ablations, the default with one part changed (``ABLATIONS``): ``abl-undirected``
  (``directed_strength = 0``), ``abl-no-crossover`` (``crossover_prob = 0``),
  ``abl-random-start`` (random first population: ``sampling = "random"``,
  ``allocation_share = 0``), ``abl-no-screening`` (``screen_factor = 1``),
  ``abl-small-steps`` (``mutation_strength = 5``); and one candidate improvement,
  ``directed-tables`` (``directed_by = "tables"``: directed moves ranked by each child's own
  marginal divergence from the surrogate's tables);
- ``tuned``: the settings of ``--params-from`` (a study's best trial), with each seed.

The table: median HV and inter-quartile range per method and budget, the first method's
median per-seed ratio to it, and the two-sided Mann-Whitney U p-value (scipy) against the first
method with 5 seeds or more. ``--results`` keeps each finished run (JSON lines); a run found
there is not run again, so the benchmark can be interrupted and continued.

HV: of the evaluated points' non-dominated front, objectives divided by the problem's
reference point, reference all ones, pymoo's ``HV``: the same number ``run_search`` reports.

(b) ``moecomp search`` as the user runs it (plots, checkpoints, csv every generation), with
torch limited to ``--threads`` threads.

(c) ``--surrogate``: the search with the surrogate (``search.surrogate = true``, the default:
ladder probes at low fidelity, allocation-seeded first population, screened offspring) against
the plain search (``surrogate = false``: the single-layer probes in full, sensitivity-seeded
sampling, every offspring evaluated), both NSGA-II with the DE operators, each run in its own
process with one torch thread (``--jobs`` at a time). Each run gets the largest budget of
``--at``; HV at each budget of ``--at`` is that of the points evaluated within it, from the
run folder: a row of evaluated.csv is charged the full evaluations up to it plus the
low-fidelity ones of its generation and before at their share of the samples, rounded up
(what the run's ``n_evals`` counts; low-fidelity evaluations of a generation come before its
full ones). Medians over seeds, the median per-seed ratio and, with 5 or more seeds, the
two-sided Mann-Whitney U p-value. Wall times are printed but depend on the load.
Then what the issue asks of the first population and of screening: the single-layer probes
(``search.sensitivity.probe_genes``, the intact model left out) evaluated in full outside the
budget, and how many of them a member of the first population dominates or matches (equal
density and bits, lower divergence); a seeded sample of ``--miss-sample`` candidates screened
out, evaluated in full outside the budget: the *missed* ones are those the front of all
evaluated points does not dominate, with the HV they would add.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moecomp.baseline.peers import PEERS
from moecomp.config import ProblemConfig, load_problem
from moecomp.search import build_problem, run_search
from moecomp.search.front import hypervolume, nondominated
from moecomp.search.problem import CompressionProblem
from moecomp.target import build_target

# (d) the default with one part changed: what each part of the search is worth
ABLATIONS: dict[str, dict[str, object]] = {
    "abl-undirected": {"directed_strength": 0.0},      # mutation without directed moves
    "abl-no-crossover": {"crossover_prob": 0.0},        # mutation only
    "abl-random-start": {"sampling": "random", "allocation_share": 0.0},  # no seeded start
    "abl-no-screening": {"screen_factor": 1},           # every offspring evaluated
    "abl-small-steps": {"mutation_strength": 5},        # mutation moves of 5 steps, not 25
    "directed-tables": {"directed_by": "tables"},       # each child's own marginals
}
METHODS = ("moecomp", "moecomp-plain", *PEERS, "de", *ABLATIONS, "tuned")


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.1f} / {b:.1f} / {c:.1f}"


def front_hv(F: np.ndarray, ref_point: np.ndarray) -> float:
    """HV of the non-dominated rows of ``F (n, k)`` (raw units, divided by ``ref_point``)."""
    return hypervolume(F[nondominated(F)], ref_point)


def method_task(problem_path: str, method: str, seed: int, at: list[int], out: str,
                tuned: dict | None = None) -> dict:
    """One run of (a), in its own process with one torch thread: HV of the feasible points
    evaluated within each budget of ``at`` (the run gets the largest)."""
    from moecomp.baseline import DEConfig
    from moecomp.baseline.peers import run_peer
    from moecomp.compare import DEFAULT_TARGETS, de_points
    from moecomp.errors import ConfigError
    from moecomp.search.objectives import objective_space

    torch.set_num_threads(1)
    cfg = load_problem(problem_path)
    target = build_target(cfg, progress=False)
    problem = build_problem(cfg, target=target)
    space = objective_space(cfg)
    budget = max(at)
    t0 = time.perf_counter()
    if method == "de":
        # one DE per budget: the targets split each budget equally (as `moecomp compare`)
        hvs = []
        for b in at:
            try:
                de = de_points(target, cfg, DEFAULT_TARGETS, b // len(DEFAULT_TARGETS),
                               DEConfig(seed=seed))
            except ConfigError:  # a budget too small for the DE's per-layer sweeps
                hvs.append(float("nan"))
                continue
            hvs.append(front_hv(space.matrix(de[de["feasible"]]), space.ref_point))
        wall = time.perf_counter() - t0
        return {"method": method, "seed": seed, "at": at, "hv": hvs, "wall": wall}
    if method in ("moecomp", "moecomp-plain", "tuned") or method in ABLATIONS:
        params = {**(tuned or {}), "seed": seed} if method == "tuned" else {"seed": seed}
        params |= ABLATIONS.get(method, {})
        if method == "moecomp-plain":
            params["surrogate"] = False
        run_search(problem, Path(out), budget=budget, progress=False, plots=False, target=target,
                   params=params)
        ev = pd.read_csv(Path(out) / "evaluated.csv")
        charge = charged(Path(out), problem.n_samples)
    else:
        ev = run_peer(problem, method, budget=budget, seed=seed, folder=out).evaluated
        charge = (charged(Path(out), problem.n_samples) if (Path(out) / "search.json").is_file()
                  else np.arange(1, len(ev) + 1))
    wall = time.perf_counter() - t0
    ok = ev["feasible"].to_numpy(bool) if "feasible" in ev.columns else np.ones(len(ev), bool)
    F = space.matrix(ev)[ok]
    hvs = [hv_at(F, charge[ok], b, space.ref_point) for b in at]
    print(f"  {method} seed {seed}: HV {[round(h, 4) for h in hvs]} at {at}, {wall:.0f} s",
          file=sys.stderr, flush=True)
    return {"method": method, "seed": seed, "at": at, "hv": hvs, "wall": wall}


def bench_hv(problem_path: str, at: list[int], seeds: list[int], methods: list[str], *,
             jobs: int, results: Path | None, tuned: dict | None = None) -> list[str]:
    """(a): every method and seed in its own process (``jobs`` at a time); results appended
    to ``results`` (JSON lines) as they finish, and runs found there are not run again."""
    import json
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    done: list[dict] = []
    if results is not None and results.is_file():
        done = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        done = [d for d in done if d.get("problem") == problem_path and d["at"] == at]
    have = {(d["method"], d["seed"]) for d in done}
    tasks = [(m, s) for m in methods for s in seeds if (m, s) not in have]
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(
            jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(method_task, problem_path, m, s, at, str(Path(tmp) / f"{m}-{s}"),
                               tuned) for m, s in tasks]
        for f in futures:
            d = f.result() | {"problem": problem_path}
            done.append(d)
            if results is not None:
                with results.open("a") as fh:
                    fh.write(json.dumps(d) + "\n")
    return hv_table(done, methods, seeds, at)


def hv_table(done: list[dict], methods: list[str], seeds: list[int], at: list[int]) -> list[str]:
    """Median HV per method at each budget, the default's median per-seed ratio to it and
    the two-sided Mann-Whitney U p-value against the default (with 5 seeds or more)."""
    from scipy.stats import mannwhitneyu

    by = {(d["method"], d["seed"]): d for d in done}
    hv = {m: np.array([by[(m, s)]["hv"] for s in seeds if (m, s) in by], float)
          for m in methods}
    ref = methods[0]
    head = "| method | " + " | ".join(
        f"median HV @ {b:,} (IQR) | {ref} / it | p" for b in at) + " | seeds | wall s / run |"
    lines = [head, "|" + " --- |" * (3 * len(at) + 3)]
    for m in methods:
        if len(hv[m]) == 0:
            continue
        cells = []
        for k in range(len(at)):
            x = hv[m][:, k]
            q1, q3 = np.percentile(x, [25, 75])
            cell = f"{np.median(x):.4f} ({q1:.4f}-{q3:.4f})"
            n = min(len(x), len(hv[ref]))
            if m == ref:
                cells += [f"**{cell}**", "", ""]
                continue
            ratio = float(np.median(hv[ref][:n, k] / np.maximum(x[:n], 1e-12)))
            p = (mannwhitneyu(hv[ref][:, k], x, alternative="two-sided").pvalue
                 if min(len(x), len(hv[ref])) >= 5 else float("nan"))
            cells += [cell, f"{ratio:.3f}", f"{p:.2g}"]
        wall = np.median([by[(m, s)]["wall"] for s in seeds if (m, s) in by])
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {len(hv[m])} | {wall:.0f} |")
    return lines


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


def _dominated_or_matched(A: np.ndarray, f: np.ndarray) -> bool:
    """Some row of ``A (n, k)`` dominates ``f (k,)``, or equals it but for a lower divergence
    (the last column)."""
    le = np.all(A <= f + 1e-12, axis=1)
    return bool(np.any(le & np.any(A < f - 1e-12, axis=1)))


def _dominated(front: np.ndarray, F: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: each row of ``F (n, k)`` is dominated by a row of ``front (m, k)``."""
    le = np.all(front[None, :, :] <= F[:, None, :], axis=2)
    lt = np.any(front[None, :, :] < F[:, None, :], axis=2)
    return np.any(le & lt, axis=1)


def charged(run: Path, n_samples: int) -> np.ndarray:
    """``(n,)`` what the budget had charged when each row of the run's evaluated.csv was done:
    full evaluations so far plus the low-fidelity ones made up to the end of its generation
    (a generation's low-fidelity evaluations come before its full ones) at their share of the
    samples, rounded up, as ``run._Search.n_evals`` counts them."""
    ev = pd.read_csv(run / "evaluated.csv")
    full = np.arange(1, len(ev) + 1)
    sc_path = run / "screened.csv"
    if not sc_path.is_file():
        return full
    sc = pd.read_csv(sc_path)
    low = sc[np.isfinite(sc["low_divergence"])]
    if len(low) == 0:
        return full
    m = int(low["samples"].iloc[0])
    per_gen = low.groupby("gen").size()
    gens = np.arange(int(max(ev["gen"].max(), per_gen.index.max())) + 1)
    cum = np.cumsum(per_gen.reindex(gens, fill_value=0).to_numpy())
    n_low = cum[ev["gen"].to_numpy()]
    return full + -(-(n_low * m) // n_samples)


def hv_at(F: np.ndarray, charge: np.ndarray, budget: int, ref_point: np.ndarray) -> float:
    """HV of the points ``F (n, k)`` evaluated within ``budget`` (``charge (n,)``)."""
    Fb = F[charge <= budget]
    return front_hv(Fb, ref_point) if len(Fb) else 0.0


def surrogate_task(problem_path: str, seed: int, surrogate: bool, at: list[int],
                   out: str, miss_sample: int) -> dict[str, object]:
    """One search of (c), in its own process with one torch thread: HV at each budget in
    ``at``; with the surrogate also the probe check and the sampled screening miss rate."""
    from moecomp.search.sensitivity import probe_genes

    torch.set_num_threads(1)
    cfg = load_problem(problem_path)
    target = build_target(cfg, progress=False)
    problem = build_problem(cfg, target=target)
    assert isinstance(problem, CompressionProblem)
    budget = max(at)
    t0 = time.perf_counter()
    r = run_search(problem, Path(out), budget=budget, progress=False, plots=False,
                   target=target, params={"seed": seed, "surrogate": surrogate})
    wall = time.perf_counter() - t0
    run = Path(out)
    cols = ["density", "bits", "divergence"] if problem.n_obj == 3 else ["size", "divergence"]
    ev = pd.read_csv(run / "evaluated.csv")
    if problem.n_obj == 2:
        ev["size"] = ev["density"] * ev["bits"] / 32.0
    F = ev[cols].to_numpy()
    charge = charged(run, problem.n_samples)
    res: dict[str, object] = {
        "seed": seed, "surrogate": surrogate, "wall": wall, "n_full": len(ev), "hv_end": r.hv,
        "hv": [hv_at(F, charge, b, problem.ref_point) for b in at],
    }
    print(f"  {'surrogate' if surrogate else 'plain'} seed {seed}: HV "
          f"{[round(h, 4) for h in res['hv']]} at {at}, {len(ev)} full, {wall:.0f} s",  # type: ignore
          file=sys.stderr, flush=True)
    if not surrogate:
        return res
    # the first population against the single-layer probes, all measured in full (outside
    # the budget: the run measured the probes at low fidelity only)
    sc = problem.config.search
    Xp = probe_genes(problem.genes, probe_sparsity=sc.probe_sparsity, probe_bits=sc.probe_bits)
    Fp = problem.evaluate_genes(Xp).F[1:]  # row 0: the intact model
    F1 = F[ev["gen"].to_numpy() == 1]
    res["probes"] = len(Fp)
    res["probes_beaten"] = int(sum(_dominated_or_matched(F1, f) for f in Fp))
    # screening misses: a seeded sample of the candidates screened out, evaluated in full;
    # a miss is one the front of everything evaluated does not dominate
    scr = pd.read_csv(run / "screened.csv")
    out_rows = scr[(scr["kind"] == "candidate") & ~scr["full"]]
    res["screened_out"] = len(out_rows)
    if miss_sample and len(out_rows):
        pick = np.sort(np.random.default_rng(seed).choice(
            len(out_rows), size=min(miss_sample, len(out_rows)), replace=False))
        rows = out_rows.iloc[pick]
        names = problem.layer_names
        X = problem.genes.encode(rows[[f"s:{n}" for n in names]].to_numpy(),
                                 rows[[f"b:{n}" for n in names]].to_numpy())
        Fo = problem.evaluate_genes(X).F
        front = F[nondominated(F)]
        missed = Fo[~_dominated(front, Fo)]
        hv = hypervolume(front, problem.ref_point)
        res["miss_sampled"] = len(Fo)
        res["missed"] = len(missed)
        res["miss_hv_gain"] = (hypervolume(np.vstack([front, missed]), problem.ref_point)
                               - hv) / hv if len(missed) else 0.0
    return res


def bench_surrogate(problem_path: str, at: list[int], seeds: list[int], *, jobs: int,
                    keep: Path | None, miss_sample: int) -> list[str]:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from scipy.stats import mannwhitneyu

    tmp = tempfile.TemporaryDirectory()
    root = keep if keep is not None else Path(tmp.name)
    tasks = [(problem_path, s, on, at, str(root / f"{'sur' if on else 'plain'}-{s}"),
              miss_sample) for s in seeds for on in (False, True)]
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        done = list(pool.map(surrogate_task, *zip(*tasks, strict=True)))
    tmp.cleanup()
    by = {(d["seed"], d["surrogate"]): d for d in done}
    hv = {on: np.array([by[(s, on)]["hv"] for s in seeds], float) for on in (False, True)}
    wall = {on: [float(by[(s, on)]["wall"]) for s in seeds] for on in (False, True)}  # type: ignore
    head = ("| run | " + " | ".join(f"HV @ {b:,} evals" for b in at)
            + " | full evaluations | wall s (load-dependent) |")
    lines = [head, "|" + " --- |" * (len(at) + 3)]
    for on, name in ((False, "plain"), (True, "surrogate")):
        for i, s in enumerate(seeds):
            d = by[(s, on)]
            lines.append(f"| {name} seed {s} | " + " | ".join(f"{x:.4f}" for x in hv[on][i])
                         + f" | {d['n_full']} | {wall[on][i]:.0f} |")
    for on, name in ((False, "plain"), (True, "surrogate")):
        lines.append(f"| **{name} median** | " + " | ".join(
            f"**{x:.4f}**" for x in np.median(hv[on], axis=0))
            + f" | | {np.median(wall[on]):.0f} |")
    ratio = np.median(hv[True] / np.maximum(hv[False], 1e-12), axis=0)
    lines.append("| median ratio surrogate / plain (per seed) | "
                 + " | ".join(f"{x:.3f}" for x in ratio) + " | | |")
    if len(seeds) >= 5:
        p = [mannwhitneyu(hv[True][:, k], hv[False][:, k], alternative="two-sided").pvalue
             for k in range(len(at))]
        lines.append("| Mann-Whitney U p (two-sided) | " + " | ".join(f"{x:.3g}" for x in p)
                     + " | | |")
    lines += ["", "| seed | probes beaten by the first population | candidates screened out "
              "| sampled, evaluated in full | missed (not dominated by the front) | HV the "
              "misses add |", "| --- | --- | --- | --- | --- | --- |"]
    for s in seeds:
        d = by[(s, True)]
        lines.append(f"| {s} | {d['probes_beaten']} of {d['probes']} | {d['screened_out']} | "
                     f"{d.get('miss_sampled', 0)} | {d.get('missed', 0)} | "
                     f"{100 * float(d.get('miss_hv_gain', 0.0)):.3f} % |")  # type: ignore
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="problems/fashion-lenet300.toml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--wall-budget", type=int, default=5000, help="(b) evaluations")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the 2-core target)")
    ap.add_argument("--skip-hv", action="store_true")
    ap.add_argument("--skip-wall", action="store_true")
    ap.add_argument("--surrogate", action="store_true",
                    help="(c) only: the surrogate against the plain search")
    ap.add_argument("--at", type=int, nargs="+", default=None,
                    help="budgets at which HV is read (each run gets the largest); default "
                    "(a) 1000 5000, (c) 500 2000")
    ap.add_argument("--jobs", type=int, default=1, help="(a, c) runs in parallel (processes)")
    ap.add_argument("--params-from", default=None,
                    help="(a) method 'tuned': these search settings (a study file or JSON, as "
                    "`moecomp search --params-from`)")
    ap.add_argument("--results", type=Path, default=None,
                    help="(a) JSON lines of finished runs: appended, and not run again")
    ap.add_argument("--keep", type=Path, default=None, help="(c) keep the run folders here")
    ap.add_argument("--miss-sample", type=int, default=300,
                    help="(c) screened-out candidates per run evaluated in full (0: none)")
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
        at = args.at or [500, 2000]
        print(f"## (c) Surrogate against the plain search, HV at {at} evaluations "
              f"(pop {cfg.search.pop_size}, one torch thread per run, {args.jobs} at a time)\n")
        for line in bench_surrogate(args.problem, at, args.seeds, jobs=args.jobs,
                                    keep=args.keep, miss_sample=args.miss_sample):
            print(line)
        print()
        return
    if not args.skip_hv:
        at = args.at or [1000, 5000]
        print(f"## (a) Hypervolume at {', '.join(f'{b:,}' for b in at)} evaluations "
              f"(pop {cfg.search.pop_size}, one torch thread per run, {args.jobs} at a time)\n")
        tuned = None
        if "tuned" in args.methods:
            from moecomp.cli.search import read_params

            if args.params_from is None:
                ap.error("method 'tuned' needs --params-from")
            tuned = read_params(args.params_from)
            print(f"tuned: {tuned} (from {args.params_from})\n")
        for line in bench_hv(args.problem, at, args.seeds, args.methods, jobs=args.jobs,
                             results=args.results, tuned=tuned):
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
