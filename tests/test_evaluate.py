"""Evaluator: metrics against the naive per-individual computation (PyTorch as the oracle)."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from moecomp.apply import QuantizedLayer, apply_plan, student_state_dict
from moecomp.codec.masks import grid_of
from moecomp.data import Split
from moecomp.divergence import Divergence
from moecomp.errors import ConfigError
from moecomp.evaluate import (
    EvalOptions,
    Evaluator,
    Metrics,
    fixed_coded_bytes,
    layer_coded_bytes,
    mask_coded_bytes,
    order0_bits,
    stream_bytes,
)
from moecomp.metric import builtin_accuracy
from moecomp.plan import CompressionPlan, LayerPlan
from moecomp.relevance.base import scores_to_ranks
from moecomp.runs import plans_from_genes
from moecomp.target import Target, load_state, select_layers


def divergence(t, s, kind):
    """Mean divergence over the samples (per student when ``s`` has a leading axis)."""
    d = kind if isinstance(kind, Divergence) else Divergence(kind)
    return d.batched(t, s).mean(-1) if s.dim() > t.dim() else d(t, s).mean()

RTOL, ATOL = 1e-4, 1e-6


def magnitude_ranks(target: Target) -> dict[str, torch.Tensor]:
    return {n: scores_to_ranks(w.abs()) for n, w in target.weights().items()}


def oracle(
    target: Target, ranks: dict[str, torch.Tensor], plans: list[CompressionPlan]
) -> dict[str, np.ndarray]:
    """The naive computation, one plan at a time: copy, load, forward, measure."""
    weights = target.weights()
    # biases as a student stores them: rounded to the problem's dense dtype, its bytes each
    state = target.student_base()
    n_fp32 = sum(v.numel() for v in state.values() if v.is_floating_point())
    dense_size = torch.empty(0, dtype=target.dense_torch_dtype).element_size()
    fixed = fixed_coded_bytes(
        [v.numel() * dense_size for k, v in state.items() if k not in weights], len(weights)
    )
    t_acc = None
    if target.calib.labels is not None:
        labels = target.calib.labels
        t_acc = 100.0 * float((target.teacher_out.argmax(-1) == labels).double().mean())
    cols: dict[str, list[float]] = {
        k: [] for k in ("density", "bits", "divergence", "size_bytes", "metric", "metric_drop")
    }
    for plan in plans:
        layers: dict[str, QuantizedLayer] = apply_plan(plan, weights, ranks)
        student = copy.deepcopy(target.teacher)
        load_state(student, student_state_dict(state, layers))
        with torch.no_grad():
            out = student(target.calib.inputs)
        kept = {n: int(q.mask.sum()) for n, q in layers.items()}
        total_kept = sum(kept.values())
        cols["density"].append(total_kept / sum(q.numel for q in layers.values()))
        cols["bits"].append(sum(kept[n] * plan.layers[n].bits for n in layers) / total_kept)
        cols["divergence"].append(float(divergence(target.teacher_out, out, target.divergence)))
        size = fixed
        for q in layers.values():
            counts = np.bincount(q.indices.numpy(), minlength=q.n_levels)
            grid = grid_of(q.shape)
            mask_bytes = None if grid is None else mask_coded_bytes(q.mask.numpy().reshape(grid))
            size += layer_coded_bytes(q.numel, counts, q.n_levels, mask_bytes=mask_bytes)
        cols["size_bytes"].append(size)
        if t_acc is not None:
            acc = 100.0 * float((out.argmax(-1) == target.calib.labels).double().mean())
            cols["metric"].append(acc)
            cols["metric_drop"].append(t_acc - acc)
    res = {k: np.array(v) for k, v in cols.items()}
    res["ratio"] = 4.0 * n_fp32 / res["size_bytes"]
    return res


def assert_matches(m: Metrics, ref: dict[str, np.ndarray]) -> None:
    for k, v in ref.items():
        if len(v):
            np.testing.assert_allclose(getattr(m, k), v, rtol=RTOL, atol=ATOL, err_msg=k)


def random_genes(rng: np.random.Generator, n: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    return np.round(rng.uniform(0, 0.95, (n, L)), 2), rng.integers(1, 9, (n, L))


def converged_genes(
    rng: np.random.Generator, n: int, L: int, parents: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Mutants of a few parents: each child changes one gene of one parent."""
    ps, pb = random_genes(rng, parents, L)
    s, b = ps[rng.integers(0, parents, n)], pb[rng.integers(0, parents, n)]
    s[:, 0], b[:, 0] = ps[0, 0], pb[0, 0]
    for i in range(n):
        j = rng.integers(0, L)
        if rng.random() < 0.5:
            s[i, j] = min(0.95, s[i, j] + 0.01)
        else:
            b[i, j] = 1 + (b[i, j] % 8)
    return s, b


# --- small models: a chain with a skip connection inside a stage; a fork (no chain) --------------
class SkipNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = h + torch.relu(self.conv2(h))  # skip connection: not a chain of layers
        return self.head(h.flatten(1))


class ForkNet(SkipNet):
    """Two heads on one hidden state: no module call is a chain boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.head2 = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = h + torch.relu(self.conv2(h))
        return self.head(h.flatten(1)) + self.head2(h.flatten(1))


class BranchyNet(ForkNet):
    """Data-dependent control flow, which torch.vmap cannot batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if float(out.sum()) > 1e9:
            return out * 0
        return out


def small_target(cls: type[nn.Module] = SkipNet) -> Target:
    torch.manual_seed(0)
    model = cls()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 1, 6, 6, generator=g)
    y = torch.randint(0, 5, (96,), generator=g)
    return Target(teacher=model, layers=select_layers(model), calib=Split(x, y),
                  metric=builtin_accuracy())


@pytest.fixture(scope="module")
def digits(digits_target):
    return digits_target, magnitude_ranks(digits_target)


@pytest.fixture(scope="module")
def generic():
    t = small_target(ForkNet)
    return t, magnitude_ranks(t)


# --- oracles ----------------------------------------------------------------------------
def test_digits_random_plans_match_naive(digits):
    target, ranks = digits
    ev = Evaluator(target, ranks)
    assert ev.path == "chain+vmap"
    s, b = random_genes(np.random.default_rng(0), 12, len(target.layers))
    m = ev.evaluate(s, b)
    assert_matches(m, oracle(target, ranks, plans_from_genes(target.layer_names, s, b)))
    assert ev.n_evals == 12


def test_digits_hand_made_plans_via_evaluate_plans(digits):
    target, ranks = digits
    names = target.layer_names
    plans = [
        CompressionPlan.uniform(names, sparsity=0.0, bits=8),
        CompressionPlan.uniform(names, sparsity=0.5, bits=4),
        CompressionPlan.uniform(names, sparsity=0.9, bits=2),
        CompressionPlan(
            layers={n: LayerPlan(sparsity=0.2 * i, bits=1 + 3 * i) for i, n in enumerate(names)}
        ),
    ]
    m = Evaluator(target, ranks).evaluate_plans(plans)
    assert_matches(m, oracle(target, ranks, plans))


def test_generic_model_uses_vmap_and_matches_naive(generic):
    target, ranks = generic
    ev = Evaluator(target, ranks, options=EvalOptions(batched=True))
    assert ev.path == "generic+vmap"
    assert "no module call is a chain boundary" in ev.chain
    s, b = converged_genes(np.random.default_rng(1), 10, len(target.layers))
    m = ev.evaluate(s, b)
    assert_matches(m, oracle(target, ranks, plans_from_genes(target.layer_names, s, b)))


def test_model_vmap_cannot_batch_falls_back_with_one_warning():
    target = small_target(BranchyNet)
    ranks = magnitude_ranks(target)
    with pytest.warns(RuntimeWarning, match="vmap cannot batch"):
        ev = Evaluator(target, ranks)
    assert ev.path == "generic+loop"
    s, b = random_genes(np.random.default_rng(2), 5, len(target.layers))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = ev.evaluate(s, b)
    assert_matches(m, oracle(target, ranks, plans_from_genes(target.layer_names, s, b)))


@pytest.mark.parametrize("quantizer", ["kmeans"])
def test_other_quantizer_matches_naive(digits, quantizer):
    target, ranks = digits
    s, b = random_genes(np.random.default_rng(3), 4, len(target.layers))
    m = Evaluator(target, ranks, quantizer=quantizer).evaluate(s, b)
    plans = plans_from_genes(target.layer_names, s, b, quantizer=quantizer)
    assert_matches(m, oracle(target, ranks, plans))


def test_shared_codebook_plans_match_naive(digits):
    target, ranks = digits
    names = target.layer_names
    plans = [
        CompressionPlan(
            layers={
                n: LayerPlan(sparsity=s, bits=8, quantizer="shared")
                for n, s in zip(names, sp, strict=False)
            },
            shared_k=k,
        )
        for sp, k in (((0.1, 0.5, 0.3), 16), ((0.6, 0.2, 0.0), 5))
    ]
    m = Evaluator(target, ranks).evaluate_plans(plans)
    ref = oracle(target, ranks, plans)
    ref["bits"] = np.array([4.0, 3.0])  # ceil(log2 K) for a pooled codebook
    assert_matches(m, ref)


# --- properties -------------------------------------------------------------------------
def test_dense_8bit_student_is_close_to_teacher(digits):
    target, ranks = digits
    L = len(target.layers)
    m = Evaluator(target, ranks).evaluate(np.zeros((1, L)), np.full((1, L), 8))
    assert m.divergence[0] < 1e-3
    assert m.density[0] == 1.0 and m.bits[0] == 8.0
    assert abs(m.metric_drop[0]) <= 1.0


def test_metric_bounds_and_consistency(digits):
    target, ranks = digits
    L = len(target.layers)
    ev = Evaluator(target, ranks)
    s, b = random_genes(np.random.default_rng(4), 16, L)
    m = ev.evaluate(s, b)
    assert len(m) == 16
    assert ((m.density >= 0) & (m.density <= 1)).all()
    assert ((m.bits >= 1) & (m.bits <= 8)).all()
    assert (m.divergence >= -1e-7).all()
    assert (m.ratio > 1).all() and (m.size_bytes > 0).all()
    np.testing.assert_allclose(m.ratio * m.size_bytes, 4.0 * target.n_params)
    np.testing.assert_allclose(m.metric_drop, ev.teacher_metric - m.metric)
    assert ((m.metric >= 0) & (m.metric <= 100)).all()
    f3, f2 = m.objectives("3obj"), m.objectives("2obj")
    assert f3.shape == (16, 3) and f2.shape == (16, 2)
    np.testing.assert_array_equal(f3, np.stack([m.density, m.bits, m.divergence], 1))
    np.testing.assert_allclose(f2[:, 0], m.density * m.bits / 32)
    assert list(m.to_dict()) == [
        "density",
        "bits",
        "divergence",
        "size_bytes",
        "ratio",
        "metric",
        "metric_drop",
    ]
    # more pruning and fewer bits: a smaller file
    small = ev.evaluate(np.full((1, L), 0.9), np.full((1, L), 2))
    big = ev.evaluate(np.full((1, L), 0.1), np.full((1, L), 8))
    assert small.size_bytes[0] < big.size_bytes[0]
    with pytest.raises(ValueError, match="mode"):
        m.objectives("4obj")


def test_memo_and_cache_hits_return_identical_results(digits):
    target, ranks = digits
    ev = Evaluator(target, ranks)
    s, b = converged_genes(np.random.default_rng(5), 20, len(target.layers))
    first = ev.evaluate(s, b)
    info = ev.cache_info()
    assert info["memo_entries"] > 0
    again = ev.evaluate(s, b)
    for k, v in first.to_dict().items():
        np.testing.assert_array_equal(v, again.to_dict()[k], err_msg=k)
    assert ev.cache_info()["cache_hits"] > info["cache_hits"]
    assert ev.n_evals == 40
    # a reordered population gives each solution the same metrics
    perm = np.random.default_rng(0).permutation(20)
    shuffled = ev.evaluate(s[perm], b[perm])
    np.testing.assert_array_equal(shuffled.divergence, first.divergence[perm])


@pytest.mark.parametrize(
    "options",
    [
        EvalOptions(prefix_cache=False),
        EvalOptions(memo=False),
        EvalOptions(batched=False),
        EvalOptions(batched=True),
        EvalOptions(cache_mb=0.0),
        EvalOptions(memory_mb=0.5),
        EvalOptions(trie="always"),
        EvalOptions(survivors_mb=0.0),
        EvalOptions(device="cpu"),
    ],
)
def test_every_switch_gives_the_same_metrics(digits, options):
    target, ranks = digits
    s, b = converged_genes(np.random.default_rng(6), 24, len(target.layers))
    ref = Evaluator(target, ranks).evaluate(s, b)
    other = Evaluator(target, ranks, chunk_size=7, options=options).evaluate(s, b)
    for k, v in ref.to_dict().items():
        np.testing.assert_allclose(getattr(other, k), v, rtol=RTOL, atol=ATOL, err_msg=k)


def test_prefix_cache_shares_work_of_a_converged_population(digits):
    target, ranks = digits
    s, b = converged_genes(np.random.default_rng(7), 30, len(target.layers))
    ev = Evaluator(target, ranks, options=EvalOptions(trie="always"))
    ev.evaluate(s, b)
    # one node per distinct prefix: far fewer stage computations than 30 x L
    assert ev.cache_info()["cache_entries"] < 30 * len(target.layers) * 0.7


def test_empty_population(digits):
    target, ranks = digits
    L = len(target.layers)
    m = Evaluator(target, ranks).evaluate(np.zeros((0, L)), np.zeros((0, L), dtype=int))
    assert len(m) == 0 and m.objectives().shape == (0, 3)


# --- coded size -------------------------------------------------------------------------
def test_layer_coded_bytes_is_order0_entropy_plus_headers():
    counts = np.array([500, 300, 200, 0])
    numel = 4000
    est = layer_coded_bytes(numel, counts, 4)
    h2 = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)) * numel
    body = math.ceil(h2 / 8) + math.ceil(order0_bits(counts) / 8)
    assert body + 16 < est < body + 16 + 500  # codebook 16 bytes + headers and histograms
    # nothing pruned, one level: both streams are constant and cost nothing but headers
    assert layer_coded_bytes(10, np.array([10]), 1) == layer_coded_bytes(99, np.array([99]), 1)


def test_size_estimate_tracks_the_codec():
    streams = pytest.importorskip("moecomp.codec.streams")
    rng = np.random.default_rng(0)
    symbols = np.clip(np.rint(rng.normal(8, 2.5, 50_000)), 0, 15).astype(np.int64)
    coded = streams.encode_stream(symbols, 16)
    est = stream_bytes(np.bincount(symbols, minlength=16), raw_bytes_per_symbol=1)
    assert abs(est - coded.cost) / coded.cost < 0.02


# --- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("s", "b", "field"),
    [
        (np.zeros((2, 2)), np.ones((2, 2)), "sparsity"),
        (np.zeros(3), np.ones(3), "sparsity"),
        (np.zeros((2, 3)), np.ones((3, 3)), "bits"),
        (np.full((1, 3), 1.0), np.ones((1, 3)), "sparsity"),
        (np.full((1, 3), -0.1), np.ones((1, 3)), "sparsity"),
        (np.full((1, 3), np.nan), np.ones((1, 3)), "sparsity"),
        (np.zeros((1, 3)), np.zeros((1, 3)), "bits"),
        (np.zeros((1, 3)), np.full((1, 3), 9), "bits"),
        (np.zeros((1, 3)), np.full((1, 3), 2.5), "bits"),
    ],
)
def test_bad_genes_raise_value_error_naming_the_argument(digits, s, b, field):
    target, ranks = digits
    with pytest.raises(ValueError, match=field):
        Evaluator(target, ranks).evaluate(s, b)


def test_bad_constructor_arguments(digits):
    target, ranks = digits
    with pytest.raises(ValueError, match="quantizer"):
        Evaluator(target, ranks, quantizer="shared")
    with pytest.raises(ValueError, match="chunk_size"):
        Evaluator(target, ranks, chunk_size=0)
    with pytest.raises(ValueError, match="ranks"):
        Evaluator(target, {})
    bad = dict(ranks)
    name = target.layer_names[0]
    bad[name] = torch.zeros_like(ranks[name])
    with pytest.raises(ValueError, match="permutation"):
        Evaluator(target, bad)
    with pytest.raises(ValueError, match="memo_mb"):
        EvalOptions(memo_mb=-1)
    plan = CompressionPlan.uniform(["nope.weight"], sparsity=0.1, bits=2)
    with pytest.raises(ValueError, match="layers"):
        Evaluator(target, ranks).evaluate_plans([plan])


def test_size_estimate_is_close_to_real_mcz_files(digits):
    codec = pytest.importorskip("moecomp.codec")
    target, ranks = digits
    L = len(target.layers)
    s, b = random_genes(np.random.default_rng(8), 4, L)
    s[0], b[0] = 0.0, 8
    m = Evaluator(target, ranks).evaluate(s, b)
    weights, state = target.weights(), target.state_dict()
    for i, plan in enumerate(plans_from_genes(target.layer_names, s, b)):
        layers = apply_plan(plan, weights, ranks)
        dense = {k: v for k, v in state.items() if k not in layers}
        blob = codec.encode_model(layers, dense, plan=plan.to_dict(), order=list(state))
        assert abs(m.size_bytes[i] / len(blob) - 1) < 0.1, (i, m.size_bytes[i], len(blob))


# --- the automatic prefix cache, students identical to apply, devices ------------------------
def test_chain_found_automatically_on_a_skip_net_matches_naive():
    """SkipNet's skip connection lies inside the first stage; the head is the second."""
    target = small_target(SkipNet)
    ranks = magnitude_ranks(target)
    for options in (EvalOptions(trie="always"), EvalOptions()):
        ev = Evaluator(target, ranks, options=options)
        assert ev.path.startswith("chain+vmap") and ev.chain.endswith("boundaries before head")
        s, b = converged_genes(np.random.default_rng(11), 12, len(target.layers))
        m = ev.evaluate(s, b)
        assert_matches(m, oracle(target, ranks, plans_from_genes(target.layer_names, s, b)))


def test_stages_vmapped_or_looped_each_match_naive():
    """Any mix of vmapped and looped stages gives the naive metrics."""
    target = small_target(SkipNet)
    ranks = magnitude_ranks(target)
    s, b = random_genes(np.random.default_rng(12), 16, len(target.layers))
    ref = oracle(target, ranks, plans_from_genes(target.layer_names, s, b))
    for chain, whole in (([False, True], [False]), ([True, False], [True])):
        ev = Evaluator(target, ranks, chunk_size=5, options=EvalOptions(batched=True))
        runner = ev._students
        runner._chain.batch, runner._whole.batch = chain, whole
        assert ev.path == "chain+vmap+loop"
        assert_matches(ev.evaluate(s, b), ref)


def test_auto_loops_over_students_at_convolution_stages_on_the_cpu(digits):
    """SkipNet's first stage holds its convolutions, its second the linear head: "auto" runs
    the first one student at a time, the second vmapped; an MLP stays vmapped throughout."""
    target = small_target(SkipNet)
    ranks = magnitude_ranks(target)
    ev = Evaluator(target, ranks, chunk_size=6, options=EvalOptions(device="cpu"))
    runner = ev._students
    assert runner._chain.batch == [False, True] and runner._whole.batch == [False]
    assert ev.path == "chain+vmap+loop"
    s, b = random_genes(np.random.default_rng(13), 20, len(target.layers))
    assert_matches(ev.evaluate(s, b),
                   oracle(target, ranks, plans_from_genes(target.layer_names, s, b)))
    for batched in (True, False):  # fixed by the option
        fixed = Evaluator(target, ranks, options=EvalOptions(batched=batched))._students
        assert fixed._chain.batch == [batched] * 2
    mlp_target, mlp_ranks = digits
    assert Evaluator(mlp_target, mlp_ranks).path == "chain+vmap"
    with pytest.raises(ConfigError, match="options.batched.*auto, true or false"):
        EvalOptions(batched="sometimes")


def test_digits_mlp_is_split_before_every_layer(digits):
    target, ranks = digits
    ev = Evaluator(target, ranks)
    assert ev.chain.endswith("boundaries before hidden.1, out")
    assert Evaluator(target, ranks, options=EvalOptions(prefix_cache=False)).path == \
        "generic+vmap"


def shuffled_ranks(target: Target, seed: int) -> dict[str, torch.Tensor]:
    """Ranks unrelated to magnitude: the largest weights are pruned as often as any."""
    g = torch.Generator().manual_seed(seed)
    return {n: scores_to_ranks(torch.rand(w.shape, generator=g))
            for n, w in target.weights().items()}


@pytest.mark.parametrize("quantizer", ["uniform", "kmeans"])
@pytest.mark.parametrize("rank_kind", ["magnitude", "shuffled"])
def test_evaluator_students_are_apply_students_bit_for_bit(digits, quantizer, rank_kind):
    """What the evaluator runs is exactly what export writes: same masks, codebooks and
    levels, whether the survivors span the layer's range (magnitude ranks) or not."""
    target, mag = digits
    ranks = mag if rank_kind == "magnitude" else shuffled_ranks(target, 0)
    ev = Evaluator(target, ranks, quantizer=quantizer)
    rng = np.random.default_rng(12)
    s, b = random_genes(rng, 6, len(target.layers))
    s[0], s[1] = 0.0, 0.99  # nothing pruned; nearly everything pruned
    for plan in plans_from_genes(target.layer_names, s, b, quantizer=quantizer):
        want = apply_plan(plan, target.weights(), ranks)
        got = ev.layer_weights(plan)
        for name, layer in want.items():
            assert torch.equal(got[name], layer.dequantize()), name


def test_devices_cpu_auto_and_refusals(digits):
    target, ranks = digits
    ev = Evaluator(target, ranks, options=EvalOptions(device="cpu"))
    assert ev.device == torch.device("cpu")
    auto = Evaluator(target, ranks)
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="options.device"):
        EvalOptions(device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="options.device.*no CUDA"):
            Evaluator(target, ranks, options=EvalOptions(device="cuda"))
    with pytest.raises(ValueError, match="options.trie"):
        EvalOptions(trie="never")


def test_timings_split_forward_and_overhead(digits):
    target, ranks = digits
    ev = Evaluator(target, ranks)
    s, b = random_genes(np.random.default_rng(13), 8, len(target.layers))
    ev.evaluate(s, b)
    t = ev.timings()
    assert t["forward"] > 0 and t["weights"] > 0 and t["total"] > 0
    parts = sum(t[k] for k in ("forward", "weights", "sizes", "measure", "other"))
    assert parts == pytest.approx(t["total"], rel=1e-6, abs=1e-6)
    ev.reset_timings()
    assert ev.timings()["total"] == 0.0
