"""The ``audience-sync`` command line: parse flags, build objects, call the library, render.

A thin layer, one module per command group, as dbt's ``cli/`` is laid out:

- ``app``: the parser, ``main`` and ``run_cli`` (errors → one line and an exit code);
- ``syncing``: ``run``, ``backfill``, ``retire``, ``daemon``;
- ``history``: ``history``, ``show``, ``prune``;
- ``audiences``: ``audiences``, ``workers``, ``verify``;
- ``checking``: ``check``, ``reconcile``;
- ``admin``: ``demo``, ``init``, ``completion``, ``db upgrade``;
- shared by them: ``options`` (flags, argument types, settings), ``output`` (exit codes,
  errors, log lines) and ``signals``.

This module imports nothing heavy: the console script imports it before anything can
catch a Ctrl-C, and the imports behind a command take most of a second.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from audience_sync.cli.app import build_parser, command_parsers, help_pages, run_cli

__all__ = ["build_parser", "command_parsers", "help_pages", "main", "run_cli"]
EXIT_INTERRUPTED = 128 + signal.SIGINT  # what a shell reports for a process Ctrl-C stopped


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: run one command and exit with its code.

    A Ctrl-C before the command starts (while modules import) or after it ended (while the
    interpreter shuts down) exits 130 at once and silently: there is nothing to stop
    gracefully, and a traceback of an import would only alarm.
    """
    signal.signal(signal.SIGINT, _exit_interrupted)
    # Imports build a few hundred thousand objects and no garbage: the collector's passes
    # over them while they load cost a cron run a fifth of its start-up. Loaded, they are
    # frozen out of every later collection.
    gc.disable()
    from audience_sync.cli.app import main as run_main

    gc.freeze()
    gc.enable()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.unraisablehook = _unraisable
    try:
        code = run_main(argv)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    signal.signal(signal.SIGINT, _exit_interrupted)
    if code == EXIT_INTERRUPTED:
        # Interrupted, and the command has cleaned up after itself: exit at once, as a
        # Ctrl-C before the command does. The interpreter's own shutdown after an interrupt
        # that landed mid-import (commands import what they run) could still end the
        # process by SIGINT (-2) instead of 130, under load, one run in a few.
        _exit_interrupted(signal.SIGINT, None)
    sys.exit(code)


def _unraisable(unraisable: Any) -> None:
    """A Ctrl-C that lands in a finalizer or a garbage collector's callback cannot reach the
    command (Python would print "Exception ignored" and go on as if unasked): stop at once,
    as a Ctrl-C before the command started does. Anything else, as Python says it."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        _exit_interrupted(signal.SIGINT, None)
    sys.__unraisablehook__(unraisable)


def _exit_interrupted(_signum: int, _frame: FrameType | None) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(EXIT_INTERRUPTED)


def __getattr__(name: str) -> Any:
    # `from audience_sync.cli import run_cli` (tests, in-process callers) loads the CLI then.
    if name in ("build_parser", "command_parsers", "help_pages", "run_cli"):
        from audience_sync.cli import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
