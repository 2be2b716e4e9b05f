"""The ``audience-sync`` command line: parse flags, build objects, call the library, render.

Exit codes: 0 all good; 1 a run partial, failed, guarded or interrupted (or an unexpected
error); 2 usage, config or state-database error; 3 an audience skipped because another
process holds its lease.
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import argcomplete
from argcomplete.shell_integration import shellcode
from sqlalchemy import Engine

from audience_sync import __version__, db
from audience_sync.alerts import Alert, AlertMemory, AlertSender, post_alert, select_alerts
from audience_sync.config import (
    Settings,
    load_settings,
    parse_duration,
    redact_url,
    resolve_config_path,
)
from audience_sync.errors import ApiError, AudienceSyncError, AuthError, ConfigError, StateError
from audience_sync.history import (
    load_last_starts,
    load_last_successes,
    load_orphans,
    load_recent_statuses,
    load_run,
    load_runs,
    prune,
)
from audience_sync.metrics import Metrics, MetricsServer
from audience_sync.render import (
    JsonFormatter,
    ProgressBars,
    ProgressLog,
    output_json,
    output_rows,
    short_time,
)
from audience_sync.runs import result_fields
from audience_sync.scheduler import Daemon
from audience_sync.sources import source_for
from audience_sync.starter import write_starter
from audience_sync.statuses import RUN_STATUSES, Mode
from audience_sync.sync import Progress, RunResult, exit_code, run_once, utcnow
from audience_sync.verify import verify_audience
from audience_sync.workers import Presence, list_workers

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3
# Bounds of numeric flags: large enough for any real use, small enough for every database.
MAX_ROWS, MAX_PAGE, MAX_SAMPLE, MAX_ID = 100_000, 1_000_000_000, 100_000, 2**63 - 1
ALERT_STOP_GRACE = 5.0  # seconds a stopping daemon gives alerts still being posted
SignalHandler = Callable[[int, FrameType | None], None]
log = logging.getLogger(__name__)

# One vocabulary for runs in every output: `run_id` and `audience`, as in tables. The old
# names (`audience_key` in `run --json`, `id` in `history`/`show --json`) stay one release.
RUN_COLUMNS = (
    "audience", "kind", "status", "members", "entered", "exited", "rejected", "delivered",
    "failed", "run_id",
)  # fmt: skip
RUN_OPTIONAL = ("run_id", "entered", "exited", "failed", "delivered", "members", "rejected", "kind")
HISTORY_COLUMNS = (
    "run_id", "audience", "kind", "status", "started_at", "members", "entered", "exited",
    "delivered", "failed", "rejected",
)  # fmt: skip
HISTORY_OPTIONAL = (
    "started_at", "entered", "exited", "failed", "delivered", "members", "rejected", "kind",
)  # fmt: skip
SHOW_FIELDS = (
    "run_id", "audience", "kind", "status", "started_at", "finished_at", "source_rows",
    "members", "entered", "exited", "resent", "delivered", "failed", "rejected",
    "email_conflicts", "fast_path", "error",
)  # fmt: skip
CHANGE_COLUMNS = (
    "user_id", "email", "value", "status", "event", "attempts", "http_status", "last_error",
)  # fmt: skip
CHANGE_OPTIONAL = ("http_status", "attempts", "event")
# Loggers that chatter at INFO: shown from -vv on, never at -v.
CHATTY = ("alembic", "apscheduler", "httpx")
# psycopg warns of errors it ignored while cleaning up after one we report: -vv only.
SECOND_HAND = ("psycopg",)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    parser = build_parser()
    # Answers a shell's tab-completion request and exits; returns at once otherwise.
    argcomplete.autocomplete(parser)
    sys.exit(run_cli(argv, parser))


def run_cli(
    argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> int:
    """Run one command and return its exit code; every error becomes one line on stderr."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = parser or build_parser()
    # A usage error comes before the options are parsed: look for the log format by hand.
    json_logs = any(
        word == "--log-format=json" or (word == "--log-format" and following == "json")
        for word, following in zip(words, [*words[1:], ""], strict=True)
    )
    for each in (parser, *command_parsers(parser).values()):
        each.error = functools.partial(_usage_error, each, json_logs)  # type: ignore[method-assign]
    args = parser.parse_args(words)
    with _logging(args.verbose, args.log_format):
        try:
            code: int = args.handler(args)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            # The reader left (`| head`): not an error of ours, and nothing more to say.
            _detach_stdout()
            return EXIT_OK
        except (ConfigError, StateError) as exc:
            _report_error(str(exc), args)
            return EXIT_USAGE
        except AudienceSyncError as exc:
            _report_error(str(exc), args)
            return EXIT_FAILED
        except KeyboardInterrupt:
            _report_error("stopped at once by a second signal; the next run resumes", args)
            return EXIT_FAILED
        except Exception as exc:
            log.debug("traceback of the unexpected error", exc_info=True)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _report_error(
                f"`{_command_name(args)}` failed unexpectedly: {type(exc).__name__}"
                + (f": {first}" if first else "")
                + " (-vv shows the traceback)",
                args,
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
    _add_global_options(parser, argparse_default=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, argparse_default=False)
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

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str,
        summary: str,
        description: str,
        *parents: Any,
        handler: Callable[[argparse.Namespace], int] | None = None,
        needs_gist: bool = True,
        json: str | None = None,
    ) -> Any:
        """A sub-command calling ``handler``; ``json``: the help of its ``--json`` flag."""
        sub = commands.add_parser(
            name, parents=[common, *parents], help=summary, description=description
        )
        if handler is not None:
            sub.set_defaults(handler=handler, needs_gist=needs_gist)
        if json is not None:
            sub.add_argument("--json", action="store_true", help=json)
        return sub

    run = command(
        "run", "sync audiences once (what cron calls)",
        "Read each audience's source, diff it against what Gist acknowledged and send only "
        "the changes.",
        syncing, handler=cmd_run,
    )  # fmt: skip
    run.add_argument(
        "--audience", action="append", default=[], metavar="KEY",
        help="sync only this audience (by property key); repeat for several",
    )  # fmt: skip
    run.add_argument(
        "--allow-mass-exit", action="store_true",
        help="send even when a run would remove more than the audience's mass-exit threshold",
    )  # fmt: skip
    run.add_argument(
        "--full-diff", action="store_true",
        help="force a full load and diff even when the file is unchanged",
    )  # fmt: skip

    backfill = command(
        "backfill", "resend an audience's full membership",
        "Send true to every current member of the audience, whatever Gist acknowledged "
        "before (for a new or reset Gist workspace). An unfinished backfill is resumed.",
        syncing,
        handler=cmd_backfill,
    )  # fmt: skip
    backfill.add_argument("key", metavar="KEY", help="the audience's property key")

    retire = command(
        "retire", "unset a removed audience in Gist and forget it",
        "Send false to every member still acknowledged in an audience that was removed from "
        "the config (or renamed), then forget its state.",
        syncing, handler=cmd_retire,
    )  # fmt: skip
    retire.add_argument("key", metavar="KEY", help="the retired audience's property key")

    history = command(
        "history",
        "list recent runs",
        "List recent runs, newest first.",
        handler=cmd_history,
        needs_gist=False,
        json="print a JSON array",
    )
    history.add_argument("--audience", metavar="KEY", help="only runs of this audience")
    history.add_argument(
        "--status", choices=RUN_STATUSES, metavar="STATUS",
        help=f"only runs with this status: {', '.join(RUN_STATUSES)}",
    )  # fmt: skip
    history.add_argument(
        "--since", metavar="WHEN", type=_since_arg,
        help="only runs started since: 7d, 12h, 2w, or an ISO date",
    )  # fmt: skip
    history.add_argument(
        "--limit", "-n", type=_int_arg(1, MAX_ROWS), default=20,
        help="how many runs (default 20)",
    )  # fmt: skip

    show = command(
        "show", "one run with its changes and rejected rows",
        "Show one run: counts, timings, error, its changes (failed first) and rejected rows.",
        handler=cmd_show, needs_gist=False, json="print a JSON object",
    )  # fmt: skip
    show.add_argument("run_id", type=_int_arg(1, MAX_ID), metavar="RUN_ID")
    show.add_argument(
        "--limit", "-n", type=_int_arg(1, MAX_ROWS), default=100, help="changes/rows per page"
    )
    show.add_argument(
        "--page", type=_int_arg(1, MAX_PAGE), default=1,
        help="which page of changes/rows (from 1)",
    )  # fmt: skip

    prune_cmd = command(
        "prune", "delete old per-member history",
        "Delete member_changes and rejected_rows of runs older than the given age; sync_runs "
        "summaries are kept.",
        handler=cmd_prune, needs_gist=False, json="print counts as JSON",
    )  # fmt: skip
    prune_cmd.add_argument(
        "--older-than", required=True, metavar="AGE", type=_age_arg,
        help="e.g. 90d, 2w, 12h; 0d prunes every finished run",
    )  # fmt: skip
    prune_cmd.add_argument(
        "--dry-run", action="store_true", help="count what would be deleted, delete nothing"
    )

    command(
        "audiences", "list configured audiences (validates the config)",
        "List configured audiences with name, property key, source and schedule.",
        handler=cmd_audiences, needs_gist=False, json="print a JSON array",
    )  # fmt: skip

    command(
        "workers", "list the processes that sync, alive and dead",
        "List the daemons and runs registered in the state database: alive (heartbeat within "
        "the lease length), dead (killed or host gone; their audiences pass to another "
        "worker) or stopped, with what each is syncing.",
        handler=cmd_workers, needs_gist=False, json="print a JSON array",
    )  # fmt: skip

    verify = command(
        "verify", "check a sample of members against Gist",
        "Read back a random sample of members from Gist and report how many carry the "
        "expected property value (drift from edits made in Gist itself).",
        handler=cmd_verify, json="print the report as JSON",
    )  # fmt: skip
    verify.add_argument("key", metavar="KEY", help="the audience's property key")
    verify.add_argument(
        "--sample", type=_int_arg(1, MAX_SAMPLE), default=100,
        help="members to check (default 100)",
    )  # fmt: skip
    verify.add_argument(
        "--repair", action="store_true", help="re-plan drifted members for the next run"
    )

    daemon = command(
        "daemon", "run audiences on their schedules",
        "Run each audience on its `schedule` (cron) or `every` (interval) until SIGTERM. "
        "SIGHUP reloads the config.",
        handler=cmd_daemon,
    )  # fmt: skip
    daemon.add_argument("--once", action="store_true", help="run every due audience now, exit")

    demo = command(
        "demo", "see a whole sync cycle against a local fake Gist",
        "Start the bundled fake Gist on 127.0.0.1, seed example audiences, run two syncs with "
        "a change in between and show the history. Needs no Gist account.",
        handler=cmd_demo,
    )  # fmt: skip
    demo.add_argument("--keep", metavar="DIR", type=Path, help="keep the demo's files here")

    init = command(
        "init", "write a starter config and example CSV",
        "Write a commented starter config (audience_sync.toml) and an example members CSV "
        "into DIR, then print the next two commands. Never overwrites a file.",
        handler=cmd_init,
    )  # fmt: skip
    init.add_argument(
        "dir", metavar="DIR", nargs="?", type=Path, default=Path("."),
        help="where to write them (default: the current folder)",
    )  # fmt: skip

    completion = command(
        "completion", "print a shell's tab-completion script",
        "Print the tab-completion script for bash, zsh or fish. Load it from your shell's "
        'start-up file, e.g. `eval "$(audience-sync completion bash)"` in ~/.bashrc.',
        handler=cmd_completion,
    )  # fmt: skip
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete in")

    database = command("db", "state database maintenance", "State database maintenance.")
    db_commands = database.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser(
        "upgrade", parents=[common], help="migrate the state database to the newest schema",
        description="Migrate the state database to the newest schema.",
    )  # fmt: skip
    upgrade.set_defaults(handler=cmd_db_upgrade, needs_gist=False)
    return parser


SHELLS = ("bash", "zsh", "fish")
HELP_WIDTH = 96  # the README's CLI reference is generated at this width, whatever the terminal


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
    the README's CLI reference shows them."""
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


def _add_global_options(parser: argparse.ArgumentParser, *, argparse_default: bool) -> None:
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


def cmd_run(args: argparse.Namespace) -> int:
    return _sync_command(
        args, "run", args.audience, allow_mass_exit=args.allow_mass_exit, full_diff=args.full_diff
    )


def cmd_backfill(args: argparse.Namespace) -> int:
    return _sync_command(args, "backfill", [args.key])


def cmd_retire(args: argparse.Namespace) -> int:
    return _sync_command(args, "retire", [args.key])


def _sync_command(
    args: argparse.Namespace,
    mode: Mode,
    keys: Sequence[str],
    *,
    allow_mass_exit: bool = False,
    full_diff: bool = False,
) -> int:
    settings = _settings(args)
    if args.metrics_file:
        _check_metrics_file(args.metrics_file)  # fail now, not after a sync that went well
    metrics = Metrics()
    show_progress = sys.stderr.isatty() and not (args.quiet or args.json)
    show_progress = show_progress and args.log_format == "text"  # JSON lines only, then
    # Not on a terminal (cron, a log file), progress is log lines instead (with -v).
    bars: AbstractContextManager[Progress | None] = (
        ProgressBars(sys.stderr)
        if show_progress
        else nullcontext(None if args.quiet else ProgressLog())
    )
    alerts: list[Alert] = []
    with db.open_state(settings) as engine, _stop_on_signals() as stop, bars as progress:
        results = run_once(
            settings,
            engine,
            keys,
            mode=mode,
            dry_run=args.dry_run,
            allow_mass_exit=allow_mass_exit,
            full_diff=full_diff,
            stop=stop,
            observer=metrics.observe_request,
            progress=progress,
        )
        # Decided at once from sync_runs: nothing that follows may cost the alert it owes.
        if not args.dry_run:
            alerts = select_alerts(settings.alerts, results, engine)
        orphans = load_orphans(engine, [a.property_key for a in settings.computations])
        notes = _result_notes(engine, results, args)
        last_successes = _load_last_successes(engine, settings)
    post_alert(settings.alerts, alerts)
    metrics.record_results(results)
    metrics.set_last_successes(last_successes)
    if args.metrics_file:
        _write_metrics_file(metrics, args.metrics_file, args)
    if mode == "run":
        for key, count in orphans.items():
            log.warning(
                "audience %r is no longer configured but Gist may still hold %d of its members: "
                "run `audience-sync retire %s` to send them false and forget it",
                key, count, key,
            )  # fmt: skip
    code = exit_code(results)
    try:
        _print_results(results, notes, args)
        sys.stdout.flush()
    except BrokenPipeError:
        _detach_stdout()  # the reader left; the sync's own outcome still decides the exit code
    return code


def _check_metrics_file(path: Path) -> None:
    """Refuse a ``--metrics-file`` that cannot be written, before anything is synced."""
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"--metrics-file {path}: folder {folder} does not exist")
    if path.is_dir():
        raise ConfigError(f"--metrics-file {path} is a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--metrics-file {path}: folder {folder} is not writable")


def _write_metrics_file(metrics: Metrics, path: Path, args: argparse.Namespace) -> None:
    """Write the textfile; a failure is reported and never changes the run's outcome."""
    try:
        metrics.write_textfile(path)
    except OSError as exc:
        _report_error(
            f"cannot write --metrics-file {path}: {exc.strerror or exc}; the sync itself is "
            "unaffected",
            args,
        )


def _load_last_successes(engine: Engine, settings: Settings) -> dict[str, datetime]:
    """The last-success times for the metrics; an unreadable state only leaves them out."""
    try:
        with db.state_errors(settings.state.url):
            return load_last_successes(engine, [a.property_key for a in settings.computations])
    except StateError as exc:
        # INFO (-v): the failure that matters is said already, once per daemon tick.
        log.info("cannot read the last successes for metrics: %s", exc)
        return {}


def _result_notes(
    engine: Engine, results: Sequence[RunResult], args: argparse.Namespace
) -> list[tuple[str, str, bool]]:
    """What to say under the table: (audience, message, is_error), errors first-hand."""
    notes: list[tuple[str, str, bool]] = []
    for r in results:
        if r.fast_path:
            notes.append(
                (
                    r.audience_key,
                    "file unchanged and nothing owed: load and diff skipped (fast path; "
                    "--full-diff forces them)",
                    False,
                )
            )
        # A partial run's own error is only the count of failed changes, told better below.
        if r.error and not (r.status == "partial" and r.failed):
            notes.append((r.audience_key, r.error, True))
        if r.run_id is None or not (r.failed or r.rejected or r.email_conflicts):
            continue
        run = load_run(engine, r.run_id, limit=1)
        hint = f"see `{_again(args, 'show', str(r.run_id))}`"
        if r.email_conflicts and run and run["email_conflict_rows"]:
            first = run["email_conflict_rows"][0]
            notes.append(
                (
                    r.audience_key,
                    f"{_count(r.email_conflicts, 'user')} with another email in an earlier "
                    f"audience's source, whose email was sent (first: user {first['user_id']}: "
                    f"{first['email']} here, {first['used_email']} sent); {hint}",
                    False,
                )
            )
        first = run["changes"][0] if run and run["changes"] else None
        # When delivery stopped, the change it stopped on carries the run's error: said once.
        repeats = first is not None and str(first["last_error"]) in (r.error or "")
        if r.failed and first is not None and first["status"] == "failed" and not repeats:
            notes.append(
                (
                    r.audience_key,
                    f"{_count(r.failed, 'change')} failed (first: user {first['user_id']}: "
                    f"{first['last_error']}); {hint}",
                    True,
                )
            )
        if r.rejected and run and run["rejected_rows"]:
            first = run["rejected_rows"][0]
            notes.append(
                (
                    r.audience_key,
                    f"{_count(r.rejected, 'source row')} rejected (first: row "
                    f"{first['row_number']}: {first['reason']}); {hint}",
                    False,
                )
            )
    return notes


def _print_results(
    results: Sequence[RunResult], notes: Sequence[tuple[str, str, bool]], args: argparse.Namespace
) -> None:
    if args.json:
        output_json([_result_dict(r) for r in results], sys.stdout)
        return
    if not args.quiet:
        if args.dry_run:
            print("Dry run: nothing was sent to Gist.\n")
        rows = [
            {
                "audience": r.audience_key, "kind": r.kind, "status": r.status,
                "members": r.members, "entered": r.entered, "exited": r.exited,
                "rejected": r.rejected, "delivered": r.delivered, "failed": r.failed,
                "run_id": r.run_id,
            }
            for r in results
        ]  # fmt: skip
        output_rows(rows, RUN_COLUMNS, sys.stdout, optional=RUN_OPTIONAL)
    # The same message for several audiences (delivery stopped for all) is said once.
    grouped: dict[tuple[str, bool], list[str]] = {}
    for key, message, is_error in notes:
        grouped.setdefault((message, is_error), []).append(key)
    for (message, is_error), keys in grouped.items():
        line = f"{', '.join(keys)}: {message}"
        if not args.quiet:
            print(line)
        elif is_error:
            _report_error(line, args, prefix="")


def _result_dict(result: RunResult) -> dict[str, Any]:
    fields = result_fields(result)
    key = fields.pop("audience_key")
    run_id = fields.pop("run_id")
    return {"audience": key, "run_id": run_id, **fields, "audience_key": key}


def cmd_history(args: argparse.Namespace) -> int:
    with db.open_state(_settings(args), writes=False) as engine:
        runs = [
            _run_vocabulary(r)
            for r in load_runs(
                engine, args.audience, args.limit, status=args.status, since=args.since
            )
        ]
    if not runs and not args.json:
        print("No runs match." if args.audience or args.status or args.since else "No runs yet.")
        return EXIT_OK
    rows = runs if args.json else [{**r, "started_at": short_time(r["started_at"])} for r in runs]
    output_rows(rows, HISTORY_COLUMNS, sys.stdout, as_json=args.json, optional=HISTORY_OPTIONAL)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    with db.open_state(_settings(args), writes=False) as engine:
        found = load_run(engine, args.run_id, args.limit, (args.page - 1) * args.limit)
    if found is None:
        raise ConfigError(f"no run with id {args.run_id}: `audience-sync history` lists them")
    run = _run_vocabulary(found)
    if args.json:
        output_json(run, sys.stdout)
        return EXIT_OK
    for field in SHOW_FIELDS:
        value = run[field]
        if field.endswith("_at"):
            value = short_time(value)
        print(f"{field + ':':<13}{value if value is not None else '-'}")
    by_status = ", ".join(f"{k} {v}" for k, v in sorted(run["changes_by_status"].items()))
    print(f"\nChanges ({by_status or 'none'}), page {args.page}:")
    if run["changes"]:
        changes = [{**c, "delivered_at": short_time(c["delivered_at"])} for c in run["changes"]]
        output_rows(changes, CHANGE_COLUMNS, sys.stdout, optional=CHANGE_OPTIONAL)
    if run["rejected_rows"]:
        print(f"\nRejected rows ({run['rejected']}), page {args.page}:")
        columns = ("row_number", "user_id", "email", "reason")
        output_rows(run["rejected_rows"], columns, sys.stdout)
    if run["email_conflict_rows"]:
        print(
            f"\nEmails that differed from an earlier audience's ({run['email_conflicts']}), "
            f"page {args.page}:"
        )
        output_rows(run["email_conflict_rows"], ("user_id", "email", "used_email"), sys.stdout)
    total = max(
        sum(run["changes_by_status"].values()), run["rejected"], run["email_conflicts"] or 0
    )
    if args.page * args.limit < total:
        more = [str(args.run_id), "--page", str(args.page + 1)]
        if args.limit != 100:
            more += ["--limit", str(args.limit)]
        print(f"\nMore: {_again(args, 'show', *more)}")
    return EXIT_OK


def _run_vocabulary(run: dict[str, Any]) -> dict[str, Any]:
    """A run as ``history`` and ``show`` print it: ``run_id`` first, ``id`` kept as an alias."""
    return {"run_id": run["id"], **run}


def cmd_prune(args: argparse.Namespace) -> int:
    with db.open_state(_settings(args), writes=False) as engine:
        counts = prune(engine, utcnow() - timedelta(seconds=args.older_than), dry_run=args.dry_run)
    if args.json:
        output_json(counts, sys.stdout)
    elif args.dry_run:
        listed = " and ".join(f"{count} {table}" for table, count in counts.items())
        print(f"would delete {listed} (dry run)")
    else:
        print(", ".join(f"{count} {table} deleted" for table, count in counts.items()))
    return EXIT_OK


WORKER_COLUMNS = (
    "id", "state", "command", "running", "started_at", "heartbeat_at", "seconds_since_heartbeat",
)  # fmt: skip


def cmd_workers(args: argparse.Namespace) -> int:
    with db.open_state(_settings(args), writes=False) as engine:
        found = list_workers(engine)
    if not found and not args.json:
        print("No workers yet: a daemon or a run registers itself while it syncs.")
        return EXIT_OK
    rows = [
        {
            **asdict(w),
            "started_at": _iso(w.started_at),
            "heartbeat_at": _iso(w.heartbeat_at),
            "stopped_at": _iso(w.stopped_at),
            "seconds_since_heartbeat": round(w.seconds_since_heartbeat, 1),
        }
        for w in found
    ]
    if not args.json:
        rows = [
            {
                **r,
                "running": ", ".join(r["running"]) or None,
                "started_at": short_time(r["started_at"]),
                "heartbeat_at": short_time(r["heartbeat_at"]),
            }
            for r in rows
        ]
    output_rows(rows, WORKER_COLUMNS, sys.stdout, as_json=args.json, optional=("started_at",))
    return EXIT_OK


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds") + "Z"


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
    columns = ("key", "kind", "name", "source", "schedule")
    output_rows(rows, columns, sys.stdout, as_json=args.json, optional=("schedule", "kind"))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    settings = _settings(args)
    settings.audience(args.key)  # a clear error for a key that is not configured
    with db.open_state(settings, writes=False) as engine:
        try:
            report = verify_audience(
                settings, engine, args.key, sample=args.sample, repair=args.repair
            )
        except AuthError as exc:
            # Not drift: nothing could be checked.
            _report_error(f"Gist refused the API key ({exc}); nothing was checked", args)
            return EXIT_USAGE
        except ApiError as exc:
            _report_error(f"{exc}; nothing was checked", args)
            return EXIT_USAGE
    if args.json:
        output_json(report.to_dict(), sys.stdout)
    else:
        print(
            f"{report.audience_key}: {report.matching} of {report.sampled} sampled members "
            f"carry the expected value; {len(report.drifted)} drifted"
            + (f"; {len(report.errors)} could not be read" if report.errors else "")
            + (f", {report.repaired} re-planned for the next run" if args.repair else "")
        )
        if report.drifted:
            rows = [asdict(d) for d in report.drifted]
            output_rows(rows, ("user_id", "expected", "actual", "reason"), sys.stdout)
        if report.errors:
            first = report.errors[0]
            _report_error(f"{first.user_id}: {first.error}", args, prefix="first read error: ")
    # 2: could not check everything; 1: drift found; 0: every sampled value matches.
    if report.errors:
        return EXIT_USAGE
    return EXIT_OK if not report.drifted else EXIT_FAILED


def cmd_daemon(args: argparse.Namespace) -> int:
    # One line per run is the daemon's own log, shown without -v.
    logging.getLogger("audience_sync.scheduler").setLevel(logging.INFO)
    settings = _settings(args)
    metrics = Metrics()
    memory = AlertMemory()  # what this process told the webhook, for runs without an id
    with db.open_state(settings) as engine, Presence(engine, "daemon") as worker:
        if args.once:
            # `--once` is a run from cron: the signals mean what they mean for `run`.
            with _stop_on_signals() as stop:
                daemon = _make_daemon(args, engine, worker, metrics, memory, None, stop)
                results = daemon.run_due()
            return exit_code(results)
        sender = AlertSender(lambda: daemon.settings.alerts)  # its thread starts when needed
        daemon = _make_daemon(args, engine, worker, metrics, memory, sender, None)
        metrics.set_last_successes(_load_last_successes(engine, settings))
        server = None
        if settings.daemon.metrics_port is not None:
            host, port = settings.daemon.metrics_host, settings.daemon.metrics_port
            try:
                server = MetricsServer(metrics, host, port, daemon.health).start()
            except OSError as exc:
                where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                raise ConfigError(
                    f"{settings.path}: daemon.metrics_port: cannot serve /metrics on {where}: "
                    f"{exc.strerror or exc}"
                ) from None
            print(f"serving /metrics and /healthz at {server.url}", file=sys.stderr, flush=True)
        with _daemon_signals(daemon):
            try:
                return daemon.serve()
            finally:
                if server is not None:
                    server.stop()
                # A hung webhook must not hold up the stop; what is left is logged.
                sender.close(min(ALERT_STOP_GRACE, daemon.settings.alerts.timeout_seconds))


def _make_daemon(
    args: argparse.Namespace,
    engine: Engine,
    worker: Presence,
    metrics: Metrics,
    memory: AlertMemory,
    sender: AlertSender | None,
    stop: threading.Event | None,
) -> Daemon:
    """The daemon over ``engine``, syncing as ``worker``; alerts go to ``sender`` (or are
    posted at once)."""

    def sync(current: Settings, keys: list[str], stop: threading.Event) -> list[RunResult]:
        return run_once(
            current,
            engine,
            keys,
            stop=stop,
            observer=metrics.observe_request,
            progress=daemon.progress,
            worker=worker,
        )

    def on_results(results: list[RunResult]) -> None:
        current = daemon.settings
        alerts = select_alerts(current.alerts, results, engine, memory)
        if sender is not None:
            sender.submit(alerts)  # posted from the sender's thread; syncing goes on
        else:
            post_alert(current.alerts, alerts)
        metrics.record_results(results)
        metrics.set_last_successes(_load_last_successes(engine, current))

    daemon = Daemon(
        lambda: _settings(args),
        sync,
        lambda: load_last_starts(engine),
        on_results=on_results,
        stop=stop,
        recent_statuses=lambda keys, n: load_recent_statuses(engine, keys, n),
        hard_stop=stop is None,  # serving, the daemon is the process: its stop has a bound
    )
    return daemon


def cmd_demo(args: argparse.Namespace) -> int:
    from audience_sync.demo import run_demo  # imported here: only the demo needs it

    try:
        return run_demo(sys.stdout, keep=args.keep)
    except KeyboardInterrupt:
        _report_error("demo interrupted", args, prefix="\n")
        return 128 + signal.SIGINT


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


def cmd_completion(args: argparse.Namespace) -> int:
    print(shellcode(["audience-sync"], shell=args.shell), end="")
    return EXIT_OK


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with db.state_errors(settings.state.url):
        engine = db.make_engine(settings.state.url, schema=settings.state.db_schema)
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


def _int_arg(low: int, high: int) -> Callable[[str], int]:
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


def _duration_arg(text: str) -> float | None:
    """``parse_duration`` for argparse: seconds, None when ``text`` is not a duration."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _age_arg(text: str) -> float:
    """An argparse type: an age such as 90d, 2w, 12h or 0d, in seconds."""
    age = _duration_arg(text)
    if age is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age like 90d, 2w, 12h or 0d")
    return age


def _since_arg(text: str) -> datetime:
    """``--since``: an age (7d) or an ISO date, as the naive UTC the state stores."""
    age = _duration_arg(text)
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


def _settings(args: argparse.Namespace) -> Settings:
    # Commands that never call Gist need no API key (nor its ${GIST_API_KEY}).
    return load_settings(
        resolve_config_path(args.config, os.environ), gist=getattr(args, "needs_gist", True)
    )


def _again(args: argparse.Namespace, *words: str) -> str:
    """A command line to run next, with the ``--config`` this one was given."""
    line = ["audience-sync", *words]
    if args.config:
        line += ["--config", args.config]
    return shlex.join(line)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _command_name(args: argparse.Namespace) -> str:
    return " ".join(w for w in (args.command, getattr(args, "db_command", None)) if w)


def _report_error(message: str, args: argparse.Namespace, prefix: str = "error: ") -> None:
    """One line on stderr: plain text, or a JSON log line with ``--log-format json``."""
    if args.log_format == "json":
        log.error("%s", message)
    else:
        print(f"{prefix}{message}", file=sys.stderr, flush=True)


def _usage_error(parser: argparse.ArgumentParser, json_logs: bool, message: str) -> NoReturn:
    """argparse's error exit (usage, then the message; exit 2), as a JSON line if asked."""
    if json_logs:
        record = logging.makeLogRecord(
            {"name": __name__, "levelno": logging.ERROR, "levelname": "ERROR",
             "msg": f"{parser.prog}: {message}"}
        )  # fmt: skip
        print(JsonFormatter().format(record), file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
    parser.print_usage(sys.stderr)
    parser.exit(EXIT_USAGE, f"{parser.prog}: error: {message}\n")


def _detach_stdout() -> None:
    """Point stdout at /dev/null so that flushing it at exit cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # not a real file (a test's capture): nothing will flush it at exit


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM, SIGHUP or Ctrl-C asks the run to stop gracefully; a second one stops it at
    once. (A hang-up no longer kills a run half-way, leaving it marked running.)"""
    stop = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning(
            "%s: finishing requests in flight, then stopping (again to stop now)",
            signal.Signals(signum).name,
        )
        stop.set()

    with _signal_handlers({signal.SIGTERM: handle, signal.SIGINT: handle, signal.SIGHUP: handle}):
        yield stop


@contextmanager
def _daemon_signals(daemon: Daemon) -> Iterator[None]:
    """SIGTERM/SIGINT stop the daemon after the running sync (a second one at once);
    SIGHUP reloads the config."""
    asked: list[int] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if asked:
            # The running sync is stuck (a source or the state database hangs): leave it.
            # Its run stays `running` until the next run marks it interrupted; what Gist
            # acknowledged is saved already.
            log.warning("%s again: stopping now, without waiting for the running sync", name)
            logging.shutdown()
            os._exit(128 + signum)
        asked.append(signum)
        log.warning("%s: stopping after the running sync (again to stop now)", name)
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
def _logging(verbosity: int, log_format: str = "text") -> Iterator[None]:
    """Log to stderr as the flags ask for the length of one command, then put back every
    level and handler it touched (in-process callers, tests among them, see no leak)."""
    root = logging.getLogger()
    touched = [
        logging.getLogger(name)
        for name in (*CHATTY, *SECOND_HAND, "audience_sync", "audience_sync.scheduler")
    ]
    saved_root = (root.level, list(root.handlers))
    saved = [(logger, logger.level) for logger in touched]
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.set_name("audience-sync")
    logging.captureWarnings(True)  # a library's warning is a log line too (JSON with json)
    # Replace only our own handler: others (a test's log capture, say) stay.
    root.handlers = [h for h in root.handlers if h.get_name() != "audience-sync"] + [handler]
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
