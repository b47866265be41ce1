"""The search on a model of real size within a wall-clock budget: does evolution add to what
the probes and the first population already give?

For a problem file (default: the 23.4 M-parameter encoder, ``examples/transformer/
problem-base.toml``; train its teacher first with ``examples/transformer/train.py --size
base``):

1. the relevance ranks computed afresh (the configured scorer), timed;
2. ``run_search`` with ``--minutes`` of wall time (set-up included) and an evaluation budget
   it cannot reach, so time decides where it stops (``search.time_budget``);
3. the single-layer probes (``search.sensitivity.probe_genes``: each layer pruned at
   ``probe_sparsity`` or quantised to ``probe_bits``, the rest intact) evaluated in full,
   outside the search's time: the search measured them at low fidelity only;
4. the sets compared in the run's objective space: the probes, the first population
   (generation 1), and the points found after it (generations >= 2). ``dominated by later``:
   how many points of a set some point of a later generation dominates (pymoo's Dominator:
   nowhere worse, somewhere better), and how many it beats in every objective at once;
   the set's *best member* (its front point of largest exclusive hypervolume contribution)
   and how many later points dominate it; hypervolume of each set and of the final front.

Time per evaluation from ``search.json``: the Evaluator's own clock (forward of the students
vs the rest: quantizers, k-means, memo, sizes, measures; low-fidelity evaluations included)
divided by the evaluations the budget charged.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_scale.py [PROBLEM] --minutes 60 \\
         --out runs/scale-base [--reuse] [--threads 1] [--calibration N] [--budget N] \\
         [--reallocate N]

``--budget N`` stops at N evaluations instead (with ``--minutes`` as a cap): the share of a
search of that size the relevance ranks take.
Prints Markdown for BENCHMARKS.md and writes ``OUT/scale.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moecomp.compare import dominated_by
from moecomp.config import load_problem
from moecomp.relevance import compute_ranks
from moecomp.runs import RunFolder
from moecomp.search import build_problem, run_search
from moecomp.search.front import contributions, hypervolume, nondominated
from moecomp.search.objectives import objective_space
from moecomp.search.problem import CompressionProblem
from moecomp.search.sensitivity import probe_genes
from moecomp.target import build_target


def front_hv(F: np.ndarray, ref: np.ndarray) -> float:
    return hypervolume(F[nondominated(F)], ref) if len(F) else 0.0


def best_member(front: np.ndarray, ref: np.ndarray) -> int:
    """Index of the point of ``front`` whose removal loses the most hypervolume."""
    return int(np.argmax(contributions(front, ref)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("problem", nargs="?", default="examples/transformer/problem-base.toml")
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=Path("runs/scale-base"))
    ap.add_argument("--reuse", action="store_true", help="analyse the run already in --out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget", type=int, default=10_000_000,
                    help="evaluation budget (default: one it cannot reach, so --minutes "
                         "decides where the search stops)")
    ap.add_argument("--calibration", type=int, default=None,
                    help="calibration samples the search measures on (the problem file's "
                         "data.calibration otherwise): fewer make each forward cheaper, so "
                         "the hour holds more generations")
    ap.add_argument("--reallocate", type=int, default=None,
                    help="search.reallocate (targeted plans per generation; the problem "
                         "file's otherwise)")
    ap.add_argument("--local", type=int, default=None,
                    help="search.local (evaluations per generation on moves around front "
                         "points and plans on their measured slopes; the problem file's "
                         "otherwise)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    cfg = load_problem(args.problem)
    if args.calibration is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, calibration=args.calibration))
    if args.reallocate is not None:
        cfg = cfg.replace("search", reallocate=args.reallocate)
    if args.local is not None:
        cfg = cfg.replace("search", local=args.local)
    t0 = time.perf_counter()
    target = build_target(cfg, progress=False)
    t_target = time.perf_counter() - t0
    n_params = sum(p.numel() for p in target.teacher.parameters())

    with tempfile.TemporaryDirectory() as tmp:  # an empty cache: computed afresh
        t0 = time.perf_counter()
        compute_ranks(target, cfg.relevance, progress=False, cache_dir=Path(tmp))
        t_ranks = time.perf_counter() - t0
    problem = build_problem(cfg, target=target)
    assert isinstance(problem, CompressionProblem)

    if not args.reuse:
        r = run_search(problem, args.out, budget=args.budget, progress=False, target=target,
                       time_budget=args.minutes * 60.0)
        print(f"search: {r.status}, {r.n_evals} evaluations, {r.n_gen} generations, "
              f"{r.elapsed_s:.0f} s, HV {r.hv:.4f}", file=sys.stderr, flush=True)
    run = RunFolder(args.out)
    status = run.status()
    ev = run.evaluated()
    space = objective_space(cfg)
    F = space.matrix(ev)
    gen = ev["gen"].to_numpy()
    first, later = F[gen == 1], F[gen >= 2]

    t0 = time.perf_counter()
    sc = cfg.search
    Xp = probe_genes(problem.genes, probe_sparsity=sc.probe_sparsity, probe_bits=sc.probe_bits)
    Fp = problem.evaluate_genes(Xp).F[1:]  # row 0: the intact model
    t_probes = time.perf_counter() - t0

    ref = space.ref_point
    hv = pd.read_csv(run.file("hv.csv"))
    rows = []
    for name, S in (("single-layer probes (in full)", Fp), ("first population (gen 1)", first)):
        front = S[nondominated(S)] if len(S) else S
        beaten = dominated_by(later, front) if len(later) and len(front) else np.zeros(0, bool)
        every = np.array([np.all(later < f, axis=1).any() for f in front], bool)
        b = front[best_member(front, ref)] if len(front) else None
        over_best = (0, 0) if b is None or not len(later) else (
            int((np.all(later <= b, axis=1) & np.any(later < b, axis=1)).sum()),
            int(np.all(later < b, axis=1).sum()))
        rows.append((name, len(S), len(front), int(beaten.sum()), int(every.sum()),
                     over_best, front_hv(S, ref)))
    final_idx = nondominated(F)
    final_front = F[final_idx]
    from_later = int((gen[final_idx] >= 2).sum())
    # evaluated points that were plans of search.reallocate, by kind, from screened.csv
    kinds = {k: np.zeros(len(ev), bool) for k in ("targeted", "near", "local move", "local")}
    if run.file("screened.csv").is_file():
        sc = pd.read_csv(run.file("screened.csv"))
        genes = [c for c in sc.columns if c.startswith(("s:", "b:"))]
        for kind in kinds:
            tg = sc[(sc["kind"] == kind) & sc["full"]][genes].drop_duplicates()
            if len(tg):
                hit = ev[genes].reset_index(drop=True).merge(
                    tg.assign(_t=True), on=genes, how="left")["_t"].fillna(False)
                kinds[kind] = hit.to_numpy(bool)
    targeted = kinds["targeted"] | kinds["near"]
    n_targeted_front = int(targeted[final_idx].sum())
    n_near, n_near_front = int(kinds["near"].sum()), int(kinds["near"][final_idx].sum())
    t = status.get("evaluator_s") or {}
    n_full = int(status.get("n_full", len(ev)))
    fwd = float(t.get("forward", float("nan")))
    total = float(t.get("total", float("nan")))
    record = {
        "problem": args.problem, "parameters": n_params, "status": status.get("status"),
        "n_evals": status.get("n_evals"), "n_full": n_full, "n_low": status.get("n_low"),
        "generations": status.get("gen"), "elapsed_s": status.get("elapsed_s"),
        "hv": status.get("hv"), "relevance_s": t_ranks, "target_s": t_target,
        "probes_s": t_probes, "evaluator_s": t, "sets": rows,
        "targeted_evaluated": int(targeted.sum()), "targeted_on_front": n_targeted_front,
        "near_evaluated": n_near, "near_on_front": n_near_front,
        "local_moves_evaluated": int(kinds["local move"].sum()),
        "local_evaluated": int(kinds["local"].sum()),
        "local_on_front": int(kinds["local"][final_idx].sum()),
    }
    (args.out / "scale.json").write_text(json.dumps(record, indent=2, default=float))

    print("# Search at scale\n")
    print(f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, torch threads "
          f"{torch.get_num_threads()}; load average at start {load0[0]:.1f}")
    print(f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}")
    print(f"- problem: {cfg.name}, {n_params:,} parameters, {len(target.layers)} compressed "
          f"tensors, {len(target.calib)} calibration samples, quantizer "
          f"{cfg.genes.quantizer}, scorer {cfg.relevance.scorer}\n")
    print("| what | value |\n| --- | --- |")
    print(f"| search | {status.get('status')} after {float(status.get('elapsed_s', 0)):.0f} s: "
          f"{status.get('n_evals')} evaluations charged ({n_full} full, "
          f"{status.get('n_low')} low-fidelity), {status.get('gen')} generations |")
    print(f"| relevance ranks ({cfg.relevance.scorer}) | {t_ranks:.1f} s "
          f"({100 * t_ranks / max(float(status.get('elapsed_s', 1)), 1e-9):.2f} % of the "
          "search) |")
    if t:
        # low-fidelity evaluations are in the Evaluator's clock: per charged evaluation
        per = 1000.0 / max(int(status.get("n_evals", n_full)), 1)
        print(f"| Evaluator time per charged evaluation | {total * per:.1f} ms: forward "
              f"{fwd * per:.1f} ms, overhead {(total - fwd) * per:.1f} ms "
              f"({100 * (total - fwd) / max(fwd, 1e-9):.1f} % of the forward) |")
    print(f"| probes evaluated in full (outside the search) | {len(Fp)} in {t_probes:.0f} s |")
    print(f"| final HV | {float(status.get('hv', 0)):.4f} (front of {len(final_front)}); "
          f"after generation 1: {float(hv['hv'].iloc[min(1, len(hv) - 1)]):.4f} |")
    print(f"| final front points found after generation 1 | {from_later} of "
          f"{len(final_front)} |")
    print(f"| targeted plans (search.reallocate = {cfg.search.reallocate}) | "
          f"{int(targeted.sum())} evaluated in full, {n_targeted_front} on the final front "
          f"(near plans: {n_near}, {n_near_front}) |")
    print(f"| local (search.local = {cfg.search.local}) | {record['local_moves_evaluated']} "
          f"moves of anchors, {record['local_evaluated']} plans on their slopes evaluated, "
          f"{record['local_on_front']} on the final front |")
    print()
    print("| set | points | its front | front points dominated by a later point (beaten in "
          "every objective) | later points dominating the set's best member (better in every "
          "objective) | HV of the set |\n| --- | --- | --- | --- | --- | --- |")
    for name, n, nf, n_beaten, n_every, (o_dom, o_every), h in rows:
        print(f"| {name} | {n} | {nf} | {n_beaten} ({n_every}) | {o_dom} ({o_every}) | "
              f"{h:.4f} |")
    print(f"| all evaluated (final front) | {len(F)} | {len(final_front)} | | | "
          f"{front_hv(F, ref):.4f} |")


if __name__ == "__main__":
    main()
