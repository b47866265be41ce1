"""`moecomp study`: run (or continue) an Optuna study over a problem's search settings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from moecomp.cli.device import checked_device, device_option
from moecomp.cli.workers import dask_scheduler_option, dask_workers_option, open_runner

if TYPE_CHECKING:  # imported lazily at run time: `moecomp --help` should not load Optuna
    from optuna import Study
    from rich.console import Console

    from moecomp.search.runner import Runner
    from moecomp.tune.config import StudyConfig
    from moecomp.tune.holdout import Holdout


def register(app: typer.Typer) -> None:
    @app.command("study")
    def _cmd(
        study_file: Path = typer.Argument(..., help="Study file (studies/*.toml)."),
        storage: str | None = typer.Option(
            None,
            "--storage",
            help="Optuna storage URL, e.g. postgresql://user@host/db "
            "(default: the study's, an SQLite file <output>/<name>.db).",
        ),
        n_trials: int | None = typer.Option(
            None,
            "--n-trials",
            min=0,
            help="Finished (COMPLETE + PRUNED) trials to reach; "
            "only the missing ones run (default: the study's n_trials).",
        ),
        timeout: float | None = typer.Option(
            None, "--timeout", min=0, help="Stop starting trials after this many seconds."
        ),
        report: bool = typer.Option(
            False,
            "--report",
            help="Write PNGs into <output>/<name>/report/, print the best parameters and "
            "their HV on held-out seeds next to the defaults' (run when missing).",
        ),
        holdout: bool = typer.Option(
            True,
            "--holdout/--no-holdout",
            help="With --report: run the best parameters and the defaults on the held-out "
            "seeds (cached in <output>/<name>/holdout.csv); --no-holdout skips them.",
        ),
        worker: int = typer.Option(
            0,
            "--worker",
            min=0,
            help="This worker's index when several run the study at "
            "once, so seeded samplers draw different points.",
        ),
        dask_workers: int = dask_workers_option(),
        dask_scheduler: str | None = dask_scheduler_option(),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
        device: str = device_option(),
    ) -> None:
        """Tune the search's hyper-parameters: each trial is a whole search at the study's
        evaluation budget per trial seed, its value the mean final hypervolume. Re-running
        continues the study; several workers may share one storage (PostgreSQL for many
        machines)."""
        from contextlib import ExitStack

        from rich.console import Console

        from moecomp.tune import load_study_config, run_study

        checked_device(device)
        console = Console()
        cfg = load_study_config(study_file)
        with ExitStack() as stack:
            runner = open_runner(stack, dask_scheduler, dask_workers)
            study = run_study(
                cfg,
                storage=storage,
                n_trials=n_trials,
                timeout=timeout,
                progress=progress,
                worker=worker,
                runner=runner,
                device=device,
            )
            _summary(console, study, cfg.storage_url if storage is None else storage)
            if report:
                _report(console, study, cfg, holdout=holdout, progress=progress, runner=runner,
                        device=device)


def _summary(console: Console, study: Study, storage: str) -> None:
    from optuna.trial import TrialState

    counts = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    line = ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n)
    console.print(f"study [bold]{study.study_name}[/] ({storage}): {line or 'no trials'}")
    if counts["COMPLETE"]:
        best = study.best_trial
        per_seed = best.user_attrs.get("hv_per_seed", [])
        what = f"mean over {len(per_seed)} seeds" if len(per_seed) > 1 else "one seed"
        console.print(
            f"best: trial {best.number}, HV {best.value:.5f} ({what}), trial folder "
            f"{best.user_attrs.get('run_dir')}"
        )


def _report(
    console: Console,
    study: Study,
    cfg: StudyConfig,
    *,
    holdout: bool,
    progress: bool,
    runner: Runner | None,
    device: str,
) -> None:
    from optuna.trial import TrialState
    from rich.table import Table

    from moecomp.tune.holdout import run_holdout
    from moecomp.tune.report import best_params_frame, write_report

    held: Holdout | None = None
    if holdout and study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        held = run_holdout(cfg, study, progress=progress, runner=runner, device=device)
    written = write_report(
        study,
        cfg.out_dir / "report",
        budget=cfg.budget.evaluations,
        report_steps=cfg.budget.report_steps,
        holdout=None if held is None else held.rows,
    )
    if not written:
        console.print("no finished trial yet: nothing to report")
        return
    if "importances" not in written:
        console.print(
            "parameter importances need two COMPLETE trials with different parameters: skipped"
        )
    if "best_hv" in written:
        frame = best_params_frame(study)
        table = Table(
            title=f"best parameters (trial {study.best_trial.number}, HV {study.best_value:.5f})"
        )
        table.add_column("parameter")
        table.add_column("value", justify="right")
        for name, value in zip(frame["parameter"], frame["value"], strict=True):
            table.add_row(str(name), f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(table)
    if held is not None:
        _holdout_table(console, held)
    elif not holdout:
        console.print("held-out seeds skipped (--no-holdout)")
    for path in written.values():
        console.print(f"wrote {path}")


def _holdout_table(console: Console, held: Holdout) -> None:
    from rich.table import Table

    s = held.summary
    n_runs = len(held.rows)
    table = Table(
        title=f"held-out seeds {', '.join(map(str, s['seeds']))} "
        f"({s['budget']} evaluations each; {held.ran} of {n_runs} searches run now)",
        caption=f"median ratio best/default {_num(s['median_ratio'])}, "
        f"Wilcoxon p {_num(s['p_value'])}",
    )
    table.add_column("parameters")
    table.add_column("median HV", justify="right")
    table.add_column("mean HV", justify="right")
    table.add_column("HV per seed", justify="right")
    names = {"best": f"best (trial {s['best_trial']})", "default": "defaults"}
    for key, name in names.items():
        values = s[key]
        table.add_row(
            name,
            f"{values['median']:.5f}",
            f"{values['mean']:.5f}",
            " ".join(f"{v:.4f}" for v in values["hv"]),
        )
    console.print(table)
    console.print(f"held-out verdict: {s['verdict']}")


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
