"""The ``audience-sync`` command line: parse flags, build objects, call the library, render.

Exit codes: 0 all good; 1 a run partial, failed, guarded or interrupted; 2 usage, config
or state-database error; 3 an audience skipped because another process holds its lease.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from types import FrameType
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from audience_sync import __version__, db
from audience_sync.config import Settings, load_settings, redact_url, resolve_config_path
from audience_sync.errors import AudienceSyncError, ConfigError, StateError
from audience_sync.history import load_run, load_runs
from audience_sync.sources import source_for
from audience_sync.sync import exit_code, run_once

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3

RUN_COLUMNS = (
    "audience", "kind", "status", "members", "entered", "exited", "rejected", "delivered",
    "failed", "run",
)  # fmt: skip
HISTORY_COLUMNS = (
    "id", "audience", "kind", "status", "started_at", "members", "entered", "exited",
    "delivered", "failed", "rejected",
)  # fmt: skip
SHOW_FIELDS = (
    "id", "audience", "kind", "status", "started_at", "finished_at", "source_rows", "members",
    "entered", "exited", "delivered", "failed", "rejected", "error",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    sys.exit(run_cli(argv))


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        code: int = args.handler(args)
        return code
    except (ConfigError, StateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AudienceSyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except SQLAlchemyError as exc:
        print(f"error: state database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one sub-command per way of using audience-sync."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $AUDIENCE_SYNC_CONFIG, else ./audience_sync.toml)",
    )
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="log progress (-vv: every request)"
    )
    parser = argparse.ArgumentParser(
        prog="audience-sync",
        description="Keep Gist contacts' audience properties in step with audience membership.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", parents=[common], help="sync audiences once (what cron calls)",
        description="Read each audience's source, diff it against what Gist acknowledged and "
        "send only the changes.",
    )  # fmt: skip
    run.add_argument(
        "--audience", action="append", default=[], metavar="KEY",
        help="sync only this audience (by property key); repeat for several",
    )  # fmt: skip
    run.add_argument("--dry-run", action="store_true", help="plan and print, send nothing")
    run.add_argument(
        "--allow-mass-exit", action="store_true",
        help="send even when a run would remove more than the audience's mass-exit threshold",
    )  # fmt: skip
    run.add_argument("--json", action="store_true", help="print the results as JSON")
    run.set_defaults(handler=cmd_run)

    history = commands.add_parser(
        "history", parents=[common], help="list recent runs, newest first",
        description="List recent runs, newest first.",
    )  # fmt: skip
    history.add_argument("--audience", metavar="KEY", help="only runs of this audience")
    history.add_argument("--limit", "-n", type=int, default=20, help="how many runs (default 20)")
    history.add_argument("--json", action="store_true", help="print a JSON array")
    history.set_defaults(handler=cmd_history)

    show = commands.add_parser(
        "show", parents=[common], help="one run with its changes and rejected rows",
        description="Show one run: counts, timings, error, its changes and rejected rows.",
    )  # fmt: skip
    show.add_argument("run_id", type=int, metavar="RUN_ID")
    show.add_argument(
        "--limit", "-n", type=int, default=100, help="changes and rejected rows to list"
    )
    show.add_argument("--json", action="store_true", help="print a JSON object")
    show.set_defaults(handler=cmd_show)

    audiences = commands.add_parser(
        "audiences", parents=[common], help="list configured audiences (validates the config)",
        description="List configured audiences with name, property key and source.",
    )  # fmt: skip
    audiences.add_argument("--json", action="store_true", help="print a JSON array")
    audiences.set_defaults(handler=cmd_audiences)

    database = commands.add_parser(
        "db", parents=[common], help="state database maintenance",
        description="State database maintenance.",
    )  # fmt: skip
    db_commands = database.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser(
        "upgrade", parents=[common], help="migrate the state database to the newest schema",
        description="Migrate the state database to the newest schema.",
    )  # fmt: skip
    upgrade.set_defaults(handler=cmd_db_upgrade)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with _state(settings) as engine, _stop_on_signals() as stop:
        results = run_once(
            settings,
            engine,
            args.audience,
            dry_run=args.dry_run,
            allow_mass_exit=args.allow_mass_exit,
            stop=stop,
        )
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        if args.dry_run:
            print("Dry run: nothing was sent to Gist.\n")
        rows = [
            {
                "audience": r.audience_key, "kind": r.kind, "status": r.status,
                "members": r.members, "entered": r.entered, "exited": r.exited,
                "rejected": r.rejected, "delivered": r.delivered, "failed": r.failed,
                "run": r.run_id if r.run_id is not None else "-",
            }
            for r in results
        ]  # fmt: skip
        print(render_table(rows, RUN_COLUMNS))
        for r in results:
            if r.error:
                print(f"\n{r.audience_key}: {r.error}")
    return exit_code(results)


def cmd_history(args: argparse.Namespace) -> int:
    with _state(_settings(args)) as engine:
        runs = load_runs(engine, args.audience, args.limit)
    if args.json:
        print(json.dumps(runs, indent=2))
    elif not runs:
        print("No runs yet.")
    else:
        print(render_table(runs, HISTORY_COLUMNS))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    with _state(_settings(args)) as engine:
        run = load_run(engine, args.run_id, args.limit)
    if run is None:
        print(f"error: no run with id {args.run_id}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(run, indent=2))
        return EXIT_OK
    for field in SHOW_FIELDS:
        print(f"{field + ':':<13}{run[field] if run[field] is not None else '-'}")
    by_status = ", ".join(f"{k} {v}" for k, v in sorted(run["changes_by_status"].items()))
    print(f"\nChanges ({by_status or 'none'}):")
    if run["changes"]:
        print(render_table(run["changes"], ("user_id", "email", "value", "status", "attempts",
                                            "http_status", "last_error")))  # fmt: skip
    if run["rejected_rows"]:
        print(f"\nRejected rows ({run['rejected']}):")
        print(render_table(run["rejected_rows"], ("row_number", "user_id", "email", "reason")))
    return EXIT_OK


def cmd_audiences(args: argparse.Namespace) -> int:
    settings = _settings(args)
    rows = [
        {
            "name": a.name,
            "key": a.property_key,
            "source": source_for(settings, a).description,
            "schedule": a.schedule,
        }
        for a in settings.audiences
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(render_table(rows, ("key", "name", "source", "schedule")))
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with _state(settings, migrate=True) as engine:
        revision = db.current_revision(engine)
    print(f"{redact_url(settings.state.url)} is at revision {revision}")
    return EXIT_OK


def render_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as aligned plain-text columns (numbers right-aligned)."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), int) for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        cells = zip(values, widths, numeric, strict=True)
        parts = [v.rjust(w) if n else v.ljust(w) for v, w, n in cells]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(columns)), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    return text if len(text) <= 60 else text[:59] + "…"


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(resolve_config_path(args.config, os.environ))


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM or Ctrl-C asks the run to stop gracefully; a second one stops it at once."""
    stop = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        logging.getLogger(__name__).warning(
            "%s: finishing requests in flight, then stopping (again to stop now)",
            signal.Signals(signum).name,
        )
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _state(settings: Settings, *, migrate: bool = False) -> Iterator[Engine]:
    """The state database, at head (see ``db.ensure_schema``), closed afterwards."""
    engine = db.make_engine(settings.state.url)
    try:
        if migrate:
            db.upgrade(engine)
        else:
            db.ensure_schema(engine)
        yield engine
    finally:
        engine.dispose()


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs one line per request at INFO: only at -vv.
    logging.getLogger("httpx").setLevel(logging.INFO if verbosity >= 2 else logging.WARNING)
