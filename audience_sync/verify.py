"""``verify``: read a random sample of an audience back from Gist and report drift."""

from __future__ import annotations

import asyncio
import random
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, Select, exists, false, func, select

from audience_sync.config import Settings
from audience_sync.db import upsert
from audience_sync.delivery import Pacer
from audience_sync.errors import ApiError, AuthError
from audience_sync.gist import GistClient, make_http_client
from audience_sync.models import audiences, memberships, uncertain_members
from audience_sync.models import member_changes as changes
from audience_sync.models import sync_runs as runs

MISSING = "missing"  # Drift.actual when Gist has no contact with that user_id
STREAM_ROWS = 1000


@dataclass(frozen=True)
class Drift:
    """A sampled user whose value in Gist is not the one we last delivered."""

    user_id: str
    expected: bool
    actual: Any  # Gist's value; None when the property is absent; MISSING when the contact is
    reason: str  # "value differs" | "property missing" | "contact missing" | "error: ..."


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify_audience`` found: ``matching + len(drifted) == sampled``."""

    audience_key: str
    sampled: int
    matching: int
    drifted: list[Drift]
    repaired: int  # drifted users marked uncertain, so the next run re-sends their value

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form, for ``--json``."""
        return asdict(self)


@dataclass(frozen=True)
class Sample:
    """One user to read back, and the value Gist acknowledged for them."""

    user_id: str
    email: str
    expected: bool


def verify_audience(
    settings: Settings,
    engine: Engine,
    key: str,
    *,
    sample: int = 100,
    repair: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    seed: int | None = None,
) -> VerifyReport:
    """Fetch up to ``sample`` random members of audience ``key`` (plus up to ``sample // 4``
    users whose exit was delivered) from Gist and compare their property with what Gist
    acknowledged. With ``repair``, drifted users go into ``uncertain_members`` so the next
    ``run`` re-sends whatever the source calls for; ``memberships`` is never touched.

    Rate-limited and retried like delivery. ``AuthError`` propagates; other per-user API
    errors are reported as drift with reason ``"error: ..."`` and are not repaired.
    """
    if sample < 0:
        raise ValueError("sample must be 0 or more")
    samples = load_sample(settings, engine, key, sample, seed)
    results = asyncio.run(_fetch_all(settings, key, samples, transport))
    drifted = [d for d in results if d is not None]
    repaired = 0
    if repair:
        emails = {s.user_id: s.email for s in samples}
        to_repair = [d.user_id for d in drifted if not d.reason.startswith("error:")]
        repaired = save_repairs(engine, key, [(u, emails[u]) for u in to_repair])
    return VerifyReport(key, len(samples), len(samples) - len(drifted), drifted, repaired)


def load_sample(
    settings: Settings, engine: Engine, key: str, size: int, seed: int | None = None
) -> list[Sample]:
    """Random acknowledged members (expected True) and delivered exits (expected False)."""
    rng = None if seed is None else random.Random(seed)
    # Uncertain members are left out: their value in Gist is unknown by definition, and the
    # next run re-sends it anyway.
    uncertain = exists().where(
        uncertain_members.c.audience_key == key,
        uncertain_members.c.user_id == memberships.c.user_id,
    )
    members = select(memberships.c.user_id, memberships.c.email).where(
        memberships.c.audience_key == key, ~uncertain
    )
    latest = (
        select(func.max(changes.c.id).label("id"))
        .where(changes.c.audience_key == key, changes.c.status == "delivered")
        .group_by(changes.c.user_id)
        .subquery()
    )
    exits = (
        select(changes.c.user_id, changes.c.email)
        .join(latest, changes.c.id == latest.c.id)
        .where(
            changes.c.value == false(),
            ~exists().where(
                memberships.c.audience_key == key, memberships.c.user_id == changes.c.user_id
            ),
            ~exists().where(
                uncertain_members.c.audience_key == key,
                uncertain_members.c.user_id == changes.c.user_id,
            ),
        )
    )
    with engine.connect() as connection:
        if key not in {a.property_key for a in settings.computations} and not connection.scalar(
            select(func.count()).where(audiences.c.key == key)
        ):
            settings.audience(key)  # raises ConfigError naming the configured keys
        chosen = [Sample(u, e, True) for u, e in _pick(connection, members, size, rng)]
        chosen += [Sample(u, e, False) for u, e in _pick(connection, exits, size // 4, rng)]
    return chosen


def save_repairs(engine: Engine, key: str, users: list[tuple[str, str]]) -> int:
    """Mark ``(user_id, email)`` uncertain in audience ``key``; returns how many were given."""
    if not users:
        return 0
    with engine.begin() as connection:
        run_id = connection.scalar(select(func.max(runs.c.id)).where(runs.c.audience_key == key))
        rows = [
            {"audience_key": key, "user_id": u, "email": e, "run_id": run_id or 0} for u, e in users
        ]
        connection.execute(upsert(engine, uncertain_members).on_conflict_do_nothing(), rows)
    return len(users)


def _pick(
    connection: Connection, query: Select[Any], k: int, rng: random.Random | None
) -> list[tuple[str, str]]:
    """Up to ``k`` random rows of ``query``, never holding more than ``k`` of them."""
    if k <= 0:
        return []
    if rng is None:
        rows = connection.execute(query.order_by(func.random()).limit(k))
        return [(r[0], r[1]) for r in rows]
    # Reproducible: choose row positions with the seeded generator, then stream the rows
    # in a stable order and keep those positions (one pass, bounded memory).
    total = connection.scalar(select(func.count()).select_from(query.subquery())) or 0
    wanted = set(rng.sample(range(total), min(k, total)))
    picked: list[tuple[str, str]] = []
    ordered = query.order_by(query.selected_columns[0]).execution_options(yield_per=STREAM_ROWS)
    result = connection.execute(ordered)
    try:
        for position, row in enumerate(result):
            if position in wanted:
                picked.append((row[0], row[1]))
                if len(picked) == len(wanted):
                    break
    finally:
        result.close()
    return picked


async def _fetch_all(
    settings: Settings,
    key: str,
    samples: list[Sample],
    transport: httpx.AsyncBaseTransport | None,
) -> list[Drift | None]:
    pacer = Pacer(settings.gist)  # built inside the loop its limiter will run on
    slots = asyncio.Semaphore(settings.gist.max_concurrency)
    async with make_http_client(settings.gist, transport) as http:
        client = GistClient(http)

        async def check(s: Sample) -> Drift | None:
            async with slots:
                try:
                    contact = await pacer.call(lambda: client.fetch_contact(s.user_id))
                except AuthError:
                    raise  # the key is refused: every other fetch would be too
                except ApiError as exc:
                    return Drift(s.user_id, s.expected, None, f"error: {exc}")
            return compare(key, s.user_id, s.expected, contact)

        tasks = [asyncio.create_task(check(s)) for s in samples]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


def compare(key: str, user_id: str, expected: bool, contact: dict[str, Any] | None) -> Drift | None:
    """None when Gist's contact carries the expected value, else the Drift."""
    properties = contact.get("custom_properties") if contact is not None else None
    if not isinstance(properties, dict):
        properties = {}
    actual = properties.get(key)
    if not expected:
        # An exit sends `false`, and "not true" is all an exit means: a missing contact or
        # property (or any value but JSON true) counts as matching.
        return None if actual is not True else Drift(user_id, False, actual, "value differs")
    if actual is True:
        return None
    if contact is None:
        return Drift(user_id, True, MISSING, "contact missing")
    if key not in properties:
        return Drift(user_id, True, None, "property missing")
    return Drift(user_id, True, actual, "value differs")
