"""What people see: tables (rich on a terminal, plain text when piped) and log lines (text or
JSON); the progress bars are ``bars``'."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import IO, Any

from audience_sync.statuses import RunStatus

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 10.0  # a progress line at least this often while a run moves...
PROGRESS_STEP = 0.1  # ...and at each further tenth of the changes sent

STATUS_STYLES: dict[RunStatus, str] = {
    "succeeded": "green",
    "partial": "yellow",
    "guarded": "yellow",
    "skipped": "cyan",
    "failed": "bold red",
    "interrupted": "red",
    "running": "blue",
}
# Columns whose text may wrap on a terminal; every other column keeps a value on one line.
WRAPPING = frozenset({"error", "last_error", "reason", "source", "name", "email"})
WRAP_MIN = 16  # the narrowest a wrapping column is squeezed to
GAP = 2  # spaces between columns


def output_json(value: Any, stream: IO[str]) -> None:
    """Write ``value`` as indented JSON: what every ``--json`` prints."""
    stream.write(json.dumps(value, indent=2, default=str) + "\n")


def output_rows(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    stream: IO[str],
    *,
    as_json: bool = False,
    optional: Sequence[str] = (),
    width: int | None = None,
) -> None:
    """Rows as a JSON array (every field) or as a table of ``columns`` for people.

    On a terminal the table fits its width: ``optional`` columns are left out, last first,
    until it does (``--json`` always has them). Piped, it is plain aligned text.
    """
    if as_json:
        output_json(list(rows), stream)
        return
    render_table(rows, columns, stream, tty=_is_tty(stream), optional=optional, width=width)


def render_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    stream: IO[str],
    *,
    tty: bool,
    optional: Sequence[str] = (),
    width: int | None = None,
) -> None:
    """Write ``rows`` as a table: rich with colour on a terminal, aligned plain text otherwise."""
    numeric = {c: all(isinstance(row.get(c), int) for row in rows) for c in columns}
    if not tty:
        shown = list(columns)
        stream.write(plain_table(rows, shown, [numeric[c] for c in shown]) + "\n")
        return
    # Rich only for a terminal: piped output (cron, scripts) does without its import.
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(file=stream, force_terminal=True, width=width)
    shown = fit_columns(rows, columns, optional, console.width)
    table = Table(
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),  # with the box's blank separator: GAP spaces between columns
        pad_edge=False,
        show_edge=False,
        header_style="bold",
    )
    for column in shown:
        wraps = column in WRAPPING
        table.add_column(
            column,
            justify="right" if numeric[column] else "left",
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
            min_width=min(WRAP_MIN, _natural_width(rows, column)) if wraps else None,
        )
    for row in rows:
        # Text, never markup: a value such as "[/x]" is shown as written. Only a run status
        # has a style.
        table.add_row(*(Text(_cell(row.get(c)), style=_style(c, row.get(c))) for c in shown))
    console.print(table)
    hidden = [c for c in columns if c not in shown]
    if hidden:
        note = f"(hidden to fit: {', '.join(hidden)}; --json shows all)"
        if len(note) > console.width:
            note = f"(hidden to fit: {', '.join(hidden)})"
        console.print(note, style="dim", overflow="ellipsis", no_wrap=True)


def _style(column: str, value: Any) -> str:
    styles: dict[Any, str] = dict(STATUS_STYLES)
    return styles.get(value, "") if column == "status" else ""


def fit_columns(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], optional: Sequence[str], width: int
) -> list[str]:
    """``columns`` less as many ``optional`` ones (dropped last first) as it takes to fit."""
    shown = list(columns)
    droppable = [c for c in reversed(optional) if c in shown]

    def needed() -> int:
        return sum(
            min(WRAP_MIN, _natural_width(rows, c)) if c in WRAPPING else _natural_width(rows, c)
            for c in shown
        ) + GAP * len(shown)

    while droppable and needed() > width:
        shown.remove(droppable.pop(0))
    return shown


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


def short_time(value: str | None) -> str | None:
    """An ISO timestamp as ``2026-12-01 03:01`` (UTC), the form tables show."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return moment.strftime("%Y-%m-%d %H:%M")


def _natural_width(rows: Sequence[dict[str, Any]], column: str) -> int:
    return max([len(column), *(len(_cell(row.get(column))) for row in rows)])


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except ValueError:  # a closed stream
        return False


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    text = as_text(value)
    return text if len(text) <= 60 else text[:59] + "…"


def as_text(value: Any) -> str:
    """A value as a table or a field line shows it: ``yes``/``no`` for a boolean, and text
    with its control characters escaped (``\\n``), so no value can break a line or a table."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).translate(_ESCAPES)


def _escape(code: int) -> str:
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    char = chr(code)
    return named.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


# C0 and C1 controls, DEL, the line and paragraph separators and the bidirectional
# overrides (which reorder what follows them on the line).
_ESCAPES = {
    code: _escape(code)
    for code in (
        *range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    )
}  # fmt: skip


class ProgressLog:
    """Progress as log lines (INFO: shown with ``-v``), for output that is not a terminal:
    rows read every ``PROGRESS_SECONDS``; changes sent at each tenth and at least every
    ``PROGRESS_SECONDS``, with the rate and the time left. Implements ``sync.Progress``."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._rows: dict[str, int] = {}
        self._loading_since: dict[str, float] = {}
        self._said_at = monotonic()
        self._total = 0
        self._sent = 0
        self._sending_since = 0.0
        self._step = 0  # tenths of the changes already said

    def loaded(self, audience_key: str, rows: int) -> None:
        now = self._monotonic()
        self._loading_since.setdefault(audience_key, now)
        self._rows[audience_key] = self._rows.get(audience_key, 0) + rows
        if now - self._said_at >= PROGRESS_SECONDS:
            self._said_at = now
            done = self._rows[audience_key]
            log.info(
                "load %s: %s rows read%s",
                audience_key, f"{done:,}", _rate(done, now - self._loading_since[audience_key]),
            )  # fmt: skip

    def planned(self, changes: int) -> None:
        self._total, self._sent, self._step = changes, 0, 0
        self._said_at = self._sending_since = self._monotonic()
        log.info("send changes: %s planned", f"{changes:,}")

    def sent(self, changes: int) -> None:
        self._sent += changes
        now = self._monotonic()
        step = int(self._sent / self._total / PROGRESS_STEP) if self._total else 0
        if step <= self._step and now - self._said_at < PROGRESS_SECONDS:
            return
        self._step, self._said_at = max(step, self._step), now
        elapsed = now - self._sending_since
        share = self._sent / self._total if self._total else 1.0
        left = ""
        if 0 < share < 1 and elapsed > 0:
            left = f", about {duration_text(elapsed / share - elapsed)} left"
        log.info(
            "send changes: %s of %s (%.0f%%)%s%s",
            f"{self._sent:,}", f"{self._total:,}", 100 * share, _rate(self._sent, elapsed), left,
        )  # fmt: skip


def _rate(count: int, seconds: float) -> str:
    return f", {count / seconds:,.0f}/s" if seconds > 0 else ""


def duration_text(seconds: float) -> str:
    """``45s``, ``3m05s`` or ``2h07m``: how long, for people."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class TextFormatter(logging.Formatter):
    """``warning: message``: the shape of every line a person reads on stderr, errors
    included. ``with_time`` starts each with the UTC time (a daemon's lines are read later).
    Our own lines speak for themselves; a library's name its logger (``info: httpx: …``)."""

    def __init__(self, *, with_time: bool = False) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.lower()
        level = "error" if level == "critical" else level
        own = record.name == "audience_sync" or record.name.startswith("audience_sync.")
        text = f"{level}: " + ("" if own else f"{record.name}: ") + record.getMessage()
        if self.with_time:
            moment = datetime.fromtimestamp(record.created, UTC)
            text = f"{moment:%Y-%m-%d %H:%M:%S} {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


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
