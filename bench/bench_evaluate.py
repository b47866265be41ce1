"""Benchmark of the Evaluate stage: evaluator throughput against the naive loop, with an
ablation row per idea (layer memo, prefix cache, batching), and each evaluation's time split
into the students' forward and the overhead. Prints Markdown for BENCHMARKS.md.

Run: ``.venv/bin/python bench/bench_evaluate.py [--problem P] [--pop 64] [--repeats 5]``

``--problem`` is a problem file, or ``transformer:small`` / ``transformer:base`` for the
BERT-style encoder example (5.3 M / 23.4 M parameters; its ``encoder.py`` and ``data.py`` are
imported from ``--examples``, default ``examples/transformer``) with untrained weights
(seeded), which time like trained ones; ``--calibration`` sets its number of calibration
sequences (256 by default) and ``--quantizer`` the evaluator's quantizer.
``--split`` adds a table per population: each method's evaluation time split into the
students' forward (the stage forwards) and the overhead (everything else: dense student
weights, quantizers, k-means, the coded-size estimate incl. the ``ans_mask`` model, memo and
cache bookkeeping, copies, divergence and metric), from ``Evaluator.timings()``; the ratio is
taken per repeat and its median reported. ``--methods`` keeps only the named rows (e.g.
``naive,all`` on the large model).

The naive loop is what one would write without this stage: per plan, copy the teacher,
``apply_plan`` + ``student_state_dict`` + ``load_state_dict``, forward the calibration
inputs, divergence and metric. Both run on the same plans in the same process, one after
the other in every repeat, so machine load hits both alike; each repeat draws new plans and
builds fresh evaluators (cold caches; building is not timed: a search builds one). Populations:

- ``random``: every gene uniform (sparsity in 1 % steps on [0, 0.99], bits 1..8);
- ``converged``: mutants of 4 parents, each child changing one gene of one layer by one
  step, as in a population that has settled;
- ``converged, warm``: a second such generation from the same parents on the evaluator of
  the first (its caches warm), as in the generations of a search.

Also: the estimated coded size against real ``.mcz`` files for a few plans.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import functools
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from moecomp.apply import apply_plan, student_state_dict
from moecomp.config import load_problem
from moecomp.evaluate import EvalOptions, Evaluator
from moecomp.inputs import own_layout
from moecomp.relevance.base import scores_to_ranks
from moecomp.runs import plans_from_genes
from moecomp.target import Target, build_target, load_state

VARIANTS: dict[str, EvalOptions] = {
    "evaluator (all ideas)": EvalOptions(device="cpu"),
    "  no layer memo": EvalOptions(memo=False, device="cpu"),
    "  no prefix cache": EvalOptions(prefix_cache=False, device="cpu"),
    "  no batching (vmap)": EvalOptions(batched=False, device="cpu"),
    "  vmap at every stage": EvalOptions(batched=True, device="cpu"),
    "  none of the three": EvalOptions(memo=False, prefix_cache=False, batched=False,
                                       device="cpu"),
    "  convolutions in the model's layout": EvalOptions(device="cpu"),
}
OWN_LAYOUT = {"  convolutions in the model's layout", "naive loop, model's layout"}
"""Rows run inside ``moecomp.inputs.own_layout()``: no channels-last copies of convolution
weights (the way before 2026-12-03 evening; both naive and evaluator got them then)."""
SHORT = {"naive": "naive loop", "all": "evaluator (all ideas)", "memo": "  no layer memo",
         "prefix": "  no prefix cache", "vmap": "  no batching (vmap)",
         "vmapall": "  vmap at every stage",
         "none": "  none of the three", "own": "  convolutions in the model's layout",
         "naive-own": "naive loop, model's layout"}
"""``--methods`` names of the rows."""


def random_genes(rng: np.random.Generator, n: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 100, (n, L)) / 100.0, rng.integers(1, 9, (n, L))


def mutants(
    rng: np.random.Generator, parents: tuple[np.ndarray, np.ndarray], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` children: a random parent with one gene of one random layer moved one step."""
    ps, pb = parents
    pick = rng.integers(0, ps.shape[0], n)
    s, b = ps[pick].copy(), pb[pick].copy()
    for i in range(n):
        j = rng.integers(0, s.shape[1])
        if rng.random() < 0.5:
            s[i, j] = float(np.clip(s[i, j] + rng.choice([-0.01, 0.01]), 0.0, 0.99))
        else:
            b[i, j] = int(np.clip(b[i, j] + rng.choice([-1, 1]), 1, 8))
    return np.round(s, 2), b


def naive(
    target: Target, ranks: dict[str, torch.Tensor], s: np.ndarray, b: np.ndarray,
    quantizer: str = "uniform",
) -> np.ndarray:
    """Divergence per plan, one plan at a time (the metric computed too, as the evaluator
    does)."""
    weights, state = target.weights(), target.state_dict()
    out = []
    for plan in plans_from_genes(target.layer_names, s, b, quantizer=quantizer):
        student = copy.deepcopy(target.teacher)
        load_state(student, student_state_dict(state, apply_plan(plan, weights, ranks)))
        y = target.run(student, target.calib.inputs)
        out.append(float(target.divergence(target.teacher_out, y).double().mean()))
        if target.metric is not None:
            target.metric(target.teacher_out, y, target.calib.labels)
    return np.array(out)


def divergences(ev: Evaluator, s: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ev.evaluate(s, b).divergence


def make_ranks(target: Target, kind: str, seed: int) -> dict[str, torch.Tensor]:
    """Magnitude ranks, or (``rows``) magnitude times a log-normal factor per row."""
    if kind == "magnitude":
        return {n: scores_to_ranks(w.abs()) for n, w in target.weights().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, w in target.weights().items():
        factor = torch.exp(0.5 * torch.randn(w.shape[0], generator=g))
        out[n] = scores_to_ranks(w.abs() * factor.view(-1, *([1] * (w.dim() - 1))))
    return out


def transformer_target(size: str, examples: Path, calibration: int, seed: int,
                       weights: str | None = None) -> Target:
    """The encoder example (``encoder.py``, ``data.py`` of ``examples``) with seeded untrained
    weights, as its problem files define it: cosine divergence, Linear and Embedding layers,
    biases and norms in float16, batches of 256 sequences."""
    from moecomp.config import LayersConfig
    from moecomp.target import make_target

    sys.path.insert(0, str(examples))
    try:
        import data  # type: ignore[import-not-found]
        import encoder  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(examples))
    torch.manual_seed(seed)
    model = encoder.FACTORIES[size]().eval()
    if weights is not None:
        from moecomp.target import load_state, load_weights

        load_state(model, load_weights(weights))
    return make_target(model, data.splits(), divergence="cosine", metric=None,
                       layers=LayersConfig(types=("Linear", "Embedding"),
                                           dense_dtype="float16"),
                       calibration=calibration, batch_size=256, seed=seed)


def timed(fn: Callable[[], np.ndarray]) -> tuple[tuple[float, float, int], np.ndarray]:
    """``((wall s, CPU s, minor page faults), result)`` of ``fn()``."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c0, t0 = time.process_time(), time.perf_counter()
    res = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return (wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0), res


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def load() -> str:
    try:
        a, b, c = os.getloadavg()
        return f"load average {a:.1f} {b:.1f} {c:.1f}"
    except OSError:
        return "load average n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="problems/fashion-lenet300.toml")
    ap.add_argument("--pop", type=int, default=64, help="plans per population")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=64, help="Evaluator chunk_size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantizer", default="uniform", choices=("uniform", "kmeans"))
    ap.add_argument("--methods", default=",".join(SHORT),
                    help=f"rows to run, comma-separated from {', '.join(SHORT)}")
    ap.add_argument("--populations", default="random,converged,converged, warm",
                    help="comma-separated: random, converged, 'converged, warm' (as one "
                    "name: warm)")
    ap.add_argument("--split", action="store_true",
                    help="also split each evaluation into forward and overhead")
    ap.add_argument("--examples", default=None, help="folder of the encoder example")
    ap.add_argument("--calibration", type=int, default=256,
                    help="calibration sequences of transformer:* problems")
    ap.add_argument("--ranks", default="magnitude", choices=("magnitude", "rows"),
                    help="rows: |w| times a seeded log-normal factor per row (sigma 0.5), so "
                    "that untrained weights prune like trained units (rows keep different "
                    "shares) and the size estimate runs its ans_mask model")
    ap.add_argument("--weights", default=None,
                    help="safetensors of trained weights for a transformer:* problem")
    ap.add_argument("--no-size-check", action="store_true")
    args = ap.parse_args()

    if args.problem.startswith("transformer:"):
        size = args.problem.split(":", 1)[1]
        here = Path(__file__).resolve().parents[1] / "examples" / "transformer"
        examples = Path(args.examples) if args.examples else here
        target = transformer_target(size, examples, args.calibration, args.seed,
                                    args.weights)
        title = (f"encoder example ({size}, trained: {args.weights})" if args.weights else
                 f"encoder example ({size}, untrained, seed {args.seed})")
    else:
        problem = load_problem(args.problem)
        target = build_target(problem, progress=False)
        title = problem.name
    methods = [SHORT[m.strip()] for m in args.methods.split(",")]
    scenarios = [p.strip() for p in args.populations.replace("converged, warm", "warm")
                 .split(",")]
    scenarios = ["converged, warm" if p == "warm" else p for p in scenarios]
    ranks = make_ranks(target, args.ranks, args.seed)
    L, n = len(target.layers), args.pop
    n_params = sum(r.numel for r in target.layers)
    load_before = load()
    # scenario -> method -> list of {forward, overhead, total} seconds per evaluate call
    split: dict[str, dict[str, list[dict[str, float]]]] = {}

    # scenario -> method -> list of ((wall s, CPU s, faults), max |divergence - naive|)
    times: dict[str, dict[str, list[tuple[tuple[float, float, int], float]]]] = {}
    paths: dict[str, str] = {}
    for rep in range(args.repeats):
        rng = np.random.default_rng([args.seed, rep])
        parents = random_genes(rng, 4, L)
        pops = {
            "random": random_genes(rng, n, L),
            "converged": mutants(rng, parents, n),
            "converged, warm": mutants(rng, parents, n),
        }
        warm_first = mutants(rng, parents, n)  # the generation that warms the caches
        for scen, (s, b) in pops.items():
            if scen not in scenarios:
                continue
            row = times.setdefault(scen, {})
            ref = None
            if "naive loop" in methods:
                cost, ref = timed(functools.partial(naive, target, ranks, s, b,
                                                    args.quantizer))
                row.setdefault("naive loop", []).append((cost, 0.0))
            if "naive loop, model's layout" in methods:
                with own_layout():
                    cost, div = timed(functools.partial(naive, target, ranks, s, b,
                                                        args.quantizer))
                err = float(np.abs(div - ref).max()) if ref is not None else float("nan")
                row.setdefault("naive loop, model's layout", []).append((cost, err))
            for name, opts in VARIANTS.items():
                if name not in methods:
                    continue
                ev = Evaluator(target, ranks, quantizer=args.quantizer,
                               chunk_size=args.chunk, options=opts)
                paths[name] = ev.path
                with own_layout() if name in OWN_LAYOUT else contextlib.nullcontext():
                    if scen == "converged, warm":
                        ev.evaluate(*warm_first)
                    ev.reset_timings()
                    cost, div = timed(functools.partial(divergences, ev, s, b))
                err = float(np.abs(div - ref).max()) if ref is not None else float("nan")
                row.setdefault(name, []).append((cost, err))
                t = ev.timings()
                split.setdefault(scen, {}).setdefault(name, []).append(
                    {"forward": t["forward"], "overhead": t["total"] - t["forward"],
                     "total": t["total"], **{k: t[k] for k in ("weights", "sizes", "measure",
                                                               "other")}})
        print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    cmd = " ".join([".venv/bin/python", *sys.argv])
    lines = [
        f"### Evaluate throughput: {title}, {len(target.calib)} calibration inputs, "
        f"{n_params / 1e6:.1f} M compressible weights, {args.quantizer} quantizer, "
        f"{args.ranks} ranks",
        "",
        f"- command: `{cmd}`",
        f"- machine: {machine()}; {load_before} at start, {load()} at end",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- {n} plans per population, {args.repeats} repeats (new plans and fresh evaluators "
        "each), medians; speed-up = naive median wall time / method median wall time; "
        "CPU s = process time (all threads); page faults = minor faults (fresh memory)",
        "",
        "| population | method | path | median s / pop | solutions/s | speed-up vs naive "
        "| 5,000 evals (projected) | CPU s / pop | page faults / solution "
        "| max abs diff of divergence vs naive |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scen, row in times.items():
        t_naive = (statistics.median(c[0] for c, _ in row["naive loop"])
                   if "naive loop" in row else float("nan"))
        for name, vals in row.items():
            t = statistics.median(v[0] for v, _ in vals)
            cpu = statistics.median(v[1] for v, _ in vals)
            faults = statistics.median(v[2] for v, _ in vals) / n
            err = max(e for _, e in vals)
            path = paths.get(name, "copy + load + forward")
            lines.append(
                f"| {scen} | {name.strip()} | {path} | {t:.3f} | {n / t:.3g} "
                f"| {t_naive / t:.2f}x | {5000 / (n / t) / 60:.2f} min | {cpu:.3f} "
                f"| {faults:.0f} | {err:.1e} |"
            )
    if args.split:
        lines += ["", *split_table(split)]
    if not args.no_size_check:
        lines += ["", *size_check(target, ranks, L, args.seed)]
    print("\n".join(lines))


def split_table(split: dict[str, dict[str, list[dict[str, float]]]]) -> list[str]:
    """Per population and method: median seconds of one ``evaluate`` call, its forward and
    its overhead, the overhead's parts, and the median of the per-repeat overhead/forward."""
    lines = [
        "Time of one `evaluate` call split into the students' forward and the overhead "
        "(medians over repeats; overhead = weights + sizes + measure + other; "
        "ratio = median of per-repeat overhead / forward):",
        "",
        "| population | method | total s | forward s | overhead s | overhead / forward "
        "| weights s | sizes s | divergence+metric s | other s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scen, rows in split.items():
        for name, vals in rows.items():
            med = {k: statistics.median(v[k] for v in vals) for k in vals[0]}
            ratio = statistics.median(v["overhead"] / max(v["forward"], 1e-12) for v in vals)
            lines.append(
                f"| {scen} | {name.strip()} | {med['total']:.3f} | {med['forward']:.3f} "
                f"| {med['overhead']:.3f} | {100 * ratio:.1f} % | {med['weights']:.3f} "
                f"| {med['sizes']:.3f} | {med['measure']:.3f} | {med['other']:.3f} |")
    return lines


def size_check(target: Target, ranks: dict[str, torch.Tensor], L: int, seed: int) -> list[str]:
    """Estimated size_bytes against the length of real .mcz files for a few random plans."""
    try:
        from moecomp.codec import encode_model
    except ImportError:
        return ["(moecomp.codec not available: size estimate not checked)"]
    rng = np.random.default_rng([seed, 99])
    s, b = random_genes(rng, 8, L)
    m = Evaluator(target, ranks).evaluate(s, b)
    weights, state = target.weights(), target.state_dict()
    rel = []
    for i, plan in enumerate(plans_from_genes(target.layer_names, s, b)):
        layers = apply_plan(plan, weights, ranks)
        dense = {k: v for k, v in state.items() if k not in layers}
        blob = encode_model(layers, dense, plan=plan.to_dict(), order=list(state))
        rel.append(m.size_bytes[i] / len(blob) - 1)
    return [
        f"Estimated size_bytes vs real .mcz length on 8 random plans: error "
        f"{100 * min(rel):+.1f} % to {100 * max(rel):+.1f} % "
        f"(median {100 * statistics.median(rel):+.1f} %)."
    ]


if __name__ == "__main__":
    main()
