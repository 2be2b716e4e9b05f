"""``sync_runs`` bookkeeping: opening a run, recording how it ended, and the results callers see."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, exists, func, select, update
from sqlalchemy.exc import SQLAlchemyError

from audience_sync.errors import AudienceSyncError, FailureKind
from audience_sync.ledger import owed_event
from audience_sync.models import audiences
from audience_sync.models import member_changes as changes
from audience_sync.models import sync_runs as runs
from audience_sync.statuses import CHANGED_NOTHING_KINDS, FAILED_STATUSES, RunKind, RunStatus

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """Naive UTC now: how every timestamp is stored."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class RunResult:
    """How one audience's run ended (``run_id`` is None when it was skipped for a lock)."""

    audience_key: str
    name: str
    kind: RunKind
    status: RunStatus
    run_id: int | None = None
    source_rows: int = 0
    members: int = 0
    entered: int = 0
    exited: int = 0
    delivered: int = 0
    failed: int = 0
    rejected: int = 0
    error: str | None = None
    failure: FailureKind | None = None  # why it failed, as a scheduler needs to know (errors.py)
    resent: int = 0  # members sent again unchanged, because their email changed
    email_conflicts: int = 0  # rows whose email lost to another audience's for the same user
    staged_in: str | None = None  # where the source rows were checked: "python" or "database"
    fast_path: bool = False  # load and diff skipped: an unchanged file, nothing owed
    resumed: bool = False  # a backfill that skipped whom the unfinished ones before it reached
    source_digest: str | None = None  # the file's bytes as read (CSV/JSONL sources)
    config_fingerprint: str | None = None  # a hash of the settings deciding what is sent
    contacts_read: int | None = None  # a reconcile's: Gist contacts read,
    pages_read: int | None = None  # ...pages of them,
    leads: int | None = None  # ...and leads among them (no user_id: skipped)


def result_fields(result: RunResult) -> dict[str, Any]:
    """The result as a dict for output and alerts: without the digest and fingerprint, which
    are ``sync_runs`` bookkeeping for the fast path, with a reconcile's counts of what it
    read only for a reconcile, and whether it resumed only for a backfill."""
    fields = asdict(result)
    del fields["source_digest"], fields["config_fingerprint"]
    if result.contacts_read is None:
        del fields["contacts_read"], fields["pages_read"], fields["leads"]
    if result.kind not in ("backfill", "backfill-dry-run"):
        del fields["resumed"]
    return fields


def failure_kind(exc: BaseException) -> FailureKind:
    """The failure kind of an exception a sync met or raised: each of the project's errors
    names its own, a database error not yet translated is the state database's, Ctrl-C is an
    interruption, anything else is ``internal``."""
    if isinstance(exc, AudienceSyncError):
        return exc.failure
    if isinstance(exc, SQLAlchemyError):
        return "state"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return "internal"


def exit_code(results: Sequence[RunResult]) -> int:
    """0 all succeeded; 1 any partial/failed/guarded; 3 any skipped for a lock (none failed)."""
    if any(r.status in FAILED_STATUSES for r in results):
        return 1
    if any(r.status == "skipped" for r in results):
        return 3
    return 0


def open_run(engine: Engine, key: str, name: str, source: str, kind: RunKind, now: datetime) -> int:
    """Record a new ``running`` run of ``key`` and return its id.

    The caller holds the key's lease, so any run of it still marked running is dead: it
    becomes ``interrupted`` (its snapshot was a temporary table, gone with its connection).
    """
    with engine.begin() as connection:
        connection.execute(
            update(runs)
            .where(runs.c.audience_key == key, runs.c.status == "running")
            .values(status="interrupted", finished_at=now, error="the process running it stopped")
        )
        known = connection.scalar(select(func.count()).where(audiences.c.key == key))
        if known:
            connection.execute(
                update(audiences).where(audiences.c.key == key).values(name=name, source=source)
            )
        else:
            connection.execute(audiences.insert().values(key=key, name=name, source=source))
        run_id: int = connection.execute(
            runs.insert()
            .values(
                audience_key=key,
                kind=kind,
                status="running",
                started_at=now,
                source_rows=0,
                members=0,
                entered=0,
                exited=0,
                delivered=0,
                failed=0,
                rejected=0,
                resent=0,
                email_conflicts=0,
            )
            .returning(runs.c.id)
        ).scalar_one()
    return run_id


def load_key_kind(engine: Engine, key: str) -> str | None:
    """The kind ("audience" or "trait") recorded for ``key``, if any."""
    with engine.connect() as connection:
        return connection.scalar(select(audiences.c.kind).where(audiences.c.key == key))


def save_key_kind(engine: Engine, key: str, kind: str) -> None:
    """Record what the key's state means from now on."""
    with engine.begin() as connection:
        connection.execute(update(audiences).where(audiences.c.key == key).values(kind=kind))


def save_run(engine: Engine, result: RunResult, finished_at: datetime | None) -> None:
    """Write the run's counts and status (``finished_at`` once it ended)."""
    with engine.begin() as connection:
        connection.execute(
            update(runs)
            .where(runs.c.id == result.run_id)
            .values(
                status=result.status,
                finished_at=finished_at,
                source_rows=result.source_rows,
                members=result.members,
                entered=result.entered,
                exited=result.exited,
                delivered=result.delivered,
                failed=result.failed,
                rejected=result.rejected,
                resent=result.resent,
                email_conflicts=result.email_conflicts,
                error=result.error,
                fast_path=result.fast_path,
                resumed=result.resumed,
                source_digest=result.source_digest,
                config_fingerprint=result.config_fingerprint,
                contacts_read=result.contacts_read,
                pages_read=result.pages_read,
                leads=result.leads,
            )
        )
        if finished_at is not None and result.status in ("succeeded", "partial"):
            connection.execute(
                update(audiences)
                .where(audiences.c.key == result.audience_key)
                .values(
                    last_synced_at=finished_at,
                    first_synced_at=func.coalesce(audiences.c.first_synced_at, finished_at),
                )
            )


def finish_run(
    engine: Engine,
    result: RunResult,
    error: str | None,
    interrupted: bool,
    clock: Clock,
    *,
    lost: str | None = None,
    failure: FailureKind | None = None,
) -> RunResult:
    """Count what was delivered and failed, settle the run's status and save it. ``lost``:
    why the run's lease was lost; such a run ends ``interrupted`` whatever it delivered
    (another process may have superseded what it planned). ``failure``: the kind of
    ``error``, why delivery stopped."""
    counts = change_counts(engine, result.run_id)
    delivered, failed, pending = (counts.get(s, 0) for s in ("delivered", "failed", "pending"))
    status: RunStatus
    if lost is not None:
        status, error, interrupted = "interrupted", lost, True
    elif interrupted and pending:
        status = "interrupted"
    elif (
        error is not None
        and not interrupted
        and (delivered or failed or pending or owes_events(engine, result.audience_key))
    ):
        # Delivery stopped (key refused, Gist down, events owed): not a success, even if
        # this audience's own changes all went through before it did. A run that planned
        # nothing and owes no event never needed Gist: it succeeded whatever stopped the
        # others, as it does when the fast path spares it.
        status = "failed"
    elif failed or pending:
        status = "partial"
    else:
        status = "succeeded"
    kinds: dict[RunStatus, FailureKind | None] = {
        "interrupted": "interrupted",
        "failed": failure or "internal",
        "partial": "refused",
    }
    finished = replace(
        result,
        status=status,
        delivered=delivered,
        failed=failed,
        error=error
        if status in ("failed", "interrupted")
        else (f"{failed} changes failed" if failed else None),
        failure=kinds.get(status),
    )
    save_run(engine, finished, clock())
    return finished


def owes_events(engine: Engine, key: str) -> bool:
    """Whether ``key`` owes Gist a track event (of this run or an earlier one)."""
    with engine.connect() as connection:
        return bool(
            connection.scalar(select(exists().where(changes.c.audience_key == key, owed_event())))
        )


def abandon_runs(
    engine: Engine,
    running: Sequence[RunResult],
    status: RunStatus,
    exc: BaseException,
    clock: Clock,
) -> None:
    """Record runs cut short by a crash or Ctrl-C; acknowledged work is already saved."""
    for result in running:
        try:
            counts = change_counts(engine, result.run_id)
            save_run(
                engine,
                replace(
                    result,
                    status=status,
                    delivered=counts.get("delivered", 0),
                    failed=counts.get("failed", 0),
                    error=f"{type(exc).__name__}: {exc}",
                ),
                clock(),
            )
        except Exception:
            # The original error matters more than this one; the next run marks it interrupted.
            log.exception("could not record run %s as %s", result.run_id, status)


def change_counts(engine: Engine, run_id: int | None) -> dict[str, int]:
    """How many of the run's changes are in each status."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(changes.c.status, func.count())
            .where(changes.c.run_id == run_id)
            .group_by(changes.c.status)
        ).all()
    return {status: count for status, count in rows}


def unfinished_backfills(engine: Engine, key: str, run_id: int) -> list[int]:
    """The backfill runs that did not succeed since the key's last run of any other kind
    (dry runs aside), its last successful backfill or its last backfill that started over
    (that one included): what ``backfill --resume`` resumes. A run of another kind in
    between (a run, a retire, a reconcile) may have moved what Gist holds for the users
    those backfills reached — an exit sent, the ledger read anew after Gist was reset — so
    the backfill after it starts over; one that started over did not skip whom the earlier
    ones reached, and may have followed a reset of Gist that made them moot."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(runs.c.id, runs.c.kind, runs.c.status, runs.c.resumed)
            .where(
                runs.c.audience_key == key,
                runs.c.id != run_id,
                runs.c.kind.not_in(CHANGED_NOTHING_KINDS),
            )
            .order_by(runs.c.id.desc())
        ).all()
    chain: list[int] = []
    for row in rows:
        if row.kind != "backfill" or row.status == "succeeded":
            break
        chain.append(row.id)
        if not row.resumed:
            break
    return chain
