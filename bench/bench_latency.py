"""Latency of the dense decoded model vs the teacher, and of the structured export (units and
filters nobody reads removed physically, ``moecomp export --structured``).

For each chosen solution of a run folder: export it with ``--structured`` (real files),
decode the ``.mcz`` into the model (same shapes as the teacher, zeros where pruned), load the
shrunk safetensors into a fresh model resized from the structured JSON, check both give the
solution's outputs, and time one forward pass of each model and of the teacher on a batch of
test inputs: the median of ``--repeats`` runs after ``--warmup`` runs, models interleaved
round by round so that load changes on the machine hit all of them alike, one torch thread.
Reported as milliseconds and as the teacher's median over the model's (speed-up, within one
run).

Run: .venv/bin/python bench/bench_latency.py runs/f300 --range 40,200 --n 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_model  # noqa: E402

from moecomp import inputs as inputs_mod  # noqa: E402
from moecomp.codec import read_mcz  # noqa: E402
from moecomp.export import export_solution  # noqa: E402
from moecomp.fold import apply_folds, close  # noqa: E402
from moecomp.solution import RunContext, student_model  # noqa: E402
from moecomp.structured import resize  # noqa: E402
from moecomp.zoo import build_model  # noqa: E402


def ladder(ctx: RunContext, lo: float, hi: float, n: int) -> list[str]:
    front = ctx.run.front()
    front = front[(front.ratio >= lo) & (front.ratio <= hi)].sort_values("ratio")
    if front.empty:
        raise SystemExit(f"no front solution has an estimated ratio in {lo}-{hi}")
    idx = sorted(set(np.linspace(0, len(front) - 1, n).round().astype(int).tolist()))
    return [str(int(front.iloc[i]["id"])) for i in idx]


def medians(models: dict[str, torch.nn.Module], x: inputs_mod.Inputs, *, warmup: int,
            repeats: int) -> dict[str, float]:
    """Median seconds of one forward of each model on ``x``, interleaved round by round."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for r in range(warmup + repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                inputs_mod.call(m, x)
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--solutions", default=None, help="ids or refined keys, comma-separated")
    ap.add_argument("--range", default="40,200", help="estimated ratios of the ladder, lo,hi")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--batch", default="1,256", help="batch sizes timed")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None,
                    help="folder of the exports (default RUN/bench_latency)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ctx = RunContext(args.run)
    target = ctx.target
    assert target.test is not None
    zoo = ctx.problem.model.zoo
    if zoo is None:
        raise SystemExit("the fresh model is built from the zoo here; a user's model needs "
                         "its own factory (see moecomp.structured.resize)")
    lo, hi = (float(v) for v in args.range.split(","))
    keys = args.solutions.split(",") if args.solutions else ladder(ctx, lo, hi, args.n)
    out = args.out or args.run / "bench_latency"
    batches = [int(b) for b in args.batch.split(",")]
    cmd = f"python bench/bench_latency.py {args.run} " + (
        f"--solutions {args.solutions}" if args.solutions else
        f"--range {args.range} --n {args.n}") + f" --batch {args.batch} --repeats {args.repeats}"
    print(f"# Latency of decoded and structured exports: {args.run}\n")
    print(f"- command: `{cmd}`")
    print(f"- machine: {platform.machine()}, 1 torch thread, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; median of {args.repeats} forwards after "
          f"{args.warmup}, models interleaved\n")
    print("| solution | file ratio | params teacher -> structured | shapes | batch | teacher ms "
          "| decoded ms (speed-up) | structured ms (speed-up) |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for key in keys:
        r = export_solution(ctx, key, out=out / f"{key}.mcz", structured=True)
        decoded = student_model(target.teacher, {
            k: v.to(target.state_dict()[k].dtype) for k, v in read_mcz(r.mcz).state_dict.items()})
        assert r.structured_json is not None and r.structured_safetensors is not None
        rec = json.loads(r.structured_json.read_text())
        shrunk = resize(apply_folds(build_model(zoo), rec["folded"]), rec["shapes"])
        load_model(shrunk, str(r.structured_safetensors))
        shrunk.eval()
        x_all = inputs_mod.head(target.test.inputs, 1024)
        with torch.no_grad():
            assert close(target.run(decoded, x_all), target.run(shrunk, x_all))
        shapes = ", ".join(f"{k.removesuffix('.weight')} {'x'.join(map(str, v))}"
                           for k, v in rec["shapes"].items() if k.endswith("weight")) or "none"
        for b in batches:
            x = inputs_mod.head(target.test.inputs, b)
            t = medians({"teacher": target.teacher, "decoded": decoded, "structured": shrunk},
                        x, warmup=args.warmup, repeats=args.repeats)
            print(f"| {key} | {r.ratio:.1f}x | {rec['params_before']:,} -> "
                  f"{rec['params_after']:,} | {shapes} | {b} | {1e3 * t['teacher']:.3f} | "
                  f"{1e3 * t['decoded']:.3f} ({t['teacher'] / t['decoded']:.2f}x) | "
                  f"{1e3 * t['structured']:.3f} ({t['teacher'] / t['structured']:.2f}x) |",
                  flush=True)


if __name__ == "__main__":
    main()
