"""Survivor masks of real solutions: the ans_mask coder against the generic coders.

For every refined solution of a run (``RUN/refined/r*.mcz``) and every compressed tensor,
the positions stream as the file holds it (the codec keeps the cheaper of ans_mask and the
generic coders) against the cheapest generic coder (const, raw, zstd, ans, ans_bits) of the
same packed mask; sizes include each stream's header model. Files are decoded, not trusted.

Then the coder's speed on a structured 4096 x 4096 mask (rows and columns of gamma-distributed
rates, 10 % kept), median of 3.

Run: .venv/bin/python bench/bench_masks.py runs/bench-fashion-lenet300-size
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from moecomp.codec import read_mcz
from moecomp.codec.masks import decode_mask, encode_mask, grid_of
from moecomp.codec.streams import encode_stream


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    args = ap.parse_args()
    files = sorted((args.run / "refined").glob("r*.mcz"), key=lambda p: int(p.stem[1:]))
    if not files:
        raise SystemExit(f"{args.run}/refined holds no .mcz files")
    print(f"# Masks of {args.run}: ans_mask vs generic coders\n")
    print(f"- command: `python bench/bench_masks.py {args.run}`")
    print(f"- machine: {platform.machine()}, date {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| file | file bytes | masks, generic (bytes) | masks, as stored (bytes) | "
          "masks saved | file saved |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    saved_file = []
    for path in files:
        model = read_mcz(path)
        generic = stored = 0
        for layer in model.layers.values():
            mask = layer.mask.numpy().reshape(-1)
            plain = encode_stream(np.packbits(mask, bitorder="little"), 256)
            grid = grid_of(layer.shape)
            by_rows = encode_mask(mask.reshape(grid)) if grid is not None else None
            generic += plain.cost
            stored += min(plain.cost, by_rows.cost) if by_rows is not None else plain.cost
        size = path.stat().st_size
        saved_file.append((generic - stored) / (size + generic - stored))
        print(f"| {path.stem} | {size:,} | {generic:,} | {stored:,} | "
              f"{1 - stored / generic:.1%} | {saved_file[-1]:.1%} |")
    print(f"\nmedian file saving: {np.median(saved_file):.1%} over {len(files)} files")
    speed()


def speed(n: int = 4096, repeats: int = 3) -> None:
    rng = np.random.default_rng(0)
    p = np.outer(rng.gamma(0.7, 1.0, n), rng.gamma(0.5, 1.0, n))
    mask = rng.random((n, n)) < np.clip(p * 0.1 / p.mean(), 0, 1)
    enc, dec = [], []
    cost = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        cs = encode_mask(mask)
        t1 = time.perf_counter()
        assert cs is not None
        decode_mask(cs.payload, cs.n, cs.params)
        cost = cs.cost
        enc.append(t1 - t0)
        dec.append(time.perf_counter() - t1)
    generic = encode_stream(np.packbits(mask.reshape(-1), bitorder="little"), 256)
    print(f"structured {n}x{n} mask, {mask.mean():.1%} kept: ans_mask {cost:,} bytes vs "
          f"generic {generic.cost:,} ({generic.coder}); encode {np.median(enc):.2f} s "
          f"({mask.size / np.median(enc) / 1e6:.0f} M bits/s), decode {np.median(dec):.2f} s "
          f"({mask.size / np.median(dec) / 1e6:.0f} M bits/s)")


if __name__ == "__main__":
    main()
