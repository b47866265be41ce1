"""Builders of hostile ``.mcz`` files: tiny files with valid CRCs and streams that decode
(or claim to decode) into as much output and work as their header lets them.

Shared by tests/codec/test_hostile.py (the fuzz test) and bench/bench_hostile.py (the worst
files at the default cap); written against the documented layout, not the encoder, except
where a stream must be genuinely valid (``encode_stream`` / ``encode_mask`` then make the
smallest payload that decodes to the crafted symbols).
"""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from typing import Any

import numpy as np
import zstandard

from moecomp.codec.masks import encode_mask
from moecomp.codec.streams import _encode_ans, encode_stream

PREFIX = struct.Struct("<4sHHII")


def mcz(entries: list[dict[str, Any]], payloads: list[bytes], *, plan: Any = None,
        zstd_header: bool = True) -> bytes:
    """A file from tensor entries whose streams lack ``offset``/``crc`` (filled in here, in
    order) and the streams' payloads, in the same order."""
    offset, it = 0, iter(payloads)
    for e in entries:
        for s in e["streams"]:
            p = next(it)
            s.update(offset=offset, length=len(p), crc=zlib.crc32(p))
            offset += len(p)
    header = {"plan": plan, "meta": {}, "payload_bytes": offset, "tensors": entries}
    raw = json.dumps(header, separators=(",", ":")).encode()
    stored = zstandard.ZstdCompressor(level=19).compress(raw) if zstd_header else raw
    prefix = PREFIX.pack(b"MCZ\x00", 1, int(zstd_header), len(stored), zlib.crc32(stored))
    return prefix + stored + b"".join(payloads)


def _stream(name: str, coder: str, n: int, alphabet: int, **params: Any) -> dict[str, Any]:
    return {"name": name, "coder": coder, "n": n, "alphabet": alphabet, **params}


def _codebook(k: int) -> str:
    return base64.b64encode(np.linspace(-1, 1, k, dtype="<f4").tobytes()).decode()


def quantized(name: str, shape: list[int], *, n_kept: int, positions: tuple[dict, bytes],
              indices: tuple[dict, bytes], levels: int = 1) -> tuple[dict, list[bytes]]:
    entry = {"name": name, "kind": "quantized", "shape": shape, "dtype": "float32",
             "n_kept": n_kept, "n_levels": levels, "codebook": _codebook(levels),
             "streams": [positions[0], indices[0]]}
    return entry, [positions[1], indices[1]]


def const_positions(numel: int, byte: int) -> tuple[dict, bytes]:
    return _stream("positions", "const", (numel + 7) // 8, 256, value=byte), b""


def const_indices(n: int, levels: int = 1) -> tuple[dict, bytes]:
    return _stream("indices", "const", n, levels, value=0), b""


def ans_indices(n: int, levels: int = 2) -> tuple[dict, bytes]:
    """``n`` indices, all 0 but the last: an ``ans`` stream of a few bytes that decodes to
    ``n`` symbols (the histogram gives 0 nearly all the mass)."""
    sym = np.zeros(n, dtype=np.int64)
    sym[-1] = 1
    cs = _encode_ans(sym, np.bincount(sym, minlength=levels))
    return _stream("indices", "ans", n, levels, **cs.params), cs.payload


def grid_positions(rows: int, cols: int, kind: str) -> tuple[dict, bytes, int]:
    """An ``ans_mask`` positions stream of a ``rows x cols`` mask, and its survivors.

    kind ``coded``: one survivor per row, always column 0 (every row is coded, and the model
    soon predicts it, so the bits cost almost nothing); ``empty``: no survivors (no row is
    coded; only the row counts are stored)."""
    m = np.zeros((rows, cols), dtype=bool)
    if kind == "coded":
        m[:, 0] = True
    cs = encode_mask(m)
    assert cs is not None, (rows, cols)
    entry = _stream("positions", cs.coder, cs.n, cs.alphabet, **cs.params)
    return entry, cs.payload, int(m.sum())


def crafted_grid(name: str, rows: int, cols: int, full: bool) -> tuple[dict, list[bytes]]:
    """An ``ans_mask`` stream written by hand (no ``grid_of`` limit on the writer's side): the
    row counts as one const stream (every row empty, or every row full) and no bits."""
    count = cols if full else 0
    params = {"grid": [rows, cols],
              "counts": {"coder": "const", "length": 0, "value": count}}
    entry = _stream("positions", "ans_mask", (rows * cols + 7) // 8, 256, **params)
    kept = rows * cols if full else 0
    return quantized(name, [rows, cols], n_kept=kept, positions=(entry, b""),
                     indices=const_indices(kept))


def grid_tensor(name: str, rows: int, cols: int, kind: str) -> tuple[dict, list[bytes]]:
    entry, payload, kept = grid_positions(rows, cols, kind)
    return quantized(name, [rows, cols], n_kept=kept, positions=(entry, payload),
                     indices=const_indices(kept))


def full_tensor(name: str, shape: list[int], *, ans: bool = False) -> tuple[dict, list[bytes]]:
    """Every weight kept (a const 0xFF mask), indices const or a few-byte ``ans`` stream."""
    numel = math.prod(shape)
    idx = ans_indices(numel) if ans else const_indices(numel)
    return quantized(name, shape, n_kept=numel, positions=const_positions(numel, 0xFF),
                     indices=idx, levels=2 if ans else 1)


def empty_tensor(name: str, shape: list[int]) -> tuple[dict, list[bytes]]:
    """No weight kept: a const mask, nothing else; decodes to ``numel`` float32 zeros."""
    numel = math.prod(shape)
    return quantized(name, shape, n_kept=0, positions=const_positions(numel, 0),
                     indices=const_indices(0))


def dense_zeros(name: str, shape: list[int], dtype: str = "float32",
                itemsize: int = 4) -> tuple[dict, list[bytes]]:
    """A dense tensor of zeros stored as one zstd frame (a few bytes per MiB)."""
    n = math.prod(shape) * itemsize
    frame = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(bytes(n))
    entry = {"name": name, "kind": "dense", "shape": shape, "dtype": dtype,
             "streams": [_stream("data", "zstd", n, 256)]}
    return entry, [frame]


def dense_tiny(name: str) -> tuple[dict, list[bytes]]:
    """An empty dense tensor: nothing to decode but its header entry."""
    return ({"name": name, "kind": "dense", "shape": [0], "dtype": "float32",
             "streams": [_stream("data", "const", 0, 256, value=0)]}, [b""])


def build(parts: list[tuple[dict, list[bytes]]], *, plan: Any = None) -> bytes:
    entries = [e for e, _ in parts]
    payloads = [p for _, ps in parts for p in ps]
    return mcz(entries, payloads, plan=plan)


def with_plan(parts: list[tuple[dict, list[bytes]]], layer: dict[str, Any]) -> bytes:
    """``build`` with a header plan giving every quantized tensor ``layer`` (for plan-value
    fuzzing: sparsity 2**32, bits 0 ...)."""
    names = [e["name"] for e, _ in parts if e["kind"] == "quantized"]
    return build(parts, plan={"layers": {n: layer for n in names}})


def stream_encode(symbols: np.ndarray, alphabet: int) -> tuple[dict, bytes]:
    cs = encode_stream(symbols, alphabet)
    return _stream("indices", cs.coder, cs.n, cs.alphabet, **cs.params), cs.payload
