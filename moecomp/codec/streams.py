"""Entropy coding of one integer stream: the coders a .mcz file may name per stream.

A *stream* is a 1-D array of ``n`` integer symbols in ``[0, alphabet)``. Each stream is coded
with every allowed coder and the cheapest result is kept (payload plus the model that must be
stored in the header to decode it):

- ``const``: every symbol equals ``value`` (or the stream is empty); no payload at all.
- ``raw``: the symbols as little-endian ``uint8`` (alphabet <= 256) or ``uint16``.
- ``zstd``: the ``raw`` bytes compressed by zstandard (catches runs and repeats).
- ``ans``: constriction's ANS stack coder (32-bit words, 24-bit probabilities) with an i.i.d.
  ``Categorical(perfect=False)`` model built from the stream's histogram. The histogram is
  stored in the header, quantised to the total (2**4..2**16 counts) that minimises estimated
  payload plus table bytes, with trailing zero counts dropped: small streams get a coarse,
  short table, large ones a precise one. Codes within a fraction of a percent of the order-0
  entropy on large streams.
- ``ans_bits`` (byte streams only, alphabet 256): the same ANS coder, but each byte's model is
  that of 8 i.i.d. bits, ``P(b) ~ f1**popcount(b) * f0**(8 - popcount(b))``, from the stored
  2-entry bit histogram ``[f0, f1]``. This is the order-0 code of a bit mask (the survivor
  positions) at one ANS step per 8 bits and with a table of two numbers, so it stays at the
  entropy on small layers where a 256-entry byte histogram would cost more than it saves.

Decoding trusts nothing: every failure of the libraries on bad input becomes a ``CodecError``,
and no function allocates more than ``n`` symbols, which the caller has bounded.
``zstd_compress`` / ``zstd_decompress`` (bounded) also serve the container's compressed header.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import constriction
import numpy as np
import zstandard

from moecomp.errors import CodecError

CODERS: tuple[str, ...] = ("const", "raw", "zstd", "ans", "ans_bits")
"""Every coder a stream may name; also the preference order when two costs tie."""
PARAMS: tuple[str, ...] = ("value", "freqs", "bits", "grid", "counts")
"""Header keys of coder parameters: const's value, ans's histogram, ans_bits' bit histogram,
and the ``ans_mask`` coder's matrix shape and row-count stream (``codec.masks``)."""
MAX_ALPHABET = 2**16
"""Largest alphabet a stream may declare (symbols are stored in at most 16 bits)."""
FREQ_TOTALS = tuple(2**b for b in range(4, 17))
"""Totals a stored histogram may be rescaled to; the cheapest (estimated) is kept."""
MAX_FREQ = 2**32
"""Largest single histogram entry a decoder accepts."""
ZSTD_LEVEL = 3
"""zstd level: higher levels cost much more time for ~1 % on these streams (bench_codec)."""


@dataclass(frozen=True)
class CodedStream:
    """One coded stream: what the header records plus the payload bytes.

    coder: one of ``CODERS``.
    n: number of symbols.
    alphabet: symbols lie in ``[0, alphabet)``.
    payload: the coded bytes (empty for ``const``).
    params: coder parameters stored in the header: ``{"value": int}`` for ``const``,
        ``{"freqs": list[int]}`` (at most ``alphabet`` long) for ``ans``,
        ``{"bits": [f0, f1]}`` for ``ans_bits``, ``{}`` otherwise.
    """

    coder: str
    n: int
    alphabet: int
    payload: bytes
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def model_bytes(self) -> int:
        """Bytes the coder's parameters take in the JSON header (the ANS histogram)."""
        return len(json.dumps(self.params, separators=(",", ":"))) if self.params else 0

    @property
    def cost(self) -> int:
        """Total bytes this stream costs in the file: payload plus header model."""
        return len(self.payload) + self.model_bytes


# --- pure helpers ------------------------------------------------------------------------
def symbol_dtype(alphabet: int) -> np.dtype[Any]:
    """Little-endian storage dtype of ``raw``/``zstd`` symbols for an alphabet size."""
    return np.dtype("<u1") if alphabet <= 256 else np.dtype("<u2")


def bits_for(n_levels: int) -> int:
    """Index bits of a codebook with ``n_levels`` entries: ``ceil(log2(n_levels))``, 0 for <= 1."""
    return math.ceil(math.log2(n_levels)) if n_levels > 1 else 0


def order0_entropy_bits(counts: np.ndarray) -> float:
    """Order-0 (empirical) entropy in bits of a whole stream with histogram ``counts``."""
    c = np.asarray(counts, dtype=np.float64)
    total = float(c.sum())
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(c[c > 0] * np.log2(p)).sum())


def quantize_freqs(counts: np.ndarray, *, total: int) -> np.ndarray:
    """Histogram ``counts: (alphabet,)`` rescaled to about ``total`` counts for the header.

    Symbols that occur keep a count >= 1, so every one of them stays codable; absent symbols
    stay 0. Histograms already at or below ``total`` are returned unchanged (exact).
    """
    c = np.asarray(counts, dtype=np.int64)
    s = int(c.sum())
    if s <= total:
        return c
    q = np.rint(c * (total / s)).astype(np.int64)
    return np.where(c > 0, np.maximum(q, 1), 0)


def _categorical(weights: np.ndarray) -> Any:
    # Encoder and decoder must build bit-identical models on any machine: the weights are
    # exact integers or correctly rounded floats, math.fsum is correctly rounded (numpy's sum
    # order may vary between builds), and one IEEE division normalises them.
    probs = np.asarray(weights, dtype=np.float64)
    return constriction.stream.model.Categorical(probs / math.fsum(probs.tolist()), perfect=False)


_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.int64)


def bit_byte_weights(f0: int, f1: int) -> np.ndarray:
    """Unnormalised probabilities ``(256,)`` of a byte of 8 i.i.d. bits, P(bit=1) = f1/(f0+f1).

    Computed with exact Python integers, then rounded once to float64, so every platform
    builds the same model from the same header.
    """
    by_popcount = np.array([float(f1**k * f0 ** (8 - k)) for k in range(9)])
    return by_popcount[_POPCOUNT]


def bit_counts(byte_counts: np.ndarray) -> np.ndarray:
    """Histogram ``[zeros, ones]`` of the bits of a byte stream with histogram ``(256,)``."""
    c = np.asarray(byte_counts, dtype=np.int64)
    ones = int((c * _POPCOUNT).sum())
    return np.array([8 * int(c.sum()) - ones, ones], dtype=np.int64)


# --- coders ------------------------------------------------------------------------------
def choose_freqs(counts: np.ndarray) -> np.ndarray:
    """The histogram to store for ``counts: (alphabet,)``: quantised to the total in
    ``FREQ_TOTALS`` (or kept exact) that minimises estimated payload + table bytes, trailing
    zeros dropped. Symbols that occur keep a count >= 1, so at least two entries are non-zero
    when at least two symbols occur."""
    c = np.asarray(counts, dtype=np.int64)
    present = np.flatnonzero(c)
    c = c[: int(present[-1]) + 1] if present.size else c[:0]
    s = int(c.sum())
    totals = [t for t in FREQ_TOTALS if t < s] + [s]  # the last one keeps the counts exact
    # All candidate tables at once, one row per total: (n_totals, len(c)).
    q = np.rint(c[None, :] * (np.array(totals, dtype=np.float64)[:, None] / max(s, 1)))
    q = np.where(c > 0, np.maximum(q, 1), 0).astype(np.int64)
    q[-1] = c
    p = q[:, present] / q.sum(axis=1, keepdims=True)
    payload_bits = -(c[present] * np.log2(p)).sum(axis=1)
    est = payload_bits / 8 + _table_bytes_rows(q)
    return np.asarray(q[int(np.argmin(est))])


_POW10 = 10 ** np.arange(1, 19, dtype=np.int64)


def _table_bytes_rows(q: np.ndarray) -> np.ndarray:
    """``table_bytes`` of each row of ``q: (rows, length)``."""
    digits = np.searchsorted(_POW10, q, side="right").sum(axis=1) + q.shape[1]
    return digits + max(q.shape[1] - 1, 0) + 2


def table_bytes(freqs: np.ndarray) -> int:
    """Characters of ``freqs`` (non-negative integers) written as a JSON list."""
    return int(_table_bytes_rows(np.asarray(freqs, dtype=np.int64).reshape(1, -1))[0])


def _ans_payload(symbols: np.ndarray, weights: np.ndarray) -> bytes:
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.ascontiguousarray(symbols, dtype=np.int32), _categorical(weights))
    return bytes(coder.get_compressed().astype("<u4", copy=False).tobytes())


def _encode_ans(symbols: np.ndarray, counts: np.ndarray) -> CodedStream:
    freqs = choose_freqs(counts)
    payload = _ans_payload(symbols, freqs)
    return CodedStream("ans", len(symbols), len(counts), payload, {"freqs": freqs.tolist()})


def _encode_ans_bits(symbols: np.ndarray, counts: np.ndarray) -> CodedStream:
    f0, f1 = (int(f) for f in choose_freqs(bit_counts(counts)))
    payload = _ans_payload(symbols, bit_byte_weights(f0, f1))
    return CodedStream("ans_bits", len(symbols), 256, payload, {"bits": [f0, f1]})


def encode_stream(
    symbols: np.ndarray, alphabet: int, *, coders: tuple[str, ...] = CODERS
) -> CodedStream:
    """Code ``symbols: (n,)`` (integers in ``[0, alphabet)``) with the cheapest of ``coders``.

    ``const`` is always used for an empty or single-valued stream. Raises ``CodecError`` if a
    symbol lies outside the alphabet or the alphabet exceeds ``MAX_ALPHABET``.
    """
    if not 0 <= alphabet <= MAX_ALPHABET:
        raise CodecError(f"alphabet {alphabet} outside 0..{MAX_ALPHABET}")
    sym = np.asarray(symbols).reshape(-1)
    n = int(sym.size)
    if n == 0:
        return CodedStream("const", 0, alphabet, b"", {"value": 0})
    if sym.dtype.kind not in "iu":
        raise CodecError(f"stream symbols must be integers, got dtype {sym.dtype}")
    lo, hi = int(sym.min()), int(sym.max())
    if lo < 0 or hi >= alphabet:
        raise CodecError(f"stream symbols span {lo}..{hi}, outside alphabet 0..{alphabet - 1}")
    if lo == hi:
        return CodedStream("const", n, alphabet, b"", {"value": lo})
    raw = np.ascontiguousarray(sym, dtype=symbol_dtype(alphabet)).tobytes()
    candidates: list[CodedStream] = []
    if "raw" in coders:
        candidates.append(CodedStream("raw", n, alphabet, raw))
    if "zstd" in coders:
        candidates.append(CodedStream("zstd", n, alphabet, zstd_compress(raw, level=ZSTD_LEVEL)))
    if "ans" in coders or "ans_bits" in coders:
        counts = np.bincount(sym, minlength=alphabet)
        if "ans" in coders:
            candidates.append(_encode_ans(sym, counts))
        if "ans_bits" in coders and alphabet == 256:
            candidates.append(_encode_ans_bits(sym, counts))
    if not candidates:  # none of the asked-for coders fits this stream: raw always does
        candidates.append(CodedStream("raw", n, alphabet, raw))
    # min() keeps the first of equal costs, i.e. the simplest coder in CODERS order.
    return min(candidates, key=lambda c: c.cost)


def decode_stream(
    payload: bytes | memoryview, *, coder: str, n: int, alphabet: int, params: dict[str, Any]
) -> np.ndarray:
    """Symbols ``(n,)`` of dtype ``symbol_dtype(alphabet)`` from a coded stream.

    The caller must have bounded ``n``; every inconsistency in the stream (payload length,
    parameters, library errors, symbols outside the alphabet, leftover data) raises
    ``CodecError``.
    """
    if not 0 <= alphabet <= MAX_ALPHABET:
        raise CodecError(f"alphabet {alphabet} outside 0..{MAX_ALPHABET}")
    if n < 0:
        raise CodecError(f"negative symbol count {n}")
    dtype = symbol_dtype(alphabet)
    if coder == "const":
        return _decode_const(payload, n, alphabet, params, dtype)
    if n == 0:
        raise CodecError(f"empty stream must use the const coder, not {coder!r}")
    if coder == "raw":
        out = _from_bytes(payload, n, dtype)
    elif coder == "zstd":
        out = _from_bytes(zstd_decompress(payload, n * dtype.itemsize), n, dtype)
    elif coder == "ans":
        out = _decode_ans(payload, n, _ans_freqs(params, alphabet)).astype(dtype)
    elif coder == "ans_bits":
        out = _decode_ans(payload, n, _ans_bits_weights(params, alphabet)).astype(dtype)
    else:
        raise CodecError(f"unknown coder {coder!r}; known: {', '.join(CODERS)}")
    if alphabet < 2 ** (8 * dtype.itemsize) and int(out.max()) >= alphabet:
        raise CodecError(f"decoded symbol {int(out.max())} outside alphabet 0..{alphabet - 1}")
    return out


def _decode_const(
    payload: bytes | memoryview,
    n: int,
    alphabet: int,
    params: dict[str, Any],
    dtype: np.dtype[Any],
) -> np.ndarray:
    if len(payload):
        raise CodecError(f"const stream carries {len(payload)} payload bytes, expected 0")
    value = params.get("value")
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(f"const stream value must be an integer, got {value!r}")
    if n > 0 and not 0 <= value < alphabet:
        raise CodecError(f"const stream value {value} outside alphabet 0..{alphabet - 1}")
    return np.full(n, value, dtype=dtype)


def _from_bytes(buf: bytes | memoryview, n: int, dtype: np.dtype[Any]) -> np.ndarray:
    if len(buf) != n * dtype.itemsize:
        raise CodecError(f"stream holds {len(buf)} bytes, expected {n * dtype.itemsize}")
    return np.frombuffer(buf, dtype=dtype).astype(dtype.newbyteorder("="))


def zstd_compress(data: bytes, *, level: int) -> bytes:
    """One zstd frame of ``data`` that states its content size, as ``zstd_decompress`` needs."""
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def zstd_decompress(frame: bytes | memoryview, size: int, *, exact: bool = True) -> bytes:
    """The content of one zstd frame: exactly ``size`` bytes, or at most ``size`` when not
    ``exact`` (the frame must state its content size either way).

    Used for ``zstd`` streams and for the compressed ``.mcz`` header. A frame that claims a
    wrong or too large size is refused before anything is allocated; no valid frame header, an
    unstated size, corrupt data or trailing bytes raise ``CodecError`` too.
    """
    # python-zstandard sizes its output from the frame header and ignores max_output_size
    # when the header states a size, so the claimed size is checked before decompressing.
    try:
        claimed = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise CodecError(f"zstd frame has no valid frame header: {e}") from None
    if claimed < 0:
        raise CodecError("zstd frame does not state its content size")
    if exact and claimed != size:
        raise CodecError(f"zstd frame claims {claimed} bytes, expected {size}")
    if claimed > size:
        raise CodecError(f"zstd frame claims {claimed} bytes, over the limit of {size}")
    try:
        out = zstandard.ZstdDecompressor().decompress(
            frame, max_output_size=claimed, allow_extra_data=False
        )
    except zstandard.ZstdError as e:
        raise CodecError(f"zstd frame is corrupt: {e}") from None
    if len(out) != claimed:
        raise CodecError(f"zstd frame decoded to {len(out)} bytes, it claims {claimed}")
    return out


def _ans_freqs(params: dict[str, Any], alphabet: int) -> np.ndarray:
    freqs = params.get("freqs")
    if not isinstance(freqs, list) or not 2 <= len(freqs) <= alphabet:
        raise CodecError(f"ans stream needs 'freqs', a list of 2..{alphabet} counts")
    if not all(type(f) is int and 0 <= f <= MAX_FREQ for f in freqs):
        raise CodecError(f"ans stream 'freqs' must be integers in 0..{MAX_FREQ}")
    if sum(1 for f in freqs if f > 0) < 2:
        raise CodecError("ans stream 'freqs' must give at least two symbols a count")
    return np.array(freqs, dtype=np.int64)


def _ans_bits_weights(params: dict[str, Any], alphabet: int) -> np.ndarray:
    bits = params.get("bits")
    if alphabet != 256:
        raise CodecError(f"ans_bits codes bytes (alphabet 256), not alphabet {alphabet}")
    if (
        not isinstance(bits, list)
        or len(bits) != 2
        or not all(type(f) is int and 1 <= f <= MAX_FREQ for f in bits)
    ):
        raise CodecError(f"ans_bits stream needs 'bits', two integers in 1..{MAX_FREQ}")
    return bit_byte_weights(bits[0], bits[1])


def _decode_ans(payload: bytes | memoryview, n: int, weights: np.ndarray) -> np.ndarray:
    if len(payload) % 4:
        raise CodecError(f"ans stream length {len(payload)} is not a multiple of 4")
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    # constriction is a Rust extension whose errors on bad input surface as assorted Python
    # exception types (ValueError, KeyError, TypeError...); any of them means a corrupt stream.
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        out = np.asarray(coder.decode(_categorical(weights), n))
        leftover = not coder.is_empty()
    except Exception as e:
        raise CodecError(f"ans stream is corrupt: {type(e).__name__}: {e}") from None
    if leftover:
        raise CodecError("ans stream has data left after its last symbol")
    if out.shape != (n,):
        raise CodecError(f"ans stream decoded {out.shape} symbols, expected {n}")
    return out
