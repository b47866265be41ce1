"""Held-out seeds: the best trial's parameters against the problem's defaults, on search
seeds no trial ran, at the study's budget.

A study picks the parameters whose mean HV over its trial seeds is highest; that mean is
biased upward (the best of many noisy trials), and parameters can fit the trial seeds. The
held-out comparison runs both parameter sets once per held-out seed (``holdout.seeds``)
and says which is better there::

    <output>/<study>/holdout/<best|default>-seed-<seed>/   the run folders
    <output>/<study>/holdout.csv    params_set, seed, hv, n_evals, seconds, budget, trial,
                                    params (JSON of every search field but the seed)
    <output>/<study>/holdout.json   medians, means, per-seed ratio best/default, p-value,
                                    winner and verdict

``holdout.csv`` is the cache: a (set, seed) whose row has the same budget and parameters is
not run again, so an interrupted comparison continues where it stopped, and a study whose
best trial changed runs only the best parameters again; a search interrupted midway
continues from its checkpoint. "default" is the problem file's
``[search]`` table as it is: the parameters a user gets without the study.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import scipy.stats
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moecomp.config import ProblemConfig
from moecomp.errors import RunError
from moecomp.runs import atomic_write_csv, atomic_write_text
from moecomp.search import SearchProblem, build_problem, run_search
from moecomp.search.run import SearchResult
from moecomp.search.runner import Runner
from moecomp.tune.config import StudyConfig
from moecomp.tune.study import search_fields

HOLDOUT_CSV = "holdout.csv"
HOLDOUT_JSON = "holdout.json"
SETS = ("best", "default")
COLUMNS = ["params_set", "seed", "hv", "n_evals", "seconds", "budget", "trial", "params"]
# A paired test on fewer seeds says nothing: with 5 pairs the smallest two-sided Wilcoxon
# p-value is already 2/32 = 0.0625, so 6 seeds are needed for p < 0.05.
MIN_SEEDS_FOR_TEST = 5
ALPHA = 0.05


@dataclass(frozen=True)
class Holdout:
    """The comparison: ``rows`` (holdout.csv, one row per set and seed), ``summary`` (what
    holdout.json holds) and ``ran``, the searches this call ran (0: all were cached)."""

    rows: pd.DataFrame
    summary: dict[str, Any]
    ran: int


@dataclass(frozen=True)
class _Planned:
    params_set: str
    seed: int
    params: dict[str, Any]  # every search field but the seed and the budget
    trial: int | None

    @property
    def key(self) -> str:
        return json.dumps(self.params, sort_keys=True)


def holdout_dir(cfg: StudyConfig) -> Path:
    return cfg.out_dir / "holdout"


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise RunError(f"study {study.study_name!r} has no COMPLETE trial: nothing to hold out")
    return study.best_trial


def _plan(
    cfg: StudyConfig, problem: ProblemConfig, best: optuna.trial.FrozenTrial
) -> list[_Planned]:
    defaults = {k: v for k, v in search_fields(problem).items() if k != "seed"}
    sets = {"best": ({**defaults, **best.params}, best.number), "default": (defaults, None)}
    return [
        _Planned(name, seed, params, trial)
        for seed in cfg.holdout_seeds(problem)
        for name, (params, trial) in sets.items()
    ]


def read_rows(cfg: StudyConfig) -> pd.DataFrame:
    """holdout.csv (empty, with its columns, before the first run)."""
    path = cfg.out_dir / HOLDOUT_CSV
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(path, dtype={"params": str, "trial": "Int64"})


def _cached(rows: pd.DataFrame, run: _Planned, budget: int) -> pd.Series | None:
    hit = rows[
        (rows["params_set"] == run.params_set)
        & (rows["seed"] == run.seed)
        & (rows["budget"] == budget)
        & (rows["params"] == run.key)
    ]
    return None if hit.empty else hit.iloc[-1]


def compare(rows: pd.DataFrame, *, seeds: tuple[int, ...]) -> dict[str, Any]:
    """The verdict from one row per set and seed (``params_set``, ``seed``, ``hv``): per set
    the HVs in seed order, their median and mean; the ratio best/default per seed (None where
    the default's HV is 0); the two-sided Wilcoxon signed-rank p-value, paired by seed (None
    with fewer than ``MIN_SEEDS_FOR_TEST`` seeds); the set with the higher median
    (``winner``: best, default or tie) and a one-line ``verdict``."""
    hv = {
        name: [float(rows[(rows["params_set"] == name) & (rows["seed"] == s)]["hv"].iloc[0])
               for s in seeds]
        for name in SETS
    }
    best, default = hv["best"], hv["default"]
    ratios = [b / d if d > 0 else None for b, d in zip(best, default, strict=True)]
    p_value: float | None = None
    if len(seeds) >= MIN_SEEDS_FOR_TEST:
        diffs = [b - d for b, d in zip(best, default, strict=True)]
        if all(d == 0 for d in diffs):
            p_value = 1.0  # scipy divides by zero here; identical results: no difference
        else:
            # zsplit keeps tied seeds in the ranks (the default drops them, and with them
            # the exact distribution)
            p_value = float(scipy.stats.wilcoxon(diffs, zero_method="zsplit").pvalue)
    med_best, med_default = statistics.median(best), statistics.median(default)
    winner = "best" if med_best > med_default else "default" if med_best < med_default else "tie"
    if p_value is None:
        verdict = (
            f"{_winner_words(winner)} on the median of {len(seeds)} held-out seeds; "
            f"no test with fewer than {MIN_SEEDS_FOR_TEST} seeds"
        )
    elif p_value < ALPHA and winner != "tie":
        verdict = f"{_winner_words(winner)} (Wilcoxon p = {p_value:.3g} < {ALPHA})"
    else:
        verdict = (
            f"no clear winner (Wilcoxon p = {p_value:.3g}); {_winner_words(winner)} on the median"
        )
    good = [r for r in ratios if r is not None]
    return {
        "seeds": list(seeds),
        **{
            name: {
                "hv": values,
                "median": statistics.median(values),
                "mean": statistics.fmean(values),
            }
            for name, values in hv.items()
        },
        "ratio_per_seed": ratios,
        "median_ratio": statistics.median(good) if good else None,
        "test": "Wilcoxon signed-rank, two-sided, paired by seed",
        "p_value": p_value,
        "winner": winner,
        "verdict": verdict,
    }


def _winner_words(winner: str) -> str:
    return {
        "best": "the best parameters win",
        "default": "the defaults win",
        "tie": "the two sets tie",
    }[winner]


def run_holdout(
    cfg: StudyConfig,
    study: optuna.Study,
    *,
    progress: bool = True,
    runner: Runner | None = None,
    device: str = "auto",
) -> Holdout:
    """Run the best trial's parameters and the defaults on every held-out seed (the runs
    holdout.csv lacks), then write holdout.csv and holdout.json. RunError when the study has
    no COMPLETE trial."""
    problem = cfg.load_problem()
    best = _best_trial(study)
    budget = cfg.budget.evaluations
    plan = _plan(cfg, problem, best)
    stored = read_rows(cfg)
    rows: list[dict[str, Any]] = []
    missing: list[_Planned] = []
    for run in plan:
        hit = _cached(stored, run, budget)
        if hit is None:
            missing.append(run)
        else:
            rows.append({**{c: hit[c] for c in COLUMNS}, "trial": run.trial})
    built: SearchProblem | None = None
    with _progress(progress, n_runs=len(missing), budget=budget) as show:
        for run in missing:
            if built is None:  # once, and only when something runs
                built = build_problem(problem, runner=runner, device=device)
            rows.append(_run_one(cfg, built, run, budget=budget, on_generation=show(run)))
            _write_rows(cfg, rows)  # after every run: an interrupted comparison keeps it
    frame = _write_rows(cfg, rows)
    summary = {
        "study": cfg.name,
        "budget": budget,
        "best_trial": best.number,
        "best_trial_value": best.value,
        "best_params": best.params,
        **compare(frame, seeds=cfg.holdout_seeds(problem)),
    }
    atomic_write_text(cfg.out_dir / HOLDOUT_JSON, json.dumps(summary, indent=2))
    return Holdout(rows=frame, summary=summary, ran=len(missing))


def _run_one(
    cfg: StudyConfig,
    built: SearchProblem,
    run: _Planned,
    *,
    budget: int,
    on_generation: Callable[[int, int, float], None],
) -> dict[str, Any]:
    out = holdout_dir(cfg) / f"{run.params_set}-seed-{run.seed}"
    t0 = time.perf_counter()

    def search(resume: bool) -> SearchResult:
        return run_search(
            built,
            out,
            budget=budget,
            params={**run.params, "seed": run.seed},
            progress=False,
            on_generation=on_generation,
            plots=False,
            resume=resume,
        )

    try:
        # an interrupted run of the same parameters continues from its checkpoint
        result = search(resume=out.exists())
    except RunError:
        # a run of other parameters (the best trial changed): start again
        shutil.rmtree(out)
        result = search(resume=False)
    if not math.isfinite(result.hv):
        raise RunError(f"{out}: hypervolume is {result.hv}; the search must give a finite HV")
    return {
        "params_set": run.params_set,
        "seed": run.seed,
        "hv": float(result.hv),
        "n_evals": int(result.n_evals),
        "seconds": round(time.perf_counter() - t0, 2),
        "budget": budget,
        "trial": run.trial,
        "params": run.key,
    }


def _write_rows(cfg: StudyConfig, rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=COLUMNS).astype({"trial": "Int64"})
    order = frame["params_set"].map({name: i for i, name in enumerate(SETS)})
    frame = frame.assign(_order=order).sort_values(["_order", "seed"])
    frame = frame.drop(columns="_order").reset_index(drop=True)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(cfg.out_dir / HOLDOUT_CSV, frame)
    return frame


@contextmanager
def _progress(
    enabled: bool, *, n_runs: int, budget: int
) -> Iterator[Callable[[_Planned], Callable[[int, int, float], None]]]:
    """Rich progress over the held-out runs; yields ``show(run)``, which starts a run's bar
    and returns its ``on_generation`` callback."""
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        disable=not enabled or n_runs == 0,
    )
    runs = bars.add_task("held-out runs", total=n_runs, info="")
    current = bars.add_task("run", total=budget, info="", visible=False)
    started = 0

    def show(run: _Planned) -> Callable[[int, int, float], None]:
        nonlocal started
        bars.update(runs, completed=started)
        started += 1
        bars.reset(current, total=budget, description=f"{run.params_set} seed {run.seed}",
                   info="", visible=True)

        def on_generation(_gen: int, n_evals: int, hv: float) -> None:
            bars.update(current, completed=min(n_evals, budget), info=f"HV {hv:.4f}")

        return on_generation

    with bars:
        yield show
        bars.update(runs, completed=started)
