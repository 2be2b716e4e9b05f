"""The commands that sync: ``run``, ``backfill``, ``retire`` and ``daemon``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audience_sync import db
from audience_sync.cli.options import Commands, again, open_state, settings_for
from audience_sync.cli.output import (
    count,
    detach_stdout,
    report_error,
    timestamp_log_lines,
    with_old_names,
)
from audience_sync.cli.signals import daemon_signals, stop_on_signals
from audience_sync.errors import ConfigError, StateError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from audience_sync.alerts import Alert, AlertMemory, AlertSender
    from audience_sync.config import Settings
    from audience_sync.metrics import Metrics
    from audience_sync.scheduler import Daemon
    from audience_sync.statuses import Mode
    from audience_sync.sync import Progress, RunResult
    from audience_sync.workers import Presence

ALERT_STOP_GRACE = 5.0  # seconds a stopping daemon gives alerts still being posted
# `resent`: members sent again with their membership unchanged (their email changed in the
# source): delivered without entering or exiting.
RUN_COLUMNS = (
    "audience_key", "kind", "status", "members", "entered", "exited", "resent", "rejected",
    "delivered", "failed", "run_id",
)  # fmt: skip
RUN_OPTIONAL = (
    "run_id", "entered", "exited", "failed", "delivered", "members", "rejected", "resent", "kind",
)  # fmt: skip
log = logging.getLogger(__package__)


def register(commands: Commands) -> None:
    """``run``, ``backfill`` and ``retire``: one sync, then exit."""
    syncing = argparse.ArgumentParser(add_help=False)
    syncing.add_argument(
        "--dry-run", action="store_true",
        help="plan and print, send nothing (recorded as kind dry-run, backfill-dry-run or "
        "retire-dry-run)",
    )  # fmt: skip
    syncing.add_argument("--json", action="store_true", help="print the results as JSON")
    syncing.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bars or table; errors only"
    )
    syncing.add_argument(
        "--metrics-file", metavar="PATH", type=Path,
        help="write Prometheus metrics for node-exporter's textfile collector",
    )  # fmt: skip

    run = commands.add(
        "run", "sync audiences once (what cron calls)",
        "Read each audience's source, diff it against what Gist acknowledged and send only "
        "the changes.",
        syncing, handler=cmd_run,
    )  # fmt: skip
    run.add_argument(
        "--audience", action="append", default=[], metavar="KEY",
        help="sync only this audience or trait (by property key); repeat for several",
    )  # fmt: skip
    run.add_argument(
        "--allow-mass-exit", action="store_true",
        help="send even when a run would remove more than the audience's mass-exit threshold",
    )  # fmt: skip
    run.add_argument(
        "--full-diff", action="store_true",
        help="force a full load and diff even when the file is unchanged",
    )  # fmt: skip

    backfill = commands.add(
        "backfill", "resend every member's value",
        "Send every current member of the audience or trait its value again (true for an "
        "audience, the computed value for a trait), whatever Gist acknowledged before (for a "
        "new or reset Gist workspace). It starts over unless told to resume.",
        syncing,
        handler=cmd_backfill,
    )  # fmt: skip
    backfill.add_argument("key", metavar="KEY", help="the audience's or trait's property key")
    backfill.add_argument(
        "--resume", action="store_true",
        help="skip the members an unfinished backfill of the key already reached (one that "
        "stopped, with no other run of the key since); only when Gist was not reset since, "
        "or they stay without the value",
    )  # fmt: skip

    retire = commands.add(
        "retire", "clear a removed audience or trait in Gist and forget it",
        "Clear the property of an audience or trait removed from the config (or renamed) for "
        "everyone Gist may hold a value of it for (false for an audience, null for a trait), "
        "then forget its state.",
        syncing, handler=cmd_retire,
    )  # fmt: skip
    retire.add_argument("key", metavar="KEY", help="the removed audience's or trait's property key")


def register_daemon(commands: Commands) -> None:
    """``daemon``: every audience on its schedule."""
    daemon = commands.add(
        "daemon", "run audiences on their schedules",
        "Run each audience on its `schedule` (cron) or `every` (interval) until SIGTERM. "
        "SIGHUP reloads the config.",
        handler=cmd_daemon,
    )  # fmt: skip
    daemon.add_argument("--once", action="store_true", help="run every due audience now, exit")


def cmd_run(args: argparse.Namespace) -> int:
    return _sync_command(
        args, "run", args.audience, allow_mass_exit=args.allow_mass_exit, full_diff=args.full_diff
    )


def cmd_backfill(args: argparse.Namespace) -> int:
    return _sync_command(args, "backfill", [args.key], resume=args.resume)


def cmd_retire(args: argparse.Namespace) -> int:
    return _sync_command(args, "retire", [args.key])


def _sync_command(
    args: argparse.Namespace,
    mode: Mode,
    keys: Sequence[str],
    *,
    allow_mass_exit: bool = False,
    full_diff: bool = False,
    resume: bool = False,
) -> int:
    # Imported here, not above: the command line loads every command's module to parse its
    # flags, and a command pays only for the modules it runs (tests/test_startup.py).
    from audience_sync.alerts import post_alert, select_alerts
    from audience_sync.history import load_orphans
    from audience_sync.render import ProgressLog
    from audience_sync.sync import exit_code, run_once

    settings = settings_for(args)
    metrics: Metrics | None = None
    if args.metrics_file:
        from audience_sync.metrics import Metrics

        _check_metrics_file(args.metrics_file)  # fail now, not after a sync that went well
        metrics = Metrics()
    show_progress = sys.stderr.isatty() and not (args.quiet or args.json)
    show_progress = show_progress and args.log_format == "text"  # JSON lines only, then
    # Not on a terminal (cron, a log file), progress is log lines instead (with -v).
    bars: AbstractContextManager[Progress | None]
    if show_progress:
        from audience_sync.bars import ProgressBars

        bars = ProgressBars(sys.stderr)
    else:
        bars = nullcontext(None if args.quiet else ProgressLog())
    alerts: list[Alert] = []
    with open_state(settings) as engine, stop_on_signals() as stop, bars as progress:
        results = run_once(
            settings,
            engine,
            keys,
            mode=mode,
            dry_run=args.dry_run,
            allow_mass_exit=allow_mass_exit,
            full_diff=full_diff,
            resume=resume,
            stop=stop,
            observer=None if metrics is None else metrics.observe_request,
            progress=progress,
        )
        # Decided at once from sync_runs: nothing that follows may cost the alert it owes.
        if not args.dry_run:
            alerts = select_alerts(settings.alerts, results, engine)
        orphans = load_orphans(engine, [a.property_key for a in settings.computations])
        notes = _result_notes(engine, results, args)
        last_successes = _load_last_successes(engine, settings) if metrics is not None else {}
    post_alert(settings.alerts, alerts)
    if metrics is not None:
        metrics.record_results(results)
        metrics.set_last_successes(last_successes)
        _write_metrics_file(metrics, args.metrics_file, args)
    if mode == "run":
        for key, orphan in orphans.items():
            retire = again(args, "retire", key)
            if orphan.kind == "trait":
                log.warning(
                    "trait %r is no longer configured but Gist may still hold a value of it "
                    "for %s: run `%s` to send them null and forget it",
                    key, count(orphan.held, "user"), retire,
                )  # fmt: skip
            else:
                log.warning(
                    "audience %r is no longer configured but Gist may still hold %d of its "
                    "members: run `%s` to send them false and forget it",
                    key, orphan.held, retire,
                )  # fmt: skip
    code = exit_code(results)
    try:
        _print_results(results, notes, args)
        sys.stdout.flush()
    except BrokenPipeError:
        detach_stdout()  # the reader left; the sync's own outcome still decides the exit code
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
        report_error(
            f"cannot write --metrics-file {path}: {exc.strerror or exc}; the sync itself is "
            "unaffected"
        )


def _load_last_successes(engine: Engine, settings: Settings) -> dict[str, datetime]:
    """The last-success times for the metrics; an unreadable state only leaves them out."""
    from audience_sync.history import load_last_successes

    try:
        with db.state_errors(settings.state.url):
            return load_last_successes(engine, [a.property_key for a in settings.computations])
    except StateError as exc:
        # DEBUG: the failure that matters is said already, once per daemon tick (the daemon
        # shows INFO lines).
        log.debug("cannot read the last successes for metrics: %s", exc)
        return {}


def _result_notes(
    engine: Engine, results: Sequence[RunResult], args: argparse.Namespace
) -> list[tuple[str, str, bool]]:
    """What to say under the table: (audience, message, is_error), errors first-hand."""
    from audience_sync.history import load_run

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
        hint = f"see `{again(args, 'show', str(r.run_id))}`"
        if r.email_conflicts and run and run["email_conflict_rows"]:
            first = run["email_conflict_rows"][0]
            notes.append(
                (
                    r.audience_key,
                    f"{count(r.email_conflicts, 'user')} with another email in an earlier "
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
                    f"{count(r.failed, 'change')} failed (first: user {first['user_id']}: "
                    f"{first['last_error']}); {hint}",
                    True,
                )
            )
        if r.rejected and run and run["rejected_rows"]:
            first = run["rejected_rows"][0]
            notes.append(
                (
                    r.audience_key,
                    f"{count(r.rejected, 'source row')} rejected (first: row "
                    f"{first['row_number']}: {first['reason']}); {hint}",
                    False,
                )
            )
    return notes


def _print_results(
    results: Sequence[RunResult], notes: Sequence[tuple[str, str, bool]], args: argparse.Namespace
) -> None:
    from audience_sync.render import output_json, output_rows

    if args.json:
        output_json([_result_dict(r) for r in results], sys.stdout)
        return
    if not args.quiet:
        if args.dry_run:
            print("Dry run: nothing was sent to Gist.\n")
        rows = [{c: getattr(r, c) for c in RUN_COLUMNS} for r in results]
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
            report_error(line)


def _result_dict(result: RunResult) -> dict[str, Any]:
    from audience_sync.runs import result_fields

    fields = result_fields(result)
    first = {"run_id": fields.pop("run_id"), "audience_key": fields.pop("audience_key")}
    return with_old_names({**first, **fields}, {"audience_key": "audience"})


def cmd_daemon(args: argparse.Namespace) -> int:
    # One line per run is the daemon's own log, shown without -v.
    from audience_sync.alerts import AlertMemory, AlertSender
    from audience_sync.metrics import Metrics, MetricsServer
    from audience_sync.sync import exit_code
    from audience_sync.workers import Presence

    logging.getLogger("audience_sync.scheduler").setLevel(logging.INFO)
    settings = settings_for(args)
    metrics = Metrics()
    memory = AlertMemory()  # what this process told the webhook, for runs without an id
    with open_state(settings) as engine, Presence(engine, "daemon") as worker:
        if args.once:
            # `--once` is a run from cron: the signals mean what they mean for `run`.
            with stop_on_signals() as stop:
                daemon = _make_daemon(args, engine, worker, metrics, memory, None, stop)
                results = daemon.run_due()
            return exit_code(results)
        # A daemon's lines are read later, from a file or a journal: each says when, and
        # its own notices (what it serves) show without -v, as its line per run does.
        timestamp_log_lines()
        log.setLevel(min(logging.INFO, log.getEffectiveLevel()))
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
            log.info("serving /metrics and /healthz at %s", server.url)
        with daemon_signals(daemon):
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
    from audience_sync.alerts import post_alert, select_alerts
    from audience_sync.history import load_last_starts, load_recent_statuses
    from audience_sync.scheduler import Daemon
    from audience_sync.sync import run_once

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
        lambda: settings_for(args),
        sync,
        lambda: load_last_starts(engine),
        on_results=on_results,
        stop=stop,
        recent_statuses=lambda keys, n: load_recent_statuses(engine, keys, n),
        hard_stop=stop is None,  # serving, the daemon is the process: its stop has a bound
    )
    return daemon
