"""The report of a study: optimisation history, parameter importances, the HV history of
the best trial and, once run (:mod:`moecomp.tune.holdout`), the held-out comparison of the
best parameters with the defaults (seaborn PNGs in ``<output>/<study>/report/``), and the
best parameters.

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

from moecomp.atomic import save_figure
from moecomp.runs import RunFolder
from moecomp.tune.study import FINISHED, reported_value, trial_run_dirs

DPI = 130
STATE_COLOURS = {"COMPLETE": "#1f77b4", "PRUNED": "#ff7f0e"}
BEST_COLOUR = "#d62728"
SET_COLOURS = {"best": BEST_COLOUR, "default": "#1f77b4"}


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
    """The best trial's HV at every generation, from each seed's ``hv.csv``: ``seed``,
    ``gen``, ``n_evals`` (evaluations of the trial: seed k's search spans k * budget to
    (k + 1) * budget, its last generation drawn at the end of that span),
    ``seed_hv`` (that search's HV), ``hv`` (what the trial reports then: the mean of the
    finished seeds' final HVs and ``seed_hv``, see :class:`moecomp.tune.study.HVReporter`),
    ``elapsed_s``. With one seed, ``hv`` is the run's own hv.csv."""
    best = study.best_trial
    run_dir = best.user_attrs.get("run_dir")
    if run_dir is None:
        raise KeyError(f"trial {best.number} has no run_dir user attribute")
    seeds = best.user_attrs.get("seeds", [None])
    budget = study.user_attrs.get("budget", 0)
    parts: list[pd.DataFrame] = []
    finals: list[float] = []
    for index, (seed, folder) in enumerate(zip(seeds, trial_run_dirs(Path(run_dir), seeds),
                                               strict=True)):
        hv = RunFolder(folder).hv_history()
        hv.insert(0, "seed", seed)
        if budget:  # a study stored before its budget was recorded: one seed, as run
            hv["n_evals"] = hv["n_evals"].clip(upper=budget) + index * budget
        hv["seed_hv"] = hv["hv"]
        hv["hv"] = [reported_value(finals, v) for v in hv["seed_hv"]]
        finals.append(float(hv["seed_hv"].iloc[-1]))
        parts.append(hv)
    return pd.concat(parts, ignore_index=True)


def intermediate_info(study: optuna.Study, *, budget: int, report_steps: int) -> pd.DataFrame:
    """The HV every finished trial reported: ``number``, ``state``, ``n_evals`` (the report
    step in evaluations of the trial, over all its seeds), ``hv``; the context the best
    trial's curve is drawn against."""
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


def holdout_info(rows: pd.DataFrame) -> pd.DataFrame:
    """holdout.csv as the figure shows it: ``seed``, ``params_set`` (best, default), ``hv``,
    one row per run, by seed."""
    return rows[["seed", "params_set", "hv"]].sort_values(["seed", "params_set"]).reset_index(
        drop=True
    )


def best_params_frame(study: optuna.Study) -> pd.DataFrame:
    """``parameter``, ``value`` of the best trial, in the order they were suggested."""
    best = study.best_trial
    return pd.DataFrame({"parameter": list(best.params), "value": list(best.params.values())})


# --- drawing -------------------------------------------------------------------------------
def _save(fig: Figure, path: Path) -> Path:
    return save_figure(fig, path, dpi=DPI)


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
        # each seed's search ends at its budget (best_hv_info), where the next one starts
        starts = hv.groupby("seed", sort=False)["n_evals"].max().iloc[:-1]
        for i, x in enumerate(starts):
            ax.axvline(
                x, color="#616161", ls=":", lw=1, label="next seed starts" if i == 0 else None
            )
        if starts.empty:
            ax.set_xlabel("evaluations")
            ax.set_ylabel("hypervolume (normalised, higher is better)")
        else:
            ax.set_xlabel("evaluations of the trial (its seeds one after another)")
            ax.set_ylabel("HV: mean of the finished seeds' and the running seed's")
        ax.set_title(title)
        ax.legend(loc="lower right")
    return _save(fig, path)


def draw_holdout(info: pd.DataFrame, path: Path, *, title: str) -> Path:
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(8, 5), layout="constrained")
        ax = fig.subplots()
        labels = {"best": "best trial's parameters", "default": "defaults (problem file)"}
        for name, colour in SET_COLOURS.items():
            part = info[info["params_set"] == name]
            med = part["hv"].median()
            ax.plot(part["seed"].astype(str), part["hv"], color=colour, marker="o", ls="none",
                    markersize=7, label=f"{labels[name]}, median {med:.4f}")
            ax.axhline(med, color=colour, ls="--", lw=1)
        ax.set_xlabel("held-out search seed")
        ax.set_ylabel("final hypervolume (normalised, higher is better)")
        ax.set_title(title)
        ax.legend(loc="best")
    return _save(fig, path)


def write_report(
    study: optuna.Study,
    out_dir: str | os.PathLike[str],
    *,
    budget: int,
    report_steps: int,
    holdout: pd.DataFrame | None = None,
) -> dict[str, Path]:
    """Write the report's PNGs into ``out_dir``; returns name -> path of those written (the
    importances need two COMPLETE trials with varied parameters, the others one; the
    held-out figure needs ``holdout``, the rows of holdout.csv)."""
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
    if holdout is not None and not holdout.empty:
        written["holdout"] = draw_holdout(
            holdout_info(holdout),
            out / "holdout.png",
            title=f"{name}: held-out seeds, {budget} evaluations each",
        )
    return written
