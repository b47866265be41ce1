"""`moecomp compare RUN --baseline de|tpe|optuna-nsga2|random|nsga2-default|moead`: the
run's front against the Directed Evolution baseline or a peer search at equal evaluation
budget (hypervolume, dominance, a table and a figure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from moecomp.cli.device import checked_device, device_option
from moecomp.errors import ConfigError

BASELINE_HELP = (
    "What to compare with: de (single-objective Directed Evolution at target sparsities), "
    "or a peer search on the same genes: tpe (Optuna TPE), optuna-nsga2, random, "
    "nsga2-default (pymoo's NSGA-II with its integer defaults, no surrogate), moead."
)


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
        baseline: str = typer.Option("de", "--baseline", help=BASELINE_HELP),
        targets: str | None = typer.Option(
            None,
            "--targets",
            help="de only: comma-separated target sparsities (default 0.5,0.7,0.8,0.9,0.95).",
        ),
        budget: int | None = typer.Option(
            None,
            "--budget",
            min=1,
            help="Evaluations of the baseline (de: split over the targets); default the "
            "run's own.",
        ),
        seed: int | None = typer.Option(
            None, "--seed", help="Baseline seed (default: the run's search seed)."
        ),
        device: str = device_option(),
        no_plot: bool = typer.Option(False, "--no-plot", help="Do not draw the figure."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ) -> None:
        """Run the baseline with the run's budget; print and write the comparison."""
        from rich import box
        from rich.console import Console
        from rich.table import Table

        from moecomp.baseline import DEConfig
        from moecomp.baseline.peers import PEERS
        from moecomp.compare import BASELINES, DEFAULT_TARGETS, compare_with_de
        from moecomp.compare_peer import compare_with_peer
        from moecomp.runs import RunFolder, metric_info

        if baseline not in BASELINES + PEERS:
            raise ConfigError(
                "--baseline", f"must be one of {', '.join(BASELINES + PEERS)}; got {baseline!r}"
            )
        if targets is not None and baseline != "de":
            raise ConfigError("--targets", f"applies to --baseline de only, not {baseline!r}")
        checked_device(device)
        console = Console()
        if baseline != "de":
            result = compare_with_peer(
                run, baseline, budget=budget, seed=seed, plot=not no_plot,
                progress=not no_progress, device=device,
            )
            console.print(
                f"[bold]{run}[/]: search front vs {result.label}; objectives "
                f"(minimised): {', '.join(result.space.names)}"
            )
            _print_summary(console, result.summary)
            dominated = int(result.de["dominated_by_front"].sum())
            console.print(
                f"{result.label}: {len(result.de)} front points, {dominated} of them "
                "dominated by the search front"
            )
            for name, path in result.files.items():
                console.print(f"{name}: {path}", soft_wrap=True)
            return
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

        console.print(
            f"[bold]{run}[/]: search front vs Directed Evolution; objectives "
            f"(minimised): {', '.join(result.space.names)}"
        )
        _print_summary(console, result.summary)

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


def _print_summary(console: Any, frame: Any) -> None:
    """The summary table (one row per method) and what its dominance columns mean."""
    from rich import box
    from rich.table import Table

    summary = Table(box=box.SIMPLE_HEAD)
    for col in ("method", "points", "budget", "evals", "hypervolume", "dominates", "dominated"):
        # a long method name wraps; the numbers never do
        summary.add_column(col, justify="left" if col == "method" else "right",
                           no_wrap=col != "method", ratio=1 if col == "method" else None)
    for _, r in frame.iterrows():
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
