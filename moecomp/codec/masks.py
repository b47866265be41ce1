"""The ``ans_mask`` coder: a survivor mask coded with each row's count and its columns' past.

A keep mask of a weight matrix (``rows = shape[0]``, ``cols`` = the other dimensions
flattened) is far from i.i.d.: some output units keep many inputs and some none, and an input
that no row uses tends to stay unused. The ``positions`` stream's generic coders
(``streams``) see packed bytes, i.e. only runs of 8 neighbouring inputs. This coder instead
stores

1. the survivor count ``R[i]`` of every row, as one ordinary stream (``encode_stream`` picks
   its coder; its parameters sit in this stream's ``counts`` entry), and
2. every bit of the rows that are neither empty nor full, with constriction's ANS coder and a
   Bernoulli model of its own per bit: ``P(m[i, j] = 1) = R[i] * w[j] / sum(w)``, where
   ``w[j] = c[j] * (i * cols + 2) + 2 * (t + 1)``, ``c[j]`` the ones of column ``j`` in rows
   ``0..i-1`` and ``t`` all ones in those rows: the column's rate so far, shrunk toward the
   overall rate so far (a Beta prior of strength 2), scaled to the row's known count.

Rows with ``R[i]`` equal to 0 or ``cols`` cost nothing beyond their count. The model is
computed from exact integers with one correctly rounded division per bit and quantised to
multiples of ``2**-16``, so encoder and decoder build bit-identical probabilities on any
IEEE-754 machine. The decoded stream is the same packed bytes (LSB first) as the generic
coders', so the container rebuilds the mask the same way whichever coder it finds.

Decoding is sequential in rows (a row's model depends on the rows above): one ANS call per
coded row, nothing for empty and full rows, at most ``MAX_ROWS`` rows; the container charges
each grid row against its ``max_bytes`` (``container.GRID_ROW_COST``).

On the masks of searched LeNet-300-100 solutions this is 5-10 % smaller than the generic
coders (whole files 3.5-6.5 %; ``bench/bench_masks.py``, 2026-11-22). The container keeps
whichever coder is cheaper, so i.i.d.-looking masks stay with ``ans_bits``.
"""

from __future__ import annotations

import math
from typing import Any

import constriction
import numpy as np

from moecomp.codec.streams import PARAMS, CodedStream, decode_stream, encode_stream
from moecomp.errors import CodecError

MASK_CODER = "ans_mask"
PROB_BITS = 16
"""Probabilities are multiples of ``2**-PROB_BITS`` in ``[2**-PROB_BITS, 1 - 2**-PROB_BITS]``."""
MAX_COLS = 2**16 - 1
"""Widest row this coder takes (its counts stream's alphabet is ``cols + 1``)."""
MAX_ROWS = 2**16 - 1
"""Most rows this coder takes: the decoder steps through coded rows one at a time (a row
depends on the ones above), so their number is bounded; taller masks use the generic
coders (none of the zoo's layers comes near)."""
MAX_EXACT = 2**53
"""The model's integers must stay exact in float64; larger matrices use the generic coders."""
DISPERSION = 2.0
"""The coder is tried only when the row or the column counts vary at least this many times
more than those of an i.i.d. mask of the same density (binomial variance); below that its
gain is a fraction of a percent and the attempt would halve the encoder's speed."""


def grid_of(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(rows, cols)`` of a tensor's mask, or None when this coder does not apply (fewer
    than 2 rows or columns, more than ``MAX_ROWS`` rows or ``MAX_COLS`` columns, or a model
    beyond exact float64)."""
    if len(shape) < 2:
        return None
    rows = int(shape[0])
    cols = math.prod(shape[1:])
    if not 2 <= rows <= MAX_ROWS or not 2 <= cols <= MAX_COLS:
        return None
    # largest term R * w: cols * (rows * (rows * cols + 2) + 2 * (rows * cols + 1))
    if cols * (rows * (rows * cols + 2) + 2 * (rows * cols + 1)) >= MAX_EXACT:
        return None
    return rows, cols


def worth_trying(mask: np.ndarray) -> bool:
    """Whether a 2-D mask is structured enough for this coder to beat the generic ones:
    rows or columns overdispersed by ``DISPERSION`` against i.i.d. bits (one pass, cheap)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2 or grid_of(m.shape) is None:
        return False
    rows, cols = m.shape
    p = np.count_nonzero(m) / m.size
    if p in (0.0, 1.0):
        return False
    var = p * (1.0 - p)
    spread_rows = m.sum(axis=1, dtype=np.int64).var() / (cols * var)
    spread_cols = m.sum(axis=0, dtype=np.int64).var() / (rows * var)
    return bool(max(spread_rows, spread_cols) >= DISPERSION)


BLOCK_ELEMENTS = 2**20
"""The encoder works on blocks of whole rows of about this many bits (bounded memory)."""
DECODE_CHUNK = 4096
"""The decoder prepares the per-row terms of this many rows at a time (bounded memory)."""


def _blocks(mask: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    """Row blocks ``(r0, r1, ones per column in rows 0..r0-1)`` covering the mask."""
    rows, cols = mask.shape
    step = max(1, BLOCK_ELEMENTS // cols)
    out, col = [], np.zeros(cols, dtype=np.int64)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        out.append((r0, r1, col.copy()))
        col += mask[r0:r1].sum(axis=0, dtype=np.int64)
    return out


def _ones_before(counts: np.ndarray) -> np.ndarray:
    """Survivors in the rows above each row ``(rows,)`` int64 (exclusive prefix sum)."""
    return np.cumsum(counts) - counts


def _row_terms(counts: np.ndarray, ones_before: np.ndarray, r0: int, r1: int,
               cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's per-row integers for rows ``r0..r1-1``, as exact float64: ``a = i * cols +
    2``, ``b = 2 * (t + 1)`` and ``sum(w) = a * t + b * cols`` (``t`` = ones above), so that
    ``P = (c * a + b) * R / sum(w)`` for a column with ``c`` ones above."""
    t = ones_before[r0:r1].astype(np.float64)
    a = np.arange(r0, r1, dtype=np.float64) * cols + 2
    b = 2 * (t + 1)
    return a, b, a * t + b * cols


def _block_probs(mask: np.ndarray, counts: np.ndarray, ones_before: np.ndarray, r0: int,
                 r1: int, col_start: np.ndarray) -> np.ndarray:
    """P(bit = 1) ``(r1 - r0, cols)`` of rows ``r0..r1-1`` (float64, multiples of 2**-16).

    counts, ones_before: per row, survivors and survivors above (``_ones_before``);
    col_start: int64 ``(cols,)`` ones per column in rows ``0..r0-1``. Row ``i`` depends only
    on the rows above it, so the decoder calls this one row at a time (``r1 = r0 + 1``; the
    row's own bits are not read) and gets the encoder's values bit for bit: exact integers in
    float64 and one correctly rounded division per bit, whatever the block.
    """
    cols = mask.shape[1]
    blk = mask[r0:r1]
    w = np.cumsum(blk, axis=0, dtype=np.float64)  # integers, exact
    w -= blk
    w += col_start  # ones per column in the rows above
    a, b, total = _row_terms(counts, ones_before, r0, r1, cols)
    scale = float(2**PROB_BITS)
    w *= a[:, None]
    w += b[:, None]
    w *= (counts[r0:r1].astype(np.float64) * scale)[:, None]
    w /= total[:, None]
    np.floor(w, out=w)
    np.clip(w, 1.0, scale - 1.0, out=w)
    w /= scale
    return w


def _row_probs(col: np.ndarray, col_add: float, a: float, b: float, r_scaled: float,
               total: float, scale: float) -> np.ndarray:
    """``_block_probs`` of one row, given ``col + col_add`` ones per column in the rows above
    (``col`` float64 holding integers) and the row's terms: the same float64 operations in
    the same order, so the same bits. Called once per coded row by the decoder, so it is
    written as a few in-place ufunc calls (``np.clip`` alone cost more than all of them)."""
    w = col + col_add
    w *= a
    w += b
    w *= r_scaled
    w /= total
    np.floor(w, out=w)
    np.maximum(w, 1.0, out=w)
    np.minimum(w, scale - 1.0, out=w)
    w /= scale
    return w


def _coded_rows(counts: np.ndarray, cols: int) -> np.ndarray:
    """Rows whose bits are coded: neither empty nor full."""
    return (counts > 0) & (counts < cols)


def mask_cost_bits(mask: np.ndarray) -> float:
    """Code length in bits of the mask bits under this model (counts not included), for the
    search's size estimate: computed in float32 and without the coder's rounding of each
    probability to 2**-16 (within about 0.01 % of the exact ideal; tested), since it runs
    once per layer and pruned count on the evaluation path."""
    m = np.asarray(mask, dtype=bool)
    cols = m.shape[1]
    counts = m.sum(axis=1, dtype=np.int64)
    coded = _coded_rows(counts, cols)
    ones_before = _ones_before(counts)
    lo = np.float32(2.0**-PROB_BITS)
    bits = 0.0
    for r0, r1, col in _blocks(m):
        blk = m[r0:r1]
        p = np.cumsum(blk, axis=0, dtype=np.float32)
        p -= blk
        p += col.astype(np.float32)
        a, b, total = _row_terms(counts, ones_before, r0, r1, cols)
        scaled = counts[r0:r1] / total  # P = c * (a R / sum) + b R / sum
        p *= (a * scaled).astype(np.float32)[:, None]
        p += (b * scaled).astype(np.float32)[:, None]
        np.clip(p, lo, 1 - lo, out=p)
        q = np.where(blk, p, 1 - p)[coded[r0:r1]]
        bits -= float(np.log2(q).sum(dtype=np.float64))
    return bits


def _stream(rows: int, cols: int, counts: CodedStream, bits: bytes) -> CodedStream:
    """The ``ans_mask`` stream: the counts stream's payload, then the bits; its entry nested."""
    sub = {"coder": counts.coder, "length": len(counts.payload), **counts.params}
    return CodedStream(MASK_CODER, (rows * cols + 7) // 8, 256, counts.payload + bits,
                       {"grid": [rows, cols], "counts": sub})


def estimate_mask_bytes(mask: np.ndarray) -> tuple[int, int] | None:
    """``(payload bytes, header model bytes)`` an ``ans_mask`` stream of this 2-D mask would
    take, without running the bit coder (its ANS lands within a few bytes of the ideal code
    length); None when ``grid_of`` refuses the shape. The search's size estimate uses it."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2 or grid_of(m.shape) is None:
        return None
    counts = encode_stream(m.sum(axis=1, dtype=np.int64), m.shape[1] + 1)
    bits = math.ceil(mask_cost_bits(m) / 32) * 4  # whole 32-bit ANS words
    rows, cols = m.shape
    return len(counts.payload) + bits, _stream(rows, cols, counts, b"").model_bytes


def encode_mask(mask: np.ndarray) -> CodedStream | None:
    """Code a 2-D bool mask ``(rows, cols)``; None when ``grid_of`` refuses its shape.

    The result decodes (``decode_mask``) to ``np.packbits(mask.reshape(-1), bitorder=
    "little")``, i.e. it is a ``positions`` stream of ``ceil(rows * cols / 8)`` bytes.
    """
    m = np.ascontiguousarray(mask, dtype=bool)
    if m.ndim != 2 or grid_of(m.shape) is None:
        return None
    rows, cols = m.shape
    counts = m.sum(axis=1, dtype=np.int64)
    coded = _coded_rows(counts, cols)
    ones_before = _ones_before(counts)
    payload = b""
    if coded.any():
        coder = constriction.stream.stack.AnsCoder()
        family = constriction.stream.model.Bernoulli(perfect=False)
        # a stack coder: the last block goes in first so that decoding runs forward
        for r0, r1, col in reversed(_blocks(m)):
            keep = coded[r0:r1]
            if keep.any():
                probs = _block_probs(m, counts, ones_before, r0, r1, col)[keep].reshape(-1)
                coder.encode_reverse(m[r0:r1][keep].reshape(-1).astype(np.int32), family,
                                     probs)
        payload = bytes(coder.get_compressed().astype("<u4", copy=False).tobytes())
    return _stream(rows, cols, encode_stream(counts, cols + 1), payload)


def _grid_param(params: dict[str, Any], n: int) -> tuple[int, int]:
    grid = params.get("grid")
    if (not isinstance(grid, list) or len(grid) != 2
            or not all(type(g) is int and g >= 0 for g in grid)):
        raise CodecError(f"{MASK_CODER} stream needs 'grid', two non-negative integers")
    rows, cols = grid
    if (rows * cols + 7) // 8 != n or grid_of((rows, cols)) is None:
        raise CodecError(f"{MASK_CODER} stream grid {rows}x{cols} does not fit {n} bytes of "
                         "positions or is outside what the coder takes")
    return rows, cols


def _counts_param(params: dict[str, Any], payload_len: int) -> tuple[str, int, dict[str, Any]]:
    sub = params.get("counts")
    if not isinstance(sub, dict) or set(sub) - {"coder", "length", *PARAMS}:
        raise CodecError(f"{MASK_CODER} stream needs 'counts', the row-count stream's entry")
    coder, length = sub.get("coder"), sub.get("length")
    if not isinstance(coder, str) or type(length) is not int or not 0 <= length <= payload_len:
        raise CodecError(f"{MASK_CODER} stream 'counts' needs a coder and a length within "
                         f"the {payload_len}-byte payload")
    return coder, length, {k: v for k, v in sub.items() if k in PARAMS}


def decode_mask(payload: bytes | memoryview, n: int, params: dict[str, Any]) -> np.ndarray:
    """The packed mask bytes ``(n,)`` uint8 of an ``ans_mask`` stream; ``CodecError`` on any
    inconsistency (grid, counts, corrupt bits, a row whose bits disagree with its count)."""
    rows, cols = _grid_param(params, n)
    coder_name, length, sub = _counts_param(params, len(payload))
    view = memoryview(payload)
    counts = decode_stream(view[:length], coder=coder_name, n=rows, alphabet=cols + 1,
                           params=sub)  # uint8/uint16: 1-2 bytes a row whatever the grid
    rest = view[length:]
    if len(rest) % 4:
        raise CodecError(f"{MASK_CODER} stream: bit payload of {len(rest)} bytes is not a "
                         "multiple of 4")
    mask = np.zeros((rows, cols), dtype=bool)
    mask[counts == cols] = True  # full rows; empty rows stay zero: neither is coded
    c = np.zeros(cols, dtype=np.float64)  # ones per column in the coded rows decoded so far
    family = constriction.stream.model.Bernoulli(perfect=False)
    scale = float(2**PROB_BITS)
    ones_above = full_above = 0  # survivors, and full rows, in the rows before the chunk
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(rest, dtype="<u4")
                                                   .astype(np.uint32))
        # Chunks of rows keep the per-row terms small (a few arrays of DECODE_CHUNK); only
        # coded rows cost a step, and the ones a full row adds to every column enter through
        # ``full_above`` instead of a pass per row.
        for r0 in range(0, rows, DECODE_CHUNK):
            r1 = min(rows, r0 + DECODE_CHUNK)
            cnt = counts[r0:r1].astype(np.int64)
            full = cnt == cols
            coded = np.flatnonzero((cnt > 0) & ~full)
            before = np.cumsum(cnt) - cnt + ones_above
            fulls = np.cumsum(full) - full + full_above
            ones_above += int(cnt.sum())
            full_above += int(full.sum())
            if not coded.size:
                continue
            # _row_terms of rows r0..r1-1 (the same operations, so the same floats)
            t = before.astype(np.float64)
            a = np.arange(r0, r1, dtype=np.float64) * cols + 2
            b = 2 * (t + 1)
            total = a * t + b * cols
            rows_k = (coded + r0).tolist()
            terms = zip(rows_k, fulls[coded].astype(np.float64).tolist(), a[coded].tolist(),
                        b[coded].tolist(), (cnt[coded] * scale).tolist(),
                        total[coded].tolist(), cnt[coded].tolist(), strict=True)
            for i, f_above, ai, bi, ri, ti, want in terms:
                probs = _row_probs(c, f_above, ai, bi, ri, ti, scale)
                bits = coder.decode(family, probs)
                kept = int(np.count_nonzero(bits))
                if kept != want or bits.shape != (cols,):
                    raise CodecError(f"{MASK_CODER} stream: row {i} decodes to {kept} "
                                     f"survivors, its count says {want}")
                mask[i] = bits
                c += bits
        leftover = not coder.is_empty()
    except CodecError:
        raise
    except Exception as e:  # constriction's errors on corrupt input come in assorted types
        raise CodecError(f"{MASK_CODER} stream is corrupt: {type(e).__name__}: {e}") from None
    if leftover:
        raise CodecError(f"{MASK_CODER} stream has data left after its last row")
    return np.packbits(mask.reshape(-1), bitorder="little")
