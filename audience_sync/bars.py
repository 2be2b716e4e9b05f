"""Progress bars for loading and delivery on a terminal (rich), apart from ``render`` so that
commands printing no bars do without rich.progress."""

from __future__ import annotations

from types import TracebackType
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["ProgressBars"]


class RateColumn(ProgressColumn):
    """Rows or changes per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:>9,.0f}/s" if speed else "        -/s")


class ElapsedColumn(TimeElapsedColumn):
    """Time since the bar started, labelled."""

    def render(self, task: Task) -> Text:
        return Text.assemble("elapsed ", super().render(task))


class EtaColumn(TimeRemainingColumn):
    """Time the bar has left at its current rate, labelled (``-:--:--`` while unknown)."""

    def render(self, task: Task) -> Text:
        return Text.assemble("eta ", super().render(task))


class ProgressBars:
    """Progress bars for loading and delivery (rows/s, ETA); a context manager.

    Implements ``sync.Progress``. Only used on a terminal: piped output stays clean.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            RateColumn(),
            ElapsedColumn(),
            EtaColumn(),
            console=Console(file=stream),
            transient=False,
            # Lines written to stdout or stderr meanwhile (a log line, a Ctrl-C notice) are
            # printed above the bars, never into them: see `output.StderrHandler`.
            redirect_stdout=True,
            redirect_stderr=True,
        )
        self._loading: dict[str, TaskID] = {}
        self._delivery: TaskID | None = None

    def __enter__(self) -> ProgressBars:
        self._bars.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._bars.stop()

    def loaded(self, audience_key: str, rows: int) -> None:
        if audience_key not in self._loading:
            # The row count of a source is unknown until it is read: no total, no ETA.
            self._loading[audience_key] = self._bars.add_task(f"load {audience_key}", total=None)
        self._bars.advance(self._loading[audience_key], rows)

    def planned(self, changes: int) -> None:
        for task in self._loading.values():
            self._bars.update(task, total=self._bars.tasks[task].completed)
        self._delivery = self._bars.add_task("send changes", total=changes)

    def sent(self, changes: int) -> None:
        if self._delivery is not None:
            self._bars.advance(self._delivery, changes)
