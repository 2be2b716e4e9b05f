"""Queries behind the web pages that ``history`` and ``show`` do not answer: an audience's
state and growth, one user across every key, the shared rate limit. Runs and a run's
changes come from ``history`` (``load_runs``, ``load_run``) and workers from
``workers.list_workers``, so the pages and the CLI show the same thing the same way.

Every query is a seek on an index the tables already have: a page answers in milliseconds
whatever the size of the state (``benchmarks/bench_ui.py`` measures it at 1M memberships
and 10k runs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select

from audience_sync.budget import database_seconds
from audience_sync.history import _iso
from audience_sync.ledger import owed_event
from audience_sync.models import (
    NULL_JSON,
    audiences,
    contacts,
    member_changes,
    memberships,
    rate_limits,
    sync_runs,
    trait_values,
    uncertain_members,
)
from audience_sync.statuses import CHANGED_NOTHING_KINDS, DRY_RUN_KINDS

CHART_RUNS = 120  # runs an audience's chart draws, the newest
USER_CHANGES = 200  # changes the user page lists, the newest


@dataclass(frozen=True)
class AudienceState:
    """One audience (or computed trait) as its page shows it."""

    key: str
    name: str
    kind: str  # "audience" or "trait"
    source: str
    first_synced_at: str | None
    last_synced_at: str | None
    acknowledged: int  # members Gist acknowledged (a trait: users holding a non-null value)
    uncertain: int  # users sent a value that Gist has not acknowledged yet
    owed_changes: int  # the latest real run's changes left pending or refused: sent again
    owed_events: int  # track events of acknowledged changes not delivered yet
    last_run_id: int | None


@dataclass(frozen=True)
class RunPoint:
    """One real run of an audience, as its chart draws it."""

    run_id: int
    started_at: str | None
    status: str
    members: int
    entered: int
    exited: int


@dataclass(frozen=True)
class Holding:
    """What Gist should hold for one user under one key, as far as the state knows."""

    audience_key: str
    kind: str
    value: Any  # True/False, a trait's value, or None
    state: str  # "acknowledged", "uncertain", "exited", "not set"
    since: str | None = None
    run_id: int | None = None


@dataclass(frozen=True)
class UserHistory:
    """One user across every key: what Gist should hold now, and each change sent."""

    user_id: str
    email: str | None  # the contact's email as Gist last acknowledged it
    holdings: list[Holding] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)
    more_changes: bool = False


def load_audience(engine: Engine, key: str) -> AudienceState | None:
    """The audience or trait ``key``: what Gist holds of it now, and what is owed."""
    with engine.connect() as connection:
        row = connection.execute(select(audiences).where(audiences.c.key == key)).first()
        if row is None:
            return None
        kind = "trait" if row.kind == "trait" else "audience"
        if kind == "trait":
            held = select(func.count()).where(
                trait_values.c.trait_key == key, trait_values.c.value != NULL_JSON
            )
        else:
            held = select(func.count()).where(memberships.c.audience_key == key)
        acknowledged = connection.scalar(held) or 0
        uncertain = (
            connection.scalar(select(func.count()).where(uncertain_members.c.audience_key == key))
            or 0
        )
        last_run = connection.scalar(
            select(func.max(sync_runs.c.id)).where(
                sync_runs.c.audience_key == key,
                sync_runs.c.kind.not_in(DRY_RUN_KINDS.values()),
            )
        )
        # Each real run supersedes its key's older pending changes: only the latest run's
        # can still be owed, found by a seek on the (run_id, status) index.
        owed_changes = (
            connection.scalar(
                select(func.count()).where(
                    member_changes.c.run_id == last_run,
                    member_changes.c.status.in_(["pending", "failed"]),
                )
            )
            if last_run is not None
            else 0
        ) or 0
        owed_events = (
            connection.scalar(
                select(func.count()).where(member_changes.c.audience_key == key, owed_event())
            )
            or 0
        )
    return AudienceState(
        key=row.key,
        name=row.name,
        kind=kind,
        source=row.source,
        first_synced_at=_iso(row.first_synced_at),
        last_synced_at=_iso(row.last_synced_at),
        acknowledged=acknowledged,
        uncertain=uncertain,
        owed_changes=owed_changes,
        owed_events=owed_events,
        last_run_id=last_run,
    )


def load_growth(engine: Engine, key: str, limit: int = CHART_RUNS) -> list[RunPoint]:
    """The newest ``limit`` real runs of ``key`` (dry runs changed nothing), oldest first:
    members after each run, and how many entered and exited."""
    query = (
        select(
            sync_runs.c.id,
            sync_runs.c.started_at,
            sync_runs.c.status,
            sync_runs.c.members,
            sync_runs.c.entered,
            sync_runs.c.exited,
        )
        .where(
            sync_runs.c.audience_key == key,
            sync_runs.c.kind.not_in(CHANGED_NOTHING_KINDS),
            sync_runs.c.status != "running",
        )
        .order_by(sync_runs.c.id.desc())
        .limit(limit)
    )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [
        RunPoint(r.id, _iso(r.started_at), r.status, r.members, r.entered, r.exited)
        for r in reversed(rows)
    ]


def load_user(engine: Engine, user_id: str, limit: int = USER_CHANGES) -> UserHistory | None:
    """Everything the state knows of ``user_id`` across every key, or None when nothing.

    The tables are keyed (audience key, user id): naming every key (a few dozen at most)
    turns each lookup into index seeks, with no index on the user id alone to maintain on
    every write of a sync.
    """
    with engine.connect() as connection:
        kinds = {
            key: ("trait" if kind == "trait" else "audience")
            for key, kind in connection.execute(select(audiences.c.key, audiences.c.kind))
        }
        keys = sorted(kinds)
        email = connection.scalar(select(contacts.c.email).where(contacts.c.user_id == user_id))
        members = {
            r.audience_key: r
            for r in connection.execute(
                select(memberships).where(
                    memberships.c.audience_key.in_(keys), memberships.c.user_id == user_id
                )
            )
        }
        values = {
            r.trait_key: r
            for r in connection.execute(
                select(trait_values).where(
                    trait_values.c.trait_key.in_(keys), trait_values.c.user_id == user_id
                )
            )
        }
        uncertain = {
            r.audience_key: r
            for r in connection.execute(
                select(uncertain_members).where(
                    uncertain_members.c.audience_key.in_(keys),
                    uncertain_members.c.user_id == user_id,
                )
            )
        }
        c = member_changes.c
        rows = connection.execute(
            select(
                c.run_id,
                c.audience_key,
                c.email,
                c.value,
                c.value_json,
                c.status,
                c.attempts,
                c.http_status,
                c.last_error,
                c.delivered_at,
                c.event_status.label("event"),
                sync_runs.c.kind,
                sync_runs.c.started_at,
            )
            .join(sync_runs, sync_runs.c.id == c.run_id)
            .where(c.audience_key.in_(keys), c.user_id == user_id)
            .order_by(c.id.desc())
            .limit(limit + 1)
        ).mappings()
        changes = [_change(r) for r in rows]
    if not (email or members or values or uncertain or changes):
        return None
    more = len(changes) > limit
    changes = changes[:limit]
    holdings = []
    for key in keys:
        last = next(
            (ch for ch in changes if ch["audience_key"] == key and ch["status"] == "delivered"),
            None,
        )
        if key in uncertain:
            holdings.append(
                Holding(key, kinds[key], None, "uncertain", run_id=uncertain[key].run_id)
            )
        elif key in members:
            m = members[key]
            holdings.append(
                Holding(key, kinds[key], True, "acknowledged", _iso(m.since), m.last_run_id)
            )
        elif key in values:
            v = values[key]
            value = json.loads(v.value)
            holdings.append(
                Holding(key, kinds[key], value, "acknowledged", _iso(v.since), v.last_run_id)
            )
        elif last is not None:
            # Not held now: the last change Gist acknowledged says what it holds, false (an
            # audience's exit) or null (a trait's), unless the state was forgotten since.
            state = "exited" if last["value"] in (False, None) else "last acknowledged"
            holdings.append(
                Holding(key, kinds[key], last["value"], state, last["delivered_at"], last["run_id"])
            )
        elif any(ch["audience_key"] == key for ch in changes):
            holdings.append(Holding(key, kinds[key], None, "not set"))
    return UserHistory(user_id, email, holdings, changes, more)


def _change(row: Any) -> dict[str, Any]:
    change = dict(row)
    value_json = change.pop("value_json")
    change["value"] = json.loads(value_json) if value_json is not None else change["value"]
    if change["value"] is not None and value_json is None:
        change["value"] = bool(change["value"])
    change["delivered_at"] = _iso(change["delivered_at"])
    change["started_at"] = _iso(change["started_at"])
    return change


@dataclass(frozen=True)
class RateLimitUse:
    """One Gist workspace's shared request schedule, read against the database's clock."""

    workspace: str  # a hash of the base URL and the API key, never the key
    claimed_ahead_seconds: float  # how far past now slots are claimed (0: none claimed)
    last_claim_seconds_ago: float | None


def load_rate_limits(engine: Engine) -> list[RateLimitUse]:
    """Every workspace's shared rate limit: in use when slots are claimed ahead of now."""
    now = database_seconds(engine.dialect.name).label("now")
    with engine.connect() as connection:
        rows = connection.execute(select(rate_limits, now).order_by(rate_limits.c.workspace)).all()
    return [
        RateLimitUse(
            workspace=r.workspace,
            claimed_ahead_seconds=max(0.0, float(r.next_free) - float(r.now)),
            last_claim_seconds_ago=(
                None if r.claimed_at is None else max(0.0, float(r.now) - float(r.claimed_at))
            ),
        )
        for r in rows
    ]


def load_audience_keys(engine: Engine) -> list[tuple[str, str]]:
    """Every key the state has known with its kind (``audience`` or ``trait``), sorted."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(audiences.c.key, audiences.c.kind).order_by(audiences.c.key)
        ).all()
    return [(key, "trait" if kind == "trait" else "audience") for key, kind in rows]
