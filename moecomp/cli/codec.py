"""`moecomp decode FILE.mcz --out FILE.safetensors` and `moecomp inspect FILE.mcz`."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from moecomp.codec import DEFAULT_MAX_BYTES, inspect_mcz, read_mcz
from moecomp.errors import ConfigError
from moecomp.paths import input_file, output_file

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}
MAX_BYTES_HELP = (
    "Refuse files whose decoding would take more than this (memory, plus work charged in "
    "bytes per tensor and grid row), before decoding anything: a number of bytes or e.g. "
    "512MiB, 2GB."
)


def parse_size(text: str, option: str = "--max-bytes") -> int:
    """Bytes from ``"4096"``, ``"512MiB"``, ``"2GB"``, ``"1.5 GiB"`` (case-insensitive)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(
            option, f"{text!r} is not a size; give bytes or a number with KB, MB, GB, KiB, "
            "MiB or GiB"
        )
    value = int(float(m.group(1)) * _UNITS[unit])
    if value < 1:
        raise ConfigError(option, f"must be at least 1 byte, got {text!r}")
    return value


def register(app: typer.Typer) -> None:
    @app.command("decode")
    def decode(
        mcz: Path = typer.Argument(..., help="A .mcz file."),
        out: Path = typer.Option(..., "--out", help="Dense safetensors to write."),
        max_bytes: str = typer.Option(str(DEFAULT_MAX_BYTES), "--max-bytes", help=MAX_BYTES_HELP),
    ) -> None:
        """Decode a .mcz file into a dense safetensors state dict."""
        from safetensors.torch import save_file

        limit = parse_size(max_bytes)
        src = input_file(mcz, "MCZ")
        dst = output_file(out, "--out")
        d = read_mcz(src, max_bytes=limit)
        state = {k: v.contiguous() for k, v in d.state_dict.items()}
        del d  # the layers' masks and indices are not written: free them before saving
        save_file(state, str(dst))
        Console().print(f"{len(state)} tensors -> {dst}")

    @app.command("inspect")
    def inspect(
        mcz: Path = typer.Argument(..., help="A .mcz file."),
        max_bytes: str = typer.Option(str(DEFAULT_MAX_BYTES), "--max-bytes", help=MAX_BYTES_HELP),
        header_only: bool = typer.Option(
            False, "--header-only", help="Read the header only: stream checksums not verified."
        ),
    ) -> None:
        """Per-tensor table: shape, sparsity, bits, coded bytes, coders; checks every stream's
        CRC32 (a corrupted file exits with an error)."""
        limit = parse_size(max_bytes)
        src = input_file(mcz, "MCZ")
        rows = inspect_mcz(src, max_bytes=limit, verify=not header_only)
        t = Table(title=f"{src} ({src.stat().st_size:,} bytes)")
        for col in ("tensor", "shape", "sparsity", "bits", "levels", "bytes", "coders"):
            t.add_column(col, justify="left" if col in ("tensor", "coders") else "right")
        for r in rows:
            t.add_row(r.name, "x".join(map(str, r.shape)) or "scalar",
                      f"{100 * r.sparsity:.1f} %" if r.kind != "dense" else "-",
                      str(r.bits), "-" if r.n_levels is None else str(r.n_levels),
                      f"{r.coded_bytes:,}", ",".join(r.coders))
        total = sum(r.coded_bytes for r in rows)
        checked = (
            "stream checksums NOT verified (--header-only)"
            if header_only
            else f"CRC32 of all {sum(len(r.coders) for r in rows)} streams verified"
        )
        size = src.stat().st_size
        cost = max(size, sum(r.decode_cost for r in rows))  # both are checked against it
        t.caption = (
            f"payload + models + codebooks: {total:,} bytes (header parts uncompressed); "
            f"{checked}; not decoded (moecomp decode checks the contents, and needs "
            f"--max-bytes >= {cost:,})"
        )
        Console().print(t)
