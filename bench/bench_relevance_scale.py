"""Relevance ranks on a model of real size: their time, and what they are worth.

For a problem file (default: the 23.4 M-parameter encoder, ``examples/transformer/
problem-base.toml``; train its teacher first), each scorer ranks every compressed tensor
(computed afresh, with the configured progress bar), timed; then every tensor is pruned at the
same share by those ranks (no quantisation), and the student's divergence from the teacher
(the problem's measure) is taken on the validation and test splits, and on the calibration
samples the scorers read. Compare the time with a search's (``bench/bench_scale.py``:
10 % of a one-hour search is 360 s).

Scorers: ``magnitude``; ``DE (output)``: Directed Evolution whose candidate sets evolve on the
layer's own output change and whose rounds pick their set by the network divergence
(``relevance.de_fitness = "output"``), with the settings given here; ``DE (network)`` only
with ``--network`` (every candidate a forward of the model: hours on the encoder).
``--time-layers NAME ...`` only times DE (network) on those tensors, one at a time, and
prints the seconds of each (what the whole model would cost, without waiting hours).

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_relevance_scale.py [PROBLEM]
         [--calibration 8] [--screen 2] [--generations 8] [--population 16]
         [--set-fraction 0.1] [--sparsities 0.5 0.7 0.9] [--threads 1] [--network]
         [--time-layers NAME ...]
Prints Markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from moecomp import inputs as inputs_mod
from moecomp.config import load_problem
from moecomp.data import Split
from moecomp.relevance import DirectedEvolution, compute_ranks
from moecomp.target import Target, build_target


@torch.no_grad()
def divergence(target: Target, sd: dict[str, torch.Tensor], split: Split, n: int) -> float:
    """Mean divergence of the student ``sd`` from the teacher on the first ``n`` samples."""
    x = inputs_mod.head(split.inputs, n)
    student = copy.deepcopy(target.teacher)
    student.load_state_dict(sd)
    return float(target.divergence(target.run(target.teacher, x), target.run(student, x)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("problem", nargs="?", default="examples/transformer/problem-base.toml")
    ap.add_argument("--calibration", type=int, default=8,
                    help="relevance.calibration: samples the network divergence is taken on")
    ap.add_argument("--screen", type=int, default=2,
                    help="relevance.screen: samples the layer output change is taken on")
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--set-fraction", type=float, default=0.1)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--samples", type=int, default=256,
                    help="validation and test samples the pruned students are measured on")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--network", action="store_true", help="also DE (network)")
    ap.add_argument("--time-layers", nargs="+", default=[],
                    help="only time DE (network) on these tensors and stop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    cfg = load_problem(args.problem)
    target = build_target(cfg, progress=False)
    n_params = sum(p.numel() for p in target.teacher.parameters())
    de = dataclasses.replace(
        cfg.relevance, scorer="directed", calibration=args.calibration, screen=args.screen,
        generations=args.generations, population=args.population,
        set_fraction=args.set_fraction)
    scorers = {"magnitude": dataclasses.replace(cfg.relevance, scorer="magnitude"),
               "DE (output)": dataclasses.replace(de, de_fitness="output")}
    if args.network:
        scorers["DE (network)"] = dataclasses.replace(de, de_fitness="network")

    if args.time_layers:
        scorer = DirectedEvolution.from_config(dataclasses.replace(de, de_fitness="network"))
        refs = {ref.name: ref for ref in target.layers}
        print(f"# DE (network) per tensor: `{shlex.join([sys.executable, *sys.argv])}`, "
              f"{time.strftime('%Y-%m-%dT%H:%M%z')}, load {load0:.1f} at start\n")
        print("| tensor | shape | (set size, rounds) | seconds |\n| --- | --- | --- | ---: |")
        for name in args.time_layers:
            ref = refs[name]
            t0 = time.perf_counter()
            scorer(target, ref, seed=cfg.relevance.seed)
            print(f"| {name} | {ref.shape} | {scorer.plan(ref.numel)} | "
                  f"{time.perf_counter() - t0:.1f} |", flush=True)
        return

    ranks, secs = {}, {}
    for name, rc in scorers.items():
        with tempfile.TemporaryDirectory() as tmp:  # an empty cache: computed afresh
            t0 = time.perf_counter()
            ranks[name] = compute_ranks(target, rc, cache_dir=Path(tmp), progress=True)
            secs[name] = time.perf_counter() - t0
        print(f"<!-- {name}: {secs[name]:.1f} s -->", file=sys.stderr, flush=True)

    print("# Relevance ranks at scale\n")
    print(f"- command: `{' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}`")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, torch threads "
          f"{args.threads}; load average at start {load0:.1f}")
    print(f"- date: {time.strftime('%Y-%m-%dT%H:%M%z')}")
    print(f"- problem: {cfg.name}, {n_params:,} parameters, {len(target.layers)} compressed "
          f"tensors; DE: {args.generations} generations x {args.population} sets of "
          f"{args.set_fraction:.0%} of the tensor per round, output change on {args.screen} "
          f"samples, network divergence ({cfg.objectives.divergence}) on {args.calibration}")
    print("- every tensor pruned at the same share by the scorer's ranks; no quantisation; "
          f"divergence on the first {args.samples} validation and test samples\n")
    print("| scorer | time (s) | share of a one-hour search |")
    print("| --- | ---: | ---: |")
    for name, s in secs.items():
        print(f"| {name} | {s:.1f} | {100 * s / 3600:.1f} % |")
    print()
    print("| sparsity | scorer | divergence, calibration samples read | validation | test |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for share in args.sparsities:
        for name, r in ranks.items():
            sd = target.state_dict()
            for ref in target.layers:
                sd[ref.name] = sd[ref.name] * (r[ref.name] >= round(share * ref.numel))
            cells = [divergence(target, sd, target.calib, args.calibration)]
            for split in (target.val, target.test):
                cells.append(float("nan") if split is None else
                             divergence(target, sd, split, args.samples))
            print(f"| {share:.0%} | {name} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
