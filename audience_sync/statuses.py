"""The vocabulary of runs and changes as ``Literal`` types, so mypy catches a misspelt status.

Every status and kind stored in ``sync_runs`` and ``member_changes`` (and shown by
``history``, ``show``, alerts and metrics) is one of these; the tuples list them in order.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

Mode = Literal["run", "backfill", "retire"]
"""What a sync does: send what changed, resend every member, or unset a removed key."""

RunKind = Literal[
    "run",
    "backfill",
    "retire",
    "dry-run",
    "backfill-dry-run",
    "retire-dry-run",
    "reconcile",
    "dry-reconcile",
]
"""``sync_runs.kind``: the mode; for a run that sent nothing ``dry-run`` (of ``run``),
``backfill-dry-run`` or ``retire-dry-run``; ``reconcile`` for a reading of what Gist holds
that became the ledger, ``dry-reconcile`` for one that only counted the differences."""

RunStatus = Literal[
    "running", "succeeded", "partial", "failed", "guarded", "interrupted", "skipped"
]
"""``sync_runs.status`` (``skipped`` is never stored: the audience's lease was held)."""

ChangeStatus = Literal["pending", "delivered", "failed", "superseded", "planned"]
"""``member_changes.status``: owed, acknowledged by Gist, refused by Gist, re-planned, or
only planned by a dry run (never sent)."""

EventStatus = Literal["pending", "delivered", "failed", "planned"]
"""``member_changes.event_status`` for a change with a track event (NULL without one);
``planned`` for a dry run's."""

MODES: Final[tuple[Mode, ...]] = get_args(Mode)
DRY_RUN_KINDS: Final[dict[Mode, RunKind]] = {
    "run": "dry-run",
    "backfill": "backfill-dry-run",
    "retire": "retire-dry-run",
}
"""The kind a dry run of each mode is recorded as; its values are the kinds that sent nothing."""
CHANGED_NOTHING_KINDS: Final[frozenset[RunKind]] = frozenset(
    {*DRY_RUN_KINDS.values(), "dry-reconcile"}
)
"""Kinds of runs that moved neither Gist nor the ledger: the dry runs and dry reconciles."""
RUN_STATUSES: Final[tuple[RunStatus, ...]] = get_args(RunStatus)
FAILED_STATUSES: Final[frozenset[RunStatus]] = frozenset(
    {"partial", "failed", "guarded", "interrupted"}
)
"""Statuses of a run that needs a human: they make ``run`` exit 1 and raise an alert."""
