"""Relevance scorers compared: Directed Evolution vs magnitude and Taylor.

Each scorer ranks every layer of a problem's teacher (default FashionMNIST LeNet-300-100);
every layer is then pruned at the same share (50/70/90 %) by those ranks, without
quantisation and without retraining, and the student is measured: KL(teacher || student) on
the problem's calibration images (2,048 for fashion-lenet300; the scorers read the first
256 of them, ``relevance.calibration``), KL on the test split, and test accuracy. Also
printed: scorer run time per layer and the redundancy bound of each layer (seed 3).

    .venv/bin/python bench/bench_relevance.py [--problem problems/fashion-lenet300.toml]
        [--sparsities 0.5 0.7 0.9] [--threads N] [--seed 0]

Prints Markdown (command, machine and date on top) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call

from moecomp.config import load_problem
from moecomp.divergence import Divergence
from moecomp.inputs import own_layout
from moecomp.relevance import (
    DirectedEvolution,
    Magnitude,
    Scorer,
    Taylor,
    redundancy_bounds,
    scores_to_ranks,
)
from moecomp.relevance.directed import LayerProbe
from moecomp.target import Target, build_target

BEFORE = "DE (activation prior), before"


@dataclasses.dataclass(frozen=True)
class _Before:
    """Directed Evolution as it ran before channels-last convolutions (2026-12-03): inside
    ``own_layout()``, and a conv layer's candidate outputs from one vmapped call (the
    ``LayerProbe.layer_outputs`` of then, copied here)."""

    de: DirectedEvolution

    def __call__(self, target: Target, layer, *, seed: int) -> torch.Tensor:  # noqa: ANN001
        def vmapped(probe: LayerProbe, w: torch.Tensor) -> torch.Tensor:
            params = {k: v.detach() for k, v in probe.module.named_parameters()}

            def one(wi: torch.Tensor) -> torch.Tensor:
                return functional_call(probe.module, params | {"weight": wi}, (probe.inp,))

            with torch.no_grad():
                return torch.vmap(one)(w)

        now = LayerProbe.layer_outputs
        LayerProbe.layer_outputs = vmapped  # type: ignore[method-assign,assignment]
        try:
            with own_layout():
                return self.de(target, layer, seed=seed)
        finally:
            LayerProbe.layer_outputs = now  # type: ignore[method-assign]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    wait = os.environ.get("OMP_WAIT_POLICY", "default")
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads (OMP_WAIT_POLICY={wait}), "
        f"load average {load} at start, Python {platform.python_version()}"
    )


def pruned_state(
    target: Target, ranks: dict[str, torch.Tensor], share: float
) -> dict[str, torch.Tensor]:
    """The teacher's state dict with every layer's lowest-ranked ``share`` set to zero."""
    sd = target.state_dict()
    for ref in target.layers:
        keep = ranks[ref.name] >= round(share * ref.numel)
        sd[ref.name] = sd[ref.name] * keep
    return sd


@torch.no_grad()
def measure(target: Target, sd: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """(KL on calibration, KL on test, test accuracy %) of the student ``sd``."""
    assert target.test is not None
    kl = Divergence("kl")
    s_calib = functional_call(target.teacher, sd, (target.calib.inputs,))
    kl_calib = float(kl(target.teacher_out, s_calib).mean())
    t_test = target.teacher(target.test.inputs)
    s_test = functional_call(target.teacher, sd, (target.test.inputs,))
    kl_test = float(kl(t_test, s_test).mean())
    acc = 100.0 * float((s_test.argmax(-1) == target.test.labels).float().mean())
    return kl_calib, kl_test, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="problems/fashion-lenet300.toml")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patience", type=int, nargs="*", default=[],
                    help="also DE (activation prior) with these relevance.patience values")
    ap.add_argument("--screen", type=int, nargs="*", default=[],
                    help="also DE (activation prior) with these relevance.screen values "
                         "(sets evolved on that many calibration images, winners measured "
                         "on all relevance.calibration)")
    ap.add_argument("--scorers", default="",
                    help="comma-separated row names to keep (default: all), e.g. "
                         "'magnitude,DE (activation prior)'")
    ap.add_argument("--before", action="store_true",
                    help="also DE (activation prior) as it ran before 2026-12-03 evening: "
                         "convolutions in the model's layout, a conv layer's candidates "
                         "vmapped")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    problem = load_problem(args.problem)
    print("# Relevance scorers: Directed Evolution vs magnitude and Taylor\n")
    print(f"- command: `{' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}`")
    print(f"- machine: {machine()}")
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M')}")
    target = build_target(problem, progress=False)
    assert target.test is not None
    cfg = problem.relevance
    de = DirectedEvolution.from_config(cfg)
    print(
        f"- problem: {problem.name} ({', '.join(f'{r.name} {r.shape}' for r in target.layers)}); "
        f"scorers read the first {cfg.calibration} of {len(target.calib)} calibration "
        f"images; DE: {cfg.generations} generations x {cfg.population} sets of "
        f"{cfg.set_fraction:.0%} of the layer per round, "
        f"{de.evolved_fraction * 100:.0f} % of each layer evolved; "
        f"seed {args.seed}"
    )
    print(
        "- every layer pruned at the same share by the scorer's ranks; no quantisation, "
        "no retraining\n"
    )

    scorers: dict[str, Scorer] = {
        "magnitude": Magnitude(),
        "taylor (task loss)": Taylor(calibration=cfg.calibration),
        "taylor (KL of 50 %-pruned student)": Taylor(loss="prune", calibration=cfg.calibration),
        "DE (magnitude prior)": dataclasses.replace(de, prior="magnitude"),
        "DE (activation prior)": dataclasses.replace(de, prior="activation"),
        # sets evolved on the layer's own output change, each round's best 4 measured on
        # the network (relevance.de_fitness = "output")
        "DE (activation prior) on outputs": dataclasses.replace(de, prior="activation",
                                                             fitness="output"),
        **{f"DE (activation prior, patience {n})":
           dataclasses.replace(de, prior="activation", patience=n) for n in args.patience},
        **{f"DE (activation prior, screen {n})":
           dataclasses.replace(de, prior="activation", screen=n) for n in args.screen},
    }
    if args.before:
        scorers[BEFORE] = _Before(dataclasses.replace(de, prior="activation"))
    if args.scorers:
        extra = [k for k in scorers if "patience" in k or "screen" in k]
        keep = ([k.strip() for k in args.scorers.split(",")] + ([BEFORE] if args.before else [])
                + extra)
        unknown = [k for k in keep if k not in scorers]
        if unknown:
            raise SystemExit(f"--scorers: unknown {unknown}; known: {list(scorers)}")
        scorers = {k: v for k, v in scorers.items() if k in keep}
    ranks: dict[str, dict[str, torch.Tensor]] = {}
    times: dict[str, list[float]] = {}
    cpu_times: dict[str, float] = {}
    for name, scorer in scorers.items():
        ranks[name], times[name] = {}, []
        c0 = time.process_time()
        for ref in target.layers:
            t0 = time.perf_counter()
            ranks[name][ref.name] = scores_to_ranks(scorer(target, ref, seed=args.seed))
            times[name].append(time.perf_counter() - t0)
        cpu_times[name] = time.process_time() - c0
        print(f"<!-- {name}: {sum(times[name]):.1f} s -->", file=sys.stderr, flush=True)

    teacher_acc = measure(target, target.state_dict())[2]
    print(f"Teacher test accuracy: {teacher_acc:.2f} %. Bold: lowest calibration KL.\n")
    print("| sparsity | scorer | KL calib (nats) | KL test (nats) | test acc (%) | drop (pt) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for share in args.sparsities:
        rows = []
        for name in scorers:
            kl_c, kl_t, acc = measure(target, pruned_state(target, ranks[name], share))
            rows.append((name, kl_c, kl_t, acc))
        best = min(r[1] for r in rows)
        for name, kl_c, kl_t, acc in rows:
            mark = "**" if kl_c == best else ""
            print(
                f"| {share:.0%} | {name} | {mark}{kl_c:.4f}{mark} | {kl_t:.4f} | {acc:.2f} | "
                f"{teacher_acc - acc:.2f} |"
            )

    print("\nScorer time (wall seconds per layer; CPU seconds of all threads in total):\n")
    names = target.layer_names
    print(f"| scorer | {' | '.join(names)} | total wall (s) | total CPU (s) |")
    print(f"| --- | {' | '.join('---:' for _ in names)} | ---: | ---: |")
    for name in scorers:
        cells = " | ".join(f"{t:.2f}" for t in times[name])
        print(f"| {name} | {cells} | {sum(times[name]):.1f} | {cpu_times[name]:.1f} |")
    parts = []
    for r in target.layers:
        k, rounds = de.plan(r.numel)
        parts.append(
            f"{r.name}: {k} weights x {rounds} rounds ({k * rounds / r.numel:.0%} evolved)"
        )
    print("\nDE rounds: " + ", ".join(parts) + ".")

    t0 = time.perf_counter()
    bounds = redundancy_bounds(target)
    print(
        f"\nRedundancy bounds (energy 0.99, 32 batches over all {len(target.calib)} "
        f"calibration images, {time.perf_counter() - t0:.1f} s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in bounds.items())
        + "."
    )


if __name__ == "__main__":
    main()
