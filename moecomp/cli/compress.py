"""`moecomp compress PROBLEM --max-drop D`: search, refine candidates across the front, and
export the smallest file whose validation drop is within D (test drop reported)."""

from __future__ import annotations

from pathlib import Path

import typer

from moecomp.cli.device import checked_device, device_option
from moecomp.cli.finetune_options import (
    FINETUNE_OPTIONS,
    checked_finetune,
    lr_option,
    optimizer_option,
    said_as_options,
)
from moecomp.cli.interrupted import exit_interrupted
from moecomp.errors import ConfigError

# compress()'s parameters that are options of this command
OPTION_OF = {
    "max_drop": "--max-drop",
    "max_divergence": "--max-divergence",
    "candidates": "--candidates",
    "time_budget": "--time-budget",
    "confidence": "--confidence",
    **FINETUNE_OPTIONS,
}


def register(app: typer.Typer) -> None:
    @app.command("compress")
    def compress(
        problem: Path | None = typer.Argument(
            None, help="Problem TOML file to search (optional with --run)."),
        max_drop: float | None = typer.Option(
            None, "--max-drop",
            help="Budget on the metric's drop from the teacher on the validation split (its "
                 "units, points for accuracy)."),
        max_divergence: float | None = typer.Option(
            None, "--max-divergence",
            help="Budget on the mean divergence on the validation split (for targets without "
                 "a metric, or by choice)."),
        out: Path | None = typer.Option(
            None, "--out",
            help="Folder of the result (compress.json, candidates.csv, the .mcz); when "
                 "searching, the run folder itself (default runs/<problem name>; with --run: "
                 "RUN/compress). Run again to continue a stopped compress."),
        run: Path | None = typer.Option(
            None, "--run", help="Reuse this finished search run instead of searching."),
        budget: int | None = typer.Option(
            None, "--budget", min=1, help="Search evaluations (default: the problem's)."),
        finetune_epochs: int = typer.Option(
            0, "--finetune-epochs", min=0,
            help="Refine each candidate by this many distillation epochs (0: post-training)."),
        reconstruct: bool | None = typer.Option(
            None, "--reconstruct/--no-reconstruct",
            help="Layer-wise reconstruction of each candidate (default: on without "
                 "fine-tuning, off with it)."),
        merge_bins: bool = typer.Option(
            True, "--merge-bins/--no-merge-bins",
            help="Merge bins of the smallest candidates within the budget, using the budget "
                 "left to each."),
        candidates: int = typer.Option(
            16, "--candidates", min=1, help="At most this many refined candidates."),
        confidence: float | None = typer.Option(
            None, "--confidence",
            help="Choose only files whose one-sided upper bound at this level (e.g. 0.9: "
                 "measure + 1.28 standard errors over the validation samples) is within the "
                 "budget; default: the measure itself."),
        time_budget: float | None = typer.Option(
            None, "--time-budget",
            help="Seconds after which no new candidate starts (the search is bounded by "
                 "--budget)."),
        optimizer: str = optimizer_option(),
        lr: float | None = lr_option(),
        masks: str = typer.Option(
            "fixed", "--masks",
            help="With --finetune-epochs: fixed, gradual or rigl (see `moecomp refine`)."),
        repair_masks: bool = typer.Option(
            False, "--repair-masks/--no-repair-masks",
            help="With --finetune-epochs: first move survivors off hidden units that cannot "
                 "matter to units that do (see `moecomp refine`)."),
        calibration: int = typer.Option(
            8192, "--calibration", min=1, help="Calibration samples for reconstruction."),
        seed: int = typer.Option(0, "--seed", help="Seed of reconstruction and fine-tuning."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
        device: str = device_option(),
    ) -> None:
        """The smallest file within a drop budget: search (or --run), refine candidates across
        the front's ratio range, choose on validation, export and verify, report test."""
        from rich.console import Console

        from moecomp.compress import compress as run_compress
        from moecomp.compress import summary_lines
        from moecomp.config import load_problem
        from moecomp.paths import input_file, input_folder
        from moecomp.search.run import Terminated, sigterm_raises

        if (max_drop is None) == (max_divergence is None):
            raise ConfigError("--max-drop", "give one budget: --max-drop D (the metric's drop "
                              "on validation) or --max-divergence X")
        if time_budget is not None and not time_budget > 0:
            raise ConfigError("--time-budget", f"must be > 0 seconds, got {time_budget:g}")
        checked_device(device)
        checked_finetune(finetune_epochs, masks, repair_masks, optimizer, lr)
        if problem is None and run is None:
            raise ConfigError("problem", "give a problem file to search, or --run RUN")
        if problem is not None:
            input_file(problem, "PROBLEM")
        if run is not None:
            input_folder(run, "--run")
        if out is None and run is None and problem is not None:
            out = Path("runs") / load_problem(problem).name
        try:
            with sigterm_raises():
                result = run_compress(
                    problem, out=out, max_drop=max_drop, max_divergence=max_divergence, run=run,
                    budget=budget, finetune_epochs=finetune_epochs, reconstruct=reconstruct,
                    merge=merge_bins, candidates=candidates, time_budget=time_budget, lr=lr,
                    seed=seed, calibration=calibration, progress=not no_progress, masks=masks,
                    repair_masks=repair_masks, optimizer=optimizer, device=device,
                    confidence=confidence)
        except ConfigError as e:
            # the Python API's parameter names, said as this command's options
            if e.field not in OPTION_OF:
                raise
            raise ConfigError(OPTION_OF[e.field], said_as_options(e.problem, OPTION_OF)) from None
        except (KeyboardInterrupt, Terminated) as e:
            where = out if out is not None else (run / "compress" if run else None)
            exit_interrupted(e, "compress", f"run the same command again to continue "
                             f"({where}/candidates.csv keeps the finished candidates)")
        from moecomp.runs import RunFolder, metric_info

        info = metric_info(RunFolder(result.run))
        option = "--max-drop" if max_drop is not None else "--max-divergence"
        c = Console()
        at = f" at {result.confidence:g} confidence" if result.confidence is not None else ""
        c.print(f"[bold]compressed[/] within {option} {result.limit:g} on validation{at}")
        for line in summary_lines(result, metric_name=info.name if info else "metric",
                                  unit=info.drop_unit if info else ""):
            c.print("  " + line)
