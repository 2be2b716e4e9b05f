"""The parser and the entry point: one sub-command per way of using audience-sync, each
declared by its command group's module, and every error mapped to one line and an exit code.

Exit codes: 0 all good; 1 a run partial, failed, guarded or interrupted (or an unexpected
error); 2 usage, config or state-database error; 3 an audience skipped because another
process holds its lease; 130 Ctrl-C outside a sync.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import os
import sys
from collections.abc import Sequence

import argcomplete

from audience_sync import __version__
from audience_sync.cli import admin, audiences, checking, history, syncing, ui
from audience_sync.cli.options import Commands, add_global_options, command_name
from audience_sync.cli.output import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    detach_stdout,
    logging_to_stderr,
    report_error,
    usage_error,
)
from audience_sync.cli.signals import StopNow
from audience_sync.errors import AudienceSyncError, ConfigError, StateError

HELP_WIDTH = 96  # docs/cli.md's CLI reference is generated at this width, whatever the terminal
log = logging.getLogger(__package__)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (or the command line), run the command, return its exit code."""
    parser = build_parser()
    # Answers a shell's tab-completion request and exits; returns at once otherwise.
    argcomplete.autocomplete(parser)
    return run_cli(argv, parser)


def run_cli(
    argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> int:
    """Run one command and return its exit code; every error becomes one line on stderr."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = parser or build_parser()
    # A usage error comes before the options are parsed: look for the log format by hand.
    json_logs = any(
        word == "--log-format=json" or (word == "--log-format" and following == "json")
        for word, following in itertools.pairwise([*words, ""])
    )
    for each in (parser, *command_parsers(parser).values()):
        each.error = functools.partial(usage_error, each, json_logs)  # type: ignore[method-assign]
    if not words:
        # No command at all: a newcomer's first try. The commands, not only the usage line.
        parser.print_help(sys.stderr)
        print(f"\n{parser.prog}: error: no command given", file=sys.stderr)
        return EXIT_USAGE
    args, extra = parser.parse_known_args(words)
    if extra:
        # argparse blames the top parser (its usage) for words a command does not know:
        # the command's own usage is the one that helps.
        name = command_name(args)
        command_parsers(parser).get(name, parser).error(
            f"unrecognized arguments: {' '.join(extra)}"
        )
    with logging_to_stderr(args.verbose, args.log_format):
        try:
            code: int = args.handler(args)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            # The reader left (`| head`): not an error of ours, and nothing more to say.
            detach_stdout()
            return EXIT_OK
        except (ConfigError, StateError) as exc:
            report_error(str(exc))
            return EXIT_USAGE
        except AudienceSyncError as exc:
            report_error(str(exc))
            return EXIT_FAILED
        except StopNow:
            report_error("stopped at once by a second signal; the next run resumes")
            return EXIT_FAILED
        except KeyboardInterrupt:
            # A Ctrl-C no handler of ours asked for (a command that does not sync): stop,
            # quietly, as a shell expects.
            return EXIT_INTERRUPTED
        except Exception as exc:
            log.debug("traceback of the unexpected error", exc_info=True)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            report_error(
                f"`{command_name(args)}` failed unexpectedly: {type(exc).__name__}"
                + (f": {first}" if first else "")
                + " (-vv shows the traceback)"
            )
            return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one sub-command per way of using audience-sync."""
    parser = argparse.ArgumentParser(
        prog="audience-sync",
        description="Keep Gist contacts' audience properties in step with audience membership.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # The global options go before the command or after it; given after, they win.
    add_global_options(parser, argparse_default=True)
    commands = Commands(parser)
    # In the order `--help` lists them.
    syncing.register(commands)
    history.register(commands)
    ui.register(commands)
    audiences.register(commands)
    checking.register(commands)
    syncing.register_daemon(commands)
    admin.register(commands)
    return parser


def command_parsers(
    parser: argparse.ArgumentParser | None = None,
) -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its name (``db upgrade`` for a nested one), in order."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(current: argparse.ArgumentParser, prefix: str) -> None:
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found[f"{prefix}{name}"] = sub
                    walk(sub, f"{prefix}{name} ")

    walk(parser or build_parser(), "")
    return found


def help_pages() -> list[tuple[str, str]]:
    """``--help`` of the program and of each command that runs (``db`` is only a group), as
    docs/cli.md's CLI reference shows them."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_WIDTH)  # argparse wraps help to the terminal's width
    try:
        parser = build_parser()
        pages = [("", parser.format_help())]
        for name, sub in command_parsers(parser).items():
            if sub.get_default("handler") is not None:
                pages.append((name, sub.format_help()))
        return pages
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
