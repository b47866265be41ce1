"""Fine-tuning optimizers side by side: the same solutions and seeds fine-tuned with each, on
real .mcz files, paired.

For every solution of ``--solutions`` (search ids of a finished run), every seed of
``--seeds`` and every ``name:lr`` of ``--optimizers`` (``moecomp.finetune.OPTIMIZERS``), the
solution is fine-tuned ``--epochs`` epochs (one that diverges is a row saying at which
step) with its plan's masks (``--repair``: mask repair
first, as ``compress --repair-masks``), written, decoded, checked to reproduce the model and
measured on validation and test (``bench_finetune``'s job). Prints one row per
solution and seed, then per optimizer the mean validation and test drops and the mean file
ratio, and how many pairs the second optimizer wins on validation (the split a choice may
use) and on test. Rows go to ``--out`` (CSV).

Run: .venv/bin/python bench/bench_optimizer.py runs/f300ft-final --solutions 1438,1321,185,1515
     --seeds 0,1,2 --optimizers adam:0.005,sgd:0.05 --repair --workers 2
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker (a 2-core machine)

import pandas as pd  # noqa: E402
from bench_finetune import _job  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--solutions", required=True, help="search ids, comma-separated")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--optimizers", default="adam:0.005,sgd:0.05", help="name:lr,name:lr")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repair", action="store_true", help="mask repair before fine-tuning")
    ap.add_argument("--workers", type=int, default=1, help="processes (one thread each)")
    ap.add_argument("--out", type=Path, default=None, help="CSV (default RUN/bench_optimizer.csv)")
    args = ap.parse_args()
    sids = [int(s) for s in args.solutions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    opts = [(o.split(":")[0], float(o.split(":")[1])) for o in args.optimizers.split(",")]
    files = args.run / "bench_optimizer"
    files.mkdir(exist_ok=True)
    out = args.out or args.run / "bench_optimizer.csv"
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {args.workers} worker(s); {args.epochs} epochs, "
          f"repair {args.repair}")
    jobs = [(str(args.run), sid, "fixed", args.epochs,
             str(files / f"{sid}-s{seed}-{name}-{lr:g}.mcz"), seed, lr, "activation", name,
             args.repair)
            for sid in sids for seed in seeds for name, lr in opts]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        rows = list(pool.map(_job, *zip(*jobs, strict=True)))
    df = pd.DataFrame(rows)
    df.to_csv(out, index=False)
    print(f"# {len(rows)} files in {time.perf_counter() - t0:.0f} s -> {out}")
    labels = [f"{n} {lr:g}" for n, lr in opts]
    df["label"] = df.optimizer + " " + df.lr.map(lambda v: f"{v:g}")
    print("| solution | seed | " + " | ".join(f"{lab}: ratio, val / test drop" for lab in labels)
          + " |")
    print("| --- | --- |" + " --- |" * len(labels))
    for (sid, seed), g in df.groupby(["solution", "seed"], sort=False):
        cells = []
        for lab in labels:
            r = g[g.label == lab].iloc[0]
            if pd.notna(r.get("diverged_at")):
                cells.append(f"diverged at step {int(r.diverged_at)}")
            else:
                cells.append(f"{r.ratio:.1f}x: {r.val_drop:.2f} / {r.test_drop:.2f}")
        print(f"| {sid} | {seed} | " + " | ".join(cells) + " |")
    for lab in labels:
        g = df[df.label == lab]
        print(f"# {lab}: mean ratio {g.ratio.mean():.1f}x, mean val drop {g.val_drop.mean():.2f},"
              f" mean test drop {g.test_drop.mean():.2f}")
    if len(labels) == 2:
        a, b = (df[df.label == lab].set_index(["solution", "seed"]) for lab in labels)
        n = len(a)
        print(f"# {labels[1]} better than {labels[0]}: validation {(b.val_drop < a.val_drop).sum()}"
              f" of {n}, test {(b.test_drop < a.test_drop).sum()} of {n}")


if __name__ == "__main__":
    main()
