"""Hostile .mcz files (valid CRCs, tiny payloads, headers that claim as much as they can):
the worst ones at a decode cap, each decoded in a fresh process (CPU and wall time; the
peak of allocated memory by tracemalloc, in a second run), and a seeded fuzz run at a small cap (how
many files were refused or decoded, and the worst time and memory against their bounds).
Prints Markdown for BENCHMARKS.md ("Hostile files").

Run: ``.venv/bin/python bench/bench_hostile.py [--max-bytes 4GiB] [--fuzz 2000]``

The files are built by ``tests/codec/hostile.py`` (shared with the fuzz test). The worst
cases need about as much memory as ``--max-bytes`` (the point: no more than that).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "codec"))

import hostile as H  # noqa: E402

from moecomp.cli.codec import parse_size  # noqa: E402
from moecomp.codec import (  # noqa: E402
    DEFAULT_MAX_BYTES,
    MAX_HEADER_BYTES,
    decode_model,
    inspect_model,
)
from moecomp.codec.container import GRID_ROW_COST, TENSOR_COST  # noqa: E402
from moecomp.errors import CodecError  # noqa: E402

CHILD = """
import json, sys, time
from pathlib import Path
from moecomp.codec import decode_model
from moecomp.errors import CodecError

data = Path(sys.argv[1]).read_bytes()
limit = int(sys.argv[2])
traced = sys.argv[3] == "1"
if traced:
    import tracemalloc
    tracemalloc.start()
t0, c0 = time.perf_counter(), time.process_time()
try:
    d = decode_model(data, max_bytes=limit)
    n = sum(t.numel() * t.element_size() for t in d.state_dict.values())
    for q in d.layers.values():
        n += sum(t.numel() * t.element_size() for t in (q.mask, q.indices, q.codebook))
    outcome = "decoded"
except CodecError as e:
    n = 0
    outcome = ("refused (max_bytes)" if "would exceed max_bytes" in str(e)
               else "refused: " + str(e)[:60])
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
traced_peak = tracemalloc.get_traced_memory()[1] if traced else 0
print(json.dumps({"outcome": outcome, "output": n, "wall": wall, "cpu": cpu,
                  "traced": traced_peak}))
"""


def worst_cases(limit: int) -> dict[str, bytes]:
    """The costliest files this writer found for a cap of ``limit`` bytes."""
    budget = limit - 2**20  # headroom for rounding in the per-case arithmetic

    def grids(cols: int) -> list:
        """Coded grids of ``cols`` columns filling the budget: 65535-row ones, then one
        shorter grid with what is left."""
        per_row = GRID_ROW_COST + cols * 14 + 24
        full = TENSOR_COST + 65_535 * per_row
        k, left = divmod(budget, full)
        parts = [H.grid_tensor(f"g{i}", 65_535, cols, "coded") for i in range(k)]
        rows = (left - TENSOR_COST) // per_row
        if rows >= 2:
            parts.append(H.grid_tensor("last", rows, cols, "coded"))
        return parts

    empty_n = min(2**31, (budget - TENSOR_COST) // 6)
    ans_n = (budget - TENSOR_COST) // 30
    dense_n = (budget - TENSOR_COST) // 8
    entry = len(json.dumps(H.dense_tiny("t99999")[0], separators=(",", ":"))) + 60
    tiny = min((MAX_HEADER_BYTES - 200) // entry, budget // TENSOR_COST)  # fills the header
    cols = 2**15
    return {
        "coded grids of 2 columns (every row coded), filling the cap": H.build(grids(2)),
        "coded grids of 64 columns, filling the cap": H.build(grids(64)),
        f"{math.prod([empty_n // cols, cols]):,} zeros (const mask)": H.build(
            [H.empty_tensor("e", [empty_n // cols, cols])]),
        f"{math.prod([ans_n // cols, cols]):,} indices from a few ANS bytes": H.build(
            [H.full_tensor("f", [ans_n // cols, cols], ans=True)]),
        f"{dense_n:,} dense float32 zeros (one zstd frame)": H.build(
            [H.dense_zeros("d", [dense_n])]),
        f"{tiny:,} empty tensors (a ~16 MiB header)": H.build(
            [H.dense_tiny(f"t{i}") for i in range(tiny)]),
        "a 2**25-row grid (the issue's 274-byte file)": H.build(
            [H.crafted_grid("w", 2**25, 2, full=False)]),
    }


def run_child(path: Path, limit: int, traced: bool) -> dict[str, float | str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(limit), str(int(traced))],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


SLACK, FIXED_S, PER_TENSOR_BYTES = 10.0, 0.3, 8 * 2**10  # as in tests/codec/test_hostile.py


def benign_rate() -> float:
    """CPU seconds per byte of decode_cost of benign files (the fuzz test's work unit)."""
    import torch

    from moecomp.apply import QuantizedLayer
    from moecomp.codec import encode_model

    rng = np.random.default_rng(0)
    rates = []
    for density in (0.1, 0.5, 0.9):
        mask = rng.random((500, 1000)) < density
        layer = QuantizedLayer((500, 1000), torch.from_numpy(mask),
                               torch.from_numpy(rng.integers(0, 16, int(mask.sum()))),
                               torch.from_numpy(rng.standard_normal(16).astype(np.float32)))
        data = encode_model({"w": layer}, {"b": torch.randn(500_000)})
        cost = sum(r.decode_cost for r in inspect_model(data))
        best = min(_cpu(data, 2**31) for _ in range(3))
        rates.append(best / cost)
    return max(rates)


def _cpu(data: bytes, limit: int) -> float:
    c0 = time.process_time()
    try:
        decode_model(data, max_bytes=limit)
    except CodecError:
        pass
    return time.process_time() - c0


def fuzz(n: int, limit: int, seed: int) -> dict[str, float]:
    """``n`` random hostile files at cap ``limit``, each checked against the fuzz test's
    bounds (CPU time within SLACK work units per byte of the cap; tracemalloc peak within
    twice the output plus the file plus a per-tensor constant): counts, the worst of each."""
    rate = benign_rate()
    rng = np.random.default_rng(seed)
    kinds = ["coded_grid", "empty_grid", "crafted_grid", "empty", "full", "full_ans", "dense",
             "tiny"]
    stats = {"files": 0, "decoded": 0, "refused": 0, "max_cpu_ns_per_cap_byte": 0.0,
             "max_peak_over_bound": 0.0, "max_cpu_over_bound": 0.0, "max_cpu_s": 0.0,
             "beyond_bounds": 0, "rate_ns": rate * 1e9}
    for _ in range(n):
        parts: list = []
        for i in range(int(rng.integers(1, 6))):
            kind = kinds[int(rng.integers(len(kinds)))]
            name = f"t{i}"
            if kind in ("coded_grid", "empty_grid"):
                parts.append(H.grid_tensor(name, int(rng.integers(2, 12_000)),
                                           int(rng.choice([2, 3, 17, 64])),
                                           kind.removesuffix("_grid")))
            elif kind == "crafted_grid":
                parts.append(H.crafted_grid(name, int(2 ** rng.uniform(1, 26)),
                                            int(rng.choice([2, 3, 8])), bool(rng.integers(2))))
            elif kind in ("empty", "full", "full_ans"):
                numel = int(2 ** rng.uniform(0, 31.5))
                c = max(1, math.isqrt(numel))
                shape = [max(1, numel // c), c]
                if kind == "full_ans" and math.prod(shape) > 2**22:
                    shape = [2**11, 2**11]
                parts.append(H.empty_tensor(name, shape) if kind == "empty"
                             else H.full_tensor(name, shape, ans=kind == "full_ans"))
            elif kind == "dense":
                parts.append(H.dense_zeros(name, [int(2 ** rng.uniform(0, 23))]))
            else:
                parts += [H.dense_tiny(f"{name}.{j}") for j in range(int(rng.integers(1, 3000)))]
        data = H.build(parts)
        stats["files"] += 1
        c0 = time.process_time()
        try:
            d = decode_model(data, max_bytes=limit)
        except CodecError:
            stats["refused"] += 1
            d = None
        cpu = time.process_time() - c0
        cpu_bound = SLACK * rate * limit + FIXED_S
        stats["max_cpu_s"] = max(stats["max_cpu_s"], cpu)
        stats["max_cpu_ns_per_cap_byte"] = max(stats["max_cpu_ns_per_cap_byte"], cpu / limit * 1e9)
        stats["max_cpu_over_bound"] = max(stats["max_cpu_over_bound"], cpu / cpu_bound)
        stats["beyond_bounds"] += cpu > cpu_bound
        if d is None:
            continue
        stats["decoded"] += 1
        produced = sum(t.numel() * t.element_size() for t in d.state_dict.values())
        for q in d.layers.values():
            produced += sum(t.numel() * t.element_size() for t in (q.mask, q.indices, q.codebook))
        del d
        tracemalloc.start()
        decode_model(data, max_bytes=limit)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        bound = 2 * produced + len(data) + PER_TENSOR_BYTES * len(parts) + 2**20
        stats["max_peak_over_bound"] = max(stats["max_peak_over_bound"], peak / bound)
        stats["beyond_bounds"] += peak > bound
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-bytes", default=str(DEFAULT_MAX_BYTES))
    ap.add_argument("--fuzz", type=int, default=2000, help="random files (0: none)")
    ap.add_argument("--fuzz-max-bytes", default="32MiB")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    limit = parse_size(args.max_bytes)
    load = os.getloadavg()[0]
    print(f"<!-- {dt.datetime.now().isoformat(timespec='minutes')}, {platform.machine()}, "
          f"{os.cpu_count()} cores, load {load:.1f} -->")
    print(f"Worst files at `--max-bytes {args.max_bytes}` ({limit:,} bytes), each decoded in "
          "a fresh process:\n")
    print("| file | bytes | decode_cost | outcome | output MB | CPU s | wall s | peak "
          "allocated MB | allocated / output |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in worst_cases(limit).items():
            try:
                cost = sum(r.decode_cost for r in inspect_model(data, max_bytes=2**62))
            except CodecError:
                cost = 0
            path = Path(tmp) / "f.mcz"
            path.write_bytes(data)
            r = run_child(path, limit, traced=False)  # times without tracemalloc's hooks
            m = run_child(path, limit, traced=True)
            out_mb = float(r["output"]) / 1e6
            alloc_mb = float(m["traced"]) / 1e6
            ratio = f"{alloc_mb / out_mb:.2f}" if out_mb else "-"
            print(f"| {name} | {len(data):,} | {cost:,} | {r['outcome']} | {out_mb:,.0f} | "
                  f"{float(r['cpu']):.2f} | {float(r['wall']):.2f} | {alloc_mb:,.0f} | {ratio} |")
            del data
    if args.fuzz:
        flimit = parse_size(args.fuzz_max_bytes)
        t0 = time.perf_counter()
        s = fuzz(args.fuzz, flimit, args.seed)
        print(f"\nFuzz: {s['files']:,} random hostile files at `--max-bytes "
              f"{args.fuzz_max_bytes}` (seed {args.seed}, {time.perf_counter() - t0:.0f} s): "
              f"{s['decoded']:,} decoded, {s['refused']:,} refused; "
              f"{s['beyond_bounds']:,} beyond the fuzz test's bounds. Work unit (benign "
              f"files): {s['rate_ns']:.2f} ns CPU per byte of decode_cost. Slowest file "
              f"{s['max_cpu_s']:.3f} s CPU ({s['max_cpu_ns_per_cap_byte']:.2f} ns per byte of "
              f"the cap; {100 * s['max_cpu_over_bound']:.0f} % of its bound); highest "
              f"tracemalloc peak {100 * s['max_peak_over_bound']:.0f} % of its bound (2 x "
              "output + file + 8 KiB a tensor + 1 MiB).")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"\nmax RSS of this process (building the files, the fuzz): {rss} MB")


if __name__ == "__main__":
    main()
