"""Highest compression ratio (real .mcz files) within an accuracy budget, on a problem.

Stages, each measured on real files and the official test split:
  1. post-training: the search's front alone (no retraining), then + iterative bin merging,
  2. post-training + layer-wise reconstruction (least squares + GPTQ rounding on 8,192
     training images; no gradient training), then bin merging,
  3. refine: distillation fine-tuning (masks kept, quantisation in the loop) for at most
     ``--finetune-epochs`` epochs (after reconstruction with ``--refine-reconstruct``), then
     bin merging.
Candidates are taken by estimated ratio (x1.1-wide bins, the lowest validation drops of
each), since reconstruction and fine-tuning reorder the front.
Solutions are chosen on the VALIDATION split (accuracy drop <= --max-drop points vs the
teacher); the test drop is reported, not selected on.

Ratio = 4 bytes x every parameter of the model (weights and biases) / bytes of the .mcz file
(header, plan, codebooks, biases and coded streams: everything needed to rebuild the model).

Run: .venv/bin/python bench/bench_compression.py problems/fashion-lenet300.toml --budget 5000
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from moecomp.export import export_solution
from moecomp.refine import refine
from moecomp.search import run_search
from moecomp.solution import RunContext, student_model
from moecomp.train import accuracy


def val_drop(ctx: RunContext, key: str) -> float:
    model = student_model(ctx.target.teacher, ctx.solution(key).state)
    assert ctx.target.val is not None
    return accuracy(ctx.target.teacher, ctx.target.val) - accuracy(model, ctx.target.val)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problem")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=5,
                    help="solutions within the budget (best estimated ratio first) exported")
    ap.add_argument("--reconstruct-range", default="1,3",
                    help="estimated ratios tried for reconstruction, as multiples of the best "
                         "post-training one")
    ap.add_argument("--refine-range", default="40,100",
                    help="estimated ratios tried for fine-tuning")
    ap.add_argument("--per-bin", default="2,1",
                    help="solutions per ratio bin (x1.1 wide) tried for reconstruction, "
                         "fine-tuning; the lowest validation drops of each bin")
    ap.add_argument("--refine-reconstruct", action="store_true",
                    help="reconstruct before fine-tuning (measured worse on LeNet-300-100)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    name = Path(args.problem).stem
    out = Path(args.out or f"runs/bench-{name}")
    resume = (out / "checkpoint.pkl").exists()
    res = run_search(args.problem, out, budget=args.budget, resume=resume, progress=True)
    ctx = RunContext(out)
    teacher_test = accuracy(ctx.target.teacher, ctx.target.test)
    front = ctx.run.front().sort_values("ratio", ascending=False)
    est = front.set_index("id")["ratio"]
    drops: dict[int, float] = {}

    def drop(i: int) -> float:
        """A front solution's validation drop (one forward on the validation split), once."""
        if i not in drops:
            drops[i] = val_drop(ctx, str(i))
        return drops[i]

    rows = []
    over = []  # tried, but over the validation budget before merging

    def record(stage: str, key: str, parent: str, seconds: float) -> None:
        e = export_solution(ctx, key, out=out / "bench" / f"{key}.mcz")
        rows.append((stage, key, parent, e.file_bytes, e.ratio,
                     accuracy(ctx.target.teacher, ctx.target.val) - e.val_metric,
                     teacher_test - e.test_metric, seconds))

    # 1. post-training: best real ratio among front solutions within the validation budget
    ok = []
    for i in (int(k) for k in est.index):  # best estimated ratio first
        if len(ok) < args.candidates and drop(i) <= args.max_drop:
            ok.append(i)
    best_post = None
    for i in ok:
        e = export_solution(ctx, i, out=out / "bench" / f"{i}.mcz")
        if best_post is None or e.ratio > best_post[1]:
            best_post = (i, e.ratio)
    if best_post is not None:
        record("post-training", str(best_post[0]), "-", 0.0)
        # 2. + bin merging within the remaining validation budget
        t = time.perf_counter()
        r = refine(ctx, best_post[0], merge=True,
                   tolerance=max(0.0, args.max_drop - drop(best_post[0])), progress=False)
        record("post-training + bin merging", r.key, str(best_post[0]),
               time.perf_counter() - t)

    def candidates(lo: float, hi: float, per_bin: int) -> list[int]:
        """The ``per_bin`` lowest validation drops of each x1.1-wide bin of estimated
        ratios in [lo, hi], most compressed bin first."""
        bins: dict[int, list[int]] = {}
        for i in (int(k) for k in est.index):
            if lo <= est[i] <= hi:
                bins.setdefault(int(math.log(est[i] / lo) / math.log(1.1)), []).append(i)
        return [i for b in sorted(bins, reverse=True)
                for i in sorted(bins[b], key=drop)[:per_bin]]

    # 2 and 3: reconstruct / fine-tune aggressive solutions; the best one within the budget
    # is then bin-merged (merging costs one validation pass per tried pair: minutes on
    # LeNet-5, so once per stage)
    base = float(est[best_post[0]]) if best_post is not None else float(est.min())
    r_lo, r_hi = (float(x) for x in args.reconstruct_range.split(","))
    f_lo, f_hi = (float(x) for x in args.refine_range.split(","))
    n_rec, n_ft = (int(x) for x in args.per_bin.split(","))
    ft = f"fine-tuning ({args.finetune_epochs} ep)"
    for stage, recon, epochs, cands in (
            ("reconstruction", True, 0, candidates(r_lo * base, r_hi * base, n_rec)),
            (f"reconstruction + {ft}" if args.refine_reconstruct else ft,
             args.refine_reconstruct, args.finetune_epochs, candidates(f_lo, f_hi, n_ft))):
        within: list[tuple[float, str, int, float]] = []  # ratio, key, parent, val drop
        for i in cands:
            t = time.perf_counter()
            tuned = refine(ctx, i, merge=False, reconstruct=recon, finetune_epochs=epochs,
                           progress=False)
            d = val_drop(ctx, tuned.key)
            if d > args.max_drop:
                over.append((stage, tuned.key, str(i), tuned.file_bytes, tuned.ratio, d,
                             teacher_test - tuned.test_metric, time.perf_counter() - t))
                continue
            record(stage, tuned.key, str(i), time.perf_counter() - t)
            within.append((tuned.ratio, tuned.key, i, d))
        if within:
            _, key, i, d = max(within)
            t = time.perf_counter()
            merged = refine(ctx, key, merge=True, tolerance=args.max_drop - d, progress=False)
            record(f"{stage} + bin merging", merged.key, f"{i} -> {key}",
                   time.perf_counter() - t)

    print(f"# Compression within {args.max_drop} point(s) of accuracy: {name}\n")
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__},"
          f" load average at end {os.getloadavg()[0]:.1f}")
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M')}; total {time.perf_counter() - t0:.0f} s")
    print(f"- search: {res.n_evals} evaluations, HV {res.hv:.4f}, {len(res.front)} on the "
          f"front, {res.elapsed_s:.0f} s")
    print(f"- teacher: test {teacher_test:.2f} %, fp32 "
          f"{4 * sum(v.numel() for v in ctx.target.state_dict().values()):,} bytes\n")
    print("| stage | solution | from | file bytes | ratio vs fp32 | val drop (pt) | "
          "test drop (pt) | refine s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    shown = []
    for stage in dict.fromkeys(r[0] for r in rows):
        of_stage = [r for r in rows if r[0] == stage]
        # every post-training row; of the others the best few within the budget
        shown += of_stage if stage.startswith("post") else sorted(
            of_stage, key=lambda r: -r[4])[:3]
    best_ratio: dict[str, float] = {}
    for r in shown:
        stage = r[0].removesuffix(" + bin merging")
        best_ratio[stage] = max(best_ratio.get(stage, 0.0), r[4])
    for stage in dict.fromkeys(r[0] for r in over):
        higher = [r for r in over if r[0] == stage and r[4] > best_ratio.get(stage, 0.0)]
        shown += [(f"{stage}, over budget", *r[1:])
                  for r in sorted(higher, key=lambda r: r[4])[:2]]
    for stage, key, parent, size, ratio, vd, td, s in shown:
        print(f"| {stage} | {key} | {parent} | {size:,} | {ratio:.1f}x | {vd:.2f} | {td:.2f} |"
              f" {s:.0f} |")
    print(f"\n{len(rows) + len(over)} solutions measured; {len(over)} were over the "
          "validation budget before bin merging.")
    # what the wording asks, chosen on the test split itself (so optimistic)
    for kind in ("post-training", "reconstruction", "fine-tuning"):
        ok_test = [r for r in rows + over if kind in r[0] and r[6] <= args.max_drop]
        if ok_test:
            b = max(ok_test, key=lambda r: r[4])
            print(f"- highest ratio among the measured {kind} files with test drop <= "
                  f"{args.max_drop}: {b[4]:.1f}x ({b[1]}, {b[0]}; val drop {b[5]:.2f}, "
                  f"test drop {b[6]:.2f})")


if __name__ == "__main__":
    main()
