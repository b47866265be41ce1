"""How `search` and `compress` end when SIGINT or SIGTERM stops them: one line on stderr and
exit code 128 + the signal, their run folders already saying "interrupted"."""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn

import typer


def exit_interrupted(e: BaseException, what: str, advice: str) -> NoReturn:
    """Say that ``what`` was interrupted and ``advice`` in one line, then exit 130 (SIGINT)
    or 143 (SIGTERM).

    After SIGTERM the process ends at once (``os._exit``, streams flushed): the run's files
    are written by then, and a signal that landed inside torch can leave native state whose
    teardown aborts the interpreter ("Fatal Python error: PyThreadState_Get ... finalizing",
    exit -6 instead of 143; seen in about 1 of 30 runs of the SIGTERM test). SIGINT exits
    the usual way, so a Ctrl-C in a session that called the command keeps that session."""
    from moecomp.search.run import Terminated

    name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
    code = 128 + (signal.SIGTERM if name == "SIGTERM" else signal.SIGINT)
    typer.secho(f"error: {what} interrupted ({name}); {advice}", fg=typer.colors.RED, err=True)
    if name == "SIGTERM":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code)
