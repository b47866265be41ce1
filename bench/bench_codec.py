"""Benchmark of the .mcz codec: coded size of each stream against its order-0 entropy, the
coder kept, and encode/decode speed. Prints Markdown for BENCHMARKS.md.

Run: ``.venv/bin/python bench/bench_codec.py [--quick]``

Layers are synthetic but shaped like the real ones: weights drawn from a Laplace
distribution, the smallest magnitudes pruned (so survivor positions look like those of
magnitude pruning), survivors quantised to ``2**bits`` equal-width bins with bin-mean levels.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version

import numpy as np
import torch

from moecomp.apply import QuantizedLayer
from moecomp.codec import decode_model, encode_model
from moecomp.codec.streams import choose_freqs, order0_entropy_bits, table_bytes

LENET = {"fc1.weight": (300, 784), "fc2.weight": (100, 300), "fc3.weight": (10, 100)}
BIG = {"big.weight": (2048, 2048)}
ONE_M = {"w.weight": (1024, 1024)}
SPARSITIES = (0.5, 0.7, 0.9, 0.97)
BITS = (2, 4, 8)


def quantized_layer(
    shape: tuple[int, ...], sparsity: float, bits: int, seed: int
) -> QuantizedLayer:
    """Laplace weights of ``shape``, magnitude-pruned to ``sparsity``, survivors quantised to
    ``2**bits`` equal-width bins (bin-mean levels; an empty bin gets its centre)."""
    rng = np.random.default_rng(seed)
    w = rng.laplace(0.0, 0.05, math.prod(shape)).astype(np.float32)
    n_pruned = round(sparsity * w.size)
    mask = np.zeros(w.size, dtype=bool)
    mask[np.argsort(np.abs(w), kind="stable")[n_pruned:]] = True
    kept = w[mask]
    k = 2**bits
    lo, hi = float(kept.min()), float(kept.max())
    idx = np.clip(((kept - lo) / (hi - lo) * k).astype(np.int64), 0, k - 1)
    sums = np.bincount(idx, weights=kept, minlength=k)
    counts = np.bincount(idx, minlength=k)
    centres = lo + (np.arange(k) + 0.5) * (hi - lo) / k
    codebook = np.where(counts > 0, sums / np.maximum(counts, 1), centres).astype(np.float32)
    return QuantizedLayer(
        shape=shape,
        mask=torch.from_numpy(mask).reshape(shape),
        indices=torch.from_numpy(idx),
        codebook=torch.from_numpy(codebook),
    )


def h2(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pct_over(coded: float, entropy: float) -> str:
    return "-" if entropy <= 0 else f"{100 * (coded / entropy - 1):+.2f} %"


def size_row(
    model: str, layers: dict[str, QuantizedLayer], sparsity: float, bits: int, repeats: int
) -> str:
    data = encode_model(layers, {})
    decoded = decode_model(data)
    for name, q in layers.items():  # the benchmark also checks the round trip
        assert torch.equal(decoded.state_dict[name], q.dequantize()), name
    numel = sum(q.numel for q in layers.values())
    cols: list[str] = []
    for stream in ("positions", "indices"):
        infos = [s for s in decoded.streams if s.stream == stream]
        coded = sum(s.coded_bytes + s.model_bytes for s in infos)
        if stream == "positions":
            ent = sum(q.numel * h2(q.n_kept / q.numel) for q in layers.values()) / 8
        else:
            ent = (
                sum(
                    order0_entropy_bits(np.bincount(q.indices.numpy(), minlength=q.n_levels))
                    for q in layers.values()
                )
                / 8
            )
        coders = "/".join(s.coder for s in infos)
        cols += [coders, f"{coded:,}", f"{ent:,.0f}", pct_over(coded, ent)]
    t_enc = median_seconds(lambda: encode_model(layers, {}), repeats)
    t_dec = median_seconds(lambda: decode_model(data), repeats)
    ratio = 4 * numel / len(data)
    return (
        f"| {model} | {sparsity:.2f} | {bits} | {numel:,} | {len(data):,} | {ratio:.1f}x | "
        + " | ".join(cols)
        + f" | {numel / t_enc / 1e6:,.0f} | {numel / t_dec / 1e6:,.0f} |"
    )


def gaps_estimate(mask: np.ndarray) -> float:
    """Bytes of the alternative positions representation: gaps between survivors, coded at
    their order-0 entropy plus the stored histogram (as the ans coder would store it)."""
    pos = np.flatnonzero(mask)
    if pos.size == 0:
        return 0.0
    gaps = np.diff(pos, prepend=-1)
    counts = np.bincount(gaps)
    return order0_entropy_bits(counts) / 8 + table_bytes(choose_freqs(counts))


def positions_rows(repeats: int) -> list[str]:
    rows = []
    cases: list[tuple[str, QuantizedLayer]] = [
        (f"fc1 300x784 s={s}", quantized_layer((300, 784), s, 4, 7)) for s in SPARSITIES
    ] + [(f"fc3 10x100 s={s}", quantized_layer((10, 100), s, 4, 8)) for s in (0.5, 0.9)]
    rng = np.random.default_rng(9)
    rows_kept = rng.random(300) < 0.3  # 70 % of the rows pruned whole, the rest at random
    structured = np.outer(rows_kept, rng.random(784) < 0.6).reshape(-1)
    cases.append(
        (
            "fc1 structured rows",
            QuantizedLayer(
                (300, 784),
                torch.from_numpy(structured).reshape(300, 784),
                torch.zeros(int(structured.sum()), dtype=torch.int64),
                torch.zeros(1),
            ),
        )
    )
    for label, q in cases:
        mask = q.mask.reshape(-1).numpy()
        out = decode_model(encode_model({"w": q}, {}))
        pos = out.streams[0]
        rows.append(
            f"| {label} | {q.numel * h2(q.n_kept / q.numel) / 8:,.0f} | "
            f"{pos.coded_bytes + pos.model_bytes:,} ({pos.coder}) | {gaps_estimate(mask):,.0f} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer cases and repeats (smoke run)")
    args = ap.parse_args()
    repeats = 2 if args.quick else 5
    sparsities = (0.9,) if args.quick else SPARSITIES
    bits_grid = (4,) if args.quick else BITS

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"Command: `.venv/bin/python bench/bench_codec.py{' --quick' if args.quick else ''}`  ")
    print(f"Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}  ")
    print(
        f"Machine: {platform.platform()}, {platform.machine()}, nproc={os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f} at start  "
    )
    print(
        f"Python {sys.version.split()[0]}, numpy {np.__version__}, torch {torch.__version__}, "
        f"constriction {version('constriction')}, zstandard {version('zstandard')}  "
    )
    print()
    print(
        "Coded bytes include each stream's header model (the ANS histogram). Positions "
        "entropy: `numel * H2(density) / 8` (order-0 entropy of the mask bits); indices "
        "entropy: order-0 entropy of the level histogram. Speeds: whole-file "
        f"`encode_model` / `decode_model`, median of {repeats}, M weights/s."
    )
    print()
    print(
        "| model | sparsity | bits | weights | file bytes | vs fp32 | positions coder | "
        "positions bytes | positions H | over | indices coder | indices bytes | "
        "indices H | over | encode M/s | decode M/s |"
    )
    print("|" + "---|" * 16)
    for model, shapes in (("LeNet-300-100", LENET), ("synthetic 4M", BIG)):
        for s in sparsities:
            for b in bits_grid:
                layers = {
                    n: quantized_layer(sh, s, b, seed=i) for i, (n, sh) in enumerate(shapes.items())
                }
                print(size_row(model, layers, s, b, repeats), flush=True)
    print()
    print("Speed target (1M weights, 90 % sparse, 4 bits; goal >= 20 M weights/s each way):")
    print()
    print(
        "| model | sparsity | bits | weights | file bytes | vs fp32 | positions coder | "
        "positions bytes | positions H | over | indices coder | indices bytes | "
        "indices H | over | encode M/s | decode M/s |"
    )
    print("|" + "---|" * 16)
    print(
        size_row(
            "1024x1024",
            {"w.weight": quantized_layer(ONE_M["w.weight"], 0.9, 4, 3)},
            0.9,
            4,
            max(repeats, 5),
        )
    )
    print()
    print(
        "Positions representation: the packed mask as coded (coder kept) against the "
        "alternative, gaps between survivors at their order-0 entropy plus histogram:"
    )
    print()
    print("| layer | mask H (bytes) | mask coded (bytes) | gaps H + table (bytes) |")
    print("|---|---|---|---|")
    for row in positions_rows(repeats):
        print(row)


if __name__ == "__main__":
    main()
