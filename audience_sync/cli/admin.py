"""Getting started and keeping the tool in shape: ``demo``, ``init``, ``fake-gist``,
``completion`` and ``db upgrade``."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from argcomplete.shell_integration import shellcode

from audience_sync import db
from audience_sync.cli.options import Commands, int_arg, naming_config, settings_for
from audience_sync.cli.output import EXIT_INTERRUPTED, EXIT_OK
from audience_sync.config import redact_url
from audience_sync.errors import ConfigError, StateError
from audience_sync.fakegist import DEFAULT_KEY, DEFAULT_PORT
from audience_sync.starter import write_starter

SHELLS = ("bash", "zsh", "fish")
log = logging.getLogger(__package__)


def register(commands: Commands) -> None:
    """``demo``, ``init``, ``fake-gist``, ``completion`` and ``db upgrade``."""
    demo = commands.add(
        "demo", "see a whole sync cycle against a local fake Gist",
        "Start the bundled fake Gist on 127.0.0.1, seed example audiences, run two syncs with "
        "a change in between and show the history. Needs no Gist account.",
        handler=cmd_demo,
    )  # fmt: skip
    demo.add_argument("--keep", metavar="DIR", type=Path, help="keep the demo's files here")

    init = commands.add(
        "init", "write a starter config and example CSV",
        "Write a commented starter config (audience_sync.toml) and an example members CSV "
        "into DIR, then print the next two commands. Never overwrites a file.",
        handler=cmd_init,
    )  # fmt: skip
    init.add_argument(
        "dir", metavar="DIR", nargs="?", type=Path, default=Path("."),
        help="where to write them (default: the current folder)",
    )  # fmt: skip

    fake = commands.add(
        "fake-gist", "serve a local fake Gist to try a config against",
        "Serve the fake Gist the demo and the tests use, on 127.0.0.1, in the foreground until "
        "Ctrl-C or SIGTERM, and print the base_url and API key to paste. Its contacts live in "
        "memory: each start is an empty Gist. Needs no Gist account.",
        handler=cmd_fake_gist, needs_gist=False,
    )  # fmt: skip
    fake.add_argument(
        "--port", type=int_arg(0, 65535), default=DEFAULT_PORT,
        help=f"port on 127.0.0.1 (default {DEFAULT_PORT}; 0 picks a free one)",
    )  # fmt: skip
    fake.add_argument(
        "--api-key", metavar="KEY", default=DEFAULT_KEY,
        help=f"the key it accepts (default {DEFAULT_KEY})",
    )  # fmt: skip

    completion = commands.add(
        "completion", "print a shell's tab-completion script",
        "Print the tab-completion script for bash, zsh or fish. Load it from your shell's "
        'start-up file, e.g. `eval "$(audience-sync completion bash)"` in ~/.bashrc.',
        handler=cmd_completion,
    )  # fmt: skip
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete in")

    database = commands.add("db", "state database maintenance", "State database maintenance.")
    db_commands = database.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser(
        "upgrade", parents=[commands.common],
        help="migrate the state database to the newest schema",
        description="Migrate the state database to the newest schema.",
    )  # fmt: skip
    upgrade.set_defaults(handler=cmd_db_upgrade, needs_gist=False)


def cmd_demo(args: argparse.Namespace) -> int:
    from audience_sync.demo import run_demo  # imported here: only the demo needs it

    try:
        return run_demo(sys.stdout, keep=args.keep)
    except KeyboardInterrupt:
        if sys.stderr.isatty():
            print(file=sys.stderr)  # off the line the ^C was echoed on
        log.warning("demo interrupted")
        return EXIT_INTERRUPTED


def cmd_init(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    written = write_starter(folder)
    here = folder.resolve() == Path.cwd().resolve()
    config = written[0]
    flag = "" if here else f" --config {shlex.quote(str(config))}"
    print(f"Wrote {', '.join(str(p) for p in written)}. Next:")
    print(f"  GIST_API_KEY=placeholder audience-sync run{flag} --dry-run   # plan, send nothing")
    print(f"  export GIST_API_KEY=...; audience-sync run{flag}   # edit the config first")
    return EXIT_OK


def cmd_fake_gist(args: argparse.Namespace) -> int:
    from audience_sync.fakegist import FakeGist, serve

    def ready(gist: FakeGist) -> None:
        # Flushed at once: a script (or a test) waits for these lines to know it is up.
        print(
            f"Fake Gist at {gist.url}: an empty Gist in memory, until Ctrl-C.\n"
            "Paste into your config's [gist] section and into the shell that runs "
            f"audience-sync:\n\n"
            f'    base_url = "{gist.url}"\n'
            f"    export GIST_API_KEY={shlex.quote(args.api_key)}\n",
            flush=True,
        )

    try:
        serve(FakeGist(args.api_key, port=args.port), ready)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve the fake Gist on 127.0.0.1:{args.port}: {exc.strerror or exc}; "
            "give another --port (0 picks a free one)"
        ) from None
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    print(shellcode(["audience-sync"], shell=args.shell), end="")
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    with db.state_errors(settings.state.url):
        try:
            engine = db.make_engine(settings.state.url, schema=settings.state.db_schema)
        except StateError as exc:
            raise naming_config(exc, settings) from None
        try:
            if settings.state.db_schema:
                db.create_schema(engine, settings.state.db_schema)
            before, after = db.upgrade(engine)
        finally:
            engine.dispose()
    shown = redact_url(settings.state.url)
    if before == after:
        print(f"{shown} is already at revision {after} (the newest)")
    else:
        print(f"{shown}: migrated {before or 'empty'} → {after}")
    return EXIT_OK
