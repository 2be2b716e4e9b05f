"""Queries behind ``history`` and ``show``: what ran, what it sent, what failed, and why."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, case, func, select

from audience_sync.models import member_changes, rejected_rows, sync_runs

RUN_FIELDS = (
    "id",
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
    "error",
)


def load_runs(engine: Engine, audience: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The newest ``limit`` runs, newest first, optionally of one audience."""
    query = select(*(sync_runs.c[f] for f in RUN_FIELDS)).order_by(sync_runs.c.id.desc())
    if audience is not None:
        query = query.where(sync_runs.c.audience_key == audience)
    with engine.connect() as connection:
        rows = connection.execute(query.limit(limit)).mappings().all()
    return [_run_dict(row) for row in rows]


def load_run(engine: Engine, run_id: int, limit: int = 100) -> dict[str, Any] | None:
    """One run with up to ``limit`` of its changes (failed first) and rejected rows."""
    with engine.connect() as connection:
        row = (
            connection.execute(
                select(*(sync_runs.c[f] for f in RUN_FIELDS)).where(sync_runs.c.id == run_id)
            )
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
        changes = connection.execute(
            select(
                member_changes.c.user_id,
                member_changes.c.email,
                member_changes.c.value,
                member_changes.c.status,
                member_changes.c.attempts,
                member_changes.c.http_status,
                member_changes.c.last_error,
                member_changes.c.delivered_at,
            )
            .where(member_changes.c.run_id == run_id)
            .order_by(failed_first, member_changes.c.id)
            .limit(limit)
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
        ).mappings()
        run["changes_by_status"] = {status: count for status, count in by_status}
        run["changes"] = [
            {**change, "value": bool(change["value"]), "delivered_at": _iso(change["delivered_at"])}
            for change in changes
        ]
        run["rejected_rows"] = [dict(r) for r in rejected]
    return run


def load_last_starts(engine: Engine) -> dict[str, datetime]:
    """When each audience's latest real run (not a dry run) started, by audience key."""
    query = (
        select(sync_runs.c.audience_key, func.max(sync_runs.c.started_at))
        .where(sync_runs.c.kind != "dry-run")
        .group_by(sync_runs.c.audience_key)
    )
    with engine.connect() as connection:
        return {key: started for key, started in connection.execute(query)}


def _run_dict(row: Any) -> dict[str, Any]:
    run = dict(row)
    run["audience"] = run.pop("audience_key")
    run["started_at"] = _iso(run["started_at"])
    run["finished_at"] = _iso(run["finished_at"])
    return run


def _iso(value: datetime | None) -> str | None:
    """Stored timestamps are naive UTC; show them as ISO 8601 with a Z."""
    return None if value is None else value.replace(microsecond=0).isoformat() + "Z"
