"""DE operators: a contract every operator meets (bounds, integers, reproducible by seed),
then the property each one exists for."""

from __future__ import annotations

import numpy as np
import pytest
from pymoo.core.population import Population
from pymoo.core.problem import Problem

from moecomp.search.operators import (
    BoundsRepair,
    DirectedMutation,
    LayerwiseCrossover,
    SensitivitySampling,
    directed_mutation,
    layerwise_crossover,
    repair_genes,
    sensitivity_sampling,
)
from moecomp.search.sensitivity import (
    compression_steps,
    refresh_sensitivity,
    sensitivity_rank,
)

L = 4
XL = np.array([0] * L + [1] * L)
XU = np.array([98, 98, 50, 98] + [8] * L)
CDIR = np.array([1] * L + [-1] * L)
GROUPS = np.array(list(range(L)) * 2)
# genes 0 and 4 (layer 0) are cheap to compress, genes 3 and 7 (layer 3) expensive
SENS = np.array([0.01, 0.5, 1.0, 20.0, 0.02, 0.7, 2.0, 30.0])


class Toy(Problem):
    def __init__(self) -> None:
        super().__init__(n_var=2 * L, n_obj=3, xl=XL, xu=XU, vtype=int)


def population(seed: int, n: int = 24) -> Population:
    rng = np.random.default_rng(seed)
    return Population.new("X", rng.integers(XL, XU + 1, size=(n, 2 * L)))


def run_sampling(op, seed):
    return op.do(Toy(), 30, random_state=np.random.default_rng(seed)).get("X")


def run_crossover(op, seed):
    pop = population(100)
    parents = np.arange(24).reshape(12, 2)
    return op.do(Toy(), pop, parents, random_state=np.random.default_rng(seed)).get("X")


def run_mutation(op, seed):
    return op.do(Toy(), population(100), random_state=np.random.default_rng(seed)).get("X")


OPERATORS = {
    "sensitivity-sampling": (lambda: SensitivitySampling(SENS, CDIR), run_sampling),
    "sensitivity-sampling-unknown": (lambda: SensitivitySampling(None, CDIR), run_sampling),
    "layerwise-crossover": (lambda: LayerwiseCrossover(GROUPS, prob=1.0), run_crossover),
    "directed-mutation": (
        lambda: DirectedMutation(SENS, CDIR, prob=0.3, strength=5, directedness=0.7),
        run_mutation,
    ),
    "directed-mutation-undirected": (
        lambda: DirectedMutation(None, CDIR, directedness=0.0),
        run_mutation,
    ),
}


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operator_contract(name):
    make, run = OPERATORS[name]
    a = run(make(), 1)
    b = run(make(), 1)
    c = run(make(), 2)
    assert np.issubdtype(np.asarray(a).dtype, np.integer)
    assert np.all(a >= XL) and np.all(a <= XU), "bounds"
    assert np.array_equal(a, b), "same seed, same output"
    assert not np.array_equal(a, c), "different seed, different output"


def test_repair_rounds_and_clips_and_is_idempotent():
    X = np.array([[-3.2, 4.6, 120.0, 2.5, 0.2, 9.0, 3.49, 8.51]])
    r = repair_genes(X, XL, XU)
    assert r.tolist() == [[0, 5, 50, 2, 1, 8, 3, 8]]
    assert np.array_equal(repair_genes(r, XL, XU), r)
    pop = Population.new("X", X)
    assert BoundsRepair().do(Toy(), pop).get("X").tolist() == r.tolist()


def test_crossover_children_take_whole_layers_from_one_parent():
    rng = np.random.default_rng(0)
    P = rng.integers(XL, XU + 1, size=(2, 200, 2 * L))
    C = layerwise_crossover(P, GROUPS, np.random.default_rng(1))
    for layer in range(L):
        cols = [layer, L + layer]
        from_a = np.all(C[0][:, cols] == P[0][:, cols], axis=1)
        from_b = np.all(C[0][:, cols] == P[1][:, cols], axis=1)
        assert np.all(from_a | from_b)
        # the second child takes the other parent's layer
        other = np.where(from_a[:, None], P[1][:, cols], P[0][:, cols])
        assert np.array_equal(C[1][:, cols], other)
        differ = np.any(P[0][:, cols] != P[1][:, cols], axis=1)
        share = from_a[differ].mean()
        assert 0.35 < share < 0.65  # a fair coin per layer


def test_directed_mutation_compresses_insensitive_genes_and_relaxes_sensitive_ones():
    X = np.tile(np.array([49, 49, 25, 49, 4, 4, 4, 4]), (4000, 1))

    def toward_rate(directedness):
        rng = np.random.default_rng(7)
        Y = directed_mutation(X, XL, XU, SENS, 0.3, 3, directedness, rng, compress_dir=CDIR)
        moved = Y != X
        toward = np.sign(Y - X) == CDIR
        return toward.sum(axis=0) / moved.sum(axis=0), moved.mean(axis=0)

    rate, moved = toward_rate(0.7)  # share of moves toward compression, per gene
    # observed with seed 7: [0.673 0.592 0.445 0.309 | 0.677 0.58 0.451 0.296]
    for low, high in ((0, 3), (4, 7)):  # least / most sensitive gene of each kind
        assert rate[low] > 0.6 and rate[high] < 0.4
    for kind in (slice(0, L), slice(L, 2 * L)):  # monotone in sensitivity within a kind
        assert np.all(np.diff(rate[kind][np.argsort(SENS[kind])]) < 0)
    # directed moves come on top of the exploring ones (30 % per gene)
    assert np.all(moved > 0.35)
    # no direction preference without directedness
    rate0, moved0 = toward_rate(0.0)
    assert np.all(np.abs(rate0 - 0.5) < 0.05) and np.all(np.abs(moved0 - 0.3) < 0.03)


def test_directed_pair_keeps_compression_about_equal():
    # layer 0 holds 80 % of the weights: one step of it is worth eight steps of layer 1
    share = np.array([0.8, 0.1, 0.05, 0.05] * 2)
    X = np.tile(np.array([49, 49, 25, 49, 4, 4, 4, 4]), (2000, 1))
    Y = directed_mutation(
        X,
        XL,
        XU,
        SENS,
        0.0,
        40,
        1.0,
        np.random.default_rng(0),
        compress_dir=CDIR,
        weight_share=share,
    )
    d = Y - X
    top = np.maximum(1, np.rint(40 * (XU - XL) / 98)).astype(int)
    # rows whose one exploring move hit a bits gene and whose pair moved two sparsity genes
    rows = np.flatnonzero(((d[:, L:] != 0).sum(axis=1) == 1) & ((d[:, :L] != 0).sum(axis=1) == 2))
    assert len(rows) > 100
    for i in rows:
        a = int(np.flatnonzero(d[i, :L] > 0)[0])
        b = int(np.flatnonzero(d[i, :L] < 0)[0])
        want = np.clip(np.rint(d[i, a] * share[a] / share[b]), 1, top[b])
        assert -d[i, b] == want


def test_directed_mutation_moves_every_row_and_steps_scale_with_range():
    rng = np.random.default_rng(3)
    X = np.tile(np.array([49, 49, 25, 49, 4, 4, 4, 4]), (500, 1))
    Y = directed_mutation(X, XL, XU, None, 0.01, 6, 0.5, rng, compress_dir=CDIR)
    assert np.all((Y != X).any(axis=1))
    step = np.abs(Y - X)
    assert step[:, :L].max() == 6 and step[:, L:].max() == 1


def test_sensitivity_sampling_compresses_insensitive_genes_harder():
    rng = np.random.default_rng(0)
    X = sensitivity_sampling(400, XL, XU, SENS, CDIR, rng, random_share=0.0, extreme_share=0.0)
    z = compression_steps(X, XL, XU, CDIR) / (XU - XL)
    assert z[:, 0].mean() > z[:, 3].mean() + 0.2
    assert z[:, 4].mean() > z[:, 7].mean() + 0.2
    Y = sensitivity_sampling(
        20, XL, XU, SENS, CDIR, np.random.default_rng(0), random_share=0.2, extreme_share=0.2
    )
    assert len(Y) == 20
    # the extremes (rows 12..15): intact model first, most compressed last
    ext = Y[12:16]
    assert ext[0].tolist() == list(XL[:L]) + list(XU[L:])
    assert ext[-1].tolist() == list(XU[:L]) + list(XL[L:])


def test_sensitivity_rank_and_refresh():
    assert sensitivity_rank(None, 3).tolist() == [0.5, 0.5, 0.5]
    assert sensitivity_rank(np.array([3.0, 1.0, 2.0]), 3).tolist() == [1.0, 0.0, 0.5]
    rng = np.random.default_rng(0)
    X = rng.integers(XL, XU + 1, size=(200, 2 * L))
    z = compression_steps(X, XL, XU, CDIR)
    # divergence grows fast with layer 1's sparsity, slowly with everything else
    div = np.exp(0.08 * z[:, 1] + 0.001 * z.sum(axis=1)) * 1e-3
    prior = np.ones(2 * L)
    share = np.full(2 * L, 0.25)
    out = refresh_sensitivity(prior, X, div, xl=XL, xu=XU, compress_dir=CDIR, weight_share=share)
    assert np.argmax(out) == 1
    assert np.all(out > 0)
    # too few points: the prior
    few = refresh_sensitivity(
        SENS, X[:5], div[:5], xl=XL, xu=XU, compress_dir=CDIR, weight_share=share
    )
    assert np.array_equal(few, SENS)


# --- directed by each child's own marginals (the surrogate's tables) -----------------------


def toy_tables():
    """Two layers, sparsity steps 0..3 (step 0.25), bits 1..3: layer 0's pruning costs
    0.1 a step, layer 1's 1.0; one bit less costs 0.5 in layer 0, 0.05 in layer 1."""
    from moecomp.search.problem import LayerGenes
    from moecomp.search.surrogate import DivergenceTables

    genes = LayerGenes(names=("a", "b"), step=0.25, s_idx_max=np.array([3, 3]), bits_min=1,
                       bits_max=3, weight_share=np.array([0.5, 0.5]), numel=np.array([100, 100]))
    prune = np.array([[0.0, 0.1, 0.2, 0.3], [0.0, 1.0, 2.0, 3.0]])
    bits_cost = np.array([[1.0, 0.5, 0.0], [0.1, 0.05, 0.0]])  # at bits 1, 2, 3
    quant = np.broadcast_to(bits_cost[:, None, :], (2, 4, 3)).copy()
    return DivergenceTables(prune=prune, quant=quant, base=0.0), genes


def test_local_marginals_known_answer_and_bounds():
    from moecomp.search.operators.mutation import local_marginals, row_ranks

    tables, genes = toy_tables()
    X = np.array([[1, 1, 3, 3],    # s 0.25 / 0.25, 3 bits each
                  [3, 0, 1, 2]])   # layer 0 at its sparsity bound, 1 bit (its bits bound)
    M = local_marginals(tables, genes, X)
    # row 0: one more sparsity step saves 0.5 * 0.25 * 3 bits; one bit less saves 0.5 * 0.75
    np.testing.assert_allclose(M[0], [0.1 / 0.375, 1.0 / 0.375, 0.5 / 0.375, 0.05 / 0.375])
    # row 1: nothing to save at a bound (inf); layer 1 at s 0, 2 bits: 0.1 / (0.5*0.25*2)
    assert np.isinf(M[1, 0]) and np.isinf(M[1, 2])
    np.testing.assert_allclose(M[1, [1, 3]], [1.0 / 0.25, 0.05 / 0.5])
    # ranks within each kind, per row: row 0 prunes layer 0 cheaper, quantises layer 1 cheaper
    kind = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(row_ranks(M, kind), [[0, 1, 1, 0], [1, 0, 1, 0]])


def test_local_direction_follows_each_childs_own_marginals():
    """Rows whose tables make gene 0 cheap compress gene 0 more often than gene 1, and rows
    where it is the other way round the other way: one global ranking could not do both."""
    n = 4000
    X = np.tile(np.array([49, 49, 25, 49, 4, 4, 4, 4]), (n, 1))
    local = np.tile(SENS, (n, 1))
    half = n // 2
    local[half:, [0, 3]] = local[half:, [3, 0]]  # second half: gene 3 cheap, gene 0 dear
    Y = directed_mutation(X, XL, XU, None, 0.3, 3, 0.7, np.random.default_rng(7),
                          compress_dir=CDIR, local=local)
    toward = np.sign(Y - X) == CDIR
    moved = Y != X
    rate = lambda rows, g: toward[rows, g].sum() / moved[rows, g].sum()  # noqa: E731
    first, second = slice(0, half), slice(half, n)
    assert rate(first, 0) > 0.6 and rate(first, 3) < 0.4
    assert rate(second, 3) > 0.6 and rate(second, 0) < 0.4
