"""Validation against test across finished compress runs: read, not run.

For each ``compress.json`` given (``moecomp compress`` writes one per run), prints:

- per run, the files from ``--from-ratio`` up: how many lost more on test than on validation,
  and the mean and largest test-minus-validation gap (points); where the rows carry standard
  errors (compress since 2026-12-05), their means and the mean gap in units of the
  difference's standard error, ``sqrt(val_se^2 + test_se^2)`` (the two splits are
  independent samples);
- over all runs, the smallest test drop from ``--from-ratio`` up and the largest file whose
  test drop is within ``--test-limit`` (an oracle: what choosing on test would give);
- over all runs, each merged candidate against the candidate it merged: how much smaller the
  file became and how far validation and test moved, with the means and how often test moved
  more than validation.

Run: .venv/bin/python bench/bench_compress_runs.py runs/f300ft-final/compress.json \
     runs/l5/ft/compress.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", type=Path, nargs="+", help="compress.json files")
    ap.add_argument("--from-ratio", type=float, default=70.0)
    ap.add_argument("--test-limit", type=float, default=1.0,
                    help="for the largest file whose test drop is within it")
    args = ap.parse_args()
    worse = total = 0
    big_tests: list[float] = []
    within_test: list[tuple[float, float, str]] = []
    merges: list[tuple[str, str, float, float, float]] = []
    for f in args.files:
        doc = json.loads(f.read_text())
        rows = doc["candidates"]
        big = [r for r in rows if r["ratio"] >= args.from_ratio]
        gaps = [r["test_drop"] - r["val_drop"] for r in big]
        big_tests += [r["test_drop"] for r in big]
        within_test += [(r["ratio"], r["test_drop"], str(f)) for r in rows
                        if r["test_drop"] is not None and r["test_drop"] <= args.test_limit]
        worse += sum(g > 0 for g in gaps)
        total += len(gaps)
        if gaps:
            print(f"{f}: {len(gaps)} files from {args.from_ratio:g}x, test worse than "
                  f"validation in {sum(g > 0 for g in gaps)}, gap mean "
                  f"{statistics.mean(gaps):+.2f}, largest {max(gaps):+.2f} points")
            with_se = [r for r in big if r.get("val_se") is not None
                       and r.get("test_se") is not None]
            if with_se:
                z = [(r["test_drop"] - r["val_drop"]) / (r["val_se"] ** 2 + r["test_se"] ** 2)
                     ** 0.5 for r in with_se]
                print(f"  standard errors ({len(with_se)} files): validation "
                      f"{statistics.mean(r['val_se'] for r in with_se):.2f}, test "
                      f"{statistics.mean(r['test_se'] for r in with_se):.2f} points on "
                      f"average; the gap is {statistics.mean(z):+.2f} standard errors of the "
                      f"difference on average, over 1 in {sum(v > 1 for v in z)}")
        by_key = {r["key"]: r for r in rows}
        for r in rows:
            parent = by_key.get(r["parent"]) if r["stage"] == "merge" else None
            if parent is not None:
                merges.append((str(f), r["key"], 1 - r["bytes"] / parent["bytes"],
                               r["val_drop"] - parent["val_drop"],
                               r["test_drop"] - parent["test_drop"]))
    print(f"all runs: {worse} of {total} files from {args.from_ratio:g}x lost more on test "
          "than on validation")
    if big_tests:
        print(f"all runs: the smallest test drop from {args.from_ratio:g}x up is "
              f"{min(big_tests):.2f}")
    if within_test:
        ratio, drop, where = max(within_test)
        print(f"all runs: the largest file within {args.test_limit:g} test point (an oracle, "
              f"not a choice) is {ratio:.1f}x at {drop:.2f} ({where})")
    for f, key, smaller, dval, dtest in merges:
        print(f"merge {f} {key}: {100 * smaller:.1f} % smaller, validation {dval:+.2f}, "
              f"test {dtest:+.2f}")
    if merges:
        print(f"{len(merges)} merges: {100 * statistics.mean(m[2] for m in merges):.1f} % "
              f"smaller on average, validation {statistics.mean(m[3] for m in merges):+.2f}, "
              f"test {statistics.mean(m[4] for m in merges):+.2f} on average; test moved "
              f"more than validation in {sum(m[4] > m[3] for m in merges)}")


if __name__ == "__main__":
    main()
