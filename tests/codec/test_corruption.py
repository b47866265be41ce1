"""Hostile input: every malformed file raises CodecError, quickly and without big allocations."""

from __future__ import annotations

import base64
import json
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from moecomp.apply import QuantizedLayer
from moecomp.codec import CODERS, MAX_HEADER_BYTES, decode_model, encode_model, inspect_model
from moecomp.errors import CodecError

PREFIX = struct.Struct("<4sHHII")  # the documented layout, written out independently here
ZSTD = 1  # the flag bit of a zstd-compressed header


def _layer(
    shape: tuple[int, ...], sparsity: float, k: int, seed: int, *, rows: bool = False,
    units: bool = False,
) -> QuantizedLayer:
    rng = np.random.default_rng(seed)
    if rows:  # whole rows pruned: a run-structured mask that zstd codes best
        mask = np.repeat(rng.random(shape[0]) >= sparsity, int(np.prod(shape[1:])))
    elif units:  # rows and columns of very different rates: the ans_mask coder's case
        p = np.outer(rng.gamma(0.5, 1.0, shape[0]), rng.gamma(0.5, 1.0, int(np.prod(shape[1:]))))
        mask = (rng.random(p.shape) < np.clip(p * (1 - sparsity) / p.mean(), 0, 1)).reshape(-1)
    else:
        mask = rng.random(int(np.prod(shape))) >= sparsity
    idx = np.clip(np.rint(rng.laplace(k / 2, k / 6, int(mask.sum()))), 0, k - 1)
    return QuantizedLayer(
        shape,
        torch.from_numpy(mask).reshape(shape),
        torch.from_numpy(idx.astype(np.int64)),
        torch.from_numpy(rng.standard_normal(k).astype(np.float32)),
    )


LAYERS = {
    "fc1.weight": _layer((60, 50), 0.9, 16, 0),
    "fc2.weight": _layer((50, 40), 0.5, 4, 1, rows=True),
    "fc3.weight": _layer((10, 5), 0.0, 1, 2),
    "fc4.weight": _layer((100, 20, 3, 3), 0.95, 4, 3, units=True),
}
DENSE = {"fc1.bias": torch.linspace(-1, 1, 60), "fc3.bias": torch.zeros(10)}
GOOD = encode_model(
    LAYERS,
    DENSE,
    plan={"shared_k": None, "layers": {n: {"sparsity": 0.5, "bits": 4} for n in LAYERS}},
    meta={"run": "t"},
    order=["fc1.weight", "fc1.bias", "fc2.weight", "fc3.weight", "fc3.bias", "fc4.weight"],
)


def test_fixture_file_holds_an_ans_mask_stream() -> None:
    coders = {(s.tensor, s.stream): s.coder for s in decode_model(GOOD).streams}
    assert coders[("fc4.weight", "positions")] == "ans_mask"


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the payload of a file."""
    _, _, flags, hlen, _ = PREFIX.unpack(data[:16])
    stored = data[16 : 16 + hlen]
    raw = zstandard.ZstdDecompressor().decompress(stored) if flags & ZSTD else stored
    return json.loads(raw), data[16 + hlen :]


def build(
    header: dict[str, Any] | bytes, payload: bytes, *, version: int = 1, flags: int = 0
) -> bytes:
    """A file from a header (a dict, or the header bytes to store as they are) and payload,
    with a correct header CRC. With the default ``flags`` the header is plain JSON."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return PREFIX.pack(b"MCZ\x00", version, flags, len(raw), zlib.crc32(raw)) + raw + payload


def refusal_peak(data: bytes, match: str, max_bytes: int | None,
                 readers: tuple[Callable[..., Any], ...]) -> int:
    """Peak traced memory (bytes) while every reader refuses ``data`` with ``match``."""
    kwargs = {} if max_bytes is None else {"max_bytes": max_bytes}
    tracemalloc.start()
    try:
        for read in readers:
            with pytest.raises(CodecError, match=match):
                read(data, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return int(peak)


def zstd_frame(raw: bytes, **kw: Any) -> bytes:
    """``raw`` as one zstd frame, as a compressed header stores it."""
    return zstandard.ZstdCompressor(**kw).compress(raw)


def bits_of(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_refused(data: bytes, match: str | None = None) -> None:
    """decode_model raises CodecError (quickly); inspect_model, which reads only the header,
    either raises CodecError too or, for a fault in the payload, returns its rows."""
    t0 = time.perf_counter()
    with pytest.raises(CodecError, match=match):
        decode_model(data)
    try:
        inspect_model(data)
    except CodecError:
        pass
    assert time.perf_counter() - t0 < 1.0


def test_the_good_file_decodes() -> None:
    out = decode_model(GOOD)
    coders = {s.coder for s in out.streams}
    assert set(CODERS) <= coders, coders  # every decoder is exercised
    for name, q in LAYERS.items():
        assert torch.equal(out.state_dict[name], q.dequantize())


def test_truncation_at_every_length_is_refused() -> None:
    lengths = sorted(set(range(0, 64)) | set(range(64, len(GOOD), 7)) | {len(GOOD) - 1})
    for n in lengths:
        assert_refused(GOOD[:n])
    assert_refused(GOOD + b"\x00", "payload")


def test_single_byte_flips_are_refused() -> None:
    rng = np.random.default_rng(0)
    _, payload = split(GOOD)
    header_end = len(GOOD) - len(payload)
    where = (
        list(range(16))
        + list(rng.integers(16, header_end, 150))
        + list(rng.integers(header_end, len(GOOD), 150))
    )
    for pos in where:
        bad = bytearray(GOOD)
        bad[pos] ^= int(rng.integers(1, 256))
        assert_refused(bytes(bad))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        (0, b"MCZ\x01", "magic"),
        (1, 2, "version"),
        (1, 0, "version"),
        (2, 2, "flags 0x0002"),
        (2, 0x8001, "flags 0x8001"),
        (2, 0, "JSON"),  # the compressed header read as plain JSON
        (3, 2**31, "header length"),
        (3, 2**24, "truncated header"),
        (3, 0, "CRC"),
    ],
)
def test_bad_prefix_fields(field: int, value: Any, match: str) -> None:
    parts = list(PREFIX.unpack(GOOD[:16]))
    parts[field] = value
    assert_refused(PREFIX.pack(*parts) + GOOD[16:], match)


def _mutate(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set (or delete, for ``...``) the header field at a dotted path such as ``tensors.0.n``."""
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]

    def apply(h: dict[str, Any]) -> None:
        node: Any = h
        for k in keys[:-1]:
            node = node[k]
        if value is ...:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return apply


POS = "tensors.0.streams.0"  # fc1.weight positions (ans_bits)
IDX = "tensors.0.streams.1"  # fc1.weight indices
ANS = "tensors.2.streams.1"  # fc2.weight indices (ans)
HEADER_CASES = {
    "shape huge": ("tensors.0.shape", [2**20, 2**20], "limit"),
    "shape one dim huge": ("tensors.4.shape", [2**33], "shape"),
    "shape negative": ("tensors.0.shape", [-60, 50], "shape"),
    "shape zero times huge": ("tensors.0.shape", [0, 2**63], "shape"),
    "shape str": ("tensors.0.shape", "60x50", "shape"),
    "shape floats": ("tensors.0.shape", [60.0, 50.0], "shape"),
    "shape too many dims": ("tensors.0.shape", [1] * 100, "shape"),
    "shape mismatch": ("tensors.0.shape", [50, 60, 1, 2], "symbols"),
    "n_kept huge": ("tensors.0.n_kept", 2**40, "n_kept"),
    "n_kept bool": ("tensors.0.n_kept", True, "n_kept"),
    "n_kept wrong": ("tensors.0.n_kept", 3, "symbols"),
    "n_levels huge": ("tensors.0.n_levels", 2**20, "n_levels"),
    "codebook bad b64": ("tensors.0.codebook", "!!!", "base64"),
    "codebook short": ("tensors.0.codebook", base64.b64encode(b"\0" * 12).decode(), "codebook"),
    "codebook missing": ("tensors.0.codebook", ..., "codebook"),
    "kind unknown": ("tensors.0.kind", "sparse", "kind"),
    "dtype unknown": ("tensors.1.dtype", "float128", "dtype"),
    "dtype quantized": ("tensors.0.dtype", "float16", "float32"),
    "unknown key": ("tensors.0.extra", 1, "unknown"),
    "streams missing": ("tensors.0.streams", ..., "streams"),
    "streams reordered": (
        "tensors.0.streams",
        [{"name": "indices"}, {"name": "positions"}],
        "streams",
    ),
    "stream n huge": (f"{POS}.n", 2**60, "symbols"),
    "stream n negative": (f"{POS}.n", -1, "outside"),
    "stream alphabet": (f"{IDX}.alphabet", 300, "alphabet"),
    "stream alphabet huge": (f"{IDX}.alphabet", 2**40, "alphabet"),
    "stream offset": (f"{IDX}.offset", 10**9, "offset"),
    "stream length": (f"{IDX}.length", 10**9, "beyond"),
    "stream length short": (f"{IDX}.length", 1, "offset"),
    "stream crc": (f"{POS}.crc", 12345, "CRC"),
    "stream crc huge": (f"{POS}.crc", 2**40, "crc"),
    "stream coder": (f"{POS}.coder", "lzma", "coder"),
    "stream coder swap": (f"{POS}.coder", "raw", "bytes"),
    "freqs too long": (f"{ANS}.freqs", [1] * 5, "freqs"),
    "freqs one symbol": (f"{ANS}.freqs", [0, 0, 5], "freqs"),
    "freqs missing": (f"{ANS}.freqs", ..., "freqs"),
    "freqs perturbed": (f"{ANS}.freqs", [1, 1, 1, 1], "left"),
    "bits missing": (f"{POS}.bits", ..., "bits"),
    "bits zero": (f"{POS}.bits", [0, 3], "bits"),
    "bits perturbed": (f"{POS}.bits", [3, 29], "left|keeps"),
    "stream name": (f"{POS}.name", "mask", "streams"),
    "tensor name dup": ("tensors.1.name", "fc1.weight", "twice"),
    "tensor name int": ("tensors.1.name", 7, "name"),
    "payload_bytes": ("payload_bytes", 1, "payload"),
    "payload_bytes str": ("payload_bytes", "1", "payload_bytes"),
    "tensors not list": ("tensors", {"a": 1}, "tensors"),
    "tensors missing": ("tensors", ..., "tensors"),
    "tensor not object": ("tensors.0", [1, 2], "object"),
    "meta list": ("meta", [1], "meta"),
    "plan number": ("plan", 3, "plan"),
    "top unknown": ("surprise", 1, "unknown"),
    "writer not str": ("writer", ["moecomp"], "writer"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_crafted_headers_with_valid_crc_are_refused(case: str) -> None:
    path, value, match = HEADER_CASES[case]
    header, payload = split(GOOD)
    _mutate(path, value)(header)
    assert_refused(build(header, payload), match)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\xff\xfe{}", "JSON"),
        (b"{", "JSON"),
        (b"[1, 2]", "object"),
        (b"", "JSON"),
        (b'{"meta": NaN}', "JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
        (b'{"payload_bytes": ' + b"9" * 10_000 + b"}", "JSON"),
    ],
)
def test_crafted_json_is_refused(raw: bytes, match: str) -> None:
    assert_refused(build(raw, b""), match)
    assert_refused(build(zstd_frame(raw), b"", flags=ZSTD), match)


def _stored_header(data: bytes) -> bytes:
    _, _, _, hlen, _ = PREFIX.unpack(data[:16])
    return data[16 : 16 + hlen]


def _understated_frame() -> bytes:
    """A zstd frame whose header claims 50 content bytes; the data expands to 102."""
    frame = bytearray(zstd_frame(b"{}" + b" " * 100))
    assert frame[4] == 0x20 and frame[5] == 102  # single segment, 1-byte content size
    frame[5] = 50
    return bytes(frame)


GOOD_STORED = _stored_header(GOOD)
BAD_FRAMES = {
    "not a frame": (b"garbage!", "frame header"),
    "empty": (b"", "frame header"),
    "truncated": (GOOD_STORED[:-3], "corrupt"),
    "trailing bytes": (GOOD_STORED + b"\x00", "corrupt"),
    "two frames": (GOOD_STORED + GOOD_STORED, "corrupt"),
    "size not stated": (zstd_frame(b"{}", write_content_size=False), "does not state"),
    "size understated": (_understated_frame(), "corrupt"),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_corrupt_compressed_headers_with_valid_crc_are_refused(case: str) -> None:
    frame, match = BAD_FRAMES[case]
    data = build(frame, split(GOOD)[1], flags=ZSTD)
    for read in (decode_model, inspect_model):
        with pytest.raises(CodecError, match=f"compressed header.*{match}"):
            read(data)


def test_byte_flips_in_a_compressed_header_with_valid_crc_are_handled() -> None:
    """With the CRC recomputed, a flip inside the frame raises CodecError or, where zstd
    decodes it to other valid JSON (say, another codebook), reads as that JSON stored plain."""
    payload = split(GOOD)[1]
    rng = np.random.default_rng(1)
    refused = 0
    for pos in rng.integers(0, len(GOOD_STORED), 200):
        bad = bytearray(GOOD_STORED)
        bad[pos] ^= int(rng.integers(1, 256))
        try:
            out = decode_model(build(bytes(bad), payload, flags=ZSTD))
        except CodecError:
            refused += 1
            continue
        plain = decode_model(build(zstandard.ZstdDecompressor().decompress(bad), payload))
        assert out.state_dict.keys() == plain.state_dict.keys()
        for name, t in plain.state_dict.items():
            assert bits_of(out.state_dict[name]) == bits_of(t)
    assert refused > 150


@pytest.mark.parametrize(
    ("raw", "max_bytes", "match"),
    [
        (b"{" + b" " * MAX_HEADER_BYTES + b"}", None, "over the limit"),
        (b"{" + b" " * 2_000_000 + b"}", 1_000_000, "max_bytes"),  # a small file, a huge header
    ],
)
def test_header_bombs_are_refused_before_allocating(
    raw: bytes, max_bytes: int | None, match: str
) -> None:
    data = build(zstd_frame(raw, level=19), GOOD_PAYLOAD, flags=ZSTD)
    assert len(data) < 10_000
    assert refusal_peak(data, match, max_bytes, readers=(decode_model, inspect_model)) < 200_000


def _with_payload(base: bytes, stream_path: str, new: bytes, **fields: Any) -> bytes:
    """``base`` with one stream's payload replaced and its header entry updated by ``fields``;
    offsets, lengths, CRCs and payload_bytes are kept consistent so only the content is bad."""
    header, payload = split(base)
    streams = [s for t in header["tensors"] for s in t["streams"]]
    t_idx, s_idx = (int(k) for k in stream_path.split(".")[1::2])
    target = header["tensors"][t_idx]["streams"][s_idx]
    chunks = [payload[s["offset"] : s["offset"] + s["length"]] for s in streams]
    for k in ("value", "freqs", "bits"):
        target.pop(k, None)
    target.update(length=len(new), crc=zlib.crc32(new), **fields)
    offset = 0
    for i, s in enumerate(streams):
        if s is target:
            chunks[i] = new
        s["offset"] = offset
        offset += len(chunks[i])
    header["payload_bytes"] = offset
    return build(header, b"".join(chunks))


def test_crafted_payloads_with_valid_crc_are_refused() -> None:
    n_kept = LAYERS["fc1.weight"].n_kept
    too_big = bytes([15] * (n_kept - 1) + [16])  # one index equals the codebook size
    assert_refused(_with_payload(GOOD, IDX, too_big, coder="raw"), "alphabet")
    n_pos = (60 * 50 + 7) // 8
    for mask_bytes in (b"\xff" * n_pos, bytes(n_pos), b"\xff" * (n_pos - 1) + b"\x00"):
        assert_refused(_with_payload(GOOD, POS, mask_bytes, coder="raw"), "keeps")
    bomb = zstandard.ZstdCompressor().compress(bytes(50_000_000))
    assert_refused(_with_payload(GOOD, POS, bomb, coder="zstd"), "claims")
    garbage = np.random.default_rng(0).integers(1, 2**32, 100, dtype=np.uint64)
    words = garbage.astype("<u4").tobytes()
    assert_refused(_with_payload(GOOD, POS, words, coder="ans_bits", bits=[9, 1]), "left|keeps")
    assert_refused(_with_payload(GOOD, ANS, words, coder="ans", freqs=[1, 2, 3, 4]), "left")
    assert_refused(_with_payload(GOOD, POS, b"", coder="const", value=300), "value")
    assert_refused(_with_payload(GOOD, POS, b"", coder="const", value=7), "keeps")


def test_bool_tensors_hold_only_zero_and_one() -> None:
    base = encode_model({}, {"b": torch.tensor([True, False])})
    assert_refused(_with_payload(base, "tensors.0.streams.0", b"\x01\x02", coder="raw"), "0 and 1")


def test_padding_bits_of_the_mask_must_be_zero() -> None:
    q = QuantizedLayer(
        (3,), torch.tensor([True, False, True]), torch.tensor([0, 0]), torch.tensor([1.0])
    )
    base = encode_model({"w": q}, {})
    # 0b1101: the mask's three bits say 101 (as before), the fourth is a stray padding bit
    assert_refused(_with_payload(base, "tensors.0.streams.0", b"\x0d", coder="raw"), "padding")


@pytest.mark.parametrize(
    ("shape", "n_kept", "match", "max_bytes"),
    [
        ([2**15, 2**15], 2**30, "max_bytes", None),  # under the per-tensor limit, over the total
        ([2**20, 2**20], 1, "limit", None),
        ([1000, 1000], 1000, "max_bytes", 1_000_000),
    ],
)
def test_huge_claims_are_refused_before_allocating(
    shape: list[int], n_kept: int, match: str, max_bytes: int | None
) -> None:
    header, payload = split(GOOD)
    t = header["tensors"][0]
    numel = shape[0] * shape[1]
    t.update(shape=shape, n_kept=n_kept)
    t["streams"][0]["n"] = (numel + 7) // 8
    t["streams"][1]["n"] = n_kept
    data = build(header, payload)
    assert refusal_peak(data, match, max_bytes, readers=(decode_model,)) < 2_000_000


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON document."""
    out = [prefix] if prefix else []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else []
    )
    for k, v in items:
        out += _paths(v, (*prefix, k))
    return out


GOOD_HEADER, GOOD_PAYLOAD = split(GOOD)
HEADER_PATHS = _paths(GOOD_HEADER)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(HEADER_PATHS), JSON_VALUES)
def test_any_header_value_swapped_for_any_json_is_handled(
    path: tuple[Any, ...], value: Any
) -> None:
    """Type confusion anywhere in a CRC-valid header: CodecError, or (for a harmless change
    such as a different meta value) a decode that still matches the layers."""
    header = json.loads(json.dumps(GOOD_HEADER))
    node = header
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    data = build(header, GOOD_PAYLOAD)
    try:
        out = decode_model(data)
    except CodecError:
        return
    for name, q in LAYERS.items():
        assert torch.equal(out.state_dict[name], q.dequantize())


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=300)
    | st.binary(max_size=300).map(lambda b: GOOD[:4] + b)
    | st.binary(max_size=300).map(lambda b: build(b, b""))
    | st.binary(max_size=300).map(lambda b: build(b, b"", flags=ZSTD))
    | st.binary(max_size=300).map(lambda b: build(split(GOOD)[0], b))
)
def test_arbitrary_bytes_raise_only_codec_errors(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_model(data)
    with pytest.raises(CodecError):
        inspect_model(data)


@pytest.mark.parametrize("name", ["", "fc9.weight"])
def test_a_renamed_compressed_tensor_is_refused(name: str) -> None:
    header, payload = split(GOOD)
    header["tensors"][0]["name"] = name
    with pytest.raises(CodecError, match="empty|plan compresses"):
        decode_model(build(header, payload))
