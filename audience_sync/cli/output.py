"""What every command shares on its way out: exit codes, one-line errors, usage errors, log
lines on stderr, and a reader that left the pipe."""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NoReturn

from audience_sync.render import JsonFormatter, TextFormatter

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3
EXIT_INTERRUPTED = 128 + signal.SIGINT  # stopped by Ctrl-C, as a shell reports it
# Loggers that chatter at INFO: shown from -vv on, never at -v.
CHATTY = ("alembic", "apscheduler", "httpx")
# psycopg warns of errors it ignored while cleaning up after one we report: -vv only.
SECOND_HAND = ("psycopg",)
HANDLER = "audience-sync"  # the name of the log handler a command installs
log = logging.getLogger(__package__)


def report_error(message: str) -> None:
    """One line on stderr, ``error: message`` (or a JSON line with ``--log-format json``)."""
    log.error("%s", message)


def usage_error(parser: argparse.ArgumentParser, json_logs: bool, message: str) -> NoReturn:
    """argparse's error exit (usage, then the message; exit 2), as a JSON line if asked."""
    if json_logs:
        record = logging.makeLogRecord(
            {"name": __package__, "levelno": logging.ERROR, "levelname": "ERROR",
             "msg": f"{parser.prog}: {message}"}
        )  # fmt: skip
        print(JsonFormatter().format(record), file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
    parser.print_usage(sys.stderr)
    parser.exit(EXIT_USAGE, f"{parser.prog}: error: {message}\n")


def detach_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # not a real file (a test's capture): nothing will flush it at exit


# One name per thing in every output, tables and --json alike: a run is `run_id`, the key of
# an audience or trait `audience_key` (as in the state tables, alerts and the Python API), a
# worker `worker_id`. The names a --json printed before stay beside them until 0.3.


def with_old_names(row: dict[str, Any], old: dict[str, str]) -> dict[str, Any]:
    """``row`` for --json: its fields, then the name each field had before (``old``: new
    name → old name), kept until 0.3."""
    return {**row, **{old[k]: v for k, v in row.items() if k in old}}


def count(n: int, noun: str) -> str:
    """``1 change``, ``2 changes``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def iso(value: datetime | None) -> str | None:
    """A naive UTC timestamp as ISO 8601 with a Z, to the second."""
    return None if value is None else value.isoformat(timespec="seconds") + "Z"


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each line to ``sys.stderr`` as it is when the line is written, not as it was
    when the handler was made: progress bars on a terminal put a proxy there that prints
    the line above them (a line written past it would land inside a bar)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # under the handler's lock, held by `handle`
        super().emit(record)


def timestamp_log_lines() -> None:
    """Start every text log line with the time from now on (a daemon's lines are read later)."""
    for handler in logging.getLogger().handlers:
        if handler.get_name() == HANDLER and isinstance(handler.formatter, TextFormatter):
            handler.formatter.with_time = True


@contextmanager
def logging_to_stderr(verbosity: int, log_format: str = "text") -> Iterator[None]:
    """Log to stderr as the flags ask for the length of one command, then put back every
    level and handler it touched (in-process callers, tests among them, see no leak)."""
    root = logging.getLogger()
    touched = [
        logging.getLogger(name)
        for name in (*CHATTY, *SECOND_HAND, "audience_sync", "audience_sync.scheduler", __package__)
    ]
    saved_root = (root.level, list(root.handlers))
    saved = [(logger, logger.level) for logger in touched]
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.set_name(HANDLER)
    logging.captureWarnings(True)  # a library's warning is a log line too (JSON with json)
    # Replace only our own handler: others (a test's log capture, say) stay.
    root.handlers = [h for h in root.handlers if h.get_name() != HANDLER] + [handler]
    root.setLevel(logging.WARNING if verbosity == 0 else logging.INFO)
    for name in CHATTY:
        # httpx logs every request, Alembic and APScheduler their set-up: only at -vv.
        logging.getLogger(name).setLevel(logging.INFO if verbosity >= 2 else logging.WARNING)
    for name in SECOND_HAND:
        logging.getLogger(name).setLevel(logging.INFO if verbosity >= 2 else logging.ERROR)
    # -vv: our own DEBUG lines too (each request's body; never the key, which is a header).
    logging.getLogger("audience_sync").setLevel(logging.DEBUG if verbosity >= 2 else logging.NOTSET)
    try:
        yield
    finally:
        handler.flush()
        logging.captureWarnings(False)
        root.setLevel(saved_root[0])
        root.handlers = saved_root[1]
        for logger, level in saved:
            logger.setLevel(level)
