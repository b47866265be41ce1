"""A user's model through the command line, against a naive baseline, on real files.

For a problem file (default: the transformer example, ``examples/transformer/problem.toml``):

1. ``moecomp search PROBLEM --budget N --out OUT`` (a subprocess: the user's path);
2. every front solution measured on the VALIDATION split (mean divergence, the metric);
   at each divergence level, the front solution of best estimated ratio within it is
   exported with ``moecomp export`` (a real ``.mcz``, decoded and verified) and its TEST
   divergence and metric reported: choose on validation, report on test;
3. the naive baseline in the same process: every compressed tensor magnitude-pruned at one
   sparsity ``s`` (per layer, the same share) and its survivors quantised min-max uniform to
   8 bits (256 evenly spaced levels from the minimum to the maximum), encoded by the same
   codec; ``s`` swept, and at each level the largest ratio whose validation divergence is
   within it.

Ratio = 4 bytes x every floating parameter and buffer of the model (embeddings included) /
bytes of the file. Prints Markdown for BENCHMARKS.md and writes ``OUT/byom.json``.

Run: .venv/bin/python bench/bench_byom.py examples/transformer/problem.toml --budget 2000 \\
         --levels 0.01,0.03 --out runs/bench-byom
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moecomp.apply import QuantizedLayer, student_state_dict
from moecomp.codec import write_mcz
from moecomp.pick import validation_measures
from moecomp.solution import RunContext, dense_tensors, student_model
from moecomp.target import Target

SWEEP = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)


def moecomp(*args: str) -> float:
    """Run ``moecomp ARGS`` as a user would; seconds taken."""
    exe = Path(sys.executable).with_name("moecomp")
    t0 = time.perf_counter()
    subprocess.run([str(exe), *args], check=True)
    return time.perf_counter() - t0


def naive_layers(target: Target, sparsity: float) -> dict[str, QuantizedLayer]:
    """Per-layer magnitude pruning at ``sparsity``, survivors min-max uniform 8-bit."""
    out = {}
    for name, w in target.weights().items():
        flat = w.reshape(-1).float()
        k = int(round(sparsity * flat.numel()))
        mask = torch.ones(flat.numel(), dtype=torch.bool)
        if k:
            mask[torch.argsort(flat.abs(), stable=True)[:k]] = False
        values = flat[mask]
        lo, hi = float(values.min()), float(values.max())
        codebook = torch.linspace(lo, hi, 256) if hi > lo else torch.tensor([lo])
        step = (hi - lo) / 255 if hi > lo else 1.0
        idx = torch.clamp(torch.round((values - lo) / step), 0, codebook.numel() - 1).long()
        out[name] = QuantizedLayer(tuple(w.shape), mask.reshape(w.shape), idx, codebook)
    return out


def naive_point(target: Target, sparsity: float, folder: Path) -> dict[str, float]:
    layers = naive_layers(target, sparsity)
    state = target.round_dense(student_state_dict(target.student_base(), layers))
    path = folder / f"naive-{sparsity:.2f}.mcz"
    size = write_mcz(path, layers, dense_tensors(state, layers, dtype=target.dense_torch_dtype),
                     order=list(state))
    model = student_model(target.teacher, state)
    val, test = target.fidelity(model, "validation"), target.fidelity(model, "test")
    fp32 = 4 * target.n_params
    return {"sparsity": sparsity, "bytes": size, "ratio": fp32 / size,
            "val_divergence": val.divergence, "val_metric": val.metric,
            "test_divergence": test.divergence, "test_metric": test.metric}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problem", nargs="?", default="examples/transformer/problem.toml")
    ap.add_argument("--budget", type=int, default=2000)
    ap.add_argument("--levels", default="0.01,0.03", help="validation divergence levels")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-byom"))
    ap.add_argument("--reuse", action="store_true", help="use the search already in --out")
    args = ap.parse_args()
    levels = [float(v) for v in args.levels.split(",")]
    run = args.out / "run"
    t_search = math.nan
    if not args.reuse:
        t_search = moecomp("search", args.problem, "--budget", str(args.budget), "--out",
                           str(run), "--no-progress")
    ctx = RunContext(run)
    target = ctx.target
    front = ctx.run.front().reset_index(drop=True)
    # the validation split only (what the choice reads; cached in RUN/validation.csv, as
    # pick's): test is measured by export on the chosen files
    held = validation_measures(ctx, front["id"].astype(int).tolist(), progress=True)
    front = front.join(held.drop(columns="id"))

    rows = []
    for d in levels:
        ok = front[front["val_divergence"] <= d].sort_values("ratio", ascending=False)
        if ok.empty:
            rows.append({"level": d, "id": None})
            continue
        sid = str(int(ok["id"].iloc[0]))
        mcz = args.out / "files" / f"level-{d:g}" / f"{sid}.mcz"
        t_exp = moecomp("export", str(run), "--solution", sid, "--out", str(mcz))
        rec = json.loads(mcz.with_name(mcz.stem + ".export.json").read_text())
        rows.append({"level": d, "id": sid, "bytes": rec["file_bytes"], "ratio": rec["ratio"],
                     "val_divergence": rec["val_divergence"], "val_metric": rec["val_metric"],
                     "test_divergence": rec["test_divergence"],
                     "test_metric": rec["test_metric"], "export_s": t_exp})

    folder = args.out / "files" / "naive"
    folder.mkdir(parents=True, exist_ok=True)
    naive = [naive_point(target, s, folder) for s in SWEEP]
    best_naive = []
    for d in levels:
        ok = [p for p in naive if p["val_divergence"] <= d]
        best_naive.append(max(ok, key=lambda p: p["ratio"]) if ok else None)

    name = target.metric_name
    teacher_test = target.teacher_metric("test")
    print(f"### {ctx.problem.name}: {target.n_params:,} parameters, "
          f"{len(target.layers)} compressed tensors\n")
    print(f"- command: `{' '.join(sys.argv)}`; machine: {platform.machine()} "
          f"{os.cpu_count()} cores, torch {torch.__version__}; "
          f"date {dt.date.today().isoformat()}")
    print(f"- search: {args.budget} evaluations, {t_search:.0f} s; front of {len(front)}; "
          f"teacher test {name} {teacher_test:.2f}")
    print(f"- chosen on validation divergence, reported on test; ratio vs fp32 of all "
          f"{target.n_params:,} parameters ({4 * target.n_params:,} bytes), real files\n")
    print(f"| val divergence <= | method | file bytes | ratio | val div. | test div. | "
          f"test {name} |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for d, r, nv in zip(levels, rows, best_naive, strict=True):
        if r.get("id") is None:
            print(f"| {d:g} | moecomp search | - | - | - | - | - |")
        else:
            print(f"| {d:g} | moecomp search (solution {r['id']}) | {r['bytes']:,} | "
                  f"{r['ratio']:.1f}x | {r['val_divergence']:.4f} | "
                  f"{r['test_divergence']:.4f} | {r['test_metric']:.2f} |")
        if nv is None:
            print(f"| {d:g} | naive (magnitude + min-max 8-bit) | - | - | - | - | - |")
        else:
            print(f"| {d:g} | naive (magnitude {nv['sparsity']:.0%} + min-max 8-bit) | "
                  f"{nv['bytes']:,} | {nv['ratio']:.1f}x | {nv['val_divergence']:.4f} | "
                  f"{nv['test_divergence']:.4f} | {nv['test_metric']:.2f} |")
    print("\nNaive sweep (validation divergence by sparsity): " + ", ".join(
        f"{p['sparsity']:.0%} {p['ratio']:.1f}x {p['val_divergence']:.4f}" for p in naive))
    (args.out / "byom.json").write_text(json.dumps(
        {"levels": levels, "search": rows, "naive": naive, "search_s": t_search,
         "front": front[["id", "ratio", "divergence", "val_divergence", "val_metric"]]
         .replace({np.nan: None}).to_dict("records")}, indent=2))


if __name__ == "__main__":
    main()
