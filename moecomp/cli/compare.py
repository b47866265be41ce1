"""`moecomp compare RUN --baseline de`: the run's front against the Directed Evolution
baseline at equal evaluation budget (hypervolume, dominance, a table and a figure)."""

from __future__ import annotations

from pathlib import Path

import typer

from moecomp.errors import ConfigError


def parse_targets(text: str) -> tuple[float, ...]:
    """``"0.5,0.7,0.9"`` -> ``(0.5, 0.7, 0.9)``; a bad entry is a ConfigError naming it."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise ConfigError(
                "--targets", f"{part!r} is not a number; give sparsities like 0.5,0.7,0.9"
            ) from None
    if not out:
        raise ConfigError("--targets", "give at least one sparsity, e.g. 0.5,0.7,0.9")
    return tuple(out)


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare(
        run: Path = typer.Argument(..., help="Run folder written by `moecomp search`."),
        baseline: str = typer.Option(
            "de", "--baseline", help="Baseline to compare with: de (Directed Evolution)."
        ),
        targets: str | None = typer.Option(
            None,
            "--targets",
            help="Comma-separated target sparsities of the DE (default 0.5,0.7,0.8,0.9,0.95).",
        ),
        budget: int | None = typer.Option(
            None,
            "--budget",
            min=1,
            help="Total DE evaluations, split over the targets (default: the run's own).",
        ),
        seed: int | None = typer.Option(
            None, "--seed", help="DE seed (default: the run's search seed)."
        ),
        no_plot: bool = typer.Option(False, "--no-plot", help="Do not draw the figure."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ) -> None:
        """Run the DE baseline with the run's budget; print and write the comparison."""
        from rich import box
        from rich.console import Console
        from rich.table import Table

        from moecomp.baseline import DEConfig
        from moecomp.compare import BASELINES, DEFAULT_TARGETS, compare_with_de
        from moecomp.runs import RunFolder, metric_info

        if baseline not in BASELINES:
            raise ConfigError(
                "--baseline", f"must be one of {', '.join(BASELINES)}; got {baseline!r}"
            )
        chosen = parse_targets(targets) if targets is not None else DEFAULT_TARGETS
        config = None
        if seed is not None:
            config = DEConfig(seed=seed)
        result = compare_with_de(
            run,
            targets=chosen,
            budget=budget,
            config=config,
            plot=not no_plot,
            progress=not no_progress,
        )

        console = Console()
        console.print(
            f"[bold]{run}[/]: search front vs Directed Evolution; objectives "
            f"(minimised): {', '.join(result.space.names)}"
        )
        summary = Table(box=box.SIMPLE_HEAD)
        for col in ("method", "points", "budget", "evals", "hypervolume", "dominates", "dominated"):
            summary.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
        for _, r in result.summary.iterrows():
            summary.add_row(
                str(r["method"]),
                f"{int(r['points'])}",
                f"{int(r['budget'])}",
                f"{int(r['evaluations'])}",
                f"{r['hv']:.4f}",
                f"{int(r['dominates'])}",
                f"{int(r['dominated'])}",
            )
        console.print(summary)
        console.print(
            "dominates: points of the other method it dominates; dominated: its own "
            "points the other dominates",
            style="dim",
        )

        de = result.de
        metric = metric_info(RunFolder(run))
        # one space between columns, so the table fits an 80-column terminal
        points = Table(
            title="DE points", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
        )
        # (header, column, format)
        cols = [
            ("target", "target_sparsity", "{:.0%}"),
            ("evals", "evals", "{}"),
            ("density", "density", "{:.4f}"),
            ("bits", "bits", "{:.2f}"),
            ("divergence", "divergence", "{:.4g}"),
            ("ratio", "ratio", "{:.1f}x"),
        ]
        if metric is not None:
            fmt = "{:.2f}" if metric.percent else "{:.4g}"
            # named below the table: a metric's name does not fit an 80-column header
            cols += [("metric", "metric", fmt), ("drop", "metric_drop", fmt)]
        if not de["feasible"].all():
            cols.append(("feasible", "feasible", "{}"))
        for header, _, _ in cols:
            points.add_column(header, justify="right", no_wrap=True)
        points.add_column("dominated", justify="right", no_wrap=True)
        for _, r in de.iterrows():
            cells = [fmt.format(r[c]) for _, c, fmt in cols]
            points.add_row(*cells, "yes" if bool(r["dominated_by_front"]) else "no")
        console.print(points)
        console.print(
            "dominated: whether a point of the search front dominates the DE point", style="dim"
        )
        if metric is None:
            console.print("no task metric: the points are measured by divergence alone",
                          style="dim")
        else:
            unit = f" in {metric.drop_unit}" if metric.drop_unit else ""
            console.print(f"metric: {metric.label}; drop: from the teacher's{unit}; both on the "
                          "calibration set", style="dim")
        for name, path in result.files.items():
            console.print(f"{name}: {path}", soft_wrap=True)
