"""The fine-tuned frontier of a run: refine N front solutions spread over a ratio range.

``bench_compression.py`` picks a few fine-tuning candidates per ratio bin by their
post-training validation drop, a weak predictor of the drop after fine-tuning. This sweep
fine-tunes (``moecomp refine --finetune-epochs E``, no merging) ``--n`` solutions evenly
spread over the front's estimated ratios in ``--range`` and prints, for each, the real file's
ratio and its validation and test drops: the accuracy/ratio curve fine-tuning reaches from
this front. Each refined solution is added to the run (``refined/rN.mcz``).

``--masks-only ID,ID --seeds 0,1``: instead, fine-tune those solutions' masks with 8-bit
quantisation in the loop and evaluate the float survivors (nothing written), to see what the
masks alone cost.

Run: .venv/bin/python bench/bench_finetune_sweep.py runs/bench-fashion-lenet300-size
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from moecomp.finetune import distil
from moecomp.refine import refine
from moecomp.solution import RunContext, student_model
from moecomp.train import accuracy


def masks_only(ctx: RunContext, ids: list[str], seeds: list[int], epochs: int,
               t_val: float, t_test: float) -> None:
    """Drops of the solutions' masks fine-tuned at 8 bits in every layer (near float)."""
    target = ctx.target
    assert target.val is not None and target.test is not None
    print("| solution | plan (sparsity/bits) | seed | val drop (pt) | test drop (pt) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for sid in ids:
        sol = ctx.solution(sid)
        plan = ", ".join(f"{n} {lp.sparsity:.2f}/{lp.bits}" for n, lp in sol.plan.layers.items())
        for seed in seeds:
            model = student_model(target.teacher, sol.state)
            trained = distil(model, target, sol.layers, dict.fromkeys(sol.layers, 8),
                             target.pool or target.calib, epochs=epochs, seed=seed,
                             progress=False).weights
            state = target.round_dense({k: trained.get(k, v) for k, v in sol.state.items()})
            m = student_model(target.teacher, state)
            print(f"| {sid} | {plan} | {seed} | {t_val - accuracy(m, target.val):.2f} | "
                  f"{t_test - accuracy(m, target.test):.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--range", default="45,85", help="estimated ratios, lo,hi")
    ap.add_argument("--n", type=int, default=14, help="solutions fine-tuned")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--masks-only", default=None, help="solution ids, comma-separated")
    ap.add_argument("--seeds", default="0", help="seeds of --masks-only, comma-separated")
    args = ap.parse_args()
    lo, hi = (float(v) for v in args.range.split(","))
    ctx = RunContext(args.run)
    target = ctx.target
    assert target.val is not None and target.test is not None
    t_val, t_test = accuracy(target.teacher, target.val), accuracy(target.teacher, target.test)
    if args.masks_only:
        print(f"# Masks alone, fine-tuned {args.epochs} epochs at 8 bits: {args.run}\n")
        print(f"- command: `python bench/bench_finetune_sweep.py {args.run} --masks-only "
              f"{args.masks_only} --seeds {args.seeds} --epochs {args.epochs}`\n")
        masks_only(ctx, args.masks_only.split(","), [int(v) for v in args.seeds.split(",")],
                   args.epochs, t_val, t_test)
        return
    front = ctx.run.front()
    front = front[(front.ratio >= lo) & (front.ratio <= hi)].sort_values("ratio")
    if front.empty:
        raise SystemExit(f"no front solution of {args.run} has an estimated ratio in {lo}-{hi}")
    picks = sorted(set(np.linspace(0, len(front) - 1, min(args.n, len(front))).round()
                       .astype(int).tolist()))
    t0 = time.perf_counter()
    print(f"# Fine-tuned frontier of {args.run} ({args.epochs} epochs, masks kept)\n")
    print(f"- command: `python bench/bench_finetune_sweep.py {args.run} --range {args.range} "
          f"--n {args.n} --epochs {args.epochs}`")
    print(f"- machine: {platform.machine()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"- teacher: validation {t_val:.2f} %, test {t_test:.2f} %\n")
    print("| solution | refined | est. ratio | file ratio | val drop (pt) | test drop (pt) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    rows = []
    for i in picks:
        sid = int(front.iloc[i]["id"])
        r = refine(ctx, sid, merge=False, finetune_epochs=args.epochs, progress=False)
        rows.append((r.ratio, t_val - r.val_metric, t_test - r.test_metric))
        print(f"| {sid} | {r.key} | {front.iloc[i]['ratio']:.1f}x | {r.ratio:.1f}x | "
              f"{rows[-1][1]:.2f} | {rows[-1][2]:.2f} |", flush=True)
    for name, col in (("validation", 1), ("test", 2)):
        ok = [r[0] for r in rows if r[col] <= 1.0]
        best = f"{max(ok):.1f}x" if ok else "none"
        print(f"\n- highest file ratio with {name} drop <= 1.0: {best}", end="")
    print(f"\n- {len(rows)} solutions in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
