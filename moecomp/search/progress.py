"""The progress bar of a search (rich): generation, evaluations, current HV and ETA."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class SearchProgress:
    """A context manager; ``update(gen, n_evals, hv)`` after each generation. Silent when
    ``enabled`` is False."""

    def __init__(
        self, total: int, *, enabled: bool = True, start: int = 0, description: str = "search"
    ) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._total = total
        self._start = start
        self._description = description

    def __enter__(self) -> SearchProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                TextColumn("gen {task.fields[gen]:>4}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("evals  HV {task.fields[hv]:.4f}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                self._description, total=self._total, completed=self._start, gen=0, hv=0.0
            )
        return self

    def update(self, gen: int, n_evals: int, hv: float) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=n_evals, gen=gen, hv=hv)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)
