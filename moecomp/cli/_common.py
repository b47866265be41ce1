"""Shared pieces of the command modules."""

from __future__ import annotations

import typer


def not_yet(command: str) -> None:
    """For commands whose stage has not landed yet."""
    typer.secho(f"moecomp {command}: not yet available", fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(code=3)
