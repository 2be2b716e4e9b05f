"""What people see: tables (rich on a terminal, plain text when piped), progress bars and
log lines (text or JSON)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import IO, Any

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
from rich.table import Table
from rich.text import Text

from audience_sync.statuses import RunStatus

STATUS_STYLES: dict[RunStatus, str] = {
    "succeeded": "green",
    "partial": "yellow",
    "guarded": "yellow",
    "skipped": "cyan",
    "failed": "bold red",
    "interrupted": "red",
    "running": "blue",
}


def render_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], stream: IO[str], *, tty: bool
) -> None:
    """Write ``rows`` as a table: rich with colour on a terminal, aligned plain text otherwise."""
    numeric = [all(isinstance(row.get(c), int) for row in rows) for c in columns]
    if not tty:
        stream.write(plain_table(rows, columns, numeric) + "\n")
        return
    table = Table(header_style="bold")
    for column, is_number in zip(columns, numeric, strict=True):
        table.add_column(column, justify="right" if is_number else "left", overflow="fold")
    for row in rows:
        cells = [_cell(row.get(c)) for c in columns]
        if "status" in columns:
            index = list(columns).index("status")
            # A cell is any text; only a run status has a style.
            style = STATUS_STYLES.get(cells[index])  # type: ignore[call-overload]
            cells[index] = f"[{style}]{cells[index]}[/]" if style else cells[index]
        table.add_row(*cells)
    Console(file=stream, force_terminal=True).print(table)


def plain_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], numeric: Sequence[bool]
) -> str:
    """Rows as aligned plain-text columns (numbers right-aligned), for pipes and files."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(columns)), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    return text if len(text) <= 60 else text[:59] + "…"


class RateColumn(ProgressColumn):
    """Rows or changes per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:>9,.0f}/s" if speed else "        -/s")


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
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(file=stream),
            transient=False,
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


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, for log shippers (``--log-format json``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)
