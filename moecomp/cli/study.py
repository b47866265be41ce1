"""`moecomp study`: run (or continue) an Optuna study over a problem's search settings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from moecomp.cli.device import checked_device, device_option

if TYPE_CHECKING:  # imported lazily at run time: `moecomp --help` should not load Optuna
    from optuna import Study
    from rich.console import Console

    from moecomp.tune.config import StudyConfig


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
            help="Write PNGs into <output>/<name>/report/ and print the best parameters.",
        ),
        worker: int = typer.Option(
            0,
            "--worker",
            min=0,
            help="This worker's index when several run the study at "
            "once, so seeded samplers draw different points.",
        ),
        dask_workers: int = typer.Option(
            0,
            "--dask-workers",
            min=0,
            help="Evaluate each search on a local Dask cluster "
            "of this many processes (0: in this process).",
        ),
        dask_scheduler: str | None = typer.Option(
            None,
            "--dask-scheduler",
            help="Evaluate on a running Dask scheduler (tcp://host:8786) instead.",
        ),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
        device: str = device_option(),
    ) -> None:
        """Tune the search's hyper-parameters: each trial is a whole search at the study's
        evaluation budget, its value the final hypervolume. Re-running continues the study;
        several workers may share one storage (PostgreSQL for many machines)."""
        from contextlib import ExitStack

        from rich.console import Console

        from moecomp.search.dask_runner import DaskRunner
        from moecomp.search.runner import Runner
        from moecomp.tune import load_study_config, run_study

        checked_device(device)
        console = Console()
        cfg = load_study_config(study_file)
        with ExitStack() as stack:
            runner: Runner | None = None
            if dask_scheduler is not None or dask_workers > 0:
                runner = stack.enter_context(
                    DaskRunner(dask_scheduler, n_workers=max(dask_workers, 1))
                )
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
            _report(console, study, cfg)


def _summary(console: Console, study: Study, storage: str) -> None:
    from optuna.trial import TrialState

    counts = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    line = ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n)
    console.print(f"study [bold]{study.study_name}[/] ({storage}): {line or 'no trials'}")
    if counts["COMPLETE"]:
        best = study.best_trial
        console.print(
            f"best: trial {best.number}, HV {best.value:.5f}, run folder "
            f"{best.user_attrs.get('run_dir')}"
        )


def _report(console: Console, study: Study, cfg: StudyConfig) -> None:
    from rich.table import Table

    from moecomp.tune.report import best_params_frame, write_report

    written = write_report(
        study,
        cfg.out_dir / "report",
        budget=cfg.budget.evaluations,
        report_steps=cfg.budget.report_steps,
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
    for path in written.values():
        console.print(f"wrote {path}")
