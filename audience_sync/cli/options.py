"""Flags: how a command is declared, the global options, argument types, the settings that
``--config`` names and the command line to run next."""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from audience_sync import db
from audience_sync.config import Settings, load_settings, parse_duration, resolve_config_path
from audience_sync.errors import StateError
from audience_sync.runs import utcnow

# Bounds of numeric flags: large enough for any real use, small enough for every database.
MAX_ROWS, MAX_PAGE, MAX_SAMPLE, MAX_ID = 100_000, 1_000_000_000, 100_000, 2**63 - 1
Handler = Callable[[argparse.Namespace], int]


class Commands:
    """Adds the sub-commands of one parser; each command group's ``register`` is given one."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.common = argparse.ArgumentParser(add_help=False)
        add_global_options(self.common, argparse_default=False)
        self._commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        self,
        name: str,
        summary: str,
        description: str,
        *parents: argparse.ArgumentParser,
        handler: Handler | None = None,
        needs_gist: bool = True,
        json: str | None = None,
    ) -> argparse.ArgumentParser:
        """A sub-command calling ``handler``; ``json``: the help of its ``--json`` flag."""
        sub = self._commands.add_parser(
            name, parents=[self.common, *parents], help=summary, description=description
        )
        if handler is not None:
            sub.set_defaults(handler=handler, needs_gist=needs_gist)
        if json is not None:
            sub.add_argument("--json", action="store_true", help=json)
        return sub


def add_global_options(parser: argparse.ArgumentParser, *, argparse_default: bool) -> None:
    """``--config``, ``-v`` and ``--log-format``: on the top parser with their defaults, on
    each command without (``SUPPRESS``), so one given after the command overrides one before."""

    def default(value: Any) -> Any:
        return value if argparse_default else argparse.SUPPRESS

    parser.add_argument(
        "--config",
        metavar="PATH",
        default=default(None),
        help="config file (default: $AUDIENCE_SYNC_CONFIG, else ./audience_sync.toml)",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=default(0),
        help="log progress (-vv: every request, with its body)",
    )  # fmt: skip
    parser.add_argument(
        "--log-format", choices=("text", "json"), default=default("text"),
        help="log lines as text or JSON",
    )  # fmt: skip


def int_arg(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``, else a usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not a whole number from {low} to {high}")
        return value

    return parse


def duration_arg(text: str) -> float | None:
    """``parse_duration`` for argparse: seconds, None when ``text`` is not a duration."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def age_arg(text: str) -> float:
    """An argparse type: an age such as 90d, 2w, 12h or 0d, in seconds."""
    age = duration_arg(text)
    if age is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age like 90d, 2w, 12h or 0d")
    return age


def since_arg(text: str) -> datetime:
    """``--since``: an age (7d) or an ISO date, as the naive UTC the state stores."""
    age = duration_arg(text)
    if age is not None:
        return utcnow() - timedelta(seconds=age)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an age (7d, 12h) nor an ISO date"
        ) from None
    # An explicit offset is honoured; a date without one is taken as UTC.
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


def settings_for(args: argparse.Namespace) -> Settings:
    """The settings of the config file the flags (or the environment) name."""
    # Commands that never call Gist need no API key (nor its ${GIST_API_KEY}).
    return load_settings(
        resolve_config_path(args.config, os.environ), gist=getattr(args, "needs_gist", True)
    )


@contextmanager
def open_state(settings: Settings, *, writes: bool = True) -> Iterator[Engine]:
    """``db.open_state``, whose errors about ``state.url`` itself (a missing folder, a
    missing driver) name the config file that set it, as every config error does."""
    with ExitStack() as stack:
        try:
            engine = stack.enter_context(db.open_state(settings, writes=writes))
        except StateError as exc:
            raise naming_config(exc, settings) from None
        yield engine


def naming_config(error: StateError, settings: Settings) -> StateError:
    """``error`` with the config file's path in front when it is about ``state.url``."""
    text = str(error)
    return StateError(f"{settings.path}: {text}") if text.startswith("state.url") else error


def again(args: argparse.Namespace, *words: str) -> str:
    """A command line to run next, with the ``--config`` this one was given."""
    line = ["audience-sync", *words]
    if args.config:
        line += ["--config", args.config]
    return shlex.join(line)


def command_name(args: argparse.Namespace) -> str:
    """The command as typed: ``run``, ``db upgrade``."""
    return " ".join(w for w in (args.command, getattr(args, "db_command", None)) if w)
