"""Directed Evolution (seed 1, Franca-Neto 2022) as a single-objective baseline, on DEAP.

One run compresses the whole model to one *target global sparsity*. Layers are handled in
the order of ``target.layers``, each in two phases:

1. **Prune.** The layer's share of the target (the global count of weights to zero,
   ``round(sparsity * N)``, split over the layers in proportion to their size, so the global
   sparsity is met exactly) is zeroed in ``steps``. In each step a DEAP population of
   candidate *sets* of surviving weights is evolved: fitness is the teacher-student
   divergence on calibration data with the set *tentatively zeroed* on top of what is
   already zeroed (earlier layers pruned and quantised, later layers at the teacher's
   weights); selection is ``tools.selTournament`` with one elite (``tools.selBest``),
   variation ``algorithms.varAnd`` with a set crossover (the parents' intersection is kept,
   the rest drawn from their union) and a *directed* swap mutation: the members with the
   worst credit (mean divergence of the measured sets that held them) leave, and survivors
   not yet tried in this step come in (once all were tried, survivors of better credit).
   The best set of the step (``tools.HallOfFame``) is zeroed for real.
2. **Quantise.** The survivors get the *fewest* bits (1..8) whose divergence stays within the
   acceptable loss of the pruned layer: ``d(bits) <= d0 + abs_tol + rel_tol * d0`` with
   ``d0`` the divergence after pruning, using the uniform bin-mean quantizer
   (``moecomp.quantize.uniform_quantize`` through ``moecomp.apply.apply_layer``, the same
   code the Evaluator and the codec use). If no bit-width is acceptable, the one with the
   smallest divergence is kept (``LayerRecord.within_tolerance`` is then False).

The result is expressed the way the rest of moecomp speaks: ranks (the zeroed weights get
the lowest ranks, in the order they were zeroed; survivors follow by magnitude) and a
:class:`~moecomp.plan.CompressionPlan` (per layer ``sparsity = n_pruned / numel``, the chosen
bits, the ``uniform`` quantizer). ``apply_plan(plan, weights, ranks)`` rebuilds exactly the
student the evolution ended with.

**Evaluations.** Every student whose divergence is computed counts as one evaluation (a
batch of P candidates counts P); a candidate set already measured in the same step is not
measured again. The run never exceeds ``budget``: each layer reserves 8 evaluations for its
bit-width search, and the rest is shared equally among the layers still to prune (what a
layer leaves unspent goes to the next). Equally, not by size: a layer's effect on the
divergence is not proportional to its size (on the digits MLP the 640-weight output layer
moves it most; a split by weights gave it ~4 % of the budget and worse students at most
budgets tried). A layer's share sets its number of steps,
``min(n_pruned, max_steps, share // (P * (G + 1)))`` (at least 1), with
the configured population P and nominal generations G; a share below one population
shrinks P (a single evaluation measures only the magnitude candidate). Each step then
evolves while a whole generation still fits in its part of the share (unspent parts roll on
to the next step) and stops early once ``patience`` generations in a row produced no set
that was not measured before (the population has converged).

**Candidates.** Each step's population starts from the ``m`` smallest-magnitude survivors
(one individual as is, the others with ``init_share`` of their members swapped for random
survivors): a uniformly random set of a large layer is almost always far worse than the
magnitude set, so a population of those would only waste the budget. The evolution keeps the
magnitude set only when nothing measured better.

**Randomness.** ``seed`` feeds a ``numpy.random.Generator`` (initial sets, crossover,
mutation) and a private ``random.Random`` for DEAP: ``tools.selTournament`` and
``algorithms.varAnd`` draw from Python's *global* ``random`` module, so around those calls the
global state is swapped for the private one and restored afterwards (:func:`_deap_random`).
Python's global ``random`` state is the same after a run as before; the swap is not
thread-safe, so do not run DEAP in another thread at the same time.

**Batching.** The divergence of a population is computed by one forward pass per chunk of
``chunk_size`` candidates: ``torch.func.vmap`` over ``torch.func.functional_call`` of the
teacher with the layer's weight replaced by the batch of masked weights.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from deap import algorithms, base, creator, tools

from moecomp import inputs as inputs_mod
from moecomp import outputs
from moecomp.apply import apply_layer, n_pruned
from moecomp.errors import ConfigError
from moecomp.plan import CompressionPlan, LayerPlan
from moecomp.target import Target

BITS: tuple[int, ...] = tuple(range(1, 9))
# Evaluations a layer reserves for its bit-width search (at most one per bit-width).
BITS_EVALS = len(BITS)


@dataclass(frozen=True)
class DEConfig:
    """Settings of the Directed Evolution baseline (per pruning step unless said otherwise)."""

    population: int = 8  # candidate sets per step
    # Nominal generations per step: plans the number of steps (a step runs on while its
    # share of the budget lasts and the population still produces new sets).
    generations: int = 3
    cx_prob: float = 0.7  # probability a pair of parents is recombined
    mut_prob: float = 0.3  # probability a child is mutated
    mut_share: float = 0.1  # share of a set's members a mutation swaps (at least one)
    init_share: float = 0.5  # share swapped in the initial variants of the magnitude set
    tournament: int = 3  # tournament size of selTournament
    # A step ends when its evaluations are spent, or after this many generations in a row
    # that produced no set not measured before (the population has converged).
    patience: int = 5
    max_steps: int = 32  # most pruning steps per layer
    # Acceptable loss of quantisation: d(bits) <= d0 + abs_tol + rel_tol * d0 (divergence units)
    rel_tol: float = 0.05
    abs_tol: float = 1e-3
    calibration: int | None = None  # first n calibration inputs; None: all (as the Evaluator)
    chunk_size: int = 32  # candidates per batched forward pass (memory bound)
    seed: int = 0

    def __post_init__(self) -> None:
        ints = (
            ("population", self.population, 1),
            ("generations", self.generations, 0),
            ("tournament", self.tournament, 1),
            ("patience", self.patience, 1),
            ("max_steps", self.max_steps, 1),
            ("chunk_size", self.chunk_size, 1),
        )
        for name, value, lo in ints:
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"de.{name}", f"must be an integer >= {lo}, got {value!r}")
        for name, v in (
            ("cx_prob", self.cx_prob),
            ("mut_prob", self.mut_prob),
            ("mut_share", self.mut_share),
            ("init_share", self.init_share),
        ):
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"de.{name}", f"must be in [0, 1], got {v!r}")
        for name, v in (("rel_tol", self.rel_tol), ("abs_tol", self.abs_tol)):
            if not (math.isfinite(v) and v >= 0.0):
                raise ConfigError(f"de.{name}", f"must be a finite number >= 0, got {v!r}")
        c = self.calibration
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ConfigError("de.calibration", f"must be an integer >= 1 or absent, got {c!r}")


@dataclass(frozen=True)
class LayerRecord:
    """What the evolution did to one layer.

    divergence_pruned: divergence after the layer's pruning (before its quantisation);
    divergence: after its quantisation with ``bits`` (the state the next layer starts from).
    """

    name: str
    numel: int
    n_pruned: int
    steps: int
    population: int
    generations: int  # generations run, summed over the steps
    evals: int  # evaluations spent on this layer (pruning + bit-width search)
    divergence_pruned: float
    bits: int
    divergence: float
    within_tolerance: bool


@dataclass(frozen=True)
class DEResult:
    """One Directed Evolution run at one target sparsity.

    ranks: name -> int64 ranks of the weight's shape (zeroed weights lowest, in the order
        they were zeroed); plan: the matching CompressionPlan; divergence: the final
        student's divergence on the calibration inputs the evolution used.
    """

    target_sparsity: float
    ranks: dict[str, torch.Tensor]
    plan: CompressionPlan
    layers: tuple[LayerRecord, ...]
    n_evals: int
    budget: int
    divergence: float
    seed: int

    @property
    def sparsity(self) -> float:
        """Global sparsity reached: zeroed / compressible weights."""
        return sum(r.n_pruned for r in self.layers) / sum(r.numel for r in self.layers)


# --- pure helpers ----------------------------------------------------------------------------


def apportion(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` weights to prune over layers of ``sizes`` weights, in proportion.

    Largest-remainder rounding (ties to the earlier layer), so the parts sum to ``total``
    exactly; every layer keeps at least one weight (part <= size - 1).
    """
    n = sum(sizes)
    if total < 0 or total > n - len(sizes):
        raise ValueError(f"cannot prune {total} of {n} weights and keep one per layer")
    if total == 0:
        return [0] * len(sizes)
    parts = [min(total * s // n, s - 1) for s in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-(total * sizes[i] % n), i))
    left = total - sum(parts)
    while left > 0:
        for i in order:
            if left > 0 and parts[i] < sizes[i] - 1:
                parts[i] += 1
                left -= 1
    return parts


def acceptable(d0: float, *, rel_tol: float, abs_tol: float) -> float:
    """The largest divergence a quantisation may leave after a pruning at divergence ``d0``."""
    return d0 + abs_tol + rel_tol * d0


def select_bits(
    divergence_of: Callable[[int], float],
    d0: float,
    *,
    rel_tol: float,
    abs_tol: float,
    bits: Sequence[int] = BITS,
) -> tuple[int, dict[int, float]]:
    """The fewest ``bits`` whose divergence is acceptable (see :func:`acceptable`).

    divergence_of(b) -> divergence with the layer quantised to ``b`` bits; called for
    increasing ``b`` until one is acceptable, so at most ``len(bits)`` times. When none is,
    the bit-width with the smallest divergence is returned (fewer bits on ties).
    Returns ``(bits, {tried bits: divergence})``.
    """
    limit = acceptable(d0, rel_tol=rel_tol, abs_tol=abs_tol)
    tried: dict[int, float] = {}
    for b in sorted(bits):
        tried[b] = float(divergence_of(b))
        if tried[b] <= limit:
            return b, tried
    return min(tried, key=lambda b: (tried[b], b)), tried


def ranks_from_order(
    zeroed: Sequence[np.ndarray], w_abs: np.ndarray, shape: tuple[int, ...]
) -> torch.Tensor:
    """Ranks (int64, ``shape``) for weights zeroed in ``zeroed`` (flat index arrays, in the
    order zeroed; inside a set by magnitude) with the survivors after them by magnitude."""
    numel = int(w_abs.size)
    done = np.concatenate(
        [np.asarray(z, dtype=np.int64) for z in zeroed] or [np.zeros(0, dtype=np.int64)]
    )
    alive = np.ones(numel, dtype=bool)
    alive[done] = False
    rest = np.flatnonzero(alive)
    order = np.concatenate([done, rest[np.argsort(w_abs[rest], kind="stable")]])
    ranks = np.empty(numel, dtype=np.int64)
    ranks[order] = np.arange(numel, dtype=np.int64)
    return torch.from_numpy(ranks).reshape(shape)


# --- DEAP plumbing -----------------------------------------------------------------------------


def _deap_classes() -> tuple[Any, Any]:
    """DEAP's creator makes classes in its own module namespace; create them once."""
    if not hasattr(creator, "MoecompDEFitness"):
        creator.create("MoecompDEFitness", base.Fitness, weights=(-1.0,))
    if not hasattr(creator, "MoecompDESet"):
        creator.create("MoecompDESet", list, fitness=creator.MoecompDEFitness)
    return creator.MoecompDEFitness, creator.MoecompDESet


@contextmanager
def _deap_random(rng: random.Random) -> Iterator[None]:
    """Let DEAP's tools draw from ``rng`` instead of Python's global ``random``.

    DEAP's selection and variation call ``random.random``/``random.choice`` of the global
    module. Inside this block the global state is ``rng``'s; on exit ``rng`` takes the
    advanced state and the global state is restored, so callers' global randomness is
    untouched and the run depends on ``seed`` only. Not thread-safe.
    """
    saved = random.getstate()
    random.setstate(rng.getstate())
    try:
        yield
    finally:
        rng.setstate(random.getstate())
        random.setstate(saved)


def _swap(
    members: np.ndarray, pool: np.ndarray, n_swap: int, rng: np.random.Generator
) -> np.ndarray:
    """``members`` (m,) with ``n_swap`` of them exchanged for non-members drawn from ``pool``."""
    outside = np.setdiff1d(pool, members, assume_unique=True)
    n_swap = min(n_swap, outside.size, members.size)
    if n_swap == 0:
        return np.sort(members)
    keep = rng.choice(members.size, members.size - n_swap, replace=False)
    new = rng.choice(outside, n_swap, replace=False)
    return np.sort(np.concatenate([members[keep], new]))


def _mate_sets(
    a: list[int], b: list[int], *, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Set crossover: each child keeps the parents' intersection and fills up to the set size
    with members drawn from the rest of their union (in place, DEAP style)."""
    sa, sb = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    common = np.intersect1d(sa, sb, assume_unique=True)
    rest = np.setxor1d(sa, sb, assume_unique=True)
    need = sa.size - common.size
    for child in (a, b):
        fill = rng.choice(rest, need, replace=False) if need else rest[:0]
        child[:] = np.sort(np.concatenate([common, fill])).tolist()
    return a, b


def _clone(ind: Any) -> Any:
    """A copy of a set individual with its fitness (DEAP's default deepcopy is ~20x slower
    on sets of thousands of indices)."""
    new = type(ind)(ind)
    if ind.fitness.valid:
        new.fitness.values = ind.fitness.values
    return new


class Credit:
    """Per-weight credit inside one pruning step: the mean divergence of the evaluated sets
    that contained the weight (lower = safer to zero); weights in no evaluated set yet have
    no credit. Arrays are indexed by flat weight index, shape ``(numel,)``."""

    def __init__(self, numel: int) -> None:
        self.total = np.zeros(numel)
        self.count = np.zeros(numel, dtype=np.int64)

    def add(self, sets: list[list[int]], divergences: np.ndarray) -> None:
        for s, d in zip(sets, divergences, strict=True):
            self.total[s] += float(d)
            self.count[s] += 1

    def mean(self, idx: np.ndarray) -> np.ndarray:
        """Credit of ``idx`` (k,); NaN where untried."""
        c = self.count[idx]
        return np.where(c > 0, self.total[idx] / np.maximum(c, 1), np.nan)


def directed_swap(
    members: np.ndarray, pool: np.ndarray, n_swap: int, credit: Credit, rng: np.random.Generator
) -> np.ndarray:
    """``members`` (m,) with the ``n_swap`` of worst credit (highest; ties at random)
    exchanged for non-members of ``pool``: untried ones first (at random), then at random
    from the better half by credit. Returns the new set, sorted."""
    outside = np.setdiff1d(pool, members, assume_unique=True)
    n_swap = min(n_swap, outside.size, members.size)
    if n_swap == 0:
        return np.sort(members)
    worst = np.lexsort(
        (rng.random(members.size), -np.nan_to_num(credit.mean(members), nan=-np.inf))
    )
    keep = members[worst[n_swap:]]
    score = credit.mean(outside)
    untried = outside[np.isnan(score)]
    if untried.size >= n_swap:
        new = rng.choice(untried, n_swap, replace=False)
    else:
        tried = outside[~np.isnan(score)]
        order = tried[np.argsort(score[~np.isnan(score)], kind="stable")]
        better = order[: max(n_swap - untried.size, (order.size + 1) // 2)]
        new = np.concatenate([untried, rng.choice(better, n_swap - untried.size, replace=False)])
    return np.sort(np.concatenate([keep, new]))


def _mutate_set(
    ind: list[int], *, pool: np.ndarray, share: float, credit: Credit, rng: np.random.Generator
) -> tuple[list[int]]:
    """Directed swap mutation of ``max(1, round(share * m))`` members (DEAP style, in place)."""
    members = np.asarray(ind, dtype=np.int64)
    ind[:] = directed_swap(members, pool, max(1, round(share * members.size)), credit, rng).tolist()
    return (ind,)


# --- the network side ------------------------------------------------------------------------


class _Student:
    """The student being built: the teacher's tensors with finished layers replaced, and a
    batched divergence of candidate weights for one layer. Counts every evaluation."""

    def __init__(
        self, target: Target, *, calibration: int | None, chunk_size: int, budget: int
    ) -> None:
        self.model = target.teacher
        n = len(target.calib) if calibration is None else calibration
        self.x = inputs_mod.head(target.calib.inputs, n)
        self.teacher_out = outputs.take(target.teacher_out, slice(0, n))
        self.divergence = target.divergence
        self.output = target.output
        self.tensors: dict[str, torch.Tensor] = target.state_dict()
        self.chunk_size = chunk_size
        self.budget = budget
        self.n_evals = 0

    def divergences(self, name: str, weights: torch.Tensor) -> np.ndarray:
        """Divergence (p,) of the student with tensor ``name`` set to each of ``weights:
        (p, *shape)`` in turn; counts p evaluations."""
        p = int(weights.shape[0])
        if self.n_evals + p > self.budget:  # the allocation guarantees this never happens
            raise RuntimeError(
                f"Directed Evolution would exceed its budget of {self.budget} "
                f"evaluations ({self.n_evals} spent, {p} asked)"
            )
        self.n_evals += p
        others = {k: v for k, v in self.tensors.items() if k != name}

        def forward(w: torch.Tensor) -> Any:
            return outputs.select(
                inputs_mod.functional(self.model, {**others, name: w}, self.x), self.output)

        out = []
        with torch.no_grad():
            for i in range(0, p, self.chunk_size):
                student = torch.vmap(forward)(weights[i : i + self.chunk_size])
                out.append(self.divergence.batched(self.teacher_out, student).mean(-1))
        return torch.cat(out).to(device="cpu", dtype=torch.float64).numpy()


# --- the evolution ---------------------------------------------------------------------------


def _evolve_set(
    fitness: Callable[[list[list[int]]], np.ndarray],
    pool: np.ndarray,
    w_abs: np.ndarray,
    m: int,
    *,
    population: int,
    evals: int,
    cfg: DEConfig,
    rng: np.random.Generator,
    py_rng: random.Random,
) -> tuple[np.ndarray, float, int, int]:
    """The set of ``m`` members of ``pool`` (surviving flat indices) whose zeroing
    ``fitness`` likes best, evolved by a DEAP population of ``population`` sets.

    fitness(sets) -> divergence (len(sets),) of zeroing each set (lists of flat indices).
    Generations run while a whole one still fits in ``evals`` (at least ``population``)
    and one of the last ``cfg.patience`` generations produced a set not measured before.
    Returns the best set (sorted flat indices), its divergence, the evaluations spent and
    the generations run.
    """
    _, Individual = _deap_classes()
    toolbox = base.Toolbox()
    toolbox.register("clone", _clone)
    toolbox.register("mate", _mate_sets, rng=rng)
    credit = Credit(int(w_abs.size))
    toolbox.register("mutate", _mutate_set, pool=pool, share=cfg.mut_share, credit=credit, rng=rng)
    toolbox.register("select", tools.selTournament, tournsize=cfg.tournament)

    seen: dict[tuple[int, ...], float] = {}

    def evaluate(individuals: list[Any]) -> int:
        todo = [ind for ind in individuals if not ind.fitness.valid]
        fresh = list({tuple(ind): None for ind in todo if tuple(ind) not in seen})
        if fresh:
            sets = [list(k) for k in fresh]
            values = fitness(sets)
            credit.add(sets, values)
            for key, d in zip(fresh, values, strict=True):
                seen[key] = float(d)
        for ind in todo:
            ind.fitness.values = (seen[tuple(ind)],)
        return len(fresh)

    magnitude = np.sort(pool[np.argsort(w_abs[pool], kind="stable")[:m]])
    n_init = max(1, round(cfg.init_share * m)) if cfg.init_share > 0 else 0
    pop = [Individual(magnitude.tolist())]
    pop += [Individual(_swap(magnitude, pool, n_init, rng).tolist()) for _ in range(population - 1)]
    spent = evaluate(pop)
    best = tools.HallOfFame(1)
    best.update(pop)
    generations = stall = 0
    # a generation evaluates at most population - 1 children (one elite is kept as is)
    while population > 1 and spent + population - 1 <= evals and stall < cfg.patience:
        with _deap_random(py_rng):
            parents = toolbox.select(pop, population - 1)
            offspring = algorithms.varAnd(parents, toolbox, cfg.cx_prob, cfg.mut_prob)
        fresh = evaluate(offspring)
        spent += fresh
        pop = tools.selBest(pop, 1) + offspring
        best.update(pop)
        generations += 1
        stall = 0 if fresh else stall + 1
    return (
        np.asarray(best[0], dtype=np.int64),
        float(best[0].fitness.values[0]),
        spent,
        generations,
    )


def _step_plan(share: int, k: int, cfg: DEConfig) -> tuple[int, int]:
    """(steps, population) for pruning ``k`` weights with ``share`` evaluations (>= 1): as many
    steps as afford ``population * (generations + 1)`` evaluations each, within
    ``1..min(k, max_steps)``; a share below one population shrinks the population."""
    p = min(cfg.population, share)
    steps = max(1, min(k, cfg.max_steps, share // (p * (cfg.generations + 1))))
    return steps, p


def run_directed_evolution(
    target: Target,
    sparsity: float,
    *,
    budget: int,
    config: DEConfig | None = None,
    on_evals: Callable[[int], None] | None = None,
) -> DEResult:
    """Compress ``target`` to global ``sparsity`` by Directed Evolution (module docstring).

    sparsity: share of all compressible weights zeroed, in [0, 1); met exactly (up to the
        rounding of ``round(sparsity * N)``), every layer keeping at least one weight.
    budget: most evaluations (students whose divergence is computed); at least
        ``9 * len(target.layers)``.
    on_evals(n): called with the evaluations spent after each layer (for progress bars).
    """
    cfg = config if config is not None else DEConfig()
    if isinstance(sparsity, bool) or not 0.0 <= float(sparsity) < 1.0:
        raise ConfigError("sparsity", f"must be a number in [0, 1), got {sparsity!r}")
    n_layers = len(target.layers)
    min_budget = (BITS_EVALS + 1) * n_layers
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < min_budget:
        raise ConfigError(
            "budget",
            f"Directed Evolution needs an integer >= {min_budget} "
            f"(9 per layer) evaluations, got {budget!r}",
        )
    sizes = [ref.numel for ref in target.layers]
    total = n_pruned(sum(sizes), float(sparsity))
    try:
        counts = apportion(total, sizes)
    except ValueError as e:
        raise ConfigError("sparsity", f"{sparsity} is too high for this model: {e}") from None

    rng = np.random.default_rng(cfg.seed)
    py_rng = random.Random(cfg.seed)
    student = _Student(
        target, calibration=cfg.calibration, chunk_size=cfg.chunk_size, budget=budget
    )
    ranks: dict[str, torch.Tensor] = {}
    layer_plans: dict[str, LayerPlan] = {}
    records: list[LayerRecord] = []
    current = 0.0  # divergence of the student as it stands (the teacher: 0)

    for li, ref in enumerate(target.layers):
        k = counts[li]
        start = student.n_evals
        teacher_w = student.tensors[ref.name]
        flat = teacher_w.reshape(-1)
        w_abs = flat.abs().to(device="cpu", dtype=torch.float64).numpy()
        alive = np.ones(ref.numel, dtype=bool)
        zeroed: list[np.ndarray] = []
        steps = p = g = 0
        d_pruned = current
        if k > 0:
            n_later = sum(1 for c in counts[li + 1 :] if c > 0)
            prunable = budget - student.n_evals - BITS_EVALS * (n_layers - li)
            share = max(1, min(prunable // (n_later + 1), prunable - n_later))
            steps, p = _step_plan(share, k, cfg)
            sizes_t = [k // steps + (1 if t < k % steps else 0) for t in range(steps)]
            for t, m in enumerate(sizes_t):
                pool = np.flatnonzero(alive)
                keep = torch.from_numpy(alive).to(flat.device)
                base_w = torch.where(
                    keep, flat, torch.zeros((), dtype=flat.dtype, device=flat.device)
                )

                def fitness(
                    sets: list[list[int]],
                    base_w: torch.Tensor = base_w,
                    name: str = ref.name,
                    shape: tuple[int, ...] = ref.shape,
                ) -> np.ndarray:
                    idx = torch.tensor(sets, dtype=torch.int64, device=base_w.device)
                    w = base_w.expand(idx.shape[0], -1).clone().scatter_(1, idx, 0.0)
                    return student.divergences(name, w.reshape(-1, *shape))

                # what earlier steps left unspent goes to the later ones
                left = share - (student.n_evals - start)
                chosen, d_pruned, _, gens = _evolve_set(
                    fitness,
                    pool,
                    w_abs,
                    m,
                    population=p,
                    evals=left // (steps - t),
                    cfg=cfg,
                    rng=rng,
                    py_rng=py_rng,
                )
                g += gens
                alive[chosen] = False
                zeroed.append(chosen[np.argsort(w_abs[chosen], kind="stable")])

        rank = ranks_from_order(zeroed, w_abs, ref.shape)
        layer_sparsity = k / ref.numel
        if n_pruned(ref.numel, layer_sparsity) != k:  # the plan must rebuild this mask
            raise RuntimeError(f"{ref.name}: sparsity {layer_sparsity} does not give {k} zeros")

        def quantized(
            b: int,
            rank: torch.Tensor = rank,
            s: float = layer_sparsity,
            w: torch.Tensor = teacher_w,
        ) -> torch.Tensor:
            """The layer pruned by ``rank`` and quantised to ``b`` bits, as ``apply_plan``
            builds it (computed on the CPU in float32), in the teacher tensor's dtype/device."""
            q = apply_layer(w, rank, sparsity=s, bits=b, quantizer="uniform").dequantize()
            return q.to(device=w.device, dtype=w.dtype)

        def divergence_of(b: int, name: str = ref.name) -> float:
            return float(student.divergences(name, quantized(b).unsqueeze(0))[0])

        bits, tried = select_bits(divergence_of, d_pruned, rel_tol=cfg.rel_tol, abs_tol=cfg.abs_tol)
        current = tried[bits]
        student.tensors[ref.name] = quantized(bits)
        ranks[ref.name] = rank
        layer_plans[ref.name] = LayerPlan(sparsity=layer_sparsity, bits=bits, quantizer="uniform")
        records.append(
            LayerRecord(
                name=ref.name,
                numel=ref.numel,
                n_pruned=k,
                steps=steps,
                population=p,
                generations=g,
                evals=student.n_evals - start,
                divergence_pruned=d_pruned,
                bits=bits,
                divergence=current,
                within_tolerance=current
                <= acceptable(d_pruned, rel_tol=cfg.rel_tol, abs_tol=cfg.abs_tol),
            )
        )
        if on_evals is not None:
            on_evals(student.n_evals)

    plan = CompressionPlan(
        layers=layer_plans,
        meta={
            "baseline": "directed_evolution",
            "target_sparsity": float(sparsity),
            "seed": cfg.seed,
            "n_evals": student.n_evals,
            "budget": budget,
        },
    )
    return DEResult(
        target_sparsity=float(sparsity),
        ranks=ranks,
        plan=plan,
        layers=tuple(records),
        n_evals=student.n_evals,
        budget=budget,
        divergence=current,
        seed=cfg.seed,
    )
