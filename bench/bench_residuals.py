"""How far off the surrogate was, on a finished search, and how much of that the errors of
earlier evaluated neighbours explain.

For every plan screened and evaluated in full (``screened.csv`` with ``full``; measured
divergence from the run's checkpoint archive), the error is ``log(measured / predicted)``
with the prediction the search made when it screened the plan. The neighbour estimate of a
plan's error is the mean error of the ``k`` plans of earlier generations nearest in gene
space (L1 on genes scaled to [0, 1]). Printed per kind (targeted, near, candidate): the
error's mean and RMS, and the same after subtracting the neighbour estimate. A question for
a local correction of the surrogate, answered without running a search.

Usage: python bench/bench_residuals.py runs/scale-c128-r20opt [--k 1,3,8]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file

from moecomp.runs import RunFolder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--k", default="1,3,8", help="neighbour counts, comma-separated")
    args = ap.parse_args()
    run = RunFolder(args.run)
    genes_cfg = json.loads(run.file("problem.json").read_text())["genes"]
    step, b_min, b_max = (genes_cfg["sparsity_step"], genes_cfg["bits_min"],
                          genes_cfg["bits_max"])
    s_top = max(round(genes_cfg["sparsity_max"] / step), 1)
    ck = load_file(str(run.file("checkpoint.safetensors")))
    X = ck["archive.X"].astype(np.int64)
    measured = ck["archive.metrics.divergence"]
    sc = pd.read_csv(run.file("screened.csv"))
    s_cols = [c for c in sc.columns if c.startswith("s:")]
    b_cols = [c for c in sc.columns if c.startswith("b:")]
    Xs = np.column_stack([np.rint(sc[s_cols].to_numpy() / step),
                          sc[b_cols].to_numpy()]).astype(np.int64)
    at = {r.tobytes(): i for i, r in enumerate(X)}
    got = np.array([measured[at[r.tobytes()]] if r.tobytes() in at else np.nan for r in Xs])
    keep = sc["full"].to_numpy(bool) & (sc["kind"] != "ladder").to_numpy() & np.isfinite(got)
    err = np.log(got[keep] / sc["predicted_divergence"].to_numpy()[keep])
    kind = sc["kind"].to_numpy()[keep]
    gen = sc["gen"].to_numpy()[keep]
    L = len(s_cols)
    G = Xs[keep].astype(float)
    G[:, :L] /= s_top
    G[:, L:] = (G[:, L:] - b_min) / max(b_max - b_min, 1)
    print(f"# Surrogate errors in {args.run}: log(measured / predicted) at screening\n")
    print("| kind | k | plans | mean | RMS | mean after neighbours | RMS after neighbours |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in (int(v) for v in args.k.split(",")):
        est = np.full(len(err), np.nan)
        for i in range(len(err)):
            prev = np.flatnonzero(gen < gen[i])
            if len(prev) >= k:
                near = prev[np.argsort(np.abs(G[prev] - G[i]).sum(axis=1), kind="stable")[:k]]
                est[i] = err[near].mean()
        for name in ("targeted", "near", "candidate"):
            m = (kind == name) & np.isfinite(est)
            if not m.any():
                continue
            e, rest = err[m], err[m] - est[m]
            print(f"| {name} | {k} | {int(m.sum())} | {e.mean():+.4f} | "
                  f"{np.sqrt(np.mean(e ** 2)):.4f} | {rest.mean():+.4f} | "
                  f"{np.sqrt(np.mean(rest ** 2)):.4f} |")


if __name__ == "__main__":
    main()
