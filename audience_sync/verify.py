"""``verify``: read a random sample of an audience (or a trait) back from Gist, report drift.

Reads that fail are errors, apart from drift: a refused key or a Gist that cannot be
reached stops the verify; another failed read is listed, and neither is ever repaired.
"""

from __future__ import annotations

import asyncio
import json
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, Select, exists, false, func, select

from audience_sync import lease
from audience_sync.budget import workspace_budget
from audience_sync.config import Settings
from audience_sync.db import upsert
from audience_sync.errors import ApiError, AuthError, FencedError
from audience_sync.gist import GistClient, make_http_client
from audience_sync.models import audiences, memberships, trait_values, uncertain_members
from audience_sync.models import member_changes as changes
from audience_sync.models import sync_runs as runs
from audience_sync.pacer import Pacer
from audience_sync.plan import drop_readings
from audience_sync.workers import Presence

MISSING = "missing"  # Drift.actual when Gist has no contact with that user_id
STREAM_ROWS = 1000


@dataclass(frozen=True)
class Drift:
    """A sampled user whose value in Gist is not the one we last delivered."""

    user_id: str
    expected: Any  # True/False for an audience, the trait's value for a trait
    actual: Any  # Gist's value; None when the property is absent; MISSING when the contact is
    reason: str  # "value differs" | "property missing" | "contact missing"


@dataclass(frozen=True)
class ReadError:
    """A sampled user Gist did not answer for (after retries): not checked, not drift."""

    user_id: str
    error: str


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify_audience`` found: ``matching + len(drifted) + len(errors) == sampled``."""

    audience_key: str
    sampled: int
    matching: int
    drifted: list[Drift]
    repaired: int  # drifted users marked uncertain, so the next run re-sends their value
    errors: list[ReadError] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form, for ``--json``."""
        return asdict(self)


@dataclass(frozen=True)
class Sample:
    """One user to read back, and the value Gist acknowledged for them."""

    user_id: str
    email: str
    expected: Any  # True/False (audience member / exit) or a trait's value


def verify_audience(
    settings: Settings,
    engine: Engine,
    key: str,
    *,
    sample: int = 100,
    repair: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    seed: int | None = None,
    worker: Presence | None = None,
) -> VerifyReport:
    """Fetch up to ``sample`` random members of audience ``key`` (plus up to ``sample // 4``
    users whose exit was delivered) — or, for a computed trait, up to ``sample`` users with
    an acknowledged value — from Gist and compare their property with what Gist
    acknowledged. With ``repair``, drifted users go into ``uncertain_members`` so the next
    ``run`` re-sends whatever the source calls for; ``memberships`` is never touched.

    Rate-limited and retried like delivery, the samples streamed through
    ``max_concurrency`` workers. ``AuthError`` propagates, and so does ``ApiError`` when
    Gist cannot be reached at all; a user Gist answers with another error is listed in
    ``errors``, neither drift nor repaired.

    A repair holds the key's lease from the sample to the save, as a run does: a run of the
    key in between could otherwise settle (or take back, when Gist refused it) the
    uncertainty the repair records, and the drift would stay in Gist. ``LockHeldError``
    when another process holds it; ``FencedError``, nothing saved, when it was lost.
    ``worker`` is the calling process's row in ``workers`` (as for ``run_once``), whose
    leases it takes back; without one, a repair registers itself for its length.
    """
    if sample < 0:
        raise ValueError("sample must be 0 or more")
    if not repair:
        return _verify(settings, engine, key, sample, transport, seed, None)
    registered = nullcontext(worker) if worker is not None else Presence(engine, "verify")
    with registered as worker:
        holder = lease.holder_for(engine, worker.id, settings)
        holder.acquire(key)
        try:
            worker.running([key])
            holder.start()
            return _verify(settings, engine, key, sample, transport, seed, holder)
        finally:
            holder.stop()
            holder.release()
            worker.running(())


def _verify(
    settings: Settings,
    engine: Engine,
    key: str,
    sample: int,
    transport: httpx.AsyncBaseTransport | None,
    seed: int | None,
    holder: lease.Holder | None,
) -> VerifyReport:
    """Sample, read back and compare; with ``holder`` (a repair), save the drifted users as
    uncertain under its lease."""
    samples = load_sample(settings, engine, key, sample, seed)
    drifted, errors = asyncio.run(_fetch_all(settings, engine, key, samples, transport))
    repaired = 0
    if holder is not None:
        emails = {s.user_id: s.email for s in samples}
        repaired = save_repairs(
            engine, key, [(d.user_id, emails[d.user_id]) for d in drifted], holder
        )
    matching = len(samples) - len(drifted) - len(errors)
    return VerifyReport(key, len(samples), matching, drifted, repaired, errors)


def load_sample(
    settings: Settings, engine: Engine, key: str, size: int, seed: int | None = None
) -> list[Sample]:
    """Random acknowledged members (expected True) and delivered exits (expected False);
    for a computed trait, random acknowledged values."""
    rng = None if seed is None else random.Random(seed)
    if _is_trait(settings, key):
        values = select(trait_values.c.user_id, trait_values.c.email, trait_values.c.value).where(
            trait_values.c.trait_key == key,
            ~exists().where(
                uncertain_members.c.audience_key == key,
                uncertain_members.c.user_id == trait_values.c.user_id,
            ),
        )
        with engine.connect() as connection:
            return [Sample(u, e, json.loads(v)) for u, e, v in _pick(connection, values, size, rng)]
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


def save_repairs(
    engine: Engine, key: str, users: list[tuple[str, str]], holder: lease.Holder | None = None
) -> int:
    """Mark ``(user_id, email)`` uncertain in audience ``key``; returns how many were given.
    With ``holder``, only while it still holds the key's lease (else ``FencedError``)."""
    if not users:
        return 0
    with lease.fenced(engine, holder, [key]) as (connection, held):
        if key not in held:
            raise FencedError(
                key, f"the lease of {key} was taken over or expired: nothing repaired"
            )
        run_id = connection.scalar(select(func.max(runs.c.id)).where(runs.c.audience_key == key))
        rows = [
            {"audience_key": key, "user_id": u, "email": e, "run_id": run_id or 0} for u, e in users
        ]
        connection.execute(upsert(engine, uncertain_members).on_conflict_do_nothing(), rows)
        # A reconcile reading continued later would make its pages, read before this
        # repair, the ledger: the drift found here would be settled as never there.
        drop_readings(connection, [key])
    return len(users)


def _is_trait(settings: Settings, key: str) -> bool:
    return any(c.property_key == key and c.is_trait for c in settings.computations)


def _pick(
    connection: Connection, query: Select[Any], k: int, rng: random.Random | None
) -> list[tuple[Any, ...]]:
    """Up to ``k`` random rows of ``query``, never holding more than ``k`` of them."""
    if k <= 0:
        return []
    if rng is None:
        rows = connection.execute(query.order_by(func.random()).limit(k))
        return [tuple(r) for r in rows]
    # Reproducible: choose row positions with the seeded generator, then stream the rows
    # in a stable order and keep those positions (one pass, bounded memory).
    total = connection.scalar(select(func.count()).select_from(query.subquery())) or 0
    wanted = set(rng.sample(range(total), min(k, total)))
    picked: list[tuple[Any, ...]] = []
    ordered = query.order_by(query.selected_columns[0]).execution_options(yield_per=STREAM_ROWS)
    result = connection.execute(ordered)
    try:
        for position, row in enumerate(result):
            if position in wanted:
                picked.append(tuple(row))
                if len(picked) == len(wanted):
                    break
    finally:
        result.close()
    return picked


async def _fetch_all(
    settings: Settings,
    engine: Engine,
    key: str,
    samples: list[Sample],
    transport: httpx.AsyncBaseTransport | None,
) -> tuple[list[Drift], list[ReadError]]:
    # Built inside the loop its limiter runs on; reads share the workspace's rate limit.
    pacer = Pacer(settings.gist, budget=workspace_budget(engine, settings.gist))
    trait = _is_trait(settings, key)
    drifted: list[tuple[int, Drift]] = []  # with the sample's position, to report in order
    errors: list[tuple[int, ReadError]] = []
    pending = iter(enumerate(samples))  # shared by the workers: each takes the next sample
    async with make_http_client(settings.gist, transport) as http:
        client = GistClient(http, deadline=settings.gist.timeout_seconds)

        async def worker() -> None:
            for position, s in pending:
                try:
                    contact = await pacer.call(partial(client.fetch_contact, s.user_id))
                except AuthError:
                    raise  # the key is refused: every other fetch would be too
                except ApiError as exc:
                    if exc.status is None:  # no answer at all, retries included
                        url = settings.gist.base_url
                        raise ApiError(f"cannot reach Gist at {url}: {exc}") from exc
                    errors.append((position, ReadError(s.user_id, str(exc))))
                    continue
                found = (
                    compare_value(key, s.user_id, s.expected, contact)
                    if trait
                    else compare(key, s.user_id, s.expected, contact)
                )
                if found is not None:
                    drifted.append((position, found))

        # A fixed set of workers, however big the sample: memory does not grow with it.
        workers = [
            asyncio.create_task(worker())
            for _ in range(min(settings.gist.max_concurrency, len(samples)))
        ]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        finally:
            await pacer.close()
    return [d for _, d in sorted(drifted)], [e for _, e in sorted(errors)]


def compare_value(
    key: str, user_id: str, expected: Any, contact: dict[str, Any] | None
) -> Drift | None:
    """A trait: None when Gist's contact carries ``expected`` (same JSON value and type;
    a null value matches an absent one), else the Drift."""
    properties = contact.get("custom_properties") if contact is not None else None
    if not isinstance(properties, dict):
        properties = {}
    actual = properties.get(key)
    if _canonical(actual) == _canonical(expected):
        return None
    if contact is None:
        return Drift(user_id, expected, MISSING, "contact missing")
    if key not in properties:
        return Drift(user_id, expected, None, "property missing")
    return Drift(user_id, expected, actual, "value differs")


def _canonical(value: Any) -> str:
    # 1, 1.0, "1" and true are four values, as the state stores them.
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


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
