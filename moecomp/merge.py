"""Iterative merging of neighbouring quantisation levels under a fidelity tolerance.

The *Refine* stage of DESIGN.md (seed 2, Khosrowshahli et al.): after a solution is picked,
neighbouring levels of a codebook are merged greedily, one pair per round, for as long as
the model's fidelity loss stays within ``baseline + tolerance``. Fewer levels means fewer
distinct indices and a smaller entropy-coded file.

A *group* is the unit whose codebook is merged: one layer on its own, or all layers that
share one codebook (the ``shared`` quantizer); merging a pair in a group changes every layer
of the group, and level counts are pooled over it.

Before the first round each group is normalised, which leaves every ``dequantize()`` bit for
bit unchanged: unused levels are dropped, levels with equal values are joined and the
codebook is sorted, so levels are contiguous ``0..k'-1`` in ascending order.

Heuristic (to keep the number of fidelity evaluations affordable): merging levels ``j`` and
``j+1`` with counts ``n_j, n_{j+1}`` and values ``c_j, c_{j+1}`` raises the squared weight
error by ``n_j n_{j+1} / (n_j + n_{j+1}) * (c_j - c_{j+1})**2`` (Ward's cost). Each round only
the ``candidates_per_round`` cheapest pairs of each group are evaluated; of those the one with
the smallest fidelity loss is kept (ties: smaller cost, then group order, then lower level)
if it is within ``baseline + tolerance``; otherwise merging stops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from moecomp.apply import QuantizedLayer
from moecomp.errors import ConfigError

Fidelity = Callable[[dict[str, QuantizedLayer]], float]


@dataclass(frozen=True)
class MergeStep:
    """One accepted merge: levels ``level`` and ``level + 1`` of ``group`` became one."""

    group: tuple[str, ...]
    level: int
    value: float
    fidelity: float


@dataclass(frozen=True)
class MergeResult:
    """What ``merge_bins`` did.

    layers: the merged layers (same names and order as the input).
    levels_before / levels_after: per layer, the codebook length before and after.
    fidelity_before: fidelity of the input layers; fidelity_after: of ``layers`` (both as
        returned by the fidelity callable; lower is better).
    baseline, tolerance: the bound ``fidelity_after <= baseline + tolerance`` that held.
    steps: the accepted merges in order; evaluations: number of fidelity calls.
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

    @property
    def rounds(self) -> int:
        """Number of accepted merges."""
        return len(self.steps)


@dataclass
class _Group:
    """Mutable merge state of one group: its layers, codebook ``(k,)`` and pooled counts."""

    names: tuple[str, ...]
    codebook: torch.Tensor
    counts: torch.Tensor


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
        return _Group(group, new_cb, torch.zeros(new_cb.numel(), dtype=torch.int64)), {
            n: replace(layers[n], codebook=new_cb) for n in group
        }
    values, inverse = torch.unique(codebook[used], sorted=True, return_inverse=True)
    if values.numel() == k and torch.equal(values, codebook):  # already normal: keep as is
        return _Group(group, codebook, counts), {n: layers[n] for n in group}
    new_of_old = torch.full((k,), -1, dtype=torch.int64)
    new_of_old[used] = inverse
    new_counts = torch.zeros(values.numel(), dtype=torch.int64).index_add_(0, inverse, counts[used])
    new_cb = values.to(torch.float32)
    out = {
        n: replace(layers[n], indices=new_of_old[layers[n].indices], codebook=new_cb) for n in group
    }
    return _Group(group, new_cb, new_counts), out


def _merge_costs(g: _Group) -> torch.Tensor:
    """Ward's cost of merging each neighbouring pair ``(j, j+1)``: float64 ``(k-1,)``."""
    n = g.counts.to(torch.float64)
    c = g.codebook.to(torch.float64)
    pair_n = n[:-1] + n[1:]
    harmonic = torch.where(pair_n > 0, n[:-1] * n[1:] / pair_n.clamp(min=1), 0.0)
    return harmonic * (c[1:] - c[:-1]).square()


def _merged(
    g: _Group, j: int, layers: dict[str, QuantizedLayer]
) -> tuple[_Group, dict[str, QuantizedLayer], float]:
    """Group state and layers after merging levels ``j`` and ``j+1``; and the merged value."""
    n = g.counts
    nj, nk = int(n[j]), int(n[j + 1])
    cj, ck = float(g.codebook[j]), float(g.codebook[j + 1])
    value = (nj * cj + nk * ck) / (nj + nk) if nj + nk else (cj + ck) / 2
    merged = torch.tensor([value], dtype=torch.float32)
    # the float32 value lies in [c_j, c_{j+1}], so the codebook stays sorted
    cb = torch.cat([g.codebook[:j], merged, g.codebook[j + 2 :]])
    counts = torch.cat([n[:j], n[j : j + 2].sum().reshape(1), n[j + 2 :]])
    out = dict(layers)
    for name in g.names:
        idx = layers[name].indices
        out[name] = replace(layers[name], indices=idx - (idx > j).to(torch.int64), codebook=cb)
    return _Group(g.names, cb, counts), out, float(merged)


def _call(fidelity: Fidelity, layers: dict[str, QuantizedLayer]) -> float:
    f = float(fidelity(layers))
    if math.isnan(f):
        raise ValueError("fidelity returned nan; it must return a number (lower is better)")
    return f


def merge_bins(
    layers: dict[str, QuantizedLayer],
    fidelity: Fidelity,
    *,
    tolerance: float,
    baseline: float | None = None,
    max_rounds: int | None = None,
    candidates_per_round: int = 3,
    groups: Sequence[Sequence[str]] | None = None,
) -> MergeResult:
    """Greedily merge neighbouring levels while fidelity stays within ``baseline + tolerance``.

    layers: name -> compressed tensor (e.g. from ``apply_plan``).
    fidelity: layers -> loss-like number, lower is better (a divergence, an accuracy drop);
        called with the full dict, one candidate merge applied.
    tolerance: how much the loss may exceed ``baseline`` (>= 0, units of fidelity).
    baseline: the reference loss; ``None`` means the fidelity of the input layers.
    max_rounds: at most this many merges (``None``: until no candidate qualifies).
    candidates_per_round: per group, how many of the cheapest pairs (Ward's cost, see the
        module docstring) are evaluated each round.
    groups: layers that share one codebook and are merged together; ``None`` infers them
        (layers with equal codebooks, as ``apply_plan`` gives the ``shared`` quantizer).
    Returns a ``MergeResult``; ``fidelity(result.layers) <= baseline + tolerance`` always.
    Raises ``ConfigError`` when the input layers already exceed ``baseline + tolerance``.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float):
        raise ConfigError("tolerance", f"must be a finite number >= 0, got {tolerance!r}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError("tolerance", f"must be a finite number >= 0, got {tolerance!r}")
    if baseline is not None and not math.isfinite(baseline):
        raise ConfigError("baseline", f"must be a finite number or None, got {baseline!r}")
    if max_rounds is not None and (isinstance(max_rounds, bool) or max_rounds < 0):
        raise ConfigError(
            "max_rounds", f"must be a non-negative integer or None, got {max_rounds!r}"
        )
    if isinstance(candidates_per_round, bool) or candidates_per_round < 1:
        raise ConfigError(
            "candidates_per_round", f"must be a positive integer, got {candidates_per_round!r}"
        )
    group_names = _check_groups(layers, groups)
    levels_before = {n: layer.n_levels for n, layer in layers.items()}

    fidelity_before = _call(fidelity, layers)
    evaluations = 1
    base = fidelity_before if baseline is None else float(baseline)
    limit = base + tolerance
    if fidelity_before > limit:
        raise ConfigError(
            "tolerance",
            f"the unmerged layers already score {fidelity_before!r} > baseline + tolerance "
            f"= {limit!r}; nothing can be merged",
        )

    state: list[_Group] = []
    current = dict(layers)
    for names in group_names:
        grp, updated = _normalise(current, names)
        state.append(grp)
        current.update(updated)
    current = {n: current[n] for n in layers}
    current_fid = fidelity_before
    if any(current[n] is not layers[n] for n in layers):
        # normalising changes no dequantised weight, but the bound is checked, not assumed
        current_fid = _call(fidelity, current)
        evaluations += 1
        if current_fid > limit:  # a fidelity that looks beyond the weights: merge nothing
            current, current_fid, state = dict(layers), fidelity_before, []

    steps: list[MergeStep] = []
    while max_rounds is None or len(steps) < max_rounds:
        best: tuple[tuple[float, float, int, int], _Group, dict[str, QuantizedLayer], float] | None
        best = None
        for gi, group in enumerate(state):
            if group.codebook.numel() < 2:
                continue
            costs = _merge_costs(group)
            order = torch.argsort(costs, stable=True)[:candidates_per_round].tolist()
            for j in order:
                grp, cand, value = _merged(group, j, current)
                f = _call(fidelity, cand)
                evaluations += 1
                key = (f, float(costs[j]), gi, j)
                if f <= limit and (best is None or key < best[0]):
                    best = (key, grp, cand, value)
        if best is None:
            break
        key, grp, cand, value = best
        state[key[2]] = grp
        current = cand
        current_fid = key[0]
        steps.append(MergeStep(grp.names, key[3], value, key[0]))

    return MergeResult(
        layers=current,
        levels_before=levels_before,
        levels_after={n: layer.n_levels for n, layer in current.items()},
        fidelity_before=fidelity_before,
        fidelity_after=current_fid,
        baseline=base,
        tolerance=float(tolerance),
        steps=tuple(steps),
        evaluations=evaluations,
    )
