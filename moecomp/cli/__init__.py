"""The ``moecomp`` command line (typer). One module per command group, each registering its
commands on :data:`app`; this file only assembles them and turns moecomp's own errors, and any
missing, unreadable or wrong-kind path, into a one-line message and exit code 2 instead of a
traceback."""

from __future__ import annotations

import importlib
import sys

import typer

from moecomp.errors import MoecompError

app = typer.Typer(
    name="moecomp",
    help="Multi-objective evolutionary compression of PyTorch models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Order is the user's path through the pipeline (shared/DESIGN.md, "Command line").
COMMAND_MODULES = ("demo", "train", "search", "study", "pick", "refine", "export", "compress",
                   "codec", "compare", "report")

for _name in COMMAND_MODULES:
    importlib.import_module(f"moecomp.cli.{_name}").register(app)


def main() -> None:
    try:
        app()
    except MoecompError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        # A path-shaped mistake no command checked up front: still one line, not a traceback.
        where = f"{e.filename}: " if e.filename else ""
        typer.secho(f"error: {where}{e.strerror or e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
