"""`moecomp compare` (placeholder until its stage lands)."""

from __future__ import annotations

import typer

from moecomp.cli._common import not_yet


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def _cmd() -> None:
        """Not yet available."""
        not_yet("compare")
