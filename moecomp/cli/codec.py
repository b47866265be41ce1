"""`moecomp decode FILE.mcz --out FILE.safetensors` and `moecomp inspect FILE.mcz`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from moecomp.codec import inspect_mcz, read_mcz


def register(app: typer.Typer) -> None:
    @app.command("decode")
    def decode(
        mcz: Path = typer.Argument(..., help="A .mcz file."),
        out: Path = typer.Option(..., "--out", help="Dense safetensors to write."),
    ) -> None:
        """Decode a .mcz file into a dense safetensors state dict."""
        d = read_mcz(mcz)
        save_file({k: v.contiguous() for k, v in d.state_dict.items()}, str(out))
        Console().print(f"{len(d.state_dict)} tensors -> {out}")

    @app.command("inspect")
    def inspect(mcz: Path = typer.Argument(..., help="A .mcz file.")) -> None:
        """Per-tensor table: shape, sparsity, bits, coded bytes, coders."""
        rows = inspect_mcz(mcz)
        t = Table(title=f"{mcz} ({mcz.stat().st_size:,} bytes)")
        for col in ("tensor", "shape", "sparsity", "bits", "levels", "bytes", "coders"):
            t.add_column(col, justify="left" if col in ("tensor", "coders") else "right")
        for r in rows:
            t.add_row(r.name, "x".join(map(str, r.shape)) or "scalar",
                      f"{100 * r.sparsity:.1f} %" if r.kind != "dense" else "-",
                      str(r.bits), "-" if r.n_levels is None else str(r.n_levels),
                      f"{r.coded_bytes:,}", ",".join(r.coders))
        total = sum(r.coded_bytes for r in rows)
        t.caption = f"payload + models + codebooks: {total:,} bytes (header parts uncompressed)"
        Console().print(t)
