"""`moecomp export RUN --solution ID`: plan.json + .mcz (+ safetensors / ONNX), verified."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from moecomp.errors import PathError
from moecomp.export import export_solution


def fidelity_line(name: str, unit: str, val: float, test: float, val_div: float,
                  test_div: float, *, teacher_test: float | None = None) -> str:
    """``accuracy val 95.1 %, test 94.8 % (teacher test 96.1 %); divergence val 0.012, test
    0.013``; the divergence alone for a target without a metric."""
    div = f"divergence val {val_div:.4g}, test {test_div:.4g}"
    if name == "none":
        return div + " (no metric)"
    u = f" {unit}" if unit else ""
    teacher = f" (teacher test {teacher_test:.2f}{u})" if teacher_test is not None else ""
    return f"{name} val {val:.2f}{u}, test {test:.2f}{u}{teacher}; {div}"


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export(
        run: Path = typer.Argument(..., help="Run folder written by `moecomp search`."),
        solution: str = typer.Option(..., "--solution", "-s",
                                     help="Solution id (e.g. 12) or refined key (e.g. r1)."),
        out: Path | None = typer.Option(None, "--out", help="Path of the .mcz file."),
        safetensors: bool = typer.Option(False, "--safetensors",
                                         help="Also write the decoded dense weights."),
        onnx: bool = typer.Option(False, "--onnx", help="Also write an ONNX model."),
        structured: bool = typer.Option(
            False, "--structured",
            help="Also write the decoded model with the units and filters nobody reads "
                 "removed (smaller matrices, same outputs): STEM.structured.safetensors, "
                 "STEM.structured.json (kept units, new shapes) and, with --onnx, "
                 "STEM.structured.onnx."),
    ) -> None:
        """Write a solution's configuration and compressed file; check the file decodes to the
        same model; print size and ratio vs the fp32 teacher."""
        if out is not None and out.is_dir():
            raise PathError(f"--out {out}: is a folder, expected the .mcz file's name")
        r = export_solution(run, solution, out=out, safetensors=safetensors, onnx=onnx,
                            structured=structured)
        c = Console()
        c.print(f"[bold]solution {r.key}[/]")
        c.print(f"  file          {r.mcz}  ({r.file_bytes:,} bytes)")
        c.print(f"  plan          {r.plan_json}")
        if r.safetensors:
            c.print(f"  safetensors   {r.safetensors}")
        if r.onnx:
            c.print(f"  onnx          {r.onnx}")
        if r.structured_safetensors:
            c.print(f"  structured    {r.structured_safetensors}  ({r.structured_params:,} "
                    f"parameters; shapes in {r.structured_json})")
        if r.structured_onnx:
            c.print(f"                {r.structured_onnx}")
        c.print(f"  ratio         {r.ratio:.1f}x vs fp32 of all parameters "
                f"({r.fp32_bytes:,} bytes)")
        if r.teacher_file_bytes:
            c.print(f"                {r.teacher_file_bytes / r.file_bytes:.1f}x vs the "
                    f"teacher's safetensors file ({r.teacher_file_bytes:,} bytes)")
        c.print("  fidelity      " + fidelity_line(r.metric_name, r.metric_unit, r.val_metric,
                                                  r.test_metric, r.val_divergence,
                                                  r.test_divergence,
                                                  teacher_test=r.teacher_test_metric))
        c.print("  verified      decoded file reproduces the solution's outputs exactly")
