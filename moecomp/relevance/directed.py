"""Directed Evolution relevance (Franca-Neto, 2022): relevance measured by tentative zeroing.

For one layer, the ranking is built in rounds. In each round a population of candidate sets
of weights (each ``k = set_fraction * numel`` weights not zeroed yet) is *tentatively zeroed*
on top of the weights zeroed in earlier rounds, and each set is scored by the divergence of
the student from the cached teacher outputs on calibration data. The sets evolve for
``generations``: tournament selection, recombination of two parents (their intersection kept,
the rest drawn from their union) and mutation (a few indices swapped for others), with the
best ``population`` of parents and children surviving. The round's best set is zeroed for
real and takes the lowest ranks left (inside the set, lower prior first). The next round's
first population keeps this round's sets (minus the weights now zeroed): sets that were
cheap stay likely cheap. After ``rounds`` rounds (about ``evolved_fraction`` of the layer,
90 % by default), the weights left are ranked above the evolved ones by the prior.

Candidate sets are drawn (and mutations drawn) biased towards a low *prior*: with r the
prior rank among the weights left, weight j is drawn with weight ``exp(-r / (bias * k))``
(Gumbel top-k) from the ``pool_factor * bias * k`` lowest; one initial candidate is exactly
the k lowest, so every round starts from the prior's own choice and keeps something else
only when it measures better. The prior is ``|w|`` (``"magnitude"``, the paper's and the
default) or ``|w| * ||x_j||`` (``"activation"``: the size of the output change zeroing the
weight causes, x_j the weight's input over the calibration data). The activation prior
finds weights on inputs that are always zero at once, but it trusts the calibration
sample: an input that is rarely non-zero there looks free (on the digits MLP it ranked
better on the 256 images it saw and worse on the others, so magnitude stays the default).

Other layers stay at the teacher's weights while a layer is ranked, so each layer's ranking
is independent of the sparsity the others get later.

A whole population is evaluated in one batched forward pass. The layer's input ``X`` is
computed once (a forward pre-hook); the layer's outputs for the P candidate weight tensors
``(P, *shape)`` come from ``torch.vmap`` over ``functional_call`` of the layer's module on
``X`` (on CPU a dense batched matmul beat a sparse product of only the zeroed entries); a
forward hook puts the ``(P * n, ...)`` outputs in place of the layer's output, so the rest of
the network runs once for the whole population. Where the network's prefix before the layer
is batch-local (sequential models), the prefix runs on the n calibration inputs only;
otherwise (a skip connection around the layer would see the wrong batch size) the inputs are
repeated P times. Which of the two applies is decided per layer by a probe that compares
them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from moecomp import inputs as inputs_mod
from moecomp import outputs
from moecomp.config import RelevanceConfig
from moecomp.errors import ConfigError
from moecomp.inputs import Inputs
from moecomp.relevance.base import calibration_slice, layer_weight, order_to_scores
from moecomp.target import LayerRef, Target

# fitness(sets: (P, k) int64 flat indices) -> (P,) divergence of zeroing each set
Fitness = Callable[[torch.Tensor], torch.Tensor]


# --- the evolutionary maths (no network) -------------------------------------------------


def _gumbel(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=gen).clamp_(1e-12, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def _masks(sets: torch.Tensor, m: int) -> torch.Tensor:
    """(P, k) index sets -> (P, m) bool membership."""
    out = torch.zeros(sets.shape[0], m, dtype=torch.bool)
    return out.scatter_(1, sets, True)


def _recombine(a: torch.Tensor, b: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Children (P, m) bool of parent masks ``a, b: (P, m)`` (k members each): all of
    ``a & b``, the rest (half of ``a ^ b``) drawn uniformly from ``a ^ b``."""
    key = torch.rand(a.shape, generator=gen)
    both = a & b
    need = k - both.sum(1)  # members each child still needs
    r = int(need.max())
    if r == 0:
        return both
    top = torch.where(a ^ b, key, -1.0).topk(r, dim=1).indices  # best keys first
    take = torch.arange(r).expand(a.shape[0], r) < need.unsqueeze(1)
    return both | torch.zeros_like(both).scatter_(1, top, take)


def _mutate(
    member: torch.Tensor, logits: torch.Tensor, n_swap: int, gen: torch.Generator
) -> torch.Tensor:
    """Sets (P, k) of flat indices: each child ``member: (P, m)`` bool (k members) with
    ``n_swap`` random members swapped for non-members drawn with the prior bias
    ``logits: (m,)``. Only ``n_swap`` entries a row are selected (a selection of k of m
    was half of DE's time on a 235 k-weight layer)."""
    p, m = member.shape
    k = int(member[0].sum())
    if n_swap > 0:
        drop_key = torch.where(member, torch.rand((p, m), generator=gen), 2.0)
        drop = drop_key.topk(n_swap, dim=1, largest=False, sorted=False).indices
        add_key = torch.where(member, -math.inf, logits.expand(p, m) + _gumbel((p, m), gen))
        add = add_key.topk(n_swap, dim=1, sorted=False).indices
        member = member.clone().scatter_(1, drop, False).scatter_(1, add, True)
    return member.nonzero()[:, 1].reshape(p, k)


def _tournament(fit: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` winners (indices) of binary tournaments on ``fit`` (lower is better)."""
    a = torch.randint(fit.numel(), (n,), generator=gen)
    b = torch.randint(fit.numel(), (n,), generator=gen)
    return torch.where(fit[a] <= fit[b], a, b)


def evolve_set(
    prior: torch.Tensor,
    available: torch.Tensor,
    fitness: Fitness,
    *,
    k: int,
    population: int,
    generations: int,
    mutation: float,
    bias: float,
    gen: torch.Generator,
    pool_factor: float = 4.0,
    carried: torch.Tensor | None = None,
    on_generation: Callable[[], None] | None = None,
    patience: int = 0,
    rescore: Fitness | None = None,
    rescore_top: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One round: sets of ``k`` available weights whose zeroing ``fitness`` likes best.

    prior: (m,) a cheap relevance estimate (e.g. ``|w|``); candidates are drawn with weight
    ``exp(-r / (bias * k))``, r the prior rank among the available weights (0 = lowest).
    Only the ``pool_factor * bias * k`` available weights of lowest prior are considered
    (beyond them the weight is below ``exp(-pool_factor)``). available: (m,) bool, at least
    k True. carried: (S, k) flat-index sets (the last round's population) that seed the
    first population, their unavailable members replaced by fresh draws; the first
    candidate is always the prior's own choice (the k lowest). patience: > 0 ends the round
    after that many generations in a row that did not lower the best fitness (the
    generations skipped still reach ``on_generation``, so a progress bar ends full).
    rescore: if given, the final population is ordered by it instead (only its best
    ``rescore_top`` by ``fitness`` when > 0; the others follow in ``fitness`` order).

    Returns the final population (population, k) int64 flat indices, best first, and its
    fitness (population,) (for rescored sets, the ``rescore`` value).
    """
    n_avail = int(available.sum())
    if n_avail < k:
        raise ValueError(f"only {n_avail} weights left, a set needs {k}")
    cand = torch.nonzero(available).squeeze(1)
    cand = cand[torch.argsort(prior[cand], stable=True)]  # lowest prior first, ties by index
    pool = cand[: min(n_avail, max(k, math.ceil(pool_factor * bias * k)))]
    m = pool.numel()
    logits = -torch.arange(m, dtype=torch.float32) / (bias * k)

    def fit_local(sets: torch.Tensor) -> torch.Tensor:
        return fitness(pool[sets])

    keys = logits.expand(population, m) + _gumbel((population, m), gen)
    keys[0] = logits  # the prior's own choice: the k lowest available weights
    if carried is not None and population > 1:
        # Sets that were cheap last round are likely cheap again: keep their members that
        # are still in the pool (a member outside it maps to the dropped column m).
        local = torch.full((prior.numel(),), m, dtype=torch.long)
        local[pool] = torch.arange(m)
        c = local[carried[: population - 1]]
        member = torch.zeros(c.shape[0], m + 1, dtype=torch.bool).scatter_(1, c, True)[:, :m]
        keys[1 : 1 + c.shape[0]] = torch.where(member, math.inf, keys[1 : 1 + c.shape[0]])
    pop = keys.topk(k, dim=1, sorted=False).indices
    fit = fit_local(pop)
    n_swap = min(max(1, round(mutation * k)), m - k)
    best_fit, stale = float(fit.min()), 0
    for g in range(generations):
        if patience and stale >= patience:
            for _ in range(generations - g):
                if on_generation is not None:
                    on_generation()
            break
        pa = _masks(pop[_tournament(fit, population, gen)], m)
        pb = _masks(pop[_tournament(fit, population, gen)], m)
        children = _mutate(_recombine(pa, pb, k, gen), logits, n_swap, gen)
        child_fit = fit_local(children)
        pool_sets, pool_fit = torch.cat([pop, children]), torch.cat([fit, child_fit])
        best = torch.argsort(pool_fit, stable=True)[:population]  # parents win ties
        pop, fit = pool_sets[best], pool_fit[best]
        stale = 0 if float(fit[0]) < best_fit else stale + 1
        best_fit = min(best_fit, float(fit[0]))
        if on_generation is not None:
            on_generation()
    order = torch.argsort(fit, stable=True)
    pop, fit = pop[order], fit[order]
    if rescore is not None:
        top = population if rescore_top <= 0 else min(rescore_top, population)
        again = rescore(pool[pop[:top]])
        first = torch.argsort(again, stable=True)
        pop = torch.cat([pop[:top][first], pop[top:]])
        fit = torch.cat([again[first], fit[top:]])
    return pool[pop], fit


def evolve_order(
    prior: torch.Tensor,
    fitness_for: Callable[[torch.Tensor], Fitness],
    *,
    k: int,
    rounds: int,
    population: int,
    generations: int,
    mutation: float,
    bias: float,
    gen: torch.Generator,
    pool_factor: float = 4.0,
    on_generation: Callable[[], None] | None = None,
    patience: int = 0,
    rescore_for: Callable[[torch.Tensor], Fitness] | None = None,
    rescore_top: int = 0,
) -> torch.Tensor:
    """The order (m,) of flat indices from least to most relevant, built in ``rounds``.

    fitness_for(zeroed: (m,) bool) -> the fitness of candidate sets zeroed on top of
    ``zeroed``; rescore_for(zeroed), if given, the fitness that picks each round's winner
    among its final population (see ``evolve_set``'s ``rescore`` and ``rescore_top``).
    Inside a round's set and among the weights never evolved, lower ``prior`` comes first
    (ties by index).
    """
    m = prior.numel()
    zeroed = torch.zeros(m, dtype=torch.bool)
    parts: list[torch.Tensor] = []
    pop: torch.Tensor | None = None
    for _ in range(rounds):
        pop, _fit = evolve_set(
            prior,
            ~zeroed,
            fitness_for(zeroed),
            k=k,
            population=population,
            generations=generations,
            mutation=mutation,
            bias=bias,
            gen=gen,
            pool_factor=pool_factor,
            carried=pop,
            on_generation=on_generation,
            patience=patience,
            rescore=None if rescore_for is None else rescore_for(zeroed),
            rescore_top=rescore_top,
        )
        winner = pop[0].sort().values  # index order, then a stable sort by prior
        parts.append(winner[torch.argsort(prior[winner], stable=True)])
        zeroed[winner] = True
    rest = torch.nonzero(~zeroed).squeeze(1)
    parts.append(rest[torch.argsort(prior[rest], stable=True)])
    return torch.cat(parts)


# --- the network side: batched tentative zeroing ----------------------------------------


@contextmanager
def _replace_output(module: nn.Module, out: torch.Tensor) -> Iterator[None]:
    """While active, ``module``'s output is replaced by ``out`` (it must run exactly once)."""
    calls = [0]

    def hook(_m: nn.Module, _inp: tuple[torch.Tensor, ...], _o: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    if calls[0] != 1:
        raise RuntimeError(
            f"Directed Evolution needs the layer's module to run once per "
            f"forward; it ran {calls[0]} times"
        )


def _layer_input(model: nn.Module, module: nn.Module, x: Inputs, *,
                 batch_size: int = 1 << 30) -> torch.Tensor:
    """The input of ``module`` when ``model`` runs on ``x`` (in batches of ``batch_size``)."""
    parts = []
    for _, xb in inputs_mod.batches(x, batch_size):
        seen: list[torch.Tensor] = []

        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], seen: list = seen) -> None:
            seen.append(inp[0].detach())

        handle = module.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                inputs_mod.call(model, xb)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise RuntimeError(
                f"Directed Evolution needs the layer's module to run once per "
                f"forward; it ran {len(seen)} times"
            )
        parts.append(seen[0])
    return torch.cat(parts)


class LayerProbe:
    """Divergence of the network when sets of one layer's weights are zeroed, batched.

    x: calibration inputs for n samples (any structure), teacher_out: the teacher's outputs
    on them (narrowed to ``target.output``).
    """

    def __init__(
        self,
        target: Target,
        layer: LayerRef,
        x: Inputs,
        teacher_out: Any,
        *,
        max_rows: int,
    ) -> None:
        self.model = target.teacher
        self.module = self.model.get_submodule(layer.module)
        self.divergence = target.divergence
        self.output = target.output
        self.x, self.teacher_out = x, teacher_out
        self.n = inputs_mod.n_samples(x)
        self.weight = layer_weight(target, layer)
        self.shape = tuple(self.weight.shape)
        self.name = layer.name
        self.inp = _layer_input(self.model, self.module, x, batch_size=target.batch_size)
        self.per_chunk = max(1, max_rows // self.n)
        self._teacher_layer_out: torch.Tensor | None = None
        # The layer's rows must follow the samples (its leading axis n * r for n samples, r
        # per sample, as a sample axis or tokens flattened into it) for its outputs to be
        # batched over candidates; a layer called on something else (e.g. a position table
        # on arange(T)) is probed one forward of the model per candidate.
        one = inputs_mod.head(x, 1)
        r1 = _layer_input(self.model, self.module, one).shape[0]
        r2 = _layer_input(self.model, self.module, inputs_mod.repeat(one, 2)).shape[0]
        self.per_sample = r2 == 2 * r1 and self.inp.shape[0] == self.n * r1
        self.local_prefix = True
        self.local_prefix = self.per_sample and self._prefix_is_local()

    def layer_outputs(self, w: torch.Tensor) -> torch.Tensor:
        """The layer's outputs (P, n, ...) for weights ``w: (P, *shape)``: one vmapped call,
        or on the CPU for an ``nn.Conv2d`` one call per candidate (vmap makes it a grouped
        convolution, 2-3x slower there than channels-last calls one by one; see
        ``moecomp.inputs.channels_last``)."""
        params = {k: v.detach() for k, v in self.module.named_parameters()}

        def one(wi: torch.Tensor) -> torch.Tensor:
            return functional_call(self.module, params | {"weight": wi}, (self.inp,))

        with torch.no_grad():
            if isinstance(self.module, nn.Conv2d) and w.device.type == "cpu":
                return torch.stack([inputs_mod.functional(self.module, {"weight": wi},
                                                          self.inp) for wi in w])
            return torch.vmap(one)(w)

    def zeroed_weights(self, zeroed: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
        """Weights (P, *shape): the layer's with ``zeroed: (m,) bool`` and each row of
        ``sets: (P, k)`` (flat indices) set to zero."""
        p = int(sets.shape[0])
        dev = self.weight.device  # the evolution's index maths stays on the CPU
        w = self.weight.reshape(-1).masked_fill(zeroed.to(dev), 0).expand(p, -1).clone()
        return w.scatter_(1, sets.to(dev), 0.0).reshape(p, *self.shape)

    def forward(self, layer_out: torch.Tensor, *, local: bool) -> Any:
        """Network outputs (each tensor ``(P, n, ...)``) with the layer's output replaced by
        ``layer_out``."""
        p = int(layer_out.shape[0])
        x = self.x if local else inputs_mod.repeat(self.x, p)
        flat = layer_out.reshape(-1, *layer_out.shape[2:])
        with torch.no_grad(), _replace_output(self.module, flat):
            y = outputs.select(inputs_mod.call(self.model, x), self.output)
        return outputs.map_tensors(y, lambda t: t.reshape(p, self.n, *t.shape[1:]))

    def _prefix_is_local(self) -> bool:
        """Whether the rest of the network sees only the layer's output (a batch of P * n
        rows fed in at the layer gives the same as repeating the inputs P times)."""
        gen = torch.Generator().manual_seed(0)
        m = self.weight.numel()
        sets = torch.stack([torch.randperm(m, generator=gen)[: max(1, m // 4)] for _ in range(2)])
        outs = self.layer_outputs(self.zeroed_weights(torch.zeros(m, dtype=torch.bool), sets))
        safe = self.forward(outs, local=False)
        try:
            fast = self.forward(outs, local=True)
        except RuntimeError:  # e.g. a skip connection adds n rows to P * n rows
            return False
        a, b = outputs.tensors(fast), outputs.tensors(safe)
        return len(a) == len(b) and all(
            u.shape == v.shape and torch.allclose(u, v, rtol=1e-4, atol=1e-5)
            for u, v in zip(a, b, strict=True))

    def fitness_for(self, zeroed: torch.Tensor) -> Fitness:
        """fitness(sets: (P, k)) -> (P,) divergence with ``zeroed`` and each set at zero (on
        the CPU, where the evolution runs, whatever device the network is on)."""

        def fitness(sets: torch.Tensor) -> torch.Tensor:
            out = []
            for i in range(0, int(sets.shape[0]), self.per_chunk):
                w = self.zeroed_weights(zeroed, sets[i : i + self.per_chunk])
                if not self.per_sample:
                    out.append(torch.stack([self.divergence(self.teacher_out, outputs.select(
                        inputs_mod.functional(self.model, {self.name: wi}, self.x),
                        self.output)).mean() for wi in w]))
                    continue
                student = self.forward(self.layer_outputs(w), local=self.local_prefix)
                out.append(self.divergence.batched(self.teacher_out, student).mean(-1))
            return torch.cat(out).cpu()

        return fitness

    def output_fitness_for(self, zeroed: torch.Tensor) -> Fitness:
        """fitness(sets: (P, k)) -> (P,) the change of the layer's own output with ``zeroed``
        and each set at zero: squared error over the calibration inputs, relative to the
        teacher layer output's squared norm. No network forward: the layer is called on the
        batch of zeroed weights (a dense call beat summing the zeroed weights' products by
        index on the encoder's Linear layers, 768 rows). (An Embedding's change is separable;
        ``DirectedEvolution`` orders it directly, see ``embedding_order``.)"""
        if self._teacher_layer_out is None:
            self._teacher_layer_out = self.layer_outputs(self.weight.unsqueeze(0))[0]
        y0 = self._teacher_layer_out
        scale = float(y0.float().pow(2).sum()) or 1.0

        def called(sets: torch.Tensor) -> torch.Tensor:
            out = []
            for i in range(0, int(sets.shape[0]), self.per_chunk):
                w = self.zeroed_weights(zeroed, sets[i : i + self.per_chunk])
                d = (self.layer_outputs(w) - y0).float()
                out.append(d.pow(2).reshape(d.shape[0], -1).sum(1) / scale)
            return torch.cat(out).cpu()

        return called

    def input_scale(self) -> torch.Tensor:
        """Per weight (shape of the weight), the L2 norm over the calibration data of the
        input feature it multiplies: Linear, the input's last axis; Conv (groups=1), the
        input channel."""
        if isinstance(self.module, nn.Embedding):
            # a row's "input" is the one-hot of its token: its norm is sqrt(occurrences)
            return _token_counts(self.inp, self.shape[0]).sqrt().unsqueeze(1).expand(self.shape)
        inp = self.inp.float()
        if isinstance(self.module, nn.Linear):
            norm = inp.reshape(-1, inp.shape[-1]).norm(dim=0)
            return norm.expand(self.shape)
        if isinstance(self.module, nn.modules.conv._ConvNd) and self.module.groups == 1:
            norm = inp.transpose(0, 1).reshape(inp.shape[1], -1).norm(dim=1)
            return norm.reshape(1, -1, *([1] * (len(self.shape) - 2))).expand(self.shape)
        raise ConfigError(
            "relevance.prior",
            f"'activation' needs a Linear, an Embedding or a Conv with "
            f"groups=1; {type(self.module).__name__} is none of them",
        )


def _token_counts(ids: torch.Tensor, rows: int) -> torch.Tensor:
    """How often each of ``rows`` table rows is read by the ids ``ids`` (float, CPU)."""
    return torch.bincount(ids.reshape(-1).long().cpu(), minlength=rows).float()


def embedding_order(target: Target, probe: LayerProbe) -> torch.Tensor:
    """An Embedding's flat indices ordered by the output change zeroing each entry causes,
    (count + 1) * w^2, counts over every calibration sample of ``target`` (not only the
    probe's): a row the sample never reads is not free."""
    x_all, _y, _t = calibration_slice(target, len(target.calib))
    ids = _layer_input(target.teacher, probe.module, x_all, batch_size=target.batch_size)
    counts = _token_counts(ids, probe.shape[0]) + 1.0
    cost = counts.unsqueeze(1) * probe.weight.float().cpu().pow(2)
    return torch.argsort(cost.reshape(-1), stable=True)


Prior = Literal["magnitude", "activation"]
# What a candidate set is judged by while the sets evolve: "network", the divergence of the
# whole network's output (the paper's tentative zeroing); "output", the change of the layer's
# own output, with only the best RESCORE_TOP sets of each round's final population measured
# by the network divergence to pick the set zeroed (for models whose forward is too dear to
# run for every candidate).
EvolvedOn = Literal["network", "output"]
RESCORE_TOP = 4


@dataclass(frozen=True)
class DirectedEvolution:
    """Scorer by Directed Evolution (see the module docstring). Scores are the order
    position (float64): the weight zeroed first scores 0."""

    generations: int = 8
    population: int = 16
    set_fraction: float = 0.05  # share of the layer zeroed per round (k = set_fraction*numel)
    evolved_fraction: float = 0.9  # share of the layer ranked by evolution; rest by the prior
    calibration: int = 256  # first n calibration inputs
    mutation: float = 0.05  # share of a child's set swapped by mutation
    bias: float = 1.0  # pull of sampling towards a low prior (smaller = stronger)
    pool_factor: float = 4.0  # only the pool_factor * bias * k lowest-prior weights are drawn
    # What sampling is biased by: "magnitude" |w| (the paper's), or "activation"
    # |w| * ||x_j|| (the size of the output change zeroing the weight causes).
    prior: Prior = "magnitude"
    max_rows: int = 1 << 16  # candidates x samples per forward pass (memory bound)
    # > 0: a round ends after this many generations in a row without a better set (0: all
    # ``generations`` always run)
    patience: int = 0
    # 0 < screen < calibration: the sets evolve on the first ``screen`` calibration inputs
    # only, and each round's final population is measured again on all ``calibration`` to
    # pick the set zeroed (0: evolve on all of them)
    screen: int = 0
    # "network" or "output" (see ``EvolvedOn``)
    fitness: EvolvedOn = "network"
    progress: bool = False

    def __post_init__(self) -> None:
        ints = (
            ("generations", self.generations, 0),
            ("population", self.population, 2),
            ("calibration", self.calibration, 1),
            ("max_rows", self.max_rows, 1),
            ("patience", self.patience, 0),
            ("screen", self.screen, 0),
        )
        for name, value, lo in ints:
            if value < lo:
                raise ConfigError(f"relevance.{name}", f"must be >= {lo}, got {value}")
        for name, v in (("set_fraction", self.set_fraction), ("mutation", self.mutation)):
            if not 0 < v <= 1:
                raise ConfigError(f"relevance.{name}", f"must be in (0, 1], got {v}")
        if not 0 <= self.evolved_fraction <= 1:
            raise ConfigError(
                "relevance.evolved_fraction", f"must be in [0, 1], got {self.evolved_fraction}"
            )
        for name, v in (("bias", self.bias), ("pool_factor", self.pool_factor)):
            if not v > 0:
                raise ConfigError(f"relevance.{name}", f"must be > 0, got {v}")
        if self.fitness not in get_args(EvolvedOn):
            raise ConfigError(
                "relevance.de_fitness",
                f"must be one of {', '.join(map(repr, get_args(EvolvedOn)))}, "
                f"got {self.fitness!r}",
            )
        if self.prior not in get_args(Prior):
            raise ConfigError(
                "relevance.prior",
                f"must be one of {', '.join(map(repr, get_args(Prior)))}, got {self.prior!r}",
            )

    @classmethod
    def from_config(cls, cfg: RelevanceConfig, *, progress: bool = False) -> DirectedEvolution:
        return cls(
            generations=cfg.generations,
            population=cfg.population,
            set_fraction=cfg.set_fraction,
            calibration=cfg.calibration,
            prior=cfg.de_prior,
            patience=cfg.patience,
            screen=cfg.screen,
            fitness=cfg.de_fitness,
            progress=progress,
        )

    def plan(self, numel: int) -> tuple[int, int]:
        """(set size k, rounds) for a layer of ``numel`` weights: ``rounds * k`` is about
        ``evolved_fraction * numel`` (at most numel)."""
        k = max(1, round(self.set_fraction * numel))
        rounds = min(numel // k, round(self.evolved_fraction * numel / k))
        return k, rounds

    def __call__(self, target: Target, layer: LayerRef, *, seed: int) -> torch.Tensor:
        x, _y, t = calibration_slice(target, self.calibration)
        probe = LayerProbe(target, layer, x, t, max_rows=self.max_rows)
        screen = probe  # the probe the sets evolve on
        if 0 < self.screen < probe.n:
            xs, _ys, ts = calibration_slice(target, self.screen)
            screen = LayerProbe(target, layer, xs, ts, max_rows=self.max_rows)
        if self.fitness == "output" and isinstance(probe.module, nn.Embedding):
            # The output change of zeroing table entries is separable (count * w^2 each):
            # its best order is that cost's own; evolution could only approach it. Counts
            # over every calibration sample, plus one: a row the sample never reads is not
            # free (on the encoder, counts from 2 sequences zeroed whole rows of tokens the
            # validation text uses: divergence 0.39 against magnitude's 0.026 at 50 %).
            return order_to_scores(embedding_order(target, probe), layer.shape)
        prior = probe.weight.abs().float().cpu()
        if self.prior == "activation":
            prior = prior * probe.input_scale().cpu()
        k, rounds = self.plan(layer.numel)
        gen = torch.Generator().manual_seed(seed)
        evolve_on, rescore_for, top = screen.fitness_for, None, 0
        if screen is not probe:
            rescore_for = probe.fitness_for
        if self.fitness == "output":
            evolve_on, rescore_for, top = screen.output_fitness_for, probe.fitness_for, RESCORE_TOP
        with tqdm(
            total=rounds * self.generations,
            desc=f"DE {layer.name}",
            unit="gen",
            disable=not self.progress,
            leave=False,
        ) as bar:
            order = evolve_order(
                prior.reshape(-1),
                evolve_on,
                k=k,
                rounds=rounds,
                population=self.population,
                generations=self.generations,
                mutation=self.mutation,
                bias=self.bias,
                gen=gen,
                pool_factor=self.pool_factor,
                on_generation=lambda: bar.update(1),
                patience=self.patience,
                rescore_for=rescore_for,
                rescore_top=top,
            )
        return order_to_scores(order, layer.shape)
