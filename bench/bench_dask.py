"""Dask speed-up: one search evaluated in this process against the same search on a local
Dask cluster of worker processes (``moecomp search --dask-workers N``), with each worker's
memory.

For a problem file, the same search (budget, seed) is run three ways, each timed from the
call of ``run_search`` to its return (the teacher, the relevance ranks and the Dask cluster
are made beforehand and timed apart):

1. in this process, one torch thread (the baseline a worker is compared with);
2. in this process, ``--threads`` torch threads (what a user gets without Dask: torch uses
   the cores inside each forward);
3. on a ``LocalCluster`` of ``--workers`` processes, one thread each; the search loop
   (pymoo, the surrogate) stays in this process, populations go to the workers in at least
   one chunk per worker.

The three runs give the same number of evaluations (printed); their fronts agree to float
rounding (the Dask test in tests/tune checks equality at one thread). Worker memory: each
worker's resident set after the search and its peak (``DaskRunner.worker_memory``).

Run: .venv/bin/python bench/bench_dask.py [--problem P] [--budget 500] [--workers 2]
         [--calibration N]
Prints Markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from moecomp.config import load_problem
from moecomp.search import run_search
from moecomp.search.dask_runner import DaskRunner
from moecomp.target import build_target


def timed_search(cfg, out: Path, budget: int, seed: int, threads: int, runner=None):
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    r = run_search(cfg, out, budget=budget, params={"seed": seed}, progress=False, plots=False,
                   runner=runner, device="cpu")
    return time.perf_counter() - t0, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="problems/fashion-lenet5.toml")
    ap.add_argument("--budget", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of run 2")
    ap.add_argument("--calibration", type=int, default=None,
                    help="calibration samples (the problem file's data.calibration otherwise)")
    args = ap.parse_args()
    cfg = load_problem(args.problem)
    if args.calibration is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, calibration=args.calibration))
    build_target(cfg, progress=False)  # the teacher trained / cached before any clock
    print("# Dask speed-up\n")
    print(f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"{platform.platform()}; load average at start {os.getloadavg()[0]:.2f}")
    print(f"- date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}")
    print(f"- problem: {cfg.name} ({args.problem}), {cfg.data.calibration} calibration "
          f"samples, budget {args.budget:,}, seed {args.seed}, pop {cfg.search.pop_size}\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # a first short search fills the relevance-rank cache, so no timed run computes them
        run_search(cfg, Path(tmp) / "warm", budget=cfg.search.pop_size,
                   params={"seed": args.seed}, progress=False, plots=False, device="cpu")
        wall1, r1 = timed_search(cfg, Path(tmp) / "one", args.budget, args.seed, 1)
        rows.append(("in this process, 1 torch thread", wall1, r1))
        wall2, r2 = timed_search(cfg, Path(tmp) / "threads", args.budget, args.seed,
                                 args.threads)
        rows.append((f"in this process, {args.threads} torch threads", wall2, r2))
        t0 = time.perf_counter()
        with DaskRunner(n_workers=args.workers) as runner:
            start = time.perf_counter() - t0
            wall3, r3 = timed_search(cfg, Path(tmp) / "dask", args.budget, args.seed, 1,
                                     runner=runner)
            memory = runner.worker_memory()
        rows.append((f"Dask LocalCluster, {args.workers} workers x 1 thread", wall3, r3))
    print("| evaluation | wall s | evaluations | final HV | speed-up vs 1 thread |")
    print("|---|---:|---:|---:|---:|")
    for name, wall, r in rows:
        print(f"| {name} | {wall:.1f} | {r.n_evals:,} | {r.hv:.4f} | {wall1 / wall:.2f}x |")
    print(f"\nCluster start-up (not in the wall times): {start:.1f} s.\n")
    print("| worker | resident MiB after the search | peak MiB |")
    print("|---|---:|---:|")
    for addr, m in sorted(memory.items()):
        print(f"| {addr} | {m['rss'] / 2**20:.0f} | {m['peak'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
