"""`moecomp report RUN`: write the run's Markdown and HTML report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run: Path = typer.Argument(..., help="Run folder written by `moecomp search`."),
        plots: bool = typer.Option(
            True, "--plots/--no-plots", help="Draw the figures again before writing."
        ),
    ) -> None:
        """Write RUN/report.md and a self-contained RUN/report.html (figures embedded)."""
        from moecomp.report import REPORT_HTML, write_report

        md = write_report(run, plots=plots)
        c = Console()
        c.print(f"report: {md}")
        c.print(f"html:   {md.with_name(REPORT_HTML)}")
