"""What ran, what it sent, and forgetting the details: ``history``, ``show`` and ``prune``."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta

from audience_sync.cli.options import (
    MAX_ID,
    MAX_PAGE,
    MAX_ROWS,
    Commands,
    again,
    age_arg,
    int_arg,
    open_state,
    settings_for,
    since_arg,
)
from audience_sync.cli.output import EXIT_OK, with_old_names
from audience_sync.config import Settings
from audience_sync.errors import ConfigError
from audience_sync.history import load_keys, load_run, load_runs, prune
from audience_sync.render import as_text, output_json, output_rows, short_time
from audience_sync.runs import utcnow
from audience_sync.statuses import RUN_STATUSES
from audience_sync.workers import prune_workers

HISTORY_COLUMNS = (
    "run_id", "audience_key", "kind", "status", "started_at", "members", "entered", "exited",
    "resent", "delivered", "failed", "rejected",
)  # fmt: skip
HISTORY_OPTIONAL = (
    "started_at", "entered", "exited", "failed", "delivered", "members", "rejected", "resent",
    "kind",
)  # fmt: skip
SHOW_FIELDS = (
    "run_id", "audience_key", "kind", "status", "started_at", "finished_at", "source_rows",
    "members", "entered", "exited", "resent", "delivered", "failed", "rejected",
    "email_conflicts", "fast_path", "error",
)  # fmt: skip
CHANGE_COLUMNS = (
    "user_id", "email", "value", "status", "event", "attempts", "http_status", "last_error",
)  # fmt: skip
CHANGE_OPTIONAL = ("http_status", "attempts", "event")
OLD_RUN_NAMES = {"run_id": "id", "audience_key": "audience"}  # in --json until 0.3
PRUNED_NOTE = "  ({what} pruned: `audience-sync prune` deleted them; the counts above remain)"


def register(commands: Commands) -> None:
    """``history``, ``show`` and ``prune``."""
    history = commands.add(
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
        "--since", metavar="WHEN", type=since_arg,
        help="only runs started since: 7d, 12h, 2w, or an ISO date",
    )  # fmt: skip
    history.add_argument(
        "--limit", "-n", type=int_arg(1, MAX_ROWS), default=20,
        help="how many runs (default 20)",
    )  # fmt: skip

    show = commands.add(
        "show", "one run with its changes and rejected rows",
        "Show one run: counts, timings, error, its changes (failed first) and rejected rows.",
        handler=cmd_show, needs_gist=False, json="print a JSON object",
    )  # fmt: skip
    show.add_argument("run_id", type=int_arg(1, MAX_ID), metavar="RUN_ID")
    show.add_argument(
        "--limit", "-n", type=int_arg(1, MAX_ROWS), default=100, help="changes/rows per page"
    )
    show.add_argument(
        "--page", type=int_arg(1, MAX_PAGE), default=1,
        help="which page of changes/rows (from 1)",
    )  # fmt: skip

    prune_cmd = commands.add(
        "prune", "delete old per-member history",
        "Delete member_changes and rejected_rows of runs older than the given age, and the "
        "workers rows of processes gone that long; sync_runs summaries are kept.",
        handler=cmd_prune, needs_gist=False, json="print counts as JSON",
    )  # fmt: skip
    prune_cmd.add_argument(
        "--older-than", required=True, metavar="AGE", type=age_arg,
        help="e.g. 90d, 2w, 12h; 0d prunes every finished run",
    )  # fmt: skip
    prune_cmd.add_argument(
        "--dry-run", action="store_true",
        help="count what would be deleted, delete nothing (--json says dry_run: true)",
    )  # fmt: skip


def cmd_history(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    with open_state(settings, writes=False) as engine:
        if args.audience is not None:
            _check_known(settings, load_keys(engine), args.audience)
        runs = load_runs(engine, args.audience, args.limit, status=args.status, since=args.since)
    if not runs and not args.json:
        print("No runs match." if args.audience or args.status or args.since else "No runs yet.")
        return EXIT_OK
    if args.json:
        output_json([with_old_names(r, OLD_RUN_NAMES) for r in runs], sys.stdout)
        return EXIT_OK
    rows = [{**r, "started_at": short_time(r["started_at"])} for r in runs]
    output_rows(rows, HISTORY_COLUMNS, sys.stdout, optional=HISTORY_OPTIONAL)
    return EXIT_OK


def _check_known(settings: Settings, in_state: list[str], key: str) -> None:
    """Refuse an ``--audience`` neither configured nor ever synced (a typo), naming the
    keys that are, as ``run`` does: "No runs match." would hide the typo."""
    configured = [a.property_key for a in settings.computations]
    if key in configured or key in in_state:
        return
    gone = [k for k in in_state if k not in configured]
    raise ConfigError(
        f"history --audience {key}: no audience or trait with that key "
        f"(configured: {', '.join(configured) or 'none'}"
        + (f"; no longer configured: {', '.join(gone)}" if gone else "")
        + ")"
    )


def cmd_show(args: argparse.Namespace) -> int:
    with open_state(settings_for(args), writes=False) as engine:
        found = load_run(engine, args.run_id, args.limit, (args.page - 1) * args.limit)
    if found is None:
        raise ConfigError(f"no run with id {args.run_id}: `audience-sync history` lists them")
    run = found
    if args.json:
        output_json(with_old_names(run, OLD_RUN_NAMES), sys.stdout)
        return EXIT_OK
    width = max(len(field) for field in SHOW_FIELDS) + 2
    for field in SHOW_FIELDS:
        value = short_time(run[field]) if field.endswith("_at") else run[field]
        print(f"{field + ':':<{width}}{as_text(value) if value is not None else '-'}")
    by_status = [f"{k} {v}" for k, v in sorted(run["changes_by_status"].items())]
    pruned = run["pruned"]
    if pruned["changes"]:
        by_status.append(f"{pruned['changes']} pruned")
    print(f"\nChanges ({', '.join(by_status) or 'none'}), page {args.page}:")
    if run["changes"]:
        changes = [
            {**c, "value": json.dumps(c["value"]), "delivered_at": short_time(c["delivered_at"])}
            for c in run["changes"]
        ]
        output_rows(changes, CHANGE_COLUMNS, sys.stdout, optional=CHANGE_OPTIONAL)
    elif pruned["changes"]:
        print(PRUNED_NOTE.format(what="they were"))
    if run["rejected_rows"]:
        print(f"\nRejected rows ({run['rejected']}), page {args.page}:")
        columns = ("row_number", "user_id", "email", "reason")
        output_rows(run["rejected_rows"], columns, sys.stdout)
    elif pruned["rejected_rows"] and args.page == 1:
        print(f"\nRejected rows ({run['rejected']}):")
        print(PRUNED_NOTE.format(what="they were"))
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
        print(f"\nMore: {again(args, 'show', *more)}")
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    with open_state(settings_for(args), writes=False) as engine:
        counts = prune(engine, utcnow() - timedelta(seconds=args.older_than), dry_run=args.dry_run)
        counts["workers"] = prune_workers(engine, args.older_than, dry_run=args.dry_run)
    if args.json:
        output_json({**counts, "dry_run": args.dry_run}, sys.stdout)
        return EXIT_OK
    *first, last = [f"{n} {table}" for table, n in counts.items()]
    listed = f"{', '.join(first)} and {last}"
    print(f"would delete {listed} (dry run)" if args.dry_run else f"deleted {listed}")
    return EXIT_OK
