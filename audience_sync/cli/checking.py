"""Before and around syncing: ``check`` (can this set-up sync?) and ``reconcile`` (read what
Gist holds and make it the ledger, as when switching over from Segment's Gist destination)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

from audience_sync.cli.options import Commands, int_arg, open_state, settings_for
from audience_sync.cli.output import EXIT_FAILED, EXIT_OK, count, report_error
from audience_sync.cli.signals import stop_on_signals
from audience_sync.config import resolve_config_path
from audience_sync.render import output_json, output_rows

# reconcile.DEFAULT_PER_PAGE, written here so that parsing flags imports no reconcile (and
# through it httpx and the sync): tests/test_startup.py holds the two equal.
PER_PAGE = 100
RECONCILE_COLUMNS = (
    "audience_key", "kind", "status", "members", "entered", "exited", "resent", "run_id",
)  # fmt: skip


def register(commands: Commands) -> None:
    """``check`` and ``reconcile``."""
    commands.add(
        "check", "check that this set-up can sync",
        "Check the config, the state database (reachable, at this version's revision), each "
        "audience's source (its first row read) and Gist's API key (one authenticated read, "
        "no retries), and print them as a checklist. Sends nothing. Exit 0 when every check "
        "holds, 1 otherwise.",
        handler=cmd_check, json="print the checks as a JSON array",
    )  # fmt: skip

    command = commands.add(
        "reconcile", "read what Gist holds and record it as the acknowledged state",
        "Page through every Gist contact and record, for each audience (all when none is "
        "named), what Gist holds as if Gist had acknowledged it: a property true is a "
        "member, false or absent is not; a trait's property is its value. Sends no contact "
        "write and no event: the next run sends only where the source differs from Gist. For "
        "switching over from Segment's Gist destination, or after a lost state. Resumable: "
        "a reconcile killed half-way continues where it stopped, unless a run or a "
        "`verify --repair` of its keys came between (it then reads Gist again from the "
        "first page).",
        handler=cmd_reconcile, json="print each audience's result as a JSON array",
    )  # fmt: skip
    command.add_argument(
        "keys", nargs="*", metavar="KEY", help="audiences' or traits' property keys"
    )
    command.add_argument(
        "--dry-run", action="store_true",
        help="count how the sources differ from what Gist holds; record nothing",
    )  # fmt: skip
    command.add_argument(
        "--per-page", type=int_arg(1, 1000), default=PER_PAGE,
        help=f"contacts asked for per page (default {PER_PAGE}; Gist may give fewer)",
    )  # fmt: skip


def cmd_check(args: argparse.Namespace) -> int:
    from audience_sync.check import run_checks

    checks = run_checks(resolve_config_path(args.config, os.environ), os.environ)
    if args.json:
        output_json([asdict(c) for c in checks], sys.stdout)
    else:
        for check in checks:
            print(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
        failed = [c.name for c in checks if not c.ok]
        print(
            f"{count(len(failed), 'check')} failed: {', '.join(failed)}"
            if failed
            else f"all {len(checks)} checks passed"
        )
    return EXIT_OK if all(c.ok for c in checks) else EXIT_FAILED


def cmd_reconcile(args: argparse.Namespace) -> int:
    from audience_sync.reconcile import reconcile
    from audience_sync.runs import result_fields
    from audience_sync.sync import exit_code

    settings = settings_for(args)
    for key in args.keys:
        settings.audience(key)  # a clear error for a key that is not configured
    with open_state(settings) as engine, stop_on_signals() as stop:
        report = reconcile(
            settings, engine, args.keys, dry_run=args.dry_run, per_page=args.per_page, stop=stop
        )
    if args.json:
        output_json([result_fields(r) for r in report.results], sys.stdout)
    else:
        rows = [result_fields(r) for r in report.results]
        output_rows(rows, RECONCILE_COLUMNS, sys.stdout, optional=("run_id", "kind"))
        print(
            f"{report.contacts:,} contacts read in {count(report.pages, 'page')}, "
            f"{count(report.leads, 'lead')} skipped (no user_id). members: what Gist holds; "
            "entered/exited/resent: how the source differs from it"
            + (" (dry run: nothing recorded)" if report.dry_run else "")
        )
    if report.error is not None:
        report_error(report.error)
    return exit_code(report.results)
