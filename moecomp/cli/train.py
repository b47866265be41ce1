"""`moecomp train PROBLEM`: train (or reuse) the teacher of a zoo problem."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from moecomp.config import load_problem
from moecomp.train import teacher_paths, train_teacher


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        problem: Path = typer.Argument(
            ..., help="Problem TOML file, e.g. problems/digits-mlp.toml"),
        force: bool = typer.Option(False, "--force", help="Train again even if weights exist."),
    ) -> None:
        """Train the problem's teacher with its fixed seed; store safetensors + a JSON record."""
        cfg = load_problem(problem)
        _, record = train_teacher(cfg, force=force)
        weights, rec = teacher_paths(cfg)
        Console().print(
            f"[bold]{cfg.name}[/]: test accuracy {record['test_accuracy']:.2f} %, "
            f"{record['n_params']:,} parameters, {record['epochs']} epochs, "
            f"seed {record['seed']}\nweights: {weights}\nrecord:  {rec}"
        )
