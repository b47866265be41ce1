"""Compare (stage 11): a run's Pareto front against the Directed Evolution baseline.

The single-objective DE of seed 1 (:mod:`moecomp.baseline.directed_evolution`) is run at
several target sparsities with, in total, the same evaluation budget as the search (the
``n_evals`` of the run's ``search.json``, split equally over the targets). Each DE result is
evaluated by the same :class:`~moecomp.evaluate.Evaluator` metrics as the search and placed in
the run's objective space; then:

- **hypervolume** of the front and of the DE points, both with the run's convention
  (objectives divided by the problem's fixed ``objectives.ref_point``, reference all ones,
  pymoo's ``HV``), so the numbers compare with ``hv.csv``;
- **dominance**: how many DE points some front point dominates, and how many front points
  some DE point dominates (Pareto dominance on minimised objectives).

Files written into the run folder: ``compare_de.csv`` (one row per DE point: its target,
evaluations, metrics, feasibility, whether the front dominates it, and its per-layer genes),
``compare_summary.csv`` and ``compare_summary.md`` (the table), ``plots/compare_de.png``.

Only feasible points count (constraints of the problem: ``max_divergence``,
``max_metric_drop``): the search's front holds feasible points only, so infeasible DE
points are listed but take no part in hypervolume or dominance.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from pymoo.util.dominator import Dominator
from tqdm.auto import tqdm

from moecomp.atomic import save_figure
from moecomp.baseline.directed_evolution import (
    BITS_EVALS,
    DEConfig,
    DEResult,
    run_directed_evolution,
)
from moecomp.config import ProblemConfig
from moecomp.errors import ConfigError, RunError
from moecomp.evaluate import Evaluator
from moecomp.report import metric_headers
from moecomp.runs import (
    METRICS,
    MetricInfo,
    RunFolder,
    atomic_write_csv,
    atomic_write_text,
    bits_col,
    metric_info,
    sparsity_col,
)
from moecomp.search.front import feasible, hypervolume
from moecomp.search.objectives import ObjectiveSpace, objective_space
from moecomp.search.problem import constraint_values
from moecomp.target import Target, build_target

BASELINES = ("de",)
DEFAULT_TARGETS: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95)
DE_FILE = "compare_de.csv"
SUMMARY_FILE = "compare_summary.csv"
SUMMARY_MD = "compare_summary.md"
PLOT_FILE = "compare_de.png"
FRONT_LABEL = "search front"
DE_LABEL = "DE baseline"


# --- the objective space of a run ------------------------------------------------------------


# --- pure maths ------------------------------------------------------------------------------


def _as_F(F: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(F, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected an (n, n_obj) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: objectives must be finite")
    return arr


def dominated_by(F_a: np.ndarray, F_b: np.ndarray) -> np.ndarray:
    """bool ``(k,)``: which rows of ``F_b (k, m)`` some row of ``F_a (n, m)`` dominates.

    Pareto dominance on minimised objectives: ``a`` dominates ``b`` when it is nowhere worse
    and somewhere better (pymoo's ``Dominator``); equal points do not dominate each other.
    """
    F_a, F_b = _as_F(F_a, "F_a"), _as_F(F_b, "F_b")
    if len(F_a) and len(F_b) and F_a.shape[1] != F_b.shape[1]:
        raise ValueError(f"F_a has {F_a.shape[1]} objectives, F_b {F_b.shape[1]}")
    if len(F_a) == 0 or len(F_b) == 0:
        return np.zeros(len(F_b), dtype=bool)
    M = Dominator.calc_domination_matrix(F_a, F_b)  # M[i, j] = 1: a_i dominates b_j
    return np.asarray((M == 1).any(axis=0))


def dominance_counts(F_a: np.ndarray, F_b: np.ndarray) -> tuple[int, int]:
    """``(a_dominates_b, b_dominates_a)``: how many rows of ``F_b (k, m)`` are dominated by
    some row of ``F_a (n, m)``, and how many rows of ``F_a`` by some row of ``F_b``."""
    return int(dominated_by(F_a, F_b).sum()), int(dominated_by(F_b, F_a).sum())


def summary_frame(
    F_front: np.ndarray,
    F_de: np.ndarray,
    ref_point: np.ndarray,
    *,
    front_evals: int,
    de_evals: int,
    front_budget: int,
    de_budget: int,
    label: str = DE_LABEL,
) -> pd.DataFrame:
    """The comparison table: one row per method with its points, evaluation budget and
    evaluations spent, hypervolume (objectives / ``ref_point``, reference all ones) and
    dominance counts against the other.

    F_front ``(n, m)``, F_de ``(k, m)``: feasible points only, minimised objectives, of the
    search and of the method it is compared with (``label``: the DE baseline or a peer).
    """
    front_dom, de_dom = dominance_counts(F_front, F_de)
    return pd.DataFrame(
        {
            "method": [FRONT_LABEL, label],
            "points": [len(F_front), len(F_de)],
            "budget": [int(front_budget), int(de_budget)],
            "evaluations": [int(front_evals), int(de_evals)],
            "hv": [hypervolume(F_front, ref_point), hypervolume(F_de, ref_point)],
            # points of the *other* method this one dominates / own points the other dominates
            "dominates": [front_dom, de_dom],
            "dominated": [de_dom, front_dom],
        }
    )


# --- the comparison --------------------------------------------------------------------------


@dataclass(frozen=True)
class ComparisonResult:
    """A run's comparison with the DE baseline or a peer (:mod:`moecomp.compare_peer`).

    de: the other method's points (rows of ``compare_de.csv``; for a peer, its front);
    summary: rows of the summary table (index 0 the search front, 1 the other method);
    space: the run's objective space; files: name -> path of what was written.
    """

    run_dir: Path
    de: pd.DataFrame
    summary: pd.DataFrame
    space: ObjectiveSpace
    files: dict[str, Path]

    def _value(self, row: int, col: str) -> float:
        return float(self.summary[col].iloc[row])

    @property
    def label(self) -> str:
        """The other method's name in the tables and figure."""
        return str(self.summary["method"].iloc[1])

    @property
    def hv_front(self) -> float:
        return self._value(0, "hv")

    @property
    def hv_de(self) -> float:
        """Hypervolume of the other method's feasible points."""
        return self._value(1, "hv")

    @property
    def front_dominates_de(self) -> int:
        """Points of the other method that some front point dominates."""
        return int(self._value(0, "dominates"))

    @property
    def de_dominates_front(self) -> int:
        """Front points that some point of the other method dominates."""
        return int(self._value(1, "dominates"))

    def markdown(self) -> str:
        return summary_markdown(
            self.summary, self.de, self.space, metric=metric_info(RunFolder(self.run_dir))
        )


def _check_targets(targets: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(t) for t in targets)
    if not out:
        raise ConfigError("targets", "give at least one target sparsity")
    for t in out:
        if not (math.isfinite(t) and 0.0 < t < 1.0):
            raise ConfigError("targets", f"each target sparsity must be in (0, 1), got {t}")
    if len(set(out)) != len(out):
        raise ConfigError("targets", f"target sparsities must differ, got {list(out)}")
    return tuple(sorted(out))


def run_budget(run: RunFolder) -> int:
    """The evaluations the run's search spent (``n_evals`` of search.json)."""
    status = run.status()
    n = status.get("n_evals")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise RunError(
            f"{run.path} has no evaluation count (search.json: n_evals); give the budget explicitly"
        )
    return n


def de_row(result: DEResult, metrics: dict[str, float], names: Sequence[str]) -> dict[str, object]:
    """One row of compare_de.csv from a DE result and its Evaluator metrics."""
    row: dict[str, object] = {
        "target_sparsity": result.target_sparsity,
        "sparsity": result.sparsity,
        "evals": result.n_evals,
        "budget": result.budget,
        "seed": result.seed,
    }
    row |= {m: metrics[m] for m in METRICS}
    row["de_divergence"] = result.divergence
    for n in names:
        row[sparsity_col(n)] = result.plan.layers[n].sparsity
    for n in names:
        row[bits_col(n)] = result.plan.layers[n].bits
    return row


def _feasible(df: pd.DataFrame, problem: ProblemConfig) -> np.ndarray:
    """bool ``(n,)``: the rows that meet the problem's constraints, as the search decides."""
    metrics = {m: df[m].to_numpy(float) for m in METRICS}
    return feasible(constraint_values(problem, metrics))


def de_points(
    target: Target,
    problem: ProblemConfig,
    targets: Sequence[float],
    per_target: int,
    config: DEConfig,
    *,
    progress: bool = False,
) -> pd.DataFrame:
    """Rows of compare_de.csv: the DE run at each target sparsity with ``per_target``
    evaluations, each result measured by the Evaluator (uniform quantizer, the DE's own
    ranks), with ``feasible`` under ``problem``'s constraints."""
    names = target.layer_names
    rows = []
    with tqdm(
        total=per_target * len(targets), desc="DE baseline", unit="eval", disable=not progress
    ) as bar:
        for s in targets:
            done = bar.n

            def advance(n: int, done: int = done) -> None:
                bar.update(done + n - bar.n)

            result = run_directed_evolution(
                target, s, budget=per_target, config=config, on_evals=advance
            )
            bar.update(done + per_target - bar.n)
            ev = Evaluator(target, result.ranks, quantizer="uniform")
            m = ev.evaluate_plans([result.plan]).to_dict()
            rows.append(de_row(result, {k: float(v[0]) for k, v in m.items()}, names))
    de = pd.DataFrame(rows)
    de.insert(de.columns.get_loc("de_divergence") + 1, "feasible", _feasible(de, problem))
    return de


def compare_with_de(
    run_dir: str | os.PathLike[str],
    *,
    targets: Sequence[float] = DEFAULT_TARGETS,
    budget: int | None = None,
    config: DEConfig | None = None,
    target: Target | None = None,
    plot: bool = True,
    progress: bool = False,
) -> ComparisonResult:
    """Run the DE baseline for a finished (or running) search and write the comparison.

    run_dir: a run folder (problem.json, front.csv, search.json).
    targets: global sparsities the DE is run at, each in (0, 1).
    budget: total DE evaluations, split equally over the targets; default the search's own
        ``n_evals``, so both spent the same.
    config: DE settings; default ``DEConfig(seed=problem.search.seed)``.
    target: the run's Target when the caller has it (else built from problem.json; the
        teacher is trained on first use).
    plot: draw ``plots/compare_de.png``; progress: a progress bar over the DE evaluations.

    The DE quantises with the uniform bin-mean quantizer whatever ``genes.quantizer`` the
    search used (seed 1's method); its points are evaluated by the Evaluator with that
    quantizer and its own ranks.
    """
    run = RunFolder(run_dir)
    problem = run.problem()
    front = run.front()
    targets = _check_targets(targets)
    total = run_budget(run) if budget is None else budget
    status = run.status()
    search_evals = status.get("n_evals", total)
    search_budget = status.get("budget", search_evals)
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ConfigError("budget", f"must be a positive integer, got {total!r}")
    if target is None:
        target = build_target(problem, progress=progress)
    names = target.layer_names
    per_target = total // len(targets)
    need = (BITS_EVALS + 1) * len(names)
    if per_target < need:
        raise ConfigError(
            "budget",
            f"{total} evaluations over {len(targets)} targets leave "
            f"{per_target} per target; the DE needs at least {need} "
            f"({BITS_EVALS + 1} per layer): give fewer targets or more budget",
        )
    cfg = config if config is not None else DEConfig(seed=problem.search.seed)
    de = de_points(target, problem, targets, per_target, cfg, progress=progress)
    space = objective_space(problem)
    F_front = space.matrix(front)
    F_de = space.matrix(de[de["feasible"]])
    dominated = np.zeros(len(de), dtype=bool)
    dominated[de["feasible"].to_numpy()] = dominated_by(F_front, F_de)
    de.insert(de.columns.get_loc("feasible") + 1, "dominated_by_front", dominated)
    summary = summary_frame(
        F_front,
        F_de,
        space.ref_point,
        front_evals=int(search_evals),
        de_evals=int(de["evals"].sum()),
        front_budget=int(search_budget),
        de_budget=per_target * len(targets),
    )
    files = write_comparison(run, de, summary, space, plot=plot, problem=problem)
    return ComparisonResult(run_dir=run.path, de=de, summary=summary, space=space, files=files)


def write_comparison(
    run: RunFolder,
    de: pd.DataFrame,
    summary: pd.DataFrame,
    space: ObjectiveSpace,
    *,
    plot: bool = True,
    problem: ProblemConfig | None = None,
) -> dict[str, Path]:
    """Write compare_de.csv, compare_summary.csv/.md and (if ``plot``) the figure."""
    files = {
        "de": run.file(DE_FILE),
        "summary": run.file(SUMMARY_FILE),
        "markdown": run.file(SUMMARY_MD),
    }
    atomic_write_csv(files["de"], de)
    atomic_write_csv(files["summary"], summary)
    atomic_write_text(
        files["markdown"], summary_markdown(summary, de, space, metric=metric_info(run))
    )
    if plot:
        problem = problem if problem is not None else run.problem()
        info = comparison_info(run.front(), de, space)
        files["plot"] = draw_comparison(
            info,
            run.plots / PLOT_FILE,
            space=space,
            summary=summary,
            title=f"{problem.name}: search front vs Directed Evolution baseline",
        )
    return files


def load_comparison(run_dir: str | os.PathLike[str]) -> ComparisonResult:
    """The comparison a previous :func:`compare_with_de` wrote into ``run_dir``."""
    run = RunFolder(run_dir)
    de = run.table(DE_FILE)
    summary = run.table(SUMMARY_FILE)
    files = {
        "de": run.file(DE_FILE),
        "summary": run.file(SUMMARY_FILE),
        "markdown": run.file(SUMMARY_MD),
    }
    if (run.path / "plots" / PLOT_FILE).is_file():
        files["plot"] = run.path / "plots" / PLOT_FILE
    return ComparisonResult(
        run_dir=run.path, de=de, summary=summary, space=objective_space(run.problem()), files=files
    )


# --- tables ----------------------------------------------------------------------------------


def _md_table(df: pd.DataFrame, formats: dict[str, str]) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        cells = [
            format(row[c], formats.get(c, "")) if not isinstance(row[c], str) else row[c]
            for c in cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def de_table(de: pd.DataFrame, *, metric: MetricInfo | None) -> pd.DataFrame:
    """The DE points as shown to a person: target, reached sparsity, evaluations, metrics.
    metric: the run's task metric (:func:`moecomp.runs.metric_info`): its columns are shown
    under its name and unit (``accuracy (%)``), and left out when the run has none."""
    cols = [
        "target_sparsity",
        "sparsity",
        "evals",
        "density",
        "bits",
        "divergence",
        "ratio",
        "metric",
        "metric_drop",
        "feasible",
        "dominated_by_front",
    ]
    if metric is None:
        cols = [c for c in cols if c not in ("metric", "metric_drop")]
    table = de[[c for c in cols if c in de.columns]]
    return table if metric is None else table.rename(columns=metric_headers(metric))


def summary_markdown(
    summary: pd.DataFrame, de: pd.DataFrame, space: ObjectiveSpace, *, metric: MetricInfo | None
) -> str:
    """compare_summary.md: the summary table, the convention, and the other method's points
    (metric columns as :func:`de_table` shows them)."""
    other = str(summary["method"].iloc[1])
    ref = ", ".join(f"{v:g}" for v in space.ref_point)
    formats = {
        "target_sparsity": ".2f",
        "sparsity": ".4f",
        "density": ".4f",
        "bits": ".2f",
        "divergence": ".4g",
        "ratio": ".1f",
    }
    if metric is not None:
        headers = metric_headers(metric)
        # A percentage to two decimals (points); a user's metric has no known scale.
        fmt = ".2f" if metric.percent else ".4g"
        formats |= {headers["metric"]: fmt, headers["metric_drop"]: fmt}
    measured = (
        f"Task metric: {metric.label} on the calibration set, and its drop from the teacher."
        if metric is not None
        else "No task metric: points are measured by their divergence alone."
    )
    return "\n".join(
        [
            "# Search front vs "
            + ("Directed Evolution baseline" if other == DE_LABEL else f"the {other} peer"),
            "",
            _md_table(summary, {"hv": ".4f"}),
            "",
            f"Objectives (minimised): {', '.join(space.names)}. Hypervolume of the objectives "
            f"divided by the reference point ({ref}), reference all ones (pymoo HV). "
            "`dominates`: points of the other method dominated by one of this method's; "
            "`dominated`: this method's points dominated by one of the other's.",
            "",
            f"## {other} points" if other == DE_LABEL else f"## {other}: its front",
            "",
            measured,
            "",
            _md_table(de_table(de, metric=metric), formats),
            "",
        ]
    )


# --- the figure (info first, drawing second) -------------------------------------------------


def comparison_info(
    front: pd.DataFrame, de: pd.DataFrame, space: ObjectiveSpace, *, label: str = DE_LABEL
) -> pd.DataFrame:
    """The points the figure shows: ``method``, ``x`` (the first objective), ``y`` (the last,
    fidelity), ``bits`` (colour), ``label`` (DE: its target sparsity; a peer's: none),
    ``feasible``. ``de``: the other method's points, named ``label``."""
    parts = []
    for method, df in ((FRONT_LABEL, front), (label, de)):
        F = space.matrix(df)
        labels = (
            [f"{t:.0%} sparse" for t in df["target_sparsity"]]
            if method != FRONT_LABEL and "target_sparsity" in df.columns
            else [""] * len(df)
        )
        feasible = (
            df["feasible"].to_numpy(bool)
            if "feasible" in df.columns
            else np.ones(len(df), dtype=bool)
        )
        parts.append(
            pd.DataFrame(
                {
                    "method": method,
                    "x": F[:, 0],
                    "y": F[:, -1],
                    "bits": df["bits"].to_numpy(float),
                    "label": labels,
                    "feasible": feasible,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def draw_comparison(
    info: pd.DataFrame,
    path: Path,
    *,
    space: ObjectiveSpace,
    summary: pd.DataFrame | None = None,
    title: str = "",
) -> Path:
    """The front (circles, coloured by mean bits) with the other method's points (diamonds,
    same colours; the DE's joined in order of sparsity and labelled with their target) in the
    plane of the first objective and fidelity; log y when the fidelity spans more than two
    decades."""
    front = info[info["method"] == FRONT_LABEL]
    de = info[info["method"] != FRONT_LABEL].sort_values("x")
    other = str(de["method"].iloc[0]) if len(de) else DE_LABEL
    targets = bool(len(de)) and bool((de["label"] != "").all())
    norm = Normalize(vmin=1, vmax=8)
    cmap = sns.color_palette("viridis", as_cmap=True)
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(9, 6.2), layout="constrained")
        ax = fig.subplots()
        sns.scatterplot(
            data=front,
            x="x",
            y="y",
            hue="bits",
            hue_norm=norm,
            palette=cmap,
            s=36,
            edgecolor="none",
            alpha=0.9,
            ax=ax,
            legend=False,
        )
        if targets:
            ax.plot(de["x"], de["y"], color="#444444", linestyle="--", linewidth=1, zorder=3)
        ok = de[de["feasible"]]
        bad = de[~de["feasible"]]
        # a few DE points stand out; a peer's whole front must not hide the search's
        size, edge = (110, 1.4) if targets else (30, 0.7)
        ax.scatter(
            ok["x"],
            ok["y"],
            c=ok["bits"],
            cmap=cmap,
            norm=norm,
            marker="D",
            s=size,
            edgecolor="black",
            linewidth=edge,
            zorder=4,
        )
        if len(bad):
            ax.scatter(
                bad["x"],
                bad["y"],
                facecolor="none",
                marker="D",
                s=size,
                edgecolor="#d62728",
                linewidth=edge,
                zorder=4,
            )
        for k, (_, row) in enumerate(de.iterrows() if targets else ()):
            # neighbours (in x) alternate above and below, so close points stay readable
            ax.annotate(
                f"DE {row['label']}" if other == DE_LABEL else str(row["label"]),
                (row["x"], row["y"]),
                xytext=(9, 7) if k % 2 else (9, -15),
                textcoords="offset points",
                fontsize=8,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                zorder=5,
            )
        y = info["y"].to_numpy(float)
        y = y[np.isfinite(y)]
        if len(y) and (y > 0).all() and y.max() / y.min() > 100:
            ax.set_yscale("log")
        ax.set_xlabel(space.labels[0])
        ax.set_ylabel(space.labels[-1])
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="mean bits per kept weight")
        projected = ", projected" if len(space.names) > 2 else ""
        handles = [
            Line2D(
                [],
                [],
                marker="o",
                linestyle="none",
                color="#9e9e9e",
                markersize=6,
                label=f"{FRONT_LABEL} ({len(front)} points{projected})",
            ),
            Line2D(
                [],
                [],
                marker="D",
                linestyle="--" if targets else "none",
                color="#444444",
                markerfacecolor="#9e9e9e",
                markeredgecolor="black",
                markersize=8,
                label=f"{other} ({len(de)} target sparsities)"
                if targets
                else f"{other} front ({len(de)} points{projected})",
            ),
        ]
        if len(bad):
            handles.append(
                Line2D(
                    [],
                    [],
                    marker="D",
                    linestyle="none",
                    markerfacecolor="none",
                    markeredgecolor="#d62728",
                    markersize=8,
                    label=f"{other} point violating a constraint",
                )
            )
        ax.legend(
            handles=handles,
            loc="upper right",
            frameon=True,
            title="marker: method; colour: mean bits",
            title_fontsize=8,
        )
        lines = [title or f"Search front vs {other}"]
        short = "DE" if other == DE_LABEL else other
        if summary is not None:
            f, d = summary.iloc[0], summary.iloc[1]
            lines.append(
                f"evaluations: search {int(f['evaluations'])} (budget {int(f['budget'])}), "
                f"{short} {int(d['evaluations'])} (budget {int(d['budget'])})"
            )
            lines.append(f"hypervolume: search {f['hv']:.4f}, {short} {d['hv']:.4f}")
            which = " feasible" if int(d["points"]) < len(de) else ""
            lines.append(
                f"the front dominates {int(f['dominates'])} of {int(d['points'])}{which} "
                f"{short} points; they dominate {int(d['dominates'])} of "
                f"{int(f['points'])} front points (all objectives)"
            )
        ax.set_title("\n".join(lines), fontsize=10)
    return save_figure(fig, path, dpi=130)
