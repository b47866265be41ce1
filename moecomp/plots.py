"""Figures of a run: the front with the picks marked, ratio vs accuracy, the picks' per-layer
genes and the hypervolume history (seaborn PNGs in ``RUN/plots/``).

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

from moecomp.runs import RunFolder, bits_col, sparsity_col

LABELS = {
    "density": "density (share of weights kept)",
    "bits": "mean bits per kept weight",
    "ratio": "compression ratio vs fp32 (x)",
    "accuracy": "accuracy (%)",
    "n_evals": "evaluations",
}
DIVERGENCE_LABELS = {
    "kl": "KL divergence (nats)",
    "nmse": "normalised MSE (teacher = 0)",
    "cosine": "1 - cosine similarity",
}
# status -> (colour, marker size, alpha): the front stands out, the rest recedes.
STYLE = {
    "dominated": ("#9e9e9e", 14, 0.35),
    "Pareto front": ("#1f77b4", 30, 0.9),
}
PICK_COLOUR = "#d62728"
DPI = 130


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
    cols = ["id", "density", "bits", "divergence", "ratio", "accuracy", "acc_drop"]
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


def teacher_accuracy(evaluated: pd.DataFrame) -> float:
    """The teacher's calibration accuracy (%): every row's accuracy + acc_drop."""
    vals = (evaluated["accuracy"] + evaluated["acc_drop"]).to_numpy(float)
    return float(np.median(vals))


def held_out_info(picks: pd.DataFrame | None) -> pd.DataFrame | None:
    """The picks' re-evaluation on the test split: one row per picked id with ``ratio``,
    ``accuracy`` (calibration), ``test_acc`` and ``teacher_test_acc``; None when the picks
    were not re-evaluated (``pick(..., reevaluate=False)``)."""
    cols = ["id", "ratio", "accuracy", "test_acc", "teacher_test_acc"]
    if picks is None or picks.empty or not set(cols) <= set(picks.columns):
        return None
    return picks[cols].drop_duplicates("id").reset_index(drop=True)


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
    labels = LABELS | {"divergence": DIVERGENCE_LABELS.get(divergence, "divergence")}
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


def accuracy_zoom(
    info: pd.DataFrame, teacher_acc: float, held_out: pd.DataFrame | None = None
) -> tuple[float, float] | None:
    """The accuracy band (%) a zoomed panel shows: the picks (calibration and test) and the
    teacher with a margin; None when there are no picks or the band would span most of the
    full range anyway."""
    picks = info[info["picked"]]
    if picks.empty:
        return None
    vals = [teacher_acc, *picks["accuracy"]]
    if held_out is not None and not held_out.empty:
        vals += [*held_out["test_acc"], float(held_out["teacher_test_acc"].iloc[0])]
    lo, hi = min(vals), max(vals)
    margin = max(1.0, 0.15 * (hi - lo))
    lo, hi = max(lo - margin, 0.0), min(hi + margin, 100.5)  # accuracy is a percentage
    full = float(info["accuracy"].max() - info["accuracy"].min())
    if full <= 0 or (hi - lo) > 0.6 * full:
        return None
    return lo, hi


def draw_ratio_accuracy(
    info: pd.DataFrame,
    teacher_acc: float,
    path: Path,
    *,
    held_out: pd.DataFrame | None = None,
    title: str = "",
) -> Path:
    """Compression ratio (log x) vs calibration accuracy, the teacher as a horizontal line;
    with ``held_out`` (see :func:`held_out_info`) also the picks' test accuracy, each joined
    to its calibration point, and the teacher's test accuracy. When the picks sit in a narrow
    accuracy band (:func:`accuracy_zoom`), a second panel shows that band."""
    on_test = held_out is not None and not held_out.empty
    zoom = accuracy_zoom(info, teacher_acc, held_out)
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(18 if zoom else 11, 6), layout="constrained")
        axes = fig.subplots(1, 2 if zoom else 1, squeeze=False)[0]
        for k, ax in enumerate(axes):
            _scatter_status(ax, info, "ratio", "accuracy", legend=k == 0)
            ax.axhline(
                teacher_acc,
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"teacher, calibration set ({teacher_acc:.1f} %)",
            )
            if held_out is not None and on_test:
                ax.vlines(
                    held_out["ratio"],
                    held_out["accuracy"],
                    held_out["test_acc"],
                    color=PICK_COLOUR,
                    linestyle=":",
                    linewidth=1,
                    zorder=4,
                )
                ax.scatter(
                    held_out["ratio"],
                    held_out["test_acc"],
                    marker="D",
                    s=45,
                    facecolor="white",
                    edgecolor=PICK_COLOUR,
                    linewidth=1.5,
                    zorder=5,
                    label=f"pick on the test set ({len(held_out)})",
                )
                t = float(held_out["teacher_test_acc"].iloc[0])
                ax.axhline(
                    t,
                    color="#555555",
                    linestyle=":",
                    linewidth=1.2,
                    label=f"teacher, test set ({t:.1f} %)",
                )
            ax.set_xscale("log")
            _times_ticks(ax)
            ax.set_xlabel(LABELS["ratio"])
            ax.set_ylabel(
                "accuracy (%) on the calibration set" + ("; diamonds: test set" if on_test else "")
            )
        axes[0].legend(loc="lower left", frameon=True)
        if zoom:
            axes[0].set_title("all evaluated solutions")
            axes[1].set_ylim(*zoom)
            axes[1].set_title(f"zoom: accuracy {zoom[0]:.1f} to {zoom[1]:.1f} %")
        # Label the picks where they can be told apart: in the zoom when there is one.
        _annotate(axes[-1], info, "ratio", "accuracy")
        _pick_key(fig, info)
        fig.suptitle(title or "Compression ratio vs accuracy")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, path)
    return path


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
        picks = pd.read_csv(run.file("picks.csv"))
    info = front_info(evaluated, front, picks)
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
        draw_ratio_accuracy(
            info,
            teacher_accuracy(evaluated),
            out / "ratio_accuracy.png",
            held_out=held_out_info(picks),
            title=f"{name}: compression ratio vs accuracy",
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
