"""What is configured, who syncs it, and whether Gist still holds it: ``audiences``,
``workers`` and ``verify``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from audience_sync.cli.options import MAX_SAMPLE, Commands, int_arg, open_state, settings_for
from audience_sync.cli.output import (
    EXIT_FAILED,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
    count,
    iso,
    report_error,
    with_old_names,
)
from audience_sync.errors import ApiError, AuthError, LockHeldError
from audience_sync.render import output_json, output_rows, short_time

WORKER_COLUMNS = (
    "worker_id", "state", "command", "running", "started_at", "heartbeat_at",
    "seconds_since_heartbeat",
)  # fmt: skip


def register(commands: Commands) -> None:
    """``audiences``, ``workers`` and ``verify``."""
    commands.add(
        "audiences", "list configured audiences (validates the config)",
        "List configured audiences with name, property key, source and schedule.",
        handler=cmd_audiences, needs_gist=False, json="print a JSON array",
    )  # fmt: skip

    workers = commands.add(
        "workers", "list the processes syncing now",
        "List the daemons and runs syncing now (alive: a heartbeat within the lease length), "
        "with what each is syncing. --all adds the dead (killed or host gone; their "
        "audiences pass to another worker) and the stopped. A finished run's row is deleted "
        "an hour after it stopped, any other's after 7 days or by `prune`.",
        handler=cmd_workers, needs_gist=False, json="print a JSON array",
    )  # fmt: skip
    workers.add_argument(
        "--all", action="store_true", help="also the dead and stopped workers still listed"
    )

    verify = commands.add(
        "verify", "check a sample of members against Gist",
        "Read back a random sample of members from Gist and report how many carry the "
        "expected property value (drift from edits made in Gist itself).",
        handler=cmd_verify, json="print the report as JSON",
    )  # fmt: skip
    verify.add_argument("key", metavar="KEY", help="the audience's or trait's property key")
    verify.add_argument(
        "--sample", type=int_arg(1, MAX_SAMPLE), default=100,
        help="members to check (default 100)",
    )  # fmt: skip
    verify.add_argument(
        "--repair", action="store_true",
        help="re-plan drifted members for the next run; holds the key's lease as a run does "
        "(exit 3 while another process syncs it)",
    )  # fmt: skip


def cmd_audiences(args: argparse.Namespace) -> int:
    from audience_sync.sources import source_for

    settings = settings_for(args)
    rows = [
        {
            "audience_key": a.property_key,
            "name": a.name,
            "kind": "trait" if a.is_trait else "audience",
            "source": source_for(settings, a).description,
            "schedule": a.schedule or (f"every {a.every}" if a.every else None),
        }
        for a in settings.computations
    ]
    if args.json:
        output_json([with_old_names(r, {"audience_key": "key"}) for r in rows], sys.stdout)
        return EXIT_OK
    columns = ("audience_key", "kind", "name", "source", "schedule")
    output_rows(rows, columns, sys.stdout, optional=("schedule", "kind"))
    return EXIT_OK


def cmd_workers(args: argparse.Namespace) -> int:
    from audience_sync.workers import list_workers

    with open_state(settings_for(args), writes=False) as engine:
        listed = list_workers(engine)
    found = listed if args.all else [w for w in listed if w.state == "alive"]
    if not found and not args.json:
        gone = len(listed)
        print(
            f"No live workers ({count(gone, 'dead or stopped one')}: `workers --all` lists them)."
            if gone
            else "No workers yet: a daemon or a run registers itself while it syncs."
        )
        return EXIT_OK
    rows = [
        {
            "worker_id": w.id,
            **{k: v for k, v in asdict(w).items() if k != "id"},
            "started_at": iso(w.started_at),
            "heartbeat_at": iso(w.heartbeat_at),
            "stopped_at": iso(w.stopped_at),
            "seconds_since_heartbeat": round(w.seconds_since_heartbeat, 1),
        }
        for w in found
    ]
    if args.json:
        output_json([with_old_names(r, {"worker_id": "id"}) for r in rows], sys.stdout)
        return EXIT_OK
    rows = [
        {
            **r,
            "running": ", ".join(r["running"]) or None,
            "started_at": short_time(r["started_at"]),
            "heartbeat_at": short_time(r["heartbeat_at"]),
        }
        for r in rows
    ]
    output_rows(rows, WORKER_COLUMNS, sys.stdout, optional=("started_at",))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from audience_sync.verify import verify_audience

    settings = settings_for(args)
    settings.audience(args.key)  # a clear error for a key that is not configured
    with open_state(settings, writes=False) as engine:
        try:
            report = verify_audience(
                settings, engine, args.key, sample=args.sample, repair=args.repair
            )
        except LockHeldError as exc:
            report_error(f"{exc}: nothing was checked; repair once it is done")
            return EXIT_LOCKED
        except AuthError as exc:
            # Not drift: nothing could be checked.
            report_error(f"Gist refused the API key ({exc}); nothing was checked")
            return EXIT_USAGE
        except ApiError as exc:
            report_error(f"{exc}; nothing was checked")
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
            # Property values as JSON spells them (true, not yes): what Gist holds.
            rows = [
                {
                    **asdict(d),
                    **{k: json.dumps(v) for k, v in asdict(d).items() if isinstance(v, bool)},
                }
                for d in report.drifted
            ]
            output_rows(rows, ("user_id", "expected", "actual", "reason"), sys.stdout)
        if report.errors:
            first = report.errors[0]
            report_error(
                f"user {first.user_id} could not be read: {first.error}"
                + (f" (the first of {len(report.errors)})" if len(report.errors) > 1 else "")
            )
    # 2: could not check everything; 1: drift found; 0: every sampled value matches.
    if report.errors:
        return EXIT_USAGE
    return EXIT_OK if not report.drifted else EXIT_FAILED
