"""Figures of a run: the front with the picks marked, compression ratio vs the task metric
(vs the divergence when the target has none), the picks' per-layer genes and the
hypervolume history (seaborn PNGs in ``RUN/plots/``). The metric's name and unit come from
the run's target.json (:func:`moecomp.runs.metric_info`).

Info first, drawing second (Optuna's habit): each ``*_info`` function reduces the run's
tables to the small frame a figure shows, and tests check those; each ``draw_*`` function
only draws one. Figures are built with ``matplotlib.figure.Figure`` (no pyplot), so no global
state or GUI backend is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from moecomp.atomic import save_figure
from moecomp.divergence import divergence_label
from moecomp.runs import (
    MetricInfo,
    RunFolder,
    bits_col,
    metric_info,
    read_table,
    sparsity_col,
)

LABELS = {
    "density": "density (share of weights kept)",
    "bits": "mean bits per kept weight",
    "ratio": "compression ratio vs fp32 (x)",
    "n_evals": "evaluations",
}
# status -> (colour, marker size, alpha): the front stands out, the rest recedes.
STYLE = {
    "dominated": ("#9e9e9e", 14, 0.35),
    "Pareto front": ("#1f77b4", 30, 0.9),
}
PICK_COLOUR = "#d62728"
DPI = 130
RATIO_FIGURE = "ratio_metric.png"


# --- info -----------------------------------------------------------------------------------
def pick_labels(picks: pd.DataFrame | None) -> dict[int, str]:
    """Solution id -> its annotation, e.g. ``#812: knee; weights 1,1,4 (asf)`` (a solution
    chosen by several rules is one point with all of them)."""
    if picks is None or picks.empty:
        return {}
    out: dict[int, list[str]] = {}
    for sid, rule in zip(picks["id"].astype(int), picks["rule"].astype(str), strict=True):
        short = rule.split(" within ")[0]
        out.setdefault(int(sid), [])
        if short not in out[int(sid)]:
            out[int(sid)].append(short)
    return {sid: f"#{sid}: " + "; ".join(rules) for sid, rules in out.items()}


def front_info(
    evaluated: pd.DataFrame, front: pd.DataFrame, picks: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per evaluated solution: ``id``, the metrics, ``dominated`` (not on the front),
    ``status`` ("Pareto front" or "dominated"), ``picked`` and ``label`` (the pick
    annotation, "" if not picked). Sorted so picks come last (drawn on top)."""
    cols = ["id", "density", "bits", "divergence", "ratio", "metric", "metric_drop"]
    df = pd.concat([evaluated[cols], front[cols]], ignore_index=True)
    df = df.drop_duplicates("id").reset_index(drop=True)
    on_front = df["id"].isin(front["id"])
    labels = pick_labels(picks)
    df["dominated"] = ~on_front
    df["status"] = np.where(on_front, "Pareto front", "dominated")
    df["picked"] = df["id"].isin(list(labels))
    df["label"] = df["id"].map(labels).astype(object).fillna("")
    return df.sort_values(
        ["picked", "dominated"], ascending=[True, False], kind="stable"
    ).reset_index(drop=True)


def teacher_value(evaluated: pd.DataFrame, metric: MetricInfo) -> float:
    """The teacher's calibration value of ``metric``: each row's metric plus its drop (minus,
    for a metric to minimise); the median over rows, which agree up to rounding."""
    sign = 1.0 if metric.direction == "maximize" else -1.0
    vals = (evaluated["metric"] + sign * evaluated["metric_drop"]).to_numpy(float)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        raise ValueError(f"no row has a {metric.name} value to find the teacher's from")
    return float(np.median(vals))


def held_out_info(picks: pd.DataFrame | None, column: str = "metric") -> pd.DataFrame | None:
    """The picks' re-evaluation on the test split: one row per picked id with ``ratio``,
    ``calibration`` (the pick's ``column`` on the calibration set: ``metric`` or
    ``divergence``) and ``test`` (its ``test_<column>``); None when the picks were not
    re-evaluated (``pick(..., reevaluate=False)``) or the test split has no such value."""
    test = f"test_{column}"
    if picks is None or picks.empty or not {"id", "ratio", column, test} <= set(picks.columns):
        return None
    df = picks[["id", "ratio", column, test]].drop_duplicates("id").reset_index(drop=True)
    df = df.rename(columns={column: "calibration", test: "test"})
    return None if df["test"].isna().all() else df


@dataclass(frozen=True)
class RatioInfo:
    """What the ratio figure shows on its y axis against the compression ratio.

    column: the column of :func:`front_info` drawn: ``metric``, or ``divergence`` when the
        run has no task metric;
    name: what the y axis is called in titles (``accuracy``, ``KL divergence``);
    label: the y axis label with units;
    unit: the unit of values written in legends (``%`` or the user's; empty for a
        divergence);
    teacher, teacher_test: the teacher's value on the calibration and test sets (None for a
        divergence, the teacher's own being 0);
    held_out: :func:`held_out_info` of the picks (None without a test re-evaluation);
    zoom: the band (lo, hi) of a second, zoomed panel (:func:`metric_zoom`), or None;
    log_y: a log y axis (divergences spanning more than two decades);
    higher_is_better: where the good solutions sit (the legend goes to the other corner).
    """

    column: str
    name: str
    label: str
    unit: str
    teacher: float | None
    teacher_test: float | None
    held_out: pd.DataFrame | None
    zoom: tuple[float, float] | None
    log_y: bool
    higher_is_better: bool


def ratio_info(
    points: pd.DataFrame,
    evaluated: pd.DataFrame,
    picks: pd.DataFrame | None,
    metric: MetricInfo | None,
    *,
    divergence: str = "kl",
) -> RatioInfo:
    """The ratio figure of a run: compression ratio vs its task metric on the calibration
    set, or vs the divergence when there is no metric (``metric`` None, see
    :func:`moecomp.runs.metric_info`). points: :func:`front_info`; evaluated: evaluated.csv
    (for the teacher's value); picks: picks.csv or None; divergence: its name, for labels."""
    if metric is None:
        held = held_out_info(picks, "divergence")
        label = divergence_label(divergence)
        return RatioInfo(
            column="divergence",
            name=label.split(" (")[0],  # "KL divergence (nats)" -> "KL divergence"
            label=f"{label} on the calibration set (teacher = 0)",
            unit="",
            teacher=None,
            teacher_test=None,
            held_out=held,
            zoom=None,
            log_y=_use_log(points["divergence"]),
            higher_is_better=False,
        )
    teacher = teacher_value(evaluated, metric)
    held = held_out_info(picks, "metric")
    teacher_test = None
    if held is not None and picks is not None and "teacher_test_metric" in picks.columns:
        t = picks["teacher_test_metric"].dropna()
        teacher_test = float(t.iloc[0]) if len(t) else None
    return RatioInfo(
        column="metric",
        name=metric.name,
        label=f"{metric.label} on the calibration set",
        unit=metric.unit,
        teacher=teacher,
        teacher_test=teacher_test,
        held_out=held,
        zoom=metric_zoom(points, teacher, held, teacher_test=teacher_test,
                         percent=metric.percent),
        log_y=False,
        higher_is_better=metric.direction == "maximize",
    )


@dataclass(frozen=True)
class LayerInfo:
    """Per-layer genes of the picks: rows are pick labels, columns the layer names."""

    sparsity: pd.DataFrame  # share of weights pruned, [0, 1)
    bits: pd.DataFrame  # bits per kept weight, 1..8


def layer_info(picks: pd.DataFrame, evaluated: pd.DataFrame, layer_names: list[str]) -> LayerInfo:
    """The picks' sparsity and bits per layer (genes looked up in evaluated.csv by id)."""
    labels = pick_labels(picks)
    ids = list(labels)
    rows = evaluated.set_index("id").loc[ids]
    index = [labels[i] for i in ids]
    short = [_short(n) for n in layer_names]
    s = pd.DataFrame(
        rows[[sparsity_col(n) for n in layer_names]].to_numpy(float), index=index, columns=short
    )
    b = pd.DataFrame(
        rows[[bits_col(n) for n in layer_names]].to_numpy(int), index=index, columns=short
    )
    return LayerInfo(sparsity=s, bits=b)


def _short(name: str) -> str:
    """``fc1.weight`` -> ``fc1`` (every compressible tensor is a weight)."""
    return name.removesuffix(".weight") or name


# --- drawing --------------------------------------------------------------------------------
def _use_log(values: pd.Series) -> bool:
    v = values.to_numpy(float)
    v = v[np.isfinite(v)]
    return bool(len(v) and (v > 0).all() and v.max() / v.min() > 100)


def _scatter_status(ax: Axes, info: pd.DataFrame, x: str, y: str, *, legend: bool) -> None:
    for status, (colour, size, alpha) in STYLE.items():
        part = info[info["status"] == status]
        n = len(part)
        sns.scatterplot(
            data=part,
            x=x,
            y=y,
            ax=ax,
            color=colour,
            s=size,
            alpha=alpha,
            edgecolor="none",
            label=f"{status} ({n})" if legend else None,
            legend=False,
        )
    picks = info[info["picked"]]
    if len(picks):
        ax.scatter(
            picks[x],
            picks[y],
            marker="*",
            s=260,
            color=PICK_COLOUR,
            edgecolor="black",
            linewidth=0.8,
            zorder=5,
            label=f"pick ({len(picks)})" if legend else None,
        )


def _annotate(ax: Axes, info: pd.DataFrame, x: str, y: str) -> None:
    """Label each pick with its id; call after the axes' scales are set.

    Labels point towards the middle of the axes (so they stay inside it, off the axis labels
    and title), and neighbours are staggered vertically so they do not sit on each other.
    """
    picks = info[info["picked"]]
    if picks.empty:
        return
    ax.autoscale_view()
    to_axes = ax.transData + ax.transAxes.inverted()
    to_points = ax.transData + ax.figure.dpi_scale_trans.inverted()  # inches
    placed: list[tuple[float, float]] = []  # label anchors, in points
    for _, row in picks.sort_values(x).iterrows():
        fx, fy = to_axes.transform((row[x], row[y]))
        px, py = to_points.transform((row[x], row[y])) * 72
        dx = 10 if fx < 0.6 else -10
        sign = 1 if fy < 0.6 else -1
        dy = 14 * sign
        # Move the label further out while it would sit on one placed before.
        while any(abs(px + dx - qx) < 45 and abs(py + dy - qy) < 13 for qx, qy in placed):
            dy += 13 * sign
        placed.append((px + dx, py + dy))
        ax.annotate(
            f"#{int(row['id'])}",
            (row[x], row[y]),
            xytext=(dx, dy),
            textcoords="offset points",
            fontsize=8,
            ha="left" if dx > 0 else "right",
            va="center",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": PICK_COLOUR, "alpha": 0.85},
            arrowprops={"arrowstyle": "-", "color": PICK_COLOUR, "lw": 0.8},
            zorder=6,
        )


def _times_ticks(ax: Axes) -> None:
    """Log-scale x ticks written as plain ratios (``20x``); minor labels at 2, 3 and 5 x 10^k."""
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))

    def minor(v: float, _: object) -> str:
        lead = v / 10 ** np.floor(np.log10(v))
        return f"{v:g}x" if any(np.isclose(lead, k) for k in (2, 3, 5)) else ""

    ax.xaxis.set_minor_formatter(FuncFormatter(minor))
    ax.tick_params(axis="x", which="minor", labelsize=8)


def _pick_key(fig: Figure, info: pd.DataFrame) -> None:
    """A legend to the right that says which rule chose each marked id (the figure itself
    shows only ids, which stay readable when picks are close together)."""
    labels = list(info.loc[info["picked"]].sort_values("id")["label"])
    if not labels:
        return
    blank = [Line2D([], [], linestyle="none") for _ in labels]
    fig.legend(
        blank,
        labels,
        loc="outside right upper",
        title="picks (id: rule)",
        handlelength=0,
        handletextpad=0,
        fontsize=8,
        title_fontsize=9,
    )


def draw_front_pairs(
    info: pd.DataFrame, path: Path, *, divergence: str = "kl", title: str = ""
) -> Path:
    """Three projections of the 3-objective front: density vs divergence, bits vs
    divergence, density vs bits."""
    labels = LABELS | {"divergence": divergence_label(divergence)}
    pairs = [("density", "divergence"), ("bits", "divergence"), ("density", "bits")]
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(18, 5.4), layout="constrained")
        axes = fig.subplots(1, 3)
        for k, (ax, (x, y)) in enumerate(zip(axes, pairs, strict=True)):
            _scatter_status(ax, info, x, y, legend=k == 0)
            if y == "divergence" and _use_log(info[y]):
                ax.set_yscale("log")
            _annotate(ax, info, x, y)
            ax.set_xlabel(labels[x])
            ax.set_ylabel(labels[y])
            ax.set_title(f"{x} vs {y}")
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncols=len(names), frameon=False)
        _pick_key(fig, info)
        n_front = int((~info["dominated"]).sum())
        fig.suptitle(
            title
            or f"Pareto front projections ({len(info)} evaluated, {n_front} "
            "non-dominated; all objectives minimised)"
        )
    return _save(fig, path)


def metric_zoom(
    points: pd.DataFrame,
    teacher: float,
    held_out: pd.DataFrame | None = None,
    *,
    teacher_test: float | None = None,
    percent: bool = True,
) -> tuple[float, float] | None:
    """The band of metric values a zoomed panel shows: the picks (calibration and test) and
    the teacher with a margin; None when there are no picks or the band would span most of
    the full range anyway. points: :func:`front_info`; held_out: :func:`held_out_info`.
    percent: the metric is a percentage (margin at least a point, band within [0, 100.5])."""
    picks = points[points["picked"]]
    if picks.empty:
        return None
    vals = [teacher, *picks["metric"]]
    if held_out is not None and not held_out.empty:
        vals += [*held_out["test"].dropna()]
    if teacher_test is not None:
        vals.append(teacher_test)
    vals = [v for v in vals if np.isfinite(v)]
    full = float(points["metric"].max() - points["metric"].min())
    if not vals or not full > 0:
        return None
    lo, hi = min(vals), max(vals)
    if percent:
        margin = max(1.0, 0.15 * (hi - lo))
        lo, hi = max(lo - margin, 0.0), min(hi + margin, 100.5)
    else:  # no natural step or bounds: the margin follows the spread
        margin = max(0.15 * (hi - lo), 0.02 * full)
        lo, hi = lo - margin, hi + margin
    if (hi - lo) > 0.6 * full:
        return None
    return lo, hi


def _value(v: float, unit: str) -> str:
    """A metric value for a legend: ``96.1 %``, ``0.9731``, ``12.3 ms``."""
    if unit == "%":
        return f"{v:.1f} %"
    return f"{v:.4g} {unit}".rstrip()


def draw_ratio(points: pd.DataFrame, ratio: RatioInfo, path: Path, *, title: str = "") -> Path:
    """Compression ratio (log x) vs ``ratio.column`` on the calibration set (see
    :func:`ratio_info`), the teacher as a horizontal line; with held-out picks also their
    test values, each joined to its calibration point, and the teacher's test value. When the
    picks sit in a narrow band (``ratio.zoom``), a second panel shows that band."""
    y, zoom, held = ratio.column, ratio.zoom, ratio.held_out
    on_test = held is not None and not held.empty
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(18 if zoom else 11, 6), layout="constrained")
        axes = fig.subplots(1, 2 if zoom else 1, squeeze=False)[0]
        for k, ax in enumerate(axes):
            _scatter_status(ax, points, "ratio", y, legend=k == 0)
            if ratio.teacher is not None:
                ax.axhline(
                    ratio.teacher,
                    color="black",
                    linestyle="--",
                    linewidth=1,
                    label=f"teacher, calibration set ({_value(ratio.teacher, ratio.unit)})",
                )
            if held is not None and on_test:
                ax.vlines(
                    held["ratio"],
                    held["calibration"],
                    held["test"],
                    color=PICK_COLOUR,
                    linestyle=":",
                    linewidth=1,
                    zorder=4,
                )
                ax.scatter(
                    held["ratio"],
                    held["test"],
                    marker="D",
                    s=45,
                    facecolor="white",
                    edgecolor=PICK_COLOUR,
                    linewidth=1.5,
                    zorder=5,
                    label=f"pick on the test set ({len(held)})",
                )
            if ratio.teacher_test is not None:
                ax.axhline(
                    ratio.teacher_test,
                    color="#555555",
                    linestyle=":",
                    linewidth=1.2,
                    label=f"teacher, test set ({_value(ratio.teacher_test, ratio.unit)})",
                )
            ax.set_xscale("log")
            if ratio.log_y:
                ax.set_yscale("log")
            _times_ticks(ax)
            ax.set_xlabel(LABELS["ratio"])
            ax.set_ylabel(ratio.label + ("; diamonds: test set" if on_test else ""))
        # The good solutions sit at the top (or bottom) left: the legend goes below (above).
        axes[0].legend(loc="lower left" if ratio.higher_is_better else "upper left",
                       frameon=True)
        if zoom:
            axes[0].set_title("all evaluated solutions")
            axes[1].set_ylim(*zoom)
            band = f"{_value(zoom[0], ratio.unit)} to {_value(zoom[1], ratio.unit)}"
            axes[1].set_title(f"zoom: {ratio.name} {band}")
        # Label the picks where they can be told apart: in the zoom when there is one.
        _annotate(axes[-1], points, "ratio", y)
        _pick_key(fig, points)
        fig.suptitle(title or f"Compression ratio vs {ratio.name}")
    return _save(fig, path)


def draw_layers(layers: LayerInfo, path: Path, *, title: str = "") -> Path:
    """Heatmaps of the picks' per-layer sparsity (share pruned) and bits."""
    n_rows, n_cols = layers.sparsity.shape
    width = max(9.0, 2 * (2.2 + 0.9 * n_cols) + 3)
    height = max(3.4, 1.6 + 0.55 * n_rows)  # colour bars need room even for one pick
    with sns.axes_style("white"):
        fig = Figure(figsize=(width, height), layout="constrained")
        ax_s, ax_b = fig.subplots(1, 2, sharey=True)
        sns.heatmap(
            layers.sparsity,
            ax=ax_s,
            vmin=0,
            vmax=1,
            cmap="Blues",
            annot=True,
            fmt=".2f",
            linewidths=0.5,
            cbar_kws={"label": "sparsity (share pruned)"},
        )
        sns.heatmap(
            layers.bits,
            ax=ax_b,
            vmin=1,
            vmax=8,
            cmap="Purples",
            annot=True,
            fmt="d",
            linewidths=0.5,
            cbar_kws={"label": "bits per kept weight"},
        )
        ax_s.set_title("sparsity per layer")
        ax_b.set_title("bits per layer")
        for ax in (ax_s, ax_b):
            ax.set_xlabel("layer")
            ax.tick_params(axis="x", rotation=30)
            ax.tick_params(axis="y", rotation=0)
        ax_s.set_ylabel("pick")
        ax_b.set_ylabel("")
        fig.suptitle(title or "Per-layer genes of the picks")
    return _save(fig, path)


def draw_hv(
    hv: pd.DataFrame, path: Path, *, ref_point: tuple[float, ...] = (), title: str = ""
) -> Path:
    """Hypervolume after each generation against evaluations spent."""
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(8, 5), layout="constrained")
        ax = fig.subplots()
        sns.lineplot(
            data=hv,
            x="n_evals",
            y="hv",
            ax=ax,
            marker="o",
            markersize=4,
            label="hypervolume after each generation",
        )
        ax.set_xlabel(LABELS["n_evals"])
        ref = f", reference point {tuple(float(v) for v in ref_point)}" if ref_point else ""
        ax.set_ylabel("hypervolume (objectives / ref. point)")
        final = hv.iloc[-1]
        ax.set_title(
            title
            or f"Hypervolume history: final {final['hv']:.4f} after "
            f"{int(final['n_evals'])} evaluations{ref}",
            fontsize=10,
        )
        ax.legend(loc="lower right")
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    return save_figure(fig, path, dpi=DPI)


# --- a whole run ----------------------------------------------------------------------------
def plot_run(run_dir: str | os.PathLike[str], picks: pd.DataFrame | None = None) -> list[Path]:
    """Draw every figure of a run into ``RUN/plots/``; returns the PNG paths.

    picks: the output of ``moecomp.pick.pick``; by default ``RUN/picks.csv`` if present.
    The per-layer heatmap is drawn only when there are picks, the hypervolume history only
    when ``hv.csv`` has rows.
    """
    run = RunFolder(run_dir)
    problem = run.problem()
    evaluated, front = run.evaluated(), run.front()
    if picks is None and run.file("picks.csv").is_file():
        picks = read_table(run.file("picks.csv"))
    info = front_info(evaluated, front, picks)
    metric = metric_info(run, evaluated)
    ratio = ratio_info(info, evaluated, picks, metric, divergence=problem.objectives.divergence)
    out = run.plots
    name = problem.name
    paths = [
        draw_front_pairs(
            info,
            out / "front_pairs.png",
            divergence=problem.objectives.divergence,
            title=f"{name}: Pareto front projections ({len(info)} evaluated, "
            f"{int((~info['dominated']).sum())} non-dominated; all minimised)",
        ),
        draw_ratio(
            info,
            ratio,
            out / RATIO_FIGURE,
            title=f"{name}: compression ratio vs {ratio.name}"
            + ("" if metric is not None else " (no task metric)"),
        ),
    ]
    if picks is not None and not picks.empty:
        layers = layer_info(picks, evaluated, run.layer_names(evaluated))
        paths.append(
            draw_layers(
                layers, out / "pick_layers.png", title=f"{name}: per-layer genes of the picks"
            )
        )
    hv_file = run.file("hv.csv")
    if hv_file.is_file():
        hv = run.hv_history()
        if not hv.empty:
            paths.append(
                draw_hv(
                    hv, out / "hv_history.png", ref_point=problem.objectives.ref_point, title=""
                )
            )
    return paths
