"""The ``.mcz`` container: one compressed model in one versioned, checksummed file.

Layout (all integers little-endian)::

    offset 0   magic            4 bytes  b"MCZ\\x00"
    offset 4   format version   u16      FORMAT_VERSION
    offset 6   flags            u16      FLAG_HEADER_ZSTD (bit 0); other bits must be 0
    offset 8   header length    u32      of the header as stored, <= MAX_HEADER_BYTES
    offset 12  header CRC32     u32      of the header bytes as stored
    offset 16  header           a UTF-8 JSON object (see below), as one zstd frame that
                                states its content size when FLAG_HEADER_ZSTD is set (what
                                ``encode_model`` writes), else as plain JSON (flags 0)
    then       payload          the streams, back to back, in header order

The JSON header (at most ``MAX_HEADER_BYTES`` once decompressed) holds ``plan`` (object or
null), ``meta`` (object), ``payload_bytes`` and ``tensors``, a list in state_dict order. Each
tensor has ``name``, ``kind``, ``shape`` and ``dtype``; a ``quantized`` tensor also ``n_kept``,
``n_levels`` and ``codebook`` (base64 of its float32 little-endian bytes, so every bit
survives) and the streams ``positions`` (the survivor mask packed 8 per byte, LSB first) and
``indices`` (level index per survivor); a ``dense`` tensor has one stream ``data`` (its raw
bytes). A stream entry records ``coder``, symbol count ``n``, ``alphabet``, ``offset`` (from
the payload start), ``length``, ``crc`` (CRC32 of its payload) and the coder's parameters
(``value``, ``freqs`` or ``bits``; see ``streams``). A ``positions`` stream of a tensor with
two or more dimensions may instead use the ``ans_mask`` coder (``grid`` and ``counts``; see
``masks``), which decodes to the same packed bytes; the encoder keeps the cheaper.

Every claimed size is checked against the file and against limits before anything of that
size is allocated, so a hostile file costs at most about ``max_bytes`` of memory; the
compressed header counts too (it may expand to at most ``min(MAX_HEADER_BYTES, max_bytes)``).
"""

from __future__ import annotations

import base64
import json
import math
import os
import struct
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moecomp import __version__
from moecomp.apply import QuantizedLayer
from moecomp.atomic import replace_atomically
from moecomp.codec.masks import MASK_CODER, decode_mask, encode_mask, grid_of, worth_trying
from moecomp.codec.streams import (
    MAX_ALPHABET,
    PARAMS,
    CodedStream,
    bits_for,
    decode_stream,
    encode_stream,
    zstd_compress,
    zstd_decompress,
)
from moecomp.errors import CodecError, ConfigError
from moecomp.plan import CompressionPlan

MAGIC = b"MCZ\x00"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHHII")  # magic, version, flags, header length, header CRC32
PREFIX_BYTES = _PREFIX.size
FLAG_HEADER_ZSTD = 1
"""Flag bit: the header is a zstd frame of the JSON (always set by ``encode_model``)."""
KNOWN_FLAGS = FLAG_HEADER_ZSTD
"""Every flag bit this reader understands; a file with any other bit set is refused."""
HEADER_ZSTD_LEVEL = 19
"""zstd level of the header: ~0.2 ms for a 3 KB header, ~6 % smaller than level 3."""
MAX_HEADER_BYTES = 16 * 2**20
"""Largest JSON header a reader accepts, as stored and once decompressed."""
MAX_ELEMENTS = 2**31
"""Largest number of elements of one tensor (and largest single dimension)."""
MAX_DIMS = 64
"""Most dimensions a tensor may have."""
DEFAULT_MAX_BYTES = 4 * 2**30
"""Default cap on the file size and on the cost of decoding it (``decode_cost``)."""
TENSOR_COST = 32 * 2**10
"""Cost charged per tensor: its header entry, streams and objects (~40 us of CPU) take about
as long as decoding this many bytes of ordinary output (1-2.6 ns a cost byte; measured
2026-12-03, BENCHMARKS.md "Hostile files")."""
GRID_ROW_COST = 12 * 2**10
"""Cost charged per row of an ``ans_mask`` grid: the decoder takes one Python step per coded
row (~12 us of CPU, the time of ~12 KiB of ordinary output)."""
GRID_ELEMENT_COST = 8
"""Cost charged per element of an ``ans_mask`` grid on top of the memory: its ANS step per
bit (~40 ns) is slower than the generic coders' per byte."""
DENSE_CODERS = ("const", "raw", "zstd")
"""Coders a dense tensor's data may use (what ``encode_model`` tries): byte-wise ANS of raw
tensor bytes never wins and would cost ~30 ns a byte to decode."""

_DTYPE_NAMES = (
    "float64 float32 float16 bfloat16 complex128 complex64 complex32 "
    "int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool "
    "float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz float8_e8m0fnu float4_e2m1fn_x2"
).split()
DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)
}
"""Dtypes a dense tensor may have, by the name stored in the header."""
_DTYPE_BY_TORCH = {dt: n for n, dt in DTYPES.items()}
_QUANTIZED_STREAMS = ("positions", "indices")
_DENSE_STREAMS = ("data",)


# --- public result types -----------------------------------------------------------------
@dataclass(frozen=True)
class StreamInfo:
    """One coded stream of a file.

    name: ``"<tensor>/<stream>"``; coder: the coder kept; n_symbols: symbols before coding;
    alphabet: symbols lie in ``[0, alphabet)``; coded_bytes: payload bytes in the file;
    model_bytes: JSON bytes of the coder's model in the header before it is compressed (the
    ANS histogram, 0 for other coders).
    """

    name: str
    tensor: str
    stream: str
    coder: str
    n_symbols: int
    alphabet: int
    coded_bytes: int
    model_bytes: int


@dataclass(frozen=True)
class LayerRow:
    """One tensor of a file, as ``inspect_model`` reports it.

    sparsity: share of zeroed weights (0.0 for dense tensors); bits: ``ceil(log2 n_levels)``
    for quantized tensors, the dtype's bit width for dense ones; coded_bytes: payload bytes of
    its streams plus their models' JSON bytes plus the codebook (4 bytes a level), parts of the
    header counted before it is compressed; coders: the coder of each stream, in stream order;
    decode_cost: what decoding it is charged against ``max_bytes`` (``decode_cost``).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    n_kept: int
    sparsity: float
    bits: int
    n_levels: int | None
    coded_bytes: int
    coders: tuple[str, ...]
    decode_cost: int


@dataclass(frozen=True)
class DecodedModel:
    """What a file holds.

    state_dict: every tensor in the file's order; quantized ones exactly as
        ``QuantizedLayer.dequantize()`` (float32), dense ones with their stored dtype.
    layers: the quantized tensors as stored. plan/meta: as given to ``encode_model``.
    streams: every coded stream, in file order.
    """

    state_dict: dict[str, torch.Tensor]
    layers: dict[str, QuantizedLayer]
    plan: dict[str, Any] | None
    meta: dict[str, Any]
    streams: list[StreamInfo]


# --- encoding ----------------------------------------------------------------------------
def encode_model(
    layers: Mapping[str, QuantizedLayer],
    dense: Mapping[str, torch.Tensor],
    *,
    plan: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    order: Sequence[str] | None = None,
) -> bytes:
    """The ``.mcz`` bytes of a compressed model.

    layers: compressed tensors by state_dict name. dense: every other tensor (biases,
        buffers...), stored losslessly in its own dtype. plan, meta: JSON objects kept in the
        header (e.g. ``CompressionPlan.to_dict()``). order: all names in the order the
        decoded state_dict should have (e.g. ``model.state_dict().keys()``); default: the
        layers, then the dense tensors.

    Raises ``CodecError`` for inconsistent layers, unsupported dtypes, duplicate names or
    plan/meta that are not JSON.
    """
    _require_little_endian()
    overlap = set(layers) & set(dense)
    if overlap:
        raise CodecError(f"tensor {sorted(overlap)[0]!r} is both a layer and a dense tensor")
    names = list(layers) + list(dense)
    if order is not None:
        names = list(order)
        if len(set(names)) != len(names) or set(names) != set(layers) | set(dense):
            raise CodecError("order must name every layer and dense tensor exactly once")
    if plan is not None and not isinstance(plan, dict):
        raise CodecError(f"plan must be a dict or None, got {type(plan).__name__}")
    _check_plan(plan, list(layers), "plan")
    if meta is not None and not isinstance(meta, dict):
        raise CodecError(f"meta must be a dict or None, got {type(meta).__name__}")

    entries: list[dict[str, Any]] = []
    payloads: list[bytes] = []
    offset = 0
    for name in names:
        if not isinstance(name, str) or not name:
            raise CodecError(f"tensor names must be non-empty strings, got {name!r}")
        if name in layers:
            entry, streams = _encode_quantized(name, layers[name])
        else:
            entry, streams = _encode_dense(name, dense[name])
        entry["streams"] = []
        for sname, cs in streams:
            entry["streams"].append(_stream_entry(sname, cs, offset))
            payloads.append(cs.payload)
            offset += len(cs.payload)
        entries.append(entry)

    header = {
        "writer": f"moecomp {__version__}",
        "plan": plan,
        "meta": {} if meta is None else meta,
        "payload_bytes": offset,
        "tensors": entries,
    }
    try:
        header_json = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise CodecError(f"plan and meta must be plain JSON (no NaN/inf): {e}") from None
    if len(header_json) > MAX_HEADER_BYTES:
        raise CodecError(f"header of {len(header_json)} bytes exceeds {MAX_HEADER_BYTES}")
    stored = zstd_compress(header_json, level=HEADER_ZSTD_LEVEL)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, FLAG_HEADER_ZSTD, len(stored), zlib.crc32(stored))
    return b"".join([prefix, stored, *payloads])


def _stream_entry(name: str, cs: CodedStream, offset: int) -> dict[str, Any]:
    return {
        "name": name,
        "coder": cs.coder,
        "n": cs.n,
        "alphabet": cs.alphabet,
        "offset": offset,
        "length": len(cs.payload),
        "crc": zlib.crc32(cs.payload),
        **cs.params,
    }


def _encode_quantized(
    name: str, layer: QuantizedLayer
) -> tuple[dict[str, Any], list[tuple[str, CodedStream]]]:
    where = f"layer {name!r}"
    if not isinstance(layer, QuantizedLayer):
        raise CodecError(f"{where}: expected a QuantizedLayer, got {type(layer).__name__}")
    shape = _check_shape(layer.shape, where)
    mask, indices, codebook = layer.mask, layer.indices, layer.codebook
    if mask.dtype != torch.bool or tuple(mask.shape) != shape:
        raise CodecError(
            f"{where}: mask must be bool of shape {shape}, got {mask.dtype} {tuple(mask.shape)}"
        )
    if codebook.dtype != torch.float32 or codebook.dim() != 1:
        raise CodecError(
            f"{where}: codebook must be 1-D float32, got {codebook.dtype} {tuple(codebook.shape)}"
        )
    k = int(codebook.numel())
    if k > MAX_ALPHABET:
        raise CodecError(f"{where}: codebook has {k} levels, at most {MAX_ALPHABET} allowed")
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise CodecError(f"{where}: indices must be a 1-D integer tensor")
    mask_np = mask.detach().cpu().reshape(-1).numpy()
    n_kept = int(np.count_nonzero(mask_np))
    if indices.numel() != n_kept:
        raise CodecError(f"{where}: {indices.numel()} indices for {n_kept} kept weights")
    try:
        idx_stream = encode_stream(indices.detach().cpu().numpy(), k)
    except CodecError as e:
        raise CodecError(f"{where}: indices: {e}") from None
    pos_stream = encode_stream(np.packbits(mask_np, bitorder="little"), 256)
    grid = grid_of(shape)
    if grid is not None and worth_trying(mask_np.reshape(grid)):
        by_rows = encode_mask(mask_np.reshape(grid))
        if by_rows is not None and by_rows.cost < pos_stream.cost:
            pos_stream = by_rows
    cb = codebook.detach().cpu().contiguous().numpy().astype("<f4", copy=False).tobytes()
    entry = {
        "name": name,
        "kind": "quantized",
        "shape": list(shape),
        "dtype": "float32",
        "n_kept": n_kept,
        "n_levels": k,
        "codebook": base64.b64encode(cb).decode("ascii"),
    }
    return entry, [("positions", pos_stream), ("indices", idx_stream)]


def _encode_dense(
    name: str, t: torch.Tensor
) -> tuple[dict[str, Any], list[tuple[str, CodedStream]]]:
    where = f"dense tensor {name!r}"
    if not isinstance(t, torch.Tensor):
        raise CodecError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.dtype not in _DTYPE_BY_TORCH:
        raise CodecError(
            f"{where}: unsupported {t.layout} {t.dtype}; supported dtypes: {', '.join(DTYPES)}"
        )
    shape = _check_shape(tuple(t.shape), where)
    if t.numel() == 0:  # an empty tensor may carry stride 0, which view() refuses
        raw = np.zeros(0, dtype=np.uint8)
    else:
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    entry = {"name": name, "kind": "dense", "shape": list(shape), "dtype": _DTYPE_BY_TORCH[t.dtype]}
    return entry, [("data", encode_stream(raw, 256, coders=("raw", "zstd")))]


def _check_shape(shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, tuple | list | torch.Size):
        raise CodecError(f"{where}: shape must be a tuple of ints, got {shape!r}")
    dims = tuple(shape)
    if len(dims) > MAX_DIMS or not all(type(d) is int and 0 <= d <= MAX_ELEMENTS for d in dims):
        raise CodecError(
            f"{where}: shape must hold at most {MAX_DIMS} ints in 0..{MAX_ELEMENTS}, got {dims!r}"
        )
    if math.prod(dims) > MAX_ELEMENTS:
        raise CodecError(f"{where}: {math.prod(dims)} elements exceed the limit {MAX_ELEMENTS}")
    return dims


# --- reading the header ------------------------------------------------------------------
@dataclass(frozen=True)
class _Stream:
    name: str
    coder: str
    n: int
    alphabet: int
    offset: int
    length: int
    crc: int
    params: dict[str, Any]

    def model_bytes(self) -> int:
        return CodedStream(self.coder, self.n, self.alphabet, b"", self.params).model_bytes


@dataclass(frozen=True)
class _Tensor:
    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    n_kept: int
    codebook: bytes
    streams: dict[str, _Stream]

    @property
    def n_levels(self) -> int:
        return len(self.codebook) // 4


@dataclass(frozen=True)
class _Header:
    plan: dict[str, Any] | None
    meta: dict[str, Any]
    tensors: list[_Tensor]


def _parse_prefix(prefix: bytes | memoryview, file_bytes: int) -> tuple[int, int, int]:
    """(flags, stored header length, header CRC) from the first ``PREFIX_BYTES`` of a file."""
    if len(prefix) < PREFIX_BYTES:
        raise CodecError(
            f"truncated file: {file_bytes} bytes, the fixed prefix needs {PREFIX_BYTES}"
        )
    magic, version, flags, hlen, hcrc = _PREFIX.unpack(bytes(prefix[:PREFIX_BYTES]))
    if magic != MAGIC:
        raise CodecError(f"not an .mcz file: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CodecError(
            f"unsupported .mcz format version {version}; this reader supports {FORMAT_VERSION}"
        )
    if flags & ~KNOWN_FLAGS:
        raise CodecError(
            f"unsupported .mcz flags {flags:#06x}: unknown bits {flags & ~KNOWN_FLAGS:#06x}; "
            f"this reader knows only FLAG_HEADER_ZSTD ({FLAG_HEADER_ZSTD:#06x})"
        )
    if hlen > MAX_HEADER_BYTES:
        raise CodecError(f"header length {hlen} exceeds the limit {MAX_HEADER_BYTES}")
    if PREFIX_BYTES + hlen > file_bytes:
        raise CodecError(
            f"truncated header: claims {hlen} bytes, the file has "
            f"{file_bytes - PREFIX_BYTES} after the prefix"
        )
    return flags, hlen, hcrc


def _parse_header(
    stored: bytes | memoryview, *, flags: int, crc: int, payload_bytes: int, max_bytes: int
) -> _Header:
    """Check the header's CRC, decompress it, check its JSON and every field; bound every
    claimed size."""
    if zlib.crc32(stored) != crc:
        raise CodecError("header CRC mismatch: the header is corrupt")
    if flags & FLAG_HEADER_ZSTD:
        try:
            raw = zstd_decompress(stored, min(MAX_HEADER_BYTES, max_bytes), exact=False)
        except CodecError as e:
            raise CodecError(
                f"compressed header (at most min(MAX_HEADER_BYTES, max_bytes={max_bytes}) "
                f"bytes once decompressed): {e}"
            ) from None
    else:
        raw = bytes(stored)
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CodecError(f"header is not valid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(doc, dict):
        raise CodecError(f"header must be a JSON object, got {type(doc).__name__}")
    _no_unknown(doc, {"writer", "plan", "meta", "payload_bytes", "tensors"}, "header")
    if "writer" in doc:
        _field(doc, "writer", str, "header")
    plan = doc.get("plan")
    if plan is not None and not isinstance(plan, dict):
        raise CodecError("header field plan: must be an object or null")
    meta = _field(doc, "meta", dict, "header")
    claimed = _int(doc, "payload_bytes", "header")
    if claimed != payload_bytes:
        raise CodecError(f"header claims {claimed} payload bytes, the file holds {payload_bytes}")
    raw_tensors = _field(doc, "tensors", list, "header")
    tensors: list[_Tensor] = []
    seen: set[str] = set()
    offset = 0
    budget = max_bytes
    for i, rt in enumerate(raw_tensors):
        t = _parse_tensor(rt, f"tensors[{i}]")
        if t.name in seen:
            raise CodecError(f"header names tensor {t.name!r} twice")
        seen.add(t.name)
        budget -= decode_cost(t)
        if budget < 0:
            raise CodecError(
                f"decoding would exceed max_bytes={max_bytes} at tensor {t.name!r} (memory "
                "and work are charged per tensor, element and grid row; see decode_cost)"
            )
        for s in t.streams.values():
            if s.offset != offset:
                raise CodecError(
                    f"stream {t.name}/{s.name} at offset {s.offset}, expected "
                    f"{offset} (streams must be contiguous, in order)"
                )
            offset += s.length
            if offset > payload_bytes:
                raise CodecError(
                    f"stream {t.name}/{s.name} ends at {offset}, beyond the "
                    f"payload of {payload_bytes} bytes"
                )
        tensors.append(t)
    if offset != payload_bytes:
        raise CodecError(f"streams cover {offset} of {payload_bytes} payload bytes")
    _check_plan(plan, [t.name for t in tensors if t.kind == "quantized"], "the header's plan")
    return _Header(plan=plan, meta=meta, tensors=tensors)


def _check_plan(plan: dict[str, Any] | None, quantized: Sequence[str], where: str) -> None:
    """A plan is None or a valid ``CompressionPlan`` (moecomp.plan's validation: sparsity in
    [0, 1), bits 1..8, known quantizers, shared_k 2..256) of exactly the quantized tensors."""
    if plan is None:
        return
    try:
        layers = CompressionPlan.from_dict(plan).layers
    except ConfigError as e:
        raise CodecError(f"{where}: {e}") from None
    if set(layers) != set(quantized):
        raise CodecError(f"{where} compresses {sorted(layers)}, the file holds compressed "
                         f"tensors {sorted(quantized)}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _parse_tensor(rt: Any, where: str) -> _Tensor:
    if not isinstance(rt, dict):
        raise CodecError(f"header field {where}: must be an object")
    name = _field(rt, "name", str, where)
    if not name:
        raise CodecError(f"header field {where}.name: must not be empty")
    where = f"tensor {name!r}"
    kind = _field(rt, "kind", str, where)
    shape_list = _field(rt, "shape", list, where)
    if len(shape_list) > MAX_DIMS or not all(
        type(d) is int and 0 <= d <= MAX_ELEMENTS for d in shape_list
    ):
        raise CodecError(
            f"header field {where}.shape: must be a list of at most {MAX_DIMS} ints in "
            f"0..{MAX_ELEMENTS}"
        )
    shape = tuple(shape_list)
    numel = math.prod(shape)
    if numel > MAX_ELEMENTS:
        raise CodecError(
            f"{where}: shape {shape} has {numel} elements, over the limit {MAX_ELEMENTS}"
        )
    dtype = _field(rt, "dtype", str, where)
    if kind == "quantized":
        _no_unknown(
            rt,
            {"name", "kind", "shape", "dtype", "n_kept", "n_levels", "codebook", "streams"},
            where,
        )
        if dtype != "float32":
            raise CodecError(f"header field {where}.dtype: quantized tensors are float32")
        n_kept = _int(rt, "n_kept", where, hi=numel)
        k = _int(rt, "n_levels", where, hi=MAX_ALPHABET)
        if n_kept > 0 and k == 0:
            raise CodecError(f"{where}: {n_kept} kept weights but an empty codebook")
        try:
            codebook = base64.b64decode(_field(rt, "codebook", str, where), validate=True)
        except ValueError as e:  # binascii.Error, or a non-ASCII character
            raise CodecError(f"header field {where}.codebook: invalid base64: {e}") from None
        if len(codebook) != 4 * k:
            raise CodecError(f"{where}: codebook holds {len(codebook)} bytes, expected {4 * k}")
        streams = _parse_streams(rt, where, _QUANTIZED_STREAMS)
        _expect(streams["positions"], where, n=(numel + 7) // 8, alphabet=256)
        _expect(streams["indices"], where, n=n_kept, alphabet=k)
    elif kind == "dense":
        _no_unknown(rt, {"name", "kind", "shape", "dtype", "streams"}, where)
        if dtype not in DTYPES:
            raise CodecError(
                f"header field {where}.dtype: {dtype!r} unknown; known: {', '.join(DTYPES)}"
            )
        n_kept, codebook = numel, b""
        streams = _parse_streams(rt, where, _DENSE_STREAMS)
        if streams["data"].coder not in DENSE_CODERS:
            raise CodecError(
                f"header field {where}.streams.data.coder: {streams['data'].coder!r}; dense "
                f"data uses one of {', '.join(DENSE_CODERS)}"
            )
        _expect(streams["data"], where, n=numel * DTYPES[dtype].itemsize, alphabet=256)
    else:
        raise CodecError(f"header field {where}.kind: {kind!r}, expected quantized or dense")
    return _Tensor(name, kind, shape, dtype, numel, n_kept, codebook, streams)


def _parse_streams(rt: dict[str, Any], where: str, names: tuple[str, ...]) -> dict[str, _Stream]:
    raw = _field(rt, "streams", list, where)
    got = [s.get("name") if isinstance(s, dict) else None for s in raw]
    if tuple(got) != names:
        raise CodecError(f"header field {where}.streams: expected streams {list(names)}, got {got}")
    out: dict[str, _Stream] = {}
    for s in raw:
        w = f"{where}.streams.{s['name']}"
        _no_unknown(s, {"name", "coder", "n", "alphabet", "offset", "length", "crc", *PARAMS}, w)
        out[s["name"]] = _Stream(
            name=s["name"],
            coder=_field(s, "coder", str, w),
            n=_int(s, "n", w),
            alphabet=_int(s, "alphabet", w, hi=MAX_ALPHABET),
            offset=_int(s, "offset", w),
            length=_int(s, "length", w),
            crc=_int(s, "crc", w, hi=2**32 - 1),
            params={k: s[k] for k in PARAMS if k in s},
        )
    return out


def _expect(s: _Stream, where: str, *, n: int, alphabet: int) -> None:
    if s.n != n or s.alphabet != alphabet:
        raise CodecError(
            f"{where}: stream {s.name} claims {s.n} symbols of alphabet "
            f"{s.alphabet}, the tensor needs {n} of alphabet {alphabet}"
        )


def decode_cost(t: _Tensor) -> int:
    """What decoding tensor ``t`` costs, in bytes, charged against ``max_bytes`` before
    anything is decoded: the peak memory it allocates (output plus transient arrays, an upper
    bound: at most twice the decoded tensors) plus, where the time of a step is not paid for
    by the memory it fills, bytes of the same time (``TENSOR_COST``, ``GRID_ROW_COST``,
    ``GRID_ELEMENT_COST``). So decoding time and memory both stay proportional to
    ``max_bytes`` whatever the header claims."""
    if t.kind == "dense":
        return TENSOR_COST + 2 * t.numel * DTYPES[t.dtype].itemsize
    cost = TENSOR_COST + 6 * t.numel + 24 * t.n_kept + 4 * t.n_levels
    if t.streams["positions"].coder == MASK_CODER:
        rows = t.shape[0] if t.shape else 0
        cost += GRID_ROW_COST * rows + GRID_ELEMENT_COST * t.numel
    return cost


def _field(d: dict[str, Any], key: str, typ: type, where: str) -> Any:
    if key not in d:
        raise CodecError(f"header field {where}.{key}: missing")
    v = d[key]
    if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
        raise CodecError(
            f"header field {where}.{key}: expected {typ.__name__}, got {type(v).__name__}"
        )
    return v


def _int(d: dict[str, Any], key: str, where: str, *, hi: int = 2**62) -> int:
    v = _field(d, key, int, where)
    if not 0 <= v <= hi:
        raise CodecError(f"header field {where}.{key}: {v} outside 0..{hi}")
    return int(v)


def _no_unknown(d: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = set(d) - allowed
    if extra:
        raise CodecError(
            f"header field {where}.{sorted(extra)[0]}: unknown; allowed: "
            f"{', '.join(sorted(allowed))}"
        )


def _read_header(
    data: bytes | bytearray | memoryview, max_bytes: int
) -> tuple[_Header, memoryview]:
    _require_little_endian()
    view = memoryview(data).cast("B")
    if len(view) > max_bytes:
        raise CodecError(f"file of {len(view)} bytes exceeds max_bytes={max_bytes}")
    flags, hlen, hcrc = _parse_prefix(view, len(view))
    payload = view[PREFIX_BYTES + hlen :]
    header = _parse_header(
        view[PREFIX_BYTES : PREFIX_BYTES + hlen],
        flags=flags,
        crc=hcrc,
        payload_bytes=len(payload),
        max_bytes=max_bytes,
    )
    return header, payload


# --- decoding ----------------------------------------------------------------------------
def decode_model(
    data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> DecodedModel:
    """Decode ``.mcz`` bytes into a state_dict, the quantized layers, plan and meta.

    max_bytes: cap on the input size and on the memory the decoded tensors may take; larger
        claims are refused before any allocation. Any malformed input raises ``CodecError``.
    """
    header, payload = _read_header(data, max_bytes)
    state: dict[str, torch.Tensor] = {}
    layers: dict[str, QuantizedLayer] = {}
    infos: list[StreamInfo] = []
    for t in header.tensors:
        symbols: dict[str, np.ndarray] = {}
        for s in t.streams.values():
            symbols[s.name] = _decode_checked(payload, t, s)
            infos.append(_stream_info(t, s))
        if t.kind == "quantized":
            layer = _rebuild_layer(t, symbols["positions"], symbols["indices"])
            layers[t.name] = layer
            state[t.name] = _dequantize(layer)
        else:
            state[t.name] = _rebuild_dense(t, symbols["data"])
    return DecodedModel(
        state_dict=state, layers=layers, plan=header.plan, meta=header.meta, streams=infos
    )


def _stream_info(t: _Tensor, s: _Stream) -> StreamInfo:
    return StreamInfo(
        name=f"{t.name}/{s.name}",
        tensor=t.name,
        stream=s.name,
        coder=s.coder,
        n_symbols=s.n,
        alphabet=s.alphabet,
        coded_bytes=s.length,
        model_bytes=s.model_bytes(),
    )


def _decode_checked(payload: memoryview, t: _Tensor, s: _Stream) -> np.ndarray:
    chunk = payload[s.offset : s.offset + s.length]
    _check_crc(zlib.crc32(chunk), t, s)
    try:
        if s.coder == MASK_CODER:
            if s.name != "positions" or s.params.get("grid") != list(grid_of(t.shape) or []):
                raise CodecError(f"coder {MASK_CODER} codes the positions of a tensor of 2 or "
                                 f"more dimensions, as a {grid_of(t.shape)} grid")
            return decode_mask(chunk, s.n, s.params)
        return decode_stream(chunk, coder=s.coder, n=s.n, alphabet=s.alphabet, params=s.params)
    except CodecError as e:
        raise CodecError(f"stream {t.name}/{s.name}: {e}") from None


def _rebuild_layer(t: _Tensor, packed: np.ndarray, idx: np.ndarray) -> QuantizedLayer:
    tail = t.numel % 8
    if tail and packed[-1] >> tail:
        raise CodecError(f"tensor {t.name!r}: mask padding bits are not zero")
    mask = np.unpackbits(packed, count=t.numel, bitorder="little").view(np.bool_)
    n_kept = int(np.count_nonzero(mask))
    if n_kept != t.n_kept:
        raise CodecError(f"tensor {t.name!r}: mask keeps {n_kept} weights, header says {t.n_kept}")
    codebook = np.frombuffer(t.codebook, dtype="<f4").astype(np.float32)
    return QuantizedLayer(
        shape=t.shape,
        mask=_to_torch(mask).reshape(t.shape),
        indices=_to_torch(idx.astype(np.int64)),
        codebook=_to_torch(codebook),
    )


def _dequantize(layer: QuantizedLayer) -> torch.Tensor:
    """``layer.dequantize()``, bit for bit: float32 of ``layer.shape``, ``codebook[indices]``
    at the mask and exact zero elsewhere.

    Done in numpy because torch's boolean-mask assignment is ~30x slower on CPU (bench_codec);
    both only copy codebook entries, so the bits are identical (tests compare them). A boolean
    assignment, not ``flatnonzero``: no 8-byte position per survivor (peak memory).
    """
    mask = layer.mask.reshape(-1).numpy()
    out = np.zeros(mask.size, dtype=np.float32)
    out[mask] = layer.codebook.numpy()[layer.indices.numpy()]
    return _to_torch(out).reshape(layer.shape)


def _rebuild_dense(t: _Tensor, raw: np.ndarray) -> torch.Tensor:
    dtype = DTYPES[t.dtype]
    if dtype == torch.bool and raw.size and int(raw.max()) > 1:
        raise CodecError(f"tensor {t.name!r}: bool data holds bytes other than 0 and 1")
    if raw.size == 0:
        return torch.empty(t.shape, dtype=dtype)
    return _to_torch(raw).view(dtype).reshape(t.shape)


def _to_torch(a: np.ndarray) -> torch.Tensor:
    """A torch tensor sharing ``a``'s memory; empty arrays get a fresh tensor because numpy
    gives them stride 0, which later ``view``s refuse."""
    if a.size == 0:
        return torch.empty(a.shape, dtype=torch.from_numpy(np.zeros(1, dtype=a.dtype)).dtype)
    return torch.from_numpy(np.ascontiguousarray(a))


# --- inspecting --------------------------------------------------------------------------
def inspect_model(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    verify: bool = True,
) -> list[LayerRow]:
    """One row per tensor of a file, from its header; with ``verify`` (the default) every
    stream's CRC32 is checked too (CodecError naming the stream on a mismatch), without
    decoding anything. A CRC catches corruption, not forgery: only decoding checks that the
    streams hold what the header says."""
    header, payload = _read_header(data, max_bytes)
    if verify:
        for t in header.tensors:
            for s in t.streams.values():
                _check_crc(zlib.crc32(payload[s.offset : s.offset + s.length]), t, s)
    return [_row(t) for t in header.tensors]


def _check_crc(crc: int, t: _Tensor, s: _Stream) -> None:
    if crc != s.crc:
        raise CodecError(f"stream {t.name}/{s.name}: CRC mismatch, the payload is corrupt")


def _row(t: _Tensor) -> LayerRow:
    quantized = t.kind == "quantized"
    return LayerRow(
        name=t.name,
        kind=t.kind,
        shape=t.shape,
        dtype=t.dtype,
        numel=t.numel,
        n_kept=t.n_kept,
        sparsity=1.0 - t.n_kept / t.numel if quantized and t.numel else 0.0,
        bits=bits_for(t.n_levels) if quantized else DTYPES[t.dtype].itemsize * 8,
        n_levels=t.n_levels if quantized else None,
        coded_bytes=sum(s.length + s.model_bytes() for s in t.streams.values()) + len(t.codebook),
        coders=tuple(s.coder for s in t.streams.values()),
        decode_cost=decode_cost(t),
    )


# --- files -------------------------------------------------------------------------------
def write_mcz(
    path: str | os.PathLike[str],
    layers: Mapping[str, QuantizedLayer],
    dense: Mapping[str, torch.Tensor],
    *,
    plan: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    order: Sequence[str] | None = None,
) -> int:
    """Encode a model (see ``encode_model``) and write it atomically; returns the bytes written."""
    data = encode_model(layers, dense, plan=plan, meta=meta, order=order)
    target = Path(path)
    # A unique sibling opened with "xb" (not mkstemp, whose 0600 mode would stick to the file)
    # and renamed over the target: readers never see a half-written file.
    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            f.write(data)

    replace_atomically(target, write)
    return len(data)


def read_mcz(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> DecodedModel:
    """Decode a ``.mcz`` file; files larger than ``max_bytes`` are refused before reading."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise CodecError(f"{os.fspath(path)}: {size} bytes exceed max_bytes={max_bytes}")
    return decode_model(Path(path).read_bytes(), max_bytes=max_bytes)


def inspect_mcz(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES, verify: bool = True
) -> list[LayerRow]:
    """``inspect_model`` of a file: reads its prefix and header, then, with ``verify``, the
    payload in 1 MiB pieces for the CRCs (memory stays bounded whatever the file's size)."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise CodecError(f"{os.fspath(path)}: {size} bytes exceed max_bytes={max_bytes}")
    with open(path, "rb") as f:
        prefix = f.read(PREFIX_BYTES)
        flags, hlen, hcrc = _parse_prefix(prefix, size)
        stored = f.read(hlen)
        if len(stored) != hlen:
            raise CodecError(f"{os.fspath(path)}: file shrank while reading its header")
        header = _parse_header(
            stored,
            flags=flags,
            crc=hcrc,
            payload_bytes=size - PREFIX_BYTES - hlen,
            max_bytes=max_bytes,
        )
        if verify:  # streams are contiguous and in order (checked by _parse_header)
            for t in header.tensors:
                for s in t.streams.values():
                    crc, left = 0, s.length
                    while left:
                        piece = f.read(min(left, 2**20))
                        if not piece:
                            raise CodecError(f"{os.fspath(path)}: file shrank while reading")
                        crc = zlib.crc32(piece, crc)
                        left -= len(piece)
                    _check_crc(crc, t, s)
    return [_row(t) for t in header.tensors]


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise CodecError(".mcz files are little-endian; big-endian hosts are not supported")
