"""Bin merging before and after the merge path, in one run, on the same solutions.

Before: the greedy merging of moecomp up to 2026-12 (each round, the 3 cheapest pairs of every
layer measured on the validation split; the best one kept while within the tolerance; copied
below as ``greedy_merge``). After: ``moecomp.merge.merge_bins`` (one merge path ordered by the
calibration divergence of 512 samples, then the furthest point of the path within the
tolerance, about 2 sqrt(length) validation passes), with more tolerances on the same path.

Both merge the same plain front solutions (the best estimated ratios whose validation drop is
at most ``--max-val-drop``) with the validation accuracy drop as the fidelity, as
``moecomp refine --merge-bins`` does. Reported per solution: seconds, fidelity calls, levels,
file bytes (the real .mcz encoding) and validation drop after merging; for the new merging the
same at every tolerance, which must be monotone (fewer or equal levels for larger ones).

Run (a finished search run of the problem, e.g. from ``moecomp compress``):
  .venv/bin/python bench/bench_merge.py runs/c5 --solutions 2 --tolerance 0.5 \
      --tolerances 0.25,0.5,1.0
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from moecomp.apply import QuantizedLayer
from moecomp.codec import encode_model
from moecomp.merge import MergeResult, MergeStep, _check_groups, merge_path
from moecomp.refine import GUIDE_SAMPLES, _guide, _layers_fidelity
from moecomp.solution import RunContext, dense_tensors


# --- before: the greedy merging as it was (moecomp/merge.py up to 2026-12-03) -------------
def _normalise(layers: dict[str, QuantizedLayer], group: tuple[str, ...]
               ) -> tuple[tuple[tuple[str, ...], torch.Tensor, torch.Tensor],
                          dict[str, QuantizedLayer]]:
    codebook = layers[group[0]].codebook
    k = codebook.numel()
    counts = torch.zeros(k, dtype=torch.int64)
    for n in group:
        counts += torch.bincount(layers[n].indices, minlength=k)
    used = torch.nonzero(counts > 0).flatten()
    if used.numel() == 0:
        cb = codebook[:1].clone()
        return (group, cb, torch.zeros(1, dtype=torch.int64)), {
            n: replace(layers[n], codebook=cb) for n in group}
    values, inverse = torch.unique(codebook[used], sorted=True, return_inverse=True)
    if values.numel() == k and torch.equal(values, codebook):
        return (group, codebook, counts), {n: layers[n] for n in group}
    new_of_old = torch.full((k,), -1, dtype=torch.int64)
    new_of_old[used] = inverse
    new_counts = torch.zeros(values.numel(), dtype=torch.int64).index_add_(0, inverse,
                                                                            counts[used])
    cb = values.to(torch.float32)
    return (group, cb, new_counts), {
        n: replace(layers[n], indices=new_of_old[layers[n].indices], codebook=cb)
        for n in group}


def _costs(cb: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    n, c = counts.to(torch.float64), cb.to(torch.float64)
    pair = n[:-1] + n[1:]
    return torch.where(pair > 0, n[:-1] * n[1:] / pair.clamp(min=1), 0.0) * (
        c[1:] - c[:-1]).square()


def greedy_merge(layers: dict[str, QuantizedLayer], fidelity: object, *, tolerance: float,
                 baseline: float, candidates_per_round: int = 3) -> MergeResult:
    """The merging of moecomp before the merge path (greedy, measured pair by pair)."""
    fid = fidelity  # a callable layers -> float
    assert callable(fid)
    f0 = float(fid(layers))
    evaluations = 1
    limit = baseline + tolerance
    state, current = [], dict(layers)
    for names in _check_groups(layers, None):
        grp, updated = _normalise(current, names)
        state.append(grp)
        current.update(updated)
    current = {n: current[n] for n in layers}
    f_now = f0
    steps: list[MergeStep] = []
    while True:
        best = None
        for gi, (names, cb, counts) in enumerate(state):
            if cb.numel() < 2:
                continue
            costs = _costs(cb, counts)
            for j in torch.argsort(costs, stable=True)[:candidates_per_round].tolist():
                nj, nk = int(counts[j]), int(counts[j + 1])
                cj, ck = float(cb[j]), float(cb[j + 1])
                value = (nj * cj + nk * ck) / (nj + nk) if nj + nk else (cj + ck) / 2
                new_cb = torch.cat([cb[:j], torch.tensor([value], dtype=torch.float32),
                                    cb[j + 2:]])
                new_counts = torch.cat([counts[:j], counts[j:j + 2].sum().reshape(1),
                                        counts[j + 2:]])
                cand = dict(current)
                for n in names:
                    idx = current[n].indices
                    cand[n] = replace(current[n], indices=idx - (idx > j).to(torch.int64),
                                      codebook=new_cb)
                f = float(fid(cand))
                evaluations += 1
                key = (f, float(costs[j]), gi, j)
                if f <= limit and (best is None or key < best[0]):
                    best = (key, (names, new_cb, new_counts), cand, value)
        if best is None:
            break
        key, grp, cand, value = best
        state[key[2]] = grp
        current, f_now = cand, key[0]
        steps.append(MergeStep(grp[0], key[3], value, key[0]))
    return MergeResult(current, {n: q.n_levels for n, q in layers.items()},
                       {n: q.n_levels for n, q in current.items()}, f0, f_now, baseline,
                       tolerance, tuple(steps), evaluations)


# --- the benchmark ---------------------------------------------------------------------------
def file_bytes(ctx: RunContext, plan: dict[str, object], state: dict[str, torch.Tensor],
               layers: dict[str, QuantizedLayer]) -> int:
    from moecomp.apply import student_state_dict

    full = student_state_dict(state, layers)
    return len(encode_model(layers, dense_tensors(full, layers,
                                                  dtype=ctx.target.dense_torch_dtype),
                            plan=plan, order=list(full)))


def levels(layers: dict[str, QuantizedLayer]) -> int:
    return sum(q.n_levels for q in layers.values())


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished search run folder")
    ap.add_argument("--solutions", type=int, default=2)
    ap.add_argument("--max-val-drop", type=float, default=0.5,
                    help="solutions merged: the best estimated ratios with at most this "
                         "validation drop")
    ap.add_argument("--tolerance", type=float, default=0.5,
                    help="the tolerance both merge with (validation points)")
    ap.add_argument("--tolerances", default="0.25,0.5,1.0",
                    help="more tolerances for the new merging, on the same path")
    ap.add_argument("--before-tolerances", default="",
                    help="more tolerances for the old merging (slow), e.g. 1.0")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    from moecomp.pick import validation_measures

    ctx = RunContext(args.run)
    target = ctx.target
    front = ctx.run.front().sort_values("ratio", ascending=False)
    vals = validation_measures(ctx, front["id"].astype(int).tolist())
    front = front.assign(val_drop=vals["val_drop"].to_numpy())
    chosen = front[front["val_drop"] <= args.max_val_drop].head(args.solutions)
    tolerances = sorted({args.tolerance, *(float(t) for t in args.tolerances.split(",") if t)})
    before_tols = sorted({args.tolerance, *(float(t) for t in args.before_tolerances.split(",")
                                            if t)})
    print(f"# Bin merging before/after: {ctx.problem.name} ({args.run})\n")
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} cores (shared), torch "
          f"{torch.__version__}; date {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"- fidelity: accuracy drop on the validation split ({len(target.val or [])} "
          f"samples); guide: divergence on {GUIDE_SAMPLES} calibration samples\n")
    print("| solution | est. ratio | levels | merging | tolerance | seconds | fidelity calls | "
          "levels after | file bytes | val drop after |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    speedups = []
    for _, row in chosen.iterrows():
        sid = int(row["id"])
        sol = ctx.solution(sid)
        state = target.round_dense(sol.state)
        fidelity = _layers_fidelity(target, state, "validation", "metric")
        base = float(fidelity(sol.layers))
        plan = sol.plan.to_dict()
        head = f"| {sid} | {row['ratio']:.1f}x | {levels(sol.layers)} "
        print(head + f"| none | | | | | {file_bytes(ctx, plan, state, sol.layers):,} | "
              f"{base:.2f} |", flush=True)
        # after: the path and the tolerance asked first, then the others on the same path
        t = time.perf_counter()
        path = merge_path(sol.layers, guide=_guide(target, state, GUIDE_SAMPLES))
        measured = path.measure(fidelity)
        results = {args.tolerance: measured.within(args.tolerance, baseline=base)}
        after = time.perf_counter() - t
        secs = {args.tolerance: after}
        for tol in tolerances:
            if tol not in results:
                t = time.perf_counter()
                results[tol] = measured.within(tol, baseline=base)
                secs[tol] = time.perf_counter() - t
        for tol in tolerances:
            r = results[tol]
            what = (f"after (path of {len(path)} merges, {path.guide_evaluations} guide calls)"
                    if tol == args.tolerance else "after, same path (seconds added)")
            print(head + f"| {what} | {tol:g} | {secs[tol]:.1f} | {r.evaluations} "
                  f"(cumulative) | {levels(r.layers)} | "
                  f"{file_bytes(ctx, plan, state, r.layers):,} | {r.fidelity_after:.2f} |",
                  flush=True)
        lv = [levels(results[t].layers) for t in tolerances]
        assert all(a >= b for a, b in zip(lv, lv[1:], strict=False)), f"not monotone: {lv}"
        for tol in before_tols:
            t = time.perf_counter()
            old = greedy_merge(sol.layers, fidelity, tolerance=tol, baseline=base)
            before = time.perf_counter() - t
            if tol == args.tolerance:
                speedups.append(before / after)
            print(head + f"| before (greedy) | {tol:g} | {before:.1f} | {old.evaluations} | "
                  f"{levels(old.layers)} | {file_bytes(ctx, plan, state, old.layers):,} | "
                  f"{old.fidelity_after:.2f} |", flush=True)
    if speedups:
        med = sorted(speedups)[len(speedups) // 2]
        print(f"\n- speed-up at tolerance {args.tolerance:g} (before seconds / after seconds, "
              f"path included): {', '.join(f'{s:.1f}x' for s in speedups)}; median "
              f"{med:.1f}x (of {len(speedups)})")
    print(f"- total {time.perf_counter() - t_start:.0f} s; load average "
          f"{os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
