"""Directed Evolution: it finds provably irrelevant weights, and on a real target its
lowest-ranked half costs less divergence than magnitude's."""

from __future__ import annotations

import pytest
import torch

from moecomp.data import Split
from moecomp.divergence import Divergence
from moecomp.relevance import DirectedEvolution, Magnitude, evolve_set, scores_to_ranks
from moecomp.relevance.directed import LayerProbe
from moecomp.target import Target


def divergence(t, s, kind):
    """Mean divergence over the samples (per student when ``s`` has a leading axis)."""
    d = kind if isinstance(kind, Divergence) else Divergence(kind)
    return d.batched(t, s).mean(-1) if s.dim() > t.dim() else d(t, s).mean()


def _dead_column_target(make_tiny) -> Target:  # noqa: ANN001
    """Inputs 0..2 of the first layer are always zero, so their 30 weights never matter; all
    other weights clearly do (|w| >= 0.5, hidden units always active)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 12, generator=gen)
    x[:, :3] = 0.0
    tg = make_tiny(n_in=12, hidden=10, n_out=4, x=x)
    with torch.no_grad():
        w = tg.teacher.get_parameter("0.weight")
        w.copy_(w.sign() * (0.5 + w.abs()))
        w[:, :3] = 10.0 * w[:, :3].sign()  # larger than any: magnitude ranks them last
        tg.teacher.get_parameter("0.bias").fill_(20.0)
        tg.teacher_out = tg.teacher(tg.calib.inputs)
    return tg


def test_directed_ranks_dead_inputs_lowest(make_tiny) -> None:  # noqa: ANN001
    """With the activation prior (|w| * input norm), the 30 dead weights take ranks 0..29."""
    tg = _dead_column_target(make_tiny)
    ref = tg.layers[0]
    ranks = scores_to_ranks(DirectedEvolution(prior="activation")(tg, ref, seed=0))
    assert sorted(ranks[:, :3].flatten().tolist()) == list(range(30))
    mag = scores_to_ranks(Magnitude()(tg, ref, seed=0))
    assert int(mag[:, :3].min()) >= 90  # magnitude ranks them last: the test is not trivial


def test_directed_evolution_finds_dead_inputs_without_a_prior(make_tiny) -> None:  # noqa: ANN001
    """With the magnitude prior made flat (bias 50), only the measured divergence can find
    the dead weights: most of them land in the lowest 30 ranks (magnitude puts none there).
    Not all: 20 generations of 24 sets are not enough to assemble every 6-weight set."""
    tg = _dead_column_target(make_tiny)
    de = DirectedEvolution(
        generations=20,
        population=24,
        set_fraction=0.05,
        evolved_fraction=0.5,
        bias=50.0,
        prior="magnitude",
    )
    ranks = scores_to_ranks(de(tg, tg.layers[0], seed=0))
    assert int((ranks[:, :3] < 30).sum()) >= 20


def test_evolve_set_beats_its_prior_choice() -> None:
    """On a synthetic fitness (sum of hidden costs of the chosen indices) evolution finds a
    set at least as good as the k lowest-prior indices, usually strictly better."""
    gen = torch.Generator().manual_seed(0)
    m, k = 200, 10
    cost = torch.rand(m, generator=gen)
    prior = cost + 0.5 * torch.rand(m, generator=gen)  # a noisy view of the cost

    def fitness(sets: torch.Tensor) -> torch.Tensor:
        return cost[sets].sum(1)

    avail = torch.ones(m, dtype=torch.bool)
    pop, fits = evolve_set(
        prior, avail, fitness, k=k, population=16, generations=15, mutation=0.2, bias=2.0, gen=gen
    )
    best, fit = pop[0], float(fits[0])
    assert bool((fits[1:] >= fits[:-1]).all()), "population not sorted best first"
    assert best.unique().numel() == k and bool(avail[best].all())
    assert fit == pytest.approx(float(cost[best].sum()))
    baseline = float(cost[prior.argsort()[:k]].sum())
    assert fit < baseline
    avail[best[:3]] = False  # unavailable weights are never chosen
    pop2, _ = evolve_set(
        prior,
        avail,
        fitness,
        k=k,
        population=8,
        generations=3,
        mutation=0.2,
        bias=2.0,
        gen=gen,
        carried=pop,
    )
    assert bool(avail[pop2].all())
    assert all(row.unique().numel() == k for row in pop2)


def test_probe_matches_a_plain_forward(make_tiny) -> None:  # noqa: ANN001
    tg = make_tiny()
    ref = tg.layers[0]
    probe = LayerProbe(tg, ref, tg.calib.inputs, tg.teacher_out, max_rows=100)  # chunks of 1
    assert probe.local_prefix
    zeroed = torch.zeros(ref.numel, dtype=torch.bool)
    zeroed[:7] = True
    sets = torch.tensor([[10, 20, 30], [0, 1, 119]])
    got = probe.fitness_for(zeroed)(sets)
    for row, want_set in zip(got, sets, strict=True):
        w = tg.teacher.get_parameter("0.weight").detach().clone().reshape(-1)
        w[:7] = 0
        w[want_set] = 0
        sd = tg.state_dict() | {ref.name: w.reshape(ref.shape)}
        out = torch.func.functional_call(tg.teacher, sd, (tg.calib.inputs,))
        assert float(row) == pytest.approx(
            float(divergence(tg.teacher_out, out, "kl")), rel=1e-4, abs=1e-7
        )


def _kl_pruned(tg: Target, ranks: dict[str, torch.Tensor], share: float, n: int) -> float:
    sd = tg.state_dict()
    for ref in tg.layers:
        if ref.name in ranks:
            sd[ref.name] = sd[ref.name] * (ranks[ref.name] >= round(share * ref.numel))
    out = torch.func.functional_call(tg.teacher, sd, (tg.calib.inputs[:n],))
    return float(divergence(tg.teacher_out[:n], out, tg.divergence))


def test_directed_half_beats_magnitude_on_digits(digits_target: Target) -> None:
    """Zeroing DE's lowest-ranked 50 % of a layer (the others intact) diverges less than
    magnitude's 50 % on the 256 calibration images DE measures on.

    Weaker than it could be, on purpose: on the other 256 calibration images the margin for
    the first layer is small at these reduced settings and not asserted; all layers at 50 %
    together is not asserted either (DE ranks each layer with the others intact; at the
    default settings it was well below magnitude on digits and FashionMNIST, see
    bench/bench_relevance.py)."""
    tg = digits_target
    de = DirectedEvolution(generations=6, population=16, set_fraction=0.1, evolved_fraction=0.5)
    assert de.calibration == 256
    de_ranks = {ref.name: scores_to_ranks(de(tg, ref, seed=0)) for ref in tg.layers}
    mag_ranks = {ref.name: scores_to_ranks(Magnitude()(tg, ref, seed=0)) for ref in tg.layers}
    for ref in tg.layers:
        d = _kl_pruned(tg, {ref.name: de_ranks[ref.name]}, 0.5, 256)
        m = _kl_pruned(tg, {ref.name: mag_ranks[ref.name]}, 0.5, 256)
        assert d < m, f"{ref.name}: DE {d:.5f} >= magnitude {m:.5f}"


def test_plan_evolves_the_asked_share() -> None:
    de = DirectedEvolution()
    for numel in (235_200, 30_000, 1_000, 64, 7):
        k, rounds = de.plan(numel)
        assert 0.85 <= k * rounds / numel <= 0.95 or numel < 20
        assert k * rounds <= numel


class _Residual(torch.nn.Module):
    """A skip connection around fc1: the rest of the network also reads fc1's input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 6)
        self.fc2 = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)) + x)


class _Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.fc = torch.nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _check_probe_and_ranks(tg: Target, probe: LayerProbe, sets: torch.Tensor,
                           settings: list[dict]) -> None:
    """The probe's divergence of each set zeroed equals a plain forward of the teacher with
    that weight; DE with each of ``settings`` ranks the layer (a permutation)."""
    ref = next(r for r in tg.layers if r.name == probe.name)
    got = probe.fitness_for(torch.zeros(ref.numel, dtype=torch.bool))(sets)
    for row, s in zip(got, sets, strict=True):
        w = tg.weights()[ref.name].clone().reshape(-1)
        w[s] = 0
        sd = tg.state_dict() | {ref.name: w.reshape(ref.shape)}
        out = torch.func.functional_call(tg.teacher, sd, (probe.x,))
        want = float(divergence(tg.teacher_out, out, "kl"))
        assert float(row) == pytest.approx(want, rel=1e-4, abs=1e-7)
    for kw in settings:
        ranks = scores_to_ranks(DirectedEvolution(generations=2, population=4, **kw)(
            tg, ref, seed=0))
        assert sorted(ranks.flatten().tolist()) == list(range(ref.numel))


@pytest.mark.parametrize(
    ("model", "shape", "local"),
    [(_Residual, (32, 6), [False, True]), (_Conv, (32, 2, 6, 6), [True, True])],
)
def test_probe_on_skip_connections_and_convs(model, shape, local) -> None:  # noqa: ANN001
    """The probe falls back to repeating the inputs where a skip connection needs it, and
    its divergences match a plain forward of each zeroed weight."""
    from moecomp.target import select_layers

    torch.manual_seed(0)
    net = model()
    x = torch.randn(*shape)
    tg = Target(teacher=net, layers=select_layers(net), calib=Split(x))
    for ref, want_local in zip(tg.layers, local, strict=True):
        probe = LayerProbe(tg, ref, x, tg.teacher_out, max_rows=1 << 16)
        assert probe.local_prefix is want_local
        sets = torch.stack([torch.randperm(ref.numel)[:5] for _ in range(3)])
        _check_probe_and_ranks(tg, probe, sets, [{"prior": "magnitude"}, {"prior": "activation"}])


def test_patience_ends_a_round_that_stops_improving() -> None:
    """A fitness that no child can beat (every set costs the same) ends the round after
    ``patience`` generations: 1 + patience fitness calls instead of 1 + generations, with
    the progress callback still called once per generation. Without patience, or where
    every generation improves, all generations run and the result is the same."""
    m, k, generations = 60, 5, 10
    prior = torch.arange(m, dtype=torch.float32)
    avail = torch.ones(m, dtype=torch.bool)

    def run(fitness, patience: int) -> tuple[int, int, torch.Tensor]:  # noqa: ANN001
        calls, ticks = [0], [0]

        def counted(sets: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            return fitness(sets)

        def tick() -> None:
            ticks[0] += 1

        pop, _ = evolve_set(prior, avail, counted, k=k, population=6,
                            generations=generations, mutation=0.2, bias=2.0,
                            gen=torch.Generator().manual_seed(0), on_generation=tick,
                            patience=patience)
        return calls[0], ticks[0], pop

    flat = lambda sets: torch.zeros(sets.shape[0])  # noqa: E731
    assert run(flat, 2)[:2] == (3, generations)
    assert run(flat, 0)[:2] == (1 + generations, generations)

    better = [1000.0]

    def improving(sets: torch.Tensor) -> torch.Tensor:  # each call's sets beat all before
        better[0] -= 1.0
        return torch.full((sets.shape[0],), better[0]) - torch.arange(sets.shape[0])

    calls, _, pop = run(improving, 1)
    better[0] = 1000.0
    calls0, _, pop0 = run(improving, 0)
    assert calls == calls0 == 1 + generations and torch.equal(pop, pop0)


def test_patience_is_read_from_the_problem() -> None:
    from moecomp.config import RelevanceConfig

    assert DirectedEvolution.from_config(RelevanceConfig(patience=3)).patience == 3
    with pytest.raises(ValueError, match="relevance.patience"):
        DirectedEvolution(patience=-1)


def test_rescore_picks_the_winner_among_the_final_population() -> None:
    """With ``rescore``, the sets evolve on ``fitness`` but the round's result is ordered by
    ``rescore``, called once on the final population: here the two disagree completely
    (one prefers low indices, the other high), and the winner is rescore's best."""
    m, k = 40, 4
    prior = torch.zeros(m)
    avail = torch.ones(m, dtype=torch.bool)
    calls = [0]

    def cheap(sets: torch.Tensor) -> torch.Tensor:
        return sets.float().sum(1)

    def full(sets: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return -sets.float().sum(1)

    kw = dict(k=k, population=8, generations=6, mutation=0.25, bias=5.0)
    pop, fit = evolve_set(prior, avail, cheap, gen=torch.Generator().manual_seed(0),
                          rescore=full, **kw)
    plain, _ = evolve_set(prior, avail, cheap, gen=torch.Generator().manual_seed(0), **kw)
    assert calls[0] == 1
    assert torch.equal(fit, full(pop)) and torch.equal(fit, fit.sort().values)
    # the same population as without rescoring, in rescore's order
    assert sorted(map(tuple, pop.sort(1).values.tolist())) == sorted(
        map(tuple, plain.sort(1).values.tolist()))
    assert float(cheap(pop[:1])) == float(cheap(pop).max())  # cheap's worst, full's best


def test_screen_evolves_on_a_subset_and_still_finds_dead_inputs(make_tiny, monkeypatch) -> None:  # noqa: ANN001
    """``screen = 16`` of 64 calibration inputs: one probe on 16 inputs scores the
    generations, one on all 64 picks each round's set; the dead weights still come first."""
    import moecomp.relevance.directed as directed
    from moecomp.config import RelevanceConfig

    tg = _dead_column_target(make_tiny)
    sizes: list[int] = []

    class Spy(directed.LayerProbe):
        def fitness_for(self, zeroed):  # noqa: ANN001, ANN202
            fit = super().fitness_for(zeroed)

            def counted(sets: torch.Tensor) -> torch.Tensor:
                sizes.append(self.n)
                return fit(sets)

            return counted

    monkeypatch.setattr(directed, "LayerProbe", Spy)
    de = DirectedEvolution(prior="activation", calibration=64, screen=16, generations=3,
                           population=6)
    ranks = scores_to_ranks(de(tg, tg.layers[0], seed=0))
    assert sorted(ranks[:, :3].flatten().tolist()) == list(range(30))
    k, rounds = de.plan(tg.layers[0].numel)
    assert sizes.count(64) == rounds  # one full measure per round
    assert sizes.count(16) == rounds * (1 + 3)  # the first population and 3 generations
    assert DirectedEvolution.from_config(RelevanceConfig(screen=32)).screen == 32
    with pytest.raises(ValueError, match="relevance.screen"):
        DirectedEvolution(screen=-1)


def test_output_fitness_is_the_layers_relative_output_change(make_tiny) -> None:  # noqa: ANN001
    """``output_fitness_for``: ||x W'^T + b - (x W^T + b)||^2 / ||x W^T + b||^2 over the
    calibration inputs, W' the weight with ``zeroed`` and the set at zero (torch's own
    linear as the oracle), in chunks or not."""
    tg = make_tiny()
    ref = tg.layers[0]
    mod = tg.teacher.get_submodule(ref.module)
    zeroed = torch.zeros(ref.numel, dtype=torch.bool)
    zeroed[:7] = True
    sets = torch.tensor([[10, 20, 30], [0, 1, 119], [3, 50, 90]])
    x = tg.calib.inputs
    y0 = torch.nn.functional.linear(x, mod.weight, mod.bias).detach()
    want = []
    for row in sets:
        w = mod.weight.detach().clone().reshape(-1)
        w[:7] = 0
        w[row] = 0
        y = torch.nn.functional.linear(x, w.reshape(ref.shape), mod.bias).detach()
        want.append(float((y - y0).pow(2).sum() / y0.pow(2).sum()))
    for rows in (2 * len(x), 10_000):  # two sets per chunk; all at once
        probe = LayerProbe(tg, ref, x, tg.teacher_out, max_rows=rows)
        got = probe.output_fitness_for(zeroed)(sets)
        assert got.tolist() == pytest.approx(want, rel=1e-4)
    assert float(probe.output_fitness_for(torch.zeros_like(zeroed))(sets[:, :0])[0]) == 0.0


def test_rescore_top_measures_only_the_best_sets() -> None:
    """``rescore_top = 3``: rescore sees exactly the 3 best sets by ``fitness`` (one call),
    orders them first by its own measure; the rest follow in ``fitness`` order."""
    m, k = 40, 4
    prior = torch.zeros(m)
    avail = torch.ones(m, dtype=torch.bool)
    seen: list[torch.Tensor] = []

    def cheap(sets: torch.Tensor) -> torch.Tensor:
        return sets.float().sum(1)

    def full(sets: torch.Tensor) -> torch.Tensor:
        seen.append(sets.clone())
        return -sets.float().sum(1)

    kw = dict(k=k, population=8, generations=6, mutation=0.25, bias=5.0)
    plain, plain_fit = evolve_set(prior, avail, cheap, gen=torch.Generator().manual_seed(0), **kw)
    pop, fit = evolve_set(prior, avail, cheap, gen=torch.Generator().manual_seed(0),
                          rescore=full, rescore_top=3, **kw)
    assert len(seen) == 1 and torch.equal(seen[0], plain[:3])
    assert torch.equal(pop[3:], plain[3:]) and torch.equal(fit[3:], plain_fit[3:])
    assert torch.equal(fit[:3], full(pop[:3])) and bool((fit[:3][1:] >= fit[:3][:-1]).all())
    assert float(cheap(pop[:1])) == float(cheap(plain[:3]).max())  # full's best of the 3


def test_output_fitness_ranks_beat_magnitude_on_digits(digits_target: Target) -> None:
    """DE evolving on the layers' own outputs (``fitness = "output"``, the network measure
    only on each round's best 4 sets, on 64 inputs) still zeroes a half of each layer that
    diverges less than magnitude's half, and is read from the problem."""
    from moecomp.config import RelevanceConfig

    tg = digits_target
    de = DirectedEvolution(generations=6, population=16, set_fraction=0.1, evolved_fraction=0.5,
                           fitness="output", calibration=64)
    for ref in tg.layers:
        d = _kl_pruned(tg, {ref.name: scores_to_ranks(de(tg, ref, seed=0))}, 0.5, 256)
        m = _kl_pruned(tg, {ref.name: scores_to_ranks(Magnitude()(tg, ref, seed=0))}, 0.5, 256)
        assert d < m, f"{ref.name}: DE (output) {d:.5f} >= magnitude {m:.5f}"
    assert DirectedEvolution.from_config(RelevanceConfig(de_fitness="output")).fitness == "output"
    with pytest.raises(ValueError, match="relevance.de_fitness"):
        DirectedEvolution(fitness="loss")  # type: ignore[arg-type]


class _Embed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(10, 4)
        self.fc = torch.nn.Linear(4 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.tok(x).flatten(1))


@pytest.mark.parametrize(("model", "x"), [
    (_Conv, torch.randn(16, 2, 6, 6)),
    (_Embed, torch.randint(0, 7, (16, 5))),  # tokens 7..9 never seen: zeroing them is free
])
def test_output_fitness_of_convs_and_embeddings(model, x) -> None:  # noqa: ANN001
    """The layer's relative output change for a Conv and an Embedding (and the Linear after
    each), against the module called on its zeroed weight."""
    from moecomp.target import select_layers

    torch.manual_seed(0)
    net = model()
    tg = Target(teacher=net, layers=select_layers(net, types=["Linear", "Conv2d", "Embedding"]),
                calib=Split(x))
    for ref in tg.layers:
        probe = LayerProbe(tg, ref, x, tg.teacher_out, max_rows=1 << 16)
        mod = net.get_submodule(ref.module)
        zeroed = torch.zeros(ref.numel, dtype=torch.bool)
        zeroed[::7] = True
        sets = torch.stack([torch.randperm(ref.numel)[:5] for _ in range(3)])
        got = probe.output_fitness_for(zeroed)(sets)
        y0 = mod(probe.inp).detach()
        for row, s in zip(got, sets, strict=True):
            w = mod.weight.detach().clone().reshape(-1)
            w[zeroed] = 0
            w[s] = 0
            y = torch.func.functional_call(mod, {"weight": w.reshape(ref.shape)}, (probe.inp,))
            want = float((y - y0).pow(2).sum() / y0.pow(2).sum())
            assert float(row) == pytest.approx(want, rel=1e-4, abs=1e-9)
    if model is _Embed:  # an unseen token's weights cost nothing
        probe = LayerProbe(tg, tg.layers[0], x, tg.teacher_out, max_rows=1 << 16)
        unseen = torch.arange(7 * 4, 10 * 4).unsqueeze(0)
        assert float(probe.output_fitness_for(torch.zeros(40, dtype=torch.bool))(unseen)) == 0


class _Positions(torch.nn.Module):
    """A position table called on arange(T): its output has no sample axis."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(10, 4)
        self.pos = torch.nn.Embedding(5, 4)
        self.fc = torch.nn.Linear(4 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("n", [16, 5, 1])  # 5: as many samples as positions; 1: one
def test_probe_on_a_layer_without_a_sample_axis(n) -> None:  # noqa: ANN001
    """The position table's candidates are measured one forward each (no batching of its
    outputs), equal to a plain forward; the other layers stay batched; DE ranks it."""
    from moecomp.target import select_layers

    torch.manual_seed(0)
    net = _Positions()
    x = torch.randint(0, 10, (n, 5))
    tg = Target(teacher=net, layers=select_layers(net, types=["Linear", "Embedding"]),
                calib=Split(x))
    per_sample = {ref.name: LayerProbe(tg, ref, x, tg.teacher_out, max_rows=64).per_sample
                  for ref in tg.layers}
    assert per_sample == {"tok.weight": True, "pos.weight": False, "fc.weight": True}
    ref = next(r for r in tg.layers if r.name == "pos.weight")
    probe = LayerProbe(tg, ref, x, tg.teacher_out, max_rows=64)
    sets = torch.stack([torch.randperm(ref.numel)[:3] for _ in range(4)])
    _check_probe_and_ranks(tg, probe, sets, [{"fitness": "network"}, {"fitness": "output"}])


def test_output_ranks_of_an_embedding_follow_its_separable_cost() -> None:
    """An Embedding's output change is count * w^2 per entry: with ``fitness = "output"``
    its ranks are the order of (count + 1) * w^2, counts over every calibration sample (not
    only the ``calibration`` DE reads), no evolution."""
    from moecomp.target import select_layers

    torch.manual_seed(0)
    net = _Embed()
    x = torch.randint(0, 7, (16, 5))
    tg = Target(teacher=net, layers=select_layers(net, types=["Linear", "Embedding"]),
                calib=Split(x))
    ref = next(r for r in tg.layers if r.name == "tok.weight")
    ranks = scores_to_ranks(DirectedEvolution(fitness="output", calibration=2)(tg, ref, seed=0))
    counts = torch.bincount(x.reshape(-1), minlength=10).float()
    cost = (counts + 1).unsqueeze(1) * net.tok.weight.detach().pow(2)
    assert torch.equal(ranks.flatten().argsort(), cost.flatten().argsort(stable=True))
    two = torch.bincount(x[:2].reshape(-1), minlength=10).float()  # what 2 samples see
    assert not torch.equal(ranks.flatten().argsort(),
                           ((two + 1).unsqueeze(1) * net.tok.weight.detach().pow(2))
                           .flatten().argsort(stable=True))


class _FlatTokens(torch.nn.Module):
    """Token states flattened to (n * T, d) before a Linear, as some encoders do."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.fc = torch.nn.Linear(4 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape
        h = torch.relu(self.proj(self.tok(x).reshape(n * t, -1)))
        return self.fc(h.reshape(n, -1))


def test_probe_batches_a_layer_that_reads_tokens_flattened_into_the_sample_axis() -> None:
    """A Linear fed (n * T, d) rows still has its candidates batched (its rows follow the
    samples), and its divergences equal a plain forward's."""
    from moecomp.target import select_layers

    torch.manual_seed(0)
    net = _FlatTokens()
    x = torch.randint(0, 10, (12, 5))
    tg = Target(teacher=net, layers=select_layers(net), calib=Split(x))
    ref = next(r for r in tg.layers if r.name == "proj.weight")
    probe = LayerProbe(tg, ref, x, tg.teacher_out, max_rows=64)
    assert probe.per_sample and probe.inp.shape[0] == 12 * 5
    sets = torch.stack([torch.randperm(ref.numel)[:3] for _ in range(4)])
    _check_probe_and_ranks(tg, probe, sets, [{"fitness": "network"}, {"fitness": "output"}])
