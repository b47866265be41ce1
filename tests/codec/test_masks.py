"""The ans_mask coder: exact round trips, a deterministic model, smaller files, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moecomp.apply import QuantizedLayer
from moecomp.codec import decode_model, encode_model
from moecomp.codec.masks import (
    MASK_CODER,
    _block_probs,
    _blocks,
    _ones_before,
    decode_mask,
    encode_mask,
    estimate_mask_bytes,
    grid_of,
    mask_cost_bits,
    worth_trying,
)
from moecomp.codec.streams import encode_stream
from moecomp.errors import CodecError


def structured_mask(rng: np.random.Generator, rows: int, cols: int, density: float) -> np.ndarray:
    """Rows with very different rates and columns some rows never use: what pruning gives."""
    row_rate = rng.gamma(0.7, 1.0, rows)
    col_rate = rng.gamma(0.5, 1.0, cols) * (rng.random(cols) < 0.7)
    p = np.outer(row_rate, col_rate)
    p *= density / max(p.mean(), 1e-12)
    return rng.random((rows, cols)) < np.clip(p, 0, 1)


def decode(cs) -> np.ndarray:
    return decode_mask(cs.payload, cs.n, cs.params)


@st.composite
def masks(draw: st.DrawFn) -> np.ndarray:
    rows = draw(st.integers(2, 40))
    cols = draw(st.integers(2, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["structured", "iid", "empty", "full", "rows"]))
    if kind == "structured":
        return structured_mask(rng, rows, cols, draw(st.floats(0.001, 0.9)))
    if kind == "iid":
        return rng.random((rows, cols)) < draw(st.floats(0.0, 1.0))
    if kind == "empty":
        return np.zeros((rows, cols), dtype=bool)
    if kind == "full":
        return np.ones((rows, cols), dtype=bool)
    m = np.zeros((rows, cols), dtype=bool)  # whole rows kept or dropped, a few mixed
    m[rng.random(rows) < 0.5] = True
    m[rng.integers(rows)] = rng.random(cols) < 0.3
    return m


@settings(max_examples=150, deadline=None)
@given(masks())
def test_round_trip_gives_the_packed_mask(m):
    cs = encode_mask(m)
    assert cs is not None and cs.coder == MASK_CODER
    assert cs.n == (m.size + 7) // 8
    np.testing.assert_array_equal(decode(cs), np.packbits(m.reshape(-1), bitorder="little"))


def encoder_probs(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = m.sum(1)
    before = _ones_before(counts)
    probs = np.concatenate([_block_probs(m, counts, before, r0, r1, col)
                            for r0, r1, col in _blocks(m)])
    return counts, (counts > 0) & (counts < m.shape[1]), probs


@pytest.mark.parametrize("block", [2**20, 1000, 1])
def test_probabilities_do_not_depend_on_the_block(monkeypatch, block):
    """The decoder computes one row at a time; any block must give the same bits."""
    rng = np.random.default_rng(1)
    m = structured_mask(rng, 50, 333, 0.05)
    _, _, whole = encoder_probs(m)
    monkeypatch.setattr("moecomp.codec.masks.BLOCK_ELEMENTS", block)
    counts, coded, probs = encoder_probs(m)
    assert probs.tobytes() == whole.tobytes()  # same bits, not just close
    # row i does not read its own bits (the decoder has not decoded them yet)
    c = np.zeros(m.shape[1], dtype=np.int64)
    blank = m.copy()
    for i in range(m.shape[0]):
        blank[i] = False
        row = _block_probs(blank, counts, _ones_before(counts), i, i + 1, c)[0]
        assert row.tobytes() == whole[i].tobytes()
        blank[i] = m[i]
        c += m[i]
    cs = encode_mask(m)
    np.testing.assert_array_equal(decode(cs), np.packbits(m.reshape(-1), bitorder="little"))
    assert ((probs > 0) & (probs < 1)).all()
    assert (probs * 2**16 == np.round(probs * 2**16)).all()


def test_code_length_is_near_the_model_and_below_the_iid_coders():
    rng = np.random.default_rng(2)
    m = structured_mask(rng, 300, 784, 0.06)
    cs = encode_mask(m)
    counts = encode_stream(m.sum(1), 785)
    bits_part = len(cs.payload) - len(counts.payload)
    ideal = mask_cost_bits(m) / 8
    assert ideal * 0.999 <= bits_part <= ideal * 1.01 + 8
    generic = encode_stream(np.packbits(m.reshape(-1), bitorder="little"), 256)
    assert cs.cost < 0.9 * generic.cost, (cs.cost, generic.cost)
    payload, model = estimate_mask_bytes(m)
    assert abs(payload - len(cs.payload)) <= 8 and model == cs.model_bytes


def test_empty_and_full_rows_cost_only_their_counts():
    m = np.zeros((64, 500), dtype=bool)
    m[::3] = True
    cs = encode_mask(m)
    counts = encode_stream(m.sum(1), 501)
    assert len(cs.payload) == len(counts.payload)
    np.testing.assert_array_equal(decode(cs), np.packbits(m.reshape(-1), bitorder="little"))


def test_grid_of_refuses_what_the_coder_cannot_take():
    assert grid_of((300, 784)) == (300, 784)
    assert grid_of((6, 1, 5, 5)) == (6, 25)
    assert grid_of((100,)) is None and grid_of((1, 50)) is None and grid_of((50, 1)) is None
    assert grid_of((4, 2**16)) is None  # counts would not fit a 16-bit alphabet
    assert grid_of((2**20, 2**12)) is None  # the model's integers would pass 2**53
    assert encode_mask(np.zeros(10, dtype=bool)) is None


def test_container_keeps_the_cheaper_coder_and_round_trips():
    rng = np.random.default_rng(3)
    m = structured_mask(rng, 120, 400, 0.05)
    w = torch.from_numpy(rng.normal(size=m.shape).astype(np.float32))
    idx = torch.from_numpy(rng.integers(0, 8, int(m.sum())))
    layer = QuantizedLayer(m.shape, torch.from_numpy(m), idx, torch.linspace(-1, 1, 8))
    small = QuantizedLayer((12,), torch.ones(12, dtype=torch.bool), torch.arange(12) % 2,
                           torch.tensor([-1.0, 1.0]))
    blob = encode_model({"a.weight": layer, "b.weight": small}, {"a.bias": w[0]})
    out = decode_model(blob)
    coders = {(s.tensor, s.stream): s.coder for s in out.streams}
    assert coders[("a.weight", "positions")] == MASK_CODER
    assert coders[("b.weight", "positions")] != MASK_CODER  # 1-D: the generic coders
    assert torch.equal(out.layers["a.weight"].mask, layer.mask)
    assert torch.equal(out.layers["a.weight"].indices, idx)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"grid": [7, 9]}, "grid"),
        ({"grid": "30x40"}, "grid"),
        ({"grid": [30, 40, 1]}, "grid"),
        ({"counts": None}, "counts"),
        ({"counts": {"coder": "raw"}}, "counts"),
        ({"counts": {"coder": "raw", "length": 10**9}}, "counts"),
        ({"counts": {"coder": "raw", "length": 0, "evil": 1}}, "counts"),
        ({"counts": {"coder": "nope", "length": 0}}, "coder"),
    ],
)
def test_bad_parameters_are_refused_with_a_message(change, match):
    rng = np.random.default_rng(4)
    cs = encode_mask(structured_mask(rng, 30, 40, 0.2))
    with pytest.raises(CodecError, match=match):
        decode_mask(cs.payload, cs.n, {**cs.params, **change})


def test_corrupt_payloads_raise_codec_errors_only():
    rng = np.random.default_rng(5)
    m = structured_mask(rng, 40, 200, 0.1)
    cs = encode_mask(m)
    good = np.packbits(m.reshape(-1), bitorder="little")
    refused = 0
    for _ in range(60):
        data = bytearray(cs.payload)
        pos = int(rng.integers(len(data)))
        data[pos] ^= 1 << int(rng.integers(8))
        try:
            out = decode_mask(bytes(data), cs.n, cs.params)
        except CodecError:
            refused += 1
            continue
        assert out.shape == good.shape  # a flip may survive only as another valid mask
    assert refused > 50
    with pytest.raises(CodecError):
        decode_mask(cs.payload[:-4], cs.n, cs.params)
    with pytest.raises(CodecError):
        decode_mask(cs.payload + b"\0\0\0\1", cs.n, cs.params)
    with pytest.raises(CodecError, match="multiple of 4"):
        decode_mask(cs.payload[:-1], cs.n, cs.params)


def test_cost_bits_is_the_sum_of_per_bit_code_lengths():
    rng = np.random.default_rng(7)
    big = structured_mask(rng, 200, 500, 0.08)
    _, coded, probs = encoder_probs(big)
    exact = -(np.log2(np.where(big, probs, 1 - probs))[coded]).sum()
    assert mask_cost_bits(big) == pytest.approx(exact, rel=1e-4)
    m = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]], bool)
    counts, coded, probs = encoder_probs(m)
    want = sum(-math.log2(probs[i, j] if m[i, j] else 1 - probs[i, j])
               for i in range(5) if coded[i] for j in range(4))
    assert mask_cost_bits(m) == pytest.approx(want, rel=1e-3)  # float32, unrounded
    assert list(coded) == [True, True, False, False, True]


@pytest.mark.parametrize("density", [0.03, 0.1, 0.5])
def test_iid_masks_are_not_tried_and_would_not_have_won(density):
    rng = np.random.default_rng(6)
    m = rng.random((300, 784)) < density
    assert not worth_trying(m)
    generic = encode_stream(np.packbits(m.reshape(-1), bitorder="little"), 256)
    assert encode_mask(m).cost > 0.99 * generic.cost  # skipping it loses under 1 %
    assert worth_trying(structured_mask(rng, 300, 784, density))
    assert not worth_trying(np.zeros((30, 40), bool)) and not worth_trying(np.ones((30, 40), bool))
