"""The coded-size model: the bytes of the ``.mcz`` file ``moecomp.codec`` would write for a
plan, estimated without coding anything.

Per compressed tensor, the positions of the survivors at the order-0 entropy of the keep mask
(``numel * H2(density)`` bits) or, when cheaper, at the ideal code length of the codec's
``ans_mask`` model of that very mask (row counts and column history, ``codec.masks``), the
level indices at the order-0 entropy of their histogram (or raw bytes when cheaper, as the
codec would choose), the histogram the decoder needs, the float32 codebook (base64 in the
header), and constants per stream, tensor and file for the JSON header, all as they cost once
the codec has zstd-compressed the header; every other tensor of the state dict (biases,
buffers) is stored as it is, in the problem's ``layers.dense_dtype``.
``bench/bench_evaluate.py`` compares the estimate with real files (within a few percent: the
codec's zstd can beat the order-0 entropy on structured masks, and header lengths vary).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from moecomp.codec.masks import estimate_mask_bytes, worth_trying
from moecomp.codec.streams import choose_freqs, table_bytes

# --- coded-size model (bytes); constants estimate the .mcz container's JSON header ----------
# The codec stores the header zstd-compressed: the constants are what each part adds to the
# compressed header, fitted on the real files of runs/*/bench (LeNet-300-100, LeNet-5) and
# random digits-MLP plans: the header part lands within 90 bytes (under 1 % of the file).
FILE_HEADER_BYTES = 310
"""The 16-byte prefix, the header's fixed keys and meta, and zstd's cost of learning the keys
that later tensors repeat."""
PLAN_BYTES_PER_LAYER = 30
"""The plan kept in the header: name, sparsity, bits and quantizer of each layer."""
TENSOR_HEADER_BYTES = 15
"""Per tensor in the header: name, kind, shape, dtype (and n_kept, n_levels)."""
STREAM_HEADER_BYTES = 14
"""Per coded stream in the header: name, coder, n, alphabet, offset, length, CRC."""
CODEBOOK_HEADER_BYTES = 15
"""Per codebook in the header besides its 4 bytes a level: its key and quotes."""
HISTOGRAM_ZSTD_SHARE = 0.5
"""Share of its JSON length an ANS histogram takes in the compressed header (0.35-0.62)."""



def order0_bits(counts: np.ndarray) -> float:
    """Order-0 entropy in bits of a whole stream with histogram ``counts: (alphabet,)``."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    total = float(c.sum())
    if total <= 0:
        return 0.0
    return float(-(c * np.log2(c / total)).sum())


def histogram_bytes(counts: np.ndarray) -> int:
    """Bytes of a stream's histogram as the codec stores it (``{"freqs":[...]}`` in JSON):
    the codec's own choice of table (``codec.streams.choose_freqs``), so the estimate
    follows the file format."""
    return table_bytes(choose_freqs(counts)) + len('{"freqs":}')


def stream_bytes(counts: np.ndarray, *, raw_bytes_per_symbol: int) -> int:
    """Estimated payload + model bytes of one stream of symbols with histogram ``counts``.

    0 for an empty or single-valued stream (the codec's ``const`` coder); otherwise the
    cheaper of ANS (order-0 entropy plus the stored histogram) and raw bytes, as the codec
    chooses.
    """
    c = np.asarray(counts, dtype=np.int64)
    n = int(c.sum())
    if int((c > 0).sum()) <= 1:
        return 0
    payload, table = math.ceil(order0_bits(c) / 8.0), histogram_bytes(c)
    raw = n * raw_bytes_per_symbol
    # The codec weighs the histogram at its JSON length when it picks a coder, but the file
    # stores it in the compressed header.
    if payload + table > raw:
        return raw
    return payload + math.ceil(HISTOGRAM_ZSTD_SHARE * table)


def mask_coded_bytes(mask: np.ndarray) -> int | None:
    """Estimated bytes of a 2-D keep mask under the codec's ``ans_mask`` coder (payload plus
    its header entry as it costs once compressed), or None where the codec would not try it
    (``worth_trying``: a shape it refuses, or a mask too close to i.i.d.)."""
    if not worth_trying(mask):
        return None
    est = estimate_mask_bytes(mask)
    if est is None:
        return None
    payload, model = est
    return payload + math.ceil(HISTOGRAM_ZSTD_SHARE * model)


def layer_coded_bytes(numel: int, level_counts: np.ndarray, n_levels: int, *,
                      mask_bytes: int | None = None) -> int:
    """Estimated bytes of one compressed tensor in a ``.mcz`` file.

    numel: weights of the tensor; level_counts: ``(n_levels,)`` how many survivors use each
    codebook level (their sum is the number kept); n_levels: codebook size ``k``.
    Positions: a stream of ``numel`` keep/drop flags at the order-0 entropy ``numel *
    H2(density)``, or ``mask_bytes`` (``mask_coded_bytes`` of the actual mask) when given and
    cheaper, as the codec keeps the cheaper coder; indices: a stream of ``n_kept`` level
    indices; plus the float32 codebook and headers.
    """
    kept = int(np.asarray(level_counts).sum())
    positions = stream_bytes(np.array([numel - kept, kept]), raw_bytes_per_symbol=1)
    if mask_bytes is not None and 0 < kept < numel:
        positions = min(positions, mask_bytes)
    indices = stream_bytes(level_counts, raw_bytes_per_symbol=1 if n_levels <= 256 else 2)
    return (
        positions
        + indices
        + codebook_bytes(n_levels)
        + TENSOR_HEADER_BYTES
        + 2 * STREAM_HEADER_BYTES
    )


def codebook_bytes(n_levels: int) -> int:
    """The float32 codebook in the compressed header: base64 of ``4 * n_levels`` bytes, which
    zstd's entropy coding brings back to about the float bits, plus the key and quotes."""
    return 4 * n_levels + CODEBOOK_HEADER_BYTES


def dense_coded_bytes(nbytes: int) -> int:
    """Estimated bytes of a tensor stored uncompressed (``nbytes`` raw bytes) in a .mcz."""
    return nbytes + TENSOR_HEADER_BYTES + STREAM_HEADER_BYTES


def fixed_coded_bytes(dense_nbytes: Sequence[int], n_layers: int) -> int:
    """Estimated bytes of a .mcz besides its compressed tensors: the file header, the plan of
    ``n_layers`` layers and the tensors stored as they are (raw sizes ``dense_nbytes``)."""
    return (
        FILE_HEADER_BYTES
        + PLAN_BYTES_PER_LAYER * n_layers
        + sum(dense_coded_bytes(b) for b in dense_nbytes)
    )
