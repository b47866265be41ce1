"""Coder contract: every coder round-trips every stream; the chosen one is the cheapest."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from moecomp.codec.streams import (
    CODERS,
    MAX_ALPHABET,
    CodedStream,
    bit_byte_weights,
    bit_counts,
    choose_freqs,
    decode_stream,
    encode_stream,
    order0_entropy_bits,
    quantize_freqs,
    symbol_dtype,
    table_bytes,
    zstd_compress,
    zstd_decompress,
)
from moecomp.errors import CodecError


def roundtrip(cs: CodedStream) -> np.ndarray:
    return decode_stream(cs.payload, coder=cs.coder, n=cs.n, alphabet=cs.alphabet, params=cs.params)


@st.composite
def streams(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    alphabet = draw(st.sampled_from([1, 2, 3, 16, 255, 256, 257, 1000, MAX_ALPHABET]))
    n = draw(st.integers(0, 3000))
    seed = draw(st.integers(0, 2**32 - 1))
    shape = draw(st.sampled_from(["uniform", "skewed", "constant", "two"]))
    rng = np.random.default_rng(seed)
    if shape == "uniform":
        sym = rng.integers(0, alphabet, n)
    elif shape == "skewed":
        sym = np.minimum(rng.geometric(0.6, n) - 1, alphabet - 1)
    elif shape == "constant":
        sym = np.full(n, int(rng.integers(0, alphabet)))
    else:
        sym = np.where(rng.random(n) < 0.999, 0, alphabet - 1)
    return sym.astype(draw(st.sampled_from([np.int64, np.int32, np.uint16]))), alphabet


@settings(max_examples=150, deadline=None)
@given(
    streams(),
    st.sampled_from([CODERS, ("raw",), ("zstd",), ("ans",), ("ans_bits",), ("raw", "zstd")]),
)
def test_every_coder_round_trips(stream: tuple[np.ndarray, int], coders: tuple[str, ...]) -> None:
    sym, alphabet = stream
    cs = encode_stream(sym, alphabet, coders=coders)
    out = roundtrip(cs)
    assert out.dtype == symbol_dtype(alphabet)
    np.testing.assert_array_equal(out, sym)
    assert cs.coder in (*coders, "const", "raw")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5000), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_ans_bits_round_trips_packed_masks(n: int, density: float, seed: int) -> None:
    mask = np.random.default_rng(seed).random(n) < density
    packed = np.packbits(mask, bitorder="little")
    cs = encode_stream(packed, 256, coders=("ans_bits",))
    np.testing.assert_array_equal(roundtrip(cs), packed)


@settings(max_examples=60, deadline=None)
@given(streams())
def test_choice_is_the_cheapest(stream: tuple[np.ndarray, int]) -> None:
    sym, alphabet = stream
    best = encode_stream(sym, alphabet)
    for c in ("raw", "zstd", "ans", "ans_bits"):
        assert best.cost <= encode_stream(sym, alphabet, coders=(c,)).cost


@pytest.mark.parametrize("alphabet", [0, 1, 256])
def test_empty_stream_costs_nothing(alphabet: int) -> None:
    cs = encode_stream(np.zeros(0, dtype=np.int64), alphabet)
    assert (cs.coder, cs.payload, cs.n) == ("const", b"", 0)
    assert roundtrip(cs).shape == (0,)


def test_constant_stream_costs_nothing() -> None:
    cs = encode_stream(np.full(1_000_000, 7), 16)
    assert cs.coder == "const" and cs.payload == b"" and cs.cost < 16
    np.testing.assert_array_equal(roundtrip(cs), np.full(1_000_000, 7))


def test_ans_codes_near_order0_entropy() -> None:
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.015, 0.005])
    sym = rng.choice(8, size=200_000, p=p)
    cs = encode_stream(sym, 8)
    h_bytes = order0_entropy_bits(np.bincount(sym, minlength=8)) / 8
    assert cs.coder == "ans"
    assert len(cs.payload) <= 1.002 * h_bytes + 8


def test_ans_bits_codes_a_small_mask_at_its_entropy() -> None:
    rng = np.random.default_rng(4)
    mask = rng.random(3000) < 0.1  # a 60x50 layer at 90 % sparsity
    packed = np.packbits(mask, bitorder="little")
    cs = encode_stream(packed, 256)
    p = mask.mean()
    h_bytes = -3000 * (p * np.log2(p) + (1 - p) * np.log2(1 - p)) / 8
    assert cs.coder == "ans_bits" and cs.cost <= 1.02 * h_bytes + 24


def test_bit_counts_and_weights() -> None:
    counts = np.zeros(256, dtype=np.int64)
    counts[0b1011] = 2
    counts[0] = 1
    np.testing.assert_array_equal(bit_counts(counts), [24 - 6, 6])
    w = bit_byte_weights(3, 1)
    assert w[0] == 3.0**8 and w[255] == 1.0 and w[0b1011] == 3.0**5


def test_zstd_wins_on_runs() -> None:
    sym = np.repeat(np.arange(16) % 3, 10_000)  # long runs: order-0 cannot see them
    assert encode_stream(sym, 3).coder == "zstd"


def test_tiny_streams_go_raw() -> None:
    assert encode_stream(np.array([0, 1, 2]), 3).coder == "raw"


def test_quantize_freqs_keeps_rare_symbols() -> None:
    counts = np.array([10**9, 1, 0, 5000])
    q = quantize_freqs(counts, total=2**16)
    assert q[1] >= 1 and q[2] == 0 and q.sum() <= 2**16 + 4
    small = np.array([3, 0, 1])
    np.testing.assert_array_equal(quantize_freqs(small, total=16), small)


def test_stored_histogram_is_short_for_small_streams_and_trimmed() -> None:
    rng = np.random.default_rng(3)
    small = np.bincount(rng.geometric(0.3, 300) - 1, minlength=256)
    large = np.bincount(rng.geometric(0.3, 10**6) - 1, minlength=256)
    q_small, q_large = choose_freqs(small), choose_freqs(large)
    assert q_small[-1] > 0 and len(q_small) < 256
    assert table_bytes(q_small) < table_bytes(q_large)
    for c, q in ((small, q_small), (large, q_large)):
        assert np.all(q[c[: len(q)] > 0] > 0) and np.all(c[len(q) :] == 0)
    assert table_bytes(np.array([0, 12, 345])) == len("[0,12,345]")


def test_order0_entropy_known_answer() -> None:
    assert order0_entropy_bits(np.array([2, 2])) == pytest.approx(4.0)
    assert order0_entropy_bits(np.array([0, 0])) == 0.0


@pytest.mark.parametrize(
    ("symbols", "alphabet"),
    [(np.array([0, 3]), 3), (np.array([-1, 0]), 4), (np.array([0.5, 1.0]), 4), (np.array([1]), -1)],
)
def test_encode_refuses_bad_symbols(symbols: np.ndarray, alphabet: int) -> None:
    with pytest.raises(CodecError):
        encode_stream(symbols, alphabet)


def _ans_stream() -> CodedStream:
    cs = encode_stream(np.random.default_rng(1).integers(0, 5, 5000), 5)
    assert cs.coder == "ans"
    return cs


def _zstd_stream() -> CodedStream:
    cs = encode_stream(np.repeat(np.arange(4), 5000), 4)
    assert cs.coder == "zstd"
    return cs


BAD_DECODES = {
    "unknown coder": dict(payload=b"", coder="lzma", n=1, alphabet=2, params={}),
    "negative n": dict(payload=b"", coder="const", n=-1, alphabet=2, params={"value": 0}),
    "alphabet too big": dict(payload=b"", coder="raw", n=1, alphabet=2**20, params={}),
    "raw short": dict(payload=b"\x00", coder="raw", n=2, alphabet=2, params={}),
    "raw outside alphabet": dict(payload=b"\x00\x05", coder="raw", n=2, alphabet=3, params={}),
    "raw empty must be const": dict(payload=b"", coder="raw", n=0, alphabet=2, params={}),
    "const with payload": dict(payload=b"x", coder="const", n=1, alphabet=2, params={"value": 0}),
    "const value too big": dict(payload=b"", coder="const", n=1, alphabet=2, params={"value": 2}),
    "const value bool": dict(payload=b"", coder="const", n=1, alphabet=2, params={"value": True}),
    "const value missing": dict(payload=b"", coder="const", n=1, alphabet=2, params={}),
    "zstd garbage": dict(payload=b"garbage!", coder="zstd", n=8, alphabet=256, params={}),
    "ans not words": dict(payload=b"abc", coder="ans", n=3, alphabet=2, params={"freqs": [1, 1]}),
    "ans zero word": dict(
        payload=b"\x00\x00\x00\x00", coder="ans", n=3, alphabet=2, params={"freqs": [1, 1]}
    ),
    "ans freqs long": dict(payload=b"", coder="ans", n=3, alphabet=2, params={"freqs": [1, 1, 1]}),
    "ans freqs one symbol": dict(
        payload=b"", coder="ans", n=3, alphabet=2, params={"freqs": [0, 5]}
    ),
    "ans freqs not ints": dict(
        payload=b"", coder="ans", n=3, alphabet=2, params={"freqs": [0.5, 5]}
    ),
    "ans_bits wrong alphabet": dict(
        payload=b"", coder="ans_bits", n=3, alphabet=16, params={"bits": [1, 1]}
    ),
    "ans_bits zero count": dict(
        payload=b"", coder="ans_bits", n=3, alphabet=256, params={"bits": [0, 1]}
    ),
    "ans_bits missing": dict(payload=b"", coder="ans_bits", n=3, alphabet=256, params={}),
    "ans_bits three": dict(
        payload=b"", coder="ans_bits", n=3, alphabet=256, params={"bits": [1, 1, 1]}
    ),
    "ans freqs negative": dict(
        payload=b"", coder="ans", n=3, alphabet=2, params={"freqs": [-1, 5]}
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DECODES))
def test_decode_refuses_bad_streams(case: str) -> None:
    with pytest.raises(CodecError):
        decode_stream(**BAD_DECODES[case])  # type: ignore[arg-type]


def test_ans_leftover_data_is_refused() -> None:
    cs = _ans_stream()
    with pytest.raises(CodecError, match="left"):
        decode_stream(cs.payload, coder="ans", n=cs.n - 100, alphabet=5, params=cs.params)


def test_zstd_frame_must_claim_the_expected_size() -> None:
    cs = _zstd_stream()
    with pytest.raises(CodecError, match="claims"):
        decode_stream(cs.payload, coder="zstd", n=cs.n - 1, alphabet=4, params={})
    bomb = zstandard.ZstdCompressor().compress(bytes(10_000_000))
    with pytest.raises(CodecError, match="claims"):
        decode_stream(bomb, coder="zstd", n=100, alphabet=256, params={})
    trailing = cs.payload + b"\x00"
    with pytest.raises(CodecError):
        decode_stream(trailing, coder="zstd", n=cs.n, alphabet=4, params={})


def test_zstd_decompress_up_to_a_limit() -> None:
    frame = zstd_compress(b"x" * 1000, level=19)
    assert zstd_decompress(frame, 1000, exact=False) == b"x" * 1000
    assert zstd_decompress(frame, 5000, exact=False) == b"x" * 1000
    with pytest.raises(CodecError, match="claims 1000 bytes, expected 5000"):
        zstd_decompress(frame, 5000)
    with pytest.raises(CodecError, match="claims 1000 bytes, over the limit of 999"):
        zstd_decompress(frame, 999, exact=False)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 1000)
    with pytest.raises(CodecError, match="does not state"):
        zstd_decompress(unsized, 5000, exact=False)
