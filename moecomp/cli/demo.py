"""`moecomp demo`: the whole pipeline on the embedded default (digits)."""

from __future__ import annotations

from pathlib import Path

import typer

from moecomp.demo import run_demo


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder to write."),
        budget: int | None = typer.Option(None, "--budget",
                                          help="Evaluations (default: the problem file's)."),
        fresh: bool = typer.Option(False, "--fresh", help="Delete an earlier demo run first."),
        compare: bool = typer.Option(True, "--compare/--no-compare",
                                     help="Run the single-objective DE baseline too."),
    ) -> None:
        """Train, search, pick, refine, export, decode and verify on scikit-learn's digits."""
        run_demo(out, budget=budget, fresh=fresh, compare=compare)
