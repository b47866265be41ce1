"""Hostile files with valid CRCs (huge shapes, tall grids, many tensors, payloads of a few
bytes that decode to millions of symbols): decoding either refuses them or finishes with its
time and peak memory bounded by what ``max_bytes`` allows, never by what the header claims.

Time is measured in work units, not seconds: the CPU time a benign file takes per byte of
``decode_cost`` on this machine, now (``ns_per_cost_byte``); a hostile file may take at most
``SLACK`` times that per byte of ``max_bytes``. Memory is measured with tracemalloc (numpy's
buffers are traced; decoding allocates no torch storage of its own)."""

from __future__ import annotations

import math
import time
import tracemalloc
from typing import Any

import hostile as H  # tests/codec/hostile.py (pytest puts this folder on sys.path)
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecomp.apply import QuantizedLayer
from moecomp.codec import DecodedModel, decode_model, encode_model, inspect_model
from moecomp.codec.container import GRID_ROW_COST, TENSOR_COST
from moecomp.errors import CodecError

MAX_BYTES = 32 * 2**20
SLACK = 10.0
"""Allowed CPU time per byte of max_bytes, in units of a benign file's time per cost byte:
hostile steps measured 1-3x the benign rate (BENCHMARKS.md, "Hostile files"); 10 absorbs a
busy machine."""
FIXED_S = 0.3
"""Plus a constant: the header's JSON (at most MAX_HEADER_BYTES) is parsed whatever follows."""
PER_TENSOR_BYTES = 8 * 2**10
"""Python objects per tensor (its header entry, stream records, state_dict entry), measured
at 2-4 KB; TENSOR_COST charges 32 KiB."""


def output_bytes(d: DecodedModel) -> int:
    """Bytes of the decoded tensors: the state_dict and the quantized layers' masks,
    indices and codebooks."""
    n = sum(t.numel() * t.element_size() for t in d.state_dict.values())
    for q in d.layers.values():
        n += sum(t.numel() * t.element_size() for t in (q.mask, q.indices, q.codebook))
    return n


def cpu_seconds(data: bytes, max_bytes: int) -> tuple[float, DecodedModel | None]:
    t0 = time.process_time()
    try:
        out: DecodedModel | None = decode_model(data, max_bytes=max_bytes)
    except CodecError:
        out = None
    return time.process_time() - t0, out


def peak_bytes(data: bytes, max_bytes: int) -> int:
    tracemalloc.start()
    try:
        decode_model(data, max_bytes=max_bytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return int(peak)


@pytest.fixture(scope="module")
def ns_per_cost_byte() -> float:
    """CPU seconds per byte of decode_cost of benign files (a random mask at three
    densities, dense floats): the slowest of them, best of three runs each."""
    rng = np.random.default_rng(0)
    files = []
    for density in (0.1, 0.5, 0.9):
        shape = (500, 1000)
        mask = rng.random(shape) < density
        layer = QuantizedLayer(shape, torch.from_numpy(mask),
                               torch.from_numpy(rng.integers(0, 16, int(mask.sum()))),
                               torch.from_numpy(rng.standard_normal(16).astype(np.float32)))
        files.append(encode_model({"w": layer}, {"b": torch.randn(500_000)}))
    rates = []
    for data in files:
        cost = sum(r.decode_cost for r in inspect_model(data))
        best = min(cpu_seconds(data, 2**31)[0] for _ in range(3))
        rates.append(best / cost)
    return max(rates)


def assert_bounded(data: bytes, n_tensors: int, rate: float, max_bytes: int = MAX_BYTES) -> bool:
    """Decode ``data`` under ``max_bytes``: CPU time within the work bound; when it decodes,
    peak memory within twice the output plus the file plus a per-tensor constant, and within
    what decode_cost charged. Returns whether it decoded."""
    seconds, out = cpu_seconds(data, max_bytes)
    limit = SLACK * rate * max_bytes + FIXED_S
    assert seconds <= limit, f"{seconds:.2f} s CPU, bound {limit:.2f} s"
    if out is None:
        return False
    produced = output_bytes(out)
    cost = sum(r.decode_cost for r in inspect_model(data, max_bytes=max_bytes))
    del out
    peak = peak_bytes(data, max_bytes)
    overhead = len(data) + PER_TENSOR_BYTES * n_tensors + 2**20
    assert peak <= 2 * produced + overhead, (peak, produced)
    assert peak <= cost + overhead, (peak, cost)
    return True


# --- the fuzz test ------------------------------------------------------------------------
Part = tuple[dict[str, Any], list[bytes]]


@st.composite
def tensor_parts(draw: st.DrawFn, i: int) -> list[Part]:
    kind = draw(st.sampled_from(
        ["coded_grid", "empty_grid", "crafted_grid", "empty", "full", "full_ans", "dense",
         "tiny"]
    ))
    name = f"t{i}"
    if kind == "crafted_grid":  # up to 2**26 rows, beyond what the coder takes
        rows = int(2 ** draw(st.floats(1, 26)))
        return [H.crafted_grid(name, rows, draw(st.sampled_from([2, 3, 8])), draw(st.booleans()))]
    if kind in ("coded_grid", "empty_grid"):
        rows = draw(st.integers(2, 12_000))
        cols = draw(st.sampled_from([2, 3, 17, 64]))
        return [H.grid_tensor(name, rows, cols, kind.removesuffix("_grid"))]
    if kind in ("empty", "full", "full_ans"):
        # log-uniform sizes from 1 element to the 2**31 per-tensor limit and beyond
        numel = int(2 ** draw(st.floats(0, 31.5)))
        cols = max(1, int(math.isqrt(numel)))
        shape = [max(1, numel // cols), cols]
        if kind == "empty":
            return [H.empty_tensor(name, shape)]
        if kind == "full_ans" and math.prod(shape) > 2**22:  # its ANS payload is built here
            shape = [2**11, 2**11]
        return [H.full_tensor(name, shape, ans=kind == "full_ans")]
    if kind == "dense":
        return [H.dense_zeros(name, [int(2 ** draw(st.floats(0, 23)))])]
    return [H.dense_tiny(f"{name}.{j}") for j in range(draw(st.integers(1, 3000)))]


@st.composite
def hostile_files(draw: st.DrawFn) -> tuple[bytes, int]:
    parts: list[Part] = []
    for i in range(draw(st.integers(1, 5))):
        parts += draw(tensor_parts(i))
    return H.build(parts), len(parts)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(hostile_files())
def test_hostile_files_are_refused_or_decoded_within_bounds(ns_per_cost_byte, case):
    data, n_tensors = case
    assert_bounded(data, n_tensors, ns_per_cost_byte)


# --- the worst cases, one by one ----------------------------------------------------------
def test_tall_coded_grids_cost_what_they_are_charged(ns_per_cost_byte):
    # one survivor per row, always column 0: every row is coded and costs almost no bits
    rows = (MAX_BYTES - TENSOR_COST) // (GRID_ROW_COST + 2 * 14 + 24) - 64
    data = H.build([H.grid_tensor("g", rows, 2, "coded")])
    assert len(data) < 1000
    assert assert_bounded(data, 1, ns_per_cost_byte)
    tall = H.build([H.grid_tensor("g", 65_535, 2, "coded")])  # charged 805 MB
    with pytest.raises(CodecError, match="max_bytes"):
        decode_model(tall, max_bytes=MAX_BYTES)


def test_many_tensors_are_charged_per_tensor(ns_per_cost_byte):
    n = MAX_BYTES // TENSOR_COST - 1
    data = H.build([H.dense_tiny(f"t{i}") for i in range(n)])
    assert assert_bounded(data, n, ns_per_cost_byte)
    more = H.build([H.dense_tiny(f"t{i}") for i in range(n + 2)])
    with pytest.raises(CodecError, match="max_bytes"):
        decode_model(more, max_bytes=MAX_BYTES)


@pytest.mark.parametrize(
    "part",
    [
        H.empty_tensor("e", [4096, 1300]),  # 5.3 M float32 zeros from a 250-byte file
        H.full_tensor("f", [1024, 1024], ans=True),  # 1 M indices from a few ANS bytes
        H.dense_zeros("d", [3 * 2**20]),  # 12 MiB of zeros from one zstd frame
    ],
    ids=["empty", "full_ans", "dense_zeros"],
)
def test_big_outputs_from_tiny_files_stay_within_twice_the_output(ns_per_cost_byte, part):
    data = H.build([part])
    assert len(data) < 4096
    assert assert_bounded(data, 1, ns_per_cost_byte)


def test_the_reported_274_byte_file_is_refused_at_once():
    """Issue 14: a 274-byte file decoded for 72 s (a Python step per row of a 33.5 M-row
    grid). Grids taller than MASK_ROWS are refused before anything is decoded."""
    entry, payload, _ = H.grid_positions(65_535, 2, "empty")
    entry = {**entry, "grid": [2**25, 2], "n": 2**23}  # the counts no longer match either
    data = H.build([H.quantized("w", [2**25, 2], n_kept=0, positions=(entry, payload),
                                indices=H.const_indices(0))])
    t0 = time.process_time()
    with pytest.raises(CodecError, match="grid"):
        decode_model(data)
    assert time.process_time() - t0 < 0.5


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        ({"sparsity": 2**32, "bits": 4}, "sparsity"),
        ({"sparsity": -0.1, "bits": 4}, "sparsity"),
        ({"sparsity": 1.0, "bits": 4}, "sparsity"),
        ({"sparsity": 0.5, "bits": 0}, "bits"),
        ({"sparsity": 0.5, "bits": 9}, "bits"),
        ({"sparsity": 0.5, "bits": 4, "quantizer": "magic"}, "quantizer"),
        ({"sparsity": 0.5, "bits": 4, "code": "os.system"}, "unknown key"),
    ],
)
def test_header_plan_values_are_validated(layer, match):
    data = H.with_plan([H.empty_tensor("w", [10, 10])], layer)
    with pytest.raises(CodecError, match=match):
        decode_model(data)
    with pytest.raises(CodecError, match=match):
        inspect_model(data)
    ok = H.with_plan([H.empty_tensor("w", [10, 10])], {"sparsity": 0.5, "bits": 4})
    assert decode_model(ok).plan == {"layers": {"w": {"sparsity": 0.5, "bits": 4}}}


def test_dense_data_may_not_use_the_slow_byte_coders():
    sym = np.zeros(4000, dtype=np.int64)
    sym[-1] = 1
    stream, payload = H.stream_encode(sym, 256)
    entry = {"name": "d", "kind": "dense", "shape": [1000], "dtype": "float32",
             "streams": [{**stream, "name": "data", "coder": "ans"}]}
    with pytest.raises(CodecError, match="dense data uses one of const, raw, zstd"):
        decode_model(H.mcz([entry], [payload]))
