"""Survivor masks of real solutions: the ans_mask coder against the generic coders.

For every file of a run (``RUN/refined/*.mcz``, or another ``--folder``; written by this
or an older codec) the file is decoded and encoded again by the current codec (and checked to decode
to the same tensors); its positions streams are compared with the cheapest generic coder
(const, raw, zstd, ans, ans_bits) of the same packed masks, header models included. The
re-encoded size is what the same model costs today, e.g. for files of runs made before
ans_mask existed.

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
import torch

from moecomp.codec import decode_model, encode_model, read_mcz
from moecomp.codec.masks import decode_mask, encode_mask
from moecomp.codec.streams import encode_stream


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--folder", default="refined",
                    help="subfolder of RUN with the .mcz files (bench: bench_compression's)")
    args = ap.parse_args()
    files = sorted((args.run / args.folder).glob("*.mcz"),
                   key=lambda p: (not p.stem[1:].isdigit(), p.stem.lstrip("r").zfill(9)))
    if not files:
        raise SystemExit(f"{args.run}/{args.folder} holds no .mcz files")
    print(f"# Masks of {args.run}: ans_mask vs generic coders\n")
    print(f"- command: `python bench/bench_masks.py {args.run} --folder {args.folder}`")
    print(f"- machine: {platform.machine()}, date {time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| file | bytes on disk | bytes now | masks, generic (bytes) | masks now (bytes) | "
          "masks saved | file saved |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    saved_file = []
    for path in files:
        model = read_mcz(path)
        dense = {k: v for k, v in model.state_dict.items() if k not in model.layers}
        blob = encode_model(model.layers, dense, plan=model.plan, meta=model.meta,
                            order=list(model.state_dict))
        again = decode_model(blob)
        assert all(torch.equal(again.state_dict[k], v) for k, v in model.state_dict.items())
        now = sum(s.coded_bytes + s.model_bytes for s in again.streams
                  if s.stream == "positions")
        generic = sum(encode_stream(np.packbits(q.mask.numpy().reshape(-1), bitorder="little"),
                                    256).cost for q in model.layers.values())
        size = len(blob)
        saved_file.append((generic - now) / (size + generic - now))
        print(f"| {path.stem} | {path.stat().st_size:,} | {size:,} | {generic:,} | {now:,} | "
              f"{1 - now / generic:.1%} | {saved_file[-1]:.1%} |")
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
