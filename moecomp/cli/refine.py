"""`moecomp refine RUN --solution ID`: reconstruct, fine-tune and/or merge bins of one solution."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from moecomp.cli.export import fidelity_line
from moecomp.refine import refine as refine_solution


def register(app: typer.Typer) -> None:
    @app.command("refine")
    def refine(
        run: Path = typer.Argument(..., help="Run folder written by `moecomp search`."),
        solution: str = typer.Option(..., "--solution", "-s", help="Solution id or refined key."),
        merge_bins: bool = typer.Option(True, "--merge-bins/--no-merge-bins",
                                        help="Iteratively merge neighbouring bins."),
        tolerance: float = typer.Option(0.5, "--tolerance",
                                        help="Allowed loss of merging on validation: the "
                                             "metric's drop (points for accuracy) or the "
                                             "divergence."),
        metric: str | None = typer.Option(None, "--metric",
                                          help="What --tolerance is in: metric | divergence "
                                               "(default: metric when the target has one)."),
        reconstruct: bool = typer.Option(False, "--reconstruct",
                                         help="Re-fit survivors and biases layer by layer "
                                              "(least squares + GPTQ rounding on calibration "
                                              "samples; no gradient training)."),
        calibration: int = typer.Option(8192, "--calibration",
                                        help="Calibration samples used by --reconstruct."),
        finetune_epochs: int = typer.Option(0, "--finetune-epochs",
                                            help="Distillation epochs (masks kept, "
                                                 "quantisation in the loop)."),
        lr: float = typer.Option(2e-3, "--lr", help="Fine-tuning learning rate."),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Refine a solution; the result is added to the run as refined/rN.mcz."""
        r = refine_solution(run, solution, merge=merge_bins, tolerance=tolerance, metric=metric,
                            finetune_epochs=finetune_epochs, lr=lr, seed=seed,
                            reconstruct=reconstruct, calibration=calibration)
        c = Console()
        c.print(f"[bold]{r.key}[/] (from solution {r.parent}): {r.path}")
        for n in r.levels_before:
            c.print(f"  {n}: {r.levels_before[n]} -> {r.levels_after[n]} levels")
        c.print(f"  {r.fidelity_metric}: {r.fidelity_before:.4f} -> {r.fidelity_after:.4f} "
                f"(tolerance {r.tolerance})")
        c.print("  " + fidelity_line(r.metric_name, r.metric_unit, r.val_metric,
                                     r.test_metric, r.val_divergence, r.test_divergence))
        c.print(f"  file {r.file_bytes:,} bytes, {r.ratio:.1f}x vs fp32")
