"""PNG figures of a running search: the front (pairwise projections) and the HV history.

Each figure is described by a small info object first (tested) and drawn second (seaborn on a
matplotlib ``Figure``, no pyplot, so no global backend state is touched).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moecomp.atomic import save_figure


@dataclass(frozen=True)
class FrontPlotInfo:
    """Points of the front figure: ``F (n, n_obj)`` all evaluated (feasible) points,
    ``on_front (n,)`` bool, one panel per pair of objectives with its axis labels."""

    F: np.ndarray
    on_front: np.ndarray
    panels: tuple[tuple[int, int], ...]
    labels: tuple[str, ...]


def front_info(F: np.ndarray, front_idx: np.ndarray, labels: tuple[str, ...]) -> FrontPlotInfo:
    F = np.asarray(F, dtype=float)
    on = np.zeros(len(F), dtype=bool)
    on[np.asarray(front_idx, dtype=np.int64)] = True
    panels = tuple(itertools.combinations(range(F.shape[1]), 2))
    return FrontPlotInfo(F=F, on_front=on, panels=panels, labels=labels)


def draw_front(info: FrontPlotInfo, path: Path, *, title: str = "") -> None:
    import seaborn as sns
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(info.panels)
    fig = Figure(figsize=(4.6 * n, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (i, j) in zip(axes, info.panels, strict=True):
        rest = ~info.on_front
        sns.scatterplot(
            x=info.F[rest, i],
            y=info.F[rest, j],
            ax=ax,
            s=10,
            color="0.7",
            edgecolor=None,
            label="evaluated",
        )
        sns.scatterplot(
            x=info.F[info.on_front, i],
            y=info.F[info.on_front, j],
            ax=ax,
            s=22,
            color="tab:red",
            edgecolor="k",
            linewidth=0.3,
            label="non-dominated",
        )
        ax.set_xlabel(info.labels[i])
        ax.set_ylabel(info.labels[j])
        if "divergence" in info.labels[j] or "MSE" in info.labels[j]:
            # divergences span decades down to 0: log above 1e-3, linear below
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylim(bottom=0.0)
        if ax.get_legend_handles_labels()[0]:  # nothing evaluated yet: no legend
            ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    save_figure(fig, path, dpi=110)


def hv_info(n_evals: np.ndarray, hv: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(n_evals, hv, left_out)``: the points the HV figure draws. Leading generations of HV
    0 (the probes', before any point is inside the reference) would squash the axis so that
    the search's gains cannot be seen: they are left out (``left_out`` evaluations), unless
    every HV is 0."""
    n_evals, hv = np.asarray(n_evals), np.asarray(hv, dtype=float)
    first = int(np.argmax(hv > 0)) if (hv > 0).any() else 0
    return n_evals[first:], hv[first:], int(n_evals[first - 1]) if first else 0


def draw_hv(n_evals: np.ndarray, hv: np.ndarray, path: Path, *, title: str = "") -> None:
    import seaborn as sns
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x, y, left_out = hv_info(n_evals, hv)
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    sns.lineplot(x=x, y=y, ax=ax, marker="o", markersize=3)
    ax.set_xlabel("evaluations" + (f" (the first {left_out:,}: HV 0, not drawn)"
                                   if left_out else ""))
    ax.set_ylabel("hypervolume (normalised, ref = 1)")
    if title:
        ax.set_title(title)
    save_figure(fig, path, dpi=110)
