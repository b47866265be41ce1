"""`moecomp pick RUN`: choose solutions from a run's front (bounds checked on the validation
split), re-evaluate them on held-out data, append them to picks.csv and draw the figures."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from moecomp.errors import ConfigError


def parse_weights(text: str) -> list[float]:
    """``"1,1,4"`` -> ``[1.0, 1.0, 4.0]``; a malformed list is a ConfigError on --weights."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            "--weights", f"must be numbers separated by commas, e.g. 1,1,4; got {text!r}"
        ) from None


def picks_table(picks: pd.DataFrame, metric: str = "accuracy", unit: str = "%") -> Table:
    """The picks as a rich table (fits 100 columns): rule, ratio, objectives, and the metric
    (drop from the teacher) on the calibration, validation and test data; without a metric
    (``metric = "none"``), the divergence on each split."""
    cols: list[tuple[str, str, str | None]]
    if metric == "none":
        cols = [("calib", "divergence", None), ("val", "val_divergence", None),
                ("test", "test_divergence", None)]
    else:
        cols = [("calib", "metric", "metric_drop"), ("val", "val_metric", "val_drop"),
                ("test", "test_metric", "test_drop")]
    splits = [c for c in cols if c[1] in picks.columns]
    number = f" (pick {int(picks['pick'].iloc[0])})" if "pick" in picks.columns else ""
    table = Table(title="picks" + number, box=box.SIMPLE_HEAD)
    table.add_column("id", justify="right")
    table.add_column("rule")
    for header in ("ratio", "density", "bits", "diverg."):
        table.add_column(header, justify="right")
    for name, _, d in splits:
        what = "diverg." if d is None else (unit or metric[:8])
        table.add_column(f"{name} {what}" + (" (drop)" if d else ""), justify="right")

    def cell(row: pd.Series, a: str, d: str | None) -> str:
        return f"{row[a]:.3g}" if d is None else f"{row[a]:.1f} ({row[d]:+.1f})"

    for _, row in picks.iterrows():
        table.add_row(
            str(int(row["id"])),
            str(row["rule"]).split(" within ")[0],
            f"{row['ratio']:.1f}x",
            f"{row['density']:.3f}",
            f"{row['bits']:.2f}",
            f"{row['divergence']:.3g}",
            *[cell(row, a, d) for _, a, d in splits],
        )
    return table


def register(app: typer.Typer) -> None:
    @app.command("pick")
    def pick(
        run: Path = typer.Argument(..., help="Run folder written by `moecomp search`."),
        max_drop: float | None = typer.Option(
            None, "--max-drop",
            help="Max drop of the metric from the teacher's (its units, points for accuracy), "
            "on the validation split.",
        ),
        max_divergence: float | None = typer.Option(
            None, "--max-divergence", help="Max divergence (e.g. KL nats), on the validation "
            "split."
        ),
        min_ratio: float | None = typer.Option(
            None, "--min-ratio", help="Min compression ratio vs fp32."
        ),
        knee: bool = typer.Option(False, "--knee", help="Pick the knee points of the front."),
        weights: str | None = typer.Option(
            None,
            "--weights",
            help="Importance per objective, e.g. 1,1,4 (density, bits, "
            "divergence): the best match is picked.",
        ),
        method: str = typer.Option("asf", "--method", help="How --weights pick: asf | pseudo."),
        max_knees: int = typer.Option(3, "--max-knees", help="At most this many knee points."),
        reevaluate: bool = typer.Option(
            True,
            "--reevaluate/--no-reevaluate",
            help="Re-evaluate the picks on the full validation and test splits.",
        ),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw the figures."),
        bounds_on: str = typer.Option(
            "validation", "--bounds-on",
            help="Where --max-drop and --max-divergence are checked: validation (each front "
            "solution measured once, cached in RUN/validation.csv) | calibration (the "
            "search's own numbers).",
        ),
    ) -> None:
        """Choose solutions by bounds (best ratio within them), knee or weights. With no rule:
        the knee points and equal weights."""
        from moecomp.pick import BOUND_SPLITS
        from moecomp.pick import pick as pick_solutions
        from moecomp.plots import plot_run

        if bounds_on not in BOUND_SPLITS:
            raise ConfigError("--bounds-on", f"must be one of {', '.join(BOUND_SPLITS)}, got "
                              f"{bounds_on!r}")
        picks = pick_solutions(
            run,
            max_drop=max_drop,
            max_divergence=max_divergence,
            min_ratio=min_ratio,
            knee=knee,
            weights=parse_weights(weights) if weights is not None else None,
            method=method,
            max_knees=max_knees,
            reevaluate=reevaluate,
            split=bounds_on,
            progress=True,
        )
        c = Console()
        rule = str(picks["rule"].iloc[0])
        on = str(picks["bounds_on"].iloc[0]) if pd.notna(picks["bounds_on"].iloc[0]) else ""
        if " within " in rule:
            where = f" (checked on the {on} split)" if on else ""
            c.print("all picks are within " + rule.split(" within ", 1)[1] + where)
        from moecomp.runs import RunFolder, metric_info

        info = metric_info(RunFolder(run))
        if info is None:
            c.print(picks_table(picks, "none", ""))
            c.print("no metric: this target is measured by its divergence alone")
        else:
            c.print(picks_table(picks, info.name, info.unit))
            c.print(f"{info.name}; drops from the teacher on the same data, in "
                    f"{info.drop_unit or 'its units'}")
        c.print("splits: calib = the search's calibration samples, val = the full validation "
                "split (where bounds are checked), test = the test split (reported, never "
                "chosen on)")
        c.print(f"picks: {run / 'picks.csv'} (pick {int(picks['pick'].iloc[0])}; earlier picks "
                "kept)")
        if plots:
            for p in plot_run(run, picks):
                c.print(f"plot:  {p}")
