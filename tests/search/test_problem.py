"""The pymoo problems: genes -> objectives equal a direct Evaluator computation."""

from __future__ import annotations

import numpy as np
import pytest
from pymoo.core.evaluator import Evaluator as PymooEvaluator
from pymoo.core.population import Population

from moecomp.evaluate import Evaluator
from moecomp.plan import CompressionPlan, LayerPlan
from moecomp.search.problem import layer_genes, shared_bits, sparsity_index_max

# Hand-made genes for the 3-layer digits MLP: [s_1, s_2, s_3, b_1, b_2, b_3] with s in steps
# of 1 % and b in bits.
GENES = np.array(
    [
        [0, 0, 0, 8, 8, 8],  # intact, 8 bits
        [50, 20, 10, 4, 3, 2],  # mixed
        [98, 98, 98, 1, 1, 1],  # the most compressed
        [73, 0, 45, 2, 8, 5],
    ]
)


def direct(target, ranks, sparsity, bits):
    return Evaluator(target, ranks, quantizer="uniform").evaluate(sparsity, bits)


def test_bounds_follow_genes_config(make_problem, digits_target):
    p = make_problem()
    L = len(digits_target.layers)
    assert p.n_var == 2 * L and p.n_obj == 3 and p.n_ieq_constr == 0
    assert p.xl.tolist() == [0] * L + [1] * L
    assert p.xu.tolist() == [98] * L + [8] * L  # sparsity_max 0.98, step 0.01
    q = make_problem(
        genes={"sparsity_step": 0.05, "sparsity_max": 0.9, "bits_min": 2, "bits_max": 6}
    )
    assert q.xl.tolist() == [0] * L + [2] * L
    assert q.xu.tolist() == [18] * L + [6] * L


def test_sparsity_index_max_keeps_a_weight():
    assert sparsity_index_max(0.98, 0.01) == 98
    assert sparsity_index_max(0.999, 0.01) == 99  # 1.00 would prune everything
    assert sparsity_index_max(0.3, 0.25) == 1


def test_redundancy_bounds_cap_the_sparsity_gene(digits_problem, digits_target):
    names = digits_target.layer_names
    bounds = {names[0]: 0.5, names[1]: 0.999, names[2]: 0.123}
    g = layer_genes(digits_problem, digits_target, bounds)
    assert g.s_idx_max.tolist() == [50, 98, 12]


def test_objectives_equal_direct_evaluator(make_problem, digits_target, digits_ranks):
    p = make_problem()
    rec = p.evaluate_genes(GENES)
    s = GENES[:, :3] * 0.01
    b = GENES[:, 3:]
    m = direct(digits_target, digits_ranks, s, b)
    np.testing.assert_allclose(rec.F, m.objectives("3obj"), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(rec.metrics["size_bytes"], m.size_bytes)
    np.testing.assert_allclose(rec.metrics["metric_drop"], m.metric_drop)
    # the intact model is the teacher up to 8-bit rounding; the most compressed is far off
    assert rec.F[0, 0] == 1.0 and rec.F[0, 1] == 8.0 and rec.F[0, 2] < 1e-3
    assert rec.F[2, 2] > rec.F[1, 2]


def test_two_objectives_and_constraints(make_problem, digits_target, digits_ranks):
    p = make_problem(
        objectives={
            "mode": "2obj",
            "ref_point": [0.25, 1.0],
            "max_divergence": 0.05,
            "max_metric_drop": 1.0,
        }
    )
    assert p.n_obj == 2 and p.n_ieq_constr == 2
    rec = p.evaluate_genes(GENES)
    m = direct(digits_target, digits_ranks, GENES[:, :3] * 0.01, GENES[:, 3:])
    np.testing.assert_allclose(rec.F, m.objectives("2obj"), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(rec.G[:, 0], m.divergence - 0.05, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(rec.G[:, 1], m.metric_drop - 1.0, rtol=1e-6, atol=1e-9)


def test_pymoo_path_keeps_every_evaluation(make_problem):
    p = make_problem(objectives={"max_divergence": 0.1})
    pop = Population.new("X", GENES)
    PymooEvaluator().eval(p, pop)
    recs = p.take_records()
    assert len(recs) == 1 and np.array_equal(recs[0].X, GENES)
    np.testing.assert_array_equal(pop.get("F"), recs[0].F)
    np.testing.assert_array_equal(pop.get("G"), recs[0].G)
    assert p.take_records() == []


def test_out_of_bounds_genes_are_refused(make_problem):
    p = make_problem()
    with pytest.raises(ValueError, match="out of bounds"):
        p.evaluate_genes(np.array([[99, 0, 0, 8, 8, 8]]))
    with pytest.raises(ValueError, match="shape"):
        p.evaluate_genes(np.array([[0, 0, 8, 8]]))


def test_chunks_through_the_runner(make_problem):
    calls = []

    class CountingRunner:
        def map_chunks(self, fn, chunks):
            calls.append(len(chunks))
            return [fn(c) for c in chunks]

    p = make_problem(search={"chunk_size": 3})
    p.runner = CountingRunner()
    whole = make_problem().evaluate_genes(GENES)
    rec = p.evaluate_genes(GENES)
    assert calls == [2]
    np.testing.assert_allclose(rec.F, whole.F, rtol=1e-6, atol=1e-9)


def test_shared_codebook_problem(make_problem, digits_target, digits_ranks):
    p = make_problem(
        search={"problem": "shared"},
        genes={"shared_sparsity": 0.3, "shared_k_min": 2, "shared_k_max": 64},
    )
    assert p.n_var == 1 and p.n_obj == 2
    assert p.xl.tolist() == [2] and p.xu.tolist() == [64]
    X = np.array([[2], [5], [64]])
    rec = p.evaluate_genes(X)
    names = digits_target.layer_names
    plans = [
        CompressionPlan(
            layers={n: LayerPlan(0.3, int(shared_bits(k)), "shared") for n in names},
            shared_k=int(k),
        )
        for k in X[:, 0]
    ]
    m = Evaluator(digits_target, digits_ranks).evaluate_plans(plans)
    np.testing.assert_allclose(rec.F[:, 0], m.objectives("2obj")[:, 0], rtol=1e-6)
    np.testing.assert_allclose(rec.F[:, 1], m.divergence, rtol=1e-6, atol=1e-9)
    assert rec.F[0, 1] > rec.F[2, 1]  # 2 levels diverge more than 64
    assert p.extra_columns(X)["shared_k"].tolist() == [2, 5, 64]
    s, b = p.gene_matrices(X)
    assert np.all(s == 0.3) and b[:, 0].tolist() == [1, 3, 6]
    q = make_problem(search={"problem": "shared"}, genes={"shared_fidelity": "metric_drop"})
    rq = q.evaluate_genes(X)
    np.testing.assert_allclose(rq.F[:, 1], rq.metrics["metric_drop"])
    assert q.ref_point.tolist() == [1.0, 100.0]
