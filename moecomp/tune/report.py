"""The report of a study: optimisation history, parameter importances and the HV history of
the best trial (seaborn PNGs in ``<output>/<study>/report/``), and the best parameters.

Info first, drawing second (as in :mod:`moecomp.plots`): each ``*_info`` function reduces the
study to the small frame a figure shows, and tests check those; each ``draw_*`` function only
draws. Figures are ``matplotlib.figure.Figure`` objects (no pyplot state, no GUI backend).
"""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.trial import TrialState

from moecomp.runs import RunFolder
from moecomp.tune.study import FINISHED

DPI = 130
STATE_COLOURS = {"COMPLETE": "#1f77b4", "PRUNED": "#ff7f0e"}
BEST_COLOUR = "#d62728"


# --- info ----------------------------------------------------------------------------------
def history_info(study: optuna.Study) -> pd.DataFrame:
    """One row per finished trial, in trial order: ``number``, ``state`` (COMPLETE/PRUNED),
    ``value`` (final HV; for a pruned trial its last reported HV), ``best`` (best COMPLETE
    value so far, NaN before the first)."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        if t.state == TrialState.COMPLETE:
            value = t.value
        elif t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        else:
            continue  # pruned before its first report: nothing to draw
        rows.append({"number": t.number, "state": t.state.name, "value": value})
    df = pd.DataFrame(rows, columns=["number", "state", "value"])
    complete = df["value"].where(df["state"] == "COMPLETE")
    # carried through pruned trials, so the line has no gaps; NaN before the first COMPLETE
    df["best"] = complete.cummax().ffill()
    return df.sort_values("number").reset_index(drop=True)


def importance_info(study: optuna.Study, *, seed: int = 0) -> pd.Series:
    """Parameter -> importance (fANOVA, sums to 1), largest first. Empty when fewer than two
    COMPLETE trials or no parameter varied (there is nothing to attribute)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = {
        k for t in complete for k in t.params if len({str(u.params.get(k)) for u in complete}) > 1
    }
    if len(complete) < 2 or not varied:
        return pd.Series(dtype=float, name="importance")
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    imp = optuna.importance.get_param_importances(study, evaluator=evaluator, params=sorted(varied))
    return pd.Series(imp, name="importance", dtype=float).sort_values(ascending=False)


def best_hv_info(study: optuna.Study) -> pd.DataFrame:
    """The best trial's ``hv.csv`` (gen, n_evals, hv, elapsed_s) from its run folder."""
    best = study.best_trial
    run_dir = best.user_attrs.get("run_dir")
    if run_dir is None:
        raise KeyError(f"trial {best.number} has no run_dir user attribute")
    return RunFolder(run_dir).hv_history()


def intermediate_info(study: optuna.Study, *, budget: int, report_steps: int) -> pd.DataFrame:
    """The HV every finished trial reported: ``number``, ``state``, ``n_evals`` (the report
    step in evaluations), ``hv``; the context the best trial's curve is drawn against."""
    rows = [
        {
            "number": t.number,
            "state": t.state.name,
            "n_evals": step * budget / report_steps,
            "hv": hv,
        }
        for t in study.get_trials(deepcopy=False, states=FINISHED)
        for step, hv in sorted(t.intermediate_values.items())
    ]
    return pd.DataFrame(rows, columns=["number", "state", "n_evals", "hv"])


def best_params_frame(study: optuna.Study) -> pd.DataFrame:
    """``parameter``, ``value`` of the best trial, in the order they were suggested."""
    best = study.best_trial
    return pd.DataFrame({"parameter": list(best.params), "value": list(best.params.values())})


# --- drawing -------------------------------------------------------------------------------
def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, path)
    return path


def draw_history(info: pd.DataFrame, path: Path, *, title: str) -> Path:
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(8, 5), layout="constrained")
        ax = fig.subplots()
        for state, colour in STATE_COLOURS.items():
            part = info[info["state"] == state]
            if len(part):
                label = "COMPLETE (final HV)" if state == "COMPLETE" else "PRUNED (last HV)"
                ax.scatter(
                    part["number"],
                    part["value"],
                    color=colour,
                    s=30,
                    alpha=0.85,
                    label=label,
                    zorder=3,
                )
        if info["best"].notna().any():
            ax.step(
                info["number"],
                info["best"],
                where="post",
                color=BEST_COLOUR,
                label="best so far",
                zorder=2,
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trial number")
        ax.set_ylabel("hypervolume (normalised, higher is better)")
        ax.set_title(title)
        ax.legend(loc="lower right")
    return _save(fig, path)


def draw_importances(info: pd.Series, path: Path, *, title: str) -> Path:
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(8, 0.5 * max(len(info), 2) + 1.6), layout="constrained")
        ax = fig.subplots()
        frame = pd.DataFrame({"parameter": info.index, "importance": info.to_numpy()})
        sns.barplot(
            data=frame,
            y="parameter",
            x="importance",
            ax=ax,
            color="#1f77b4",
            label="fANOVA importance",
        )
        ax.set_xlabel("importance for the final HV (share, sums to 1)")
        ax.set_ylabel("search parameter")
        ax.set_title(title)
        ax.legend(loc="lower right")
    return _save(fig, path)


def draw_best_hv(
    hv: pd.DataFrame, others: pd.DataFrame, path: Path, *, title: str, best_number: int
) -> Path:
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(8, 5), layout="constrained")
        ax = fig.subplots()
        first = True
        for _, part in others[others["number"] != best_number].groupby("number"):
            ax.plot(
                part["n_evals"],
                part["hv"],
                color="#9e9e9e",
                alpha=0.45,
                lw=1,
                label="other trials (reported HV)" if first else None,
            )
            first = False
        ax.plot(
            hv["n_evals"],
            hv["hv"],
            color=BEST_COLOUR,
            marker="o",
            markersize=3,
            lw=1.8,
            label=f"best trial {best_number} (every generation)",
        )
        ax.set_xlabel("evaluations")
        ax.set_ylabel("hypervolume (normalised, higher is better)")
        ax.set_title(title)
        ax.legend(loc="lower right")
    return _save(fig, path)


def write_report(
    study: optuna.Study, out_dir: str | os.PathLike[str], *, budget: int, report_steps: int
) -> dict[str, Path]:
    """Write the report's PNGs into ``out_dir``; returns name -> path of those written (the
    importances need two COMPLETE trials with varied parameters, the others one)."""
    out = Path(out_dir)
    name = study.study_name
    written: dict[str, Path] = {}
    history = history_info(study)
    if history.empty:
        return written
    written["history"] = draw_history(
        history, out / "history.png", title=f"{name}: optimisation history"
    )
    importances = importance_info(study)
    if not importances.empty:
        written["importances"] = draw_importances(
            importances,
            out / "importances.png",
            title=f"{name}\nparameter importances, "
            f"{int((history['state'] == 'COMPLETE').sum())} complete trials",
        )
    if history["best"].notna().any():
        best = study.best_trial
        written["best_hv"] = draw_best_hv(
            best_hv_info(study),
            intermediate_info(study, budget=budget, report_steps=report_steps),
            out / "best_hv.png",
            best_number=best.number,
            title=f"{name}: HV history of the best trial ({best.value:.4f})",
        )
    return written
