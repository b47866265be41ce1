"""Pick: rules that choose solutions from a front, and their check on held-out data.

The stage *Pick* of DESIGN.md. The rules are pure functions on a front (objective matrix
``F: (n, n_obj)``, every objective minimised, or the front's metric frame):

- :func:`by_constraints` keeps the solutions within bounds on the metric's drop, divergence and
  compression ratio, best ratio first;
- :func:`knee` finds the knee points (pymoo's ``HighTradeoffPoints``);
- :func:`by_weights` picks one solution for a preference vector (pymoo's ``ASF``
  decomposition or ``PseudoWeights``).

:func:`choose` applies a set of rules to a front frame; :func:`pick` does so for a run
folder. Its bounds on the metric's drop and the divergence are checked on the **validation**
split (the search measured on calibration samples, which for the built-in data sets are
training images the teacher scores almost perfectly on): each front solution is measured there
once and cached in ``RUN/validation.csv`` (:func:`validation_measures`). The chosen solutions
are then re-evaluated on the calibration, validation and test splits (test is reported, never
chosen on) and appended to ``picks.csv`` with a pick number.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from moecomp.errors import ConfigError, MoecompError, RunError
from moecomp.plan import CompressionPlan
from moecomp.runs import METRICS, atomic_write_csv, read_table
from moecomp.solution import RunContext
from moecomp.target import Target

METHODS = ("asf", "pseudo")
HOLDOUT_COLUMNS = ("val_divergence", "val_metric", "val_drop", "test_divergence",
                   "test_metric", "test_drop")
# A rebuilt student whose calibration divergence differs from what the search recorded by
# more than this share (plus a floor for tiny divergences) was not rebuilt the way the search
# built it: other ranks, teacher or data. Batched and one-by-one forwards differ in rounding.
CALIBRATION_RTOL = 0.02
CALIBRATION_ATOL = 1e-4


_SHOWN = {"metric_drop": "drop", "val_drop": "val drop", "val_divergence": "val divergence"}
"""How a bound's column reads in a rule ("best ratio within val drop <= 1")."""

BOUND_SPLITS = ("validation", "calibration")
"""Where bounds on the drop and the divergence are checked: the validation columns
(``val_drop``, ``val_divergence``) or the search's calibration columns."""

VALIDATION_FILE = "validation.csv"
"""The run folder's cache of front solutions measured on the validation split."""

VALIDATION_COLUMNS = ("val_divergence", "val_metric", "val_drop")


class NoFeasibleSolution(MoecompError):
    """A pick rule has no solution on the front that satisfies it."""


# --- objectives ---------------------------------------------------------------------------
ObjectiveFn = Callable[[pd.DataFrame], np.ndarray]


def default_objectives(df: pd.DataFrame) -> np.ndarray:
    """``F (n, 3)``: density, bits, divergence of a metric frame (the ``3obj`` objectives).
    A run's own objectives: ``moecomp.search.objectives.objective_space(problem).matrix``."""
    return df[["density", "bits", "divergence"]].to_numpy(float)


def normalise(
    F: np.ndarray, *, ideal: np.ndarray | None = None, nadir: np.ndarray | None = None
) -> np.ndarray:
    """``(F - ideal) / (nadir - ideal)``, by default with the ideal and nadir of ``F`` itself,
    so every objective of a front spans [0, 1]. F: (n, n_obj). An objective with no spread
    maps to 0 (it cannot tell solutions apart)."""
    F = _check_F(F)
    lo = F.min(axis=0) if ideal is None else np.asarray(ideal, dtype=float)
    hi = F.max(axis=0) if nadir is None else np.asarray(nadir, dtype=float)
    span = hi - lo
    return (F - lo) / np.where(span > 0, span, 1.0)


def _check_F(F: np.ndarray) -> np.ndarray:
    F = np.asarray(F, dtype=float)
    if F.ndim != 2 or F.shape[0] == 0 or F.shape[1] < 2:
        raise ValueError(f"F: expected an (n >= 1, n_obj >= 2) array, got shape {F.shape}")
    if not np.isfinite(F).all():
        raise ValueError("F: objectives must be finite")
    return F


# --- rules ----------------------------------------------------------------------------------
def by_constraints(
    df: pd.DataFrame,
    *,
    max_drop: float | None = None,
    max_divergence: float | None = None,
    min_ratio: float | None = None,
    split: str = "calibration",
) -> pd.DataFrame:
    """The rows of a metric frame with ``metric_drop <= max_drop``, ``divergence <=
    max_divergence`` and ``ratio >= min_ratio`` (a bound of None is off), best compression
    ratio first (ties: smaller divergence).

    split: "calibration" reads the drop and divergence from ``metric_drop`` and
        ``divergence``, "validation" from ``val_drop`` and ``val_divergence``.
    Raises :class:`NoFeasibleSolution` when no row meets them all; the message names the
    bound that fails and the best value available.
    """
    bounds = _bounds(max_drop, max_divergence, min_ratio, split)
    keep = np.ones(len(df), dtype=bool)
    for col, op, value, _ in bounds:
        vals = df[col].to_numpy(float)
        keep &= vals <= value if op == "<=" else vals >= value
    if not keep.any():
        raise NoFeasibleSolution(_infeasible_message(df, bounds))
    out = df[keep].sort_values(["ratio", "divergence"], ascending=[False, True], kind="stable")
    return out


def _bounds(
    max_drop: float | None, max_divergence: float | None, min_ratio: float | None,
    split: str = "calibration",
) -> list[tuple[str, str, float, str]]:
    """(column, operator, value, option name) of the bounds that are on."""
    if split not in BOUND_SPLITS:
        raise ConfigError("split", f"must be one of {', '.join(BOUND_SPLITS)}, got {split!r}")
    val = split == "validation"
    out = []
    for col, op, value, name in (
        ("val_drop" if val else "metric_drop", "<=", max_drop, "max_drop"),
        ("val_divergence" if val else "divergence", "<=", max_divergence, "max_divergence"),
        ("ratio", ">=", min_ratio, "min_ratio"),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            raise ConfigError(name, f"must be a finite number, got {value!r}")
        out.append((col, op, float(value), name))
    return out


def _infeasible_message(df: pd.DataFrame, bounds: list[tuple[str, str, float, str]]) -> str:
    if df.empty:
        return "the front is empty"
    for col, op, value, name in bounds:
        vals = df[col].to_numpy(float)
        best = vals.min() if op == "<=" else vals.max()
        alone = vals <= value if op == "<=" else vals >= value
        if not alone.any():
            at = int(np.argmin(vals) if op == "<=" else np.argmax(vals))
            return (
                f"{name}: no solution of the front has {col} {op} {value:g}; the best "
                f"available is {col} = {best:.4g} (solution {int(df['id'].iloc[at])})"
            )
    # Each bound alone is met by some solution, but not all together.
    parts = []
    for col, op, value, name in bounds:
        others = np.ones(len(df), dtype=bool)
        for c2, op2, v2, n2 in bounds:
            if n2 != name:
                v = df[c2].to_numpy(float)
                others &= v <= v2 if op2 == "<=" else v >= v2
        if others.any():
            vals = df[col].to_numpy(float)[others]
            best = vals.min() if op == "<=" else vals.max()
            parts.append(
                f"with the other bounds, the best {col} is {best:.4g} ({name} asks {op} {value:g})"
            )
    text = "; ".join(parts)
    names = ", ".join(b[3] for b in bounds)
    return f"{names}: no solution of the front meets all of them together; {text}"


def knee(F: np.ndarray) -> np.ndarray:
    """Indices (into the rows of F) of the knee points of a front: the solutions whose
    trade-off with their neighbours stands out (pymoo's ``HighTradeoffPoints``), computed on
    F's non-dominated rows normalised to [0, 1] per objective so units do not matter.
    F: (n, n_obj), minimised.

    Returns an int array ordered by normalised distance to the ideal point (closest first:
    of several knees, the most balanced one leads), empty when no point stands out (a front
    of fewer than three distinct points has no knee).
    """
    from pymoo.mcdm.high_tradeoff import HighTradeoffPoints
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    F = _check_F(F)
    # pymoo divides by zero for duplicate points, and a dominated point has an infinite
    # trade-off; so work on the distinct non-dominated points (a knee is a front's anyway).
    uniq, first = np.unique(F, axis=0, return_index=True)
    nd = np.sort(np.asarray(NonDominatedSorting().do(uniq, only_non_dominated_front=True)))
    uniq, first = uniq[nd], first[nd]
    if len(uniq) < 3:
        return np.zeros(0, dtype=int)
    Fn = normalise(uniq)
    # pymoo calls warnings.filterwarnings("ignore") inside; keep that from leaking out.
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        found = HighTradeoffPoints().do(Fn)
    if found is None:
        return np.zeros(0, dtype=int)
    found = np.asarray(found, dtype=int)
    dist = np.linalg.norm(Fn[found], axis=1)
    return first[found[np.lexsort((first[found], dist))]]


def by_weights(
    F: np.ndarray, weights: Sequence[float], *, method: Literal["asf", "pseudo"] | str = "asf"
) -> int:
    """Index of the solution that best matches a preference vector.

    F: (n, n_obj), minimised; normalised by the ideal and nadir point of F (the front).
    weights: (n_obj,) non-negative importance of each objective (larger = more important;
        only the proportions matter). ``(1, 0)`` picks the minimum of objective 1.
    method: ``asf``: the minimiser of the achievement scalarising function
        ``max_i w_i * f_i`` (pymoo's ``ASF`` with direction ``1 / w``), ties broken by the
        weighted sum; ``pseudo``: the solution whose pseudo-weights (its relative distance
        from the nadir per objective) are closest to ``weights`` (pymoo's ``PseudoWeights``).
    """
    F = _check_F(F)
    w = np.asarray(weights, dtype=float)
    if w.shape != (F.shape[1],):
        raise ConfigError(
            "weights",
            f"needs {F.shape[1]} numbers (one per objective), got "
            f"{len(w) if w.ndim == 1 else w.shape}",
        )
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError("weights", f"must be non-negative with a positive sum, got {w.tolist()}")
    w = w / w.sum()
    Fn = normalise(F)
    if method == "asf":
        from pymoo.decomposition.asf import ASF

        # pymoo's ASF divides by its weights (a direction): importance w means 1 / w; a zero
        # importance is an infinite divisor, so that objective is ignored.
        with np.errstate(divide="ignore"):
            direction = np.where(w > 0, 1.0 / np.where(w > 0, w, 1.0), np.inf)
        asf = np.asarray(ASF().do(Fn, weights=direction), dtype=float).reshape(-1)
        tie = Fn @ w
        return int(np.lexsort((tie, asf))[0])
    if method == "pseudo":
        from pymoo.mcdm.pseudo_weights import PseudoWeights

        # An objective without spread gives every solution the same pseudo-weight; drop it.
        spread = F.max(axis=0) > F.min(axis=0)
        if not spread.any():
            return 0
        ws = w[spread]
        if ws.sum() <= 0:
            return 0
        m = int(spread.sum())
        dm = PseudoWeights(ws / ws.sum(), ideal=np.zeros(m), nadir=np.ones(m))
        return int(dm.do(Fn[:, spread]))
    raise ConfigError("method", f"must be one of {', '.join(METHODS)}; got {method!r}")


# --- several rules on a front ---------------------------------------------------------------
def choose(
    front: pd.DataFrame,
    *,
    objectives: ObjectiveFn | None = None,
    max_drop: float | None = None,
    max_divergence: float | None = None,
    min_ratio: float | None = None,
    knee_point: bool = False,
    weights: Sequence[float] | None = None,
    method: str = "asf",
    max_knees: int = 3,
    split: str = "calibration",
) -> pd.DataFrame:
    """Apply pick rules to a front's metric frame; one row per (rule, chosen solution), with a
    ``rule`` column after ``id``.

    Bounds (max_drop, max_divergence, min_ratio) restrict the front first; on their own they
    pick the feasible solution of best ratio. ``knee_point`` adds the knee points (at most
    ``max_knees``, closest to the ideal first: a noisy 3-D front can have many) and
    ``weights`` the best match of that preference (``method`` asf or pseudo), both among the
    feasible solutions. With no rule at all: the knee points (if the front has any) and equal
    weights with ASF.

    objectives: metric frame -> ``F (n, n_obj)``, the minimised objectives that knee and
    weights work on (default: density, bits, divergence).
    split: where the drop and divergence bounds are read (see :func:`by_constraints`).
    """
    bounds = _bounds(max_drop, max_divergence, min_ratio, split)
    if max_knees < 1:
        raise ConfigError("max_knees", f"must be >= 1, got {max_knees}")
    if method not in METHODS:
        raise ConfigError("method", f"must be one of {', '.join(METHODS)}; got {method!r}")
    default = not bounds and not knee_point and weights is None
    pool = by_constraints(
        front, max_drop=max_drop, max_divergence=max_divergence, min_ratio=min_ratio,
        split=split,
    )
    within = " within " + ", ".join(f"{_SHOWN.get(c, c)} {op} {v:g}" for c, op, v, _ in bounds) \
        if bounds else ""
    rows: list[pd.DataFrame] = []

    def add(sel: pd.DataFrame, rule: str) -> None:
        rows.append(sel.assign(rule=rule))

    if bounds:
        add(pool.iloc[[0]], "best ratio" + within)
    F = (objectives or default_objectives)(pool)
    if knee_point or default:
        idx = knee(F)
        if len(idx) == 0 and not default:
            raise NoFeasibleSolution(
                f"knee: no point of the front{within} stands out (pymoo's HighTradeoffPoints "
                f"found no outlier among {len(pool)} solutions); use weights instead"
            )
        if len(idx):
            add(pool.iloc[idx[:max_knees]], "knee" + within)
    if weights is not None or default:
        w = [1.0] * F.shape[1] if weights is None else list(weights)
        i = by_weights(F, w, method=method)
        add(pool.iloc[[i]], f"weights {','.join(f'{x:g}' for x in w)} ({method}){within}")
    out = pd.concat(rows, ignore_index=True)
    first = ["id", "rule"]
    return out[first + [c for c in out.columns if c not in first]]


# --- held-out re-evaluation -----------------------------------------------------------------
def holdout_fidelity(
    target: Target, ranks: dict[str, torch.Tensor], plans: Sequence[CompressionPlan]
) -> pd.DataFrame:
    """The students of ``plans`` measured on the target's calibration samples and its full
    validation and test splits (``Target.fidelity``).

    target: a ``moecomp.target.Target``; ranks: its ranks (``compute_ranks``).
    Returns one row per plan: ``calib_divergence`` and ``calib_metric`` (to check the rebuild
    against the search), then per held-out split ``val_divergence``, ``val_metric``,
    ``val_drop`` (in the metric's units, positive = worse), likewise ``test_*``, and the
    teacher's ``teacher_val_metric``, ``teacher_test_metric``. Metric columns are NaN
    without a metric; a split the target lacks gives no columns.
    """
    from moecomp.apply import apply_plan, student_state_dict
    from moecomp.target import load_state

    splits = [("calib", "calibration")] + [
        (short, name) for short, name in (("val", "validation"), ("test", "test"))
        if target.split(name) is not None]
    weights = target.weights()
    teacher_state = target.student_base()
    student = copy.deepcopy(target.teacher)
    rows = []
    for plan in plans:
        layers = apply_plan(plan, weights, ranks)
        load_state(student, student_state_dict(teacher_state, layers))
        row: dict[str, float] = {}
        for short, name in splits:
            f = target.fidelity(student, name)
            row[f"{short}_divergence"] = f.divergence
            row[f"{short}_metric"] = f.metric
            if short != "calib":
                row[f"{short}_drop"] = f.metric_drop
        for short, name in splits[1:]:
            row[f"teacher_{short}_metric"] = target.teacher_metric(name)
        rows.append(row)
    return pd.DataFrame(rows)


def validation_measures(
    ctx: RunContext, ids: Sequence[int], *, progress: bool = False, chunk: int = 16
) -> pd.DataFrame:
    """Solutions ``ids`` of a run measured on the full validation split: one row per id (in
    the given order) with ``id``, ``val_divergence``, ``val_metric``, ``val_drop`` (NaN
    without a metric).

    Cached in ``RUN/validation.csv``: a solution measured before is read from there, the
    others are measured now (``chunk`` at a time, each chunk added to the file as it
    finishes). Each row keeps a fingerprint of the student it measured (``student``); the
    cache is measured again when written for another validation split size, or when the
    first cached solution no longer builds the same student (moecomp's quantizers changed
    since, or the ranks): its values would describe other models.
    """
    target = ctx.target
    if target.val is None:
        raise RunError(f"{ctx.run.path}: this target has no validation split")
    path = ctx.run.file(VALIDATION_FILE)
    n_val = len(target.val)
    cache = read_table(path) if path.is_file() else pd.DataFrame()
    if not cache.empty and ("val_samples" not in cache.columns
                            or not (cache["val_samples"] == n_val).all()):
        cache = pd.DataFrame()  # measured on another validation split
    weights, base = target.weights(), target.student_base()
    if not cache.empty and ("student" not in cache.columns or
                            _student(ctx, int(cache["id"].iloc[0]), weights, base)[1]
                            != str(cache["student"].iloc[0])):
        cache = pd.DataFrame()  # measured on other students
    have = set(cache["id"].astype(int)) if not cache.empty else set()
    todo = [int(i) for i in dict.fromkeys(int(i) for i in ids) if int(i) not in have]
    if todo:
        from tqdm.auto import tqdm

        from moecomp.target import load_state

        student = copy.deepcopy(target.teacher)
        rows: list[dict[str, Any]] = []
        bar = tqdm(todo, desc="validation", disable=not progress, leave=False)
        for k, sid in enumerate(bar):
            state, print_ = _student(ctx, sid, weights, base)
            load_state(student, state)
            f = target.fidelity(student, "validation")
            rows.append({"id": sid, "val_divergence": f.divergence, "val_metric": f.metric,
                         "val_drop": f.metric_drop, "val_samples": n_val, "student": print_})
            if len(rows) == chunk or k == len(todo) - 1:
                cache = pd.concat([cache, pd.DataFrame(rows)], ignore_index=True)
                atomic_write_csv(path, cache)
                rows = []
        bar.close()
    by_id = cache.drop_duplicates("id", keep="last")
    by_id.index = pd.Index(by_id["id"].astype(int).to_numpy())
    out = by_id.loc[[int(i) for i in ids], ["id", *VALIDATION_COLUMNS]]
    return out.reset_index(drop=True).astype({"id": int})


def _student(ctx: RunContext, sid: int, weights: dict[str, torch.Tensor],
             base: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Solution ``sid``'s student state dict (built from the teacher's ``weights`` and
    ``base``, as ``Target.weights`` / ``student_base`` give them) and its fingerprint: ``s``
    and the first 16 hex digits of :func:`moecomp.solution.state_fingerprint` (the letter
    keeps a CSV reader from taking it for a number)."""
    from moecomp.apply import apply_plan, student_state_dict
    from moecomp.solution import state_fingerprint

    state = student_state_dict(base, apply_plan(ctx.run.plan(sid), weights, ctx.ranks))
    return state, "s" + state_fingerprint(state)[:16]


def with_validation(ctx: RunContext, front: pd.DataFrame, *, first_feasible: bool = False,
                    max_drop: float | None = None, max_divergence: float | None = None,
                    min_ratio: float | None = None, progress: bool = False) -> pd.DataFrame:
    """The front with its validation columns (:func:`validation_measures`), restricted to
    ``ratio >= min_ratio``. first_feasible: measure in order of ratio, best first, only until
    a solution within ``max_drop`` / ``max_divergence`` is found (all a "best ratio within"
    rule needs); the rows measured are returned."""
    pool = front if min_ratio is None else front[front["ratio"].to_numpy(float) >= min_ratio]
    if pool.empty:
        return pool.assign(**{c: pd.Series(dtype=float) for c in VALIDATION_COLUMNS})
    pool = pool.sort_values(["ratio", "divergence"], ascending=[False, True], kind="stable")
    ids = pool["id"].astype(int).tolist()
    if not first_feasible:
        vals = validation_measures(ctx, ids, progress=progress)
    else:
        parts, step = [], 8
        for lo in range(0, len(ids), step):
            part = validation_measures(ctx, ids[lo:lo + step], progress=progress)
            parts.append(part)
            ok = np.ones(len(part), dtype=bool)
            if max_drop is not None:
                ok &= part["val_drop"].to_numpy(float) <= max_drop
            if max_divergence is not None:
                ok &= part["val_divergence"].to_numpy(float) <= max_divergence
            if ok.any():
                break
        vals = pd.concat(parts, ignore_index=True)
    pool = pool.iloc[: len(vals)].reset_index(drop=True)
    return pd.concat([pool, vals.drop(columns="id")], axis=1)


def pick(
    run_dir: RunContext | str | os.PathLike[str],
    *,
    max_drop: float | None = None,
    max_divergence: float | None = None,
    min_ratio: float | None = None,
    knee: bool = False,
    weights: Sequence[float] | None = None,
    method: str = "asf",
    max_knees: int = 3,
    reevaluate: bool = True,
    split: str = "validation",
    progress: bool = False,
) -> pd.DataFrame:
    """Choose solutions from a run's front (see :func:`choose` for the rules), re-evaluate
    them on the calibration, validation and test splits, and append them to
    ``RUN/picks.csv``.

    split: where ``max_drop`` and ``max_divergence`` are checked: "validation" (default; the
        front's solutions measured there once, cached in ``RUN/validation.csv``) or
        "calibration" (the search's own numbers). A target without a validation split is
        checked on calibration. Knee and weights work on the search's objectives.

    Columns: ``pick`` (1, 2, ... over the run's picks), ``id``, ``rule``, ``bounds_on`` (the
    split the bounds were checked on), ``gen``, the search's metrics (``metric`` and
    ``metric_drop`` are on the calibration samples), with ``reevaluate`` also ``val_*`` and
    ``test_*`` (drops from the teacher on the same split, in the metric's units) and the
    teacher's values, then the genes (``s:<tensor>``, ``b:<tensor>``).
    """
    if split not in BOUND_SPLITS:
        raise ConfigError("split", f"must be one of {', '.join(BOUND_SPLITS)}, got {split!r}")
    ctx = run_dir if isinstance(run_dir, RunContext) else RunContext(run_dir, progress=progress)
    run = ctx.run
    problem = ctx.problem
    front = run.front()
    if front.empty:
        raise RunError(f"{run.path}: front.csv has no solutions")
    from moecomp.search.objectives import objective_space

    space = objective_space(problem)
    if weights is not None and len(weights) != len(space.names):
        raise ConfigError(
            "weights",
            f"needs {len(space.names)} numbers, one per objective of this run "
            f"({', '.join(space.names)}); got {len(weights)}",
        )
    _bounds(max_drop, max_divergence, min_ratio)  # bad bounds fail before anything is measured
    measured_bounds = max_drop is not None or max_divergence is not None
    if split == "validation" and measured_bounds and ctx.target.val is None:
        split = "calibration"
    if split == "validation" and measured_bounds:
        only_bounds = not knee and weights is None
        front = with_validation(ctx, front, first_feasible=only_bounds, max_drop=max_drop,
                                max_divergence=max_divergence, min_ratio=min_ratio,
                                progress=progress)
    picks = choose(
        front,
        objectives=space.matrix,
        max_drop=max_drop,
        max_divergence=max_divergence,
        min_ratio=min_ratio,
        knee_point=knee,
        weights=weights,
        method=method,
        max_knees=max_knees,
        split=split if measured_bounds else "calibration",
    )
    picks = picks.drop(columns=[c for c in VALIDATION_COLUMNS if c in picks.columns])
    genes = [c for c in picks.columns if c.startswith(("s:", "b:"))]
    head = ["pick", "id", "rule", "bounds_on", "gen", *METRICS]
    if reevaluate:
        held = _reevaluate(ctx, picks)
        picks = pd.concat([picks.reset_index(drop=True), held], axis=1)
        head += [c for c in held.columns if not c.startswith("calib_")]
    path = run.file("picks.csv")
    old = read_table(path) if path.is_file() else pd.DataFrame()
    number = int(old["pick"].max()) + 1 if "pick" in old.columns and len(old) else (
        1 if old.empty else 2)  # a picks.csv from before pick numbers was pick 1
    if not old.empty and "pick" not in old.columns:
        old.insert(0, "pick", 1)
    picks = picks.assign(pick=number, bounds_on=split if measured_bounds else "")
    picks = picks[head + genes]
    atomic_write_csv(path, pd.concat([old, picks], ignore_index=True) if not old.empty
                     else picks)
    return picks


def _reevaluate(ctx: RunContext, picks: pd.DataFrame) -> pd.DataFrame:
    """``holdout_fidelity`` of the picks, after checking that each rebuilt student gives the
    calibration divergence the search recorded (else the run's target was not rebuilt)."""
    plans = [ctx.run.plan(int(i)) for i in picks["id"]]
    held = holdout_fidelity(ctx.target, ctx.ranks, plans)
    got = held["calib_divergence"].to_numpy(float)
    want = picks["divergence"].to_numpy(float)
    bad = ~np.isclose(got, want, rtol=CALIBRATION_RTOL, atol=CALIBRATION_ATOL)
    if bad.any():
        j = int(np.argmax(bad))
        raise RunError(
            f"{ctx.run.path}: solution {int(picks['id'].iloc[j])} rebuilt from its plan has "
            f"calibration divergence {got[j]:.6g}, but the search recorded {want[j]:.6g}: "
            f"the teacher, data or ranks differ from the search's"
        )
    return held
