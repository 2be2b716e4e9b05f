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
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from audience_sync import __version__, db
from audience_sync.alerts import send_alerts
from audience_sync.config import (
    Settings,
    load_settings,
    parse_duration,
    redact_url,
    resolve_config_path,
)
from audience_sync.errors import AudienceSyncError, ConfigError, StateError
from audience_sync.history import load_last_starts, load_orphans, load_run, load_runs, prune
from audience_sync.metrics import Metrics, MetricsServer
from audience_sync.render import JsonFormatter, ProgressBars, render_table
from audience_sync.scheduler import Daemon
from audience_sync.sources import source_for
from audience_sync.statuses import RUN_STATUSES, Mode
from audience_sync.sync import Progress, RunResult, exit_code, run_once, utcnow
from audience_sync.verify import verify_audience

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3
SignalHandler = Callable[[int, FrameType | None], None]
log = logging.getLogger(__name__)

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
CHANGE_COLUMNS = (
    "user_id", "email", "value", "status", "attempts", "http_status", "last_error",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    sys.exit(run_cli(argv))


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.log_format)
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
    common.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log lines as text or JSON"
    )
    syncing = argparse.ArgumentParser(add_help=False)
    syncing.add_argument("--dry-run", action="store_true", help="plan and print, send nothing")
    syncing.add_argument("--json", action="store_true", help="print the results as JSON")
    syncing.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bars or table; errors only"
    )
    syncing.add_argument(
        "--metrics-file", metavar="PATH", type=Path,
        help="write Prometheus metrics for node-exporter's textfile collector",
    )  # fmt: skip

    parser = argparse.ArgumentParser(
        prog="audience-sync",
        description="Keep Gist contacts' audience properties in step with audience membership.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str, *parents: Any) -> Any:
        sub = commands.add_parser(
            name, parents=[common, *parents], help=summary, description=description
        )
        return sub

    run = command(
        "run", "sync audiences once (what cron calls)",
        "Read each audience's source, diff it against what Gist acknowledged and send only "
        "the changes.", syncing,
    )  # fmt: skip
    run.add_argument(
        "--audience", action="append", default=[], metavar="KEY",
        help="sync only this audience (by property key); repeat for several",
    )  # fmt: skip
    run.add_argument(
        "--allow-mass-exit", action="store_true",
        help="send even when a run would remove more than the audience's mass-exit threshold",
    )  # fmt: skip
    run.set_defaults(handler=cmd_run)

    backfill = command(
        "backfill", "resend an audience's full membership",
        "Send true to every current member of the audience, whatever Gist acknowledged "
        "before (for a new or reset Gist workspace). An unfinished backfill is resumed.",
        syncing,
    )  # fmt: skip
    backfill.add_argument("key", metavar="KEY", help="the audience's property key")
    backfill.set_defaults(handler=cmd_backfill)

    retire = command(
        "retire", "unset a removed audience in Gist and forget it",
        "Send false to every member still acknowledged in an audience that was removed from "
        "the config (or renamed), then forget its state.", syncing,
    )  # fmt: skip
    retire.add_argument("key", metavar="KEY", help="the retired audience's property key")
    retire.set_defaults(handler=cmd_retire)

    history = command("history", "list recent runs", "List recent runs, newest first.")
    history.add_argument("--audience", metavar="KEY", help="only runs of this audience")
    history.add_argument(
        "--status", choices=RUN_STATUSES, metavar="STATUS",
        help=f"only runs with this status: {', '.join(RUN_STATUSES)}",
    )  # fmt: skip
    history.add_argument(
        "--since", metavar="WHEN", help="only runs started since: 7d, 12h, or an ISO date"
    )
    history.add_argument("--limit", "-n", type=int, default=20, help="how many runs (default 20)")
    history.add_argument("--json", action="store_true", help="print a JSON array")
    history.set_defaults(handler=cmd_history)

    show = command(
        "show", "one run with its changes and rejected rows",
        "Show one run: counts, timings, error, its changes (failed first) and rejected rows.",
    )  # fmt: skip
    show.add_argument("run_id", type=int, metavar="RUN_ID")
    show.add_argument("--limit", "-n", type=int, default=100, help="changes/rows per page")
    show.add_argument("--page", type=int, default=1, help="which page of changes/rows (from 1)")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    show.set_defaults(handler=cmd_show)

    prune_cmd = command(
        "prune", "delete old per-member history",
        "Delete member_changes and rejected_rows of runs older than the given age; sync_runs "
        "summaries are kept.",
    )  # fmt: skip
    prune_cmd.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 90d, 12h")
    prune_cmd.add_argument("--json", action="store_true", help="print counts as JSON")
    prune_cmd.set_defaults(handler=cmd_prune)

    audiences = command(
        "audiences", "list configured audiences (validates the config)",
        "List configured audiences with name, property key, source and schedule.",
    )  # fmt: skip
    audiences.add_argument("--json", action="store_true", help="print a JSON array")
    audiences.set_defaults(handler=cmd_audiences)

    verify = command(
        "verify", "check a sample of members against Gist",
        "Read back a random sample of members from Gist and report how many carry the "
        "expected property value (drift from edits made in Gist itself).",
    )  # fmt: skip
    verify.add_argument("key", metavar="KEY", help="the audience's property key")
    verify.add_argument("--sample", type=int, default=100, help="members to check (default 100)")
    verify.add_argument(
        "--repair", action="store_true", help="re-plan drifted members for the next run"
    )
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(handler=cmd_verify)

    daemon = command(
        "daemon", "run audiences on their schedules",
        "Run each audience on its `schedule` (cron) or `every` (interval) until SIGTERM. "
        "SIGHUP reloads the config.",
    )  # fmt: skip
    daemon.add_argument("--once", action="store_true", help="run every due audience now, exit")
    daemon.set_defaults(handler=cmd_daemon)

    demo = command(
        "demo", "see a whole sync cycle against a local fake Gist",
        "Start the bundled fake Gist on 127.0.0.1, seed example audiences, run two syncs with "
        "a change in between and show the history. Needs no Gist account.",
    )  # fmt: skip
    demo.add_argument("--keep", metavar="DIR", type=Path, help="keep the demo's files here")
    demo.set_defaults(handler=cmd_demo)

    database = command("db", "state database maintenance", "State database maintenance.")
    db_commands = database.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser(
        "upgrade", parents=[common], help="migrate the state database to the newest schema",
        description="Migrate the state database to the newest schema.",
    )  # fmt: skip
    upgrade.set_defaults(handler=cmd_db_upgrade)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    return _sync_command(args, "run", args.audience, allow_mass_exit=args.allow_mass_exit)


def cmd_backfill(args: argparse.Namespace) -> int:
    return _sync_command(args, "backfill", [args.key])


def cmd_retire(args: argparse.Namespace) -> int:
    return _sync_command(args, "retire", [args.key])


def _sync_command(
    args: argparse.Namespace, mode: Mode, keys: Sequence[str], *, allow_mass_exit: bool = False
) -> int:
    settings = _settings(args)
    metrics = Metrics()
    show_progress = sys.stderr.isatty() and not (args.quiet or args.json)
    bars: AbstractContextManager[Progress | None] = (
        ProgressBars(sys.stderr) if show_progress else nullcontext(None)
    )
    with _state(settings) as engine, _stop_on_signals() as stop, bars as progress:
        results = run_once(
            settings,
            engine,
            keys,
            mode=mode,
            dry_run=args.dry_run,
            allow_mass_exit=allow_mass_exit,
            stop=stop,
            observer=metrics.observe_request,
            progress=progress,
        )
        orphans = load_orphans(engine, [a.property_key for a in settings.computations])
    metrics.record_results(results)
    if args.metrics_file:
        metrics.write_textfile(args.metrics_file)
    if not args.dry_run:
        send_alerts(settings.alerts, results)
    if mode == "run":
        for key, count in orphans.items():
            log.warning(
                "audience %r is no longer configured but Gist may still hold %d of its members: "
                "run `audience-sync retire %s` to send them false and forget it",
                key, count, key,
            )  # fmt: skip
    _print_results(results, args)
    return exit_code(results)


def _print_results(results: Sequence[RunResult], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return
    if not args.quiet:
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
        render_table(rows, RUN_COLUMNS, sys.stdout, tty=sys.stdout.isatty())
    for r in results:
        if r.error:
            print(f"{r.audience_key}: {r.error}", file=sys.stdout if not args.quiet else sys.stderr)


def cmd_history(args: argparse.Namespace) -> int:
    since = _parse_since(args.since) if args.since else None
    with _state(_settings(args)) as engine:
        runs = load_runs(engine, args.audience, args.limit, status=args.status, since=since)
    if args.json:
        print(json.dumps(runs, indent=2))
    elif not runs:
        print("No runs match." if args.audience or args.status or args.since else "No runs yet.")
    else:
        render_table(runs, HISTORY_COLUMNS, sys.stdout, tty=sys.stdout.isatty())
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    if args.page < 1 or args.limit < 1:
        raise ConfigError("--page and --limit must be at least 1")
    with _state(_settings(args)) as engine:
        run = load_run(engine, args.run_id, args.limit, (args.page - 1) * args.limit)
    if run is None:
        print(f"error: no run with id {args.run_id}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(run, indent=2))
        return EXIT_OK
    for field in SHOW_FIELDS:
        print(f"{field + ':':<13}{run[field] if run[field] is not None else '-'}")
    tty = sys.stdout.isatty()
    by_status = ", ".join(f"{k} {v}" for k, v in sorted(run["changes_by_status"].items()))
    print(f"\nChanges ({by_status or 'none'}), page {args.page}:")
    if run["changes"]:
        render_table(run["changes"], CHANGE_COLUMNS, sys.stdout, tty=tty)
    if run["rejected_rows"]:
        print(f"\nRejected rows ({run['rejected']}), page {args.page}:")
        columns = ("row_number", "user_id", "email", "reason")
        render_table(run["rejected_rows"], columns, sys.stdout, tty=tty)
    total = max(sum(run["changes_by_status"].values()), run["rejected"])
    if args.page * args.limit < total:
        print(f"\nMore: audience-sync show {args.run_id} --page {args.page + 1}")
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    age = parse_duration(args.older_than)
    if age is None:
        raise ConfigError(f"--older-than {args.older_than!r} is not an age like 90d or 12h")
    with _state(_settings(args)) as engine:
        deleted = prune(engine, utcnow() - timedelta(seconds=age))
    if args.json:
        print(json.dumps(deleted))
    else:
        print(", ".join(f"{count} {table} deleted" for table, count in deleted.items()))
    return EXIT_OK


def cmd_audiences(args: argparse.Namespace) -> int:
    settings = _settings(args)
    rows = [
        {
            "name": a.name,
            "key": a.property_key,
            "kind": "trait" if a.is_trait else "audience",
            "source": source_for(settings, a).description,
            "schedule": a.schedule or (f"every {a.every}" if a.every else None),
        }
        for a in settings.computations
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        columns = ("key", "kind", "name", "source", "schedule")
        render_table(rows, columns, sys.stdout, tty=sys.stdout.isatty())
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    settings = _settings(args)
    settings.audience(args.key)  # a clear error for a key that is not configured
    with _state(settings) as engine:
        report = verify_audience(settings, engine, args.key, sample=args.sample, repair=args.repair)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(
            f"{report.audience_key}: {report.matching} of {report.sampled} sampled members "
            f"carry the expected value; {len(report.drifted)} drifted"
            + (f", {report.repaired} re-planned for the next run" if args.repair else "")
        )
        if report.drifted:
            rows = [asdict(d) for d in report.drifted]
            columns = ("user_id", "expected", "actual", "reason")
            render_table(rows, columns, sys.stdout, tty=sys.stdout.isatty())
    return EXIT_OK if not report.drifted else EXIT_FAILED


def cmd_daemon(args: argparse.Namespace) -> int:
    # One line per run is the daemon's own log, shown without -v.
    logging.getLogger("audience_sync.scheduler").setLevel(logging.INFO)
    settings = _settings(args)
    metrics = Metrics()
    with _state(settings) as engine:

        def sync(current: Settings, keys: list[str], stop: threading.Event) -> list[RunResult]:
            return run_once(current, engine, keys, stop=stop, observer=metrics.observe_request)

        def on_results(results: list[RunResult]) -> None:
            metrics.record_results(results)
            send_alerts(daemon.settings.alerts, results)

        daemon = Daemon(
            lambda: _settings(args),
            sync,
            lambda: load_last_starts(engine),
            on_results=on_results,
        )
        if args.once:
            return exit_code(daemon.run_due())
        server = None
        if settings.daemon.metrics_port is not None:
            server = MetricsServer(
                metrics,
                settings.daemon.metrics_host,
                settings.daemon.metrics_port,
                lambda: (True, {"status": "ok", "audiences": sorted(daemon.jobs())}),
            ).start()
            print(f"serving /metrics and /healthz at {server.url}", file=sys.stderr, flush=True)
        with _daemon_signals(daemon):
            try:
                return daemon.serve()
            finally:
                if server is not None:
                    server.stop()


def cmd_demo(args: argparse.Namespace) -> int:
    from audience_sync.demo import run_demo  # imported here: only the demo needs it

    return run_demo(sys.stdout, keep=args.keep)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with _state(settings, migrate=True) as engine:
        revision = db.current_revision(engine)
    print(f"{redact_url(settings.state.url)} is at revision {revision}")
    return EXIT_OK


def _parse_since(text: str) -> datetime:
    """``--since``: an age (7d) or an ISO date, as the naive UTC the state stores."""
    age = parse_duration(text)
    if age is not None:
        return utcnow() - timedelta(seconds=age)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r} is neither an age (7d, 12h) nor an ISO date") from None
    # An explicit offset is honoured; a date without one is taken as UTC.
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(resolve_config_path(args.config, os.environ))


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM or Ctrl-C asks the run to stop gracefully; a second one stops it at once."""
    stop = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning(
            "%s: finishing requests in flight, then stopping (again to stop now)",
            signal.Signals(signum).name,
        )
        stop.set()

    with _signal_handlers({signal.SIGTERM: handle, signal.SIGINT: handle}):
        yield stop


@contextmanager
def _daemon_signals(daemon: Daemon) -> Iterator[None]:
    """SIGTERM/SIGINT stop the daemon after the running sync; SIGHUP reloads the config."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.warning("%s: stopping after the running sync", signal.Signals(signum).name)
        daemon.request_stop()

    def reload(_signum: int, _frame: FrameType | None) -> None:
        log.warning("SIGHUP: reloading the config")
        daemon.reload()

    with _signal_handlers({signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: reload}):
        yield


@contextmanager
def _signal_handlers(
    handlers: dict[signal.Signals, Callable[[int, FrameType | None], None]],
) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
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


def _setup_logging(verbosity: int, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.set_name("audience-sync")
    root = logging.getLogger()
    # Replace only our own handler: others (a test's log capture, say) stay.
    root.handlers = [h for h in root.handlers if h.get_name() != "audience-sync"] + [handler]
    root.setLevel(logging.WARNING if verbosity == 0 else logging.INFO)
    # httpx logs one line per request at INFO: only at -vv.
    logging.getLogger("httpx").setLevel(logging.INFO if verbosity >= 2 else logging.WARNING)
