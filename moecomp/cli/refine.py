"""`moecomp refine RUN --solution ID`: reconstruct, fine-tune and/or merge bins of one solution;
each step is kept only if the validation measure does not get worse, and the output says so."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console

from moecomp.cli.device import checked_device, device_option
from moecomp.cli.export import fidelity_line
from moecomp.cli.finetune_options import checked_finetune, lr_option, optimizer_option
from moecomp.errors import ConfigError
from moecomp.metric import drop_unit
from moecomp.paths import input_folder
from moecomp.refine import refine as refine_solution


def register(app: typer.Typer) -> None:
    @app.command("refine")
    def refine(
        run: Path = typer.Argument(..., help="Run folder written by `moecomp search`."),
        solution: str = typer.Option(..., "--solution", "-s", help="Solution id or refined key."),
        reconstruct: bool = typer.Option(False, "--reconstruct",
                                         help="Re-fit survivors and biases layer by layer "
                                              "(least squares + GPTQ rounding on calibration "
                                              "samples; no gradient training)."),
        calibration: int = typer.Option(8192, "--calibration",
                                        help="Calibration samples used by --reconstruct."),
        finetune_epochs: int = typer.Option(0, "--finetune-epochs",
                                            help="Distillation epochs (masks kept, "
                                                 "quantisation in the loop)."),
        optimizer: str = optimizer_option(),
        lr: float | None = lr_option(),
        masks: str = typer.Option("fixed", "--masks",
                                  help="How survivors move while fine-tuning: fixed (the "
                                       "plan's), gradual (pruned from denser masks to the "
                                       "plan's counts) or rigl (drop and regrow)."),
        repair_masks: bool = typer.Option(
            False, "--repair-masks/--no-repair-masks",
            help="Before fine-tuning, move survivors off hidden units that cannot matter "
                 "(none computes them, or none reads them) to units that do; each layer keeps "
                 "its count."),
        merge_bins: bool = typer.Option(False, "--merge-bins/--no-merge-bins",
                                        help="Merge neighbouring bins (levels) as far as the "
                                             "validation measure stays within --tolerance."),
        tolerance: float = typer.Option(0.0, "--tolerance",
                                        help="How much worse merging may make the validation "
                                             "measure: the metric's drop (points for "
                                             "accuracy) or the divergence. Default 0."),
        metric: str | None = typer.Option(None, "--metric",
                                          help="The validation measure steps are kept by: "
                                               "metric | divergence (default: metric when "
                                               "the target has one)."),
        seed: int = typer.Option(0, "--seed"),
        device: str = device_option(),
    ) -> None:
        """Refine a solution; the result is added to the run as refined/rN.mcz. A step is kept
        only if the validation measure does not get worse (merging: within --tolerance)."""
        input_folder(run, "RUN")
        checked_device(device)
        if tolerance != 0.0 and not merge_bins:
            raise ConfigError("--tolerance", "applies to bin merging only: add --merge-bins")
        checked_finetune(finetune_epochs, masks, repair_masks, optimizer, lr)
        if not (reconstruct or finetune_epochs > 0 or merge_bins):
            raise ConfigError("refine", "no step asked: give --reconstruct, "
                              "--finetune-epochs N and/or --merge-bins")
        r = refine_solution(run, solution, reconstruct=reconstruct, calibration=calibration,
                            finetune_epochs=finetune_epochs, lr=lr, merge=merge_bins,
                            tolerance=tolerance, metric=metric, seed=seed, device=device,
                            masks=masks, repair_masks=repair_masks, optimizer=optimizer)
        c = Console()
        origin = f"; searched solution {r.root}" if r.root != r.parent else ""
        c.print(f"[bold]{r.key}[/] (from solution {r.parent}){origin}: {r.path}")
        for o in r.steps:
            colour = "green" if o.kept else "yellow"
            c.print(f"  [{colour}]{o.step}: {'kept' if o.kept else 'dropped'}[/] ({o.note})")
        if not any(o.kept for o in r.steps):
            c.print(f"  no step kept: {r.key} is solution {r.parent} as it was")
        if r.merged:
            changed = [n for n in r.levels_before if r.levels_after[n] != r.levels_before[n]]
            for n in changed:
                c.print(f"    {n}: {r.levels_before[n]} -> {r.levels_after[n]} levels")
        c.print("  " + fidelity_line(r.metric_name, r.metric_unit, r.val_metric,
                                     r.test_metric, r.val_divergence, r.test_divergence))
        if math.isfinite(r.val_drop_se):
            u = f" {drop_unit(r.metric_unit)}" if r.metric_unit else ""
            c.print(f"  {r.metric_name} drop val {r.val_drop:.2f} +- {r.val_drop_se:.2f}{u}, "
                    f"test {r.test_drop:.2f} +- {r.test_drop_se:.2f}{u} (+- one standard error "
                    f"over the split's samples)")
        c.print(f"  file {r.file_bytes:,} bytes on disk, {r.ratio:.1f}x vs fp32")
