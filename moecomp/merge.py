"""Merging of neighbouring quantisation levels under a fidelity tolerance.

The *Refine* stage of DESIGN.md (seed 2, Khosrowshahli et al.): after a solution is picked,
neighbouring levels of a codebook are merged for as long as the model's fidelity loss stays
within ``baseline + tolerance``. Fewer levels means fewer distinct indices and a smaller
entropy-coded file.

A *group* is the unit whose codebook is merged: one layer on its own, or all layers that
share one codebook (the ``shared`` quantizer); merging a pair in a group changes every layer
of the group, and level counts are pooled over it.

Two phases, so that the expensive fidelity (a pass over the validation split) is called a
few dozen times instead of once per tried pair:

1. **The merge path** (:func:`merge_path`), computed once: one merge after another until every
   group has one level. Within a group the next pair is the one of least Ward cost (merging
   levels ``j``, ``j+1`` with counts ``n_j, n_{j+1}`` and values ``c_j, c_{j+1}`` raises the
   squared weight error by ``n_j n_{j+1} / (n_j + n_{j+1}) * (c_j - c_{j+1})**2``; the merged
   value is the count-weighted mean). Across groups a cheap *guide* decides (e.g. the
   divergence on a few hundred calibration samples): each step takes the group whose next
   merge raises the guide least (lazily re-measured: a group's last measured rise is reused
   until it is the smallest, then measured again at the current state). Without a guide,
   the least Ward cost over all groups goes first.
2. **The furthest point within the tolerance** (:meth:`MeasuredPath.within`): the fidelity is
   measured on a grid of the path (every ``step``-th point, ``step ~ sqrt(len)``), the
   furthest grid point within ``baseline + tolerance`` is found, then every point between it
   and the next grid point is measured and the furthest one within is taken. Measurements are
   cached on the :class:`MeasuredPath`. This makes the result **monotone**: on one path a
   larger tolerance never ends at an earlier point (fewer merges, a larger file) than a
   smaller one, and the path is deterministic, so separate calls agree too.

Before the first merge each group is normalised, which leaves every ``dequantize()`` bit for
bit unchanged: unused levels are dropped, levels with equal values are joined and the
codebook is sorted, so levels are contiguous ``0..k'-1`` in ascending order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from moecomp.apply import QuantizedLayer
from moecomp.errors import ConfigError

Fidelity = Callable[[dict[str, QuantizedLayer]], float]
"""layers -> a loss-like number, lower is better (a divergence, a metric's drop)."""


@dataclass(frozen=True)
class MergeStep:
    """One merge of the path: levels ``level`` and ``level + 1`` of ``group`` became one
    level of ``value``; ``guide``: the guide after it (NaN without a guide)."""

    group: tuple[str, ...]
    level: int
    value: float
    guide: float


@dataclass(frozen=True)
class MergeResult:
    """What merging within a tolerance did.

    layers: the merged layers (same names and order as the input).
    levels_before / levels_after: per layer, the codebook length before and after.
    fidelity_before: fidelity of the input layers; fidelity_after: of ``layers`` (both as
        returned by the fidelity callable; lower is better).
    baseline, tolerance: the bound ``fidelity_after <= baseline + tolerance`` that held.
    steps: the merges taken (a prefix of the path); path_length: merges on the whole path;
    evaluations: fidelity calls so far on this path (cached ones not counted again);
    guide_evaluations: guide calls that built the path.
    """

    layers: dict[str, QuantizedLayer]
    levels_before: dict[str, int]
    levels_after: dict[str, int]
    fidelity_before: float
    fidelity_after: float
    baseline: float
    tolerance: float
    steps: tuple[MergeStep, ...]
    evaluations: int
    path_length: int = 0
    guide_evaluations: int = 0

    @property
    def rounds(self) -> int:
        """Number of merges taken."""
        return len(self.steps)


@dataclass
class _Group:
    """Merge state of one group: its layers, codebook ``(k,)``, pooled counts ``(k,)`` and
    ``level_map`` ``(k0,)``: the current level of each level of the normalised start."""

    names: tuple[str, ...]
    codebook: torch.Tensor
    counts: torch.Tensor
    level_map: torch.Tensor

    def merged(self, j: int) -> tuple[_Group, float]:
        """This group after merging levels ``j`` and ``j + 1``, and the merged value."""
        n = self.counts
        nj, nk = int(n[j]), int(n[j + 1])
        cj, ck = float(self.codebook[j]), float(self.codebook[j + 1])
        value = (nj * cj + nk * ck) / (nj + nk) if nj + nk else (cj + ck) / 2
        merged = torch.tensor([value], dtype=torch.float32)
        # the float32 value lies in [c_j, c_{j+1}], so the codebook stays sorted
        cb = torch.cat([self.codebook[:j], merged, self.codebook[j + 2:]])
        counts = torch.cat([n[:j], n[j:j + 2].sum().reshape(1), n[j + 2:]])
        level_map = self.level_map - (self.level_map > j).to(torch.int64)
        return _Group(self.names, cb, counts, level_map), float(merged)

    def cheapest(self) -> tuple[int, float]:
        """The pair of least Ward cost (first on ties) and that cost; (-1, inf) with one level."""
        if self.codebook.numel() < 2:
            return -1, math.inf
        costs = _merge_costs(self)
        j = int(torch.argmin(costs))  # argmin returns the first minimum
        return j, float(costs[j])

    def layers(self, start: dict[str, QuantizedLayer]) -> dict[str, QuantizedLayer]:
        """The group's layers in this state, from their normalised start."""
        return {n: replace(start[n], indices=self.level_map[start[n].indices],
                           codebook=self.codebook) for n in self.names}


def infer_groups(layers: dict[str, QuantizedLayer]) -> list[tuple[str, ...]]:
    """Group layers that share a codebook: equal codebooks (same length and values).

    Returns groups in order of first appearance; a layer alone is a group of one.
    """
    groups: list[list[str]] = []
    for name, layer in layers.items():
        for g in groups:
            cb = layers[g[0]].codebook
            if cb.shape == layer.codebook.shape and torch.equal(cb, layer.codebook):
                g.append(name)
                break
        else:
            groups.append([name])
    return [tuple(g) for g in groups]


def _check_groups(
    layers: dict[str, QuantizedLayer], groups: Sequence[Sequence[str]] | None
) -> list[tuple[str, ...]]:
    if groups is None:
        return infer_groups(layers)
    seen: set[str] = set()
    out: list[tuple[str, ...]] = []
    for g in groups:
        g = tuple(g)
        if not g:
            raise ConfigError("groups", "a group must name at least one layer")
        for n in g:
            if n not in layers:
                raise ConfigError("groups", f"unknown layer {n!r}")
            if n in seen:
                raise ConfigError("groups", f"layer {n!r} is in more than one group")
            seen.add(n)
        first = layers[g[0]].codebook
        for n in g[1:]:
            if not torch.equal(first, layers[n].codebook):
                raise ConfigError("groups", f"layers {g[0]!r} and {n!r} do not share a codebook")
        out.append(g)
    out.extend((n,) for n in layers if n not in seen)
    return out


def _normalise(
    layers: dict[str, QuantizedLayer], group: tuple[str, ...]
) -> tuple[_Group, dict[str, QuantizedLayer]]:
    """Drop unused levels, join equal ones, sort; ``dequantize()`` is unchanged bit for bit."""
    codebook = layers[group[0]].codebook
    k = codebook.numel()
    counts = torch.zeros(k, dtype=torch.int64)
    for n in group:
        idx = layers[n].indices
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= k):
            raise ValueError(f"{n}: level indices outside 0..{k - 1}")
        counts += torch.bincount(idx, minlength=k)
    used = torch.nonzero(counts > 0).flatten()
    if used.numel() == 0:  # no survivor in the whole group: keep one level for the codec
        new_cb = codebook[:1].clone()
        return _Group(group, new_cb, torch.zeros(1, dtype=torch.int64),
                      torch.zeros(1, dtype=torch.int64)), {
            n: replace(layers[n], codebook=new_cb) for n in group
        }
    values, inverse = torch.unique(codebook[used], sorted=True, return_inverse=True)
    if values.numel() == k and torch.equal(values, codebook):  # already normal: keep as is
        return _Group(group, codebook, counts, torch.arange(k)), {n: layers[n] for n in group}
    new_of_old = torch.full((k,), -1, dtype=torch.int64)
    new_of_old[used] = inverse
    new_counts = torch.zeros(values.numel(), dtype=torch.int64).index_add_(0, inverse, counts[used])
    new_cb = values.to(torch.float32)
    out = {
        n: replace(layers[n], indices=new_of_old[layers[n].indices], codebook=new_cb) for n in group
    }
    return _Group(group, new_cb, new_counts, torch.arange(values.numel())), out


def _merge_costs(g: _Group) -> torch.Tensor:
    """Ward's cost of merging each neighbouring pair ``(j, j+1)``: float64 ``(k-1,)``."""
    n = g.counts.to(torch.float64)
    c = g.codebook.to(torch.float64)
    pair_n = n[:-1] + n[1:]
    harmonic = torch.where(pair_n > 0, n[:-1] * n[1:] / pair_n.clamp(min=1), 0.0)
    return harmonic * (c[1:] - c[:-1]).square()


def _call(fn: Fidelity, layers: dict[str, QuantizedLayer], what: str = "fidelity") -> float:
    f = float(fn(layers))
    if math.isnan(f):
        raise ValueError(f"{what} returned nan; it must return a number (lower is better)")
    return f


# --- phase 1: the path ---------------------------------------------------------------------
@dataclass
class MergePath:
    """Merges from ``start`` (the input layers, each group normalised), in order.

    ``layers_at(i)`` gives the layers after the first ``i`` merges (``0 <= i <= len(path)``);
    every point has one level fewer in total than the one before.
    """

    source: dict[str, QuantizedLayer]
    start: dict[str, QuantizedLayer]
    groups: list[_Group]
    steps: list[tuple[int, int]]  # (group index, level) of each merge
    records: list[MergeStep]
    guide_evaluations: int = 0

    def __len__(self) -> int:
        return len(self.steps)

    def layers_at(self, i: int) -> dict[str, QuantizedLayer]:
        """The layers after ``i`` merges (0: the normalised input)."""
        if not 0 <= i <= len(self.steps):
            raise IndexError(f"path point {i} outside 0..{len(self.steps)}")
        if i == 0:
            return dict(self.start)
        state = list(self.groups)
        touched: set[int] = set()
        for gi, j in self.steps[:i]:
            state[gi] = state[gi].merged(j)[0]
            touched.add(gi)
        out = dict(self.start)
        for gi in touched:
            out.update(state[gi].layers(self.start))
        return {n: out[n] for n in self.start}

    def measure(self, fidelity: Fidelity, *, progress: bool = False) -> MeasuredPath:
        """This path with a fidelity to measure its points (cached, see :class:`MeasuredPath`)."""
        return MeasuredPath(self, fidelity, progress=progress)


def merge_path(
    layers: dict[str, QuantizedLayer],
    *,
    guide: Fidelity | None = None,
    groups: Sequence[Sequence[str]] | None = None,
    max_rounds: int | None = None,
    progress: bool = False,
) -> MergePath:
    """The merge path of ``layers`` (see the module docstring): until every group has one
    level, or ``max_rounds`` merges.

    guide: layers -> a cheap loss-like number (lower is better) that chooses which group
        merges next; None: the least Ward cost over all groups.
    groups: layers that share one codebook and are merged together; ``None`` infers them
        (layers with equal codebooks, as ``apply_plan`` gives the ``shared`` quantizer).
    """
    if max_rounds is not None and (isinstance(max_rounds, bool) or max_rounds < 0):
        raise ConfigError(
            "max_rounds", f"must be a non-negative integer or None, got {max_rounds!r}"
        )
    group_names = _check_groups(layers, groups)
    state: list[_Group] = []
    current = dict(layers)
    for names in group_names:
        grp, updated = _normalise(current, names)
        state.append(grp)
        current.update(updated)
    start = {n: current[n] for n in layers}
    total = sum(g.codebook.numel() - 1 for g in state)
    if max_rounds is not None:
        total = min(total, max_rounds)
    path = MergePath(layers, start, list(state), [], [])
    bar = tqdm(total=total, desc="merge path", disable=not progress, leave=False)
    if guide is None:
        _ward_path(path, state, total, bar)
    else:
        _guided_path(path, state, total, guide, bar)
    bar.close()
    return path


def _ward_path(path: MergePath, state: list[_Group], total: int, bar: tqdm) -> None:
    while len(path.steps) < total:
        best = min(((g.cheapest(), gi) for gi, g in enumerate(state)),
                   key=lambda t: (t[0][1], t[1]))
        (j, _), gi = best
        state[gi], value = state[gi].merged(j)
        path.steps.append((gi, j))
        path.records.append(MergeStep(state[gi].names, j, value, math.nan))
        bar.update(1)


def _guided_path(path: MergePath, state: list[_Group], total: int, guide: Fidelity,
                 bar: tqdm) -> None:
    current = dict(path.start)
    f_now = _call(guide, current, "guide")
    n_calls = 1
    version = 0  # bumped at every merge: a rise measured at an older state is stale
    rises: dict[int, tuple[float, int, float]] = {}  # group -> (rise, version, guide value)

    def measure(gi: int) -> None:
        nonlocal n_calls
        j, _ = state[gi].cheapest()
        grp, _ = state[gi].merged(j)
        cand = dict(current)
        cand.update(grp.layers(path.start))
        f = _call(guide, cand, "guide")
        n_calls += 1
        rises[gi] = (f - f_now, version, f)

    while len(path.steps) < total:
        for gi, g in enumerate(state):
            if gi not in rises and g.codebook.numel() >= 2:
                measure(gi)
        gi = min(rises, key=lambda k: (rises[k][0], state[k].cheapest()[1], k))
        if rises[gi][1] != version:  # stale: measure again at the current state, choose again
            measure(gi)
            continue
        j, _ = state[gi].cheapest()
        state[gi], value = state[gi].merged(j)
        current.update(state[gi].layers(path.start))
        f_now = rises.pop(gi)[2]
        version += 1
        path.steps.append((gi, j))
        path.records.append(MergeStep(state[gi].names, j, value, f_now))
        bar.update(1)
    path.guide_evaluations = n_calls


# --- phase 2: the furthest point within a tolerance ----------------------------------------
@dataclass
class MeasuredPath:
    """A merge path and a fidelity; the fidelity of each point is measured once, when asked.

    ``within(tolerance)`` for any number of tolerances: a larger one never ends at an earlier
    point of the path.
    """

    path: MergePath
    fidelity: Fidelity
    progress: bool = False
    values: dict[int, float] = field(default_factory=dict)
    evaluations: int = 0
    fidelity_source: float | None = None

    @property
    def step(self) -> int:
        """Spacing of the measured grid: about sqrt(path length), so a tolerance costs about
        2 sqrt(length) measurements."""
        return max(1, math.ceil(math.sqrt(len(self.path))))

    def at(self, i: int) -> float:
        """The fidelity after ``i`` merges (measured once)."""
        if i not in self.values:
            if i == 0 and self.fidelity_source is not None and all(
                    self.path.start[n] is self.path.source[n] for n in self.path.start):
                self.values[0] = self.fidelity_source  # the normalised start is the input
            else:
                self.values[i] = _call(self.fidelity, self.path.layers_at(i))
                self.evaluations += 1
        return self.values[i]

    def _measure_all(self, points: Sequence[int]) -> None:
        todo = [i for i in points if i not in self.values]
        bar = tqdm(todo, desc="merge check", disable=not self.progress or not todo, leave=False)
        for i in bar:
            self.at(i)
        bar.close()

    def before(self) -> float:
        """The fidelity of the input layers (as given, before normalising)."""
        if self.fidelity_source is None:
            self.fidelity_source = _call(self.fidelity, dict(self.path.source))
            self.evaluations += 1
        return self.fidelity_source

    def within(self, tolerance: float, *, baseline: float | None = None) -> MergeResult:
        """The furthest point of the path whose fidelity is within ``baseline + tolerance``
        (``baseline`` None: the fidelity of the input layers), found on the grid and then
        between the furthest grid point within and the next one.

        Raises ``ConfigError`` when the input layers already exceed ``baseline + tolerance``.
        """
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not (
                math.isfinite(tolerance) and tolerance >= 0):
            raise ConfigError("tolerance", f"must be a finite number >= 0, got {tolerance!r}")
        if baseline is not None and not math.isfinite(baseline):
            raise ConfigError("baseline", f"must be a finite number or None, got {baseline!r}")
        f_before = self.before()
        base = f_before if baseline is None else float(baseline)
        limit = base + tolerance
        if f_before > limit:
            raise ConfigError(
                "tolerance",
                f"the unmerged layers already score {f_before!r} > baseline + tolerance "
                f"= {limit!r}; nothing can be merged",
            )
        m = len(self.path)
        grid = list(range(0, m + 1, self.step))
        if grid[-1] != m:
            grid.append(m)
        self._measure_all(grid)
        ok = [i for i in grid if self.values[i] <= limit]
        steps: tuple[MergeStep, ...] = ()
        if not ok:
            # even the normalised start (which changes no weight) looks beyond the limit:
            # a fidelity that is not a function of the weights alone; merge nothing
            layers, f_after = dict(self.path.source), f_before
        else:
            a = max(ok)
            nxt = [i for i in grid if i > a]
            if nxt:
                self._measure_all(range(a + 1, nxt[0]))
                a = max([a] + [i for i in range(a + 1, nxt[0]) if self.values[i] <= limit])
            layers, f_after = self.path.layers_at(a), self.values[a]
            steps = tuple(self.path.records[:a])
        return MergeResult(
            layers=layers,
            levels_before={n: q.n_levels for n, q in self.path.source.items()},
            levels_after={n: q.n_levels for n, q in layers.items()},
            fidelity_before=f_before,
            fidelity_after=f_after,
            baseline=base,
            tolerance=float(tolerance),
            steps=steps,
            evaluations=self.evaluations,
            path_length=m,
            guide_evaluations=self.path.guide_evaluations,
        )


def merge_bins(
    layers: dict[str, QuantizedLayer],
    fidelity: Fidelity,
    *,
    tolerance: float,
    baseline: float | None = None,
    guide: Fidelity | None = None,
    max_rounds: int | None = None,
    groups: Sequence[Sequence[str]] | None = None,
    progress: bool = False,
) -> MergeResult:
    """Merge neighbouring levels as far along the merge path as fidelity stays within
    ``baseline + tolerance`` (:func:`merge_path`, then :meth:`MeasuredPath.within`).

    layers: name -> compressed tensor (e.g. from ``apply_plan``).
    fidelity: layers -> loss-like number, lower is better (a divergence, a metric's drop),
        called with the full dict; about ``2 sqrt(path length)`` calls.
    tolerance: how much the loss may exceed ``baseline`` (>= 0, units of fidelity).
    baseline: the reference loss; ``None`` means the fidelity of the input layers.
    guide: a cheap loss that orders the merges across groups (see :func:`merge_path`).
    max_rounds: at most this many merges (``None``: the whole path).
    groups: layers that share one codebook; ``None`` infers them.
    Returns a ``MergeResult``; ``fidelity(result.layers) <= baseline + tolerance`` always.
    Raises ``ConfigError`` when the input layers already exceed ``baseline + tolerance``.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not (
            math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError("tolerance", f"must be a finite number >= 0, got {tolerance!r}")
    measured = merge_path(layers, guide=guide, groups=groups, max_rounds=max_rounds,
                          progress=progress).measure(fidelity, progress=progress)
    return measured.within(tolerance, baseline=baseline)
