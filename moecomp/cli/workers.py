"""The Dask options shared by the commands that evaluate populations (search, study)."""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from moecomp.search.runner import Runner


def dask_workers_option() -> Any:
    return typer.Option(
        0, "--dask-workers", min=0,
        help="Evaluate populations on a local Dask cluster of this many processes, one "
        "thread each (0: in this process).",
    )


def dask_scheduler_option() -> Any:
    return typer.Option(
        None, "--dask-scheduler",
        help="Evaluate on a running Dask scheduler (tcp://host:8786) instead; Dask sends "
        "pickled functions to its workers: use only a cluster you run.",
    )


def open_runner(stack: ExitStack, scheduler: str | None, workers: int) -> Runner | None:
    """A Dask runner closed with ``stack`` when either option asks for one, else None (in
    this process)."""
    if scheduler is None and workers == 0:
        return None
    from moecomp.errors import ConfigError
    from moecomp.search.dask_runner import DaskRunner

    try:
        runner = DaskRunner(scheduler, n_workers=max(workers, 1))
    except OSError as e:  # distributed's connection errors (timeouts included) are OSErrors
        if scheduler is None:
            raise
        raise ConfigError("--dask-scheduler", f"cannot reach {scheduler}: {e}") from None
    return stack.enter_context(runner)
