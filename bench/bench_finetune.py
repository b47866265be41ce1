"""Fine-tuning with fixed vs moving masks: compression ratio within an accuracy drop against
epochs, on real .mcz files.

Takes a finished search run folder, picks ``--n`` front solutions spread evenly (in log ratio)
over the estimated ratios in ``--range``, and fine-tunes each with every mask mode of
``--masks`` (``moecomp.finetune.MaskSchedule``: fixed, gradual, rigl) for every epoch count of
``--epochs``. Every result is written as a real ``.mcz`` (the plan's per-layer survivor
counts and bits, so its size follows the plan), decoded, checked to reproduce the in-memory
model exactly on the test inputs, and measured on validation and test.

Per mode and epoch count it reports the solution CHOSEN ON VALIDATION (the highest file ratio
whose validation drop is <= ``--max-drop``) with its test drop, and, for reference, the
highest file ratio whose test drop is <= ``--max-drop`` (an oracle, not a choice).

Ratio = 4 bytes x every parameter of the model / bytes of the .mcz file.

Run: .venv/bin/python bench/bench_finetune.py runs/f300 --range 40,200 --n 8
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker (a 2-core machine)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from moecomp.codec import read_mcz, write_mcz  # noqa: E402
from moecomp.finetune import Diverged, MaskSchedule, distil  # noqa: E402
from moecomp.solution import RunContext, Solution, dense_tensors, student_model  # noqa: E402
from moecomp.train import accuracy  # noqa: E402


def ladder(ctx: RunContext, lo: float, hi: float, n: int, *, window: float = 0.0
           ) -> list[int]:
    """Ids of ``n`` front solutions spread evenly in log(estimated ratio) over [lo, hi]: per
    goal ratio the nearest one, or with ``window`` > 0 the one of lowest validation drop
    (``RUN/validation.csv``, from ``pick``/``compress``) among those within a factor
    ``1 + window`` of the goal (the nearest when none there has been measured)."""
    front = ctx.run.front()
    front = front[(front.ratio >= lo) & (front.ratio <= hi)].sort_values("ratio")
    if front.empty:
        raise SystemExit(f"no front solution has an estimated ratio in {lo}-{hi}")
    val = ctx.run.path / "validation.csv"
    drops = (pd.read_csv(val).set_index("id")["val_drop"] if window > 0 and val.exists()
             else pd.Series(dtype=float))
    logs = np.log(front.ratio.to_numpy())
    ids: list[int] = []
    for goal in np.linspace(math.log(lo), math.log(hi), n):
        near = front[np.abs(logs - goal) <= math.log1p(window)]
        measured = near[near["id"].isin(drops.index)]
        if len(measured):
            best = int(drops.loc[measured["id"]].to_numpy().argmin())
            sid = int(measured.iloc[best]["id"])
        else:
            sid = int(front.iloc[int(np.abs(logs - goal).argmin())]["id"])
        if sid not in ids:
            ids.append(sid)
    return ids


def finetuned_file(ctx: RunContext, sol: Solution, mode: str, epochs: int, path: Path, *,
                   seed: int, lr: float | None, score: str, optimizer: str = "adam",
                   repair: bool = False) -> dict[str, float]:
    """Fine-tune, write, decode and measure one solution; a result row. ``optimizer``,
    ``repair``: ``distil``'s optimizer and ``MaskSchedule.repair``."""
    target = ctx.target
    assert target.val is not None and target.test is not None
    bits = {n: lp.bits for n, lp in sol.plan.layers.items()}
    kinds = {n: lp.quantizer for n, lp in sol.plan.layers.items()}
    model = student_model(target.teacher, sol.state)
    t0 = time.perf_counter()
    res = distil(model, target, sol.layers, bits, target.pool or target.calib, epochs=epochs,
                 masks=MaskSchedule(mode, score=score, repair=repair), quantizers=kinds, lr=lr,
                 optimizer=optimizer, seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    layers = res.quantized(bits, kinds)
    state = {k: res.weights.get(k, v) for k, v in sol.state.items()}
    for name, ql in layers.items():
        state[name] = ql.dequantize().to(sol.state[name].dtype)
    state = target.round_dense(state)
    size = write_mcz(path, layers, dense_tensors(state, layers, dtype=target.dense_torch_dtype),
                     plan=sol.plan.to_dict(), order=list(state),
                     meta={"parent": sol.key, "masks": mode, "finetune_epochs": epochs,
                           "tied": target.tied})
    decoded = read_mcz(path)
    memory = student_model(target.teacher, state)
    dtypes = {k: v.dtype for k, v in state.items()}
    loaded = student_model(target.teacher, {k: v.to(dtypes[k])
                                            for k, v in decoded.state_dict.items()})
    x = target.test.inputs
    if not torch.equal(target.run(memory, x), target.run(loaded, x)):
        raise SystemExit(f"{path}: the decoded file differs from the fine-tuned model")
    for name, ql in layers.items():
        assert ql.n_kept == sol.layers[name].n_kept and ql.n_levels <= 2 ** bits[name]
    n_params = sum(int(v.numel()) for v in state.values() if v.is_floating_point())
    return {"bytes": size, "ratio": 4 * n_params / size, "seconds": seconds,
            "val_acc": accuracy(loaded, target.val), "test_acc": accuracy(loaded, target.test)}


_CTX: dict[str, RunContext] = {}


def _job(run: str, sid: int, mode: str, epochs: int, path: str, seed: int, lr: float,
         score: str, optimizer: str = "adam", repair: bool = False
         ) -> dict[str, float | int | str]:
    """One fine-tuned file in a worker process (its RunContext built once per worker); also
    bench_optimizer's."""
    torch.set_num_threads(1)
    if run not in _CTX:
        _CTX[run] = RunContext(run)
    ctx = _CTX[run]
    target = ctx.target
    assert target.val is not None and target.test is not None
    t_val = accuracy(target.teacher, target.val)
    t_test = accuracy(target.teacher, target.test)
    row = {"solution": sid, "masks": mode, "epochs": epochs, "seed": seed,
           "optimizer": optimizer, "lr": lr}
    try:
        r = finetuned_file(ctx, ctx.solution(sid), mode, epochs, Path(path), seed=seed, lr=lr,
                           score=score, optimizer=optimizer, repair=repair)
    except Diverged as e:  # a row without a file: NaN measures, and the step it diverged at
        nan = float("nan")
        return {**row, "bytes": nan, "ratio": nan, "seconds": nan, "val_acc": nan,
                "test_acc": nan, "val_drop": nan, "test_drop": nan, "diverged_at": e.step}
    return {**row, **r,
            "val_drop": t_val - r["val_acc"], "test_drop": t_test - r["test_acc"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--range", default="40,200", help="estimated ratios, lo,hi")
    ap.add_argument("--n", type=int, default=8, help="front solutions fine-tuned")
    ap.add_argument("--epochs", default="1,3,5,10")
    ap.add_argument("--masks", default="fixed,gradual,rigl")
    ap.add_argument("--score", default="activation",
                    help="what moving masks keep weights by: magnitude or activation")
    ap.add_argument("--window", type=float, default=0.0,
                    help="> 0: per ladder step the solution of lowest validation drop within "
                         "a factor 1 + WINDOW of its ratio (RUN/validation.csv); 0: nearest")
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes (one thread each)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder of the .mcz files and rows.csv (default RUN/bench_finetune)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lo, hi = (float(v) for v in args.range.split(","))
    epochs = [int(v) for v in args.epochs.split(",")]
    modes = args.masks.split(",")
    out = args.out or args.run / "bench_finetune"
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(args.run)
    target = ctx.target
    assert target.val is not None and target.test is not None
    t_val, t_test = accuracy(target.teacher, target.val), accuracy(target.teacher, target.test)
    ids = ladder(ctx, lo, hi, args.n, window=args.window)
    est = ctx.run.front().set_index("id").ratio
    cmd = (f"python bench/bench_finetune.py {args.run} --range {args.range} --n {args.n} "
           f"--epochs {args.epochs} --masks {args.masks} --score {args.score} "
           f"--max-drop {args.max_drop} --lr {args.lr} --workers {args.workers}"
           + (f" --window {args.window}" if args.window else "")
           + (f" --seed {args.seed}" if args.seed else ""))
    print(f"# Fine-tuning with fixed vs moving masks: {args.run}\n")
    print(f"- command: `{cmd}`")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.workers} worker(s) "
          f"of 1 torch thread, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"- teacher: validation {t_val:.2f} %, test {t_test:.2f} %; ladder: "
          + ", ".join(f"{i} ({est[i]:.0f}x est.)" for i in ids) + "\n")
    print("| solution | masks | epochs | file ratio | val drop (pt) | test drop (pt) | s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    jobs = sorted(((sid, mode, e) for sid in ids for mode in modes for e in epochs),
                  key=lambda j: -j[2])  # longest first: the pool ends together
    rows = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_job, str(args.run), sid, mode, e,
                               str(out / f"{sid}-{mode}-{e}.mcz"), args.seed, args.lr,
                               args.score) for sid, mode, e in jobs]
        for fut in as_completed(futures):
            row = fut.result()
            rows.append(row)
            print(f"| {row['solution']} | {row['masks']} | {row['epochs']} | "
                  f"{row['ratio']:.1f}x | {row['val_drop']:.2f} | {row['test_drop']:.2f} | "
                  f"{row['seconds']:.0f} |", flush=True)
    rows.sort(key=lambda r: (r["solution"], modes.index(str(r["masks"])), r["epochs"]))
    with (out / "rows.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\n## Ratio within {args.max_drop} point, per mask mode and epochs\n")
    print("| masks | epochs | chosen on validation: ratio | its val drop | its test drop | "
          "best ratio with test drop <= max (oracle) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for mode in modes:
        for e in epochs:
            mine = [r for r in rows if r["masks"] == mode and r["epochs"] == e]
            ok = [r for r in mine if r["val_drop"] <= args.max_drop]
            best = max(ok, key=lambda r: r["ratio"]) if ok else None
            oracle = [r["ratio"] for r in mine if r["test_drop"] <= args.max_drop]
            chosen = (f"{best['ratio']:.1f}x | {best['val_drop']:.2f} | {best['test_drop']:.2f}"
                      if best else "none | | ")
            print(f"| {mode} | {e} | {chosen} | "
                  f"{f'{max(oracle):.1f}x' if oracle else 'none'} |")
    print(f"\n- {len(rows)} fine-tuned files in {time.perf_counter() - t0:.0f} s; rows in "
          f"{out / 'rows.csv'}")


if __name__ == "__main__":
    main()
