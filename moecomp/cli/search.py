"""`moecomp search PROBLEM`: search the Pareto front of per-layer sparsity and bits."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import typer

from moecomp.cli.device import checked_device, device_option
from moecomp.cli.interrupted import exit_interrupted
from moecomp.cli.workers import dask_scheduler_option, dask_workers_option, open_runner
from moecomp.errors import ConfigError

ALGORITHMS = ("nsga2", "nsga3", "spea2", "moead", "age")
OPERATORS = ("de", "default")


def read_params(source: str | os.PathLike[str]) -> dict[str, Any]:
    """SearchConfig overrides: from a JSON file (an object of SearchConfig fields, at the top
    level or under ``"search"`` / ``"params"``), or the best trial of an Optuna study (a
    study ``.toml``, an SQLite ``.db`` or a storage URL)."""
    source = os.fspath(source)
    if not source.endswith(".json"):
        from moecomp.tune import best_params

        return best_params(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError("--params-from", f"no such file: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("--params-from", f"{path} is not valid JSON: {e}") from None
    if isinstance(raw, dict):
        for key in ("search", "params"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
    if not isinstance(raw, dict):
        raise ConfigError("--params-from", f"{path} must hold a JSON object of search settings")
    return raw


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search(
        problem: Path = typer.Argument(
            ..., help="Problem TOML file, e.g. problems/digits-mlp.toml"
        ),
        out: Path | None = typer.Option(
            None,
            "--out",
            help="Run folder to write (default runs/<problem name>); refused if "
            "it already holds something, unless --resume.",
        ),
        budget: int | None = typer.Option(
            None, "--budget", min=1, help="Evaluations (default: the problem's search.budget)."
        ),
        algorithm: str | None = typer.Option(
            None, "--algorithm", help=f"One of {', '.join(ALGORITHMS)}."
        ),
        resume: bool = typer.Option(
            False,
            "--resume",
            help="Continue the run in --out from "
            "its checkpoint (same problem config; the budget may grow).",
        ),
        seed: int | None = typer.Option(None, "--seed", help="Random seed of the search."),
        pop_size: int | None = typer.Option(None, "--pop-size", min=4, help="Population size."),
        operators: str | None = typer.Option(
            None,
            "--operators",
            help="de (sensitivity sampling, directed mutation, layer-wise "
            "crossover) or default (pymoo's integer SBX/PM).",
        ),
        params_from: str | None = typer.Option(
            None,
            "--params-from",
            help="Tuned settings: a study .toml/.db/URL (its best trial) or a JSON file.",
        ),
        time_budget: float | None = typer.Option(
            None, "--time-budget",
            help="Seconds for this call, set-up included: no generation starts after them "
            "(status 'time budget'); --resume continues.",
        ),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
        device: str = device_option(),
        dask_workers: int = dask_workers_option(),
        dask_scheduler: str | None = dask_scheduler_option(),
    ) -> None:
        """Search the Pareto front (density, bits, divergence) of a problem with pymoo."""
        from contextlib import ExitStack

        from rich.console import Console

        from moecomp.config import load_problem
        from moecomp.search import run_search
        from moecomp.search.run import Terminated, sigterm_raises

        checked_device(device)
        if time_budget is not None and not (math.isfinite(time_budget) and time_budget > 0):
            raise ConfigError("--time-budget", f"must be > 0 seconds, got {time_budget:g}")
        cfg = load_problem(problem)
        params: dict[str, Any] = read_params(params_from) if params_from is not None else {}
        if algorithm is not None and algorithm not in ALGORITHMS:
            raise ConfigError(
                "--algorithm", f"must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}"
            )
        if operators is not None and operators not in OPERATORS:
            raise ConfigError(
                "--operators", f"must be one of {', '.join(OPERATORS)}, got {operators!r}"
            )
        for key, value in (("seed", seed), ("pop_size", pop_size), ("operators", operators)):
            if value is not None:
                params[key] = value
        out_dir = out if out is not None else Path("runs") / cfg.name
        try:
            with sigterm_raises(), ExitStack() as stack:
                runner = open_runner(stack, dask_scheduler, dask_workers)
                result = run_search(
                    cfg,
                    out_dir,
                    budget=budget,
                    algorithm=algorithm,
                    resume=resume,
                    progress=not no_progress,
                    params=params,
                    device=device,
                    time_budget=time_budget,
                    runner=runner,
                )
        except (KeyboardInterrupt, Terminated) as e:
            exit_interrupted(e, "search", f"{out_dir}/search.json says 'interrupted', continue "
                             f"with: moecomp search {problem} --out {out_dir} --resume")
        Console().print(
            f"[bold]{cfg.name}[/]: {result.status}, {result.n_evals:,} evaluations in "
            f"{result.n_gen} generations, {result.elapsed_s:.1f} s\n"
            f"final hypervolume {result.hv:.5f}, front of {len(result.front)} solutions\n"
            f"run folder: {result.out_dir}  (front.csv, evaluated.csv, hv.csv, search.json, "
            f"plots/)"
        )
        if result.status == "time budget":
            Console().print(f"the time budget ran out; continue with: moecomp search {problem} "
                            f"--out {out_dir} --resume", soft_wrap=True)
