"""Time `apply_plan` on the real LeNet-300-100 teacher (target: under 10 ms median).

Run: .venv/bin/python bench/bench_apply.py [--repeats 300]
Prints a Markdown table with the command, machine and date.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from moecomp.apply import apply_plan
from moecomp.config import load_problem
from moecomp.plan import CompressionPlan
from moecomp.relevance import compute_ranks
from moecomp.target import build_target


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--problem", default="problems/fashion-lenet300.toml")
    args = ap.parse_args()
    problem = load_problem(args.problem)
    target = build_target(problem, progress=False)
    ranks = compute_ranks(target, problem.relevance, progress=False)
    weights = target.weights()
    print(f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f}")
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"- model: {problem.name}, {sum(w.numel() for w in weights.values()):,} weights\n")
    print("| quantizer | sparsity | bits | median ms | p90 ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for quantizer in ("uniform", "kmeans"):
        for s, b in ((0.0, 8), (0.5, 4), (0.9, 2)):
            plan = CompressionPlan.uniform(target.layer_names, sparsity=s, bits=b,
                                           quantizer=quantizer)
            for _ in range(5):
                apply_plan(plan, weights, ranks)
            ts = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                apply_plan(plan, weights, ranks)
                ts.append(time.perf_counter() - t)
            ts.sort()
            print(f"| {quantizer} | {s:.1f} | {b} | {1e3 * statistics.median(ts):.2f} | "
                  f"{1e3 * ts[int(0.9 * len(ts))]:.2f} |")


if __name__ == "__main__":
    main()
