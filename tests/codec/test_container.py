"""The .mcz container: bit-exact round trips, inspect, files and input validation."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from moecomp.apply import QuantizedLayer, apply_plan
from moecomp.codec import (
    DTYPES,
    FLAG_HEADER_ZSTD,
    decode_model,
    encode_model,
    inspect_mcz,
    inspect_model,
    read_mcz,
    write_mcz,
)
from moecomp.errors import CodecError
from moecomp.plan import CompressionPlan
from moecomp.relevance.base import scores_to_ranks

PREFIX = struct.Struct("<4sHHII")  # magic, version, flags, header length, header CRC32

SPECIAL_FLOATS = [
    0.0,
    -0.0,
    1e-45,
    -1e-45,
    1.17549435e-38,
    3.4028235e38,
    -3.4028235e38,
    math.inf,
    -math.inf,
    math.nan,
]


def make_layer(
    shape: tuple[int, ...],
    sparsity: float,
    k: int,
    *,
    seed: int,
    codebook: list[float] | None = None,
) -> QuantizedLayer:
    rng = np.random.default_rng(seed)
    numel = math.prod(shape)
    mask = rng.random(numel) >= sparsity
    indices = rng.integers(0, k, int(mask.sum())) if k else np.zeros(0, dtype=np.int64)
    cb = np.array(codebook if codebook is not None else rng.standard_normal(k), dtype=np.float32)
    return QuantizedLayer(
        shape=shape,
        mask=torch.from_numpy(mask).reshape(shape),
        indices=torch.from_numpy(indices.astype(np.int64)),
        codebook=torch.from_numpy(cb),
    )


def bits_of(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor, so NaN payloads and -0.0 compare exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_layer(a: QuantizedLayer, b: QuantizedLayer) -> None:
    assert a.shape == b.shape
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.indices.to(torch.int64), b.indices)
    assert bits_of(a.codebook) == bits_of(b.codebook)


@st.composite
def layers(draw: st.DrawFn) -> QuantizedLayer:
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    if draw(st.booleans()) and ndim in (1, 2):
        shape = tuple(draw(st.integers(30, 300)) for _ in range(ndim))
    sparsity = draw(st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.97, 0.999]) | st.floats(0, 0.999))
    bits = draw(st.integers(1, 8))
    k = 2**bits if draw(st.booleans()) else draw(st.integers(1, 2**bits))
    cb = draw(
        st.lists(st.sampled_from(SPECIAL_FLOATS) | st.floats(width=32), min_size=k, max_size=k)
    )
    return make_layer(shape, sparsity, k, seed=draw(st.integers(0, 2**32 - 1)), codebook=cb)


@st.composite
def dense_tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
    n = math.prod(shape) * dtype.itemsize
    raw = np.frombuffer(draw(st.binary(min_size=n, max_size=n)), dtype=np.uint8).copy()
    if dtype == torch.bool:
        raw &= 1
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(raw).view(dtype).reshape(shape)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@settings(max_examples=60, deadline=None)
@given(
    st.lists(layers(), min_size=0, max_size=3),
    st.lists(dense_tensors(), min_size=0, max_size=3),
    st.randoms(use_true_random=False),
)
def test_round_trip_is_bit_exact(
    qs: list[QuantizedLayer], ds: list[torch.Tensor], rnd: Any
) -> None:
    layers_in = {f"l{i}.weight": q for i, q in enumerate(qs)}
    dense_in = {f"d{i}.bias": d for i, d in enumerate(ds)}
    order = list(layers_in) + list(dense_in)
    rnd.shuffle(order)
    plan = {"layers": {n: {"sparsity": 0.5, "bits": 4} for n in layers_in}} if qs else None
    data = encode_model(layers_in, dense_in, plan=plan, meta={"seed": 3}, order=order)
    out = decode_model(data)
    assert list(out.state_dict) == order
    assert list(out.layers) == [n for n in order if n in layers_in]
    for name, q in layers_in.items():
        assert_same_layer(q, out.layers[name])
        expected = q.dequantize()
        got = out.state_dict[name]
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert bits_of(got) == bits_of(expected)
    for name, d in dense_in.items():
        got = out.state_dict[name]
        assert got.dtype == d.dtype and got.shape == d.shape
        assert bits_of(got) == bits_of(d)
    assert out.plan == plan and out.meta == {"seed": 3}
    assert encode_model(layers_in, dense_in, plan=plan, meta={"seed": 3}, order=order) == data


def test_default_order_is_layers_then_dense() -> None:
    q = make_layer((4, 4), 0.5, 4, seed=0)
    out = decode_model(encode_model({"w": q}, {"b": torch.zeros(4)}))
    assert list(out.state_dict) == ["w", "b"]
    assert out.plan is None and out.meta == {}


def test_dense_layer_positions_cost_nothing() -> None:
    q = make_layer((300, 100), 0.0, 16, seed=1)
    out = decode_model(encode_model({"w": q}, {}))
    pos = next(s for s in out.streams if s.stream == "positions")
    assert pos.coder == "const" and pos.coded_bytes == 0


def test_sparse_layer_codes_near_entropy() -> None:
    rng = np.random.default_rng(2)
    mask = rng.random(1_000_000) >= 0.9
    idx = np.clip(np.rint(rng.laplace(7.5, 2.0, int(mask.sum()))), 0, 15).astype(np.int64)
    q = QuantizedLayer(
        (1000, 1000),
        torch.from_numpy(mask).reshape(1000, 1000),
        torch.from_numpy(idx),
        torch.linspace(-1, 1, 16),
    )
    out = decode_model(encode_model({"w": q}, {}))
    pos, ind = out.streams
    d = mask.mean()
    h_mask = 1e6 * -(d * math.log2(d) + (1 - d) * math.log2(1 - d)) / 8
    p = np.bincount(idx, minlength=16) / idx.size
    h_idx = -idx.size * float((p[p > 0] * np.log2(p[p > 0])).sum()) / 8
    assert pos.coder == "ans_bits" and pos.coded_bytes + pos.model_bytes < 1.001 * h_mask
    assert ind.coder == "ans" and ind.coded_bytes + ind.model_bytes < 1.005 * h_idx


def test_inspect_reports_each_tensor() -> None:
    q = make_layer((100, 50), 0.8, 13, seed=4)
    data = encode_model({"fc.weight": q}, {"fc.bias": torch.ones(100, dtype=torch.float16)})
    rows = inspect_model(data)
    w, b = rows
    assert (w.name, w.kind, w.shape, w.n_levels, w.bits) == (
        "fc.weight",
        "quantized",
        (100, 50),
        13,
        4,
    )
    assert w.sparsity == pytest.approx(1 - q.n_kept / 5000)
    streams = decode_model(data).streams
    assert w.coded_bytes == sum(s.coded_bytes + s.model_bytes for s in streams[:2]) + 13 * 4
    assert w.coders == tuple(s.coder for s in streams[:2])
    assert (b.kind, b.dtype, b.bits, b.n_levels, b.sparsity) == ("dense", "float16", 16, None, 0.0)


def test_files_round_trip_and_respect_the_size_limit(tmp_path: Path) -> None:
    q = make_layer((20, 20), 0.5, 4, seed=5)
    path = tmp_path / "m.mcz"
    n = write_mcz(path, {"w": q}, {"b": torch.arange(3)}, meta={"note": "x"})
    assert path.stat().st_size == n and not list(tmp_path.glob(".*.tmp"))
    out = read_mcz(path)
    assert_same_layer(q, out.layers["w"])
    assert torch.equal(out.state_dict["b"], torch.arange(3))
    assert inspect_mcz(path) == inspect_model(path.read_bytes())
    with pytest.raises(CodecError, match="max_bytes"):
        read_mcz(path, max_bytes=n - 1)
    with pytest.raises(CodecError, match="max_bytes"):
        inspect_mcz(path, max_bytes=n - 1)
    with pytest.raises(CodecError, match="max_bytes"):
        decode_model(path.read_bytes(), max_bytes=n + 100)  # decoded tensors need more


@pytest.fixture(scope="module")
def digits_file(digits_target: Any) -> bytes:
    """The .mcz bytes of the trained digits MLP at 70 % sparsity and 4 bits, plan included."""
    weights = digits_target.weights()
    ranks = {n: scores_to_ranks(w.abs()) for n, w in weights.items()}
    plan = CompressionPlan.uniform(list(weights), sparsity=0.7, bits=4)
    layers = apply_plan(plan, weights, ranks)
    state = digits_target.state_dict()
    dense = {k: v for k, v in state.items() if k not in layers}
    return encode_model(layers, dense, plan=plan.to_dict(), meta={"x": 1}, order=list(state))


def stored_header(data: bytes) -> tuple[int, bytes, bytes]:
    """(flags, header as stored, payload) of a file."""
    _, _, flags, hlen, _ = PREFIX.unpack(data[: PREFIX.size])
    return flags, data[PREFIX.size : PREFIX.size + hlen], data[PREFIX.size + hlen :]


def test_the_header_is_stored_zstd_compressed_and_smaller(digits_file: bytes) -> None:
    flags, stored, _ = stored_header(digits_file)
    assert flags == FLAG_HEADER_ZSTD
    header_json = zstandard.ZstdDecompressor().decompress(stored)
    header = json.loads(header_json)
    assert any("freqs" in s for t in header["tensors"] for s in t["streams"])  # ANS tables
    assert len(stored) < 0.6 * len(header_json)


def test_a_plain_json_header_reads_as_before(digits_file: bytes, tmp_path: Path) -> None:
    """Files with flags 0 hold the header as plain JSON; they decode to the same model."""
    _, stored, payload = stored_header(digits_file)
    plain = zstandard.ZstdDecompressor().decompress(stored)
    prefix = PREFIX.pack(b"MCZ\x00", 1, 0, len(plain), zlib.crc32(plain))
    old = prefix + plain + payload
    assert len(old) > len(digits_file)
    new_model, old_model = decode_model(digits_file), decode_model(old)
    assert list(old_model.state_dict) == list(new_model.state_dict)
    for name, t in new_model.state_dict.items():
        assert bits_of(old_model.state_dict[name]) == bits_of(t)
    assert (old_model.plan, old_model.meta) == (new_model.plan, new_model.meta)
    assert old_model.streams == new_model.streams
    path = tmp_path / "old.mcz"
    path.write_bytes(old)
    assert inspect_mcz(path) == inspect_model(digits_file)
    assert read_mcz(path).plan == new_model.plan


def _bad(**kw: Any) -> QuantizedLayer:
    base = dict(
        shape=(2, 3),
        mask=torch.tensor([[True, False, True], [False, False, True]]),
        indices=torch.tensor([0, 1, 1]),
        codebook=torch.tensor([0.5, -0.5]),
    )
    base.update(kw)
    return QuantizedLayer(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("layers_in", "dense_in", "kwargs", "match"),
    [
        ({"w": _bad(mask=torch.ones(3, 2, dtype=torch.bool))}, {}, {}, "mask"),
        ({"w": _bad(mask=torch.ones(2, 3))}, {}, {}, "mask"),
        ({"w": _bad(indices=torch.tensor([0, 1]))}, {}, {}, "indices"),
        ({"w": _bad(indices=torch.tensor([0, 1, 2]))}, {}, {}, "alphabet"),
        ({"w": _bad(indices=torch.tensor([0.0, 1.0, 1.0]))}, {}, {}, "integer"),
        ({"w": _bad(codebook=torch.tensor([0.5, -0.5], dtype=torch.float64))}, {}, {}, "float32"),
        ({"w": _bad(shape=(2, -3))}, {}, {}, "shape"),
        ({"w": "not a layer"}, {}, {}, "QuantizedLayer"),
        ({"w": _bad()}, {"w": torch.zeros(1)}, {}, "both"),
        ({"w": _bad()}, {"b": torch.zeros(2).to_sparse()}, {}, "unsupported"),
        ({"w": _bad()}, {"b": [1.0]}, {}, "torch.Tensor"),
        ({"w": _bad()}, {}, {"order": ["w", "w"]}, "order"),
        ({"w": _bad()}, {}, {"order": ["x"]}, "order"),
        ({"w": _bad()}, {}, {"meta": {"acc": math.nan}}, "JSON"),
        ({"w": _bad()}, {}, {"meta": {"x": object()}}, "JSON"),
        ({"w": _bad()}, {}, {"plan": [1, 2]}, "plan"),
        ({"": _bad()}, {}, {}, "names"),
    ],
)
def test_encode_refuses_inconsistent_input(
    layers_in: dict[str, Any], dense_in: dict[str, Any], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(CodecError, match=match):
        encode_model(layers_in, dense_in, **kwargs)
