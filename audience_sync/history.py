"""Queries behind ``history`` and ``show``: what ran, what it sent, what failed, and why."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, get_args

from sqlalchemy import (
    ColumnElement,
    Engine,
    and_,
    case,
    delete,
    exists,
    func,
    or_,
    select,
    tuple_,
    union_all,
)

from audience_sync.ledger import owed_event
from audience_sync.models import (
    NULL_JSON,
    audiences,
    email_conflicts,
    member_changes,
    memberships,
    rejected_rows,
    sync_runs,
    trait_values,
    uncertain_members,
)
from audience_sync.statuses import DRY_RUN_KINDS, RunKind, RunStatus

SCAN_ROWS = 20_000  # changes one page of entered or exited ones looks through, at most
ChangeFilter = Literal["all", "entered", "exited", "failed"]
"""Which of a run's changes ``load_changes`` lists."""
CHANGE_FILTERS: Final[tuple[ChangeFilter, ...]] = get_args(ChangeFilter)

RUN_FIELDS = (
    "run_id",
    "audience_key",
    "kind",
    "status",
    "started_at",
    "finished_at",
    "source_rows",
    "members",
    "entered",
    "exited",
    "delivered",
    "failed",
    "rejected",
    "resent",
    "email_conflicts",
    "fast_path",
    "error",
)


def load_runs(
    engine: Engine,
    audience: str | None = None,
    limit: int = 20,
    *,
    status: RunStatus | None = None,
    since: datetime | None = None,
    kind: RunKind | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """The newest ``limit`` runs after skipping ``offset``, newest first, filtered by
    audience, status, kind and start time (``history`` and the web page's run list)."""
    query = select(*_run_columns()).order_by(sync_runs.c.id.desc())
    if audience is not None:
        query = query.where(sync_runs.c.audience_key == audience)
    if status is not None:
        query = query.where(sync_runs.c.status == status)
    if kind is not None:
        query = query.where(sync_runs.c.kind == kind)
    if since is not None:
        query = query.where(sync_runs.c.started_at >= since)
    with engine.connect() as connection:
        rows = connection.execute(query.limit(limit).offset(offset)).mappings().all()
    return [_run_dict(row) for row in rows]


def load_run(
    engine: Engine,
    run_id: int,
    limit: int = 100,
    offset: int = 0,
    *,
    changes: bool = True,
) -> dict[str, Any] | None:
    """One run with a page of its changes (failed first, then by user) and rejected rows:
    ``limit`` of each, after skipping ``offset``. ``pruned`` counts what ``prune`` deleted of
    the run's changes and rejected rows (the run's own counts say what there was).

    The changes' natural order sorts all of the run's changes for each page: ``changes=False``
    leaves them out for a caller that pages them by index (``load_changes``)."""
    with engine.connect() as connection:
        row = (
            connection.execute(select(*_run_columns()).where(sync_runs.c.id == run_id))
            .mappings()
            .first()
        )
        if row is None:
            return None
        run = _run_dict(row)
        by_status = connection.execute(
            select(member_changes.c.status, func.count())
            .where(member_changes.c.run_id == run_id)
            .group_by(member_changes.c.status)
        ).all()
        failed_first = case((member_changes.c.status == "failed", 0), else_=1)
        page: Iterable[Any] = []
        if changes:
            page = connection.execute(
                select(
                    member_changes.c.user_id,
                    member_changes.c.email,
                    member_changes.c.value,
                    member_changes.c.value_json,
                    member_changes.c.status,
                    member_changes.c.attempts,
                    member_changes.c.http_status,
                    member_changes.c.last_error,
                    member_changes.c.delivered_at,
                    member_changes.c.event_status.label("event"),
                )
                .where(member_changes.c.run_id == run_id)
                .order_by(failed_first, *_by_user(member_changes.c.user_id), member_changes.c.id)
                .limit(limit)
                .offset(offset)
            ).mappings()
        rejected = connection.execute(
            select(
                rejected_rows.c.row_number,
                rejected_rows.c.user_id,
                rejected_rows.c.email,
                rejected_rows.c.reason,
            )
            .where(rejected_rows.c.run_id == run_id)
            .order_by(rejected_rows.c.row_number)
            .limit(limit)
            .offset(offset)
        ).mappings()
        run["changes_by_status"] = {status: count for status, count in by_status}
        run["changes"] = [_change_dict(change) for change in page]
        run["rejected_rows"] = [dict(r) for r in rejected]
        rejected_left = connection.scalar(
            select(func.count()).where(rejected_rows.c.run_id == run_id)
        )
        run["pruned"] = _pruned(run, rejected_left or 0)
        conflicts = connection.execute(
            select(email_conflicts.c.user_id, email_conflicts.c.email, email_conflicts.c.used_email)
            .where(email_conflicts.c.run_id == run_id)
            .order_by(*_by_user(email_conflicts.c.user_id), email_conflicts.c.id)
            .limit(limit)
            .offset(offset)
        ).mappings()
        run["email_conflict_rows"] = [dict(r) for r in conflicts]
    return run


@dataclass(frozen=True)
class ChangesPage:
    """A page of one run's changes (``load_changes``)."""

    changes: list[dict[str, Any]]
    # Where the next page starts (its ``after``) when more may follow: the last change shown,
    # or the last one looked at when a filter's window ended first.
    next_after: int | None


def load_changes(
    engine: Engine,
    run_id: int,
    which: ChangeFilter = "all",
    after: int | None = None,
    limit: int = 100,
) -> ChangesPage:
    """A page of a run's changes, failed first, then by status and user id: the order of the
    ``(run_id, status, user_id)`` index, so each page is a seek however many changes the run
    has (a first sync's million). ``after`` is the id of the previous page's last change;
    ``which`` keeps only the entered, exited or failed ones."""
    c = member_changes.c
    columns = (
        c.id, c.user_id, c.email, c.value, c.value_json, c.status, c.attempts, c.http_status,
        c.last_error, c.delivered_at, c.event_status.label("event"),
    )  # fmt: skip
    kept = (c.run_id == run_id, *_change_filter(which, c))
    found: list[Any] = []
    with engine.connect() as connection:
        mark = None
        if after is not None:
            mark = connection.execute(
                select(c.status, c.user_id, c.id).where(c.id == after, c.run_id == run_id)
            ).first()
        if mark is None or mark.status == "failed":
            failed = select(*columns).where(*kept, c.status == "failed")
            if mark is not None:
                failed = failed.where(tuple_(c.user_id, c.id) > tuple_(mark.user_id, mark.id))
            found += connection.execute(
                failed.order_by(c.user_id, c.id).limit(limit + 1)
            ).mappings()
        resume = None
        if len(found) <= limit and which != "failed":
            rest = select(*columns).where(c.run_id == run_id, c.status != "failed")
            if mark is not None and mark.status != "failed":
                rest = rest.where(
                    tuple_(c.status, c.user_id, c.id) > tuple_(mark.status, mark.user_id, mark.id)
                )
            rest = rest.order_by(c.status, c.user_id, c.id)
            wanted = limit + 1 - len(found)
            if which == "all":
                found += connection.execute(rest.limit(wanted)).mappings()
            else:
                # Entered or exited is no index's column: look through a bounded window of
                # the index's order, so a run of a million changes with few exits still
                # answers at once; the next page goes on after the window.
                window = rest.limit(SCAN_ROWS).subquery()
                order = (window.c.status, window.c.user_id, window.c.id)
                matched = (
                    connection.execute(
                        select(window)
                        .where(*_change_filter(which, window.c))
                        .order_by(*order)
                        .limit(wanted)
                    )
                    .mappings()
                    .all()
                )
                found += matched
                if len(matched) < wanted and (
                    connection.scalar(select(func.count()).select_from(window)) == SCAN_ROWS
                ):
                    resume = connection.scalar(
                        select(window.c.id).order_by(*(o.desc() for o in order)).limit(1)
                    )
    shown = [_change_dict(row) for row in found[:limit]]
    if len(found) > limit:
        resume = shown[-1]["id"]
    return ChangesPage(shown, resume)


def _change_filter(which: ChangeFilter, c: Any) -> list[ColumnElement[bool]]:
    """Conditions on ``member_changes`` columns ``c`` keeping a run's entered changes (an
    audience's ``true``, a trait's value other than ``null``), exited ones (``false``,
    ``null``) or failed ones."""
    if which == "entered":
        return [or_(c.value.is_(True), and_(c.value_json.is_not(None), c.value_json != NULL_JSON))]
    if which == "exited":
        return [or_(c.value.is_(False), c.value_json == NULL_JSON)]
    if which == "failed":
        return [c.status == "failed"]
    return []


def _by_user(user_id: ColumnElement[str]) -> list[ColumnElement[Any]]:
    """Sort keys putting user ids in natural order: numeric ones first, by value (1, 2, 10,
    100, not 1, 10, 100, 2), then the others as text."""
    digits = func.ltrim(user_id, "0123456789")
    numeric = and_(user_id != "", digits == "")
    significant = func.ltrim(user_id, "0")  # "007" is 7: its length is its magnitude
    return [
        case((numeric, 0), else_=1),
        case((numeric, func.length(significant)), else_=0),
        case((numeric, significant), else_=user_id),
    ]


def _pruned(run: dict[str, Any], rejected_left: int) -> dict[str, int]:
    """How many of the run's changes and rejected rows ``prune`` deleted. Delivered and
    failed changes are final, and the run counted them when it ended; a dry run's planned
    ones are its entered, exited and re-sent members, pruned all together."""
    left = run["changes_by_status"]
    if run["kind"] in DRY_RUN_KINDS.values():
        planned = run["entered"] + run["exited"] + run["resent"]
        changes = planned if not left.get("planned") else 0
    else:
        changes = max(0, run["delivered"] - left.get("delivered", 0)) + max(
            0, run["failed"] - left.get("failed", 0)
        )
    return {"changes": changes, "rejected_rows": max(0, run["rejected"] - rejected_left)}


def prune(engine: Engine, older_than: datetime, *, dry_run: bool = False) -> dict[str, int]:
    """Delete the changes and rejected rows of runs that started before ``older_than``;
    with ``dry_run``, only count them. Returns the count per table.

    ``sync_runs`` keeps every summary; a running run is never touched. A change still
    ``pending``, whose track event is still owed (``pending`` or ``failed``), or of a user
    whose value in Gist is uncertain (its value may be sent again), is kept, so pruning
    cannot hide work that is owed.
    """
    old_runs = select(sync_runs.c.id).where(
        sync_runs.c.started_at < older_than, sync_runs.c.status != "running"
    )
    old_changes = (
        member_changes.c.run_id.in_(old_runs),
        member_changes.c.status != "pending",
        ~owed_event(),
        ~exists().where(
            uncertain_members.c.audience_key == member_changes.c.audience_key,
            uncertain_members.c.user_id == member_changes.c.user_id,
        ),
    )
    old_rejected = (rejected_rows.c.run_id.in_(old_runs),)
    with engine.begin() as connection:
        if dry_run:
            changes = connection.scalar(select(func.count()).where(*old_changes)) or 0
            rejected = connection.scalar(select(func.count()).where(*old_rejected)) or 0
        else:
            changes = connection.execute(delete(member_changes).where(*old_changes)).rowcount
            rejected = connection.execute(delete(rejected_rows).where(*old_rejected)).rowcount
    return {"member_changes": changes, "rejected_rows": rejected}


@dataclass(frozen=True)
class Orphan:
    """A key no longer configured that Gist may still hold values of."""

    kind: str  # "audience" or "trait" (``audiences.kind``): `retire` sends false or null
    held: int  # users Gist may hold a value of it for (members, non-null values, uncertain)


def load_orphans(engine: Engine, configured: Iterable[str]) -> dict[str, Orphan]:
    """Audiences and traits no longer configured that Gist may still hold values of, by key."""
    keys = set(configured)
    orphans: dict[str, Orphan] = {}
    with engine.connect() as connection:
        # Every key ever synced has an `audiences` row: look only at the unconfigured ones,
        # so a run never scans the memberships of the audiences it just synced.
        for key, kind in connection.execute(select(audiences.c.key, audiences.c.kind)):
            if key in keys:
                continue
            held = union_all(
                select(memberships.c.user_id).where(memberships.c.audience_key == key),
                select(trait_values.c.user_id).where(
                    trait_values.c.trait_key == key, trait_values.c.value != NULL_JSON
                ),
                select(uncertain_members.c.user_id).where(uncertain_members.c.audience_key == key),
            ).subquery()
            count = connection.scalar(select(func.count(func.distinct(held.c.user_id))))
            if count:
                orphans[key] = Orphan("trait" if kind == "trait" else "audience", count)
    return orphans


def load_keys(engine: Engine) -> list[str]:
    """Every audience and trait key the state has known, sorted."""
    with engine.connect() as connection:
        return sorted(connection.scalars(select(audiences.c.key)))


def load_last_starts(engine: Engine) -> dict[str, datetime]:
    """When each audience's latest real run (not a dry run) started, by audience key."""
    query = (
        select(sync_runs.c.audience_key, func.max(sync_runs.c.started_at))
        .where(sync_runs.c.kind.not_in(DRY_RUN_KINDS.values()))
        .group_by(sync_runs.c.audience_key)
    )
    with engine.connect() as connection:
        return {key: started for key, started in connection.execute(query)}


def _change_dict(row: Any) -> dict[str, Any]:
    """A change as shown: the value it sets (a trait's decoded JSON, ``null`` included)."""
    change = dict(row)
    value_json = change.pop("value_json")
    change["value"] = json.loads(value_json) if value_json is not None else bool(change["value"])
    change["delivered_at"] = _iso(change["delivered_at"])
    return change


def load_last_successes(engine: Engine, keys: Iterable[str]) -> dict[str, datetime]:
    """When each of ``keys`` last finished a real run that succeeded (naive UTC)."""
    wanted = list(keys)
    query = (
        select(sync_runs.c.audience_key, func.max(sync_runs.c.finished_at))
        .where(
            sync_runs.c.status == "succeeded",
            sync_runs.c.kind.not_in(DRY_RUN_KINDS.values()),
            sync_runs.c.audience_key.in_(wanted),
        )
        .group_by(sync_runs.c.audience_key)
    )
    with engine.connect() as connection:
        return {key: at for key, at in connection.execute(query) if at is not None}


def load_recent_statuses(engine: Engine, keys: Iterable[str], n: int) -> dict[str, list[str]]:
    """The statuses of each audience's latest ``n`` finished real runs, newest first."""
    found: dict[str, list[str]] = {}
    with engine.connect() as connection:
        for key in keys:
            found[key] = list(
                connection.scalars(
                    select(sync_runs.c.status)
                    .where(
                        sync_runs.c.audience_key == key,
                        sync_runs.c.kind.not_in(DRY_RUN_KINDS.values()),
                        sync_runs.c.status != "running",
                    )
                    .order_by(sync_runs.c.id.desc())
                    .limit(n)
                )
            )
    return found


def _run_columns() -> list[Any]:
    """``RUN_FIELDS`` of ``sync_runs``: its ``id`` is ``run_id``, as everywhere else."""
    return [sync_runs.c.id.label("run_id") if f == "run_id" else sync_runs.c[f] for f in RUN_FIELDS]


def _run_dict(row: Any) -> dict[str, Any]:
    run = dict(row)
    run["started_at"] = _iso(run["started_at"])
    run["finished_at"] = _iso(run["finished_at"])
    return run


def _iso(value: datetime | None) -> str | None:
    """Stored timestamps are naive UTC; show them as ISO 8601 (milliseconds) with a Z."""
    return None if value is None else value.isoformat(timespec="milliseconds") + "Z"
